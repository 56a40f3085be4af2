//! Untraced files read by range: an optimized image's seek indexes (an
//! artifact `optimize` pushes beside it, docs/seek-index.md) locate a file
//! inside its original gzip layer, and one ranged GET brings the compressed
//! span that holds it, instead of the whole layer.
//!
//! Every step may fail — no artifact, a registry that ignores Range, a span
//! that decompresses to other bytes — and each failure only sends the open
//! back to the whole-layer fetch: bytes are served only when they hash to the
//! SHA-256 the boot index records for the file.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex};

use lazylayer_index::IndexEntry;
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_seek::artifact::{
    referrers_tag, ArtifactManifest, HeadRef, ReferrersIndex, MAX_INDEX_BLOB, OCI_INDEX,
};
use lazylayer_seek::{Plan, SeekHead, SeekIndex, MEDIA_TYPE};
use lazylayer_store::{LayerRef, Store};

use crate::fetcher::LayerFetcher;

/// Files larger than this take the whole-layer path: a big file is likely
/// most of its layer, and its one long read would hold a FUSE open.
pub const MAX_SPAN_FILE: u64 = 8 << 20;

/// What [`SpanReader::try_open`] can say without any network.
pub(crate) enum Quick {
    /// Read by range before: here it is.
    Ready(io::Result<File>),
    /// A ranged read is worth a try: open on a thread that may wait.
    NeedsFetch,
    /// Not for spans (layer local or landing, no digest, too big, spans off).
    NotMine,
}

#[derive(Default)]
struct State {
    /// The image's seek-index artifact: None until looked for.
    artifact: Option<Result<Arc<ArtifactManifest>, ()>>,
    /// Decoded seek indexes by layer position; None: that layer has none usable.
    indexes: HashMap<usize, Option<Arc<LayerSeek>>>,
    /// No more spans for this image (no artifact, or Range ignored).
    off: bool,
    /// The last compressed range fetched per layer (start, bytes): files
    /// side by side in a layer (a package's modules) often share a span.
    recent: HashMap<usize, (u64, bytes::Bytes)>,
    /// Compressed bytes fetched by range per layer.
    span_bytes: HashMap<usize, u64>,
}

/// Once the spans of one layer (fetched, and about to be) pass this share
/// of it, the layer comes whole instead. With the prefetch on (the default)
/// the layer comes whole anyway, so every span byte is a byte fetched
/// twice: this caps that at half a layer, and the round trips at those of
/// half a layer's files (reading python's whole standard library: 17 ranged
/// GETs and the layer once, 1.48x its size, instead of 31 GETs, then the
/// layer). With the prefetch off it costs bytes (0.90x by spans alone).
const WHOLE_LAYER_SHARE: (u64, u64) = (1, 2);

/// One layer's seek index, as far as this reader holds it.
enum LayerSeek {
    /// Fetched whole (a version 1 index, or none of its head announced):
    /// every window at hand.
    Whole(SeekIndex),
    /// The head alone (~2.5% of the index); each read fetches the one
    /// window it needs from `blob`, beside its span.
    Head { head: SeekHead, blob: Digest },
}

impl LayerSeek {
    fn file(&self, path: &[u8]) -> Option<lazylayer_seek::FileSpan> {
        match self {
            LayerSeek::Whole(idx) => idx.file(path),
            LayerSeek::Head { head, .. } => head.file(path),
        }
    }

    fn plan(&self, off: u64, len: u64) -> Plan {
        match self {
            LayerSeek::Whole(idx) => idx.plan(off, len),
            LayerSeek::Head { head, .. } => head.plan(off, len),
        }
    }

    /// (layer digest, compressed size) the index describes.
    fn describes(&self) -> ([u8; 32], u64) {
        match self {
            LayerSeek::Whole(idx) => (idx.layer_digest, idx.compressed_size),
            LayerSeek::Head { head, .. } => (head.layer_digest, head.compressed_size),
        }
    }
}

/// Why a seek-index lookup found nothing, and whether for want of the
/// network: such a miss is not remembered, so the lookup is made again once
/// the registry is back (it costs nothing while the host's breaker is open).
struct Miss {
    reason: String,
    network: bool,
}

