//! One image's layer fetches, shared by every reader.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use lazylayer_oci::Digest;
use lazylayer_store::{BlobStream, LayerEvents, LayerRef, PullOptions, PullProgress, Store};
use lazylayer_sys::beneath::open_beneath;
use lazylayer_sys::error_chain;
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::bandwidth::{Bandwidth, Throttled};
use crate::tasks::Tasks;

#[derive(Debug, Clone)]
pub struct FetchOptions {
    /// Longest a reader waits for its file before getting EIO.
    pub read_timeout: Duration,
    /// Layers fetched at once by the background prefetch (on-demand fetches
    /// start immediately regardless).
    pub prefetch_concurrency: usize,
    /// Serve a file as soon as its tar entry lands, before the layer's digest
    /// is checked at its end (the design's per-file readiness). When false,
    /// readers wait for the whole layer to be verified.
    pub serve_unverified: bool,
    pub pull: PullOptions,
    /// Paces the background prefetch (shared by every image of a process);
    /// a layer a reader asked for goes at full speed from then on.
    pub prefetch_bandwidth: Option<Arc<Bandwidth>>,
    /// For an image whose boot layer is attached (`optimize --attach`): the
    /// boot artifact to start from (its manifest digest) instead of the
    /// newest that verifies.
    pub boot_artifact: Option<lazylayer_oci::Digest>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            read_timeout: Duration::from_secs(60),
            prefetch_concurrency: 2,
            serve_unverified: true,
            pull: PullOptions::default(),
            prefetch_bandwidth: None,
            boot_artifact: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase", tag = "state", content = "error")]
pub enum LayerState {
    /// Not asked for yet.
    Pending,
    Fetching,
    /// Complete and verified in the store.
    Done,
    Failed(String),
}

/// A snapshot of one layer's progress (for `lazylayer status`).
#[derive(Debug, Clone, Serialize)]
pub struct LayerStatus {
    pub digest: String,
    pub size: u64,
    pub fetched: u64,
    /// Bytes of the blob kept in the store (received by this fetch or by
    /// earlier ones): a later fetch resumes after them.
    pub kept: u64,
    /// Bytes of the blob the extraction has consumed (`size` once the
    /// layer is in the store).
    pub extracted: u64,
    #[serde(flatten)]
    pub state: LayerState,
    /// Fetched because a reader asked (rather than by prefetch).
    pub on_demand: bool,
}

struct Slot {
    layer: LayerRef,
    state: LayerState,
    /// Where entries land while the layer streams in.
    extracting_in: Option<PathBuf>,
    /// Paths (relative) already on disk in `extracting_in`.
    ready: HashSet<Vec<u8>>,
    on_demand: bool,
    /// Failed because the registry could not be reached: a reader's next
    /// request fetches it again (failing at once while the host's breaker
    /// is open, succeeding once the host is back).
    failed_by_network: bool,
}

struct Inner {
    store: Store,
    /// Where layer blobs come from (the image's registry repository).
    source: Arc<dyn BlobStream>,
    opts: FetchOptions,
    /// `prefetch_concurrency` permits: the prefetch takes one per layer it
    /// starts; a reader's fetch takes one if free (so that the prefetch
    /// leaves it room) but never waits for one.
    prefetch_slots: Arc<Semaphore>,
    slots: Mutex<Vec<Slot>>,
    changed: Condvar,
    fetched: Vec<AtomicU64>,
    /// Per layer: bytes of its blob kept on disk, and consumed by the
    /// extraction under way (for `status` and `run --stats`).
    kept: Vec<AtomicU64>,
    extracted: Vec<AtomicU64>,
    /// Per layer: a reader asked for it (its bytes count as on demand and
    /// are not paced by the prefetch's bandwidth limit).
    urgent: Vec<Arc<AtomicBool>>,
    rt: tokio::runtime::Handle,
    /// The fetch and prefetch tasks; stopped by [`LayerFetcher::cancel`],
    /// after which no fetch starts any more.
    tasks: Tasks,
}

/// Shares fetch state between FUSE threads (blocking) and fetch tasks (async).
#[derive(Clone)]
pub struct LayerFetcher {
    inner: Arc<Inner>,
}

/// Counts a layer's downloaded bytes (for `status`).
struct SlotProgress {
    inner: Arc<Inner>,
    layer: usize,
}

impl PullProgress for SlotProgress {
    fn layer_bytes(&self, _d: &Digest, n: u64) {
        self.inner.fetched[self.layer].fetch_add(n, Ordering::Relaxed);
        let reason = if self.inner.urgent[self.layer].load(Ordering::Relaxed) {
            lazylayer_metrics::Reason::OnDemand
        } else {
            lazylayer_metrics::Reason::Prefetch
        };
        lazylayer_metrics::fetched(reason, n);
    }
    fn layer_kept(&self, _d: &Digest, total: u64) {
        self.inner.kept[self.layer].store(total, Ordering::Relaxed);
    }
    fn layer_resumed(&self, _d: &Digest, offset: u64) {
        self.inner.kept[self.layer].store(offset, Ordering::Relaxed);
    }
    fn layer_extracted(&self, _d: &Digest, total: u64) {
        self.inner.extracted[self.layer].store(total, Ordering::Release);
    }
}

/// Feeds a layer's extraction into its slot: per-file readiness.
struct SlotEvents {
    inner: Arc<Inner>,
    layer: usize,
}

impl LayerEvents for SlotEvents {
    fn extracting(&self, fs_dir: &Path) {
        let mut s = self.inner.slots.lock().unwrap();
        s[self.layer].extracting_in = Some(fs_dir.to_path_buf());
        // A new extraction (a fetch tried again) has nothing on disk yet.
        s[self.layer].ready.clear();
    }
    fn entry_landed(&self, path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let mut s = self.inner.slots.lock().unwrap();
        s[self.layer]
            .ready
            .insert(path.as_os_str().as_bytes().to_vec());
        drop(s);
        self.inner.changed.notify_all();
    }
}

impl LayerFetcher {
    /// `layers`: the image's layers in index order (the index's `layer`
    /// numbers refer to positions here). Layers already in the store start Done.
    /// `source` serves their blobs.
    pub fn new(
        store: Store,
        source: Arc<dyn BlobStream>,
        layers: Vec<LayerRef>,
        opts: FetchOptions,
        rt: tokio::runtime::Handle,
    ) -> LayerFetcher {
        let fetched = layers.iter().map(|_| AtomicU64::new(0)).collect();
        let kept = layers
            .iter()
            .map(|l| AtomicU64::new(store.layer_kept(l)))
            .collect();
        let extracted = layers
            .iter()
            .map(|l| {
                let done = store.layer_dir(&l.digest).is_some();
                AtomicU64::new(if done { l.size } else { 0 })
            })
            .collect();
        let urgent = layers
            .iter()
            .map(|_| Arc::new(AtomicBool::new(false)))
            .collect();
        let slots = layers
            .into_iter()
            .map(|layer| {
                let done = store.layer_dir(&layer.digest).is_some();
                Slot {
                    state: if done {
                        LayerState::Done
                    } else {
                        LayerState::Pending
                    },
                    layer,
                    extracting_in: None,
                    ready: HashSet::new(),
                    on_demand: false,
                    failed_by_network: false,
                }
            })
            .collect();
        LayerFetcher {
            inner: Arc::new(Inner {
                store,
                source,
                prefetch_slots: Arc::new(Semaphore::new(opts.prefetch_concurrency.max(1))),
                opts,
                slots: Mutex::new(slots),
                changed: Condvar::new(),
                fetched,
                kept,
                extracted,
                urgent,
                rt,
                tasks: Tasks::default(),
            }),
        }
    }

