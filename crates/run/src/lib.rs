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
    process_start_time, ContainerBuilder, ContainerDir, ContainerState, ContainerStatus,
    ForwardedSignals, NetworkMode, RunSpec, Runc, RunningContainer, RuntimeError, Stdio,
};
use lazylayer_store::{PullProgress, Store, StoreError};

mod steps;
use steps::RunSteps;

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
    /// Serve a lazy root as a stub tree over the store's layers and the
    /// FUSE mount ([`MountOptions::meta_tree`], made in the container's
    /// directory), where the kernel allows it; else as a FUSE root.
    pub meta_tree: bool,
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
    /// Requests the lazy file system answered (every kind), the READs among
    /// them, and the bytes handed to the page cache at first opens.
    pub fs_requests: u64,
    pub read_requests: u64,
    pub preloaded_bytes: u64,
    /// The kernel opens files alone now (every byte local; the opens it
    /// answered since are counted nowhere).
    pub kernel_opens: bool,
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
    let run = Run {
        store,
        client,
        opts: &opts,
        cdir: &cdir,
        runc: &runc,
        progress,
    };
    steps::run(&run, state, opts.rm, opts.t0, signals).await
}

/// One run's context.
struct Run<'a> {
    store: &'a Store,
    client: Arc<RegistryClient>,
    opts: &'a RunOptions,
    cdir: &'a ContainerDir,
    runc: &'a Runc,
    progress: Arc<dyn PullProgress>,
}

impl RunSteps for Run<'_> {
    type Root = ImageRoot;
    type Status = StatusWriter;
    type Container = RunningContainer;
    type Signals = ForwardedSignals;

    fn write_state(&self, state: &ContainerState) -> Result<(), RunError> {
        Ok(self.cdir.write_state(state)?)
    }

    async fn prepare(&self) -> Result<(ImageRoot, RunSpec), RunError> {
        self.open_root(self.progress.clone()).await
    }

    fn is_lazy(root: &ImageRoot) -> bool {
        root.lazy().is_some()
    }

    fn is_native(root: &ImageRoot) -> bool {
        root.native()
    }

    fn lazy_stats(root: &ImageRoot) -> Option<LazyStats> {
        root.lazy().map(lazy_stats)
    }

    fn start_status(&self, root: &ImageRoot) -> Option<StatusWriter> {
        root.lazy()
            .map(|lazy| StatusWriter::start(lazy, self.cdir.clone()))
    }

    fn start_container(
        &self,
        root: &ImageRoot,
        spec: RunSpec,
    ) -> Result<RunningContainer, RunError> {
        Ok(ContainerBuilder::new(&self.opts.name, self.runc)
            .lowers(root.lowers().to_vec())
            .data_lowers(root.data_lowers().to_vec())
            .writable(&self.cdir.path)
            .spec(spec)
            .stdio(Stdio::Inherit)
            .keep_upper(!self.opts.rm)
            .start()?)
    }

    async fn wait(
        &self,
        container: RunningContainer,
        signals: &mut ForwardedSignals,
    ) -> Result<i32, RunError> {
        Ok(container
            .wait_forwarding(signals, self.opts.stop_timeout)
            .await?)
    }

    async fn finish_fetching(&self, root: &ImageRoot) {
        if let Some(lazy) = root.lazy() {
            lazy.finish_fetching(self.opts.finish_after_exit).await;
        }
    }

    fn remove_dir(&self) {
        // Its last use: the run is over.
        if let Err(e) = self.cdir.clone().remove(self.runc, true) {
            tracing::warn!(container = %self.opts.name, error = %e, "cleaning up the container");
        }
    }
}

impl Run<'_> {
    /// The container's root, mounted, and what to run on it.
    async fn open_root(
        &self,
        progress: Arc<dyn PullProgress>,
    ) -> Result<(ImageRoot, RunSpec), RunError> {
        let (o, image) = (self.opts, self.opts.reference.to_string());
        // The FUSE mount's, and the stub tree's when the root is one.
        let [lower, meta] = ["lower", "meta"].map(|d| self.cdir.sub(d));
        for d in std::iter::once(&lower).chain(o.meta_tree.then_some(&meta)) {
            std::fs::create_dir(d).map_err(|source| RunError::Io {
                action: "creating",
                path: d.clone(),
                source,
            })?;
        }
        let mut mount = o.mount.clone();
        mount.meta_tree = o.meta_tree.then_some(meta);
        let root = ImageRoot::open(
            self.store,
            self.client.clone(),
            &o.reference,
            o.fetch.clone(),
            &pin_name(&o.name),
            &lower,
            mount,
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
        daemon_opens: fs.as_ref().map_or(0, |s| s.daemon_opens()),
        fs_requests: fs.as_ref().map_or(0, |s| s.requests()),
        read_requests: fs.as_ref().map_or(0, |s| s.read_requests()),
        preloaded_bytes: fs.as_ref().map_or(0, |s| s.preloaded_bytes()),
        kernel_opens: fs.is_some_and(|s| s.kernel_opens()),
        layer_status: st,
    }
}

/// Per-layer progress for `lazylayer status`, rewritten while the container
/// runs when it changed (a root whose layers have all arrived writes no more
/// for the rest of the container's life); stopped (after a last look) when
/// dropped.
struct StatusWriter {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl StatusWriter {
    fn start(root: &LazyRoot, cdir: ContainerDir) -> StatusWriter {
        let f = root.progress();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut last = None;
            loop {
                let status = serde_json::json!({ "layers": f.status() });
                if last.as_ref() != Some(&status) && cdir.write_status(&status).is_ok() {
                    last = Some(status);
                }
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(250));
            }
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
