//! Where a boot layer's bytes enter: the registry in production, a blob in
//! memory in the unit tests. The worker asks it for ranges; the state and
//! the reader never see it.

use std::sync::Arc;

use lazylayer_oci::{BodyStream, Digest, OciError, RegistryClient, Repository};
use lazylayer_store::BoxFuture;

/// Ranges of one boot layer blob.
pub(crate) trait ChunkRemote: Send + Sync {
    /// `len` bytes from `from` as a stream; `false` when the registry
    /// ignored Range and the stream is the whole blob.
    fn range_stream(
        &self,
        from: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<(bool, BodyStream), OciError>>;

    /// The registry the ranges come from, as references name it: what a
    /// measured link is filed under for the next start from it.
    fn registry(&self) -> Option<&str> {
        None
    }
}

/// A boot layer blob in a registry.
pub(crate) struct RegistryChunks {
    pub client: Arc<RegistryClient>,
    pub repo: Repository,
    pub digest: Digest,
}

impl ChunkRemote for RegistryChunks {
    fn range_stream(
        &self,
        from: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<(bool, BodyStream), OciError>> {
        Box::pin(
            self.client
                .blob_range_stream(&self.repo, &self.digest, from, len),
        )
    }

    fn registry(&self) -> Option<&str> {
        Some(&self.repo.registry)
    }
}