    /// Start fetching layer `i` unless it is fetching or done. Returns at once.
    pub fn request(&self, i: usize, on_demand: bool) {
        if on_demand {
            // Also when the prefetch has it already: unpaced from now on.
            if let Some(u) = self.inner.urgent.get(i) {
                u.store(true, Ordering::Relaxed);
            }
        }
        // A reader's fetch starts at once; it holds a prefetch slot if one is
        // free, so the prefetch does not start more beside it.
        let permit = if on_demand {
            self.inner.prefetch_slots.clone().try_acquire_owned().ok()
        } else {
            None
        };
        self.start(i, on_demand, permit);
    }

    /// Start layer `i`'s fetch unless it is fetching or done; `permit` (a
    /// prefetch slot) is held until the fetch ends, or dropped at once.
    fn start(&self, i: usize, on_demand: bool, permit: Option<OwnedSemaphorePermit>) {
        if self.inner.tasks.stopped() {
            return;
        }
        let layer = {
            let mut s = self.inner.slots.lock().unwrap();
            let Some(slot) = s.get_mut(i) else { return };
            let again = on_demand && slot.failed_by_network;
            if slot.state != LayerState::Pending && !again {
                return;
            }
            slot.state = LayerState::Fetching;
            slot.failed_by_network = false;
            slot.on_demand = on_demand;
            slot.layer.clone()
        };
        let inner = self.inner.clone();
        self.track(self.inner.rt.spawn(async move {
            // A panic (a bug, say in a decoder fed a hostile layer) fails
            // this layer's readers at once; left Fetching, they would wait
            // out their timeout.
            let fetched = AssertUnwindSafe(fetch_one(inner.clone(), i, layer.clone()))
                .catch_unwind()
                .await;
            if let Err(panic) = fetched {
                let msg = format!("internal error: {}", lazylayer_fs::panic_message(&*panic));
                tracing::error!(layer = %layer.digest, error = %msg, "layer fetch panicked");
                let mut s = inner.slots.lock().unwrap_or_else(PoisonError::into_inner);
                if matches!(s[i].state, LayerState::Pending | LayerState::Fetching) {
                    s[i].state = LayerState::Failed(msg);
                }
                drop(s);
                inner.changed.notify_all();
            }
            drop(permit);
        }));
    }