impl From<String> for Miss {
    fn from(reason: String) -> Miss {
        Miss {
            reason,
            network: false,
        }
    }
}

impl From<&str> for Miss {
    fn from(reason: &str) -> Miss {
        reason.to_string().into()
    }
}

/// A registry error as a [`Miss`], `what` saying which lookup it ended.
fn miss(what: &'static str) -> impl Fn(lazylayer_oci::OciError) -> Miss {
    move |e| Miss {
        network: e.is_network(),
        reason: format!("{what}{e}"),
    }
}

/// Where an image's seek indexes are.
#[derive(Clone)]
pub enum SeekIndexes {
    /// In the artifact referring to this manifest digest (an optimized
    /// image's), looked for on the first untraced read.
    Referrers(Digest),
    /// In this artifact, found and checked already (a boot artifact, which
    /// carries them beside the boot layer).
    Known(Arc<ArtifactManifest>),
}

/// One lazily started image's ranged reads. Shared by the FUSE threads.
pub(crate) struct SpanReader {
    client: Arc<RegistryClient>,
    /// The optimized image, pinned to its manifest digest (the artifact's subject).
    image: Reference,
    subject: Digest,
    fetcher: LayerFetcher,
    store: Store,
    rt: tokio::runtime::Handle,
    state: Mutex<State>,
}

impl SpanReader {
    pub fn new(
        client: Arc<RegistryClient>,
        image: Reference,
        seek: SeekIndexes,
        fetcher: LayerFetcher,
    ) -> SpanReader {
        let mut state = State::default();
        let subject = match seek {
            SeekIndexes::Referrers(d) => d,
            SeekIndexes::Known(a) => {
                let subject = (a.subject.as_ref())
                    .and_then(|s| s.digest.parse().ok())
                    .unwrap_or_else(|| Digest::sha256_of(b""));
                state.artifact = Some(Ok(a));
                subject
            }
        };
        SpanReader {
            client,
            image,
            subject,
            store: fetcher.store().clone(),
            rt: fetcher.runtime(),
            fetcher,
            state: Mutex::new(state),
        }
    }

    /// Whether `entry` (whose content has the SHA-256 `want`, if known) is
    /// for this reader, and the file if it is at hand.
    pub fn try_open(&self, entry: &IndexEntry, want: Option<[u8; 32]>) -> Quick {
        let Some(digest) = self.candidate(entry, want) else {
            return Quick::NotMine;
        };
        let path = self.store.file_path(&digest);
        if path.is_file() {
            // A damaged copy is not served: the whole-layer path is.
            return match open_stored(&path, entry.size) {
                Ok(f) => Quick::Ready(Ok(f)),
                Err(_) => Quick::NotMine,
            };
        }
        // try_lock: a lookup may hold the lock across the network, and a
        // FUSE worker must not wait for it; the open's thread will.
        let Ok(s) = self.state.try_lock() else {
            return Quick::NeedsFetch;
        };
        if s.off || matches!(s.indexes.get(&(entry.layer as usize)), Some(None)) {
            return Quick::NotMine;
        }
        Quick::NeedsFetch
    }

    /// The file by range, or None (logged) for the whole-layer path.
    /// Blocking: called on a thread of its own, never in async context.
    pub fn open(&self, entry: &IndexEntry, want: Option<[u8; 32]>) -> Option<File> {
        let digest = self.candidate(entry, want)?;
        let stored = self.store.file_path(&digest);
        if stored.is_file() {
            return open_stored(&stored, entry.size).ok();
        }
        if tokio::runtime::Handle::try_current().is_ok() {
            // block_on would panic inside a runtime: not for this caller.
            return None;
        }
        let i = entry.layer as usize;
        let index = self.index(i)?;
        let path = String::from_utf8_lossy(&entry.path).into_owned();
        let layer = self.fetcher.layer(i)?;
        match self.read_span(i, &layer, &index, entry, &digest) {
            Ok(Some(f)) => Some(f),
            Ok(None) => None,
            Err(reason) => {
                tracing::warn!(image = %self.image, layer = %layer.digest, %path, %reason, "ranged read failed; fetching the whole layer");
                None
            }
        }
    }

