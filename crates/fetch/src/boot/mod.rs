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
//!
//! Split as a chunk cache is (state + worker + file): `state` says which
//! chunks are local and never blocks; `ingest` is the worker, the only one
//! that talks to the registry (through `remote`, the seam the tests feed
//! from memory); `reader` waits on the state and asks the worker, never the
//! network; `cache` is the on-disk layout and its reaping; `region` decodes
//! the index region at the blob's head.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazylayer_fs::RangedContent;
use lazylayer_index::chunks::{BootContent, ChunkCompression};
use lazylayer_index::BootIndex;
use lazylayer_layer::Compression;
use lazylayer_oci::{BodyStream, Digest, RegistryClient, Repository};
use lazylayer_store::{LayerRef, PullOptions, Store};
use lazylayer_sys::range_lock;
use tokio::sync::Semaphore;

mod cache;
mod ingest;
mod plan;
mod reader;
mod region;
mod remote;
mod state;
#[cfg(test)]
pub(crate) mod tests;
mod whole;

pub use cache::reap_chunk_caches;
pub use plan::{connections_to_open, note_registry_round_trip, CONNECTIONS_WHILE_WAITING};

use cache::{cache_dir, cached_region, load_kept, open_blob, open_cache};
use reader::BootFile;
use region::{check_region, fetch_region, RegionHead};
use remote::{ChunkRemote, RegistryChunks};
use state::{ChunkState, State};

use crate::tasks::Tasks;
use crate::FetchError;

/// Largest index region accepted (compressed and decompressed): far above
/// any real index (a 100k-path image's is a few MB), small enough to hold.
const MAX_REGION: u64 = 256 << 20;
/// Compressed bytes asked for in one Range GET at start (spans of the start
/// set are joined up to this, see `plan`), and by the background fetch of
/// the rest. Chunks are served as they arrive, so a large request delays
/// no reader; several requests share the link as one would.
const START_REQUEST: u64 = 2 << 20;
const REST_REQUEST: u64 = 4 << 20;
/// Range GETs of the start set and the prefetch in flight at once (a
/// reader's request never waits for one), for a registry near by; a far
/// one gets [`plan::IN_FLIGHT_FAR`]. Over HTTP/1.1 each is a connection of
/// its own, serving one request at a time; HTTP/2 shares one connection.
const IN_FLIGHT: usize = 8;
/// Tries of one range before its chunks count as failed, and the pauses
/// between them: the registry client's policy (with jitter), shorter than
/// its own, since a reader may be waiting on the chunk (pauses of ~0.5 s
/// and ~1 s).
fn chunk_retry() -> lazylayer_oci::retry::RetryPolicy {
    lazylayer_oci::retry::RetryPolicy::new(Duration::from_millis(500), Duration::from_secs(1), 3)
}

struct Inner {
    image: String,
    /// Where the chunks come from (the registry).
    remote: Arc<dyn ChunkRemote>,
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
    /// When the first bytes of a range of this blob came in: the start set
    /// times the link from there ([`plan::LinkEstimate::gap_measured`]).
    first_in: OnceLock<Instant>,
    /// Requests of this blob in flight at most ([`IN_FLIGHT`], more for a
    /// far registry), and the semaphore that holds them to it.
    in_flight: usize,
    slots: Arc<Semaphore>,
    /// What the index region's response told of the link (None when the
    /// region came from the cache, or too fast to time).
    link: Option<plan::LinkEstimate>,
    /// `link`'s rate is one an earlier start set measured: the start set's
    /// plan may bridge more.
    rate_kept: bool,
    /// The last start from this registry found it sending one range per
    /// response ([`plan::note_one_range`]): the start set asks for its
    /// spans one by one from the first.
    one_range: bool,
    /// Boot files copied out whole once local (passthrough opens).
    whole: whole::WholeFiles,
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

/// The boot layer [`BootChunks::open`] opens, its index region in hand.
pub struct ChunkedBoot<'a> {
    pub image: &'a str,
    pub layer: &'a LayerRef,
    pub region_len: u64,
    pub region_digest: &'a Digest,
    pub read_timeout: Duration,
    pub pull: PullOptions,
}

/// The boot layer's compression as a chunk table names it: only gzip and
/// zstd layers are chunked.
fn chunk_compression(image: &str, layer: &LayerRef) -> Result<ChunkCompression, FetchError> {
    match Compression::from_media_type(&layer.media_type) {
        Some(Compression::Gzip) => Ok(ChunkCompression::Gzip),
        Some(Compression::Zstd) => Ok(ChunkCompression::Zstd),
        _ => Err(bad(
            image,
            format!(
                "boot layer media type {} is not chunkable",
                layer.media_type
            ),
        )),
    }
}

