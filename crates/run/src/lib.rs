//! Running a container from an image reference, as `lazylayer run` does:
//! the container's directory and record (written first, so that a run killed
//! outright can be cleared by the next command), its root ([`ImageRoot`]:
//! the store's layers without FUSE when an optimized image is local whole,
//! lazy when it has a boot layer, else pulled in full), one container
//! start ([`ContainerBuilder`]), the signals the caller receives passed on,
//! and everything undone in reverse at exit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lazylayer_fetch::{FetchError, FetchOptions, LayerStatus};
use lazylayer_oci::{Reference, RegistryClient};
use lazylayer_root::{ImageRoot, LazyRoot, MountOptions};
use lazylayer_runtime::{
    process_start_time, signal_name, ContainerBuilder, ContainerDir, ContainerState,
    ContainerStatus, ForwardedSignals, NetworkMode, RunSpec, Runc, RuntimeError, Stdio,
};
use lazylayer_store::{PullProgress, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("opening {image}")]
    Open {
        image: String,
        #[source]
        source: FetchError,
    },
    #[error("the image config of {image}: {reason}")]
    Config { image: String, reason: String },
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What to run, and how.
pub struct RunOptions {
    pub name: String,
    pub reference: Reference,
    /// Remove the container's directory (its writable layer) at exit.
    pub rm: bool,
    pub fetch: FetchOptions,
    pub mount: MountOptions,
    /// Replaces the image's Cmd when set.
    pub args: Option<Vec<String>>,
    pub env: Vec<String>,
    pub network: NetworkMode,
    pub user: Option<String>,
    pub workdir: Option<String>,
    /// After a signal, how long the container has before it is KILLed.
    pub stop_timeout: Duration,
    /// When the run started, for the time to ready.
    pub t0: Instant,
    /// After the container's exit, how long the image's fetches get to
    /// finish (a lazily started image only): a short run then still
    /// completes an image whose rest takes less than this, and keeps more
    /// of it otherwise. The exit code is the container's either way.
    pub finish_after_exit: Duration,
}

/// The default of [`RunOptions::finish_after_exit`]: a few seconds, so a
/// short job's exit is delayed by at most that much, while the rest of an
/// image a run has half fetched has time to arrive (and be extracted) on a
/// usual link.
pub const FINISH_AFTER_EXIT: Duration = Duration::from_secs(5);

/// How a run ended.
pub struct RunReport {
    pub code: i32,
    /// Whether the container ever started (a signal can end the run before).
    pub started: bool,
    /// From `t0` until the root was ready (None if it never was).
    pub t_ready: Option<Duration>,
    /// For a lazily started container.
    pub lazy: Option<LazyStats>,
    /// The image was local whole: its root was the store's layers under the
    /// kernel's overlayfs, without FUSE.
    pub native: bool,
}

/// What a lazy root served and fetched, at the container's exit.
pub struct LazyStats {
    /// Everything came from the store, without network.
    pub offline: bool,
    pub layers: usize,
    pub layers_on_demand: usize,
    pub bytes_fetched: u64,
    pub passthrough_opens: u64,
    pub daemon_opens: u64,
    /// Per layer below the boot layer: what is kept and extracted at exit.
    pub layer_status: Vec<LayerStatus>,
}

/// The store pin a run of container `name` holds (container names are pin names).
pub fn pin_name(name: &str) -> String {
    format!("run-{name}")
}

/// Run `opts` to its end with the store's runc; `progress` hears of a full pull.
pub async fn run_container(
    store: &Store,
    client: Arc<RegistryClient>,
    opts: RunOptions,
    signals: &mut ForwardedSignals,
    progress: Arc<dyn PullProgress>,
) -> Result<RunReport, RunError> {
    let runc = Runc::for_store(store.root());
    let name = opts.name.clone();
    let cdir = ContainerDir::create(store.root(), &name)?;
    let pid = std::process::id();
    let state = ContainerState {
        name: name.clone(),
        image: opts.reference.to_string(),
        created: lazylayer_store::unix_now(),
        status: ContainerStatus::Running,
        exit_code: None,
        pid,
        lazy: false,
        pid_start: process_start_time(pid),
        rm: opts.rm,
        pin: Some(pin_name(&name)),
        owner_lost: false,
    };
    // From here on, the directory is ours: remove it on any early error.
    // The record goes first: should we be killed outright from here on, it names
    // the owner and what to clear (`ContainerDir::reap_orphans`).
    let result = match cdir.write_state(&state) {
        Ok(()) => {
            let run = Run {
                store,
                client,
                opts: &opts,
                cdir: &cdir,
                runc: &runc,
            };
            run.run(state, signals, progress).await
        }
        Err(e) => Err(e.into()),
    };
    // A container that never started leaves nothing worth keeping.
    if opts.rm || !matches!(result, Ok(RunReport { started: true, .. })) {
        if let Err(e) = cdir.remove(&runc, true) {
            tracing::warn!(container = %name, error = %e, "cleaning up the container");
        }
    }
    result
}

