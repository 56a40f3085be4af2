//! Containers that `lazylayer run` started, as directories under
//! `<root>/containers/<name>/`: `state.json` (what `ps` shows), `status.json`
//! (per-layer fetch progress, for `status`), the bundle, and the overlay's
//! upper and work dirs. A container directory is the unit `rm` removes.
//!
//! A container outlives its `lazylayer run` when that process is killed outright
//! (`kill -9`, OOM): runc keeps it running, its FUSE and overlay mounts and its pin
//! stay. [`ContainerDir::reap_orphans`] finds such containers by their recorded owner
//! and clears them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustix::fs::RenameFlags;
use serde::{Deserialize, Serialize};

use crate::RuntimeError;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ContainerStatus {
    Running,
    Exited,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ContainerState {
    pub name: String,
    pub image: String,
    /// Unix seconds.
    pub created: u64,
    pub status: ContainerStatus,
    pub exit_code: Option<i32>,
    /// The `lazylayer run` process serving the container's file system.
    pub pid: u32,
    /// Whether the root is served lazily (else: plain overlayfs over a full pull).
    pub lazy: bool,
    /// The start time of process `pid` ([`process_start_time`]), so that another
    /// process given the same pid later is not taken for the owner. None in records
    /// written before it was kept.
    #[serde(default)]
    pub pid_start: Option<u64>,
    /// `run --rm`: remove the directory when the container goes, even without its owner.
    #[serde(default)]
    pub rm: bool,
    /// The store pin (`<root>/pins/<pin>.json`) the owner holds for the image's content.
    #[serde(default)]
    pub pin: Option<String>,
    /// The owner died while the container ran: its exit code is unknown.
    #[serde(default)]
    pub owner_lost: bool,
}

/// A container [`ContainerDir::reap_orphans`] cleared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub name: String,
    /// Its directory went too (`run --rm`); else it is kept, marked exited.
    pub removed: bool,
}

/// When process `pid` started (clock ticks after boot, field 22 of /proc/PID/stat):
/// with the pid, it names one process for good. None if there is no such process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, may hold spaces and parentheses: count after its ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // `rest` starts at field 3.
    rest.split_whitespace().nth(22 - 3)?.parse().ok()
}

/// A container's directory.
#[derive(Debug, Clone)]
pub struct ContainerDir {
    pub path: PathBuf,
    /// For the directory this process created: its creation lock (see
    /// [`CREATING`]), held for as long as any copy of this lives.
    _creating: Option<Arc<std::fs::File>>,
}

/// A lock file in a container's directory, held (flock) by the process that
/// created the directory until it exits: a directory without a state file
/// whose lock is free was left by a `run` killed before it wrote one, and
/// is removed by the reaping; one whose lock is held is being created.
const CREATING: &str = ".creating";

/// The [`CREATING`] lock file before it is locked: no reaping looks at it.
const CREATING_UNLOCKED: &str = ".creating-unlocked";

/// Prefix of a container directory being removed (renamed first, so a
/// removal killed half way leaves no directory that looks like a container).
const REMOVING: &str = ".removing-";

/// Prefix of a container directory being made (`.new-PID-SEQ-NAME`): it
/// takes its name, its lock held inside, in one rename, so no directory
/// under a container's name is ever without its held lock or its state.
const STAGING: &str = ".new-";

fn is_being_removed(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(REMOVING.as_bytes())
}

fn is_staging(name: &std::ffi::OsStr) -> bool {
    name.as_encoded_bytes().starts_with(STAGING.as_bytes())
}

/// A directory being made aside whose maker is gone: its lock is free, or
/// it has none yet and its pid names no process. Nothing was mounted in it.
fn remove_staging_if_dead(path: &Path, name: &std::ffi::OsStr) {
    // The lock, when taken, is held until the removal.
    let (dead, _lock) = match take_creation_lock(path) {
        Ok(lock) => (lock.is_some(), lock),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let pid = name.to_str().and_then(|n| {
                n[STAGING.len()..]
                    .split('-')
                    .next()
                    .and_then(|p| p.parse::<u32>().ok())
            });
            (pid.is_none_or(|p| process_start_time(p).is_none()), None)
        }
        Err(_) => (false, None),
    };
    if dead {
        if let Err(e) = std::fs::remove_dir_all(path) {
            tracing::debug!(dir = %path.display(), error = %e, "removing a container directory being made");
        }
    }
}