/// Where a chunked boot layer's index region is: all the manifest says,
/// so that it can be fetched while the image's config is (one round trip
/// for both).
pub struct BootBlob<'a> {
    pub image: &'a str,
    pub client: Arc<RegistryClient>,
    pub repo: Repository,
    pub digest: &'a Digest,
    pub size: u64,
    pub region_len: u64,
    pub region_digest: &'a Digest,
    /// The region's request is the start's first to the registry (its
    /// manifest and config were kept in the store), so it opens its
    /// connection and its first byte comes a handshake's round trip late:
    /// the link's estimate halves it. At 20 ms the region read as 45 ms,
    /// far, and python3's start set went out as 44 requests, not 24.
    pub opens_connection: bool,
}

/// A boot layer's index region, fetched or found in the chunk cache, not
/// checked yet: [`BootChunks::open`] checks and decodes it.
pub struct BootRegion {
    dir: PathBuf,
    lock: lazylayer_store::FileLock,
    blob: File,
    head: RegionHead,
    remote: Arc<dyn ChunkRemote>,
}

impl BootChunks {
    /// The index region of `b`: the one an earlier start kept if it is
    /// still the one the manifest names, else one Range GET.
    pub async fn fetch_region(store: &Store, b: BootBlob<'_>) -> Result<BootRegion, FetchError> {
        let remote = Arc::new(RegistryChunks {
            client: b.client,
            repo: b.repo,
            digest: b.digest.clone(),
        });
        Self::region_with(
            store,
            b.image,
            b.digest,
            b.size,
            (b.region_len, b.region_digest),
            b.opens_connection,
            remote,
        )
        .await
    }

    /// [`BootChunks::fetch_region`] from `remote`; `region` is the index
    /// region's length and digest.
    async fn region_with(
        store: &Store,
        image: &str,
        digest: &Digest,
        size: u64,
        (region_len, region_digest): (u64, &Digest),
        opens_connection: bool,
        remote: Arc<dyn ChunkRemote>,
    ) -> Result<BootRegion, FetchError> {
        if region_len == 0 || region_len > size.min(MAX_REGION) {
            return Err(bad(
                image,
                format!("index region of {region_len} bytes in a boot layer of {size}"),
            ));
        }
        let (dir, lock) = cache_dir(store, digest)?;
        let blob = open_blob(&dir)?;
        // A peer process fetching this region writes it at the blob's head
        // before it lets go of the blob's first byte: wait for it, then
        // find it below (its lock is ours until `open` has written it).
        // Free in the common case (no peer): taken at once, no thread hop.
        if !matches!(range_lock::try_lock_range(&blob, 0, 1), Ok(true)) {
            if let Ok(held) = blob.try_clone() {
                let _ =
                    tokio::task::spawn_blocking(move || range_lock::lock_range(&held, 0, 1)).await;
            }
        }
        let head = match cached_region(&blob, region_len, region_digest) {
            // The link as the start that fetched it measured it: a peer
            // starting at the same time then plans the same requests.
            Some(region) => RegionHead {
                ranged: true,
                body: None,
                region,
                leftover: Bytes::new(),
                link: plan::LinkEstimate::load(&dir),
                rate_kept: false,
            },
            None => {
                let mut head = fetch_region(&*remote, image, region_len).await?;
                if let (true, Some(link)) = (opens_connection, head.link.as_mut()) {
                    link.first_byte /= 2;
                }
                // The region is too small to time the link well: a fast
                // rate the last start set from this registry measured plans
                // this one (only start sets' rates are kept for a registry).
                // At 100 Mbit/s, wider plans only cost bytes: python3 and
                // nginx at 20 ms fetched 0.8-1 MB more and started later.
                let registry = remote.registry();
                let on_file =
                    registry.and_then(|r| plan::LinkEstimate::load_for_registry(store, r));
                let kept = on_file
                    .and_then(|l| l.bytes_per_sec)
                    .filter(|&rate| plan::fast(rate));
                if let (Some(link), Some(rate)) = (head.link.as_mut(), kept) {
                    link.bytes_per_sec = Some(rate);
                    head.rate_kept = true;
                }
                if let Some(link) = head.link {
                    link.save(&dir);
                    if let Some(registry) = registry {
                        // The region's round trip, beside the rate on file
                        // (read once, above).
                        let untimed = plan::LinkEstimate {
                            bytes_per_sec: None,
                            ..link
                        };
                        untimed
                            .with_rate_of(on_file)
                            .write_for_registry(store, registry);
                    }
                }
                head
            }
        };
        Ok(BootRegion {
            dir,
            lock,
            blob,
            head,
            remote,
        })
    }

