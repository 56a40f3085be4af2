use anyhow::Result;

use crate::context::{human_bytes, short_digest, GlobalArgs};

/// List the images in the store.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let store = g.store()?;
    let images = store.images()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(());
    }
    println!(
        "{:<60} {:<14} {:>6} {:>10}",
        "REFERENCE", "DIGEST", "LAYERS", "SIZE"
    );
    for i in images {
        println!(
            "{:<60} {:<14} {:>6} {:>10}",
            i.reference,
            short_digest(&i.manifest_digest),
            i.layers.len(),
            human_bytes(i.total_size())
        );
    }
    Ok(())
}
