//! Full pull of an image into the store: every layer is streamed, hashed,
//! decompressed and extracted in one pass (the download never waits for the
//! extraction to finish, nor the other way round), then verified and renamed
//! into place.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use lazylayer_layer::{Compression, ExtractOptions};
use lazylayer_oci::manifest::descriptor_digest;
use lazylayer_oci::{Digest, Platform, Reference, RegistryClient, Repository, ResolvedImage};
use tokio::sync::mpsc;
use tracing::{info, info_span, Instrument};

use crate::reader::{ChannelReader, HashingReader, TeeReader};
use crate::{io_err, FileLock, ImageRecord, LayerRecord, LayerRef, Result, Store, StoreError};

/// Receives pull progress; the CLI draws bars from it, tests count calls.
pub trait PullProgress: Send + Sync {
    fn image_resolved(&self, _image: &ResolvedImage) {}
    /// `cached`: the layer is in the store already and will not be fetched.
    fn layer_start(&self, _digest: &Digest, _size: u64, _cached: bool) {}
    fn layer_bytes(&self, _digest: &Digest, _n: u64) {}
    fn layer_done(&self, _digest: &Digest) {}
    /// The layer is being extracted into `fs_dir` (a temporary directory,
    /// renamed into the store when the layer is verified).
    fn layer_extracting(&self, _digest: &Digest, _fs_dir: &Path) {}
    /// One tar entry is fully on disk under the `fs_dir` given above: a lazy
    /// file system may serve it now, before the layer is complete.
    fn layer_entry(&self, _digest: &Digest, _path: &Path) {}
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
        let span = info_span!("pull", image = %reference);
        async {
            let _store_lock = FileLock::shared_async(&self.lock_path("store.lock")).await?;
            let image = client.resolve(reference, &opts.platform).await?;
            progress.image_resolved(&image);
            let what = reference.to_string();
            let diff_ids = image.diff_ids()?;
            if diff_ids.len() != image.layers().len() {
                return Err(StoreError::BadImage {
                    reference: what,
                    reason: format!(
                        "{} layers but {} diff_ids in the config",
                        image.layers().len(),
                        diff_ids.len()
                    ),
                });
            }
            if let Some(idx) = &image.index {
                self.put_blob_bytes(&idx.digest, &idx.bytes)?;
            }
            self.put_blob_bytes(&image.manifest.digest, &image.manifest.bytes)?;
            let config_digest = image.config_digest()?;
            self.put_blob_bytes(&config_digest, &image.config_bytes)?;

            let mut layers = Vec::new();
            for (desc, diff_id) in image.layers().iter().zip(diff_ids) {
                layers.push(LayerRef {
                    digest: descriptor_digest(&what, desc)?,
                    diff_id,
                    size: desc.size(),
                    media_type: desc.media_type().to_string(),
                });
            }
            let repo = &reference.repository;
            let results: Vec<Result<LayerRecord>> = futures_util::stream::iter(layers.iter())
                .map(|l| self.ensure_layer(client, repo, l, opts, progress.clone()))
                .buffer_unordered(opts.concurrency.max(1))
                .collect()
                .await;
            for r in results {
                r?;
            }
            let rec = ImageRecord {
                reference: crate::reference_key(reference),
                manifest_digest: image.manifest.digest.clone(),
                manifest_media_type: image.manifest.media_type.clone(),
                index_digest: image.index.as_ref().map(|i| i.digest.clone()),
                config_digest,
                layers,
                platform: opts.platform.to_string(),
                pulled_at: unix_now(),
            };
            self.save_image(&rec)?;
            info!(manifest = %rec.manifest_digest, "pulled");
            Ok(rec)
        }
        .instrument(span)
        .await
    }

    /// Make sure one layer is extracted in the store, fetching it if needed.
    /// Safe against other processes doing the same: the per-layer lock makes
    /// the second one wait and then find the layer done.
    pub async fn ensure_layer(
        &self,
        client: &RegistryClient,
        repo: &Repository,
        layer: &LayerRef,
        opts: &PullOptions,
        progress: Arc<dyn PullProgress>,
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
            let _lock =
                FileLock::exclusive_async(&self.lock_path(&format!("{}.lock", digest.hex())))
                    .await?;
            if let Some(r) = self.layer_record(digest) {
                progress.layer_start(digest, layer.size, true);
                progress.layer_done(digest);
                return Ok(r);
            }
            progress.layer_start(digest, layer.size, false);
            let work = tempfile::Builder::new()
                .prefix("layer-")
                .tempdir_in(self.tmp_dir())
                .map_err(io_err("creating work directory", &self.tmp_dir()))?;
            let blob_tmp = work.path().join("blob");
            let fs_dir = work.path().join("fs");
            std::fs::create_dir(&fs_dir).map_err(io_err("creating layer directory", &fs_dir))?;

            // The channel is bounded so a slow disk throttles the download
            // instead of buffering the layer in memory.
            progress.layer_extracting(digest, &fs_dir);
            let (tx, rx) = mpsc::channel::<bytes::Bytes>(32);
            let consumer = {
                let blob_tmp = blob_tmp.clone();
                let fs_dir = fs_dir.clone();
                let eopts = opts.extract.clone();
                let media_type = layer.media_type.clone();
                let digest = digest.clone();
                let progress = progress.clone();
                tokio::task::spawn_blocking(move || {
                    let on_entry = &mut |ev: &lazylayer_layer::EntryEvent<'_>| {
                        progress.layer_entry(&digest, ev.path)
                    };
                    extract_stream(
                        rx,
                        &blob_tmp,
                        &fs_dir,
                        &media_type,
                        &digest,
                        &eopts,
                        on_entry,
                    )
                })
            };
            let p = progress.clone();
            let d2 = digest.clone();
            let downloaded = client
                .download_blob(repo, digest, Some(layer.size), tx, &move |n| {
                    p.layer_bytes(&d2, n)
                })
                .await;
            let extracted = consumer.await.map_err(|e| StoreError::Worker {
                what: format!("extracting layer {digest}"),
                reason: e.to_string(),
            })?;
            let (diff_id, entries, file_bytes) = match (downloaded, extracted) {
                // The extractor failing first makes the downloader see a closed channel.
                (Err(lazylayer_oci::OciError::ConsumerGone { .. }), Err(e)) => return Err(e),
                (Err(e), _) => return Err(e.into()),
                (Ok(_), Err(e)) => return Err(e),
                (Ok(_), Ok(v)) => v,
            };
            if diff_id != layer.diff_id {
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
            // Blob first, then the layer: a layer.json in place means all is there.
            let blob_dest = self.blob_path(digest);
            if !blob_dest.exists() {
                std::fs::rename(&blob_tmp, &blob_dest)
                    .map_err(io_err("storing layer blob", &blob_dest))?;
            } else {
                let _ = std::fs::remove_file(&blob_tmp);
            }
            let dest = self.layer_base(digest);
            let work_path = work.keep();
            if let Err(e) = std::fs::rename(&work_path, &dest) {
                let _ = std::fs::remove_dir_all(&work_path);
                return Err(StoreError::Io {
                    what: "storing layer".into(),
                    path: dest,
                    source: e,
                });
            }
            progress.layer_done(digest);
            info!(entries, file_bytes, "layer stored");
            Ok(rec)
        }
        .instrument(span)
        .await
    }
}

