use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazylayer_fetch::{FetchOptions, ImageRoot, MountOptions};
use lazylayer_fs::FsOptions;
use lazylayer_runtime::{
    process_start_time, signal_name, ContainerBuilder, ContainerDir, ContainerState,
    ContainerStatus, ForwardedSignals, NetworkMode, RunSpec, Runc, Stdio,
};
use lazylayer_store::PullOptions;

use crate::context::GlobalArgs;
use crate::progress::PullBars;

/// Run a container from an image, starting at once when the image has a
/// lazylayer boot layer: only manifest, config and boot layer are fetched
/// before the start; other files arrive on first touch (and by background
/// prefetch). An image without a boot layer is pulled fully first.
/// The container's exit code, stdin, stdout and stderr are passed through.
#[derive(clap::Args)]
pub struct Args {
    /// Remove the container (mounts, upper dir, state) when it exits
    #[arg(long)]
    pub rm: bool,
    /// Container name (default: generated)
    #[arg(long)]
    pub name: Option<String>,
    /// Environment variable K=V (repeatable)
    #[arg(short, long = "env", value_name = "K=V")]
    pub env: Vec<String>,
    /// Network: none (own empty namespace) or host
    #[arg(long, default_value = "none")]
    pub net: String,
    /// Fetch the remaining layers in the background while the container runs
    /// (starting once its start has settled: file-system requests quiet for
    /// 0.2 s, or 2 s after the mount)
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub prefetch: String,
    /// Longest a read waits for its file to arrive before it fails with EIO (seconds)
    #[arg(long, default_value_t = 60.0)]
    pub fetch_timeout: f64,
    /// Serve a file only once its whole layer is verified against its digest
    /// (default: as soon as its tar entry lands and its bytes match the
    /// SHA-256 the boot index records for it)
    #[arg(long)]
    pub verified_only: bool,
    /// User to run as (NAME, UID, NAME:GROUP, UID:GID)
    #[arg(short, long)]
    pub user: Option<String>,
    /// Working directory in the container
    #[arg(short, long)]
    pub workdir: Option<String>,
    /// Platform to pick from a multi-platform image (OS/ARCH[/VARIANT])
    #[arg(long)]
    pub platform: Option<String>,
    /// Let the kernel read local files straight from the store (FUSE
    /// passthrough). `off` routes every read through lazylayer instead, which
    /// a container needs to stack an overlayfs of its own on its root (nested
    /// container storage): the kernel allows only two stacked file systems.
    #[arg(long, default_value = "on", value_parser = ["on", "off"])]
    pub passthrough: String,
    /// Print timings and fetch statistics on stderr when the container exits
    #[arg(long)]
    pub stats: bool,
    /// On SIGTERM, SIGHUP or SIGINT (passed on to the container), how long the
    /// container has to exit before it is killed (seconds)
    #[arg(long, env = "LAZYLAYER_STOP_TIMEOUT", default_value_t = 10.0)]
    pub stop_timeout: f64,
    /// Image reference
    pub image: String,
    /// Command and arguments replacing the image's Cmd
    #[arg(last = true)]
    pub command: Vec<String>,
}

fn random_name() -> String {
    let mut b = [0u8; 6];
    let _ = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("ll-{hex}")
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<i32> {
    let t0 = Instant::now();
    let reference = super::parse_reference(&a.image)?;
    let network = match a.net.as_str() {
        "none" => NetworkMode::None,
        "host" => NetworkMode::Host,
        other => bail!("--net {other}: expected none or host"),
    };
    for e in &a.env {
        anyhow::ensure!(e.contains('='), "--env {e:?}: expected K=V");
    }
    let stop_timeout = Duration::try_from_secs_f64(a.stop_timeout)
        .with_context(|| format!("--stop-timeout {}", a.stop_timeout))?;
    // Caught from here on, so that a service manager's TERM (or a HUP, or Ctrl-C)
    // stops the container and we clean up, instead of dying with the mounts left.
    let mut signals = ForwardedSignals::install().context("installing signal handlers")?;
    let store = g.store()?;
    let client = Arc::new(g.client()?);
    let runc = Runc::for_store(store.root());
    // A container left by a run killed outright may hold the name we want.
    super::reap_orphans(store.root());
    let name = a.name.clone().unwrap_or_else(random_name);
    let cdir = ContainerDir::create(store.root(), &name)?;
    let pid = std::process::id();
    let state = ContainerState {
        name: name.clone(),
        image: reference.to_string(),
        created: lazylayer_store::unix_now(),
        status: ContainerStatus::Running,
        exit_code: None,
        pid,
        lazy: false,
        pid_start: process_start_time(pid),
        rm: a.rm,
        pin: Some(pin_name(&name)),
        owner_lost: false,
    };
    // From here on, the directory is ours: remove it on any early error.
    // The record goes first: should we be killed outright from here on, it names
    // the owner and what to clear (`ContainerDir::reap_orphans`).
    let result = match cdir.write_state(&state) {
        Ok(()) => {
            let env = Env {
                store: &store,
                client,
                reference: &reference,
                network,
                cdir: &cdir,
                runc: &runc,
                t0,
                stop_timeout,
            };
            run_in(&a, &env, state, &mut signals).await
        }
        Err(e) => Err(e.into()),
    };
    // A container that never started leaves nothing worth keeping.
    if a.rm || !matches!(result, Ok(Outcome { started: true, .. })) {
        if let Err(e) = cdir.remove(&runc, true) {
            eprintln!("warning: cleaning up container {name}: {e:#}");
        }
    }
    result.map(|o| o.code)
}

/// The store pin a run of container `name` holds (container names are pin names).
fn pin_name(name: &str) -> String {
    format!("run-{name}")
}

/// How `run_in` ended: the exit code, and whether the container ever started.
struct Outcome {
    code: i32,
    started: bool,
}

/// What `run_in` and `prepare` share.
struct Env<'a> {
    store: &'a lazylayer_store::Store,
    client: Arc<lazylayer_oci::RegistryClient>,
    reference: &'a lazylayer_oci::Reference,
    network: NetworkMode,
    cdir: &'a ContainerDir,
    runc: &'a Runc,
    t0: Instant,
    stop_timeout: Duration,
}

