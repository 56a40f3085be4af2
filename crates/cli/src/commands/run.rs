use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use lazylayer_fetch::FetchOptions;
use lazylayer_run::{run_container, RunOptions};
use lazylayer_runtime::{ForwardedSignals, NetworkMode};
use lazylayer_store::PullOptions;

use crate::context::{human_bytes, short_digest, GlobalArgs};
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
    /// 0.2 s, or 2 s after the mount) [config: fetch.prefetch; default: on]
    #[arg(long, value_parser = ["on", "off"])]
    pub prefetch: Option<String>,
    /// Longest a read waits for its file to arrive before it fails with EIO
    /// (seconds) [config: fetch.read_timeout; default: 60]
    #[arg(long, value_name = "SECS")]
    pub fetch_timeout: Option<f64>,
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
    /// For an image whose boot layer is attached (`optimize --attach`):
    /// start from this boot artifact (its manifest digest, as `inspect`
    /// lists it) instead of the newest that verifies
    #[arg(long, value_name = "DIGEST")]
    pub artifact: Option<String>,
    /// How the lazy root serves local files. `off` (the default): through
    /// lazylayer into the page cache, and once every byte of the image is
    /// local the kernel opens files alone (no round trip per open for the
    /// container's life). `on`: FUSE passthrough, the kernel reads local
    /// files straight from the store (faster first reads of large files),
    /// but every open stays a round trip, and the container cannot stack an
    /// overlayfs of its own on its root (nested container storage).
    /// [config: fs.passthrough; default: off]
    #[arg(long, value_parser = ["on", "off"])]
    pub passthrough: Option<String>,
    /// How a lazily started container's root is stacked. `overlay` (Linux
    /// 6.5+, else `fuse`): the kernel's overlayfs over a tree of every path's
    /// metadata (on tmpfs), each file's bytes read from the store's layer
    /// once that layer is local, through lazylayer until then; a stat, a
    /// listing or a read of a local file then costs what it costs on a
    /// local image, for the container's whole life. `fuse`: the whole root
    /// through lazylayer's file system (a faster start on fast links: the
    /// tree is made before the container starts, ~45 ms for python3).
    /// [config: fs.lazy_root; default: overlay]
    #[arg(long, value_parser = ["overlay", "fuse"])]
    pub lazy_root: Option<String>,
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
    // A container left by a run killed outright may hold the name we want.
    super::reap_orphans(store.root());
    let opts = RunOptions {
        name: a.name.clone().unwrap_or_else(random_name),
        reference,
        rm: a.rm,
        fetch: FetchOptions {
            serve_unverified: !a.verified_only,
            pull: PullOptions {
                platform: super::parse_platform(a.platform.as_deref())?,
                ..PullOptions::default()
            },
            boot_artifact: a
                .artifact
                .as_deref()
                .map(str::parse)
                .transpose()
                .with_context(|| format!("--artifact {:?}", a.artifact.as_deref().unwrap_or("")))?,
            ..g.fetch_options(a.fetch_timeout)?
        },
        mount: lazylayer_root::MountOptions {
            // This process mounts the overlay on its root and reads the
            // image's user database from it.
            force_unmount_on_death: true,
            ..g.mount_options(a.prefetch.as_deref(), a.passthrough.as_deref())
        },
        args: (!a.command.is_empty()).then(|| a.command.clone()),
        env: a.env.clone(),
        network,
        user: a.user.clone(),
        workdir: a.workdir.clone(),
        stop_timeout,
        t0,
        finish_after_exit: lazylayer_run::FINISH_AFTER_EXIT,
        meta_tree: match a.lazy_root.as_deref() {
            Some(flag) => flag == "overlay",
            None => g.config.fs.lazy_root == Some(crate::config::LazyRootMode::Overlay),
        },
    };
    let bars = Arc::new(PullBars::new(false));
    let rep = run_container(&store, client, opts, &mut signals, bars).await?;
    if let (true, true, Some(t)) = (a.stats, rep.native, rep.t_ready) {
        eprintln!(
            "lazylayer: started after {:.3}s (all local: the store's layers under the kernel's overlayfs, no FUSE)",
            t.as_secs_f64()
        );
    }
    if let (true, Some(l), Some(t)) = (a.stats, &rep.lazy, rep.t_ready) {
        eprintln!(
            "lazylayer: started after {:.3}s ({}), {} of {} layers fetched on demand, {} bytes fetched after start, {} opens by passthrough, {} through lazylayer ({} requests, {} READs, {} bytes preloaded at open){}",
            t.as_secs_f64(),
            if l.offline { "all local" } else { "boot layer fetched" },
            l.layers_on_demand,
            l.layers,
            l.bytes_fetched,
            l.passthrough_opens,
            l.daemon_opens,
            l.fs_requests,
            l.read_requests,
            l.preloaded_bytes,
            if l.kernel_opens {
                ", then every open by the kernel alone (image local)"
            } else {
                ""
            },
        );
        for layer in &l.layer_status {
            eprintln!("lazylayer:   {}", layer_progress(layer));
        }
    }
    Ok(rep.code)
}

/// One layer's progress across runs, for `--stats` and `status`: what is
/// kept of its blob (a later run resumes after it) and what is extracted.
pub fn layer_progress(l: &lazylayer_fetch::LayerStatus) -> String {
    let pct = |n: u64| {
        if l.size == 0 {
            100.0
        } else {
            n as f64 * 100.0 / l.size as f64
        }
    };
    format!(
        "layer {}: {} kept of {} ({:.0}%), {} extracted ({:.0}%){}",
        short_digest(&l.digest),
        human_bytes(l.kept),
        human_bytes(l.size),
        pct(l.kept),
        human_bytes(l.extracted),
        pct(l.extracted),
        match &l.state {
            lazylayer_fetch::LayerState::Done => ", in the store",
            _ => "",
        }
    )
}
