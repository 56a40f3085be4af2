//! Readiness conditions: when a started container counts as "up".

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::thread::LinkNameSpaceType;

use crate::{Container, RuntimeError};

/// Longest sleep between two checks: readiness is noticed within this much.
const POLL: Duration = Duration::from_millis(50);

/// When a container counts as ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitCondition {
    /// Only its exit.
    Exit,
    /// A TCP connection to 127.0.0.1:PORT in the container's network namespace succeeds.
    Port(u16),
    /// An HTTP GET of PATH on 127.0.0.1:PORT, in the container's network
    /// namespace, answers 2xx or 3xx: a server that has served its first
    /// request (so `optimize` traces what serving one reads, too).
    Http(u16, String),
    /// A line of its stdout or stderr contains this text.
    Log(String),
    /// This much time has passed since the wait began.
    Time(Duration),
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The container exited (with this code) before the condition held.
    Exited(i32),
    Ready,
}

impl FromStr for WaitCondition {
    type Err = RuntimeError;

    /// `exit`, `port:8080`, `log:TEXT`, `time:5` or `time:2.5` (seconds).
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |reason: &str| RuntimeError::WaitCondition {
            input: input.to_owned(),
            reason: reason.to_owned(),
        };
        let (kind, arg) = match input.split_once(':') {
            Some((kind, arg)) => (kind, Some(arg)),
            None => (input, None),
        };
        match (kind, arg) {
            ("exit", None) => Ok(WaitCondition::Exit),
            ("port", Some(port)) => match port.parse::<u16>() {
                Ok(0) | Err(_) => Err(err("port must be a number from 1 to 65535")),
                Ok(port) => Ok(WaitCondition::Port(port)),
            },
            ("http", Some(spec)) => {
                let (port, path) = match spec.find('/') {
                    Some(i) => (&spec[..i], &spec[i..]),
                    None => (spec, "/"),
                };
                match port.parse::<u16>() {
                    Ok(0) | Err(_) => Err(err(
                        "http:PORT[/PATH]: port must be a number from 1 to 65535",
                    )),
                    Ok(port) => Ok(WaitCondition::Http(port, path.to_owned())),
                }
            }
            ("log", Some("")) => Err(err("log text must not be empty")),
            ("log", Some(text)) => Ok(WaitCondition::Log(text.to_owned())),
            ("time", Some(secs)) => secs
                .parse::<f64>()
                .ok()
                .and_then(|s| Duration::try_from_secs_f64(s).ok())
                .map(WaitCondition::Time)
                .ok_or_else(|| err("time must be a non-negative number of seconds")),
            _ => Err(err(
                "expected exit, port:PORT, http:PORT[/PATH], log:TEXT or time:SECONDS",
            )),
        }
    }
}

impl fmt::Display for WaitCondition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WaitCondition::Exit => write!(f, "exit"),
            WaitCondition::Port(port) => write!(f, "port:{port}"),
            WaitCondition::Http(port, path) => write!(f, "http:{port}{path}"),
            WaitCondition::Log(text) => write!(f, "log:{text}"),
            WaitCondition::Time(d) => write!(f, "time:{}", d.as_secs_f64()),
        }
    }
}