/// A container's lowers, mounted, and what to run on them.
struct Prepared {
    root: ImageRoot,
    spec: RunSpec,
    t_ready: Duration,
}

async fn prepare(a: &Args, env: &Env<'_>, name: &str) -> Result<Prepared> {
    let (store, cdir, reference) = (env.store, env.cdir, env.reference);
    let pull = PullOptions {
        platform: super::parse_platform(a.platform.as_deref())?,
        ..PullOptions::default()
    };
    let fopts = FetchOptions {
        read_timeout: Duration::from_secs_f64(a.fetch_timeout),
        serve_unverified: !a.verified_only,
        pull,
        ..FetchOptions::default()
    };
    let lower = cdir.sub("lower");
    std::fs::create_dir(&lower).with_context(|| format!("creating {}", lower.display()))?;
    let mount = MountOptions {
        fs: FsOptions {
            passthrough: a.passthrough == "on",
            ..FsOptions::default()
        },
        prefetch: a.prefetch == "on",
    };
    let bars = Arc::new(PullBars::new(false));
    let root = ImageRoot::open(
        store,
        env.client.clone(),
        reference,
        fopts,
        &pin_name(name),
        &lower,
        mount,
        bars,
    )
    .await
    .with_context(|| format!("opening {reference}"))?;
    let t_ready = env.t0.elapsed();

    let config = serde_json::from_slice(root.config_bytes()).context("parsing the image config")?;
    // Its rootfs is the container's overlay, which ContainerBuilder names.
    let mut spec = RunSpec::new(name.to_string(), PathBuf::new(), config);
    if !a.command.is_empty() {
        spec.args = Some(a.command.clone());
    }
    spec.env = a.env.clone();
    spec.network = env.network;
    spec.user = a.user.clone();
    spec.workdir = a.workdir.clone();
    Ok(Prepared {
        root,
        spec,
        t_ready,
    })
}

async fn run_in(
    a: &Args,
    env: &Env<'_>,
    state: ContainerState,
    signals: &mut ForwardedSignals,
) -> Result<Outcome> {
    let (cdir, name) = (env.cdir, state.name.clone());
    // A signal before the start ends the run: dropping `prepare` unmounts what it
    // mounted, and the caller removes the directory.
    let p = tokio::select! {
        p = prepare(a, env, &name) => p?,
        sig = signals.recv() => {
            eprintln!("{}: stopping before container {name} started", signal_name(sig));
            return Ok(Outcome { code: 128 + sig, started: false });
        }
    };
    let Prepared {
        root,
        spec,
        t_ready,
    } = p;
    let lazy = root.lazy();
    let state = ContainerState {
        lazy: lazy.is_some(),
        ..state
    };
    cdir.write_state(&state)?;

    // Per-layer progress for `lazylayer status`, refreshed while we run.
    let stop_status = Arc::new(AtomicBool::new(false));
    let status_thread = lazy.map(|root| {
        let f = root.progress();
        let (stop, cdir) = (stop_status.clone(), cdir.clone());
        std::thread::spawn(move || loop {
            let _ = cdir.write_status(&serde_json::json!({ "layers": f.status() }));
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        })
    });

    // The overlay over the lowers, the bundle and runc, in the container's directory;
    // the writable layer outlives the run unless --rm.
    let container = ContainerBuilder::new(&name, env.runc)
        .lowers(root.lowers().to_vec())
        .writable(&cdir.path)
        .spec(spec)
        .stdio(Stdio::Inherit)
        .keep_upper(!a.rm)
        .start()?;
    let code = container.wait_forwarding(signals, env.stop_timeout).await?;

    stop_status.store(true, Ordering::Relaxed);
    if let Some(t) = status_thread {
        let _ = t.join();
    }
    if let Some(root) = lazy {
        if a.stats {
            let st = root.status();
            let fetched = root.bytes_fetched();
            let on_demand = st.iter().filter(|l| l.on_demand).count();
            let fs = root.stats();
            eprintln!(
                "lazylayer: started after {:.3}s ({}), {} of {} layers fetched on demand, {} bytes fetched after start, {} opens by passthrough, {} through lazylayer",
                t_ready.as_secs_f64(),
                if root.offline() { "all local" } else { "boot layer fetched" },
                on_demand,
                st.len(),
                fetched,
                fs.as_ref().map_or(0, |s| s.passthrough_opens()),
                fs.map_or(0, |s| s.daemon_opens()),
            );
        }
    }
    // The container is torn down (its overlay first): now the lazy root goes,
    // the image recorded once every layer arrived (the next run then needs no
    // network).
    drop(root);
    cdir.write_state(&ContainerState {
        status: ContainerStatus::Exited,
        exit_code: Some(code),
        ..state
    })?;
    Ok(Outcome {
        code,
        started: true,
    })
}