/// The [`CREATING`] lock of directory `dir`, taken when its maker is gone
/// (Some), or None while its maker lives; an error (NotFound: no lock file)
/// when it cannot be opened.
fn take_creation_lock(dir: &Path) -> std::io::Result<Option<std::fs::File>> {
    let lock = std::fs::File::open(dir.join(CREATING))?;
    let free =
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok();
    Ok(free.then_some(lock))
}

/// Remove a container directory (nothing mounted below it any more): renamed
/// aside first, then removed; the reaping removes what a killed removal left.
fn remove_whole(path: &Path) -> Result<(), RuntimeError> {
    let aside = match (path.parent(), path.file_name()) {
        (Some(base), Some(name)) => {
            let mut n = std::ffi::OsString::from(REMOVING);
            n.push(name);
            base.join(n)
        }
        _ => path.to_path_buf(),
    };
    let target = match std::fs::rename(path, &aside) {
        Ok(()) => aside,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(_) => path.to_path_buf(),
    };
    std::fs::remove_dir_all(&target).map_err(io("removing", &target))
}

fn io(action: &'static str, p: &Path) -> impl FnOnce(std::io::Error) -> RuntimeError {
    let p = p.to_path_buf();
    move |source| RuntimeError::Io {
        action,
        path: p,
        source,
    }
}

impl ContainerDir {
    pub fn base(root: &Path) -> PathBuf {
        root.join("containers")
    }

    /// Create the directory of a new container; fails if the name is taken.
    pub fn create(root: &Path, name: &str) -> Result<ContainerDir, RuntimeError> {
        crate::validate_id(name)?;
        let base = Self::base(root);
        // Private (0700), base and container alike: a container's rootfs
        // holds its image's setuid binaries, reachable by path from the host.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&base)
            .map_err(io("creating", &base))?;
        let path = base.join(name);
        let exists = || RuntimeError::Config {
            id: name.to_string(),
            reason: format!(
                "a container named {name} exists already (remove it with `lazylayer rm {name}`)"
            ),
        };
        if path.exists() {
            return Err(exists());
        }
        // Made aside, locked, then renamed to its name: a run killed at any
        // point leaves either nothing under the name, or a directory whose
        // lock the reaping can test.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging = base.join(format!("{STAGING}{}-{seq}-{name}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io("creating", &staging))?;
        let made = (|| {
            // Locked under another name, then given its own: a concurrent
            // reaping that finds the lock file finds it held, never free
            // between its creation and its lock (which read as a dead maker).
            let unlocked = staging.join(CREATING_UNLOCKED);
            let lock = std::fs::File::create(&unlocked).map_err(io("creating", &unlocked))?;
            rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                .map_err(|e| io("locking", &unlocked)(e.into()))?;
            let lock_path = staging.join(CREATING);
            std::fs::rename(&unlocked, &lock_path).map_err(io("naming", &lock_path))?;
            let cwd = rustix::fs::CWD;
            match rustix::fs::renameat_with(cwd, &staging, cwd, &path, RenameFlags::NOREPLACE) {
                Ok(()) => Ok(lock),
                Err(rustix::io::Errno::EXIST) => Err(exists()),
                Err(e) => Err(io("naming", &path)(e.into())),
            }
        })();
        match made {
            Ok(lock) => Ok(ContainerDir {
                path,
                _creating: Some(Arc::new(lock)),
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging);
                Err(e)
            }
        }
    }

    pub fn open(root: &Path, name: &str) -> Result<ContainerDir, RuntimeError> {
        crate::validate_id(name)?;
        let path = Self::base(root).join(name);
        if !path.is_dir() {
            return Err(RuntimeError::Config {
                id: name.to_string(),
                reason: "no such container".into(),
            });
        }
        Ok(ContainerDir {
            path,
            _creating: None,
        })
    }

