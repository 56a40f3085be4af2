//! What a manifest says of its boot layer: the annotations both a lazy
//! start (which layer to open, where its index region ends) and a local
//! start (is this an optimized image) read.

use lazylayer_fetch::FetchError;
use lazylayer_layer::index::{
    ANNOTATION_BOOT_LAYER, ANNOTATION_INDEX_REGION_DIGEST, ANNOTATION_INDEX_REGION_SIZE,
};
use lazylayer_oci::manifest::{parse_manifest, ManifestKind, RawManifest};
use lazylayer_oci::{Digest, Reference};

use crate::bad;

/// What a manifest says of its boot layer.
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
    let Some(layer) = a.get(ANNOTATION_BOOT_LAYER) else {
        return Ok(None);
    };
    let digest = |d: &String| {
        d.parse()
            .map_err(|e: lazylayer_oci::OciError| bad(reference, e.to_string()))
    };
    let layer = digest(layer)?;
    let region = match (
        a.get(ANNOTATION_INDEX_REGION_SIZE),
        a.get(ANNOTATION_INDEX_REGION_DIGEST),
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
