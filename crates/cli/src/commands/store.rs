use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lazylayer_podman::{LayerStore, StoreOptions};

use crate::context::GlobalArgs;

/// Serve optimized images to Podman, lazily, through containers-storage's
/// "additional layer store". For each image, the store lays out
/// `DIR/<base64 of REF>/<layer digest>/{diff,info,blob}`; the top (boot)
/// layer's `diff` is the image's lazy merged root (FUSE), the others are
/// empty. Podman then pulls only manifest and config, and its containers run
/// on the lazy root. Keep this running while Podman uses the images; a
/// restart with the same images (after a crash, or SIGTERM for an upgrade)
/// takes over the roots in use, whose FUSE connections a descriptor holder
/// keeps meanwhile. Images the store holds whole are laid out from its
/// extracted layers, no FUSE.
///
/// Configure Podman with `--storage-opt overlay.additionallayerstore=DIR:ref`
/// (or storage.conf: `additionallayerstores = ["DIR:ref"]`). See docs/podman.md.
#[derive(clap::Args)]
pub struct Args {
    /// The additional layer store directory Podman is configured with
    #[arg(long, default_value = "/var/lib/lazylayer/podman-layers")]
    pub dir: PathBuf,
    /// Fetch the remaining layers in the background (starting once a start
    /// has settled: file-system requests quiet for 0.2 s, or 2 s after the mount)
    /// [config: fetch.prefetch; default: on]
    #[arg(long, value_parser = ["on", "off"])]
    pub prefetch: Option<String>,
    /// Longest a read waits for its file before EIO (seconds)
    /// [config: fetch.read_timeout; default: 60]
    #[arg(long, value_name = "SECS")]
    pub fetch_timeout: Option<f64>,
    /// Serve Prometheus metrics on HOST:PORT (/metrics)
    /// [config: metrics.address; default: none]
    #[arg(long, value_name = "ADDR")]
    pub metrics_address: Option<std::net::SocketAddr>,
    /// Optimized images to serve, named exactly as Podman will pull them
    #[arg(required = true)]
    pub images: Vec<String>,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let images = (a.images.iter())
        .map(|i| super::parse_reference(i))
        .collect::<Result<Vec<_>>>()?;
    let store = g.store()?;
    super::evict_periodically(&store);
    // Lazy roots outlive this process: their FUSE connections are kept by a
    // holder, and a restart with the same images takes them over.
    let holder_dir = store.root().join("podman-store");
    lazylayer_store::create_private_dir(&holder_dir)
        .with_context(|| format!("creating {}", holder_dir.display()))?;
    let holder = super::holder::client(&holder_dir.join("holder.sock"))?;
    let opts = StoreOptions {
        dir: a.dir.clone(),
        fetch: g.fetch_options(a.fetch_timeout)?,
        mount: g.mount_options(a.prefetch.as_deref(), None),
        holder: Some(holder),
    };
    let client = Arc::new(g.client()?);
    super::serve_metrics(g, &store, a.metrics_address).await?;
    let served = LayerStore::serve(&store, client, &images, &opts)
        .await
        .with_context(|| format!("serving images in {}", a.dir.display()))?;
    for i in served.images() {
        let (image, layers) = (i.reference, i.layers);
        println!("serving {image} ({layers} layers) in {}", a.dir.display());
    }
    eprintln!(
        "ready: run podman with --storage-opt overlay.additionallayerstore={}:ref (Ctrl-C to stop)",
        a.dir.display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!(
        "stopping: unmounting the images no container uses (those in use stay for the next store)"
    );
    // Each image is recorded in the store once all its layers arrived.
    served.stop().await;
    Ok(())
}
