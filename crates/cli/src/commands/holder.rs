use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lazylayer_fs::Holder;

/// Keep the FUSE connections of live lazy roots while no server serves them
/// (started by `lazylayer snapshotter` and `lazylayer store`, in a session of
/// its own; exits once it holds nothing and its server is gone).
#[derive(clap::Args)]
pub struct Args {
    /// Unix socket to serve on
    #[arg(long)]
    pub socket: PathBuf,
    /// Seconds to keep connections no server serves (its server died and no
    /// new one took over) before letting them go: their readers then get an
    /// error instead of waiting without end
    #[arg(long, env = "LAZYLAYER_ORPHAN_TIMEOUT", default_value_t = lazylayer_fs::holder::ORPHAN_TIMEOUT.as_secs_f64())]
    pub orphan_timeout: f64,
}

pub fn run(a: Args) -> Result<()> {
    let timeout = std::time::Duration::try_from_secs_f64(a.orphan_timeout)
        .context("--orphan-timeout must be a number of seconds")?;
    lazylayer_fs::holder::serve(&a.socket, timeout)
        .with_context(|| format!("holding descriptors on {}", a.socket.display()))
}

/// A client of the holder on `socket`, started from this very executable
/// when none runs.
pub fn client(socket: &Path) -> Result<Holder> {
    let exe = std::env::current_exe().context("finding the lazylayer executable")?;
    let args = vec![
        "fd-holder".to_string(),
        "--socket".to_string(),
        socket.display().to_string(),
    ];
    Ok(Holder::new(socket, &exe, args))
}
