//! Containers started with `runc run` in the foreground, as values that clean up.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::bundle::validate_id;
use crate::RuntimeError;

/// How long [`Container::pid`] waits for the container to reach "running".
const PID_WAIT: Duration = Duration::from_secs(10);
/// How long `Drop` waits for runc to exit after SIGKILL before killing runc itself.
const DROP_WAIT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(20);
/// runc's state directory under a lazylayer store's root: named here only.
const STORE_RUNC_DIR: &str = "runc";

/// The runc binary and its state directory.
#[derive(Debug, Clone)]
pub struct Runc {
    /// `runc` by default, found on PATH.
    pub binary: PathBuf,
    /// `runc --root`: where runc keeps container state, e.g. `<store>/runc`.
    pub root: PathBuf,
}

/// Where the container's stdout and stderr go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// Ours: the container shares our stdin, stdout and stderr.
    Inherit,
    /// Pipes, read with [`Container::take_stdout`] / [`Container::take_stderr`]; stdin is
    /// /dev/null.
    Piped,
    /// stdin /dev/null; the container's stdout goes to our *stderr*, so that
    /// a command printing a report on stdout (`optimize --json`) stays parseable.
    ToStderr,
}

/// A container started by [`Runc::start`]. Dropping it kills the container (if still
/// running) and deletes its runc state.
#[derive(Debug)]
pub struct Container {
    id: String,
    runc: Runc,
    /// runc's own log (JSON lines): its errors, apart from the container's output.
    log: PathBuf,
    /// `runc run`, the parent of the container's init. Behind a mutex so `pid(&self)`
    /// can notice that it exited.
    child: Mutex<Child>,
    /// Set once runc exited: the container's exit code, or runc's (status, message)
    /// when runc itself failed.
    exit: Option<Result<i32, (String, String)>>,
    /// Set with `exit`, for [`Killer`]s held elsewhere while this value waits.
    exited: Arc<AtomicBool>,
    pid: OnceLock<u32>,
}

/// Signals a [`Container`] from another thread or task while its owner is
/// blocked in [`Container::wait`] (a signal forwarded to the container, say).
#[derive(Debug, Clone)]
pub struct Killer {
    id: String,
    runc: Runc,
    exited: Arc<AtomicBool>,
}

impl Default for Runc {
    fn default() -> Self {
        Runc {
            binary: PathBuf::from("runc"),
            root: PathBuf::from("/run/lazylayer/runc"),
        }
    }
}

