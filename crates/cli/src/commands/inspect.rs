use anyhow::{Context, Result};
use serde_json::json;

use crate::context::{human_bytes, GlobalArgs};

/// Show an image's manifest and config summary, fetched from the registry.
#[derive(clap::Args)]
pub struct Args {
    /// Image reference: [HOST[:PORT]/]REPO[:TAG|@DIGEST]
    pub image: String,
    /// Platform to pick from a multi-platform image (OS/ARCH[/VARIANT])
    #[arg(long)]
    pub platform: Option<String>,
    /// Print JSON on stdout
    #[arg(long)]
    pub json: bool,
}

pub async fn run(g: &GlobalArgs, a: Args) -> Result<()> {
    let reference = super::parse_reference(&a.image)?;
    let platform = super::parse_platform(a.platform.as_deref())?;
    let client = g.client()?;
    let img = client
        .resolve(&reference, &platform)
        .await
        .with_context(|| format!("inspecting {reference}"))?;
    let cfg = img.config.config().clone().unwrap_or_default();
    let layers: Vec<_> = img
        .layers()
        .iter()
        .map(|l| json!({"digest": l.digest().to_string(), "size": l.size(), "mediaType": l.media_type().to_string()}))
        .collect();
    let total: u64 = img.layers().iter().map(|l| l.size()).sum();
    let own_boot = img
        .parsed
        .annotations()
        .as_ref()
        .and_then(|a| a.get(lazylayer_index::ANNOTATION_BOOT_LAYER))
        .cloned();
    // A plain image may have boot layers attached: listed newest first, as
    // `run` tries them, each checked as far as its manifest goes.
    let artifacts = match &own_boot {
        Some(_) => Ok(Vec::new()),
        None => boot_artifacts(&client, &reference, &img.manifest.digest).await,
    };
    let v = json!({
        "reference": img.reference.to_string(),
        "digest": img.manifest.digest,
        "mediaType": img.manifest.media_type,
        "index": img.index.as_ref().map(|i| i.digest.to_string()),
        "platform": format!("{}/{}", img.config.os(), img.config.architecture()),
        "created": img.config.created(),
        "config": {
            "digest": img.config_digest()?,
            "entrypoint": cfg.entrypoint(),
            "cmd": cfg.cmd(),
            "env": cfg.env(),
            "workingDir": cfg.working_dir(),
            "user": cfg.user(),
            "exposedPorts": cfg.exposed_ports(),
            "labels": cfg.labels(),
        },
        "annotations": img.parsed.annotations(),
        "layers": layers,
        "diffIds": img.config.rootfs().diff_ids(),
        "history": img.config.history().as_ref().map(|h| h.len()).unwrap_or(0),
        "size": total,
        "bootLayer": own_boot,
        "bootArtifacts": match &artifacts {
            Ok(list) => json!(list),
            Err(e) => json!({ "error": e }),
        },
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("Image:      {}", img.reference);
    println!("Digest:     {}", img.manifest.digest);
    println!("Media type: {}", img.manifest.media_type);
    if let Some(i) = &img.index {
        println!("Index:      {}", i.digest);
    }
    println!(
        "Platform:   {}/{}",
        img.config.os(),
        img.config.architecture()
    );
    if let Some(c) = img.config.created() {
        println!("Created:    {c}");
    }
    let show = |v: &Option<Vec<String>>| {
        v.as_ref()
            .map(|x| format!("{x:?}"))
            .unwrap_or_else(|| "-".into())
    };
    println!("Entrypoint: {}", show(cfg.entrypoint()));
    println!("Cmd:        {}", show(cfg.cmd()));
    println!(
        "WorkingDir: {}",
        cfg.working_dir().clone().unwrap_or_else(|| "-".into())
    );
    println!(
        "User:       {}",
        cfg.user().clone().unwrap_or_else(|| "-".into())
    );
    for e in cfg.env().clone().unwrap_or_default() {
        println!("Env:        {e}");
    }
    println!(
        "Layers:     {} ({} compressed)",
        img.layers().len(),
        human_bytes(total)
    );
    for l in img.layers() {
        println!(
            "  {}  {:>10}  {}",
            l.digest(),
            human_bytes(l.size()),
            l.media_type()
        );
    }
    if let Some(b) = &own_boot {
        println!("Boot layer: {b} (optimized image)");
    }
    match &artifacts {
        Ok(list) if list.is_empty() && own_boot.is_none() => {
            println!("Boot artifacts: none (a run pulls it fully)")
        }
        Ok(list) if !list.is_empty() => {
            println!(
                "Boot artifacts: {} (newest first; a run takes the first that verifies)",
                list.len()
            );
            for a in list {
                match &a.refused {
                    None => println!(
                        "  {}  {}  boot layer {} ({})",
                        a.digest,
                        a.created,
                        a.boot_layer.as_deref().unwrap_or("-"),
                        human_bytes(a.boot_layer_size)
                    ),
                    Some(why) => println!("  {}  {}  refused: {why}", a.digest, a.created),
                }
            }
        }
        Ok(_) => {}
        Err(e) => println!("Boot artifacts: could not be listed: {e}"),
    }
    Ok(())
}

/// One boot artifact attached to the image, as `inspect` shows it.
#[derive(serde::Serialize)]
struct ArtifactSummary {
    digest: String,
    created: String,
    boot_layer: Option<String>,
    boot_layer_size: u64,
    /// Why a run would refuse it (its index is checked only at a start).
    refused: Option<String>,
}

async fn boot_artifacts(
    client: &lazylayer_oci::RegistryClient,
    reference: &lazylayer_oci::Reference,
    subject: &lazylayer_oci::Digest,
) -> Result<Vec<ArtifactSummary>, String> {
    use lazylayer_root::attached;
    let listed = attached::list(client, reference, subject).await?;
    let mut out = Vec::new();
    for l in listed {
        let checked = attached::check(client, reference, &l.digest, subject).await;
        out.push(ArtifactSummary {
            digest: l.digest.to_string(),
            created: l.created,
            boot_layer: checked.as_ref().ok().map(|(d, _)| d.to_string()),
            boot_layer_size: checked.as_ref().map_or(0, |(_, size)| *size),
            refused: checked.err(),
        });
    }
    Ok(out)
}
