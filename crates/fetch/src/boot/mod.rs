//! A chunked boot layer read lazily (index format 4, see
//! `lazylayer_index::chunks`): the index region first (one Range GET,
//! checked against the manifest's digest), then the chunks the traced
//! workload read, in the order it read them, then, once the start has
//! settled, the rest. Every chunk is checked against its SHA-256 from the
//! index before it is decompressed; a reader waits only for the chunks that
//! hold its bytes, for a bounded time.
//!
//! A registry that ignores Range answers the first request with the whole
//! blob: it is then read as one stream, chunk after chunk, and readers wait
//! for theirs to pass by. Either way, when every chunk is local the blob is
//! assembled, verified against its digest and stored as an ordinary layer,
//! so the next start needs no network.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_fs::RangedContent;
use lazylayer_layer::index::chunks::{BootContent, ChunkCompression};
use lazylayer_layer::index::BootIndex;
use lazylayer_layer::Compression;
use lazylayer_oci::{Digest, RegistryClient, Repository};
use lazylayer_store::{LayerRef, PullOptions, Store};
use tokio::sync::Semaphore;

mod cache;
mod ingest;
mod reader;
mod region;
mod state;

pub use cache::reap_chunk_caches;

use cache::{cache_dir, cached_region, load_kept};
use reader::BootFile;
use region::decode_region;
use state::{ChunkState, State};

use crate::tasks::Tasks;
use crate::FetchError;

/// Largest index region accepted (compressed and decompressed): far above
/// any real index (a 100k-path image's is a few MB), small enough to hold.
const MAX_REGION: u64 = 256 << 20;
/// Compressed bytes asked for in one Range GET at start (adjacent chunks
/// are coalesced up to this), and by the background fetch of the rest.
const START_REQUEST: u64 = 256 << 10;
const REST_REQUEST: u64 = 4 << 20;
/// Range GETs of the start list and the prefetch in flight at once (a
/// reader's request never waits for one).
const IN_FLIGHT: usize = 3;
/// Tries of one range before its chunks count as failed.
const TRIES: u32 = 3;

struct Inner {
    image: String,
    client: Arc<RegistryClient>,
    repo: Repository,
    layer: LayerRef,
    store: Store,
    pull: PullOptions,
    region_len: u64,
    content: BootContent,
    /// Chunk starts relative to the content's start, and the end.
    offsets: Vec<u64>,
    dir: PathBuf,
    /// The uncompressed content tar, filled chunk by chunk (sparse).
    cache: File,
    /// The compressed blob, filled range by range (sparse): stored as a
    /// layer once complete.
    blob: File,
    /// One byte a chunk, 1 once its bytes are written: what the next start
    /// of the image may reuse (after checking them again).
    present: File,
    /// Shared while the cache is in use: prune takes it exclusively.
    _lock: lazylayer_store::FileLock,
    state: Mutex<State>,
    changed: Condvar,
    read_timeout: Duration,
    rt: tokio::runtime::Handle,
    fetched: AtomicU64,
    slots: Arc<Semaphore>,
    /// The start-list and prefetch tasks and their range GETs, stopped when
    /// the image's last user goes (readers' own GETs are not here).
    background: Tasks,
}

/// The content of a chunked boot layer, fetched by ranges. Cheap to clone.
#[derive(Clone)]
pub struct BootChunks {
    inner: Arc<Inner>,
}

fn bad(image: &str, reason: impl Into<String>) -> FetchError {
    FetchError::BadImage {
        image: image.to_string(),
        reason: reason.into(),
    }
}

/// What [`BootChunks::open`] needs to know of the image.
pub struct ChunkedBoot<'a> {
    pub image: &'a str,
    pub client: Arc<RegistryClient>,
    pub repo: Repository,
    pub layer: &'a LayerRef,
    pub region_len: u64,
    pub region_digest: &'a Digest,
    pub read_timeout: Duration,
    pub pull: PullOptions,
}