impl Runc {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Runc {
            binary: PathBuf::from("runc"),
            root: root.into(),
        }
    }

    /// The runc of the store at `store_root`: its state in `<store_root>/runc`, shared
    /// by `run`, `optimize`, `rm` and the reaping of orphans.
    pub fn for_store(store_root: &Path) -> Self {
        Runc::new(store_root.join(STORE_RUNC_DIR))
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd
    }

    /// `runc run --bundle BUNDLE ID` in the foreground: runc stays the parent of the
    /// container's init, and its stdio is the container's. runc's own messages go to
    /// `BUNDLE/runc-log.json`; [`Container::wait`] quotes them when runc fails.
    pub fn start(&self, id: &str, bundle: &Path, stdio: Stdio) -> Result<Container, RuntimeError> {
        validate_id(id)?;
        std::fs::create_dir_all(&self.root)
            .map_err(|e| RuntimeError::io("create runc root", &self.root, e))?;
        let log = bundle.join("runc-log.json");
        // A log from an earlier run would be mistaken for this run's errors.
        match std::fs::remove_file(&log) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(RuntimeError::io("remove", &log, e))
            }
            _ => {}
        }
        let mut cmd = self.command();
        // runc's own messages go to a log file, so Piped output is the container's only
        // and errors can quote runc exactly.
        cmd.arg("--log").arg(&log).args(["--log-format", "json"]);
        cmd.arg("run").arg("--bundle").arg(bundle).arg(id);
        match stdio {
            Stdio::Piped => {
                cmd.stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped());
            }
            Stdio::ToStderr => {
                cmd.stdin(std::process::Stdio::null())
                    .stdout(std::io::stderr());
            }
            Stdio::Inherit => {}
        }
        tracing::debug!(id, bundle = %bundle.display(), "runc run");
        let child = cmd.spawn().map_err(|source| RuntimeError::Spawn {
            id: id.to_owned(),
            command: format!("{} run", self.binary.display()),
            source,
        })?;
        Ok(Container {
            id: id.to_owned(),
            runc: self.clone(),
            log,
            child: Mutex::new(child),
            exit: None,
            exited: Arc::new(AtomicBool::new(false)),
            pid: OnceLock::new(),
        })
    }

    /// Runs `runc ARGS` for container `id`; a failure carries runc's stderr.
    fn run(&self, id: &str, args: &[&str]) -> Result<(), RuntimeError> {
        let command = format!("{} {}", self.binary.display(), args.join(" "));
        let out = self
            .command()
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|source| RuntimeError::Spawn {
                id: id.to_owned(),
                command: command.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        Err(RuntimeError::Runc {
            id: id.to_owned(),
            command,
            status: out.status.to_string(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }

    /// `runc kill ID SIGNAL`, once: fails when runc knows no such container or it is
    /// not running. [`Container::kill`] and [`Killer::kill`] retry around start and exit.
    pub fn kill(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        validate_id(id)?;
        check_signal(id, signal)?;
        self.run(id, &["kill", id, &signal.to_string()])
    }

    /// `runc delete --force ID`: kills what still runs of the container and forgets it.
    pub fn delete(&self, id: &str) -> Result<(), RuntimeError> {
        validate_id(id)?;
        self.run(id, &["delete", "--force", id])
    }

    /// `runc state ID` as (status, pid); None when runc knows no such container.
    fn state(&self, id: &str) -> Option<(String, u32)> {
        let out = self
            .command()
            .args(["state", id])
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let status = v["status"].as_str()?.to_owned();
        let pid = u32::try_from(v["pid"].as_u64()?).ok()?;
        Some((status, pid))
    }
}

impl Container {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The host PID of the container's init, once runc reports it running (polled for
    /// up to 10 s); None if the container exited or never started.
    pub fn pid(&self) -> Option<u32> {
        self.pid_within(PID_WAIT)
    }

    /// [`pid`](Self::pid), polling for at most `wait`.
    pub(crate) fn pid_within(&self, wait: Duration) -> Option<u32> {
        if let Some(pid) = self.pid.get() {
            return Some(*pid);
        }
        let deadline = Instant::now() + wait;
        loop {
            match self.runc.state(&self.id) {
                Some((status, pid)) if status == "running" && pid != 0 => {
                    return Some(*self.pid.get_or_init(|| pid));
                }
                Some((status, _)) if status == "stopped" => return None,
                // "creating"/"created", or no state yet: runc is still setting up.
                _ => {}
            }
            if self.exit.is_some() || self.lock_child().try_wait().ok().flatten().is_some() {
                return None;
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(POLL);
        }
    }

    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.lock_child().stdout.take()
    }

    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.lock_child().stderr.take()
    }

    /// Waits for the container to exit: its exit code, or 128+N when signal N killed it.
    /// A container that runc failed to start is an error carrying runc's message.
    pub fn wait(&mut self) -> Result<i32, RuntimeError> {
        if self.exit.is_none() {
            let status = self.lock_child().wait().map_err(|e| self.wait_error(e))?;
            self.finish(status);
        }
        self.outcome().expect("exit recorded just above")
    }

    /// Like [`wait`](Self::wait), without blocking: None while it runs.
    pub fn try_wait(&mut self) -> Result<Option<i32>, RuntimeError> {
        if self.exit.is_none() {
            let status = self
                .lock_child()
                .try_wait()
                .map_err(|e| self.wait_error(e))?;
            match status {
                Some(status) => self.finish(status),
                None => return Ok(None),
            }
        }
        self.outcome().transpose()
    }

    /// `runc kill ID SIGNAL`. A container that already exited (or never started) is not
    /// an error: there is nothing left to signal.
    pub fn kill(&mut self, signal: i32) -> Result<(), RuntimeError> {
        let (runc, id) = (self.runc.clone(), self.id.clone());
        kill_until_exit(&runc, &id, signal, || {
            // Any recorded exit, even runc's failure to start, leaves nothing to signal.
            let _ = self.try_wait();
            self.exit.is_some()
        })
    }

    /// A handle that signals this container from elsewhere while this value waits.
    pub fn killer(&self) -> Killer {
        Killer {
            id: self.id.clone(),
            runc: self.runc.clone(),
            exited: self.exited.clone(),
        }
    }

    /// SIGTERM, then SIGKILL if still running after `grace`; waits for the exit and
    /// deletes runc's state. Returns the exit code (143 / 137 when the signal killed it).
    pub fn stop(&mut self, grace: Duration) -> Result<i32, RuntimeError> {
        self.kill(15)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(code) = self.try_wait()? {
                self.delete();
                return Ok(code);
            }
            std::thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
        }
        self.kill(9)?;
        let code = self.wait()?;
        self.delete();
        Ok(code)
    }

    /// `runc delete -f ID`; runc run deletes on exit, so this only matters when runc
    /// itself died. Missing state is fine.
    fn delete(&self) {
        if let Err(e) = self.runc.delete(&self.id) {
            tracing::warn!(id = %self.id, error = %e, "runc delete failed");
        }
    }

    fn lock_child(&self) -> std::sync::MutexGuard<'_, Child> {
        // A poisoned lock only means another thread panicked mid-call; Child is intact.
        self.child.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn wait_error(&self, e: std::io::Error) -> RuntimeError {
        RuntimeError::Spawn {
            id: self.id.clone(),
            command: format!("{} run (wait)", self.runc.binary.display()),
            source: e,
        }
    }

    /// Records runc's exit status as the container's exit code, or as runc's error.
    fn finish(&mut self, status: ExitStatus) {
        let code = match (status.code(), status.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            (None, None) => 255,
        };
        // runc logs at "error" level only when it failed itself (bad config, exec not
        // found...); the container's own non-zero exits are not logged.
        let runc_failed = if code != 0 {
            runc_error(&self.log)
        } else {
            None
        };
        self.exit = Some(match runc_failed {
            Some(message) => Err((status.to_string(), message)),
            None => Ok(code),
        });
        self.exited.store(true, Ordering::SeqCst);
    }

    /// The recorded exit as `wait` reports it; None while running.
    fn outcome(&self) -> Option<Result<i32, RuntimeError>> {
        Some(match self.exit.as_ref()? {
            Ok(code) => Ok(*code),
            Err((status, message)) => Err(RuntimeError::Runc {
                id: self.id.clone(),
                command: format!("{} run", self.runc.binary.display()),
                status: status.clone(),
                message: message.clone(),
            }),
        })
    }
}

impl Killer {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// `runc kill ID SIGNAL`, as [`Container::kill`]: nothing to do once the container
    /// has exited (as its [`Container`] saw).
    pub fn kill(&self, signal: i32) -> Result<(), RuntimeError> {
        kill_until_exit(&self.runc, &self.id, signal, || {
            self.exited.load(Ordering::SeqCst)
        })
    }
}

fn check_signal(id: &str, signal: i32) -> Result<(), RuntimeError> {
    if !(1..=64).contains(&signal) {
        return Err(RuntimeError::Config {
            id: id.to_owned(),
            reason: format!("{signal} is not a signal number"),
        });
    }
    Ok(())
}

/// `runc kill`, retried until it lands or `exited()`: right after `start` runc may not
/// have saved the state yet ("does not exist"), and right after the init dies runc may
/// not have exited yet ("not running").
fn kill_until_exit(
    runc: &Runc,
    id: &str,
    signal: i32,
    mut exited: impl FnMut() -> bool,
) -> Result<(), RuntimeError> {
    // Checked here: retrying below would turn runc's refusal into a 10 s stall.
    check_signal(id, signal)?;
    let deadline = Instant::now() + PID_WAIT;
    loop {
        if exited() {
            return Ok(());
        }
        match runc.kill(id, signal) {
            Ok(()) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if self.exit.is_none() {
            let deadline = Instant::now() + DROP_WAIT;
            let mut killed = false;
            loop {
                if self.lock_child().try_wait().ok().flatten().is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    // runc is stuck: kill it; `delete -f` below kills the container.
                    tracing::warn!(id = %self.id, "runc did not exit after SIGKILL; killing runc");
                    let mut child = self.lock_child();
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                // Retried until it lands: right after start the state may not exist yet.
                if !killed {
                    killed = self.runc.kill(&self.id, 9).is_ok();
                }
                std::thread::sleep(POLL);
            }
        }
        self.delete();
    }
}

/// The error-level messages of runc's JSON log, if any, last ones last.
fn runc_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let errors: Vec<String> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| matches!(v["level"].as_str(), Some("error" | "fatal")))
        .filter_map(|v| v["msg"].as_str().map(str::to_owned))
        .collect();
    // The tail is enough, and keeps an error message readable.
    let tail = &errors[errors.len().saturating_sub(3)..];
    (!tail.is_empty()).then(|| tail.join("; "))
}