    /// The file's digest when a ranged read may serve it: only a file whose
    /// digest is known can be.
    fn candidate(&self, entry: &IndexEntry, want: Option<[u8; 32]>) -> Option<Digest> {
        let want = want?;
        if entry.size > MAX_SPAN_FILE
            || self
                .fetcher
                .local_or_landed(entry.layer as usize, &entry.path)
        {
            return None;
        }
        Some(Digest::from_sha256_bytes(want))
    }

    /// Layer `i`'s seek index, fetched once; None (remembered) without one.
    fn index(&self, i: usize) -> Option<Arc<LayerSeek>> {
        let mut s = self.state.lock().unwrap();
        if s.off {
            return None;
        }
        if let Some(known) = s.indexes.get(&i) {
            return known.clone();
        }
        // Under the lock: concurrent first opens wait for one lookup
        // instead of each asking the registry.
        let artifact = match &s.artifact {
            Some(Ok(a)) => a.clone(),
            Some(Err(())) => return None,
            None => match self.rt.block_on(self.find_artifact()) {
                Ok(a) => {
                    let a = Arc::new(a);
                    s.artifact = Some(Ok(a.clone()));
                    a
                }
                Err(Miss {
                    reason,
                    network: true,
                }) => {
                    tracing::info!(image = %self.image, %reason, "seek indexes out of reach for now: this file comes with its whole layer");
                    return None;
                }
                Err(Miss { reason, .. }) => {
                    tracing::info!(image = %self.image, %reason, "no seek indexes: untraced files come with their whole layer");
                    s.artifact = Some(Err(()));
                    s.off = true;
                    return None;
                }
            },
        };
        let layer = self.fetcher.layer(i)?;
        let index = match self.rt.block_on(self.fetch_index(i, &layer, &artifact)) {
            Ok(Some(idx)) => Some(Arc::new(idx)),
            Ok(None) => {
                tracing::info!(image = %self.image, "the registry ignores Range: no more ranged reads for this image");
                s.off = true;
                return None;
            }
            Err(Miss {
                reason,
                network: true,
            }) => {
                tracing::info!(image = %self.image, layer = %layer.digest, %reason, "seek index out of reach for now: this file comes with its whole layer");
                return None;
            }
            Err(Miss { reason, .. }) => {
                tracing::warn!(image = %self.image, layer = %layer.digest, %reason, "no usable seek index for this layer");
                None
            }
        };
        s.indexes.insert(i, index.clone());
        index
    }

    /// The artifact: referrers API first, then the referrers tag (which the
    /// artifact itself, or an index listing it, may carry).
    async fn find_artifact(&self) -> Result<ArtifactManifest, Miss> {
        let repo = &self.image.repository;
        let subject = self.subject.to_string();
        let found = self
            .client
            .get_referrers(repo, &self.subject, MEDIA_TYPE)
            .await
            .map_err(miss("referrers API: "))?;
        if let Some(bytes) = found {
            let idx: ReferrersIndex = serde_json::from_slice(&bytes)
                .map_err(|e| format!("referrers answer is not an index: {e}"))?;
            if let Some(d) = idx
                .manifests
                .iter()
                .find(|d| d.artifact_type.as_deref() == Some(MEDIA_TYPE))
            {
                return self.artifact_at(&d.digest, &subject).await;
            }
        }
        let tag = self.image.with_tag(&referrers_tag(&subject));
        let raw = self
            .client
            .get_manifest(&tag)
            .await
            .map_err(miss("referrers tag: "))?;
        if raw.media_type == OCI_INDEX {
            let idx: ReferrersIndex =
                serde_json::from_slice(&raw.bytes).map_err(|e| format!("referrers tag: {e}"))?;
            let d = idx
                .manifests
                .iter()
                .find(|d| d.artifact_type.as_deref() == Some(MEDIA_TYPE))
                .ok_or("the referrers tag lists no seek-index artifact")?;
            return self.artifact_at(&d.digest, &subject).await;
        }
        Ok(ArtifactManifest::parse(&raw.bytes, &subject)?)
    }

    async fn artifact_at(&self, digest: &str, subject: &str) -> Result<ArtifactManifest, Miss> {
        let d: Digest = digest.parse().map_err(|e| format!("{e}"))?;
        let raw = self
            .client
            .get_manifest(&self.image.with_digest(d))
            .await
            .map_err(miss(""))?;
        Ok(ArtifactManifest::parse(&raw.bytes, subject)?)
    }

