use anyhow::{Context, Result};

use crate::context::{human_bytes, GlobalArgs};

/// Remove blobs and extracted layers that no image references, and leftovers
/// of interrupted pulls. Content that a running `lazylayer run`, `snapshotter`
/// or `store` uses (pinned in `<root>/pins/`) is kept. Waits for running
/// pulls and layer fetches to finish first.
///
/// With `--to SIZE`: evict instead, down to SIZE, the least recently used
/// images first (their records too: they are pulled or fetched lazily again
/// when next needed); images in use by a running container are kept. This
/// does not wait for pulls.
#[derive(clap::Args)]
pub struct Args {
    /// Evict the least recently used images not in use until the store's
    /// content takes at most SIZE on disk (e.g. 200MB, 1.5GiB, 500000000)
    #[arg(long, value_name = "SIZE", value_parser = lazylayer_store::parse_size)]
    pub to: Option<u64>,
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    // Dead runs' pins would keep content, and their mounts stand on it.
    super::reap_orphans(&g.root);
    if let Some(limit) = a.to {
        let rep = store
            .evict_to(limit)
            .with_context(|| format!("evicting the store down to {}", human_bytes(limit)))?;
        if a.json {
            println!("{}", serde_json::to_string_pretty(&rep)?);
            return Ok(());
        }
        println!(
            "Evicted {} image(s){}, {} unreferenced item(s); freed {}; the store now takes {} (limit {})",
            rep.images_evicted.len(),
            if rep.images_evicted.is_empty() {
                String::new()
            } else {
                format!(" ({})", rep.images_evicted.join(", "))
            },
            rep.unreferenced_removed,
            human_bytes(rep.bytes_freed),
            human_bytes(rep.usage_after),
            human_bytes(limit),
        );
        if rep.usage_after > limit {
            println!(
                "Still over the limit: {} is in use by running containers or fetches ({})",
                human_bytes(rep.in_use_bytes),
                rep.images_in_use.join(", ")
            );
        }
        return Ok(());
    }
    // Boot chunks kept for the next start of an image, unless one runs.
    let caches = lazylayer_fetch::reap_chunk_caches(&g.root, true);
    let rep = store.prune().context("pruning the store")?;
    tracing::debug!(caches, "boot chunk caches removed");
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        println!(
            "Removed {} blobs, {} layers, {} leftovers; freed {}",
            rep.blobs_removed,
            rep.layers_removed,
            rep.tmp_removed,
            human_bytes(rep.bytes_freed)
        );
    }
    Ok(())
}
