//! A small process that keeps the /dev/fuse descriptors of live mounts (and
//! their shared state, [`crate::OpenTable`]) while the server that serves
//! them stops, crashes or is replaced. A FUSE connection lives as long as one
//! descriptor of it is open, and requests the dead server had read stay
//! queued in it; the next server takes the descriptors back, asks the kernel
//! to send those requests again, and serves on. Readers wait; they never see
//! ENOTCONN.
//!
//! Protocol: one unix SOCK_SEQPACKET socket (message boundaries and
//! SCM_RIGHTS descriptors kept together), one JSON object per message:
//! `{"op":"put","name":N,"meta":M}` with descriptors, `{"op":"drop","name":N}`,
//! `{"op":"list"}` (answered by one message per entry, descriptors attached,
//! then `{"end":true}`). Only the holder's own user may talk to it. It drops
//! an entry whose mount (`meta.target`) is gone, and exits once it holds
//! nothing and the server that last talked to it is gone: it never outlives
//! both its server and the mounts it keeps.

use std::collections::BTreeMap;
use std::io::{Error, ErrorKind, IoSlice, IoSliceMut, Result};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazylayer_sys::mountinfo::mount_points;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use serde::{Deserialize, Serialize};

/// Most descriptors one entry holds.
const MAX_FDS: usize = 4;
/// Largest message (an entry's metadata is a few hundred bytes).
const MAX_MSG: usize = 64 << 10;
/// How often an idle holder looks for mounts that are gone.
const SWEEP: Duration = Duration::from_secs(2);

/// A held entry: a name (the mount point), the server's metadata, the
/// descriptors (duplicates: the holder keeps its own until told to drop).
#[derive(Debug)]
pub struct Held {
    pub name: String,
    pub meta: serde_json::Value,
    pub fds: Vec<OwnedFd>,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
enum Request {
    Put {
        name: String,
        meta: serde_json::Value,
    },
    Drop {
        name: String,
    },
    List,
}

#[derive(Serialize, Deserialize, Default)]
struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    meta: Option<serde_json::Value>,
    #[serde(default)]
    end: bool,
}

/// A client of the holder at `socket`, which it starts (as `program args`,
/// in a session of its own so that it survives its starter) when none runs.
#[derive(Debug, Clone)]
pub struct Holder {
    socket: PathBuf,
    program: PathBuf,
    args: Vec<String>,
}