    pub fn list(root: &Path) -> Result<Vec<ContainerState>, RuntimeError> {
        let base = Self::base(root);
        let mut out = Vec::new();
        let Ok(rd) = std::fs::read_dir(&base) else {
            return Ok(out);
        };
        for e in rd.flatten() {
            if is_being_removed(&e.file_name()) || is_staging(&e.file_name()) {
                continue;
            }
            let d = ContainerDir {
                path: e.path(),
                _creating: None,
            };
            if let Ok(s) = d.read_state() {
                out.push(s.refreshed());
            }
        }
        out.sort_by(|a, b| a.created.cmp(&b.created).then(a.name.cmp(&b.name)));
        Ok(out)
    }

    pub fn sub(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }

    /// Durable as well as atomic: a state.json naming a container whose
    /// mounts and runc state exist must survive a power loss with them.
    pub fn write_state(&self, s: &ContainerState) -> Result<(), RuntimeError> {
        let dest = self.path.join("state.json");
        let bytes = serde_json::to_vec_pretty(s).expect("serialisable");
        lazylayer_sys::durable::write_atomically(&dest, &bytes).map_err(io("writing", &dest))
    }

    pub fn read_state(&self) -> Result<ContainerState, RuntimeError> {
        let p = self.path.join("state.json");
        let b = std::fs::read(&p).map_err(io("reading", &p))?;
        serde_json::from_slice(&b).map_err(|e| io("parsing", &p)(std::io::Error::other(e)))
    }

    /// Per-layer progress, written by the serving process four times a
    /// second: atomic (temp + rename) but not synced. A progress display
    /// lost to a power loss is rewritten by the next start, and an fsync
    /// this often would make ext4 flush the layer being fetched each time.
    pub fn write_status(&self, v: &impl Serialize) -> Result<(), RuntimeError> {
        let dest = self.path.join("status.json");
        let bytes = serde_json::to_vec_pretty(v).expect("serialisable");
        lazylayer_sys::durable::write_atomically_unsynced(&dest, &bytes)
            .map_err(io("writing", &dest))
    }

    pub fn read_status(&self) -> Result<serde_json::Value, RuntimeError> {
        let p = self.path.join("status.json");
        let b = std::fs::read(&p).map_err(io("reading", &p))?;
        serde_json::from_slice(&b).map_err(|e| io("parsing", &p)(std::io::Error::other(e)))
    }

    /// Remove the container: kill what may still run (a serving process that
    /// crashed leaves the container and its mounts behind), unmount every
    /// mount below the directory, delete runc's state, remove the directory.
    pub fn remove(self, runc: &crate::Runc, force: bool) -> Result<(), RuntimeError> {
        let state = self.read_state().ok().map(|s| s.refreshed());
        if let Some(s) = &state {
            if s.status == ContainerStatus::Running && !force {
                return Err(RuntimeError::Config {
                    id: s.name.clone(),
                    reason: "the container is running (stop it, or use --force)".into(),
                });
            }
            // Usually gone already (runc run deletes on exit).
            if let Err(e) = runc.delete(&s.name) {
                tracing::debug!(error = %e, "runc delete");
            }
        }
        crate::unmount_below(&self.path);
        remove_whole(&self.path)
    }

