//! One image resolved for fetching: its manifest and config from the
//! registry, and its layers as the store fetches them. `pull`, the lazy
//! start and containerd registration all begin here.

use lazylayer_oci::manifest::descriptor_digest;
use lazylayer_oci::{Digest, Platform, Reference, RegistryClient, ResolvedImage};

use crate::{LayerRef, Result, StoreError};

/// An image's manifest and config, and its layers.
pub struct ResolvedLayers {
    pub image: ResolvedImage,
    pub config_digest: Digest,
    /// Bottom first, each with its diff_id from the config.
    pub layers: Vec<LayerRef>,
}

/// Resolve `reference` for `platform` (manifest and config; no layer is
/// fetched) and list its layers; the manifest and the config must agree on
/// how many there are.
pub async fn resolve_layers(
    client: &RegistryClient,
    reference: &Reference,
    platform: &Platform,
) -> Result<ResolvedLayers> {
    ResolvedLayers::of(reference, client.resolve(reference, platform).await?)
}

impl ResolvedLayers {
    /// The layers of `image` (manifest and config resolved), as
    /// [`resolve_layers`] lists them.
    pub fn of(reference: &Reference, image: ResolvedImage) -> Result<ResolvedLayers> {
        let layers = layer_refs(reference, &image)?;
        let config_digest = image.config_digest()?;
        Ok(ResolvedLayers {
            image,
            config_digest,
            layers,
        })
    }
}

/// The layers of a resolved image, bottom first, each with its diff_id.
pub fn layer_refs(reference: &Reference, image: &ResolvedImage) -> Result<Vec<LayerRef>> {
    let what = reference.to_string();
    let diff_ids = image.diff_ids()?;
    if diff_ids.len() != image.layers().len() {
        return Err(StoreError::BadImage {
            reference: what,
            reason: format!(
                "{} layers but {} diff_ids in the config",
                image.layers().len(),
                diff_ids.len()
            ),
        });
    }
    let mut layers = Vec::new();
    for (desc, diff_id) in image.layers().iter().zip(diff_ids) {
        layers.push(LayerRef {
            digest: descriptor_digest(&what, desc)?,
            diff_id,
            size: desc.size(),
            media_type: desc.media_type().to_string(),
        });
    }
    Ok(layers)
}

#[cfg(test)]
mod tests {
    use super::layer_refs;
    use crate::StoreError;
    use lazylayer_oci::manifest::RawManifest;
    use lazylayer_oci::{Digest, Reference, ResolvedImage};

    const L1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const L2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D1: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const D2: &str = "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn image(diff_ids: &[&str]) -> (Reference, ResolvedImage) {
        let reference: Reference = "127.0.0.1:5000/app:v1".parse().unwrap();
        let layer = |d: &str, size: u64| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": size});
        let config = serde_json::json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        });
        let config_bytes = serde_json::to_vec(&config).unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": Digest::sha256_of(&config_bytes).to_string(), "size": config_bytes.len()},
            "layers": [layer(L1, 10), layer(L2, 20)],
        });
        let bytes = serde_json::to_vec(&manifest).unwrap();
        let img = ResolvedImage {
            reference: reference.clone(),
            index: None,
            manifest: RawManifest {
                digest: Digest::sha256_of(&bytes),
                bytes: bytes.clone().into(),
                media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            },
            parsed: serde_json::from_slice(&bytes).unwrap(),
            config_bytes: config_bytes.clone().into(),
            config: serde_json::from_slice(&config_bytes).unwrap(),
        };
        (reference, img)
    }

    #[test]
    fn layers_pair_descriptors_with_diff_ids_and_counts_must_agree() {
        let (r, img) = image(&[D1, D2]);
        let layers = layer_refs(&r, &img).unwrap();
        let got: Vec<(String, String, u64)> = layers
            .iter()
            .map(|l| (l.digest.to_string(), l.diff_id.to_string(), l.size))
            .collect();
        assert_eq!(
            got,
            [
                (L1.to_string(), D1.to_string(), 10),
                (L2.to_string(), D2.to_string(), 20)
            ]
        );
        let (r, img) = image(&[D1]);
        assert!(matches!(
            layer_refs(&r, &img),
            Err(StoreError::BadImage { .. })
        ));
    }
}
