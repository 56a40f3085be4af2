use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use lazylayer_containerd::image_proxy::{self, ImageServiceProxy};
use lazylayer_containerd::{grpc, Images, Snapshotter};
use lazylayer_oci::Keychain;

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
    /// Also serve the CRI image service on this unix socket, forwarding
    /// every call to containerd's (--containerd-address): point the kubelet's
    /// --image-service-endpoint here, and the credentials of a pod's
    /// successful pull (its image pull secrets) serve the lazy fetches of
    /// that image, kept in memory only, for its repository only
    #[arg(long, value_name = "SOCK")]
    pub image_service_address: Option<PathBuf>,
    /// containerd's socket, where the image service proxy forwards to
    #[arg(
        long,
        value_name = "SOCK",
        default_value = "/run/containerd/containerd.sock"
    )]
    pub containerd_address: PathBuf,
    /// How long a pull's credential is kept after the pull (a new pull of
    /// the image renews it); e.g. 30m, 2h
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = humantime::parse_duration)]
    pub credentials_ttl: std::time::Duration,
    /// The kubelet's --image-credential-provider-config (YAML or JSON): its
    /// plugins give credentials for the images their patterns match
    /// [config: registries.credential_provider_config]
    #[arg(
        long,
        value_name = "FILE",
        requires = "image_credential_provider_bin_dir"
    )]
    pub image_credential_provider_config: Option<PathBuf>,
    /// The kubelet's --image-credential-provider-bin-dir: where those
    /// plugins are [config: registries.credential_provider_bin_dir]
    #[arg(
        long,
        value_name = "DIR",
        requires = "image_credential_provider_config"
    )]
    pub image_credential_provider_bin_dir: Option<PathBuf>,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    super::evict_periodically(&store);
    let keychain = Arc::new(Keychain::new(a.credentials_ttl));
    let providers = crate::context::credential_providers(
        a.image_credential_provider_config.as_deref(),
        a.image_credential_provider_bin_dir.as_deref(),
    )?;
    let client = Arc::new(g.client_with(|c| {
        c.auth.keychain = Some(keychain.clone());
        if providers.is_some() {
            c.auth.providers = providers;
        }
    })?);
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
    // SIGTERM (service managers, tests) as well as Ctrl-C: stop serving,
    // unmount the lazy roots no container uses, leave those in use to the
    // next snapshotter, and remove the sockets on the way out.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        let _ = stop.send(true);
    });
    let until_stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let proxy = match a.image_service_address.clone() {
        None => None,
        Some(address) => {
            let listener = image_proxy::listen(&address).with_context(|| {
                format!("serving the CRI image service on {}", address.display())
            })?;
            let proxy = ImageServiceProxy::new(grpc::connect_lazy(&a.containerd_address), keychain);
            let shutdown = until_stopped(stopped.clone());
            Some(tokio::spawn(async move {
                image_proxy::serve(proxy, listener, &address, shutdown)
                    .await
                    .with_context(|| {
                        format!("serving the CRI image service on {}", address.display())
                    })
            }))
        }
    };
    let served = grpc::serve(Arc::new(sn), &a.address, until_stopped(stopped))
        .await
        .with_context(|| format!("serving the snapshotter on {}", a.address.display()));
    if let Some(p) = proxy {
        p.await.context("the CRI image service proxy")??;
    }
    served
}