impl Holder {
    pub fn new(socket: &Path, program: &Path, args: Vec<String>) -> Holder {
        Holder {
            socket: socket.to_path_buf(),
            program: program.to_path_buf(),
            args,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Keep `fds` under `name` (replacing what was kept under it).
    pub fn put(&self, name: &str, meta: serde_json::Value, fds: &[BorrowedFd<'_>]) -> Result<()> {
        let s = self.connect_or_start()?;
        let req = Request::Put {
            name: name.to_string(),
            meta,
        };
        send(&s, &serde_json::to_vec(&req)?, fds)?;
        expect_ok(&s)
    }

    /// Make sure a holder runs (started now if none does), so that the
    /// first [`Holder::put`] finds it.
    pub fn start(&self) -> Result<()> {
        let s = self.connect_or_start()?;
        send(&s, &serde_json::to_vec(&Request::List)?, &[])?;
        loop {
            let (bytes, _) = recv(&s)?.ok_or_else(|| closed(&self.socket))?;
            let r: Reply = serde_json::from_slice(&bytes).map_err(invalid)?;
            if r.end || r.error.is_some() {
                return Ok(());
            }
        }
    }

    /// Stop keeping `name` (nothing to do when no holder runs).
    pub fn drop_entry(&self, name: &str) -> Result<()> {
        let Some(s) = self.connect()? else {
            return Ok(());
        };
        let req = Request::Drop {
            name: name.to_string(),
        };
        send(&s, &serde_json::to_vec(&req)?, &[])?;
        expect_ok(&s)
    }

    /// Everything held, with duplicates of the descriptors (empty when no
    /// holder runs).
    pub fn list(&self) -> Result<Vec<Held>> {
        let Some(s) = self.connect()? else {
            return Ok(Vec::new());
        };
        send(&s, &serde_json::to_vec(&Request::List)?, &[])?;
        let mut out = Vec::new();
        loop {
            let (bytes, fds) = recv(&s)?.ok_or_else(|| closed(&self.socket))?;
            let r: Reply = serde_json::from_slice(&bytes).map_err(invalid)?;
            if let Some(e) = r.error {
                return Err(Error::other(format!("descriptor holder: {e}")));
            }
            if r.end {
                return Ok(out);
            }
            out.push(Held {
                name: r.name.unwrap_or_default(),
                meta: r.meta.unwrap_or_default(),
                fds,
            });
        }
    }

    /// The holder's PID, if one runs (from the file it writes beside its socket).
    pub fn pid(&self) -> Option<u32> {
        let s = std::fs::read_to_string(pid_file(&self.socket)).ok()?;
        s.trim().parse().ok()
    }

    fn connect(&self) -> Result<Option<OwnedFd>> {
        let s = rustix::net::socket_with(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        let addr = SocketAddrUnix::new(&self.socket)?;
        match rustix::net::connect(&s, &addr) {
            Ok(()) => Ok(Some(s)),
            Err(rustix::io::Errno::NOENT | rustix::io::Errno::CONNREFUSED) => Ok(None),
            Err(e) => Err(Error::from(e)),
        }
    }

    fn connect_or_start(&self) -> Result<OwnedFd> {
        if let Some(s) = self.connect()? {
            return Ok(s);
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.socket.with_extension("log"))?;
        let mut cmd = std::process::Command::new(&self.program);
        cmd.args(&self.args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        // SAFETY: setsid is async-signal-safe. A session of its own: a
        // signal to the server's process group (Ctrl-C, a test's kill) does
        // not reach the holder.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                rustix::process::setsid()?;
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            Error::new(
                e.kind(),
                format!(
                    "starting the descriptor holder {}: {e}",
                    self.program.display()
                ),
            )
        })?;
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.connect()? {
                // Reaped by whoever outlives it; not waited for here.
                std::mem::forget(child);
                return Ok(s);
            }
            if let Ok(Some(st)) = child.try_wait() {
                // Another holder may have won the socket meanwhile.
                if let Some(s) = self.connect()? {
                    return Ok(s);
                }
                return Err(Error::other(format!(
                    "the descriptor holder exited at once ({st}); see {}",
                    self.socket.with_extension("log").display()
                )));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(Error::new(
                    ErrorKind::TimedOut,
                    format!(
                        "the descriptor holder did not open {}",
                        self.socket.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

fn pid_file(socket: &Path) -> PathBuf {
    socket.with_extension("pid")
}

fn closed(socket: &Path) -> Error {
    Error::new(
        ErrorKind::UnexpectedEof,
        format!(
            "the descriptor holder at {} closed the connection",
            socket.display()
        ),
    )
}

fn invalid(e: serde_json::Error) -> Error {
    Error::new(ErrorKind::InvalidData, e)
}

fn expect_ok(s: &OwnedFd) -> Result<()> {
    let (bytes, _) = recv(s)?.ok_or_else(|| Error::from(ErrorKind::UnexpectedEof))?;
    let r: Reply = serde_json::from_slice(&bytes).map_err(invalid)?;
    match r.error {
        Some(e) => Err(Error::other(format!("descriptor holder: {e}"))),
        None => Ok(()),
    }
}

fn send(s: &OwnedFd, bytes: &[u8], fds: &[BorrowedFd<'_>]) -> Result<()> {
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = SendAncillaryBuffer::new(&mut space);
    if fds.len() > MAX_FDS {
        return Err(Error::new(ErrorKind::InvalidInput, "too many descriptors"));
    }
    if !fds.is_empty() && !cmsg.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(Error::other("descriptor message too large"));
    }
    rustix::net::sendmsg(s, &[IoSlice::new(bytes)], &mut cmsg, SendFlags::NOSIGNAL)?;
    Ok(())
}

/// One message and its descriptors; None at end of stream.
fn recv(s: &OwnedFd) -> Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
    let mut buf = vec![0u8; MAX_MSG];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut cmsg = RecvAncillaryBuffer::new(&mut space);
    let r = rustix::net::recvmsg(
        s,
        &mut [IoSliceMut::new(&mut buf)],
        &mut cmsg,
        RecvFlags::CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for m in cmsg.drain() {
        if let RecvAncillaryMessage::ScmRights(it) = m {
            fds.extend(it);
        }
    }
    if r.bytes == 0 && fds.is_empty() {
        return Ok(None);
    }
    if r.flags.contains(rustix::net::ReturnFlags::TRUNC) {
        return Err(Error::new(ErrorKind::InvalidData, "message too long"));
    }
    buf.truncate(r.bytes);
    Ok(Some((buf, fds)))
}

struct Entry {
    meta: serde_json::Value,
    fds: Vec<OwnedFd>,
}

/// How long the holder keeps connections that no server serves, by default:
/// readers of those mounts wait meanwhile, and a lazy file system's reader
/// must get an error after a bounded wait, never hang.
pub const ORPHAN_TIMEOUT: Duration = Duration::from_secs(60);

/// Run a holder on `socket` until it holds nothing and the server that
/// last talked to it (its owner) is gone; never talked to, for a minute.
/// Kept while its server runs, the holder is there for the server's next
/// mount: starting one is not on a container start's path. When the owner
/// is gone and no server talks to the holder for `orphan_timeout`, it lets
/// the connections go: the kernel ends them (waiting readers get an error,
/// ENOTCONN after that), and the next server detaches the dead mounts.
pub fn serve(socket: &Path, orphan_timeout: Duration) -> Result<()> {
    serve_with(socket, orphan_timeout, |pid| {
        rustix::process::Pid::from_raw(pid as i32)
            .is_some_and(|p| rustix::process::test_kill_process(p).is_ok())
    })
}

fn serve_with(socket: &Path, orphan_timeout: Duration, alive: impl Fn(u32) -> bool) -> Result<()> {
    let listener = bind(socket)?;
    std::fs::write(pid_file(socket), std::process::id().to_string())?;
    let mut entries: BTreeMap<String, Entry> = BTreeMap::new();
    let mut owner: Option<u32> = None;
    let started = Instant::now();
    // Since when the owner is known to be gone (None: alive, or not checked).
    let mut orphaned: Option<Instant> = None;
    let me = rustix::process::geteuid();
    loop {
        let mut pfd = [rustix::event::PollFd::new(
            &listener,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: SWEEP.as_secs() as i64,
            tv_nsec: 0,
        };
        let ready = rustix::event::poll(&mut pfd, Some(&timeout))?;
        if ready > 0 {
            let conn = rustix::net::accept_with(&listener, SocketFlags::CLOEXEC)?;
            let peer = rustix::net::sockopt::socket_peercred(&conn)?;
            if peer.uid != me {
                tracing::warn!(
                    pid = peer.pid.as_raw_nonzero().get(),
                    "refused a client of another user"
                );
                continue;
            }
            owner = Some(peer.pid.as_raw_nonzero().get() as u32);
            if let Err(e) = serve_conn(&conn, &mut entries) {
                tracing::warn!(error = %e, "descriptor holder client");
            }
        } else {
            sweep(&mut entries);
        }
        let unowned = match owner {
            Some(pid) => !alive(pid),
            None => started.elapsed() > Duration::from_secs(60),
        };
        if !unowned {
            orphaned = None;
        } else if !entries.is_empty() {
            let since = *orphaned.get_or_insert_with(Instant::now);
            if since.elapsed() >= orphan_timeout {
                tracing::warn!(
                    mounts = entries.len(),
                    after = ?orphan_timeout,
                    "no server took the lazy roots over: letting their connections go (readers get an error)"
                );
                // The last descriptors of those connections: closing them
                // ends each connection.
                entries.clear();
            }
        }
        if entries.is_empty() && unowned {
            break;
        }
    }
    // Unlinked before closing: a client that finds no socket starts a new
    // holder, which can then bind the path.
    let _ = std::fs::remove_file(socket);
    let _ = std::fs::remove_file(pid_file(socket));
    tracing::info!("holding nothing: exiting");
    Ok(())
}

fn bind(socket: &Path) -> Result<OwnedFd> {
    let l = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?;
    let addr = SocketAddrUnix::new(socket)?;
    match rustix::net::bind(&l, &addr) {
        Ok(()) => {}
        Err(rustix::io::Errno::ADDRINUSE) => {
            // A live holder owns it, or a dead one left the file.
            let probe = rustix::net::socket_with(
                AddressFamily::UNIX,
                SocketType::SEQPACKET,
                SocketFlags::CLOEXEC,
                None,
            )?;
            if rustix::net::connect(&probe, &addr).is_ok() {
                return Err(Error::new(
                    ErrorKind::AddrInUse,
                    format!("a descriptor holder already serves {}", socket.display()),
                ));
            }
            std::fs::remove_file(socket)?;
            rustix::net::bind(&l, &addr)?;
        }
        Err(e) => return Err(e.into()),
    }
    rustix::net::listen(&l, 16)?;
    Ok(l)
}

fn serve_conn(conn: &OwnedFd, entries: &mut BTreeMap<String, Entry>) -> Result<()> {
    // A client sends one request per connection and waits for the answer.
    let Some((bytes, fds)) = recv(conn)? else {
        return Ok(());
    };
    let reply = |r: &Reply, fds: &[BorrowedFd<'_>]| send(conn, &serde_json::to_vec(r)?, fds);
    match serde_json::from_slice::<Request>(&bytes) {
        Ok(Request::Put { name, meta }) => {
            tracing::info!(name, fds = fds.len(), "holding");
            entries.insert(name, Entry { meta, fds });
            reply(&Reply::default(), &[])
        }
        Ok(Request::Drop { name }) => {
            if entries.remove(&name).is_some() {
                tracing::info!(name, "dropped");
            }
            reply(&Reply::default(), &[])
        }
        Ok(Request::List) => {
            for (name, e) in entries.iter() {
                let fds: Vec<BorrowedFd<'_>> = e.fds.iter().map(|f| f.as_fd()).collect();
                let r = Reply {
                    name: Some(name.clone()),
                    meta: Some(e.meta.clone()),
                    ..Reply::default()
                };
                reply(&r, &fds)?;
            }
            reply(
                &Reply {
                    end: true,
                    ..Reply::default()
                },
                &[],
            )
        }
        Err(e) => reply(
            &Reply {
                error: Some(format!("bad request: {e}")),
                ..Reply::default()
            },
            &[],
        ),
    }
}

/// Drop entries whose mount is gone (unmounted by hand, or by a server that
/// died before it could say so): their connections serve nobody.
fn sweep(entries: &mut BTreeMap<String, Entry>) {
    let mounted = mount_points();
    entries.retain(|name, e| {
        let target = e
            .meta
            .get("target")
            .and_then(|t| t.as_str())
            .unwrap_or(name);
        let keep = mounted.iter().any(|m| m == target);
        if !keep {
            tracing::info!(name, "its mount is gone: dropped");
        }
        keep
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The holder keeps what it is given, hands out duplicates, drops on
    /// request, and exits once empty; run in-process on a thread.
    #[test]
    fn holder_keeps_lists_and_drops_descriptors() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let s2 = sock.clone();
        // Its owner (this process) counts as gone: it exits once empty.
        let server =
            std::thread::spawn(move || serve_with(&s2, Duration::from_secs(3600), |_| false));
        let h = Holder::new(&sock, Path::new("/nonexistent"), vec![]);
        let t0 = Instant::now();
        while h.pid().is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        // A pipe: what is written on the held end's twin comes out of the
        // duplicate handed back, so it is the same open file.
        let (r, w) = rustix::pipe::pipe().unwrap();
        let meta = serde_json::json!({"target": "/", "image": "x"});
        h.put("/", meta.clone(), &[r.as_fd()]).unwrap();
        drop(r);
        let held = h.list().unwrap();
        assert_eq!(held.len(), 1);
        assert_eq!(held[0].name, "/");
        assert_eq!(held[0].meta, meta);
        assert_eq!(held[0].fds.len(), 1);
        rustix::io::write(&w, b"ok").unwrap();
        let mut buf = [0u8; 2];
        rustix::io::read(&held[0].fds[0], &mut buf).unwrap();
        assert_eq!(&buf, b"ok");
        h.drop_entry("/").unwrap();
        server.join().unwrap().unwrap();
        assert!(
            !sock.exists(),
            "an empty holder exits and removes its socket"
        );
        assert!(h.list().unwrap().is_empty());
        assert!(h.pid().is_none());
    }
}

#[cfg(test)]
mod orphan_tests {
    use super::*;

    /// With no server for `orphan_timeout`, the holder closes what it held
    /// (so the kernel ends those connections) and exits: a reader of such a
    /// mount gets an error after a bounded wait instead of hanging.
    #[test]
    fn an_orphaned_holder_lets_its_descriptors_go_after_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("h.sock");
        let s2 = sock.clone();
        let t0 = Instant::now();
        let server =
            std::thread::spawn(move || serve_with(&s2, Duration::from_millis(500), |_| false));
        let h = Holder::new(&sock, Path::new("/nonexistent"), vec![]);
        while h.pid().is_none() && t0.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let (r, w) = rustix::pipe::pipe().unwrap();
        h.put("/", serde_json::json!({"target": "/"}), &[r.as_fd()])
            .unwrap();
        drop(r);
        // Held: the pipe still has a reader.
        assert!(rustix::io::write(&w, b"x").is_ok());
        server.join().unwrap().unwrap();
        // Let go: no reader is left, so a write fails with EPIPE.
        assert_eq!(
            rustix::io::write(&w, b"x").unwrap_err(),
            rustix::io::Errno::PIPE
        );
        let took = t0.elapsed();
        assert!(took >= Duration::from_millis(500), "let go after {took:?}");
        assert!(!sock.exists());
    }
}
