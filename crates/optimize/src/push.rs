//! Pushing DST: SRC's layers by reference (mounted or found, never
//! re-uploaded), then the boot layer, the new config and the manifest.

use std::path::Path;

use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{Digest, PushOutcome, Reference, RegistryClient};
use lazylayer_store::ImageRecord;

use crate::image::OptimizedImage;
use crate::OptimizeError;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct PushReport {
    pub layers_mounted: usize,
    pub layers_existing: usize,
    /// SRC layers that had to be uploaded (DST on another registry).
    pub layers_uploaded: usize,
    pub bytes_uploaded: u64,
    pub manifest_digest: String,
}

/// The boot layer as a file ready to upload.
pub struct BootBlob<'a> {
    pub path: &'a Path,
    pub digest: &'a Digest,
    pub size: u64,
}

/// Push the optimized image. The manifest goes last, so a failure leaves no
/// manifest pointing at missing blobs.
pub async fn push_optimized(
    client: &RegistryClient,
    store: &lazylayer_store::Store,
    src: &Reference,
    src_record: &ImageRecord,
    dst: &Reference,
    boot: &BootBlob<'_>,
    image: &OptimizedImage,
) -> Result<PushReport, OptimizeError> {
    let layers: Vec<(Digest, u64)> = src_record
        .layers
        .iter()
        .map(|l| (l.digest.clone(), l.size))
        .collect();
    let counts = store
        .push_blobs(client, &layers, &src.repository, &dst.repository)
        .await?;
    let mut rep = PushReport {
        layers_mounted: counts.mounted,
        layers_existing: counts.existed,
        layers_uploaded: counts.uploaded,
        bytes_uploaded: counts.bytes_uploaded,
        manifest_digest: String::new(),
    };
    if client
        .push_blob(
            &dst.repository,
            boot.digest,
            boot.size,
            &BlobSource::File(boot.path.to_path_buf()),
            None,
        )
        .await?
        == PushOutcome::Uploaded
    {
        rep.bytes_uploaded += boot.size;
    }
    let cfg_digest = Digest::sha256_of(&image.config);
    client
        .push_blob(
            &dst.repository,
            &cfg_digest,
            image.config.len() as u64,
            &BlobSource::Bytes(image.config.clone().into()),
            None,
        )
        .await?;
    let d = client
        .put_manifest(dst, &image.media_type, image.manifest.clone().into())
        .await?;
    rep.manifest_digest = d.to_string();
    Ok(rep)
}
