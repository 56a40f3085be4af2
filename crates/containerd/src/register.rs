//! Registering an optimized image in containerd lazily (`lazylayer
//! containerd pull`, for `ctr` users): manifest and config into containerd's
//! content store, every layer prepared with the labels that make the
//! lazylayer snapshotter claim it, and the image record; all under a lease.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lazylayer_index::ANNOTATION_BOOT_LAYER;
use lazylayer_oci::manifest::{parse_manifest, ManifestKind, RawManifest};
use lazylayer_oci::{Platform, Reference, RegistryClient, ResolvedImage};
use lazylayer_store::{ResolvedLayers, Store, StoreError};
use serde::Serialize;
use tonic::Status;

use crate::containerd_client::{
    chain_ids, Containerd, PrepareOutcome, LABEL_GC_REF_CONTENT_CONFIG,
    LABEL_GC_REF_CONTENT_MANIFEST_PREFIX, LABEL_GC_REF_SNAPSHOT_PREFIX, LABEL_SNAPSHOT_REF,
};
use crate::remote::{
    LABEL_IMAGE_LAYERS, LABEL_IMAGE_REF, LABEL_LAYER_DIGEST, LABEL_MANIFEST_DIGEST,
};
use containerd_client::services::v1::snapshots as spb;
use containerd_client::types as pbt;

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("resolving {image}")]
    Resolve {
        image: String,
        #[source]
        source: Box<StoreError>,
    },
    #[error(
        "{0} is not a lazylayer-optimized image (its manifest has no {ANNOTATION_BOOT_LAYER} \
         annotation), so the snapshotter would not claim its layers; pull it normally \
         (`ctr images pull`), or optimize it first (`lazylayer optimize`)"
    )]
    NotOptimized(String),
    #[error("{image}: {reason}")]
    BadImage { image: String, reason: String },
    #[error("connecting to containerd at {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("{what}")]
    Containerd {
        what: String,
        #[source]
        source: Status,
    },
    /// The snapshotter answered, but not as the lazylayer snapshotter would.
    #[error("{0}")]
    NotClaimed(String),
}

/// Where and how to register.
#[derive(Debug, Clone)]
pub struct RegisterOptions {
    /// containerd's unix socket.
    pub address: PathBuf,
    pub namespace: String,
    /// The lazylayer snapshotter's name in containerd's config (`[proxy_plugins.NAME]`).
    pub snapshotter: String,
    pub platform: Platform,
}

/// What was registered.
#[derive(Debug, Clone, Serialize)]
pub struct Registered {
    /// The containerd image name (the reference as given).
    pub image: String,
    pub namespace: String,
    pub snapshotter: String,
    pub manifest_digest: String,
    /// The index the reference named (multi-platform), which the image
    /// record then targets, as containerd's own pull does; None when it
    /// named the manifest itself.
    pub index_digest: Option<String>,
    pub config_digest: String,
    /// Layer digests, bottom first.
    pub layers: Vec<String>,
    pub chain_ids: Vec<String>,
    pub top_chain_id: String,
    /// The image record was created (false: updated).
    pub created: bool,
}

fn status(what: String) -> impl FnOnce(Status) -> RegisterError {
    move |source| RegisterError::Containerd { what, source }
}

