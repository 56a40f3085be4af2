use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazylayer_fetch::{FetchOptions, LazyImage, OpenError};
use lazylayer_fs::FsOptions;
use lazylayer_runtime::{
    write_bundle, ContainerDir, ContainerState, ContainerStatus, NetworkMode, OverlayMount,
    RunSpec, Runc, Stdio,
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
    let store = g.store()?;
    let client = Arc::new(g.client()?);
    let name = a.name.clone().unwrap_or_else(random_name);
    let cdir = ContainerDir::create(store.root(), &name)?;
    // From here on, the directory is ours: remove it on any early error.
    let result = run_in(g, &a, &store, client, &reference, network, &name, &cdir, t0).await;
    if a.rm || result.is_err() {
        let runc = Runc::new(store.root().join("runc"));
        if let Err(e) = cdir.remove(&runc, true) {
            eprintln!("warning: cleaning up container {name}: {e:#}");
        }
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_in(
    _g: &GlobalArgs,
    a: &Args,
    store: &lazylayer_store::Store,
    client: Arc<lazylayer_oci::RegistryClient>,
    reference: &lazylayer_oci::Reference,
    network: NetworkMode,
    name: &str,
    cdir: &ContainerDir,
    t0: Instant,
) -> Result<i32> {
    let pull = PullOptions {
        platform: super::parse_platform(a.platform.as_deref())?,
        ..PullOptions::default()
    };
    let fopts = FetchOptions {
        read_timeout: Duration::from_secs_f64(a.fetch_timeout),
        serve_unverified: !a.verified_only,
        pull: pull.clone(),
        ..FetchOptions::default()
    };
    let (lower, upper, work, rootfs, bundle) = (
        cdir.sub("lower"),
        cdir.sub("upper"),
        cdir.sub("work"),
        cdir.sub("rootfs"),
        cdir.sub("bundle"),
    );
    for d in [&lower, &upper, &work, &rootfs, &bundle] {
        std::fs::create_dir(d).with_context(|| format!("creating {}", d.display()))?;
    }

    // Either a lazy image behind FUSE, or (no boot layer) a full pull.
    let lazy = match LazyImage::open(store, client.clone(), reference, fopts).await {
        Ok(img) => Some(img),
        Err(OpenError::NoBootLayer(_)) => {
            eprintln!("note: {reference} has no lazylayer boot layer; pulling it fully (optimize it with `lazylayer optimize`)");
            None
        }
        Err(OpenError::Failed(e)) => return Err(e).with_context(|| format!("opening {reference}")),
    };
    // Until every layer is here no image record names them: keep `prune`
    // off what this container stands on while it runs.
    let _pin = match &lazy {
        Some(img) => Some(
            store
                .pin_guard(
                    &format!("run-{}", std::process::id()),
                    &img.record.digests(),
                )
                .context("pinning the image's content")?,
        ),
        None => None,
    };
    let (config_bytes, fuse, lowers, fetcher) = match &lazy {
        Some(img) => {
            let fuse = img
                .mount(
                    &lower,
                    FsOptions {
                        passthrough: a.passthrough == "on",
                        ..FsOptions::default()
                    },
                )
                .context("mounting the lazy file system")?;
            if a.prefetch == "on" {
                let stats = fuse.stats();
                img.fetcher.start_prefetch_when_idle(
                    move || stats.requests(),
                    lazylayer_fetch::PREFETCH_QUIET,
                    lazylayer_fetch::PREFETCH_MAX_WAIT,
                );
            }
            (
                img.config_bytes.clone(),
                Some(fuse),
                vec![lower.clone()],
                Some(img.fetcher.clone()),
            )
        }
        None => {
            let bars = Arc::new(PullBars::new(false));
            let rec = store
                .pull(&client, reference, &pull, bars)
                .await
                .with_context(|| format!("pulling {reference}"))?;
            let lowers: Vec<PathBuf> = rec
                .layers
                .iter()
                .rev()
                .filter_map(|l| store.layer_dir(&l.digest))
                .collect();
            (store.read_blob(&rec.config_digest)?, None, lowers, None)
        }
    };
    let t_ready = t0.elapsed();
    let overlay = OverlayMount::mount(&lowers, &upper, &work, &rootfs)
        .context("mounting the container's overlay")?;

    let config = serde_json::from_slice(&config_bytes).context("parsing the image config")?;
    let mut spec = RunSpec::new(name.to_string(), rootfs.clone(), config);
    if !a.command.is_empty() {
        spec.args = Some(a.command.clone());
    }
    spec.env = a.env.clone();
    spec.network = network;
    spec.user = a.user.clone();
    spec.workdir = a.workdir.clone();
    write_bundle(&spec, &bundle)?;

    let state = ContainerState {
        name: name.to_string(),
        image: reference.to_string(),
        created: lazylayer_store::unix_now(),
        status: ContainerStatus::Running,
        exit_code: None,
        pid: std::process::id(),
        lazy: lazy.is_some(),
    };
    cdir.write_state(&state)?;

    // Per-layer progress for `lazylayer status`, refreshed while we run.
    let stop_status = Arc::new(AtomicBool::new(false));
    let status_thread = fetcher.clone().map(|f| {
        let (stop, cdir) = (stop_status.clone(), cdir.clone());
        std::thread::spawn(move || loop {
            let _ = cdir.write_status(&serde_json::json!({ "layers": f.status() }));
            if stop.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        })
    });

    let runc = Runc::new(store.root().join("runc"));
    let mut container = runc.start(name, &bundle, Stdio::Inherit)?;
    // Ctrl-C: the terminal already sent SIGINT to runc, which forwards it;
    // make sure the container goes (TERM, then KILL) and we clean up.
    let (runc_bin, runc_root, id) = (runc.binary.clone(), runc.root.clone(), name.to_string());
    let interrupter = tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted: stopping container {id}");
            let kill = |sig: &str| {
                let _ = std::process::Command::new(&runc_bin)
                    .arg("--root")
                    .arg(&runc_root)
                    .args(["kill", &id, sig])
                    .output();
            };
            kill("TERM");
            tokio::time::sleep(Duration::from_secs(3)).await;
            kill("KILL");
        }
    });
    let code = tokio::task::spawn_blocking(move || {
        let code = container.wait();
        (container, code)
    })
    .await
    .context("waiting for the container")?;
    let (container, code) = code;
    interrupter.abort();
    let code = code?;
    drop(container);

    stop_status.store(true, Ordering::Relaxed);
    if let Some(t) = status_thread {
        let _ = t.join();
    }
    if let Some(img) = &lazy {
        // Everything arrived: record the image so the next run needs no network.
        if img.fetcher.all_done() {
            store.save_image(&img.record)?;
        }
        if a.stats {
            let st = img.fetcher.status();
            let fetched = img.fetcher.bytes_fetched();
            let on_demand = st.iter().filter(|l| l.on_demand).count();
            let fs = fuse.as_ref().map(|m| m.stats());
            eprintln!(
                "lazylayer: started after {:.3}s ({}), {} of {} layers fetched on demand, {} bytes fetched after start, {} opens by passthrough, {} through lazylayer",
                t_ready.as_secs_f64(),
                if img.offline { "all local" } else { "boot layer fetched" },
                on_demand,
                st.len(),
                fetched,
                fs.as_ref().map_or(0, |s| s.passthrough_opens()),
                fs.map_or(0, |s| s.daemon_opens()),
            );
        }
    }
    overlay
        .unmount()
        .context("unmounting the container's overlay")?;
    drop(fuse);
    cdir.write_state(&ContainerState {
        status: ContainerStatus::Exited,
        exit_code: Some(code),
        ..state
    })?;
    Ok(code)
}
