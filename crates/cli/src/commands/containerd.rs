use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use lazylayer_layer::index::ANNOTATION_BOOT_LAYER;
use lazylayer_oci::Platform;
use lazylayer_snapshotter::containerd_client::{
    chain_ids, Containerd, PrepareOutcome, LABEL_GC_REF_CONTENT_CONFIG,
    LABEL_GC_REF_SNAPSHOT_PREFIX, LABEL_SNAPSHOT_REF,
};
use lazylayer_snapshotter::proto::{snapshots as spb, types as pbt};
use lazylayer_snapshotter::remote::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
};

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
    /// into its content store, and every layer is claimed by the lazylayer
    /// snapshotter (nothing downloaded); `ctr run --snapshotter NAME REF` then
    /// starts from the boot layer
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
    let platform: Platform = super::parse_platform(a.platform.as_deref())?;
    let client = g.client()?;

    // 1. Manifest and config from the registry (nothing else).
    let img = client
        .resolve(&reference, &platform)
        .await
        .with_context(|| format!("resolving {reference}"))?;
    let has_boot = img
        .parsed
        .annotations()
        .as_ref()
        .is_some_and(|an| an.contains_key(ANNOTATION_BOOT_LAYER));
    if !has_boot {
        bail!(
            "{} is not a lazylayer-optimized image (its manifest has no {ANNOTATION_BOOT_LAYER} \
             annotation), so the snapshotter would not claim its layers; pull it normally \
             (`ctr images pull`), or optimize it first (`lazylayer optimize`)",
            a.image
        );
    }
    let manifest_digest = img.manifest.digest.to_string();
    let config_digest = img
        .config_digest()
        .context("reading the config descriptor")?
        .to_string();
    let layers: Vec<String> = img
        .layers()
        .iter()
        .map(|d| lazylayer_oci::manifest::descriptor_digest(&a.image, d).map(|d| d.to_string()))
        .collect::<std::result::Result<_, _>>()
        .context("reading the layer descriptors")?;
    let diff_ids: Vec<String> = img
        .diff_ids()
        .context("reading the config's diff IDs")?
        .iter()
        .map(ToString::to_string)
        .collect();
    if diff_ids.len() != layers.len() {
        bail!(
            "{}: the manifest has {} layers but the config {} diff IDs",
            a.image,
            layers.len(),
            diff_ids.len()
        );
    }
    let chains = chain_ids(&diff_ids);
    let Some(top) = chains.last().cloned() else {
        bail!("{} has no layers", a.image);
    };

    let channel = lazylayer_snapshotter::grpc::connect(&a.address)
        .await
        .with_context(|| format!("connecting to containerd at {}", a.address.display()))?;
    let mut cd = Containerd::new(channel, &a.namespace);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Everything below is held by a lease until the image record references
    // it. Should this process die first, containerd collects the lease a day
    // later (as its own client does for pulls).
    let expire = rfc3339_utc(now.as_secs() + 24 * 3600);
    cd.create_lease(&format!("lazylayer-pull-{}", now.as_nanos()), Some(&expire))
        .await
        .context("creating a containerd lease")?;
    let res = register(
        &cd,
        &a,
        &img,
        &manifest_digest,
        &config_digest,
        &layers,
        &chains,
        now.as_nanos(),
    )
    .await;
    if let Err(e) = cd.delete_lease().await {
        tracing::warn!(error = %e, "could not delete the containerd lease");
    }
    let created = res?;

    let secs = start.elapsed().as_secs_f64();
    if a.json {
        let v = serde_json::json!({
            "image": a.image,
            "namespace": a.namespace,
            "snapshotter": a.snapshotter,
            "manifest_digest": manifest_digest,
            "config_digest": config_digest,
            "layers": layers,
            "chain_ids": chains,
            "top_chain_id": top,
            "created": created,
            "seconds": secs,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "{} {} ({manifest_digest}) in containerd namespace {:?} in {secs:.2}s: \
             {} layers claimed lazily by snapshotter {:?}, top snapshot {top}",
            if created { "Pulled" } else { "Updated" },
            a.image,
            a.namespace,
            layers.len(),
            a.snapshotter,
        );
    }
    Ok(())
}

