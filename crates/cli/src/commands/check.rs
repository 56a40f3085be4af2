use anyhow::{Context, Result};

use crate::context::GlobalArgs;

/// Verify the store: every blob's and kept file's digest, every extracted
/// layer complete, image records naming only content that is present, kept
/// partial downloads and boot chunk caches consistent with their layers.
/// Prints one line per problem (path: what is wrong) and exits 1 when any
/// is left. With `--repair`, removes what is damaged (and records naming it)
/// so that the next pull or start fetches it again; that waits for running
/// pulls and layer fetches (it takes the store lock exclusively).
#[derive(clap::Args)]
pub struct Args {
    /// Remove damaged content, and the image records that name it
    #[arg(long)]
    pub repair: bool,
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

/// Returns the exit code: 0 when the store is clean (or was repaired), 1
/// when problems are left.
pub fn run(g: &GlobalArgs, a: Args) -> Result<i32> {
    let store = g.store()?;
    // Dead runs' mounts and chunk-cache locks go first: they are not damage.
    super::reap_orphans(&g.root);
    let rep = store.check(a.repair).context("checking the store")?;
    let left = rep.unrepaired();
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rep)?);
    } else {
        for p in &rep.problems {
            let state = if p.repaired {
                " (removed)"
            } else if a.repair {
                " (in use: not removed)"
            } else {
                ""
            };
            println!("{}: {}{state}", p.path.display(), p.detail);
        }
        eprintln!(
            "checked {} blobs, {} layers, {} images: {}",
            rep.blobs,
            rep.layers,
            rep.images,
            match (rep.problems.len(), left) {
                (0, _) => "clean".to_string(),
                (n, 0) => format!("{n} problem(s), all repaired"),
                (n, l) if a.repair => format!("{n} problem(s), {l} not repaired"),
                (n, _) => format!("{n} problem(s); `lazylayer check --repair` removes them"),
            }
        );
    }
    Ok(if left == 0 { 0 } else { 1 })
}
