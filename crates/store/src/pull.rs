//! Full pull of an image into the store: every layer is streamed, hashed,
//! decompressed and extracted in one pass, then verified and renamed into
//! place. Each received byte is appended to the layer's partial download
//! as it arrives and the extractor reads that file behind it (the download
//! never waits for the extraction): a fetch cut at any point keeps all it
//! received, and a blob received whole is never fetched again.

use std::io::{BufRead, BufReader, Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lazylayer_layer::{Compression, ExtractOptions};
use lazylayer_oci::{Digest, Platform, Reference, RegistryClient, ResolvedImage};
use tokio::sync::mpsc;
use tracing::{info, info_span, Instrument};

use crate::reader::{write_received, FollowReader, HashingReader, Received};
use crate::source::{BlobStream, LayerEvents, NoEvents, RegistryBlobs};
use crate::{io_err, FileLock, ImageRecord, LayerRecord, LayerRef, Result, Store, StoreError};

/// Receives pull progress (bytes, for bars); the CLI draws bars from it,
/// tests count calls. Per-file readiness is [`LayerEvents`]'s, not this.
pub trait PullProgress: Send + Sync {
    /// The image has no boot layer: it is pulled in full before it runs.
    /// `note`: why an attached boot layer could not serve, if it had one.
    fn full_pull(&self, _reference: &Reference, _note: Option<&str>) {}
    fn image_resolved(&self, _image: &ResolvedImage) {}
    /// `cached`: the layer is in the store already and will not be fetched.
    fn layer_start(&self, _digest: &Digest, _size: u64, _cached: bool) {}
    /// Bytes downloaded from the registry (not those of a local prefix).
    fn layer_bytes(&self, _digest: &Digest, _n: u64) {}
    /// The first `offset` bytes come from a partial download kept from an
    /// earlier, cut fetch: they are read locally, not fetched.
    fn layer_resumed(&self, _digest: &Digest, _offset: u64) {}
    /// The partial download now holds `total` bytes of the blob, kept on
    /// disk whatever becomes of this fetch.
    fn layer_kept(&self, _digest: &Digest, _total: u64) {}
    /// The extraction has consumed `total` bytes of the (compressed) blob.
    fn layer_extracted(&self, _digest: &Digest, _total: u64) {}
    fn layer_done(&self, _digest: &Digest) {}
}

pub struct NoProgress;
impl PullProgress for NoProgress {}

#[derive(Debug, Clone)]
pub struct PullOptions {
    pub platform: Platform,
    /// Layers fetched at once.
    pub concurrency: usize,
    pub extract: ExtractOptions,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::host(),
            concurrency: 3,
            extract: ExtractOptions::default(),
        }
    }
}

