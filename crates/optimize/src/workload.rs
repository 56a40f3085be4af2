//! Running an image's workload once on the lazylayer file system: FUSE
//! (read-only, serving the index) under a kernel overlayfs (the container's
//! writes), started with runc, stopped at a readiness condition. Everything
//! it sets up is a value that undoes itself on drop, in reverse order, so an
//! error or a crash of the workload leaves no mount or container behind.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lazylayer_fs::{ContentSource, FsMount, FsOptions, LazyFs, Trace};
use lazylayer_index::BootIndex;
use lazylayer_runtime::{
    ContainerBuilder, Killer, NetworkMode, Readiness, RunSpec, Runc, RuntimeError, Stdio,
    WaitCondition,
};

use crate::OptimizeError;

/// How to run the workload.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Where mount points and the bundle are made (a fresh subdirectory per run).
    pub work_root: PathBuf,
    /// The runc that starts it (the store's: [`Runc::for_store`]).
    pub runc: Runc,
    pub config_bytes: Vec<u8>,
    pub args: Option<Vec<String>>,
    pub env: Vec<String>,
    pub network: NetworkMode,
    pub wait: WaitCondition,
    pub timeout: Duration,
}

#[derive(Debug, Clone, Copy)]
pub struct WorkloadOutcome {
    /// Set when the workload exited by itself.
    pub exit_code: Option<i32>,
    /// The readiness condition (port, log, time) was met.
    pub ready: bool,
}

/// Lets another thread (a Ctrl-C handler) stop a running workload.
#[derive(Default)]
pub struct CancelHandle {
    cancelled: AtomicBool,
    running: Mutex<Option<Killer>>,
}

impl CancelHandle {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Kill the running container (if any); the run then unwinds normally.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
        if let Some(killer) = self.running.lock().unwrap().clone() {
            let _ = killer.kill(9);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

fn io(what: &str, p: &std::path::Path) -> impl FnOnce(std::io::Error) -> OptimizeError {
    let (what, p) = (what.to_string(), p.to_path_buf());
    move |e| OptimizeError::io(&what, &p, e)
}

/// Run the workload with the image root served by a [`LazyFs`] over `source`.
pub fn run_workload<S: ContentSource>(
    w: &Workload,
    index: Arc<BootIndex>,
    source: S,
    trace: Option<Arc<Trace>>,
    cancel: &CancelHandle,
) -> Result<WorkloadOutcome, OptimizeError> {
    if cancel.is_cancelled() {
        return Err(OptimizeError::Interrupted);
    }
    std::fs::create_dir_all(&w.work_root).map_err(io("creating work dir", &w.work_root))?;
    let work = tempfile::Builder::new()
        .prefix("run-")
        .tempdir_in(&w.work_root)
        .map_err(io("creating work dir", &w.work_root))?;
    let dir = work.path();
    let lower = dir.join("lower");
    std::fs::create_dir(&lower).map_err(io("creating work dir", &lower))?;
    let config = serde_json::from_slice(&w.config_bytes)
        .map_err(|e| OptimizeError::BadImage(format!("image config: {e}")))?;
    let id = format!(
        "lazylayer-{}",
        dir.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("run")
            .trim_start_matches("run-")
            .to_ascii_lowercase()
    );

    // A trace sees reads only when they come through the daemon, with
    // readahead limited as a lazy start will have it.
    let fs_opts = match trace {
        Some(_) => FsOptions {
            passthrough: false,
            max_readahead: Some(lazylayer_fs::BOOT_READAHEAD),
            ..FsOptions::default()
        },
        None => FsOptions::default(),
    };
    let mut fuse = FsMount::mount(LazyFs::new(index, source, trace, fs_opts), &lower, 4)?;
    // This process stacks the overlay on it and starts the workload there.
    fuse.force_unmount_on_death()?;
    let mut spec = RunSpec::new(id.clone(), PathBuf::new(), config);
    spec.args = w.args.clone();
    spec.env = w.env.clone();
    spec.network = w.network;
    let stdio = if matches!(w.wait, WaitCondition::Log(_)) {
        Stdio::Piped
    } else {
        Stdio::ToStderr
    };
    // Overlay over the FUSE root, bundle and runc in `dir`; undone when dropped.
    let mut container = ContainerBuilder::new(&id, &w.runc)
        .lowers(vec![lower.clone()])
        .writable(dir)
        .spec(spec)
        .stdio(stdio)
        .start()?;
    *cancel.running.lock().unwrap() = Some(container.killer());
    if cancel.is_cancelled() {
        // Cancelled while starting, before the handle could reach it.
        container.kill(9)?;
    }
    let waited = container.wait_ready(&w.wait, w.timeout);
    *cancel.running.lock().unwrap() = None;
    let outcome = match waited {
        Ok(Readiness::Exited(code)) => WorkloadOutcome {
            exit_code: Some(code),
            ready: false,
        },
        Ok(Readiness::Ready) => {
            // The trace is complete once the workload is ready; a short grace
            // is enough (many PID-1 shells ignore SIGTERM anyway).
            container.stop(Duration::from_millis(300))?;
            WorkloadOutcome {
                exit_code: None,
                ready: true,
            }
        }
        Err(RuntimeError::Timeout { .. }) => {
            let _ = container.stop(Duration::from_secs(1));
            return Err(OptimizeError::WorkloadFailed {
                code: -1,
                detail: format!(
                    " (it did not become ready within {} s: {:?})",
                    w.timeout.as_secs_f64(),
                    w.wait
                ),
            });
        }
        Err(e) => return Err(e.into()),
    };
    // Reverse order of set-up: the container (with its overlay), then FUSE.
    container.teardown()?;
    fuse.unmount()
        .map_err(io("unmounting the lazylayer file system", &lower))?;
    Ok(outcome)
}
