use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use lazylayer_store::PullOptions;

use crate::context::{human_bytes, GlobalArgs};
use crate::progress::PullBars;

/// Pull an image fully into the store.
#[derive(clap::Args)]
pub struct Args {
    /// Image reference: [HOST[:PORT]/]REPO[:TAG|@DIGEST]
    pub image: String,
    /// Platform to pick from a multi-platform image (OS/ARCH[/VARIANT]); default: this machine's
    #[arg(long)]
    pub platform: Option<String>,
    /// Layers fetched in parallel
    #[arg(long, default_value_t = 3)]
    pub concurrency: usize,
    /// No progress bars
    #[arg(short, long)]
    pub quiet: bool,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let reference = super::parse_reference(&a.image)?;
    let opts = PullOptions {
        platform: super::parse_platform(a.platform.as_deref())?,
        concurrency: a.concurrency,
        ..PullOptions::default()
    };
    let store = g.store()?;
    let client = g.client()?;
    let bars = Arc::new(PullBars::new(a.quiet || a.json));
    let start = Instant::now();
    let pin = format!("pull-{}", std::process::id());
    let (rec, pin) = store
        .pull_pinned(&client, &reference, &opts, bars.clone(), &pin)
        .await
        .with_context(|| format!("pulling {reference}"))?;
    // Under the size limit before returning, the image just pulled kept
    // (pinned) even if it alone is over: it is what was asked for.
    let _ = tokio::task::spawn_blocking({
        let store = store.clone();
        move || store.enforce_limit()
    })
    .await;
    drop(pin);
    // Evicted here, as the layers landed or just now.
    let evicted = lazylayer_store::evicted_images();
    let secs = start.elapsed().as_secs_f64();
    let fetched = bars.fetched.load(Relaxed);
    if a.json {
        let v = serde_json::json!({
            "reference": rec.reference,
            "manifest_digest": rec.manifest_digest,
            "config_digest": rec.config_digest,
            "layers": rec.layers,
            "bytes_fetched": fetched,
            "layers_fetched": bars.fetched_layers.load(Relaxed),
            "layers_cached": bars.cached_layers.load(Relaxed),
            "seconds": secs,
            "evicted": evicted,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "Pulled {} ({}) in {:.2}s: {} layers, {} fetched, {} already in store",
            rec.reference,
            rec.manifest_digest,
            secs,
            rec.layers.len(),
            human_bytes(fetched),
            bars.cached_layers.load(Relaxed)
        );
    }
    if let (false, Some(limit)) = (evicted.is_empty(), store.size_limit()) {
        // On stderr: scripts parse stdout.
        eprintln!(
            "Evicted {} least recently used image(s) to stay under the {} store size limit: {} (pulled again when next needed)",
            evicted.len(),
            human_bytes(limit),
            evicted.join(", ")
        );
    }
    Ok(())
}