/// Register the optimized image `reference` (named `name` in containerd)
/// lazily: containerd downloads nothing, the snapshotter claims every layer.
/// The manifest and config are kept in `store` too (the snapshotter's).
pub async fn register_image(
    client: &RegistryClient,
    store: &Store,
    reference: &Reference,
    name: &str,
    opts: &RegisterOptions,
) -> Result<Registered, RegisterError> {
    // 1. Manifest and config from the registry (nothing else). The config
    // goes out on the manifest's connection: its round trip is the
    // registry's distance, kept for the snapshotter's start.
    let resolve_err = |source: StoreError| RegisterError::Resolve {
        image: name.to_string(),
        source: Box::new(source),
    };
    let m = client
        .resolve_manifest(reference, &opts.platform)
        .await
        .map_err(|e| resolve_err(e.into()))?;
    let asked = Instant::now();
    let img = client
        .fetch_config(reference, m)
        .await
        .map_err(|e| resolve_err(e.into()))?;
    lazylayer_fetch::note_registry_round_trip(
        store,
        &reference.repository.registry,
        asked.elapsed(),
    );
    let ResolvedLayers {
        image: img,
        config_digest,
        layers,
    } = ResolvedLayers::of(reference, img).map_err(resolve_err)?;
    let has_boot = img
        .parsed
        .annotations()
        .as_ref()
        .is_some_and(|an| an.contains_key(ANNOTATION_BOOT_LAYER));
    if !has_boot {
        return Err(RegisterError::NotOptimized(name.to_string()));
    }
    // Kept in lazylayer's store as well: the snapshotter's open of this
    // manifest (by digest) then asks the registry for neither, and its
    // first request is the boot layer's (a far registry's round trips:
    // 7-8 before the start, where `lazylayer run` took 4-5). Not needed
    // for the pull itself, so a failure only costs those round trips.
    for (digest, bytes) in [
        (&img.manifest.digest, &img.manifest.bytes),
        (&config_digest, &img.config_bytes),
    ] {
        if let Err(e) = store.put_blob_bytes(digest, bytes) {
            tracing::warn!(image = name, error = %e, "could not keep {digest} in the store");
        }
    }
    let manifest_digest = img.manifest.digest.to_string();
    let diff_ids: Vec<String> = layers.iter().map(|l| l.diff_id.to_string()).collect();
    let chains = chain_ids(&diff_ids);
    let Some(top) = chains.last().cloned() else {
        return Err(RegisterError::BadImage {
            image: name.to_string(),
            reason: "no layers".into(),
        });
    };

    let channel = crate::grpc::connect(&opts.address)
        .await
        .map_err(|source| RegisterError::Connect {
            path: opts.address.clone(),
            source,
        })?;
    let mut cd = Containerd::new(channel, &opts.namespace);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // Everything below is held by a lease until the image record references
    // it. Should this process die first, containerd collects the lease a day
    // later (as its own client does for pulls).
    let expire = rfc3339_utc(now.as_secs() + 24 * 3600);
    cd.create_lease(&format!("lazylayer-pull-{}", now.as_nanos()), Some(&expire))
        .await
        .map_err(status("creating a containerd lease".into()))?;
    let mut reg = Registered {
        image: name.to_string(),
        namespace: opts.namespace.clone(),
        snapshotter: opts.snapshotter.clone(),
        manifest_digest,
        index_digest: img.index.as_ref().map(|ix| ix.digest.to_string()),
        config_digest: config_digest.to_string(),
        layers: layers.iter().map(|l| l.digest.to_string()).collect(),
        chain_ids: chains,
        top_chain_id: top,
        created: false,
    };
    let res = register(&cd, &img, &reg, now.as_nanos()).await;
    if let Err(e) = cd.delete_lease().await {
        tracing::warn!(error = %e, "could not delete the containerd lease");
    }
    reg.created = res?;
    Ok(reg)
}