/// One run's context.
struct Run<'a> {
    store: &'a Store,
    client: Arc<RegistryClient>,
    opts: &'a RunOptions,
    cdir: &'a ContainerDir,
    runc: &'a Runc,
}

impl Run<'_> {
    async fn run(
        &self,
        state: ContainerState,
        signals: &mut ForwardedSignals,
        progress: Arc<dyn PullProgress>,
    ) -> Result<RunReport, RunError> {
        let (cdir, name) = (self.cdir, state.name.clone());
        // A signal before the start ends the run: dropping `prepare` unmounts
        // what it mounted, and the caller removes the directory.
        let (root, spec) = tokio::select! {
            p = self.prepare(progress) => p?,
            sig = signals.recv() => {
                eprintln!("{}: stopping before container {name} started", signal_name(sig));
                return Ok(RunReport { code: 128 + sig, started: false, t_ready: None, lazy: None, native: false });
            }
        };
        let t_ready = self.opts.t0.elapsed();
        let lazy = root.lazy();
        let state = ContainerState {
            lazy: lazy.is_some(),
            ..state
        };
        cdir.write_state(&state)?;
        let status = lazy.map(|root| StatusWriter::start(root, cdir.clone()));

        // The overlay over the lowers, the bundle and runc, in the container's
        // directory; the writable layer outlives the run unless --rm.
        let container = ContainerBuilder::new(&name, self.runc)
            .lowers(root.lowers().to_vec())
            .writable(&cdir.path)
            .spec(spec)
            .stdio(Stdio::Inherit)
            .keep_upper(!self.opts.rm)
            .start()?;
        let code = container
            .wait_forwarding(signals, self.opts.stop_timeout)
            .await?;
        if let Some(lazy) = lazy {
            // Bounded; a signal ends it at once (what arrived is kept).
            tokio::select! {
                _ = lazy.finish_fetching(self.opts.finish_after_exit) => {}
                _ = signals.recv() => {}
            }
        }
        drop(status);
        let lazy = lazy.map(lazy_stats);
        let native = root.native();
        // The container is torn down (its overlay first): now the root goes,
        // the image recorded once every layer arrived (the next run then
        // needs no network).
        drop(root);
        cdir.write_state(&ContainerState {
            status: ContainerStatus::Exited,
            exit_code: Some(code),
            ..state
        })?;
        Ok(RunReport {
            code,
            started: true,
            t_ready: Some(t_ready),
            lazy,
            native,
        })
    }

    /// The container's root, mounted, and what to run on it.
    async fn prepare(
        &self,
        progress: Arc<dyn PullProgress>,
    ) -> Result<(ImageRoot, RunSpec), RunError> {
        let (o, image) = (self.opts, self.opts.reference.to_string());
        let lower = self.cdir.sub("lower");
        std::fs::create_dir(&lower).map_err(|source| RunError::Io {
            action: "creating",
            path: lower.clone(),
            source,
        })?;
        let root = ImageRoot::open(
            self.store,
            self.client.clone(),
            &o.reference,
            o.fetch.clone(),
            &pin_name(&o.name),
            &lower,
            o.mount.clone(),
            progress,
        )
        .await
        .map_err(|source| RunError::Open {
            image: image.clone(),
            source,
        })?;
        let config = serde_json::from_slice(root.config_bytes()).map_err(|e| RunError::Config {
            image,
            reason: e.to_string(),
        })?;
        // Its rootfs is the container's overlay, which ContainerBuilder names.
        let mut spec = RunSpec::new(o.name.clone(), std::path::PathBuf::new(), config);
        if o.args.is_some() {
            spec.args = o.args.clone();
        }
        spec.env = o.env.clone();
        spec.network = o.network;
        spec.user = o.user.clone();
        spec.workdir = o.workdir.clone();
        Ok((root, spec))
    }
}

fn lazy_stats(root: &LazyRoot) -> LazyStats {
    let st = root.status();
    let fs = root.stats();
    LazyStats {
        offline: root.offline(),
        layers: st.len(),
        layers_on_demand: st.iter().filter(|l| l.on_demand).count(),
        bytes_fetched: root.bytes_fetched(),
        passthrough_opens: fs.as_ref().map_or(0, |s| s.passthrough_opens()),
        daemon_opens: fs.map_or(0, |s| s.daemon_opens()),
        layer_status: st,
    }
}

/// Per-layer progress for `lazylayer status`, rewritten while the container
/// runs; stopped (after a last write) when dropped.
struct StatusWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusWriter {
    fn start(root: &LazyRoot, cdir: ContainerDir) -> StatusWriter {
        let f = root.progress();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || loop {
            let _ = cdir.write_status(&serde_json::json!({ "layers": f.status() }));
            if s.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        });
        StatusWriter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for StatusWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
