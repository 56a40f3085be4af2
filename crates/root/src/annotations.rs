//! What a manifest says of its boot layer: the annotations both a lazy
//! start (which layer to open, where its index region ends) and a local
//! start (is this an optimized image) read.

use lazylayer_fetch::FetchError;
use lazylayer_index::{
    ANNOTATION_BOOT_LAYER, ANNOTATION_INDEX_REGION_DIGEST, ANNOTATION_INDEX_REGION_SIZE,
};
use lazylayer_oci::manifest::{parse_manifest, ManifestKind, RawManifest};
use lazylayer_oci::{Digest, Reference};

use crate::bad;

/// What a manifest says of its boot layer.
#[derive(Debug, Clone)]
pub(crate) struct BootAnnotations {
    pub(crate) layer: Digest,
    /// A chunked boot layer's index region: compressed length and digest.
    pub(crate) region: Option<(u64, Digest)>,
}

/// The boot layer a manifest announces, if any, parsed once.
pub(crate) fn boot_annotations(
    reference: &Reference,
    raw: &RawManifest,
) -> Result<Option<BootAnnotations>, FetchError> {
    let m = match parse_manifest(&reference.to_string(), raw).map_err(FetchError::from)? {
        ManifestKind::Image(m) => m,
        ManifestKind::Index(_) => return Ok(None),
    };
    let Some(a) = m.annotations().as_ref() else {
        return Ok(None);
    };
    from_annotations(reference, |k| a.get(k))
}

/// The boot layer that annotations (a manifest's, or a boot artifact's)
/// announce, if any.
pub(crate) fn from_annotations<'a>(
    reference: &Reference,
    a: impl Fn(&str) -> Option<&'a String>,
) -> Result<Option<BootAnnotations>, FetchError> {
    let Some(layer) = a(ANNOTATION_BOOT_LAYER) else {
        return Ok(None);
    };
    let digest = |d: &String| {
        d.parse()
            .map_err(|e: lazylayer_oci::OciError| bad(reference, e.to_string()))
    };
    let layer = digest(layer)?;
    let region = match (
        a(ANNOTATION_INDEX_REGION_SIZE),
        a(ANNOTATION_INDEX_REGION_DIGEST),
    ) {
        (Some(len), Some(d)) => {
            let len = len.parse::<u64>().map_err(|_| {
                bad(
                    reference,
                    format!("{ANNOTATION_INDEX_REGION_SIZE} {len:?} is not a size"),
                )
            })?;
            Some((len, digest(d)?))
        }
        (None, None) => None,
        _ => {
            return Err(bad(
                reference,
                "the manifest gives only half of the index region's size and digest",
            ))
        }
    };
    Ok(Some(BootAnnotations { layer, region }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        format!("sha256:{}", hex(n)).parse().unwrap()
    }

    fn hex(n: u8) -> String {
        format!("{n:02x}").repeat(32)
    }

    fn reference() -> Reference {
        "registry.test/app:1".parse().unwrap()
    }

    /// An image manifest with one layer and `annotations`.
    fn manifest(annotations: serde_json::Value) -> RawManifest {
        let json = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": digest(1).to_string(),
                "size": 2
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest(2).to_string(),
                "size": 100
            }],
            "annotations": annotations
        });
        let bytes = serde_json::to_vec(&json).unwrap();
        RawManifest {
            digest: Digest::sha256_of(&bytes),
            bytes: bytes.into(),
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        }
    }

    #[test]
    fn a_chunked_boot_layer_is_read_with_its_index_region() {
        let raw = manifest(serde_json::json!({
            ANNOTATION_BOOT_LAYER: digest(2).to_string(),
            ANNOTATION_INDEX_REGION_SIZE: "4096",
            ANNOTATION_INDEX_REGION_DIGEST: digest(3).to_string(),
        }));
        let b = boot_annotations(&reference(), &raw).unwrap().unwrap();
        assert_eq!(b.layer, digest(2));
        assert_eq!(b.region, Some((4096, digest(3))));
    }

    #[test]
    fn a_boot_layer_read_whole_has_no_region() {
        let raw = manifest(serde_json::json!({ ANNOTATION_BOOT_LAYER: digest(2).to_string() }));
        let b = boot_annotations(&reference(), &raw).unwrap().unwrap();
        assert_eq!(b.layer, digest(2));
        assert_eq!(b.region, None);
    }

    #[test]
    fn a_plain_image_or_an_index_has_no_boot_layer() {
        let raw = manifest(serde_json::json!({ "org.example": "x" }));
        assert!(boot_annotations(&reference(), &raw).unwrap().is_none());
        let index = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": []
        }))
        .unwrap();
        let raw = RawManifest {
            digest: Digest::sha256_of(&index),
            bytes: index.into(),
            media_type: "application/vnd.oci.image.index.v1+json".into(),
        };
        assert!(boot_annotations(&reference(), &raw).unwrap().is_none());
    }

    #[test]
    fn half_a_region_or_a_size_that_is_no_number_is_refused() {
        let half = manifest(serde_json::json!({
            ANNOTATION_BOOT_LAYER: digest(2).to_string(),
            ANNOTATION_INDEX_REGION_SIZE: "4096",
        }));
        let err = boot_annotations(&reference(), &half).err().unwrap();
        assert!(err.to_string().contains("only half"), "{err}");
        let not_a_size = manifest(serde_json::json!({
            ANNOTATION_BOOT_LAYER: digest(2).to_string(),
            ANNOTATION_INDEX_REGION_SIZE: "4k",
            ANNOTATION_INDEX_REGION_DIGEST: digest(3).to_string(),
        }));
        let err = boot_annotations(&reference(), &not_a_size).err().unwrap();
        assert!(err.to_string().contains("is not a size"), "{err}");
        let bad_digest = manifest(serde_json::json!({ ANNOTATION_BOOT_LAYER: "sha256:nope" }));
        assert!(matches!(
            boot_annotations(&reference(), &bad_digest),
            Err(FetchError::BadImage { .. })
        ));
    }
}
