use anyhow::{Context, Result};
use serde::Serialize;

use crate::context::{human_bytes, GlobalArgs};

/// Show how much disk the store takes: each image (its content's size on
/// disk, the part shared with other images, when it was last used, whether
/// a running container or fetch uses it), least recently used first (the
/// order eviction takes them in), then the totals of blobs/, layers/,
/// files/ and partial/ and the size limit. Sizes are bytes on disk, as
/// `du` counts them; TOTAL equals `du -s --block-size=1` of those four
/// directories.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Df {
    images: Vec<lazylayer_store::ImageUsage>,
    usage: lazylayer_store::StoreUsage,
    total: u64,
    /// Bytes; null: unlimited.
    limit: Option<u64>,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    let images = store
        .image_usage()
        .with_context(|| format!("reading the images of {}", store.root().display()))?;
    let usage = store.usage();
    let df = Df {
        images,
        usage,
        total: usage.total(),
        limit: g.size_limit(),
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&df)?);
        return Ok(());
    }
    println!(
        "{:<60} {:>10} {:>10} {:>20} {:>6}",
        "REFERENCE", "SIZE", "SHARED", "LAST USED", "IN USE"
    );
    for i in &df.images {
        println!(
            "{:<60} {:>10} {:>10} {:>20} {:>6}",
            i.reference,
            human_bytes(i.bytes),
            human_bytes(i.shared_bytes),
            ago(i.last_used_ms),
            if i.in_use { "yes" } else { "no" }
        );
    }
    println!();
    for (name, n) in [
        ("blobs", usage.blobs),
        ("layers", usage.layers),
        ("files", usage.files),
        ("partial", usage.partial),
    ] {
        println!("{name:<8} {:>10}", human_bytes(n));
    }
    println!("{:<8} {:>10}", "TOTAL", human_bytes(df.total));
    match df.limit {
        Some(l) => println!("{:<8} {:>10}", "LIMIT", human_bytes(l)),
        None => println!("{:<8} {:>10}", "LIMIT", "none"),
    }
    Ok(())
}

/// "5 minutes ago", from Unix milliseconds.
fn ago(ms: u64) -> String {
    if ms == 0 {
        return "never".into();
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let s = now.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s} seconds ago"),
        60..=3599 => format!("{} minutes ago", s / 60),
        3600..=86399 => format!("{} hours ago", s / 3600),
        _ => format!("{} days ago", s / 86400),
    }
}