    /// Layer `i`'s seek index: its head alone when the artifact announces
    /// one, else the whole blob. Ok(None): the registry ignores Range.
    async fn fetch_index(
        &self,
        i: usize,
        layer: &LayerRef,
        artifact: &ArtifactManifest,
    ) -> Result<Option<LayerSeek>, Miss> {
        let blob = artifact
            .index_for(&layer.digest.to_string())
            .ok_or("the artifact has no seek index for this layer")?;
        let digest: Digest = blob.digest.parse().map_err(|e| format!("{e}"))?;
        if blob.size > MAX_INDEX_BLOB {
            return Err("the seek index is larger than any real one".into());
        }
        let seek = match &blob.head {
            Some(h) => match self.fetch_head(i, &digest, h).await {
                Ok(Some(head)) => LayerSeek::Head { head, blob: digest },
                Ok(None) => return Ok(None),
                Err(m) if m.network => return Err(m),
                Err(Miss { reason, .. }) => {
                    // The whole blob is checked against its digest: worth
                    // its bytes when a head is not what it claims.
                    tracing::warn!(image = %self.image, layer = %layer.digest, %reason, "unusable seek index head: fetching the index whole");
                    LayerSeek::Whole(self.fetch_whole_index(i, &digest, blob.size).await?)
                }
            },
            None => LayerSeek::Whole(self.fetch_whole_index(i, &digest, blob.size).await?),
        };
        let (described, size) = seek.describes();
        if Digest::from_sha256_bytes(described) != layer.digest || size != layer.size {
            return Err("the seek index describes another blob".into());
        }
        Ok(Some(seek))
    }

    /// A seek-index blob whole, checked against its digest.
    async fn fetch_whole_index(
        &self,
        i: usize,
        digest: &Digest,
        size: u64,
    ) -> Result<SeekIndex, Miss> {
        let bytes = self
            .stored_or_fetched(i, digest, async {
                // Verified against its digest by fetch_blob.
                self.client
                    .fetch_blob(&self.image.repository, digest, Some(size), MAX_INDEX_BLOB)
                    .await
                    .map(Some)
                    .map_err(miss(""))
            })
            .await?
            .ok_or("no seek index")?;
        Ok(SeekIndex::decode(&bytes).map_err(|e| e.to_string())?)
    }

    /// The head the artifact announces, by one ranged GET of the blob's
    /// first bytes, checked against the head's SHA-256. Ok(None): the
    /// registry ignores Range.
    async fn fetch_head(
        &self,
        i: usize,
        blob: &Digest,
        h: &HeadRef,
    ) -> Result<Option<SeekHead>, Miss> {
        let digest: Digest = h.digest.parse().map_err(|e| format!("{e}"))?;
        let got = self
            .stored_or_fetched(i, &digest, async {
                let got = self
                    .client
                    .get_blob_range_only(&self.image.repository, blob, 0, h.size)
                    .await
                    .map_err(miss(""))?;
                match got {
                    Some(b) if b.len() as u64 != h.size || Digest::sha256_of(&b) != digest => {
                        Err("the head's bytes differ from its announced SHA-256".into())
                    }
                    got => Ok(got),
                }
            })
            .await?;
        let Some(bytes) = got else {
            return Ok(None);
        };
        let head = SeekHead::decode(&bytes).map_err(|e| e.to_string())?;
        if head.head_len != h.size {
            return Err(
                format!("a head of {} bytes announced as {}", head.head_len, h.size).into(),
            );
        }
        Ok(Some(head))
    }

