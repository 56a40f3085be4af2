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
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_fs::RangedContent;
use lazylayer_index::chunks::{BootContent, ChunkCompression};
use lazylayer_index::{BootIndex, INDEX_FILE_NAME};
use lazylayer_layer::chunked::decompress_piece;
use lazylayer_layer::Compression;
use lazylayer_oci::{BodyStream, Digest, RegistryClient, Repository};
use lazylayer_store::{LayerRef, LocalBlob, NoEvents, NoProgress, PullOptions, Store};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

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

#[derive(Debug, Clone, PartialEq, Eq)]
enum ChunkState {
    Absent,
    Fetching,
    Present,
    /// Bad bytes (or none to be had): never fetched again.
    Failed(String),
    /// The registry could not be reached: fetched again when a reader asks
    /// (failing at once while the host's breaker is open).
    Unreachable(String),
}

struct State {
    chunks: Vec<ChunkState>,
    /// The registry ignored Range: the whole blob streams in, in order.
    streaming: bool,
    /// The whole blob is verified and in the store as a layer.
    stored: bool,
    ingesting: bool,
    rest_started: bool,
}

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
pub(crate) struct ChunkedBoot<'a> {
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
    pub(crate) async fn open(
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

    /// Fetch every chunk not yet local, in order, in the background; then
    /// store the whole layer. Idempotent.
    pub fn start_rest(&self) {
        {
            let mut s = self.inner.state.lock().unwrap();
            if s.rest_started || s.streaming {
                return;
            }
            s.rest_started = true;
        }
        if self.inner.background.stopped() {
            self.inner.state.lock().unwrap().rest_started = false;
            return;
        }
        let me = self.clone();
        let t = self.inner.rt.spawn(async move {
            let all: Vec<u32> = (0..me.inner.content.chunks.len() as u32).collect();
            me.fetch_list(&all, REST_REQUEST).await;
        });
        self.track(t);
    }

    /// The chunks the trace read, in blob order: the content is laid out in
    /// first-access order of files, so this is close to the order they are
    /// needed in, and adjacent chunks coalesce into few requests (python3:
    /// 1176 chunks in 109 runs; in first-access order of pages, 754 runs,
    /// which cost a round trip each and made a 100 Mbit/s start
    /// latency-bound). A reader that needs a chunk sooner asks for it itself.
    async fn fetch_start(&self) {
        let mut start = self.inner.content.start.clone();
        start.sort_unstable();
        start.dedup();
        self.fetch_list(&start, START_REQUEST).await;
    }

    /// Fetch the chunks of `list` that are absent, in its order, adjacent
    /// ones coalesced into Range GETs of up to `max` bytes, [`IN_FLIGHT`] at
    /// a time.
    async fn fetch_list(&self, list: &[u32], max: u64) {
        let mut i = 0;
        while i < list.len() {
            let Ok(permit) = self.inner.slots.clone().acquire_owned().await else {
                return;
            };
            if self.inner.background.stopped() {
                return;
            }
            // The run: list[i], list[i]+1, ... while they follow in the list
            // and are absent, up to `max` bytes.
            let run = {
                let mut s = self.inner.state.lock().unwrap();
                let first = list[i];
                i += 1;
                if s.chunks[first as usize] != ChunkState::Absent {
                    continue;
                }
                let mut end = first + 1;
                while i < list.len()
                    && list[i] == end
                    && s.chunks[end as usize] == ChunkState::Absent
                    && self.inner.offsets[end as usize + 1] - self.inner.offsets[first as usize]
                        <= max
                {
                    end += 1;
                    i += 1;
                }
                for c in first..end {
                    s.chunks[c as usize] = ChunkState::Fetching;
                }
                first..end
            };
            let me = self.clone();
            let t = self.inner.rt.spawn(async move {
                me.fetch_range(run).await;
                drop(permit);
            });
            self.track(t);
        }
    }

    /// Mark the absent chunks of `range` as fetching and fetch them at once
    /// (a reader waits for them), one Range GET per run.
    fn demand(&self, range: std::ops::Range<u32>) {
        let mut runs = Vec::new();
        {
            let mut s = self.inner.state.lock().unwrap();
            if s.streaming {
                // They pass by in the stream; a second copy would only compete with it.
                return;
            }
            // Chunks the registry could not be reached for are asked again.
            let wanted =
                |c: &ChunkState| matches!(c, ChunkState::Absent | ChunkState::Unreachable(_));
            let mut c = range.start;
            while c < range.end {
                if !wanted(&s.chunks[c as usize]) {
                    c += 1;
                    continue;
                }
                let first = c;
                while c < range.end && wanted(&s.chunks[c as usize]) {
                    s.chunks[c as usize] = ChunkState::Fetching;
                    c += 1;
                }
                runs.push(first..c);
            }
        }
        for run in runs {
            let me = self.clone();
            self.inner
                .rt
                .spawn(async move { me.fetch_range(run).await });
        }
    }

    /// One Range GET for chunks `run` (adjacent), retried; each chunk checked
    /// and stored as it is cut from the response.
    async fn fetch_range(&self, run: std::ops::Range<u32>) {
        let inner = &self.inner;
        let from = inner.region_len + inner.offsets[run.start as usize];
        let len = inner.offsets[run.end as usize] - inner.offsets[run.start as usize];
        let mut last_err = String::new();
        let mut network = false;
        for attempt in 0..TRIES {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            match inner
                .client
                .get_blob_range(&inner.repo, &inner.layer.digest, from, len)
                .await
            {
                Ok(bytes) => {
                    inner
                        .fetched
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    for c in run.clone() {
                        let a = (inner.offsets[c as usize] - inner.offsets[run.start as usize])
                            as usize;
                        let b = (inner.offsets[c as usize + 1] - inner.offsets[run.start as usize])
                            as usize;
                        self.accept(c, &bytes[a..b]);
                    }
                    return;
                }
                Err(e) => {
                    last_err = e.to_string();
                    network = e.is_network();
                    tracing::debug!(image = %inner.image, chunks = ?run, attempt, error = %last_err, "boot chunk fetch failed");
                    // The client gave up on the host already: another try
                    // here would only fail the same way.
                    if network {
                        break;
                    }
                }
            }
        }
        let mut s = inner.state.lock().unwrap();
        for c in run.clone() {
            if s.chunks[c as usize] == ChunkState::Fetching {
                let msg = format!(
                    "chunk {c} of boot layer {} of {}: {last_err}",
                    inner.layer.digest, inner.image
                );
                s.chunks[c as usize] = if network {
                    ChunkState::Unreachable(msg)
                } else {
                    ChunkState::Failed(msg)
                };
            }
        }
        drop(s);
        tracing::error!(image = %inner.image, layer = %inner.layer.digest, chunks = ?run, error = %last_err, "boot chunks could not be fetched");
        inner.changed.notify_all();
    }

    /// The whole blob as one stream (the registry ignored Range): cut it
    /// into chunks as it passes.
    async fn stream_all(&self, mut pending: Bytes, mut body: BodyStream) {
        let inner = &self.inner;
        let mut buf: Vec<u8> = Vec::new();
        for c in 0..inner.content.chunks.len() as u32 {
            let need = (inner.offsets[c as usize + 1] - inner.offsets[c as usize]) as usize;
            while buf.len() < need {
                if !pending.is_empty() {
                    buf.extend_from_slice(&pending);
                    pending = Bytes::new();
                    continue;
                }
                match body.next().await {
                    Some(Ok(b)) => {
                        inner.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                        buf.extend_from_slice(&b);
                    }
                    other => {
                        let why = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "the response ended early".into(),
                        };
                        tracing::warn!(image = %inner.image, chunk = c, error = %why, "the boot layer stream broke; fetching the rest by ranges");
                        inner.state.lock().unwrap().streaming = false;
                        inner.changed.notify_all();
                        // Readers waiting now ask for their chunks themselves.
                        self.start_rest();
                        return;
                    }
                }
            }
            let rest = buf.split_off(need);
            let present = inner.state.lock().unwrap().chunks[c as usize] == ChunkState::Present;
            if !present {
                self.accept(c, &buf);
            }
            buf = rest;
        }
        inner.state.lock().unwrap().streaming = false;
        inner.changed.notify_all();
    }

    /// Check chunk `c`'s compressed bytes, decompress them into the cache,
    /// keep them for the blob, and wake its readers.
    fn accept(&self, c: u32, compressed: &[u8]) {
        let inner = &self.inner;
        let meta = &inner.content.chunks[c as usize];
        let result = if Sha256::digest(compressed).as_slice() != meta.sha256 {
            Err(format!(
                "chunk {c} of boot layer {} of {} does not match its digest in the index: the registry sent other bytes",
                inner.layer.digest, inner.image
            ))
        } else {
            decompress_piece(
                compressed,
                inner.content.compression,
                inner.content.chunk_len(c) as usize,
            )
            .map_err(|e| {
                format!(
                    "chunk {c} of boot layer {} of {}: {e}",
                    inner.layer.digest, inner.image
                )
            })
            .and_then(|data| {
                inner
                    .cache
                    .write_all_at(&data, u64::from(c) * u64::from(inner.content.chunk_size))
                    .and_then(|_| {
                        inner
                            .blob
                            .write_all_at(compressed, inner.region_len + inner.offsets[c as usize])
                    })
                    .and_then(|_| inner.present.write_all_at(&[1], u64::from(c)))
                    .map_err(|e| format!("writing boot chunk {c} in {}: {e}", inner.dir.display()))
            })
        };
        let mut s = inner.state.lock().unwrap();
        let complete = match result {
            Ok(()) => {
                s.chunks[c as usize] = ChunkState::Present;
                let done = s.chunks.iter().all(|x| *x == ChunkState::Present);
                let go = done && !s.ingesting && !s.stored;
                if go {
                    s.ingesting = true;
                }
                go
            }
            Err(msg) => {
                tracing::error!(image = %inner.image, error = %msg, "boot chunk refused");
                s.chunks[c as usize] = ChunkState::Failed(msg);
                false
            }
        };
        drop(s);
        inner.changed.notify_all();
        if complete {
            let me = self.clone();
            inner.rt.spawn(async move { me.ingest().await });
        }
    }

    /// Every chunk is local: store the assembled blob as a layer (verified
    /// against its digest on the way), so the next start is offline.
    async fn ingest(&self) {
        let inner = &self.inner;
        let src = LocalBlob {
            path: inner.dir.join("blob"),
        };
        let r = inner
            .store
            .ensure_layer(
                &src,
                &inner.layer,
                &inner.pull,
                Arc::new(NoProgress),
                Arc::new(NoEvents),
            )
            .await;
        let mut s = inner.state.lock().unwrap();
        s.ingesting = false;
        match r {
            Ok(_) => {
                s.stored = true;
                tracing::info!(image = %inner.image, "boot layer complete and stored");
            }
            Err(e) => {
                tracing::warn!(image = %inner.image, error = %e, "storing the assembled boot layer");
            }
        }
        drop(s);
        inner.changed.notify_all();
    }

    /// Read `buf.len()` content bytes at `off` if every chunk is local;
    /// `None` (and the missing chunks asked for) otherwise.
    fn try_read(&self, off: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let range = self.inner.content.chunks_covering(off, buf.len() as u64);
        let verdict = {
            let s = self.inner.state.lock().unwrap();
            let retry = range
                .clone()
                .any(|c| matches!(s.chunks[c as usize], ChunkState::Unreachable(_)));
            // Asked again below, and waited for in `read`.
            (!retry).then(|| verdict(&s, range.clone())).flatten()
        };
        match verdict {
            Some(Ok(())) => Some(self.inner.cache.read_exact_at(buf, off)),
            Some(Err(e)) => Some(Err(e)),
            None => {
                self.demand(range);
                None
            }
        }
    }

    /// Read, waiting (at most the read timeout) for the chunks.
    fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let inner = &self.inner;
        let range = inner.content.chunks_covering(off, buf.len() as u64);
        self.demand(range.clone());
        let deadline = Instant::now() + inner.read_timeout;
        let mut s = inner.state.lock().unwrap();
        loop {
            if let Some(v) = verdict(&s, range.clone()) {
                drop(s);
                v?;
                return inner.cache.read_exact_at(buf, off);
            }
            // The stream broke meanwhile: ask for the chunks ourselves.
            if !s.streaming
                && range
                    .clone()
                    .any(|c| s.chunks[c as usize] == ChunkState::Absent)
            {
                drop(s);
                self.demand(range.clone());
                s = inner.state.lock().unwrap();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "waited {:?} for chunks {range:?} of boot layer {} of {}",
                        inner.read_timeout, inner.layer.digest, inner.image
                    ),
                ));
            }
            s = inner.changed.wait_timeout(s, deadline - now).unwrap().0;
        }
    }
}