/// Unix seconds now (0 if the clock is before 1970): what image and
/// container records store.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Store {
    /// Pull `reference` fully: manifest, config and every layer, verified, into
    /// the store; record the image. Layers already present are not fetched.
    pub async fn pull(
        &self,
        client: &RegistryClient,
        reference: &Reference,
        opts: &PullOptions,
        progress: Arc<dyn PullProgress>,
    ) -> Result<ImageRecord> {
        static PULLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = PULLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pin = format!("pull-{}-{n}", std::process::id());
        let (rec, _pin) = self
            .pull_pinned(client, reference, opts, progress, &pin)
            .await?;
        Ok(rec)
    }

    /// [`Store::pull`], the image's content pinned as `pin_name` from the
    /// moment its layers are known; the pin is returned, for a caller that
    /// goes on using the image (eviction, which a pull may trigger, and
    /// `prune` leave it alone while the pin lives).
    pub async fn pull_pinned(
        &self,
        client: &RegistryClient,
        reference: &Reference,
        opts: &PullOptions,
        progress: Arc<dyn PullProgress>,
        pin_name: &str,
    ) -> Result<(ImageRecord, crate::Pin)> {
        let span = info_span!("pull", image = %reference);
        async {
            let _store_lock = FileLock::shared_async(&self.lock_path("store.lock")).await?;
            let crate::ResolvedLayers {
                image,
                config_digest,
                layers,
            } = crate::resolve_layers(client, reference, &opts.platform).await?;
            let mut rec = ImageRecord {
                reference: crate::reference_key(reference),
                manifest_digest: image.manifest.digest.clone(),
                manifest_media_type: image.manifest.media_type.clone(),
                index_digest: image.index.as_ref().map(|i| i.digest.clone()),
                config_digest: config_digest.clone(),
                layers,
                platform: opts.platform.to_string(),
                // Set when every layer is in.
                pulled_at: 0,
                attached: None,
            };
            let pin = self.pin_guard(pin_name, &rec.digests())?;
            progress.image_resolved(&image);
            if let Some(idx) = &image.index {
                self.put_blob_bytes(&idx.digest, &idx.bytes)?;
            }
            self.put_blob_bytes(&image.manifest.digest, &image.manifest.bytes)?;
            self.put_blob_bytes(&config_digest, &image.config_bytes)?;

            let blobs = RegistryBlobs::new(client, reference.repository.clone());
            let events: Arc<dyn LayerEvents> = Arc::new(NoEvents);
            let results: Vec<Result<LayerRecord>> = futures_util::stream::iter(rec.layers.iter())
                .map(|l| self.ensure_layer(&blobs, l, opts, progress.clone(), events.clone()))
                .buffer_unordered(opts.concurrency.max(1))
                .collect()
                .await;
            for r in results {
                r?;
            }
            rec.pulled_at = unix_now();
            self.save_image(&rec)?;
            info!(manifest = %rec.manifest_digest, "pulled");
            Ok((rec, pin))
        }
        .instrument(span)
        .await
    }

    /// Bytes of `layer`'s blob kept in the store: all of them once the layer
    /// is extracted (or its blob stored), else what its partial download
    /// holds (a later fetch resumes after them).
    pub fn layer_kept(&self, layer: &LayerRef) -> u64 {
        if self.layer_dir(&layer.digest).is_some() || self.has_blob(&layer.digest) {
            return layer.size;
        }
        std::fs::metadata(self.partial_path(&layer.digest)).map_or(0, |m| m.len().min(layer.size))
    }

    /// Make sure one layer is extracted in the store, fetching it from
    /// `source` if needed. Safe against other processes doing the same: the
    /// per-layer lock makes the second one wait and then find the layer done.
    /// `events` hears the extraction (where, and each entry as it lands);
    /// `progress` the bytes.
    ///
    /// Bytes that are not the layer (a wrong digest, or data the unpacker
    /// refuses) fetched through a mirror get one more try, which the source
    /// sends to the other hosts first: a broken or poisoned mirror costs a
    /// second download, not the layer.
    pub async fn ensure_layer(
        &self,
        source: &dyn BlobStream,
        layer: &LayerRef,
        opts: &PullOptions,
        progress: Arc<dyn PullProgress>,
        events: Arc<dyn LayerEvents>,
    ) -> Result<LayerRecord> {
        let first = self
            .ensure_layer_once(source, layer, opts, progress.clone(), events.clone())
            .await;
        let r = match first {
            Err(e) if is_bad_bytes(&e) && source.distrust(&layer.digest) => {
                tracing::warn!(layer = %layer.digest, error = %e, "bad layer bytes from a mirror; fetching the layer again");
                self.ensure_layer_once(source, layer, opts, progress, events)
                    .await
            }
            r => r,
        };
        if r.is_ok() {
            self.forget_spans(&layer.digest);
        }
        r
    }

    async fn ensure_layer_once(
        &self,
        source: &dyn BlobStream,
        layer: &LayerRef,
        opts: &PullOptions,
        progress: Arc<dyn PullProgress>,
        events: Arc<dyn LayerEvents>,
    ) -> Result<LayerRecord> {
        let digest = &layer.digest;
        let span = info_span!("layer", digest = %digest, size = layer.size);
        async {
            if let Some(r) = self.layer_record(digest) {
                progress.layer_start(digest, layer.size, true);
                progress.layer_done(digest);
                return Ok(r);
            }
            // Shared, as a whole pull holds it: `prune` must not empty tmp/
            // under a layer being extracted there.
            let _store_lock = FileLock::shared_async(&self.lock_path("store.lock")).await?;
            let layer_lock = Arc::new(
                FileLock::exclusive_async(&self.lock_path(&format!("{}.lock", digest.hex())))
                    .await?,
            );
            if let Some(r) = self.layer_record(digest) {
                progress.layer_start(digest, layer.size, true);
                progress.layer_done(digest);
                return Ok(r);
            }
            progress.layer_start(digest, layer.size, false);
            // Work directories are named after the layer so that the next
            // owner of its lock clears what a killed owner left behind.
            let work_prefix = format!("layer-{}-", &digest.hex()[..16]);
            remove_stale_work(&self.tmp_dir(), &work_prefix);
            let work = tempfile::Builder::new()
                .prefix(&work_prefix)
                .tempdir_in(self.tmp_dir())
                .map_err(io_err("creating work directory", &self.tmp_dir()))?;
            let fs_dir = work.path().join("fs");
            std::fs::create_dir(&fs_dir).map_err(io_err("creating layer directory", &fs_dir))?;

            // The blob is written to a stable per-digest path as it arrives, so
            // a fetch cut off (registry gone, process killed, fetch cancelled)
            // leaves its prefix for the next one: that one re-extracts the
            // prefix locally and downloads only the rest.
            let partial = self.partial_path(digest);
            let prefix = {
                let (partial, dir, d, size) = (
                    partial.clone(),
                    self.partial_dir(digest),
                    digest.clone(),
                    layer.size,
                );
                tokio::task::spawn_blocking(move || open_partial(&dir, &partial, &d, size))
                    .await
                    .map_err(|e| StoreError::Worker {
                        what: format!("reading partial download of {digest}"),
                        reason: e.to_string(),
                    })??
            };
            let prefix_len = prefix.offset;
            if prefix_len > 0 {
                info!(offset = prefix_len, "resuming from an earlier partial download");
                progress.layer_resumed(digest, prefix_len);
            }

            // The channel is bounded so a slow disk throttles the download
            // instead of buffering the layer in memory; the extraction does
            // not: it reads the partial file behind the writer.
            events.extracting(&fs_dir);
            let received = Arc::new(Received::new(prefix_len));
            let (tx, rx) = mpsc::channel::<bytes::Bytes>(32);
            let worker_err = |what: &str, e: tokio::task::JoinError| StoreError::Worker {
                what: format!("{what} layer {digest}"),
                reason: e.to_string(),
            };
            let writer = {
                let (partial, received, progress) =
                    (partial.clone(), received.clone(), progress.clone());
                let (d, size) = (digest.clone(), layer.size);
                // The lock lives until the partial file is written, even when
                // this future is dropped first.
                let lock = layer_lock.clone();
                tokio::task::spawn_blocking(move || {
                    let _lock = lock;
                    keep_received(rx, &partial, (prefix_len, size), &received, &|n| {
                        progress.layer_kept(&d, n)
                    })
                })
            };
            let consumer = {
                let partial = partial.clone();
                let fs_dir = fs_dir.clone();
                let eopts = opts.extract.clone();
                let media_type = layer.media_type.clone();
                let digest = digest.clone();
                let (events, progress) = (events.clone(), progress.clone());
                let received = received.clone();
                let lock = layer_lock.clone();
                tokio::task::spawn_blocking(move || {
                    let _lock = lock;
                    let on_entry = &mut |ev: &lazylayer_layer::EntryEvent<'_>| {
                        events.entry_landed(ev.path)
                    };
                    let r = extract_partial(
                        &partial,
                        &received,
                        &fs_dir,
                        &media_type,
                        &digest,
                        &eopts,
                        on_entry,
                        &|n| progress.layer_extracted(&digest, n),
                    );
                    if r.is_err() {
                        received.extraction_failed();
                    }
                    r
                })
            };
            // Dropped (this fetch cancelled), the extractor stops: what it
            // did is redone from the kept bytes by the next fetch.
            let _stop_extraction = CancelOnDrop(received.clone());
            let p = progress.clone();
            let d2 = digest.clone();
            let downloaded = source
                .stream(digest, layer.size, prefix, tx, &move |n| {
                    p.layer_bytes(&d2, n)
                })
                .await;
            let written = writer.await.map_err(|e| worker_err("keeping", e))?;
            let extracted = consumer.await.map_err(|e| worker_err("extracting", e))?;
            // The file holds what was received, as far as it goes: kept.
            let kept = written.map_err(io_err("keeping downloaded bytes", &partial))?;
            tracing::debug!(kept, "download ended");
            // Bad bytes must not be resumed from: drop the partial then. A
            // broken connection keeps it (the extractor then failed only
            // because its input ended early).
            let discard = || {
                if let Err(e) = std::fs::remove_file(&partial) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %partial.display(), error = %e, "cannot remove partial download");
                    }
                }
            };
            let (diff_id, entries, file_bytes) = match (downloaded, extracted) {
                // The extractor failing first makes the writer drop the channel.
                (Err(lazylayer_oci::OciError::ConsumerGone { .. }), Err(e)) => {
                    discard();
                    return Err(e);
                }
                (Err(e), _) => {
                    if matches!(
                        e,
                        lazylayer_oci::OciError::DigestMismatch { .. }
                            | lazylayer_oci::OciError::SizeMismatch { .. }
                    ) {
                        discard();
                    }
                    return Err(e.into());
                }
                (Ok(_), Err(e)) => {
                    discard();
                    return Err(e);
                }
                (Ok(_), Ok(v)) => v,
            };
            if diff_id != layer.diff_id {
                discard();
                return Err(StoreError::DiffIdMismatch {
                    digest: digest.clone(),
                    expected: layer.diff_id.clone(),
                    actual: diff_id,
                });
            }
            let rec = LayerRecord {
                digest: digest.clone(),
                diff_id,
                size: layer.size,
                entries,
                file_bytes,
            };
            let meta = work.path().join("layer.json");
            std::fs::write(
                &meta,
                serde_json::to_vec_pretty(&rec).expect("serialisable"),
            )
            .map_err(io_err("writing layer record", &meta))?;
            // The blob's and the tree's bytes reach the disk before the names
            // that publish them (see `durable`): one syncfs for both.
            let synced = work.path().to_path_buf();
            tokio::task::spawn_blocking(move || lazylayer_sys::durable::sync_filesystem(&synced))
                .await
                .map_err(|e| StoreError::Worker {
                    what: format!("syncing layer {digest}"),
                    reason: e.to_string(),
                })?
                .map_err(io_err("syncing the extracted layer", work.path()))?;
            // Blob first, then the layer: a layer.json in place means all is there.
            let blob_dest = self.blob_path(digest);
            if !blob_dest.exists() {
                lazylayer_sys::durable::rename_durably(&partial, &blob_dest)
                    .map_err(io_err("storing layer blob", &blob_dest))?;
            } else {
                discard();
            }
            let dest = self.layer_base(digest);
            let work_path = work.keep();
            if let Err(e) = lazylayer_sys::durable::rename_durably(&work_path, &dest) {
                let _ = std::fs::remove_dir_all(&work_path);
                return Err(StoreError::Io(lazylayer_sys::IoError {
                    what: "storing layer".into(),
                    path: dest,
                    source: e,
                }));
            }
            progress.layer_done(digest);
            info!(entries, file_bytes, "layer stored");
            // The layer lock is still ours: eviction skips this layer, and
            // runs on its own thread so the fetch does not wait for it.
            self.enforce_limit_soon();
            Ok(rec)
        }
        .instrument(span)
        .await
    }
}