/// Waits until `cond` holds, the container exits, or `timeout` passes
/// ([`RuntimeError::Timeout`]).
///
/// `Log` needs a container started with [`Stdio::Piped`](crate::Stdio::Piped): it takes
/// its stdout and stderr and copies them, line by line, to our stderr while scanning
/// them (the container's output is diagnostics for whoever waits on it, and our stdout
/// may carry a report) — and goes on copying after readiness, until it closes them.
pub fn wait_ready(
    c: &mut Container,
    cond: &WaitCondition,
    timeout: Duration,
) -> Result<Readiness, RuntimeError> {
    let deadline = Instant::now() + timeout;
    match cond {
        WaitCondition::Exit => poll(c, cond, timeout, deadline, |slice| {
            std::thread::sleep(slice);
            Ok(false)
        }),
        WaitCondition::Time(after) => {
            let at = Instant::now() + *after;
            poll(c, cond, timeout, deadline, |slice| {
                let left = at.saturating_duration_since(Instant::now());
                std::thread::sleep(slice.min(left));
                Ok(Instant::now() >= at)
            })
        }
        WaitCondition::Log(text) => {
            let found = scan_output(c, cond, text.as_bytes())?;
            poll(c, cond, timeout, deadline, |slice| {
                match found.recv_timeout(slice) {
                    Ok(()) => Ok(true),
                    Err(mpsc::RecvTimeoutError::Timeout) => Ok(false),
                    // Both streams closed without a match: only the exit is left to see.
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(slice);
                        Ok(false)
                    }
                }
            })
        }
        WaitCondition::Port(_) | WaitCondition::Http(..) => {
            let (port, http_path) = match cond {
                WaitCondition::Http(port, path) => (port, Some(path.clone())),
                WaitCondition::Port(port) => (port, None),
                _ => unreachable!(),
            };
            let pid = c.pid_within(deadline.saturating_duration_since(Instant::now()));
            // Opened once, here: the probe then holds the namespace even if the container
            // exits meanwhile, instead of looking the PID up again later.
            let netns = pid.and_then(|pid| std::fs::File::open(format!("/proc/{pid}/ns/net")).ok());
            let Some(netns) = netns else {
                // Exited (or never ran): report how, or time out.
                return poll(c, cond, timeout, deadline, |slice| {
                    std::thread::sleep(slice);
                    Ok(false)
                });
            };
            let probe = PortProbe::start(netns, *port, http_path);
            let id = c.id().to_owned();
            poll(c, cond, timeout, deadline, |slice| {
                match probe.result.recv_timeout(slice) {
                    Ok(Ok(())) => Ok(true),
                    Ok(Err(reason)) => Err(RuntimeError::Readiness {
                        id: id.clone(),
                        condition: cond.to_string(),
                        reason,
                    }),
                    Err(mpsc::RecvTimeoutError::Timeout) => Ok(false),
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        std::thread::sleep(slice);
                        Ok(false)
                    }
                }
            })
        }
    }
}

/// Calls `ready(slice)` (which may block up to `slice`), then checks for exit, then for
/// the deadline, until one of them ends the wait.
fn poll(
    c: &mut Container,
    cond: &WaitCondition,
    timeout: Duration,
    deadline: Instant,
    mut ready: impl FnMut(Duration) -> Result<bool, RuntimeError>,
) -> Result<Readiness, RuntimeError> {
    loop {
        let slice = POLL.min(deadline.saturating_duration_since(Instant::now()));
        if ready(slice)? {
            return Ok(Readiness::Ready);
        }
        if let Some(code) = c.try_wait()? {
            return Ok(Readiness::Exited(code));
        }
        if Instant::now() >= deadline {
            return Err(RuntimeError::Timeout {
                id: c.id().to_owned(),
                condition: cond.to_string(),
                timeout,
            });
        }
    }
}

/// Starts copying the container's piped stdout and stderr to ours; the receiver gets
/// one message the first time a line holds `needle`.
fn scan_output(
    c: &mut Container,
    cond: &WaitCondition,
    needle: &[u8],
) -> Result<mpsc::Receiver<()>, RuntimeError> {
    let stdout = c.take_stdout();
    let stderr = c.take_stderr();
    if stdout.is_none() && stderr.is_none() {
        return Err(RuntimeError::Readiness {
            id: c.id().to_owned(),
            condition: cond.to_string(),
            reason: "needs a container started with Stdio::Piped whose output was not taken"
                .to_owned(),
        });
    }
    let (tx, rx) = mpsc::channel();
    let found = Arc::new(AtomicBool::new(false));
    if let Some(out) = stdout {
        copy_and_scan(out, std::io::stderr(), needle, tx.clone(), found.clone());
    }
    if let Some(err) = stderr {
        copy_and_scan(err, std::io::stderr(), needle, tx, found);
    }
    Ok(rx)
}