    /// [`BootChunks::fetch_region`] then [`BootChunks::open`], its ranges from `remote`.
    #[cfg(test)]
    pub(crate) async fn open_with(
        store: &Store,
        b: ChunkedBoot<'_>,
        remote: Arc<dyn ChunkRemote>,
    ) -> Result<(BootIndex, BootChunks), FetchError> {
        let region = Self::region_with(
            store,
            b.image,
            &b.layer.digest,
            b.layer.size,
            (b.region_len, b.region_digest),
            false,
            remote,
        )
        .await?;
        Self::open(store, region, b)
    }

    /// Check `region` against the manifest's digest, decode the index, and
    /// start fetching the chunks the trace read. Call in a runtime.
    pub fn open(
        store: &Store,
        region: BootRegion,
        b: ChunkedBoot<'_>,
    ) -> Result<(BootIndex, BootChunks), FetchError> {
        let image = b.image;
        let compression = chunk_compression(image, b.layer)?;
        let BootRegion {
            dir,
            lock,
            blob,
            head,
            remote,
        } = region;
        let (index, content) = check_region(
            image,
            &head.region,
            b.region_digest,
            compression,
            b.layer.size,
        )?;
        let (cache, present) = open_cache(&dir, &content, b.layer.size, &blob, &head.region)?;
        let _ = range_lock::unlock_range(&blob, 0, 1);
        let offsets = content.chunk_offsets();
        // Chunks an earlier start kept: trusted only after their digest is
        // checked again, and their content rewritten from the checked bytes.
        let kept = load_kept(&content, &offsets, b.region_len, &blob, &cache, &present);
        let fetched = match head.body {
            Some(_) => head.region.len() as u64 + head.leftover.len() as u64,
            None => 0,
        };
        let in_flight = head.link.map_or(IN_FLIGHT, |l| l.in_flight());
        let one_range = remote
            .registry()
            .is_some_and(|r| plan::one_range_noted(store, r));
        let chunks = BootChunks {
            inner: Arc::new(Inner {
                image: image.to_string(),
                remote,
                layer: b.layer.clone(),
                store: store.clone(),
                pull: b.pull,
                region_len: b.region_len,
                content,
                offsets,
                dir,
                cache,
                blob,
                present,
                _lock: lock,
                state: Mutex::new(State {
                    chunks: kept,
                    streaming: !head.ranged,
                    stored: false,
                    ingesting: false,
                    rest_started: false,
                    queued: Vec::new(),
                }),
                changed: Condvar::new(),
                read_timeout: b.read_timeout,
                rt: tokio::runtime::Handle::current(),
                fetched: AtomicU64::new(fetched),
                first_in: OnceLock::new(),
                in_flight,
                slots: Arc::new(Semaphore::new(in_flight)),
                link: head.link,
                rate_kept: head.rate_kept,
                one_range,
                whole: whole::WholeFiles::default(),
                background: Tasks::default(),
            }),
        };
        chunks.start_workers(head.ranged, head.body, head.leftover);
        Ok((index, chunks))
    }

    /// Set the worker going: the storing alone when every chunk was kept,
    /// the whole blob's stream when the registry ignored Range, else the
    /// start list.
    fn start_workers(&self, ranged: bool, body: Option<BodyStream>, leftover: Bytes) {
        let image = self.inner.image.as_str();
        {
            // Every chunk kept by earlier starts: only the storing is left.
            let mut s = self.inner.state.lock().unwrap();
            if s.chunks.iter().all(|c| *c == ChunkState::Present) && !s.ingesting {
                s.ingesting = true;
                drop(s);
                let me = self.clone();
                self.inner.rt.spawn(async move { me.ingest().await });
            }
        }
        match body {
            Some(body) if !ranged => {
                tracing::info!(
                    image,
                    "the registry ignored Range: streaming the whole boot layer"
                );
                let me = self.clone();
                self.inner
                    .rt
                    .spawn(async move { me.stream_all(leftover, body).await });
            }
            _ => {
                let me = self.clone();
                let t = self.inner.rt.spawn(async move { me.fetch_start().await });
                self.track(t);
            }
        }
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
        s.queued.clear();
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