/// Prefix of the work directories of earlier fetches, set aside in `tmp/`
/// to be removed in the background.
const TRASH_PREFIX: &str = "trash-";

/// Set aside the work directories of this layer's earlier fetches (a
/// process killed or cut mid-fetch leaves its own): the caller holds the
/// layer's lock, so none of them is in use. They are renamed at once and
/// removed on a thread of their own, with any set aside earlier: removing a
/// half-extracted layer's thousands of files can take seconds on a busy
/// disk, which the new extraction (a short run's whole life, maybe) need
/// not wait for. What a process leaves unremoved at exit, the next one
/// (or `prune`) removes.
fn remove_stale_work(tmp: &Path, prefix: &str) {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return;
    };
    let mut set_aside = false;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if name.starts_with(TRASH_PREFIX) {
            set_aside = true;
        } else if name.starts_with(prefix) {
            let (p, trash) = (e.path(), tmp.join(format!("{TRASH_PREFIX}{name}")));
            tracing::debug!(path = %p.display(), "setting aside the work directory of an earlier fetch");
            match std::fs::rename(&p, &trash) {
                Ok(()) => set_aside = true,
                Err(err) => {
                    tracing::warn!(path = %p.display(), error = %err, "cannot set aside an old work directory");
                    if let Err(err) = std::fs::remove_dir_all(&p) {
                        tracing::warn!(path = %p.display(), error = %err, "cannot remove an old work directory");
                    }
                }
            }
        }
    }
    if set_aside {
        let tmp = tmp.to_path_buf();
        std::thread::spawn(move || remove_trash(&tmp));
    }
}

