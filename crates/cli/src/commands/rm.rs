use anyhow::{Context, Result};
use lazylayer_runtime::{ContainerDir, Runc};

use crate::context::GlobalArgs;

/// Remove containers: their mounts, writable layer and state.
#[derive(clap::Args)]
pub struct Args {
    /// Also remove a container that is (or seems) running: kills it
    #[arg(short, long)]
    pub force: bool,
    /// Container names
    #[arg(required = true)]
    pub names: Vec<String>,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let runc = Runc::for_store(&g.root);
    let reaped = super::reap_orphans(&g.root);
    for n in &a.names {
        // Its run was gone and it had --rm: clearing it removed it already.
        if reaped.iter().any(|r| r.removed && &r.name == n) {
            println!("{n}");
            continue;
        }
        let d = ContainerDir::open(&g.root, n)?;
        d.remove(&runc, a.force)
            .with_context(|| format!("removing container {n}"))?;
        println!("{n}");
    }
    Ok(())
}
