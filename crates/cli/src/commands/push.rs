use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::context::{human_bytes, GlobalArgs};

/// Push an image from the store to a registry. The manifest is pushed byte
/// for byte, so the image keeps its digest. Blobs the target repository has
/// are skipped; blobs in the source repository of the same registry are
/// mounted instead of uploaded.
#[derive(clap::Args)]
pub struct Args {
    /// Image in the store (as pulled)
    pub source: String,
    /// Destination reference: HOST[:PORT]/REPO[:TAG]
    pub destination: String,
    /// Upload in PATCH chunks of this many bytes (default: one PUT per blob)
    #[arg(long, value_name = "BYTES")]
    pub chunk_size: Option<u64>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let src = super::parse_reference(&a.source)?;
    let dst = super::parse_reference(&a.destination)?;
    let store = g.store()?;
    let Some(rec) = store.image(&src) else {
        bail!(
            "{src} is not in the store at {} (pull it first)",
            g.root.display()
        );
    };
    let client = g.client_with(|c| c.upload_chunk_size = a.chunk_size)?;
    let start = Instant::now();
    let rep = store
        .push_image(&client, &src, &rec, &dst)
        .await
        .with_context(|| format!("pushing {src} to {dst}"))?;
    let secs = start.elapsed().as_secs_f64();
    let c = &rep.counts;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "destination": dst.to_string(), "digest": rep.digest, "uploaded": c.uploaded,
                "mounted": c.mounted, "existed": c.existed, "bytes_uploaded": c.bytes_uploaded,
                "seconds": secs
            }))?
        );
    } else {
        println!(
            "Pushed {dst} ({}) in {secs:.2}s: {} blobs uploaded ({}), {} mounted, {} already there",
            rep.digest,
            c.uploaded,
            human_bytes(c.bytes_uploaded),
            c.mounted,
            c.existed
        );
    }
    Ok(())
}
