use anyhow::Result;
use lazylayer_runtime::{ContainerDir, ContainerStatus};

use crate::context::GlobalArgs;

/// List containers started by `lazylayer run` without --rm.
#[derive(clap::Args)]
pub struct Args {
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    super::reap_orphans(&g.root);
    let list = ContainerDir::list(&g.root)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!("{:<20} {:<19} {:<5} IMAGE", "NAME", "STATUS", "LAZY");
    for c in list {
        let status = match (c.status, c.exit_code) {
            (ContainerStatus::Running, _) => "running".to_string(),
            (ContainerStatus::Exited, Some(code)) => format!("exited ({code})"),
            // Its `lazylayer run` died first: nobody saw the exit code.
            (ContainerStatus::Exited, None) if c.owner_lost => "exited (owner lost)".to_string(),
            (ContainerStatus::Exited, None) => "exited".to_string(),
        };
        println!(
            "{:<20} {:<19} {:<5} {}",
            c.name,
            status,
            if c.lazy { "yes" } else { "no" },
            c.image
        );
    }
    Ok(())
}