/// Whether chunks `range` can be read: all present (Ok), one failed (the
/// error: InvalidData for bad bytes, which the file system logs as refused
/// content; HostUnreachable when the registry could not be reached), or not yet.
fn verdict(s: &State, range: std::ops::Range<u32>) -> Option<io::Result<()>> {
    let mut all = true;
    for c in range {
        match &s.chunks[c as usize] {
            ChunkState::Present => {}
            ChunkState::Failed(m) => {
                return Some(Err(io::Error::new(io::ErrorKind::InvalidData, m.clone())))
            }
            ChunkState::Unreachable(m) => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::HostUnreachable,
                    m.clone(),
                )))
            }
            _ => all = false,
        }
    }
    all.then_some(Ok(()))
}

/// Remove boot chunk caches no process uses (`<store root>/chunks/<hex>`):
/// with `all`, every one (prune); else those whose boot layer is stored whole
/// (they will not be read again).
pub fn reap_chunk_caches(store_root: &Path, all: bool) -> usize {
    let Ok(rd) = std::fs::read_dir(store_root.join("chunks")) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let dir = e.path();
        let stored = store_root
            .join("layers/sha256")
            .join(e.file_name())
            .join("layer.json")
            .is_file();
        if !all && !stored {
            continue;
        }
        // In use: a start holds the lock shared.
        let Ok(lock) = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
        else {
            continue;
        };
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                removed += 1;
                tracing::debug!(dir = %dir.display(), "removed a boot chunk cache");
            }
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "removing a boot chunk cache")
            }
        }
    }
    removed
}

