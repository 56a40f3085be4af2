use anyhow::{bail, Result};

use crate::context::GlobalArgs;

/// Forget an image reference; run `prune` to free its space.
#[derive(clap::Args)]
pub struct Args {
    /// Image reference as pulled
    pub image: String,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let reference = super::parse_reference(&a.image)?;
    if !g.store()?.remove_image(&reference)? {
        bail!("{reference} is not in the store at {}", g.root.display());
    }
    println!("Removed {reference}");
    Ok(())
}