/// Remove the work directories set aside in `tmp/`. Another process may be
/// removing the same: what vanishes meanwhile is not an error.
fn remove_trash(tmp: &Path) {
    let Ok(rd) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in rd.flatten() {
        if !e.file_name().to_string_lossy().starts_with(TRASH_PREFIX) {
            continue;
        }
        let p = e.path();
        match std::fs::remove_dir_all(&p) {
            Ok(()) => tracing::debug!(path = %p.display(), "removed an old work directory"),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => {
                tracing::debug!(path = %p.display(), error = %err, "removing an old work directory")
            }
        }
    }
}

/// A partial download shorter than this is not worth resuming (and too short
/// to sniff the compression from): it is started again.
const MIN_PARTIAL: u64 = 64 * 1024;

/// Open (creating) the partial download of `digest` and hash the prefix it
/// holds, for the download to continue after it. A prefix too short or
/// longer than the blob is emptied.
fn open_partial(
    dir: &Path,
    partial: &Path,
    digest: &Digest,
    size: u64,
) -> Result<lazylayer_oci::BlobResume> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err("creating partial downloads directory", dir))?;
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(partial)
        .map_err(io_err("opening partial download", partial))?;
    let len = f
        .metadata()
        .map_err(io_err("reading partial download", partial))?
        .len();
    let mut resume = lazylayer_oci::BlobResume::start(digest);
    if len < MIN_PARTIAL || len > size {
        f.set_len(0)
            .map_err(io_err("emptying partial download", partial))?;
        return Ok(resume);
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f
            .read(&mut buf)
            .map_err(io_err("reading partial download", partial))?;
        if n == 0 {
            break;
        }
        resume.hasher.update(&buf[..n]);
        resume.offset += n as u64;
    }
    Ok(resume)
}