/// The blocking half of a layer fetch: tee the compressed stream to the blob
/// file, decompress, hash the tar (diff_id) and extract it. Returns
/// (diff_id, entries, file bytes).
fn extract_stream(
    rx: mpsc::Receiver<bytes::Bytes>,
    blob_tmp: &Path,
    fs_dir: &Path,
    media_type: &str,
    digest: &Digest,
    opts: &ExtractOptions,
    on_entry: &mut dyn FnMut(&lazylayer_layer::EntryEvent<'_>),
) -> Result<(Digest, u64, u64)> {
    let layer_err = |source| StoreError::Layer {
        digest: digest.clone(),
        source,
    };
    let file = std::fs::File::create(blob_tmp).map_err(io_err("creating blob file", blob_tmp))?;
    let tee = TeeReader {
        inner: ChannelReader::new(rx),
        out: BufWriter::with_capacity(1 << 20, file),
    };
    let mut buffered = BufReader::with_capacity(1 << 20, tee);
    let head = buffered
        .fill_buf()
        .map_err(io_err("reading layer stream", blob_tmp))?;
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
            .map_err(io_err("reading layer stream", blob_tmp))?;
        (
            Digest::from_sha256_bytes(sha2::Digest::finalize(hashing.hasher).into()),
            stats,
        )
    };
    // Whatever the decompressor left unread still belongs to the blob file.
    std::io::copy(&mut buffered, &mut std::io::sink())
        .map_err(io_err("reading layer stream", blob_tmp))?;
    let mut tee = buffered.into_inner();
    tee.out
        .flush()
        .map_err(io_err("writing blob file", blob_tmp))?;
    Ok((diff_id, stats.entries, stats.file_bytes))
}