/// A detached thread: it ends when the container closes the stream, which outlives
/// the wait on purpose (the output keeps flowing after readiness).
fn copy_and_scan(
    from: impl Read + Send + 'static,
    mut to: impl Write + Send + 'static,
    needle: &[u8],
    tx: mpsc::Sender<()>,
    found: Arc<AtomicBool>,
) {
    let needle = needle.to_vec();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            // Our stdout going away must not stop the scan (nor block the container).
            let _ = to.write_all(&line).and_then(|()| to.flush());
            if !found.load(Ordering::Relaxed)
                && line.windows(needle.len()).any(|w| w == needle.as_slice())
                && !found.swap(true, Ordering::Relaxed)
            {
                let _ = tx.send(());
            }
        }
    });
}

/// A thread inside the container's network namespace that connects to 127.0.0.1:PORT
/// every 50 ms until it succeeds or is stopped (on drop).
struct PortProbe {
    result: mpsc::Receiver<Result<(), String>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PortProbe {
    fn start(netns: std::fs::File, port: u16, http_path: Option<String>) -> Self {
        let (tx, result) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        // A thread of its own, because setns moves the calling thread for good: it must
        // never go back to serving anything else.
        let thread = std::thread::spawn(move || {
            if let Err(e) = rustix::thread::move_into_link_name_space(
                netns.as_fd(),
                Some(LinkNameSpaceType::Network),
            ) {
                let _ = tx.send(Err(format!("cannot enter the network namespace: {e}")));
                return;
            }
            drop(netns);
            let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
            while !stop_flag.load(Ordering::Relaxed) {
                if let Ok(conn) = TcpStream::connect_timeout(&addr, POLL) {
                    if http_path.as_deref().is_none_or(|p| http_ok(conn, p)) {
                        let _ = tx.send(Ok(()));
                        return;
                    }
                }
                std::thread::sleep(POLL);
            }
        });
        PortProbe {
            result,
            stop,
            thread: Some(thread),
        }
    }
}

/// One `GET path` over `conn`: true for a 2xx or 3xx status line.
fn http_ok(mut conn: TcpStream, path: &str) -> bool {
    use std::io::{Read, Write};
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: localhost\r\nUser-Agent: lazylayer-ready\r\n\r\n");
    if conn.write_all(req.as_bytes()).is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        match conn.read(&mut buf[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    head.starts_with("HTTP/")
        && matches!(
            head.split(' ').nth(1).and_then(|c| c.chars().next()),
            Some('2') | Some('3')
        )
}

impl Drop for PortProbe {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_http_conditions() {
        assert_eq!(
            "http:80".parse::<WaitCondition>().unwrap(),
            WaitCondition::Http(80, "/".into())
        );
        assert_eq!(
            "http:8080/healthz?x=1".parse::<WaitCondition>().unwrap(),
            WaitCondition::Http(8080, "/healthz?x=1".into())
        );
        assert_eq!(
            WaitCondition::Http(8080, "/a".into()).to_string(),
            "http:8080/a"
        );
        assert!("http:0".parse::<WaitCondition>().is_err());
        assert!("http:x/".parse::<WaitCondition>().is_err());
    }

    #[test]
    fn parses_conditions() {
        assert_eq!(
            "exit".parse::<WaitCondition>().unwrap(),
            WaitCondition::Exit
        );
        assert_eq!(
            "port:8080".parse::<WaitCondition>().unwrap(),
            WaitCondition::Port(8080)
        );
        assert_eq!(
            "log:ready: now".parse::<WaitCondition>().unwrap(),
            WaitCondition::Log("ready: now".into())
        );
        assert_eq!(
            "time:5".parse::<WaitCondition>().unwrap(),
            WaitCondition::Time(Duration::from_secs(5))
        );
        assert_eq!(
            "time:2.5".parse::<WaitCondition>().unwrap(),
            WaitCondition::Time(Duration::from_millis(2500))
        );
        for bad in [
            "",
            "exit:1",
            "port:0",
            "port:70000",
            "port:x",
            "log:",
            "time:-1",
            "time:nan",
            "wait:3",
            "port",
        ] {
            let e = bad.parse::<WaitCondition>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{bad:?}: {e}");
        }
    }

    #[test]
    fn display_round_trips() {
        for s in ["exit", "port:80", "log:READY", "time:2.5"] {
            assert_eq!(s.parse::<WaitCondition>().unwrap().to_string(), s);
        }
    }
}