    /// Remember a spawned task for [`LayerFetcher::cancel`].
    fn track(&self, task: tokio::task::JoinHandle<()>) {
        self.inner.tasks.track(task);
    }

    /// Stop every fetch and the prefetch: the image's user is gone (its
    /// container exited, its mount is going away). Not an error: nothing is
    /// logged above debug level, and what each cut download received stays
    /// in the store as a partial download the next fetch of that layer
    /// resumes from. Readers still waiting get an error at once. Idempotent;
    /// `lazylayer_root::LazyRoot` calls it when dropped.
    pub fn cancel(&self) {
        let Some(running) = self.inner.tasks.stop() else {
            return;
        };
        // No prefetch waits for a slot any more.
        self.inner.prefetch_slots.close();
        let mut s = self.inner.slots.lock().unwrap();
        for slot in s.iter_mut() {
            if matches!(slot.state, LayerState::Pending | LayerState::Fetching) {
                slot.state = LayerState::Failed("fetch cancelled".into());
            }
        }
        drop(s);
        self.inner.changed.notify_all();
        tracing::debug!(running, "layer fetches cancelled");
    }

    /// Fetch and prefetch tasks not finished yet (after
    /// [`LayerFetcher::cancel`], the ones still unwinding).
    pub fn tasks_running(&self) -> usize {
        self.inner.tasks.running()
    }

    /// Fetch every pending layer in the background, `prefetch_concurrency`
    /// at a time, bottom layer first; readers' requests jump the queue.
    pub fn start_prefetch(&self) {
        let me = self.clone();
        self.track(self.inner.rt.spawn(async move { me.prefetch_all().await }));
    }

    /// [`LayerFetcher::start_prefetch`] once the start has settled: when
    /// `activity` (a count of file-system requests) has moved and then stood
    /// still for `quiet`, or after `max_wait`. Prefetching decompresses and
    /// extracts on the same CPUs the starting program needs, so it waits.
    /// `also` runs at the same moment (the boot layer's own prefetch).
    pub fn start_prefetch_when_idle(
        &self,
        activity: impl Fn() -> u64 + Send + 'static,
        quiet: Duration,
        max_wait: Duration,
        also: impl FnOnce() + Send + 'static,
    ) {
        let me = self.clone();
        self.track(self.inner.rt.spawn(async move {
            wait_until_idle(activity, quiet, max_wait).await;
            if !me.inner.tasks.stopped() {
                also();
            }
            me.prefetch_all().await
        }));
    }

    async fn prefetch_all(&self) {
        let n = self.inner.slots.lock().unwrap().len();
        for i in 0..n {
            if self.inner.tasks.stopped() {
                return;
            }
            let pending = self.inner.slots.lock().unwrap()[i].state == LayerState::Pending;
            if !pending {
                continue;
            }
            // Wait for a free prefetch slot; the fetch holds it to its end.
            let Ok(permit) = self.inner.prefetch_slots.clone().acquire_owned().await else {
                return;
            };
            self.start(i, false, Some(permit));
        }
    }

