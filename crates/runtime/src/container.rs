//! One container start: a writable overlay over read-only lowers, an OCI bundle for
//! it, runc started on it — as one value, torn down in reverse order.
//!
//! ```no_run
//! # use lazylayer_runtime::*;
//! # fn f(runc: &Runc, lower: std::path::PathBuf, dir: &std::path::Path,
//! #      spec: RunSpec) -> Result<(), RuntimeError> {
//! let mut c = ContainerBuilder::new("web", runc)
//!     .lowers(vec![lower]) // top first
//!     .writable(dir)       // upper/, work/, rootfs/ and bundle/ are made in it
//!     .spec(spec)          // its id and rootfs are the builder's
//!     .stdio(Stdio::Inherit)
//!     .start()?;
//! let killer = c.killer(); // for another thread: killer.kill(15)
//! let code = c.wait()?;
//! c.teardown()?;           // or drop: the same, errors only logged
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::process::{ChildStderr, ChildStdout};
use std::time::Duration;

use crate::{
    validate_id, wait_ready, write_bundle, Container, Killer, OverlayMount, Readiness, RunSpec,
    Runc, RuntimeError, Stdio, WaitCondition,
};

/// How a container is started; [`start`](Self::start) does it.
#[derive(Debug)]
pub struct ContainerBuilder {
    id: String,
    runc: Runc,
    lowers: Vec<PathBuf>,
    data_lowers: Vec<PathBuf>,
    writable: Option<PathBuf>,
    spec: Option<RunSpec>,
    stdio: Stdio,
    keep_upper: bool,
}

/// A started container: runc's process, the overlay under it and the directories
/// made for them. Dropping it (or [`teardown`](Self::teardown)) kills the container if
/// it still runs, deletes runc's state, unmounts the overlay and removes those
/// directories: the reverse of the start.
#[derive(Debug)]
pub struct RunningContainer {
    id: String,
    rootfs: PathBuf,
    /// Present until the teardown; the fields below go after it, in reverse order.
    container: Option<Container>,
    overlay: Option<OverlayMount>,
    /// Made by `start`, removed by the teardown (the upper too, unless kept).
    created: Vec<PathBuf>,
}

impl ContainerBuilder {
    /// A container named `id` (also its runc id), run by `runc`.
    pub fn new(id: impl Into<String>, runc: &Runc) -> Self {
        ContainerBuilder {
            id: id.into(),
            runc: runc.clone(),
            lowers: Vec::new(),
            data_lowers: Vec::new(),
            writable: None,
            spec: None,
            stdio: Stdio::Inherit,
            keep_upper: false,
        }
    }

    /// The read-only lower directories of the root, top first.
    pub fn lowers(mut self, lowers: Vec<PathBuf>) -> Self {
        self.lowers = lowers;
        self
    }

    /// Data-only lower directories below `lowers`, tried in order for the
    /// bytes of a metacopy file that redirects there (see
    /// [`OverlayMount::mount_with_data`]).
    pub fn data_lowers(mut self, data: Vec<PathBuf>) -> Self {
        self.data_lowers = data;
        self
    }

    /// The directory (made if missing, never removed) that gets the overlay's `upper/`
    /// and `work/`, the root's mount point `rootfs/` and the bundle `bundle/`; none of
    /// these may exist yet.
    pub fn writable(mut self, dir: impl Into<PathBuf>) -> Self {
        self.writable = Some(dir.into());
        self
    }

    /// What to run; its `id` and `rootfs` are replaced by the builder's.
    pub fn spec(mut self, spec: RunSpec) -> Self {
        self.spec = Some(spec);
        self
    }

    /// Where the container's stdio goes (default: ours).
    pub fn stdio(mut self, stdio: Stdio) -> Self {
        self.stdio = stdio;
        self
    }

    /// Keep `upper/` (the container's writes) at the teardown, for a container that
    /// is listed after its exit; everything else still goes.
    pub fn keep_upper(mut self, keep: bool) -> Self {
        self.keep_upper = keep;
        self
    }

    /// Makes the directories, mounts the overlay, writes the bundle and starts runc.
    /// A failure undoes whatever of that was done.
    pub fn start(self) -> Result<RunningContainer, RuntimeError> {
        validate_id(&self.id)?;
        let config = |reason: &str| RuntimeError::Config {
            id: self.id.clone(),
            reason: reason.to_owned(),
        };
        let writable = self
            .writable
            .clone()
            .ok_or_else(|| config("no writable dir"))?;
        let mut spec = self.spec.ok_or_else(|| config("no run spec"))?;
        let [upper, work, rootfs, bundle] =
            ["upper", "work", "rootfs", "bundle"].map(|d| writable.join(d));
        let mut c = RunningContainer {
            id: self.id.clone(),
            rootfs: rootfs.clone(),
            container: None,
            overlay: None,
            created: Vec::new(),
        };
        std::fs::create_dir_all(&writable).map_err(|e| RuntimeError::io("create", &writable, e))?;
        for d in [&upper, &work, &rootfs, &bundle] {
            std::fs::create_dir(d).map_err(|e| RuntimeError::io("create", d, e))?;
            if !(self.keep_upper && d == &upper) {
                c.created.push(d.clone());
            }
        }
        c.overlay = Some(OverlayMount::mount_with_data(
            &self.lowers,
            &self.data_lowers,
            &upper,
            &work,
            &rootfs,
        )?);
        spec.id = self.id.clone();
        spec.rootfs = rootfs;
        write_bundle(&spec, &bundle)?;
        c.container = Some(self.runc.start(&self.id, &bundle, self.stdio)?);
        Ok(c)
    }
}

