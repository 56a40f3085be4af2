use std::time::Instant;

use anyhow::{bail, Context, Result};
use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{Digest, PushOutcome};

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
    let (mut uploaded, mut mounted, mut existed, mut bytes) = (0, 0, 0, 0u64);
    let mut blobs: Vec<(Digest, u64)> = rec
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    let cfg_size = std::fs::metadata(store.blob_path(&rec.config_digest))
        .with_context(|| format!("config {} missing from the store", rec.config_digest))?
        .len();
    blobs.push((rec.config_digest.clone(), cfg_size));
    for (d, size) in &blobs {
        let path = store.blob_path(d);
        if !path.is_file() {
            bail!("blob {d} of {src} is missing from the store; pull the image again");
        }
        let outcome = client
            .push_blob(
                &dst.repository,
                d,
                *size,
                &BlobSource::File(path),
                Some(&src.repository),
            )
            .await
            .with_context(|| format!("pushing {src} to {dst}"))?;
        match outcome {
            PushOutcome::Uploaded => {
                uploaded += 1;
                bytes += size;
            }
            PushOutcome::Mounted => mounted += 1,
            PushOutcome::Existed => existed += 1,
        }
    }
    let manifest = store.read_blob(&rec.manifest_digest)?;
    let digest = client
        .put_manifest(&dst, &rec.manifest_media_type, manifest.into())
        .await
        .with_context(|| format!("pushing manifest of {src} to {dst}"))?;
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "destination": dst.to_string(), "digest": digest, "uploaded": uploaded,
                "mounted": mounted, "existed": existed, "bytes_uploaded": bytes, "seconds": secs
            }))?
        );
    } else {
        println!(
            "Pushed {dst} ({digest}) in {secs:.2}s: {uploaded} blobs uploaded ({}), {mounted} mounted, {existed} already there",
            human_bytes(bytes)
        );
    }
    Ok(())
}
