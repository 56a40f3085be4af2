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

    /// The last stream of `digest` brought bad bytes (the digest, or the
    /// layer they make, is wrong). True when another host may serve it
    /// right (a mirror sent them and is now asked last): worth one more try.
    fn distrust(&self, _digest: &Digest) -> bool {
        false
    }
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

    fn distrust(&self, digest: &Digest) -> bool {
        self.client.distrust(digest)
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

/// A blob already on local disk, e.g. a chunked boot layer assembled from
/// the ranges a lazy start fetched: streamed like a download, and checked
/// against its digest and size the same way.
pub struct LocalBlob {
    pub path: std::path::PathBuf,
}

impl BlobStream for LocalBlob {
    fn stream<'a>(
        &'a self,
        digest: &'a Digest,
        expected_size: u64,
        mut resume: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<u64, OciError>> {
        Box::pin(async move {
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let what = format!("local copy of blob {digest}");
            let io = |source| OciError::Io {
                what: format!("{what} ({})", self.path.display()),
                source,
            };
            let mut f = tokio::fs::File::open(&self.path).await.map_err(io)?;
            f.seek(std::io::SeekFrom::Start(resume.offset))
                .await
                .map_err(io)?;
            let mut total = resume.offset;
            loop {
                let mut buf = vec![0u8; 1 << 20];
                let n = f.read(&mut buf).await.map_err(io)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                resume.hasher.update(&buf);
                total += n as u64;
                progress(n as u64);
                if tx.send(Bytes::from(buf)).await.is_err() {
                    return Err(OciError::ConsumerGone { what });
                }
            }
            if total != expected_size {
                return Err(OciError::SizeMismatch {
                    what,
                    expected: expected_size,
                    actual: total,
                });
            }
            let actual = resume.hasher.finish();
            if actual != *digest {
                return Err(OciError::DigestMismatch {
                    what,
                    expected: digest.clone(),
                    actual,
                });
            }
            Ok(total)
        })
    }
}
