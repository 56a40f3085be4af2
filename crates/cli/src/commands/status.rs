use anyhow::{Context, Result};
use lazylayer_runtime::ContainerDir;

use crate::context::{human_bytes, short_digest, GlobalArgs};

/// Show a container's per-layer fetch progress.
#[derive(clap::Args)]
pub struct Args {
    /// Container name
    pub name: String,
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let d = ContainerDir::open(&g.root, &a.name)?;
    let state = d.read_state()?.refreshed();
    let status = d
        .read_status()
        .with_context(|| format!("{} has no fetch status (not a lazy container?)", a.name))?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({ "container": state, "layers": status["layers"] })
            )?
        );
        return Ok(());
    }
    println!("{} ({:?}) image {}", state.name, state.status, state.image);
    // KEPT: of the blob, on disk across runs (a later fetch resumes after
    // it); EXTRACTED: of the blob, consumed by the extraction.
    println!(
        "{:<14} {:>10} {:>10} {:>6} {:>10} {:>10}  {:<9} HOW",
        "LAYER", "FETCHED", "SIZE", "%", "KEPT", "EXTRACTED", "STATE"
    );
    for l in status["layers"].as_array().cloned().unwrap_or_default() {
        let size = l["size"].as_u64().unwrap_or(0);
        let got = l["fetched"].as_u64().unwrap_or(0);
        let bytes = |key: &str| human_bytes(l[key].as_u64().unwrap_or(0));
        println!(
            "{:<14} {:>10} {:>10} {:>5.0}% {:>10} {:>10}  {:<9} {}",
            short_digest(&l["digest"].as_str().unwrap_or("")),
            human_bytes(got),
            human_bytes(size),
            if size == 0 {
                100.0
            } else {
                got as f64 * 100.0 / size as f64
            },
            bytes("kept"),
            bytes("extracted"),
            l["state"].as_str().unwrap_or("?"),
            if l["on_demand"].as_bool().unwrap_or(false) {
                "on demand"
            } else {
                "prefetch"
            }
        );
        if let Some(e) = l["error"].as_str() {
            println!("    error: {e}");
        }
    }
    Ok(())
}