/// Steps 2-4: content, snapshots, image record. Returns whether the image
/// record was created (false: updated).
#[allow(clippy::too_many_arguments)]
async fn register(
    cd: &Containerd,
    a: &PullArgs,
    img: &lazylayer_oci::ResolvedImage,
    manifest_digest: &str,
    config_digest: &str,
    layers: &[String],
    chains: &[String],
    nanos: u128,
) -> Result<bool> {
    let top = chains.last().expect("at least one layer");
    // 2. Manifest and config into the content store, with the GC references
    // that keep the config and the snapshots alive as long as the image.
    let manifest_labels = HashMap::from([(
        LABEL_GC_REF_CONTENT_CONFIG.to_string(),
        config_digest.to_string(),
    )]);
    let config_labels = HashMap::from([(
        format!("{LABEL_GC_REF_SNAPSHOT_PREFIX}{}", a.snapshotter),
        top.clone(),
    )]);
    cd.write_content(config_digest, &img.config_bytes, config_labels)
        .await
        .with_context(|| format!("writing the config {config_digest} to containerd"))?;
    cd.write_content(manifest_digest, &img.manifest.bytes, manifest_labels)
        .await
        .with_context(|| format!("writing the manifest {manifest_digest} to containerd"))?;

    // 3. Each layer, bottom first, prepared with the labels that make the
    // snapshotter claim it; containerd then records the chain ID committed.
    let all_layers = layers.join(",");
    for (i, (layer, chain)) in layers.iter().zip(chains).enumerate() {
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        let key = format!("extract-{nanos}-{i} {chain}");
        let labels = HashMap::from([
            (LABEL_SNAPSHOT_REF.to_string(), chain.clone()),
            (LABEL_IMAGE_REF.to_string(), a.image.clone()),
            (
                LABEL_MANIFEST_DIGEST.to_string(),
                manifest_digest.to_string(),
            ),
            (LABEL_LAYER_DIGEST.to_string(), layer.clone()),
            (LABEL_IMAGE_LAYERS.to_string(), all_layers.clone()),
        ]);
        let outcome = cd
            .prepare_snapshot(&a.snapshotter, &key, parent, labels)
            .await
            .with_context(|| {
                format!(
                    "preparing layer {i} ({layer}) in snapshotter {:?} through containerd",
                    a.snapshotter
                )
            })?;
        if let PrepareOutcome::Active(_) = outcome {
            let _ = cd.remove_snapshot(&a.snapshotter, &key).await;
            bail!(
                "snapshotter {:?} did not claim layer {i} ({layer}) of {}: it is not the \
                 lazylayer snapshotter, or it could not resolve the image from the registry \
                 (see its log); nothing was downloaded, use `ctr images pull` for a full pull",
                a.snapshotter,
                a.image
            );
        }
        let info = cd
            .stat_snapshot(&a.snapshotter, chain)
            .await
            .with_context(|| format!("layer {i} ({layer}) was claimed but {chain} is missing"))?;
        if info.kind != spb::Kind::Committed as i32 {
            bail!("layer {i} ({layer}): snapshot {chain} exists but is not committed");
        }
        tracing::info!(layer = %layer, chain = %chain, "layer claimed");
    }

    // 4. The image record.
    let target = pbt::Descriptor {
        media_type: if img.manifest.media_type.is_empty() {
            "application/vnd.oci.image.manifest.v1+json".to_string()
        } else {
            img.manifest.media_type.clone()
        },
        digest: manifest_digest.to_string(),
        size: img.manifest.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    cd.put_image(&a.image, target, HashMap::new())
        .await
        .with_context(|| format!("creating the image record {} in containerd", a.image))
}

/// Unix seconds as RFC 3339 in UTC (`2026-11-25T14:00:00Z`), the form
/// containerd's `containerd.io/gc.expire` label takes.
fn rfc3339_utc(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (proleptic Gregorian, era-based).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::rfc3339_utc;

    #[test]
    fn rfc3339_dates() {
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_utc(1_795_624_496), "2026-11-25T16:34:56Z");
        assert_eq!(rfc3339_utc(4_107_542_399), "2100-02-28T23:59:59Z");
    }
}