    /// Open the file at `path` (relative) from layer `i`, waiting (bounded)
    /// until it has landed. Blocking: called from FUSE threads.
    ///
    /// A file served while its layer still streams has not been covered by
    /// the layer's digest yet (that is checked at the end of the blob): with
    /// `expected` (the boot index's SHA-256 of the content) it is served only
    /// if its bytes match; otherwise the reader waits for the verified layer.
    pub fn open_file(
        &self,
        i: usize,
        path: &[u8],
        expected: Option<&[u8; 32]>,
    ) -> io::Result<File> {
        self.open_file_with(i, path, expected, self.inner.opts.serve_unverified)
    }

    /// [`LayerFetcher::open_file`] once the layer is verified, never before:
    /// for a file whose digest is not at hand.
    pub(crate) fn open_file_verified(&self, i: usize, path: &[u8]) -> io::Result<File> {
        self.open_file_with(i, path, None, false)
    }

    fn open_file_with(
        &self,
        i: usize,
        path: &[u8],
        expected: Option<&[u8; 32]>,
        mut early: bool,
    ) -> io::Result<File> {
        /// Where the file can be opened, decided under the lock, opened after.
        enum Found {
            Stored(PathBuf),
            /// Landed but the layer is still streaming: try the extraction dir,
            /// then the store (the layer may have been renamed in meanwhile).
            Streaming(Option<PathBuf>, PathBuf),
            Failed(io::Error),
        }
        self.request(i, true);
        let timeout = self.inner.opts.read_timeout;
        let deadline = Instant::now() + timeout;
        loop {
            let found = self.wait_for(deadline, |s| {
                let Some(slot) = s.get(i) else {
                    return Some(Found::Failed(io::Error::other(format!("no layer {i}"))));
                };
                let stored = self.inner.store.layer_fs_path(&slot.layer.digest);
                match &slot.state {
                    LayerState::Done => Some(Found::Stored(stored)),
                    LayerState::Failed(msg) => Some(Found::Failed(io::Error::new(
                        if slot.failed_by_network {
                            io::ErrorKind::HostUnreachable
                        } else {
                            io::ErrorKind::Other
                        },
                        format!("layer {} could not be fetched: {msg}", slot.layer.digest),
                    ))),
                    _ if early && slot.ready.contains(path) => {
                        Some(Found::Streaming(slot.extracting_in.clone(), stored))
                    }
                    _ => None,
                }
            });
            return match found {
                Some(Found::Stored(dir)) => open_beneath(&dir, path),
                Some(Found::Streaming(extracting, stored)) => {
                    if let Some(d) = extracting {
                        match open_beneath(&d, path) {
                            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                            Err(e) => return Err(e),
                            Ok(f) => match expected {
                                None => return Ok(f),
                                Some(want) if content_matches(&f, want)? => return Ok(f),
                                Some(want) => {
                                    // A later entry of the same path may still be on its
                                    // way, or the layer is bad: its digest will tell.
                                    tracing::warn!(path = %String::from_utf8_lossy(path), want = %hex::encode(want), "content differs from the boot index; waiting for the verified layer");
                                    early = false;
                                    continue;
                                }
                            },
                        }
                    }
                    // Renamed into the store meanwhile: verified with its layer.
                    open_beneath(&stored, path)
                }
                Some(Found::Failed(e)) => Err(e),
                None => {
                    let digest = self.inner.slots.lock().unwrap()[i].layer.digest.clone();
                    Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "waited {timeout:?} for {} from layer {digest}",
                            String::from_utf8_lossy(path),
                        ),
                    ))
                }
            };
        }
    }

    /// [`LayerFetcher::open_file`] without waiting: the file when its layer
    /// is in the store, else `None` (and the layer's fetch is started: the
    /// caller is expected to wait in `open_file` next, off its hot threads).
    pub fn try_open_file(&self, i: usize, path: &[u8]) -> Option<io::Result<File>> {
        self.request(i, true);
        let s = self.inner.slots.lock().unwrap();
        let slot = s.get(i)?;
        if slot.state != LayerState::Done {
            return None;
        }
        let dir = self.inner.store.layer_fs_path(&slot.layer.digest);
        drop(s);
        Some(open_beneath(&dir, path))
    }

    /// Whether layer `i` is in the store, or streaming with `path` landed
    /// (then the whole-layer path serves it at once).
    pub(crate) fn local_or_landed(&self, i: usize, path: &[u8]) -> bool {
        let s = self.inner.slots.lock().unwrap();
        s.get(i)
            .is_some_and(|slot| slot.state == LayerState::Done || slot.ready.contains(path))
    }

    /// The file when layer `i` is in the store, without starting any fetch.
    pub(crate) fn try_open_stored(&self, i: usize, path: &[u8]) -> Option<io::Result<File>> {
        let s = self.inner.slots.lock().unwrap();
        let slot = s.get(i).filter(|s| s.state == LayerState::Done)?;
        let dir = self.inner.store.layer_fs_path(&slot.layer.digest);
        drop(s);
        Some(open_beneath(&dir, path))
    }

    pub(crate) fn layer(&self, i: usize) -> Option<LayerRef> {
        self.inner
            .slots
            .lock()
            .unwrap()
            .get(i)
            .map(|s| s.layer.clone())
    }

    /// Bytes of layer `i` read some other way than its fetch (seek indexes,
    /// ranges): counted in `status` and `bytes_fetched` all the same.
    pub(crate) fn count_fetched(&self, i: usize, n: u64) {
        if let Some(f) = self.inner.fetched.get(i) {
            f.fetch_add(n, Ordering::Relaxed);
        }
        lazylayer_metrics::fetched(lazylayer_metrics::Reason::OnDemand, n);
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub(crate) fn runtime(&self) -> tokio::runtime::Handle {
        self.inner.rt.clone()
    }

    /// Blocks until `decide` answers for the current slots (re-asked after
    /// every change) or `deadline` passes (None).
    fn wait_for<T>(
        &self,
        deadline: Instant,
        mut decide: impl FnMut(&[Slot]) -> Option<T>,
    ) -> Option<T> {
        let mut s = self.inner.slots.lock().unwrap();
        loop {
            if let Some(t) = decide(&s) {
                return Some(t);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            s = self
                .inner
                .changed
                .wait_timeout(s, deadline - now)
                .unwrap()
                .0;
        }
    }

    pub fn status(&self) -> Vec<LayerStatus> {
        let s = self.inner.slots.lock().unwrap();
        s.iter()
            .enumerate()
            .map(|(i, slot)| LayerStatus {
                digest: slot.layer.digest.to_string(),
                size: slot.layer.size,
                fetched: if slot.state == LayerState::Done
                    && !slot.on_demand
                    && self.inner.fetched[i].load(Ordering::Relaxed) == 0
                {
                    slot.layer.size
                } else {
                    self.inner.fetched[i].load(Ordering::Relaxed)
                },
                // Extracted first: bytes are kept before the extraction
                // may read them, so read in this order `kept` is never less.
                extracted: self.inner.extracted[i].load(Ordering::Acquire),
                kept: self.inner.kept[i].load(Ordering::Acquire),
                state: slot.state.clone(),
                on_demand: slot.on_demand,
            })
            .collect()
    }

    /// True when no fetch is under way and, with `pending_too`, none is
    /// left to start: every layer is in the store or failed.
    pub fn settled(&self, pending_too: bool) -> bool {
        let s = self.inner.slots.lock().unwrap();
        s.iter().all(|slot| match slot.state {
            LayerState::Done | LayerState::Failed(_) => true,
            LayerState::Pending => !pending_too,
            LayerState::Fetching => false,
        })
    }

    /// Bytes downloaded by this fetcher (layers found in the store count 0).
    pub fn bytes_fetched(&self) -> u64 {
        self.inner
            .fetched
            .iter()
            .map(|f| f.load(Ordering::Relaxed))
            .sum()
    }

    /// True when every layer is in the store.
    pub fn all_done(&self) -> bool {
        self.inner
            .slots
            .lock()
            .unwrap()
            .iter()
            .all(|s| s.state == LayerState::Done)
    }

    /// True when a layer failed for good: not for want of the network (such
    /// a layer is fetched again when a reader asks for it).
    pub fn failed_for_good(&self) -> bool {
        self.inner
            .slots
            .lock()
            .unwrap()
            .iter()
            .any(|s| matches!(s.state, LayerState::Failed(_)) && !s.failed_by_network)
    }

    /// Block until every layer is done or one failed (or `timeout`).
    pub fn wait_all(&self, timeout: Duration) -> Result<(), String> {
        self.wait_for(Instant::now() + timeout, |s| {
            if let Some(f) = s.iter().find_map(|x| match &x.state {
                LayerState::Failed(m) => Some(format!("layer {}: {m}", x.layer.digest)),
                _ => None,
            }) {
                return Some(Err(f));
            }
            s.iter()
                .all(|x| x.state == LayerState::Done)
                .then_some(Ok(()))
        })
        .unwrap_or_else(|| Err("timed out waiting for layers".into()))
    }
}

/// Returns once `activity` has changed since the call and then stayed the
/// same for `quiet` (checked every quiet/4), or when `max_wait` has passed.
pub async fn wait_until_idle(activity: impl Fn() -> u64, quiet: Duration, max_wait: Duration) {
    let start = tokio::time::Instant::now();
    let first = activity();
    let (mut last, mut since) = (first, start);
    let step = (quiet / 4).max(Duration::from_millis(1));
    while start.elapsed() < max_wait {
        tokio::time::sleep(step).await;
        let now = activity();
        if now != last {
            (last, since) = (now, tokio::time::Instant::now());
        } else if last != first && since.elapsed() >= quiet {
            return;
        }
    }
}

/// Whether `f`'s content hashes to `want` (SHA-256); leaves it at offset 0.
fn content_matches(mut f: &File, want: &[u8; 32]) -> io::Result<bool> {
    use sha2::{Digest as _, Sha256};
    use std::io::{Seek, SeekFrom};
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    f.seek(SeekFrom::Start(0))?;
    Ok(h.finalize().as_slice() == want)
}

async fn fetch_one(inner: Arc<Inner>, i: usize, layer: LayerRef) {
    let progress: Arc<dyn PullProgress> = Arc::new(SlotProgress {
        inner: inner.clone(),
        layer: i,
    });
    let events: Arc<dyn LayerEvents> = Arc::new(SlotEvents {
        inner: inner.clone(),
        layer: i,
    });
    tracing::info!(layer = %layer.digest, "fetching layer");
    // The prefetch's share of the link is bounded; a reader's is not.
    let paced: Option<Throttled> = inner
        .opts
        .prefetch_bandwidth
        .clone()
        .map(|limit| Throttled {
            inner: inner.source.clone(),
            limit,
            urgent: inner.urgent[i].clone(),
        });
    let source: &dyn BlobStream = match &paced {
        Some(t) => t,
        None => inner.source.as_ref(),
    };
    let r = inner
        .store
        .ensure_layer(source, &layer, &inner.opts.pull, progress, events)
        .await;
    let mut s = inner.slots.lock().unwrap();
    match r {
        Ok(_) => {
            inner.kept[i].store(layer.size, Ordering::Relaxed);
            inner.extracted[i].store(layer.size, Ordering::Relaxed);
            s[i].state = LayerState::Done;
            s[i].ready.clear();
            s[i].extracting_in = None;
        }
        // Cancelled while it ended: cancel() has set the state already.
        Err(e) if inner.tasks.stopped() => {
            tracing::debug!(layer = %layer.digest, error = %error_chain(&e), "cancelled layer fetch ended");
        }
        Err(e) => {
            let msg = format!("{:#}", error_chain(&e));
            tracing::error!(layer = %layer.digest, error = %msg, "layer fetch failed");
            lazylayer_metrics::fetch_error(crate::error_cause(&e));
            s[i].state = LayerState::Failed(msg);
            s[i].failed_by_network = crate::is_network(&e);
        }
    }
    drop(s);
    inner.changed.notify_all();
}

#[cfg(test)]
mod tests {
    use super::wait_until_idle;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    /// Only lower bounds are asserted: "not before the activity stopped" is
    /// what the function promises, however slow the machine.
    #[tokio::test]
    async fn idle_means_activity_then_quiet() {
        let n = Arc::new(AtomicU64::new(0));
        let last_us = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let (w, l) = (n.clone(), last_us.clone());
        let writer = std::thread::spawn(move || {
            while t0.elapsed() < Duration::from_millis(300) {
                // Time first: the recorded time is then never after the
                // change the waiter sees.
                l.store(t0.elapsed().as_micros() as u64, Ordering::SeqCst);
                w.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        let quiet = Duration::from_millis(100);
        let r = n.clone();
        wait_until_idle(
            move || r.load(Ordering::SeqCst),
            quiet,
            Duration::from_secs(60),
        )
        .await;
        let returned = t0.elapsed();
        writer.join().unwrap();
        let last = Duration::from_micros(last_us.load(Ordering::SeqCst));
        assert!(
            returned >= last + quiet,
            "returned at {returned:?}, activity until {last:?}"
        );

        // No activity at all: nothing has started yet, so wait the maximum.
        let t1 = Instant::now();
        wait_until_idle(|| 7, quiet, Duration::from_millis(400)).await;
        assert!(t1.elapsed() >= Duration::from_millis(400));
    }
}