impl RunningContainer {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The container's root: the overlay's mount point.
    pub fn rootfs(&self) -> &Path {
        &self.rootfs
    }

    /// runc's process, for what this type does not pass on.
    pub fn process(&mut self) -> &mut Container {
        self.container.as_mut().expect("present until the teardown")
    }

    fn process_ref(&self) -> &Container {
        self.container.as_ref().expect("present until the teardown")
    }

    /// Waits for the exit: the container's code, 128+N when signal N killed it.
    pub fn wait(&mut self) -> Result<i32, RuntimeError> {
        self.process().wait()
    }

    /// [`wait`](Self::wait) without blocking: None while it runs.
    pub fn try_wait(&mut self) -> Result<Option<i32>, RuntimeError> {
        self.process().try_wait()
    }

    /// Signals the container's init; one that already exited is not an error.
    pub fn kill(&mut self, signal: i32) -> Result<(), RuntimeError> {
        self.process().kill(signal)
    }

    /// A handle that signals the container from another thread or task while this
    /// value waits.
    pub fn killer(&self) -> Killer {
        self.process_ref().killer()
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the exit (see [`Container::stop`]).
    pub fn stop(&mut self, grace: Duration) -> Result<i32, RuntimeError> {
        self.process().stop(grace)
    }

    /// The host PID of the container's init once it runs (see [`Container::pid`]).
    pub fn pid(&self) -> Option<u32> {
        self.process_ref().pid()
    }

    /// Waits until `cond` holds, the container exits, or `timeout` passes
    /// (see [`wait_ready`]).
    pub fn wait_ready(
        &mut self,
        cond: &WaitCondition,
        timeout: Duration,
    ) -> Result<Readiness, RuntimeError> {
        wait_ready(self.process(), cond, timeout)
    }

    /// With [`Stdio::Piped`].
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.process().take_stdout()
    }

    /// With [`Stdio::Piped`].
    pub fn take_stderr(&mut self) -> Option<ChildStderr> {
        self.process().take_stderr()
    }

    /// The teardown drop does, reporting the first failure: the directories stay
    /// when the overlay cannot be unmounted.
    pub fn teardown(mut self) -> Result<(), RuntimeError> {
        self.undo()
    }

    fn undo(&mut self) -> Result<(), RuntimeError> {
        // Kills it if still running (or runc itself, if stuck) and deletes runc's state.
        drop(self.container.take());
        if let Some(overlay) = self.overlay.take() {
            if let Err(e) = overlay.unmount() {
                // Removing below a mount point still mounted would reach into the
                // container's root: leave the directories.
                self.created.clear();
                return Err(e);
            }
        }
        let mut result = Ok(());
        for d in std::mem::take(&mut self.created).iter().rev() {
            match std::fs::remove_dir_all(d) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound && result.is_ok() => {
                    result = Err(RuntimeError::io("remove", d, e));
                }
                _ => {}
            }
        }
        result
    }
}

impl Drop for RunningContainer {
    fn drop(&mut self) {
        if let Err(e) = self.undo() {
            tracing::warn!(id = %self.id, error = %e, "container teardown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_a_bad_id_or_missing_parts_before_making_anything() {
        let dir = tempfile::tempdir().unwrap();
        let runc = Runc::new(dir.path().join("runc"));
        let writable = dir.path().join("c");
        let spec = || {
            let config = oci_spec::image::ImageConfigurationBuilder::default()
                .build()
                .unwrap();
            RunSpec::new("x", "", config)
        };
        let err = |b: ContainerBuilder| b.start().unwrap_err().to_string();
        let e = err(ContainerBuilder::new("../x", &runc)
            .writable(&writable)
            .spec(spec()));
        assert!(e.contains("invalid container id"), "{e}");
        let e = err(ContainerBuilder::new("c", &runc).spec(spec()));
        assert!(e.contains("no writable dir"), "{e}");
        let e = err(ContainerBuilder::new("c", &runc).writable(&writable));
        assert!(e.contains("no run spec"), "{e}");
        assert!(!writable.exists() && !runc.root.exists());
    }
}
