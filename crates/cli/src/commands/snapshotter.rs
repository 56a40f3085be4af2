use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lazylayer_containerd::{grpc, Images, Snapshotter};

use crate::context::GlobalArgs;

/// Serve containerd's snapshots API on a unix socket: a remote snapshotter
/// that claims lazylayer-optimized images' layers (nothing downloaded by
/// containerd) and mounts them lazily; other images get overlayfs snapshots.
/// Plug it in with `[proxy_plugins.lazylayer] type = "snapshot" address = SOCK`.
/// State (snapshot metadata and directories) lives in `<root>/snapshotter/`.
///
/// Lazy roots outlive this process: a descriptor holder (started on the first
/// mount) keeps their FUSE connections, and the next snapshotter takes them
/// over, so running containers keep their file system across a crash, a
/// restart or an upgrade. SIGTERM unmounts the roots no container uses and
/// leaves the others to the next snapshotter. Images the store holds whole
/// get plain overlayfs snapshots of the store's layers.
#[derive(clap::Args)]
pub struct Args {
    /// Unix socket to serve on
    #[arg(long, default_value = "/run/lazylayer/snapshotter.sock")]
    pub address: PathBuf,
    /// Serve Prometheus metrics on HOST:PORT (/metrics)
    /// [config: metrics.address; default: none]
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    super::evict_periodically(&store);
    let client = Arc::new(g.client()?);
    let dir = g.root.join("snapshotter");
    // Lazy roots outlive this process: their FUSE connections are kept by a
    // holder, and a restart takes them over before it serves.
    let holder = super::holder::client(&dir.join("holder.sock"))?;
    let images = Images::new(store.clone(), client)
        .with_options(g.fetch_options(None)?, g.mount_options(None, None));
    let sn = Snapshotter::open(&dir, Some(images))
        .with_context(|| format!("opening the snapshotter state in {}", dir.display()))?
        .with_holder(holder);
    super::serve_metrics(g, &store, a.metrics_address).await?;
    let n = sn.recover().await;
    if n > 0 {
        eprintln!("took over {n} lazy root(s) left mounted by the previous snapshotter");
    }
    let shutdown = async {
        // SIGTERM (service managers, tests) as well as Ctrl-C: stop serving,
        // unmount the lazy roots no container uses, leave those in use to
        // the next snapshotter, and remove the socket on the way out.
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    grpc::serve(Arc::new(sn), &a.address, shutdown)
        .await
        .with_context(|| format!("serving the snapshotter on {}", a.address.display()))
}