    /// Blob `digest` from the store, else from `fetch` (which checks it),
    /// then kept for other starts. One process fetches (a lock in the
    /// store); the others wait and read its copy. Ok(None): `fetch` had none.
    async fn stored_or_fetched(
        &self,
        i: usize,
        digest: &Digest,
        fetch: impl std::future::Future<Output = Result<Option<bytes::Bytes>, Miss>>,
    ) -> Result<Option<bytes::Bytes>, Miss> {
        let lock = {
            let (store, d) = (self.store.clone(), digest.clone());
            tokio::task::spawn_blocking(move || store.fetch_lock(&d, 0))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?
        };
        // Verified against its digest by read_blob.
        if let Ok(b) = self.store.read_blob(digest) {
            return Ok(Some(b.into()));
        }
        let got = fetch.await?;
        if let Some(b) = &got {
            self.fetcher.count_fetched(i, b.len() as u64);
            if let Err(e) = self.store.put_blob_bytes(digest, b) {
                tracing::debug!(error = %e, "keeping seek-index bytes for other starts");
            }
        }
        drop(lock);
        Ok(got)
    }

    /// One ranged GET, decompress, verify, keep, open. Ok(None): not worth a
    /// range (the whole-layer path is as good), said at debug level.
    fn read_span(
        &self,
        i: usize,
        layer: &LayerRef,
        index: &LayerSeek,
        entry: &IndexEntry,
        digest: &Digest,
    ) -> Result<Option<File>, String> {
        let f = index
            .file(&entry.path)
            .ok_or("the seek index has no such file")?;
        if f.size != entry.size {
            return Err(format!(
                "the seek index says {} bytes, the boot index {}",
                f.size, entry.size
            ));
        }
        if f.size == 0 {
            // Nothing to fetch; the SHA-256 check below still applies.
            return self.keep_and_open(entry, digest, &[]).map(Some);
        }
        let plan = index.plan(f.offset, f.size);
        let so_far = self
            .state
            .lock()
            .unwrap()
            .span_bytes
            .get(&i)
            .copied()
            .unwrap_or(0);
        let (num, den) = WHOLE_LAYER_SHARE;
        if (so_far + plan.compressed_len()).saturating_mul(den) > layer.size.saturating_mul(num) {
            tracing::debug!(layer = %layer.digest, span = plan.compressed_len(), so_far, "spans would pass half the layer: fetching it whole");
            return Ok(None);
        }
        let cp = plan.checkpoint;
        let (start, end) = (plan.compressed_start, plan.compressed_end);
        let (compressed, window) = match self.recent_span(i, start, end) {
            Some(b) => (b, self.start_window(index, cp)),
            None => {
                // One reader of this span at a time, across processes: the
                // others find the file, or the span, that it kept.
                let _lock = self
                    .store
                    .fetch_lock(&layer.digest, start)
                    .map_err(|e| e.to_string())?;
                if let Ok(f) = open_stored(&self.store.file_path(digest), entry.size) {
                    return Ok(Some(f));
                }
                // Started now, so that the window travels beside the span;
                // fetched and kept under the span's lock, so another start
                // waiting for the lock finds it in the store.
                let window = self.start_window(index, cp);
                let b = match self.store.kept_span(&layer.digest, start, end) {
                    Some(b) => bytes::Bytes::from(b),
                    None => {
                        let got = self.rt.block_on(self.client.get_blob_range_only(
                            &self.image.repository,
                            &layer.digest,
                            start,
                            plan.compressed_len(),
                        ));
                        let Some(b) = got.map_err(|e| e.to_string())? else {
                            tracing::info!(image = %self.image, "the registry ignores Range: no more ranged reads for this image");
                            self.state.lock().unwrap().off = true;
                            return Ok(None);
                        };
                        self.fetcher.count_fetched(i, b.len() as u64);
                        *self.state.lock().unwrap().span_bytes.entry(i).or_default() +=
                            b.len() as u64;
                        if let Err(e) = self.store.keep_span(&layer.digest, start, &b) {
                            tracing::debug!(error = %e, "keeping a span for other starts");
                        }
                        b
                    }
                };
                self.state
                    .lock()
                    .unwrap()
                    .recent
                    .insert(i, (plan.compressed_start, b.clone()));
                (b, self.finish_window(i, index, cp, window)?)
            }
        };
        let data = match (index, self.finish_window(i, index, cp, window)?) {
            (LayerSeek::Whole(idx), _) => idx.extract(&plan, &compressed, f.offset, f.size),
            (LayerSeek::Head { head, .. }, Window::Ready(w)) => {
                head.extract(&plan, &w, &compressed, f.offset, f.size)
            }
            (LayerSeek::Head { .. }, _) => return Err("the head has no such checkpoint".into()),
        }
        .map_err(|e| e.to_string())?;
        tracing::debug!(layer = %layer.digest, file = %String::from_utf8_lossy(&entry.path), span = plan.compressed_len(), "file read by range");
        self.keep_and_open(entry, digest, &data).map(Some)
    }