impl BootChunks {
    /// Fetch and check the index region, decode the index, and start
    /// fetching the chunks the trace read. Returns once the index is in.
    pub async fn open(
        store: &Store,
        b: ChunkedBoot<'_>,
    ) -> Result<(BootIndex, BootChunks), FetchError> {
        let image = b.image;
        let compression = match Compression::from_media_type(&b.layer.media_type) {
            Some(Compression::Gzip) => ChunkCompression::Gzip,
            Some(Compression::Zstd) => ChunkCompression::Zstd,
            _ => {
                return Err(bad(
                    image,
                    format!(
                        "boot layer media type {} is not chunkable",
                        b.layer.media_type
                    ),
                ))
            }
        };
        if b.region_len == 0 || b.region_len > b.layer.size.min(MAX_REGION) {
            return Err(bad(
                image,
                format!(
                    "index region of {} bytes in a boot layer of {}",
                    b.region_len, b.layer.size
                ),
            ));
        }
        let (dir, lock) = cache_dir(store, &b.layer.digest)?;
        let io = |what: &str, p: &Path| {
            let (what, p) = (what.to_string(), p.to_path_buf());
            move |source| FetchError::Io {
                what,
                path: p,
                source,
            }
        };
        let blob_path = dir.join("blob");
        let blob = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&blob_path)
            .map_err(io("opening the boot blob", &blob_path))?;
        // The region an earlier start of this image kept, if it still is
        // the one the manifest names; else from the registry.
        let cached = cached_region(&blob, b.region_len, b.region_digest);
        let (ranged, body, region, leftover) = match cached {
            Some(region) => (true, None, region, Bytes::new()),
            None => {
                let (ranged, mut body) = b
                    .client
                    .blob_range_stream(&b.repo, &b.layer.digest, 0, b.region_len)
                    .await?;
                let mut got = Vec::with_capacity(b.region_len as usize);
                while (got.len() as u64) < b.region_len {
                    match body.next().await {
                        Some(c) => got.extend_from_slice(&c?),
                        None => {
                            return Err(bad(
                                image,
                                format!(
                                    "the registry sent {} of the index region's {} bytes",
                                    got.len(),
                                    b.region_len
                                ),
                            ))
                        }
                    }
                }
                let leftover = Bytes::from(got.split_off(b.region_len as usize));
                (ranged, Some(body), got, leftover)
            }
        };
        let actual = Digest::sha256_of(&region);
        if actual != *b.region_digest {
            return Err(bad(
                image,
                format!(
                    "the boot index region is {actual}, the manifest says {}: refusing it",
                    b.region_digest
                ),
            ));
        }
        let index = decode_region(image, &region, compression)?;
        let content = index
            .boot
            .clone()
            .ok_or_else(|| bad(image, "the boot index has no chunk table"))?;
        if content.compression != compression {
            return Err(bad(
                image,
                "the chunk table and the layer's media type disagree on compression",
            ));
        }
        if b.region_len + content.compressed_len() != b.layer.size {
            return Err(bad(
                image,
                format!(
                    "index region ({}) and chunks ({}) do not add up to the boot layer's {} bytes",
                    b.region_len,
                    content.compressed_len(),
                    b.layer.size
                ),
            ));
        }
        let open_rw = |name: &str, len: u64| -> Result<File, FetchError> {
            let p = dir.join(name);
            let f = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&p)
                .map_err(io("opening the boot chunk cache", &p))?;
            if f.metadata()
                .map_err(io("reading the boot chunk cache", &p))?
                .len()
                != len
            {
                f.set_len(len)
                    .map_err(io("sizing the boot chunk cache", &p))?;
            }
            Ok(f)
        };
        let n = content.chunks.len();
        let cache = open_rw("content", content.content_len)?;
        let present_file = open_rw("present", n as u64)?;
        blob.set_len(b.layer.size)
            .map_err(io("sizing the boot blob", &blob_path))?;
        blob.write_all_at(&region, 0)
            .map_err(io("writing the boot blob", &blob_path))?;
        let offsets = content.chunk_offsets();
        // Chunks an earlier start kept: trusted only after their digest is
        // checked again, and their content rewritten from the checked bytes.
        let kept = load_kept(
            &content,
            &offsets,
            b.region_len,
            &blob,
            &cache,
            &present_file,
        );
        let chunks = BootChunks {
            inner: Arc::new(Inner {
                image: image.to_string(),
                client: b.client,
                repo: b.repo,
                layer: b.layer.clone(),
                store: store.clone(),
                pull: b.pull,
                region_len: b.region_len,
                content,
                offsets,
                dir,
                cache,
                blob,
                present: present_file,
                _lock: lock,
                state: Mutex::new(State {
                    chunks: kept,
                    streaming: !ranged,
                    stored: false,
                    ingesting: false,
                    rest_started: false,
                }),
                changed: Condvar::new(),
                read_timeout: b.read_timeout,
                rt: tokio::runtime::Handle::current(),
                fetched: AtomicU64::new(if body.is_some() {
                    region.len() as u64 + leftover.len() as u64
                } else {
                    0
                }),
                slots: Arc::new(Semaphore::new(IN_FLIGHT)),
                background: Tasks::default(),
            }),
        };
        {
            // Every chunk kept by earlier starts: only the storing is left.
            let mut s = chunks.inner.state.lock().unwrap();
            if s.chunks.iter().all(|c| *c == ChunkState::Present) && !s.ingesting {
                s.ingesting = true;
                drop(s);
                let me = chunks.clone();
                chunks.inner.rt.spawn(async move { me.ingest().await });
            }
        }
        match body {
            Some(body) if !ranged => {
                tracing::info!(
                    image,
                    "the registry ignored Range: streaming the whole boot layer"
                );
                let me = chunks.clone();
                chunks
                    .inner
                    .rt
                    .spawn(async move { me.stream_all(leftover, body).await });
            }
            _ => {
                let me = chunks.clone();
                let t = chunks.inner.rt.spawn(async move { me.fetch_start().await });
                chunks.track(t);
            }
        }
        Ok((index, chunks))
    }

    /// Remember a background task for [`BootChunks::stop_background`].
    fn track(&self, t: tokio::task::JoinHandle<()>) {
        self.inner.background.track(t);
    }

    /// The image's last user is gone: stop fetching the start list and the
    /// prefetch of the rest, range GETs in flight included (their chunks
    /// are absent again; what arrived stays for the next start). A reader's
    /// own fetch finishes. [`BootChunks::resume_background`] undoes it.
    pub fn stop_background(&self) {
        let Some(running) = self.inner.background.stop() else {
            return;
        };
        let mut s = self.inner.state.lock().unwrap();
        s.rest_started = false;
        for c in s.chunks.iter_mut() {
            if *c == ChunkState::Fetching {
                *c = ChunkState::Absent;
            }
        }
        drop(s);
        self.inner.changed.notify_all();
        tracing::debug!(image = %self.inner.image, running, "boot chunk prefetch stopped");
    }

    /// A new user of an image whose background fetches were stopped: fetch
    /// the start list again (the rest follows with [`BootChunks::start_rest`]).
    pub fn resume_background(&self) {
        if !self.inner.background.restart() {
            return;
        }
        let me = self.clone();
        let t = self.inner.rt.spawn(async move { me.fetch_start().await });
        self.track(t);
    }

    /// The content for entry `idx` (an in-boot regular file), if it has any.
    pub(crate) fn file(&self, idx: u32, size: u64) -> Option<Arc<dyn RangedContent>> {
        let start = self.inner.content.file_offset(idx)?;
        Some(Arc::new(BootFile {
            chunks: self.clone(),
            start,
            size,
        }))
    }

    /// Compressed bytes received from the registry.
    pub fn bytes_fetched(&self) -> u64 {
        self.inner.fetched.load(Ordering::Relaxed)
    }

    /// True once the whole boot layer is verified and stored as a layer.
    pub fn stored(&self) -> bool {
        self.inner.state.lock().unwrap().stored
    }

    /// True once every chunk of the start list is local (or failed): the
    /// start's own bytes are in, and a prefetch no longer competes with them.
    pub fn start_list_done(&self) -> bool {
        let s = self.inner.state.lock().unwrap();
        self.inner.content.start.iter().all(|&c| {
            matches!(
                s.chunks[c as usize],
                ChunkState::Present | ChunkState::Failed(_) | ChunkState::Unreachable(_)
            )
        })
    }

    /// True when a chunk failed for good (the image cannot complete); not
    /// for chunks the registry could not be reached for (they may come yet).
    pub fn failed(&self) -> bool {
        let s = self.inner.state.lock().unwrap();
        s.chunks.iter().any(|c| matches!(c, ChunkState::Failed(_)))
    }
}