    /// Clears every container under `root` whose `lazylayer run` died while it ran
    /// (see the module doc): KILLs and deletes its runc container, unmounts its
    /// overlay and lazy FUSE root (detached if busy), removes its pin, then removes the
    /// directory if `--rm` was asked, else marks it exited with `owner_lost`.
    /// Only what the records name is touched: runc containers of our name in our runc
    /// root, mounts below the directory, the recorded pin; never the owner's pid.
    pub fn reap_orphans(root: &Path, runc: &crate::Runc) -> Vec<Reaped> {
        let mut reaped = Vec::new();
        let Ok(rd) = std::fs::read_dir(Self::base(root)) else {
            return reaped;
        };
        for e in rd.flatten() {
            if is_staging(&e.file_name()) {
                remove_staging_if_dead(&e.path(), &e.file_name());
                continue;
            }
            if is_being_removed(&e.file_name()) {
                // A removal that was killed half way (a live one's too: both
                // removing is harmless). Nothing in it is mounted any more.
                crate::unmount_below(&e.path());
                if let Err(e) = std::fs::remove_dir_all(e.path()) {
                    tracing::debug!(error = %e, "removing a container directory's remains");
                }
                continue;
            }
            let d = ContainerDir {
                path: e.path(),
                _creating: None,
            };
            match d.reap_if_orphaned(root, runc) {
                Ok(Some(r)) => reaped.push(r),
                Ok(None) => {}
                // Logged, not returned: one that cannot be cleared must not keep the others.
                Err(e) => tracing::warn!(
                    container = %d.path.display(),
                    error = %e,
                    "cannot clear a container whose lazylayer run is gone"
                ),
            }
        }
        reaped
    }

    fn reap_if_orphaned(
        &self,
        root: &Path,
        runc: &crate::Runc,
    ) -> Result<Option<Reaped>, RuntimeError> {
        let orphaned = |d: &ContainerDir| {
            // No state: being created by a living run (it writes one first thing).
            // A record naming another container than its directory's is not ours to act on.
            // An exited `--rm` container whose owner died before it removed
            // the directory is cleared too (nobody else would).
            d.read_state().ok().filter(|s| {
                (s.status == ContainerStatus::Running
                    || (s.status == ContainerStatus::Exited && s.rm))
                    && !s.owner_alive()
                    && d.path.file_name() == Some(s.name.as_ref())
            })
        };
        if orphaned(self).is_none() {
            self.remove_if_abandoned();
            return Ok(None);
        }
        // Two commands may reap at once: one does it, the other then sees it done.
        let dir = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("opening", &self.path)(e)),
        };
        rustix::fs::flock(&dir, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io("locking", &self.path)(e.into()))?;
        match orphaned(self) {
            Some(s) => self.reap(root, runc, s).map(Some),
            None => Ok(None),
        }
    }

    /// A directory without a state file whose creator is gone (its
    /// [`CREATING`] lock is free): the `run` was killed before it wrote its
    /// state, so nothing was mounted or started yet. Removed.
    fn remove_if_abandoned(&self) {
        if self.path.join("state.json").exists() {
            return;
        }
        // Kept open until the removal: the lock is held meanwhile. A
        // directory without a lock file was left by a run of an earlier
        // version killed before it made one (a `create` now names a
        // directory only with its lock inside): removed as well.
        let _lock = match take_creation_lock(&self.path) {
            Ok(Some(lock)) => Some(lock),
            Ok(None) => return,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && self.path.is_dir() => None,
            Err(_) => return,
        };
        // The state may have been written between the look and the lock.
        if self.path.join("state.json").exists() {
            return;
        }
        crate::unmount_below(&self.path);
        match std::fs::remove_dir_all(&self.path) {
            Ok(()) => {
                tracing::info!(dir = %self.path.display(), "removed a container directory whose run died before it started")
            }
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), error = %e, "removing an abandoned container directory")
            }
        }
    }

    fn reap(
        &self,
        root: &Path,
        runc: &crate::Runc,
        s: ContainerState,
    ) -> Result<Reaped, RuntimeError> {
        tracing::info!(name = %s.name, owner = s.pid, "clearing a container whose lazylayer run is gone");
        // KILL first: `delete --force` alone would do, but this way the container is
        // gone even if deleting fails (runc run, orphaned too, deletes it on exit).
        if let Err(e) = runc.kill(&s.name, 9) {
            tracing::debug!(error = %e, "runc kill of an orphaned container");
        }
        if let Err(e) = runc.delete(&s.name) {
            tracing::debug!(error = %e, "runc delete of an orphaned container");
        }
        crate::unmount_below(&self.path);
        if let Some(pin) = &s.pin {
            // Only a plain file name in pins/: a record cannot point anywhere else.
            if !pin.starts_with('.') && !pin.contains('/') {
                let p = root.join("pins").join(format!("{pin}.json"));
                match std::fs::remove_file(&p) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(io("removing", &p)(e))
                    }
                    _ => {}
                }
            }
        }
        let (name, removed) = (s.name.clone(), s.rm);
        if removed {
            remove_whole(&self.path)?;
        } else {
            self.write_state(&ContainerState {
                status: ContainerStatus::Exited,
                exit_code: None,
                owner_lost: true,
                ..s
            })?;
        }
        Ok(Reaped { name, removed })
    }
}