/// Stops the extraction of a fetch when the fetch's future is dropped.
struct CancelOnDrop(Arc<Received>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// The writing half of a layer fetch: append what the download receives to
/// the partial file, which holds `prefix_len` bytes already (anything past
/// them, hashed by nobody, is dropped). A file left empty (cut before any
/// byte of a blob that has some) is removed. Returns the file's length.
fn keep_received(
    rx: mpsc::Receiver<bytes::Bytes>,
    partial: &Path,
    (prefix_len, size): (u64, u64),
    received: &Received,
    kept: &dyn Fn(u64),
) -> std::io::Result<u64> {
    let opened = std::fs::OpenOptions::new()
        .write(true)
        .open(partial)
        .and_then(|mut out| {
            out.set_len(prefix_len)?;
            out.seek(SeekFrom::Start(prefix_len))?;
            Ok(out)
        });
    let len = match opened {
        Ok(mut out) => write_received(rx, &mut out, received, kept),
        Err(e) => {
            // Dropping `rx` stops the download; the reader must not wait
            // for bytes that will never come.
            received.end();
            Err(e)
        }
    };
    tracing::debug!(partial = %partial.display(), ?len, "download ended; its bytes are kept");
    if matches!(len, Ok(0)) && size > 0 {
        // The layer lock is still held, so no other fetch has this file open.
        let _ = std::fs::remove_file(partial);
    }
    len
}

/// The extracting half of a layer fetch: read the partial file from its
/// start as the download appends to it; decompress, hash the tar (diff_id)
/// and extract it. `consumed` hears how many bytes of the blob have been
/// read. Returns (diff_id, entries, file bytes).
#[allow(clippy::too_many_arguments)]
fn extract_partial(
    partial: &Path,
    received: &Received,
    fs_dir: &Path,
    media_type: &str,
    digest: &Digest,
    opts: &ExtractOptions,
    on_entry: &mut dyn FnMut(&lazylayer_layer::EntryEvent<'_>),
    consumed: &dyn Fn(u64),
) -> Result<(Digest, u64, u64)> {
    let layer_err = |source| StoreError::Layer {
        digest: digest.clone(),
        source,
    };
    let file = std::fs::File::open(partial).map_err(io_err("opening partial download", partial))?;
    let follow = ProgressReader {
        inner: FollowReader {
            file,
            received,
            pos: 0,
        },
        consumed,
    };
    let mut buffered = BufReader::with_capacity(1 << 20, follow);
    let head = buffered
        .fill_buf()
        .map_err(io_err("reading layer stream", partial))?;
    // Trust the bytes over the label: some registries mislabel compression.
    let compression = Compression::sniff(head);
    if let Some(declared) = Compression::from_media_type(media_type) {
        if declared != compression && !head.is_empty() {
            tracing::warn!(
                ?declared,
                ?compression,
                "layer media type disagrees with its content; using the content"
            );
        }
    }
    let (diff_id, stats) = {
        let decoder = lazylayer_layer::decoder(&mut buffered, compression).map_err(layer_err)?;
        let mut hashing = HashingReader::new(decoder);
        let stats =
            lazylayer_layer::extract(&mut hashing, fs_dir, opts, on_entry).map_err(layer_err)?;
        // Drain anything after the tar's end so both digests cover every byte.
        std::io::copy(&mut hashing, &mut std::io::sink())
            .map_err(io_err("reading layer stream", partial))?;
        (
            Digest::from_sha256_bytes(sha2::Digest::finalize(hashing.hasher).into()),
            stats,
        )
    };
    // Read to the download's end, so that the extraction ends with it.
    std::io::copy(&mut buffered, &mut std::io::sink())
        .map_err(io_err("reading layer stream", partial))?;
    Ok((diff_id, stats.entries, stats.file_bytes))
}

/// Tells `consumed` the bytes read so far, after each read.
struct ProgressReader<'a> {
    inner: FollowReader<'a>,
    consumed: &'a dyn Fn(u64),
}

impl Read for ProgressReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        (self.consumed)(self.inner.pos);
        Ok(n)
    }
}

