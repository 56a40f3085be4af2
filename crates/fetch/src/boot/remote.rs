//! Where a boot layer's bytes enter: the registry in production, a blob in
//! memory in the unit tests. The worker asks it for ranges; the state and
//! the reader never see it.

use std::ops::Range;
use std::sync::Arc;

use lazylayer_oci::{BodyStream, Digest, OciError, RangeParts, RegistryClient, Repository};
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

    /// Whether [`ChunkRemote::ranges`] may bring several ranges at once.
    fn may_send_parts(&self) -> bool {
        false
    }

    /// Ask for one range per request from now on: several in one response
    /// came in a form that could not be read.
    fn stop_asking_for_parts(&self) {}

    /// Several ranges in one response; None when the remote does not send
    /// them so (they are then asked for one by one).
    fn ranges<'a>(
        &'a self,
        _ranges: &'a [Range<u64>],
    ) -> BoxFuture<'a, Result<Option<RangeParts>, OciError>> {
        Box::pin(async { Ok(None) })
    }

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

    fn may_send_parts(&self) -> bool {
        self.client.may_send_parts(&self.repo)
    }

    fn stop_asking_for_parts(&self) {
        self.client.stop_asking_for_parts(&self.repo)
    }

    fn ranges<'a>(
        &'a self,
        ranges: &'a [Range<u64>],
    ) -> BoxFuture<'a, Result<Option<RangeParts>, OciError>> {
        Box::pin(self.client.blob_ranges(&self.repo, &self.digest, ranges))
    }

    fn registry(&self) -> Option<&str> {
        Some(&self.repo.registry)
    }
}