/// The private cache directory of boot layer `digest`, `<store>/chunks/<hex>`,
/// locked shared for this start (a prune removing it meanwhile is noticed:
/// the lock file is then gone, and the directory is made anew).
fn cache_dir(
    store: &Store,
    digest: &Digest,
) -> Result<(PathBuf, lazylayer_store::FileLock), FetchError> {
    use std::os::unix::fs::MetadataExt;
    let base = store.root().join("chunks");
    let dir = base.join(digest.hex());
    let err = |what: &str, path: &Path| {
        let (what, path) = (what.to_string(), path.to_path_buf());
        move |source| FetchError::Io { what, path, source }
    };
    for _ in 0..3 {
        lazylayer_store::create_private_dir(&base)
            .and_then(|_| lazylayer_store::create_private_dir(&dir))
            .map_err(err("creating the chunk cache directory", &dir))?;
        let lock_path = dir.join("lock");
        let lock = lazylayer_store::FileLock::shared(&lock_path)?;
        // Still the lock file at that path: not removed by a prune while we
        // waited for it.
        if std::fs::metadata(&lock_path).is_ok_and(|m| m.nlink() > 0) {
            return Ok((dir, lock));
        }
    }
    Err(FetchError::Io {
        what: "locking the chunk cache (removed under us three times)".into(),
        path: dir,
        source: io::Error::other("cache directory keeps disappearing"),
    })
}

