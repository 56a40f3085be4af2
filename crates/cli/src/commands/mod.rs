pub mod check;
pub mod config;
pub mod containerd;
pub mod df;
pub mod holder;
pub mod images;
pub mod inspect;
pub mod optimize;
pub mod prune;
pub mod ps;
pub mod pull;
pub mod push;
pub mod rm;
pub mod rmi;
pub mod run;
pub mod snapshotter;
pub mod status;
pub mod store;

use std::path::Path;

use anyhow::{Context, Result};
use lazylayer_oci::{Platform, Reference};
use lazylayer_runtime::{ContainerDir, Reaped, Runc};

/// In a long-lived server: evict down to the size limit now and every 30 s
/// (content in use may have been let go since). Nothing without a limit.
pub fn evict_periodically(store: &lazylayer_store::Store) {
    if store.size_limit().is_none() {
        return;
    }
    let store = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(30));
        loop {
            tick.tick().await;
            let s = store.clone();
            let _ = tokio::task::spawn_blocking(move || s.enforce_limit()).await;
        }
    });
}

pub fn parse_reference(s: &str) -> Result<Reference> {
    s.parse::<Reference>()
        .with_context(|| format!("bad image reference {s:?}"))
}

pub fn parse_platform(s: Option<&str>) -> Result<Platform> {
    match s {
        Some(p) => p.parse::<Platform>().map_err(anyhow::Error::msg),
        None => Ok(Platform::host()),
    }
}

/// Clears the containers under `root` whose `lazylayer run` was killed outright
/// (see `ContainerDir::reap_orphans`; what cannot be cleared is logged, and must
/// not stop the command that noticed), saying so on stderr.
pub fn reap_orphans(root: &Path) -> Vec<Reaped> {
    let runc = Runc::for_store(root);
    let reaped = ContainerDir::reap_orphans(root, &runc);
    lazylayer_fetch::reap_chunk_caches(root, false);
    for r in &reaped {
        let what = if r.removed {
            "removed it (--rm)"
        } else {
            "kept it as exited"
        };
        eprintln!(
            "note: the lazylayer run of container {} is gone: stopped the container, cleared its mounts and {what}",
            r.name
        );
    }
    reaped
}

/// Start the Prometheus endpoint of a long-lived server when `flag` or the
/// configuration names an address; `store`'s size is measured per scrape.
pub async fn serve_metrics(
    g: &crate::context::GlobalArgs,
    store: &lazylayer_store::Store,
    flag: Option<std::net::SocketAddr>,
) -> Result<()> {
    let Some(addr) = flag.or(g.config.metrics.address) else {
        return Ok(());
    };
    let store = store.clone();
    let bound = crate::metrics::serve(addr, move || {
        lazylayer_metrics::store_usage(store.usage_bytes(), store.size_limit());
    })
    .await?;
    eprintln!("metrics on http://{bound}/metrics");
    Ok(())
}