    /// Verify `data` against the boot index, keep it in the store, open it.
    fn keep_and_open(
        &self,
        entry: &IndexEntry,
        digest: &Digest,
        data: &[u8],
    ) -> Result<File, String> {
        if Digest::sha256_of(data) != *digest {
            return Err("the span's bytes differ from the boot index's SHA-256".into());
        }
        let path = self
            .store
            .put_file(digest, data)
            .map_err(|e| e.to_string())?;
        open_stored(&path, entry.size).map_err(|e| e.to_string())
    }
}

/// The window a head's read needs: at hand, or on its way.
enum Window {
    /// A whole index holds its windows.
    Inline,
    Ready(Vec<u8>),
    Fetching(tokio::task::JoinHandle<Result<Option<bytes::Bytes>, String>>),
}

impl SpanReader {
    /// Checkpoint `cp`'s window, from the store (where every window
    /// fetched is kept: not in memory, which would grow with each one),
    /// else its ranged GET started on the runtime.
    fn start_window(&self, seek: &LayerSeek, cp: usize) -> Window {
        let LayerSeek::Head { head, blob } = seek else {
            return Window::Inline;
        };
        let Some(w) = head.window(cp).copied() else {
            return Window::Inline;
        };
        // Verified against its digest on read, and again by the head.
        if let Ok(deflated) = self.store.read_blob(&Digest::from_sha256_bytes(w.sha256)) {
            if let Ok(win) = head.inflate_window(cp, &deflated) {
                return Window::Ready(win);
            }
        }
        let (client, repo, blob) = (
            self.client.clone(),
            self.image.repository.clone(),
            blob.clone(),
        );
        Window::Fetching(self.rt.spawn(async move {
            client
                .get_blob_range_only(&repo, &blob, w.offset, u64::from(w.deflated_len))
                .await
                .map_err(|e| e.to_string())
        }))
    }

    /// The window [`SpanReader::start_window`] started, when it has come:
    /// checked against the head, kept, [`Window::Ready`].
    fn finish_window(
        &self,
        i: usize,
        seek: &LayerSeek,
        cp: usize,
        window: Window,
    ) -> Result<Window, String> {
        let (task, head) = match (window, seek) {
            (Window::Fetching(task), LayerSeek::Head { head, .. }) => (task, head),
            (w, _) => return Ok(w),
        };
        let deflated = self
            .rt
            .block_on(task)
            .map_err(|e| e.to_string())??
            .ok_or("the registry ignores Range")?;
        self.fetcher.count_fetched(i, deflated.len() as u64);
        let win = head
            .inflate_window(cp, &deflated)
            .map_err(|e| e.to_string())?;
        if let Some(w) = head.window(cp) {
            let digest = Digest::from_sha256_bytes(w.sha256);
            if let Err(e) = self.store.put_blob_bytes(&digest, &deflated) {
                tracing::debug!(error = %e, "keeping a seek-index window for other starts");
            }
        }
        Ok(Window::Ready(win))
    }

    /// Blob bytes `start..end` of layer `i` if the last range fetched of it
    /// covers them.
    fn recent_span(&self, i: usize, start: u64, end: u64) -> Option<bytes::Bytes> {
        let s = self.state.lock().unwrap();
        let (at, b) = s.recent.get(&i)?;
        let to = at + b.len() as u64;
        (start >= *at && end <= to).then(|| b.slice((start - at) as usize..(end - at) as usize))
    }
}

/// A file the store kept: a regular file of the announced size, opened
/// without following links.
fn open_stored(path: &std::path::Path, size: u64) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags((rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::CLOEXEC).bits() as i32)
        .open(path)?;
    let m = f.metadata()?;
    if !m.is_file() || m.len() != size {
        return Err(io::Error::other(format!(
            "{} is not the {size}-byte file expected",
            path.display()
        )));
    }
    Ok(f)
}
