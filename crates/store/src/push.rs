//! Pushing stored content to a registry: blobs the target repository has are
//! skipped, blobs in the source repository of the same registry are mounted
//! (nothing sent), the rest uploaded from the store's files.

use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{Digest, PushOutcome, Reference, RegistryClient, Repository};
use serde::Serialize;

use crate::{ImageRecord, Result, Store, StoreError};

/// What happened to each blob of a push.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PushCounts {
    pub uploaded: usize,
    pub mounted: usize,
    pub existed: usize,
    pub bytes_uploaded: u64,
}

impl PushCounts {
    fn add(&mut self, outcome: PushOutcome, size: u64) {
        match outcome {
            PushOutcome::Uploaded => {
                self.uploaded += 1;
                self.bytes_uploaded += size;
            }
            PushOutcome::Mounted => self.mounted += 1,
            PushOutcome::Existed => self.existed += 1,
        }
    }
}

/// A whole image pushed: its counts and the manifest's digest.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    #[serde(flatten)]
    pub counts: PushCounts,
    pub digest: Digest,
}

impl Store {
    /// Push `blobs` (digest, size) from the store to `to`, mounting from
    /// `from` where the registry has them there.
    pub async fn push_blobs(
        &self,
        client: &RegistryClient,
        blobs: &[(Digest, u64)],
        from: &Repository,
        to: &Repository,
    ) -> Result<PushCounts> {
        let mut counts = PushCounts::default();
        for (d, size) in blobs {
            let path = self.blob_path(d);
            if !path.is_file() {
                return Err(StoreError::BadImage {
                    reference: from.to_string(),
                    reason: format!("blob {d} is missing from the store; pull the image again"),
                });
            }
            let outcome = client
                .push_blob(to, d, *size, &BlobSource::File(path), Some(from))
                .await?;
            counts.add(outcome, *size);
        }
        Ok(counts)
    }

    /// Push a stored image to `dst`: layers and config, then the manifest
    /// byte for byte (the image keeps its digest), last, so a failure leaves
    /// no manifest pointing at missing blobs.
    pub async fn push_image(
        &self,
        client: &RegistryClient,
        src: &Reference,
        rec: &ImageRecord,
        dst: &Reference,
    ) -> Result<PushReport> {
        let mut blobs: Vec<(Digest, u64)> = rec
            .layers
            .iter()
            .map(|l| (l.digest.clone(), l.size))
            .collect();
        let cfg = self.blob_path(&rec.config_digest);
        let cfg_size = std::fs::metadata(&cfg)
            .map_err(crate::io_err(format!("config {}", rec.config_digest), &cfg))?
            .len();
        blobs.push((rec.config_digest.clone(), cfg_size));
        let counts = self
            .push_blobs(client, &blobs, &src.repository, &dst.repository)
            .await?;
        let manifest = self.read_blob(&rec.manifest_digest)?;
        let digest = client
            .put_manifest(dst, &rec.manifest_media_type, manifest.into())
            .await?;
        Ok(PushReport { counts, digest })
    }
}