/// The index region kept in `blob` by an earlier start, if its bytes are
/// the ones the manifest names.
fn cached_region(blob: &File, len: u64, digest: &Digest) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    blob.read_exact_at(&mut buf, 0).ok()?;
    (Digest::sha256_of(&buf) == *digest).then_some(buf)
}

/// The chunk states at open: chunks marked present whose kept bytes still
/// match their digest (their content rewritten from those bytes) are
/// present, the rest absent (and unmarked).
fn load_kept(
    content: &BootContent,
    offsets: &[u64],
    region_len: u64,
    blob: &File,
    cache: &File,
    present: &File,
) -> Vec<ChunkState> {
    let n = content.chunks.len();
    let mut marks = vec![0u8; n];
    if present.read_exact_at(&mut marks, 0).is_err() {
        marks.fill(0);
    }
    let mut out = vec![ChunkState::Absent; n];
    let mut kept = 0usize;
    for c in 0..n {
        if marks[c] != 1 {
            continue;
        }
        let meta = &content.chunks[c];
        let mut buf = vec![0u8; meta.compressed_len as usize];
        let ok = blob
            .read_exact_at(&mut buf, region_len + offsets[c])
            .is_ok()
            && Sha256::digest(&buf).as_slice() == meta.sha256
            && decompress_piece(
                &buf,
                content.compression,
                content.chunk_len(c as u32) as usize,
            )
            .ok()
            .is_some_and(|data| {
                cache
                    .write_all_at(&data, c as u64 * u64::from(content.chunk_size))
                    .is_ok()
            });
        if ok {
            out[c] = ChunkState::Present;
            kept += 1;
        } else {
            let _ = present.write_all_at(&[0], c as u64);
        }
    }
    if kept > 0 {
        tracing::debug!(kept, chunks = n, "boot chunks kept by an earlier start");
    }
    out
}

