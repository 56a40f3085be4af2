use anyhow::{Context, Result};

use crate::context::{human_bytes, GlobalArgs};

/// Remove blobs and extracted layers that no image references, and leftovers
/// of interrupted pulls. Content that a running `lazylayer run`, `snapshotter`
/// or `store` uses (pinned in `<root>/pins/`) is kept. Waits for running
/// pulls and layer fetches to finish first.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    // Dead runs' pins would keep content, and their mounts stand on it.
    super::reap_orphans(&g.root);
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