/// Steps 2-4: content, snapshots, image record. Returns whether the image
/// record was created (false: updated).
async fn register(
    cd: &Containerd,
    img: &ResolvedImage,
    r: &Registered,
    nanos: u128,
) -> Result<bool, RegisterError> {
    let (manifest_digest, config_digest) = (&r.manifest_digest, &r.config_digest);
    let (snapshotter, chains) = (&r.snapshotter, &r.chain_ids);
    // 2. Manifest and config into the content store, with the GC references
    // that keep the config and the snapshots alive as long as the image.
    let manifest_labels = HashMap::from([(
        LABEL_GC_REF_CONTENT_CONFIG.to_string(),
        config_digest.to_string(),
    )]);
    let config_labels = HashMap::from([(
        format!("{LABEL_GC_REF_SNAPSHOT_PREFIX}{snapshotter}"),
        r.top_chain_id.clone(),
    )]);
    cd.write_content(config_digest, &img.config_bytes, config_labels)
        .await
        .map_err(status(format!(
            "writing the config {config_digest} to containerd"
        )))?;
    cd.write_content(manifest_digest, &img.manifest.bytes, manifest_labels)
        .await
        .map_err(status(format!(
            "writing the manifest {manifest_digest} to containerd"
        )))?;

    // 3. Each layer, bottom first, prepared with the labels that make the
    // snapshotter claim it; containerd then records the chain ID committed.
    let all_layers = r.layers.join(",");
    for (i, (layer, chain)) in r.layers.iter().zip(chains).enumerate() {
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        let key = format!("extract-{nanos}-{i} {chain}");
        let labels = HashMap::from([
            (LABEL_SNAPSHOT_REF.to_string(), chain.clone()),
            (LABEL_IMAGE_REF.to_string(), r.image.clone()),
            (LABEL_MANIFEST_DIGEST.to_string(), manifest_digest.clone()),
            (LABEL_LAYER_DIGEST.to_string(), layer.clone()),
            (LABEL_IMAGE_LAYERS.to_string(), all_layers.clone()),
        ]);
        let outcome = cd
            .prepare_snapshot(snapshotter, &key, parent, labels)
            .await
            .map_err(status(format!(
                "preparing layer {i} ({layer}) in snapshotter {snapshotter:?} through containerd"
            )))?;
        if let PrepareOutcome::Active(_) = outcome {
            let _ = cd.remove_snapshot(snapshotter, &key).await;
            return Err(RegisterError::NotClaimed(format!(
                "snapshotter {snapshotter:?} did not claim layer {i} ({layer}) of {}: it is not the \
                 lazylayer snapshotter, or it could not resolve the image from the registry \
                 (see its log); nothing was downloaded, use `ctr images pull` for a full pull",
                r.image
            )));
        }
        let info = cd
            .stat_snapshot(snapshotter, chain)
            .await
            .map_err(status(format!(
                "layer {i} ({layer}) was claimed but {chain} is missing"
            )))?;
        if info.kind != spb::Kind::Committed as i32 {
            return Err(RegisterError::NotClaimed(format!(
                "layer {i} ({layer}): snapshot {chain} exists but is not committed"
            )));
        }
        tracing::info!(layer = %layer, chain = %chain, "layer claimed");
    }

    // 4. The image record: on the index when the reference named one (its
    // platform's manifest is then found through it, as after `ctr images
    // pull`), else on the manifest.
    let target = match &img.index {
        Some(index) => {
            let labels = index_child_labels(index, manifest_digest)?;
            cd.write_content(&index.digest.to_string(), &index.bytes, labels)
                .await
                .map_err(status(format!(
                    "writing the index {} to containerd",
                    index.digest
                )))?;
            descriptor(index, "application/vnd.oci.image.index.v1+json")
        }
        None => descriptor(&img.manifest, "application/vnd.oci.image.manifest.v1+json"),
    };
    cd.put_image(&r.image, target, HashMap::new())
        .await
        .map_err(status(format!(
            "creating the image record {} in containerd",
            r.image
        )))
}

fn descriptor(raw: &RawManifest, default_media_type: &str) -> pbt::Descriptor {
    pbt::Descriptor {
        media_type: if raw.media_type.is_empty() {
            default_media_type.to_string()
        } else {
            raw.media_type.clone()
        },
        digest: raw.digest.to_string(),
        size: raw.bytes.len() as i64,
        annotations: HashMap::new(),
    }
}

/// The GC label that keeps the registered manifest alive as long as the
/// index: `containerd.io/gc.ref.content.m.<its position in the index>`, as
/// containerd labels the children of an index it pulled (only those in its
/// content store: the other platforms' manifests are not).
fn index_child_labels(
    index: &RawManifest,
    manifest_digest: &str,
) -> Result<HashMap<String, String>, RegisterError> {
    let bad = |reason: String| RegisterError::BadImage {
        image: index.digest.to_string(),
        reason,
    };
    let ManifestKind::Index(parsed) = parse_manifest("the index", index)
        .map_err(|e| bad(lazylayer_sys::error::error_chain(&e)))?
    else {
        return Err(bad("the reference named an index, now not one".into()));
    };
    let position = parsed
        .manifests()
        .iter()
        .position(|m| m.digest().to_string() == manifest_digest)
        .ok_or_else(|| bad(format!("its index does not list {manifest_digest}")))?;
    Ok(HashMap::from([(
        format!("{LABEL_GC_REF_CONTENT_MANIFEST_PREFIX}{position}"),
        manifest_digest.to_string(),
    )]))
}

/// Unix seconds as RFC 3339 in UTC (`2026-11-25T14:00:00Z`), the form
/// containerd's `containerd.io/gc.expire` label takes.
fn rfc3339_utc(secs: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t).to_string()
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