/// The index region: one tar entry, the index file, compressed as one piece.
fn decode_region(image: &str, region: &[u8], c: ChunkCompression) -> Result<BootIndex, FetchError> {
    let tar = lazylayer_layer::chunked::decompress_bounded(region, c, MAX_REGION)
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    let mut a = tar::Archive::new(&tar[..]);
    let mut entries = a
        .entries()
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    let mut e = entries
        .next()
        .ok_or_else(|| bad(image, "the boot index region holds no entry"))?
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    if &*e.path_bytes() != INDEX_FILE_NAME.as_bytes()
        || e.header().entry_type() != tar::EntryType::Regular
    {
        return Err(bad(
            image,
            format!(
                "the boot index region holds {}, not the index",
                String::from_utf8_lossy(&e.path_bytes())
            ),
        ));
    }
    let mut bytes = Vec::new();
    e.read_to_end(&mut bytes)
        .map_err(|e| bad(image, format!("the boot index region: {e}")))?;
    BootIndex::decode(&bytes).map_err(|source| FetchError::Index {
        image: image.to_string(),
        source,
    })
}

/// One boot file's bytes: `size` bytes at `start` of the content tar.
struct BootFile {
    chunks: BootChunks,
    start: u64,
    size: u64,
}

impl BootFile {
    fn clamp(&self, buf_len: usize, offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf_len as u64) > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the file's end",
            ));
        }
        Ok(())
    }
}

impl RangedContent for BootFile {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = self.clamp(buf.len(), offset) {
            return Some(Err(e));
        }
        if buf.is_empty() {
            return Some(Ok(()));
        }
        self.chunks.try_read(self.start + offset, buf)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.clamp(buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.chunks.read(self.start + offset, buf)
    }
}