impl ContainerState {
    /// A "running" record whose serving process is gone is really exited.
    pub fn refreshed(mut self) -> ContainerState {
        if self.status == ContainerStatus::Running && !self.owner_alive() {
            self.status = ContainerStatus::Exited;
        }
        self
    }

    /// Whether the `lazylayer run` that wrote this record still lives: its pid, started
    /// when it was (a record without start time: any process of that pid).
    pub fn owner_alive(&self) -> bool {
        match self.pid_start {
            Some(t) => process_start_time(self.pid) == Some(t),
            None => Path::new(&format!("/proc/{}", self.pid)).exists(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(name: &str, pid: u32, pid_start: Option<u64>, rm: bool) -> ContainerState {
        ContainerState {
            name: name.into(),
            image: "img".into(),
            created: 0,
            status: ContainerStatus::Running,
            exit_code: None,
            pid,
            lazy: true,
            pid_start,
            rm,
            pin: Some(format!("run-{name}")),
            owner_lost: false,
        }
    }

    #[test]
    fn the_owner_is_its_pid_and_start_time() {
        let me = std::process::id();
        let start = process_start_time(me).expect("our own start time");
        assert!(state("a", me, Some(start), false).owner_alive());
        // Same pid, another start: a process that reused the pid.
        assert!(!state("a", me, Some(start + 1), false).owner_alive());
        // Old records: the pid alone.
        assert!(state("a", me, None, false).owner_alive());
        assert!(!state("a", u32::MAX, None, false).owner_alive());
        assert_eq!(process_start_time(u32::MAX), None);
    }

    #[test]
    fn orphans_are_cleared_and_living_containers_left_alone() {
        let root = tempfile::tempdir().unwrap();
        let root = root.path();
        let runc = crate::Runc::for_store(root);
        let me = std::process::id();
        let start = process_start_time(me).unwrap();
        std::fs::create_dir_all(root.join("pins")).unwrap();
        let cases = [
            ("alive", state("alive", me, Some(start), true)),
            (
                "reused-pid-rm",
                state("reused-pid-rm", me, Some(start + 1), true),
            ),
            ("dead-kept", state("dead-kept", u32::MAX, Some(1), false)),
            // `run --rm` killed after the container exited, before it removed
            // the directory; and a living one at that point.
            (
                "exited-rm",
                ContainerState {
                    status: ContainerStatus::Exited,
                    exit_code: Some(0),
                    ..state("exited-rm", u32::MAX, Some(1), true)
                },
            ),
            (
                "exited-rm-alive",
                ContainerState {
                    status: ContainerStatus::Exited,
                    exit_code: Some(0),
                    ..state("exited-rm-alive", me, Some(start), true)
                },
            ),
        ];
        for (name, s) in &cases {
            let d = ContainerDir::create(root, name).unwrap();
            d.write_state(s).unwrap();
            std::fs::write(root.join(format!("pins/run-{name}.json")), "{}").unwrap();
        }
        // Being created: no state yet, its creator (this test) alive.
        let _creating = ContainerDir::create(root, "new").unwrap();
        // Its creator killed before it wrote a state (the lock dropped).
        drop(ContainerDir::create(root, "abandoned").unwrap());
        // A record that names another container than its directory: left alone.
        ContainerDir::create(root, "misnamed")
            .unwrap()
            .write_state(&state("alive", u32::MAX, Some(1), true))
            .unwrap();

        // Its creator killed between the directory and its lock file (CI's
        // kill -9 of a run 6 ms in): nothing in it.
        std::fs::create_dir(ContainerDir::base(root).join("unlocked")).unwrap();
        // Killed while making its directory aside: with its lock file
        // (free), without one (its pid gone), and a living one's.
        let base = ContainerDir::base(root);
        let staged_free = base.join(format!("{STAGING}1-0-staged"));
        std::fs::create_dir(&staged_free).unwrap();
        std::fs::write(staged_free.join(CREATING), "").unwrap();
        let staged_dead = base.join(format!("{STAGING}{}-0-staged", u32::MAX));
        std::fs::create_dir(&staged_dead).unwrap();
        let staged_alive = base.join(format!("{STAGING}{me}-999-staged"));
        std::fs::create_dir(&staged_alive).unwrap();

        // A removal killed half way: the directory renamed aside, part left.
        let half = ContainerDir::base(root).join(".removing-gone");
        std::fs::create_dir_all(half.join("upper/etc")).unwrap();
        std::fs::write(half.join("state.json"), "{}").unwrap();

        let mut reaped = ContainerDir::reap_orphans(root, &runc);
        reaped.sort_by(|a, b| a.name.cmp(&b.name));
        let r = |name: &str, removed| Reaped {
            name: name.into(),
            removed,
        };
        assert_eq!(
            reaped,
            [
                r("dead-kept", false),
                r("exited-rm", true),
                r("reused-pid-rm", true)
            ]
        );
        assert!(["alive", "new", "misnamed", "exited-rm-alive"]
            .iter()
            .all(|n| base.join(n).is_dir()));
        assert!(!base.join("exited-rm").exists());
        assert!(!half.exists());
        assert!(root.join("pins/run-alive.json").exists());
        assert!(!base.join("reused-pid-rm").exists());
        assert!(!base.join("abandoned").exists());
        assert!(!base.join("unlocked").exists());
        assert!(!staged_free.exists() && !staged_dead.exists());
        assert!(staged_alive.exists());
        std::fs::remove_dir(&staged_alive).unwrap();
        assert!(!root.join("pins/run-reused-pid-rm.json").exists());
        assert!(!root.join("pins/run-dead-kept.json").exists());
        let kept = ContainerDir::open(root, "dead-kept")
            .unwrap()
            .read_state()
            .unwrap();
        assert_eq!(kept.status, ContainerStatus::Exited);
        assert!(kept.owner_lost && kept.exit_code.is_none());
        // Done once: nothing left to reap.
        assert!(ContainerDir::reap_orphans(root, &runc).is_empty());
    }

    /// Two `run`s at once: one makes its container's directory while the
    /// other reaps. The reaping must never take a directory being made for
    /// one whose maker is gone (CI saw `naming ...: No such file or
    /// directory` when it did, between the lock file's creation and its lock).
    #[test]
    fn a_directory_being_made_survives_a_concurrent_reaping() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let runc = crate::Runc::for_store(root);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    ContainerDir::reap_orphans(root, &runc);
                }
            });
            let made = (0..3000).map(|i| {
                // Dropped at once: its lock freed, the next reaping removes it.
                ContainerDir::create(root, &format!("c{i}")).map(drop)
            });
            let failed: Vec<String> = made
                .filter_map(|r| r.err())
                .map(|e| e.to_string())
                .collect();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(
                failed.is_empty(),
                "{} of 3000 failed: {:?}",
                failed.len(),
                &failed[..failed.len().min(3)]
            );
        });
    }

    /// The progress file is replaced whole each time (a reader never sees
    /// half of one) and no temp file stays beside it.
    #[test]
    fn status_is_replaced_whole_and_leaves_no_temp_file() {
        let root = tempfile::tempdir().unwrap();
        let d = ContainerDir::create(root.path(), "c1").unwrap();
        d.write_status(&serde_json::json!({"layers": [1, 2]}))
            .unwrap();
        d.write_status(&serde_json::json!({"layers": [3]})).unwrap();
        assert_eq!(d.read_status().unwrap(), serde_json::json!({"layers": [3]}));
        // Beside it only the creator's lock file.
        let mut names: Vec<_> = std::fs::read_dir(d.sub(""))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [CREATING, "status.json"]);
    }
}