/// Errors that say the bytes received were not the layer (as opposed to a
/// connection, a disk or a lock).
fn is_bad_bytes(e: &StoreError) -> bool {
    use lazylayer_oci::OciError;
    matches!(
        e,
        StoreError::Layer { .. }
            | StoreError::DiffIdMismatch { .. }
            | StoreError::Oci(OciError::DigestMismatch { .. } | OciError::SizeMismatch { .. })
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn partial_with(len: usize) -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("partial/sha256/x");
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        (t, p, data)
    }

    #[test]
    fn a_partial_resumes_after_its_bytes_with_the_hasher_fed() {
        let (_t, p, data) = partial_with(200_000);
        let whole: Vec<u8> = data.iter().chain(b"rest").copied().collect();
        let digest = Digest::sha256_of(&whole);
        let mut r = open_partial(p.parent().unwrap(), &p, &digest, whole.len() as u64).unwrap();
        assert_eq!(r.offset, 200_000);
        r.hasher.update(b"rest");
        assert_eq!(r.hasher.finish(), digest);
    }

    #[test]
    fn partials_too_short_or_too_long_start_over() {
        let digest = Digest::sha256_of(b"x");
        for (len, size) in [(10, 1_000_000), (200_000, 100_000)] {
            let (_t, p, _) = partial_with(len);
            let r = open_partial(p.parent().unwrap(), &p, &digest, size).unwrap();
            assert_eq!(r.offset, 0, "{len} of {size}");
            assert_eq!(std::fs::metadata(&p).unwrap().len(), 0);
        }
    }

    #[test]
    fn the_partial_directory_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("partial/sha256");
        let p = dir.join("y");
        open_partial(&dir, &p, &Digest::sha256_of(b"y"), 10).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }
}
