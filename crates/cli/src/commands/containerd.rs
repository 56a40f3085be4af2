use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use lazylayer_containerd::{register_image, RegisterOptions};

use crate::context::GlobalArgs;

/// Work with a containerd daemon through its own gRPC API.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub command: Sub,
}

#[derive(clap::Subcommand)]
pub enum Sub {
    /// Pull an optimized image into containerd lazily: manifest and config go
    /// into its content store (and into lazylayer's, --root, which the
    /// snapshotter serving from the same root then reads instead of the
    /// registry), and every layer is claimed by the lazylayer snapshotter
    /// (nothing downloaded); `ctr run --snapshotter NAME REF` then starts
    /// from the boot layer
    Pull(PullArgs),
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// containerd's unix socket
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    pub address: PathBuf,
    /// containerd namespace
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Name of the lazylayer snapshotter in containerd's config (`[proxy_plugins.NAME]`)
    #[arg(long, default_value = "lazylayer")]
    pub snapshotter: String,
    /// Platform to pick from a multi-platform image (OS/ARCH[/VARIANT]); default: this machine's
    #[arg(long)]
    pub platform: Option<String>,
    /// Print the result as JSON on stdout
    #[arg(long)]
    pub json: bool,
    /// Optimized image reference: [HOST[:PORT]/]REPO[:TAG|@DIGEST]; also the containerd image name
    pub image: String,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    match a.command {
        Sub::Pull(p) => pull(g, p).await,
    }
}

async fn pull(g: &GlobalArgs, a: PullArgs) -> Result<()> {
    let start = Instant::now();
    let reference = super::parse_reference(&a.image)?;
    let opts = RegisterOptions {
        address: a.address,
        namespace: a.namespace,
        snapshotter: a.snapshotter,
        platform: super::parse_platform(a.platform.as_deref())?,
    };
    let r = register_image(&g.client()?, &g.store()?, &reference, &a.image, &opts)
        .await
        .with_context(|| format!("registering {} in containerd", a.image))?;
    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["seconds"] = secs.into();
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        let target = match &r.index_digest {
            Some(ix) => format!("index {ix}, this platform's manifest {}", r.manifest_digest),
            None => r.manifest_digest.clone(),
        };
        println!(
            "{} {} ({}) in containerd namespace {:?} in {secs:.2}s: \
             {} layers claimed lazily by snapshotter {:?}, top snapshot {}",
            if r.created { "Pulled" } else { "Updated" },
            r.image,
            target,
            r.namespace,
            r.layers.len(),
            r.snapshotter,
            r.top_chain_id,
        );
    }
    Ok(())
}
