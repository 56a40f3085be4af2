//! Where a layer's bytes come from, and who hears that its entries landed.
//!
//! [`Store::ensure_layer`](crate::Store::ensure_layer) streams a layer blob
//! from a [`BlobStream`] (the registry in production, [`RegistryBlobs`]; a
//! local file in tests) and reports extraction to [`LayerEvents`] (per-file
//! readiness for the lazy file system), separately from
//! [`PullProgress`](crate::PullProgress) (bytes, bars).

use std::future::Future;
use std::ops::Deref;
use std::path::Path;
use std::pin::Pin;

use bytes::Bytes;
use lazylayer_oci::{BlobResume, Digest, OciError, RegistryClient, Repository};
use tokio::sync::mpsc;

/// A boxed future, as [`BlobStream::stream`] returns (object-safe async).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of layer blobs: where the network enters a layer fetch.
///
/// The contract is [`RegistryClient::download_blob_from`]'s: send the blob's
/// bytes after `resume.offset` (the caller holds the prefix, already fed to
/// `resume.hasher`) into `tx`, call `progress` with each chunk's length, and
/// check the digest and size of the *whole* blob at the end. The caller
/// trusts nothing it received until this returns `Ok` (the blob's length).
/// Errors are [`OciError`]s: `DigestMismatch` / `SizeMismatch` mean bad bytes
/// (the partial download is then dropped), `ConsumerGone` that `tx` closed.
pub trait BlobStream: Send + Sync {
    fn stream<'a>(
        &'a self,
        digest: &'a Digest,
        expected_size: u64,
        resume: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<u64, OciError>>;
}

/// Blobs of one repository of a registry. `C` is how the client is held:
/// `Arc<RegistryClient>` for a long-lived fetcher, `&RegistryClient` for one
/// pull.
pub struct RegistryBlobs<C> {
    pub client: C,
    pub repo: Repository,
}

impl<C> RegistryBlobs<C> {
    pub fn new(client: C, repo: Repository) -> Self {
        RegistryBlobs { client, repo }
    }
}

impl<C> BlobStream for RegistryBlobs<C>
where
    C: Deref<Target = RegistryClient> + Send + Sync,
{
    fn stream<'a>(
        &'a self,
        digest: &'a Digest,
        expected_size: u64,
        resume: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<u64, OciError>> {
        Box::pin(self.client.download_blob_from(
            &self.repo,
            digest,
            Some(expected_size),
            resume,
            tx,
            progress,
        ))
    }
}

/// Hears a layer's extraction as it happens: what a lazy file system needs to
/// serve files before the layer is complete. Kept apart from
/// [`PullProgress`](crate::PullProgress) so that a progress display that
/// forgets a hook cannot turn readiness off.
pub trait LayerEvents: Send + Sync {
    /// The layer is being extracted into `fs_dir` (a temporary directory,
    /// renamed into the store when the layer is verified).
    fn extracting(&self, fs_dir: &Path);
    /// One tar entry (`path`, relative) is fully on disk under `fs_dir`.
    fn entry_landed(&self, path: &Path);
}

/// For fetches nobody reads from while they run (full pulls, boot layers).
pub struct NoEvents;
impl LayerEvents for NoEvents {
    fn extracting(&self, _fs_dir: &Path) {}
    fn entry_landed(&self, _path: &Path) {}
}
