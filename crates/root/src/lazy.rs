//! An optimized image opened for a lazy start.

use std::sync::Arc;

use lazylayer_fetch::{
    BootBlob, BootChunks, BootContentSource, BootRegion, ChunkedBoot, FetchError, FetchOptions,
    LayerFetcher, LazySource, SeekIndexes, CONNECTIONS_WHILE_WAITING,
};
use lazylayer_fs::{FsOptions, LazyFs};
use lazylayer_index::{BootIndex, INDEX_FILE_NAME};
use lazylayer_oci::manifest::RawManifest;
use lazylayer_oci::{Digest, Reference, RegistryClient, ResolvedImage, ResolvedManifest};
use lazylayer_store::{
    AttachedBoot, ImageRecord, LayerRef, NoEvents, NoProgress, RegistryBlobs, Store,
};

use crate::annotations::{boot_annotations, BootAnnotations};
use crate::{attached, bad};

/// Why an image cannot be opened lazily.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A plain image (no boot layer, none attached that verifies): the
    /// caller falls back to a full pull, with the note, if any, said.
    #[error("{0}")]
    NoBootLayer(NoBootLayer),
    #[error(transparent)]
    Failed(#[from] FetchError),
}

/// An image without a boot layer to start from, and why, when it had
/// attached ones that did not verify (or could not be looked up).
#[derive(Debug)]
pub struct NoBootLayer {
    pub image: String,
    pub note: Option<String>,
}

impl std::fmt::Display for NoBootLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} has no lazylayer boot layer", self.image)?;
        if let Some(n) = &self.note {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

impl OpenError {
    fn plain(reference: &Reference, note: Option<String>) -> OpenError {
        OpenError::NoBootLayer(NoBootLayer {
            image: reference.to_string(),
            note,
        })
    }
}

/// An image opened for a lazy start, from its own boot layer (an optimized
/// image) or one attached to it: boot layer's index loaded, its layers
/// known. Cheap to clone; it fetches nothing by
/// itself: a [`LazyRoot`](crate::LazyRoot) mounts it and fetches the rest.
#[derive(Clone)]
pub struct LazyImage {
    pub(crate) reference: Reference,
    /// The record to save once every layer is local (an optimized image's
    /// boot layer last; an attached one in `attached`).
    pub(crate) record: ImageRecord,
    pub(crate) config_bytes: Vec<u8>,
    pub(crate) index: Arc<BootIndex>,
    pub(crate) boot: BootContentSource,
    /// The layers the index describes, bottom first: all of the image's
    /// when its boot layer is attached, all but the top one else.
    pub(crate) lower: Vec<LayerRef>,
    /// Where the seek indexes of `lower` are.
    pub(crate) seek: SeekIndexes,
    pub(crate) client: Arc<RegistryClient>,
    pub(crate) opts: FetchOptions,
    /// True when everything came from the store, without any network.
    pub(crate) offline: bool,
}

/// The image as resolved, before its boot layer is opened.
struct Resolved {
    raw: RawManifest,
    config_bytes: Vec<u8>,
    layers: Vec<LayerRef>,
    offline: bool,
    /// The own boot layer's index region, fetched beside the config.
    region: Option<Result<BootRegion, FetchError>>,
    /// Boot artifacts: the stored one of a recorded image, or those the
    /// registry lists (Err: why it could not tell).
    attached: Attachments,
}

enum Attachments {
    None,
    Stored(AttachedBoot),
    Listed(Result<Vec<attached::Listed>, String>),
}

/// `request` (the manifest, or the index region when the manifest was
/// kept); if it is long on its way while the `opened` warm-ups (`warm`)
/// are too, the registry is far, and the start set's connections to it are
/// opened meanwhile ([`CONNECTIONS_WHILE_WAITING`]). A warm-up answered
/// first says the registry is near and the request merely slow (a cold
/// disk, a busy registry): more requests would only add to its load.
async fn while_warming<T>(
    client: &RegistryClient,
    reference: &Reference,
    opened: usize,
    warm: lazylayer_oci::WarmUp,
    request: impl std::future::Future<Output = T>,
) -> T {
    // On the heap: the config, region and boot artifacts' requests at once
    // make a future too large for a runtime thread's stack in a debug build.
    let mut request = Box::pin(request);
    let (after, total) = CONNECTIONS_WHILE_WAITING;
    if total > opened {
        tokio::select! {
            r = &mut request => return r,
            () = warm.answered() => {}
            () = tokio::time::sleep(after) => {
                tracing::debug!(image = %reference, waited = ?after, connections = total, "no answer yet: the registry is far, opening the start set's connections");
                client.warm_up(&reference.repository, lazylayer_oci::Purpose::Pull, total - opened);
            }
        }
    }
    request.await
}

/// The manifest a digest reference names, when the store keeps it (an
/// earlier open of the image, or `lazylayer containerd pull` before the
/// snapshotter's): its digest is the reference's, so no registry is
/// needed to trust it. None for a tag (only the registry knows what it
/// names now), an index, or bytes that do not verify.
fn stored_manifest(store: &Store, reference: &Reference) -> Option<ResolvedManifest> {
    let digest = reference.digest.as_ref()?;
    if !store.has_blob(digest) {
        return None;
    }
    let bytes = store.read_blob(digest).ok()?;
    match ResolvedManifest::from_stored(digest.clone(), bytes.into()) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!(image = %reference, error = %e, "stored manifest not used");
            None
        }
    }
}

/// `m` with its config: the store's copy when it keeps one, else the
/// registry's.
async fn stored_or_fetched_config(
    store: &Store,
    client: &RegistryClient,
    reference: &Reference,
    m: ResolvedManifest,
) -> Result<ResolvedImage, lazylayer_oci::OciError> {
    let stored =
        lazylayer_oci::manifest::descriptor_digest(&reference.to_string(), m.parsed.config())
            .ok()
            .filter(|d| store.has_blob(d))
            .and_then(|d| store.read_blob(&d).ok());
    match stored {
        Some(bytes) => m.with_config(reference, bytes.into()),
        None => client.fetch_config(reference, m).await,
    }
}

impl LazyImage {
    /// Open `reference`: from the store when it holds the whole image (no
    /// network at all), else manifest + config + boot layer from the registry.
    /// An image with no boot layer of its own starts from an attached one
    /// that verifies ([`crate::attached`]), else is [`OpenError::NoBootLayer`].
    pub async fn open(
        store: &Store,
        client: Arc<RegistryClient>,
        reference: &Reference,
        opts: FetchOptions,
    ) -> Result<LazyImage, OpenError> {
        let mut r = match crate::local::local_image(store, reference) {
            Some(rec) => {
                let manifest = store
                    .read_blob(&rec.manifest_digest)
                    .map_err(FetchError::from)?;
                let config = store
                    .read_blob(&rec.config_digest)
                    .map_err(FetchError::from)?;
                Resolved {
                    raw: RawManifest {
                        bytes: manifest.into(),
                        media_type: rec.manifest_media_type.clone(),
                        digest: rec.manifest_digest.clone(),
                    },
                    config_bytes: config,
                    layers: rec.layers.clone(),
                    offline: true,
                    region: None,
                    attached: rec.attached.map_or(Attachments::None, Attachments::Stored),
                }
            }
            None => {
                let (image, region, listed) =
                    Self::resolve(store, &client, reference, &opts).await?;
                let layers =
                    lazylayer_store::layer_refs(reference, &image).map_err(FetchError::from)?;
                store
                    .put_blob_bytes(&image.manifest.digest, &image.manifest.bytes)
                    .map_err(FetchError::from)?;
                let config_digest = image.config_digest().map_err(FetchError::from)?;
                store
                    .put_blob_bytes(&config_digest, &image.config_bytes)
                    .map_err(FetchError::from)?;
                Resolved {
                    raw: image.manifest.clone(),
                    config_bytes: image.config_bytes.to_vec(),
                    layers,
                    offline: false,
                    region,
                    attached: listed.map_or(Attachments::None, Attachments::Listed),
                }
            }
        };
        let open = Opener {
            store,
            client: &client,
            reference,
            opts: &opts,
        };
        if let Some(own) = boot_annotations(reference, &r.raw)? {
            let boot = r
                .layers
                .last()
                .filter(|l| l.digest == own.layer)
                .cloned()
                .ok_or_else(|| {
                    OpenError::Failed(bad(
                        reference,
                        format!("the boot layer {} is not the image's top layer", own.layer),
                    ))
                })?;
            let lower = r.layers[..r.layers.len() - 1].to_vec();
            let (index, source) = open
                .boot(&boot, own.region, r.region.take(), &lower)
                .await?;
            let seek = SeekIndexes::Referrers(r.raw.digest.clone());
            return Ok(open.image(r, index, source, lower, seek, None));
        }
        let (found, index, source) = match &r.attached {
            Attachments::None => return Err(OpenError::plain(reference, None)),
            Attachments::Stored(a) => {
                let raw = RawManifest {
                    bytes: store
                        .read_blob(&a.artifact)
                        .map_err(FetchError::from)?
                        .into(),
                    media_type: lazylayer_seek::artifact::OCI_MANIFEST.into(),
                    digest: a.artifact.clone(),
                };
                let found = attached::parse(reference, raw, &r.raw.digest)
                    .map_err(|e| bad(reference, format!("its stored boot artifact: {e}")))?;
                let (index, source) = open
                    .boot(&found.layer, found.boot.region.clone(), None, &r.layers)
                    .await?;
                let seek = SeekIndexes::Known(found.seek.clone());
                let lower = r.layers.clone();
                let rec = Some(a.clone());
                return Ok(open.image(r, index, source, lower, seek, rec));
            }
            Attachments::Listed(Err(why)) => {
                let note = format!("its boot artifacts could not be looked up: {why}");
                return Err(OpenError::plain(reference, Some(note)));
            }
            Attachments::Listed(Ok(listed)) => {
                let tried = attached::to_try(listed, opts.boot_artifact.as_ref());
                if tried.is_empty() {
                    return Err(OpenError::plain(reference, None));
                }
                open.first_attached(&tried, &r.raw.digest, &r.layers)
                    .await
                    .map_err(|note| OpenError::plain(reference, Some(note)))?
            }
        };
        tracing::info!(image = %reference, artifact = %found.raw.digest, "starting from an attached boot layer");
        let record = AttachedBoot {
            artifact: found.raw.digest.clone(),
            layer: found.layer.clone(),
        };
        store
            .put_blob_bytes(&found.raw.digest, &found.raw.bytes)
            .map_err(FetchError::from)?;
        let lower = r.layers.clone();
        let seek = SeekIndexes::Known(found.seek.clone());
        Ok(open.image(r, index, source, lower, seek, Some(record)))
    }

    /// Manifest, then the config and (for a chunked boot layer not in the
    /// store) the boot layer's index region at once: one round trip for
    /// both, where one after the other cost two. An image manifest without
    /// a boot layer gets its boot artifacts listed in that round instead.
    /// The region's result is the caller's to check (None: not fetched here).
    #[allow(clippy::type_complexity)]
    async fn resolve(
        store: &Store,
        client: &Arc<RegistryClient>,
        reference: &Reference,
        opts: &FetchOptions,
    ) -> Result<
        (
            ResolvedImage,
            Option<Result<BootRegion, FetchError>>,
            Option<Result<Vec<attached::Listed>, String>>,
        ),
        OpenError,
    > {
        // After the manifest, the config and the index region go out
        // together: a second connection opened beside the manifest's saves
        // one of them a handshake (a round trip over HTTP/1.1, two over
        // TLS). From a registry the last start measured far, the start
        // set's connections too (it follows two round trips later).
        // One more for an image without a boot layer of its own: its boot
        // artifacts are looked up beside its config, the referrers API and
        // the referrers tag at once (three requests, where an optimized
        // image sends two). A connection not needed then serves the start
        // set, or a plain image's full pull, a moment later.
        let connections =
            lazylayer_fetch::connections_to_open(store, &reference.repository.registry) + 1;
        let warm = client.warm_up(
            &reference.repository,
            lazylayer_oci::Purpose::Pull,
            connections,
        );
        // A manifest kept in the store (by digest) leaves the warm-ups to
        // the index region, the first request then.
        let (m, warm) = match stored_manifest(store, reference) {
            Some(m) => (m, Some(warm)),
            None => {
                let manifest = client.resolve_manifest(reference, &opts.pull.platform);
                let m = while_warming(client, reference, connections, warm, manifest)
                    .await
                    .map_err(FetchError::from)?;
                (m, None)
            }
        };
        let own = boot_annotations(reference, &m.manifest)?;
        let blob = match &own {
            Some(BootAnnotations {
                layer,
                region: Some((region_len, region_digest)),
            }) if store.layer_dir(layer).is_none() => m
                .parsed
                .layers()
                .last()
                .filter(|d| d.digest().to_string() == layer.to_string())
                .map(|d| (layer.clone(), d.size(), *region_len, region_digest.clone())),
            _ => None,
        };
        let image_name = reference.to_string();
        let opens_connection = warm.is_some();
        let region = async {
            let (digest, size, region_len, region_digest) = blob.as_ref()?;
            Some(
                BootChunks::fetch_region(
                    store,
                    BootBlob {
                        image: &image_name,
                        client: client.clone(),
                        repo: reference.repository.clone(),
                        digest,
                        size: *size,
                        region_len: *region_len,
                        region_digest,
                        opens_connection,
                    },
                )
                .await,
            )
        };
        let subject = m.manifest.digest.clone();
        let listed = async {
            own.is_none()
                .then(|| attached::list(client, reference, &subject))?
                .await
                .into()
        };
        let rest = async {
            tokio::join!(
                stored_or_fetched_config(store, client, reference, m),
                region,
                listed
            )
        };
        let (image, region, listed) = match warm {
            Some(warm) => while_warming(client, reference, connections, warm, rest).await,
            None => rest.await,
        };
        Ok((image.map_err(FetchError::from)?, region, listed))
    }

    /// The reference its record is (or will be) filed under in the store.
    pub fn record_reference(&self) -> String {
        self.record.reference.clone()
    }

    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// The image's layers, bottom first (the boot layer last).
    pub fn layers(&self) -> &[LayerRef] {
        &self.record.layers
    }

    /// The image's config blob.
    pub fn config_bytes(&self) -> &[u8] {
        &self.config_bytes
    }

    /// True when everything came from the store, without any network.
    pub fn offline(&self) -> bool {
        self.offline
    }

    /// The chunked boot layer being fetched, if the image started from one.
    pub fn boot_chunks(&self) -> Option<&BootChunks> {
        match &self.boot {
            BootContentSource::Chunks(c) => Some(c),
            BootContentSource::Dir(_) => None,
        }
    }

    /// True when the boot layer is stored whole (no chunk left to fetch).
    pub(crate) fn boot_stored(&self) -> bool {
        self.boot_chunks().is_none_or(|c| c.stored())
    }

    /// A fetcher for the layers below the boot layer (index order).
    pub(crate) fn fetcher(&self, store: &Store) -> LayerFetcher {
        let lower = &self.lower;
        LayerFetcher::new(
            store.clone(),
            Arc::new(RegistryBlobs::new(
                self.client.clone(),
                self.reference.repository.clone(),
            )),
            lower.to_vec(),
            self.opts.clone(),
            tokio::runtime::Handle::current(),
        )
    }

    /// The image's merged root as a file system, reading through `fetcher`.
    pub(crate) fn file_system(
        &self,
        fetcher: &LayerFetcher,
        opts: FsOptions,
    ) -> LazyFs<LazySource> {
        let source = LazySource::new(
            &self.reference,
            self.seek.clone(),
            self.client.clone(),
            fetcher,
            self.boot.clone(),
            self.index.external.clone(),
            self.offline,
            self.record.attached.is_some(),
        );
        LazyFs::new(self.index.clone(), source, None, opts)
    }
}

/// What opening a boot layer needs, shared by an image's own and attached
/// ones.
struct Opener<'a> {
    store: &'a Store,
    client: &'a Arc<RegistryClient>,
    reference: &'a Reference,
    opts: &'a FetchOptions,
}

impl Opener<'_> {
    /// Open boot layer `boot` (its index region `region`, already fetched
    /// when `fetched` is Some) and check its index describes `lower`.
    async fn boot(
        &self,
        boot: &LayerRef,
        region: Option<(u64, Digest)>,
        fetched: Option<Result<BootRegion, FetchError>>,
        lower: &[LayerRef],
    ) -> Result<(BootIndex, BootContentSource), FetchError> {
        let (store, client, reference) = (self.store, self.client, self.reference);
        let (index, source) = match region {
            // A chunked boot layer not in the store yet: the index first,
            // the content while the container runs.
            Some((region_len, region_digest)) if store.layer_dir(&boot.digest).is_none() => {
                let fetched = match fetched {
                    Some(r) => r?,
                    None => {
                        BootChunks::fetch_region(
                            store,
                            BootBlob {
                                image: &reference.to_string(),
                                client: client.clone(),
                                repo: reference.repository.clone(),
                                digest: &boot.digest,
                                size: boot.size,
                                region_len,
                                region_digest: &region_digest,
                                opens_connection: false,
                            },
                        )
                        .await?
                    }
                };
                let (index, chunks) = BootChunks::open(
                    store,
                    fetched,
                    ChunkedBoot {
                        image: &reference.to_string(),
                        layer: boot,
                        region_len,
                        region_digest: &region_digest,
                        read_timeout: self.opts.read_timeout,
                        pull: self.opts.pull.clone(),
                    },
                )?;
                (index, BootContentSource::Chunks(chunks))
            }
            _ => {
                store
                    .ensure_layer(
                        &RegistryBlobs::new(&**client, reference.repository.clone()),
                        boot,
                        &self.opts.pull,
                        Arc::new(NoProgress),
                        Arc::new(NoEvents),
                    )
                    .await
                    .map_err(FetchError::from)?;
                let boot_dir = store.layer_fs_path(&boot.digest);
                let index_path = boot_dir.join(INDEX_FILE_NAME);
                let bytes = std::fs::read(&index_path)
                    .map_err(lazylayer_sys::IoError::on(
                        "reading the boot index",
                        &index_path,
                    ))
                    .map_err(FetchError::Io)?;
                let index = BootIndex::decode(&bytes).map_err(|source| FetchError::Index {
                    image: reference.to_string(),
                    source,
                })?;
                (index, BootContentSource::Dir(boot_dir))
            }
        };
        let expected: Vec<String> = lower.iter().map(|l| l.diff_id.to_string()).collect();
        if index.layers != expected {
            if let BootContentSource::Chunks(c) = &source {
                c.stop_background();
            }
            return Err(bad(
                reference,
                "the boot index describes other layers than the image has",
            ));
        }
        Ok((index, source))
    }

    /// The first of the boot artifacts `tried` that verifies: attached to
    /// `subject`, its index describing `layers`. Err: why none did, a note
    /// for the user.
    async fn first_attached(
        &self,
        tried: &[attached::Listed],
        subject: &Digest,
        layers: &[LayerRef],
    ) -> Result<(attached::Attached, BootIndex, BootContentSource), String> {
        let mut refused = Vec::new();
        for listed in tried {
            let digest = &listed.digest;
            match self.try_attached(listed, subject, layers).await {
                Ok(found) => return Ok(found),
                Err(why) => {
                    tracing::info!(image = %self.reference, artifact = %digest, %why, "boot artifact refused");
                    refused.push(format!("{digest}: {why}"));
                }
            }
        }
        Err(match refused.len() {
            1 => format!("its boot artifact was refused: {}", refused[0]),
            n => format!(
                "its {n} boot artifacts were refused: {}",
                refused.join("; ")
            ),
        })
    }

    async fn try_attached(
        &self,
        listed: &attached::Listed,
        subject: &Digest,
        layers: &[LayerRef],
    ) -> Result<(attached::Attached, BootIndex, BootContentSource), String> {
        let (store, reference) = (self.store, self.reference);
        let image = reference.to_string();
        // The index region, where the listing says it is, beside the
        // artifact: one round trip for both.
        let region = async {
            let h = listed.hint.as_ref()?;
            if store.layer_dir(&h.layer).is_some() {
                return None;
            }
            let blob = BootBlob {
                image: &image,
                client: self.client.clone(),
                repo: reference.repository.clone(),
                digest: &h.layer,
                size: h.size,
                region_len: h.region.0,
                region_digest: &h.region.1,
                opens_connection: false,
            };
            Some(BootChunks::fetch_region(store, blob).await)
        };
        let fetched = attached::fetch(self.client, reference, &listed.digest, subject);
        let (found, region) = tokio::join!(fetched, region);
        let found = found?;
        // On the listing's word only: used when the artifact names the same.
        let region = region.filter(|_| listed.hint.as_ref().is_some_and(|h| h.matches(&found)));
        let (index, source) = self
            .boot(&found.layer, found.boot.region.clone(), region, layers)
            .await
            .map_err(|e| match e {
                FetchError::BadImage { reason, .. } => reason,
                e => lazylayer_sys::error_chain(&e),
            })?;
        Ok((found, index, source))
    }

    /// The opened image.
    fn image(
        &self,
        r: Resolved,
        index: BootIndex,
        boot: BootContentSource,
        lower: Vec<LayerRef>,
        seek: SeekIndexes,
        attached: Option<AttachedBoot>,
    ) -> LazyImage {
        let record = ImageRecord {
            reference: lazylayer_store::reference_key(self.reference),
            manifest_digest: r.raw.digest.clone(),
            manifest_media_type: r.raw.media_type.clone(),
            index_digest: None,
            config_digest: Digest::sha256_of(&r.config_bytes),
            layers: r.layers,
            platform: self.opts.pull.platform.to_string(),
            pulled_at: lazylayer_store::unix_now(),
            attached,
        };
        LazyImage {
            reference: self.reference.clone(),
            record,
            config_bytes: r.config_bytes,
            index: Arc::new(index),
            boot,
            lower,
            seek,
            client: self.client.clone(),
            opts: self.opts.clone(),
            offline: r.offline,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    /// Each request's line (method and path), as a test registry saw them.
    type Requests = Arc<Mutex<Vec<String>>>;

    /// A registry that holds a manifest request until `manifest_after`
    /// connections were accepted, and any other (the warm-ups' `GET /v2/`)
    /// until `others_after` were, each at most `at_most`; then answers a
    /// manifest 404 and anything else 200. Returns its port, the number
    /// of connections accepted when the first manifest answer went out, and
    /// every request's line (method and path).
    fn holding_registry(
        manifest_after: usize,
        others_after: usize,
        at_most: Duration,
    ) -> (u16, Arc<Mutex<Option<usize>>>, Requests) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let at_answer = Arc::new(Mutex::new(None));
        let lines = Arc::new(Mutex::new(Vec::new()));
        let (seen, logged) = (at_answer.clone(), lines.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (accepted, seen, logged) = (accepted.clone(), seen.clone(), logged.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    // One request per read: the client waits for each answer.
                    while let Ok(n @ 1..) = c.read(&mut buf) {
                        let text = String::from_utf8_lossy(&buf[..n]);
                        let line = text.lines().next().unwrap_or_default().to_string();
                        logged.lock().unwrap().push(line);
                        let manifest = text.contains("/manifests/");
                        let after = if manifest {
                            manifest_after
                        } else {
                            others_after
                        };
                        let t0 = Instant::now();
                        while accepted.load(Ordering::SeqCst) < after && t0.elapsed() < at_most {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        let answer = if manifest {
                            seen.lock()
                                .unwrap()
                                .get_or_insert(accepted.load(Ordering::SeqCst));
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
                        } else {
                            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
                        };
                        if c.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, at_answer, lines)
    }

    /// Opens `127.0.0.1:port/x/y:latest` (a 404 manifest) from an empty
    /// store: the registry's first start on this node.
    async fn open_first(port: u16) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let client = Arc::new(RegistryClient::new(Default::default()).unwrap());
        let r: Reference = format!("127.0.0.1:{port}/x/y:latest").parse().unwrap();
        let opened = LazyImage::open(&store, client, &r, FetchOptions::default()).await;
        assert!(opened.is_err(), "a 404 manifest opened an image");
    }

    /// An image named by digest whose manifest and config the store keeps
    /// (as `lazylayer containerd pull` leaves them for the snapshotter)
    /// opens without asking the registry for either; on main both were
    /// fetched again, two round trips before the boot layer's first. This
    /// one has no boot layer, so its open ends at the boot artifacts'
    /// lookup (the only requests it sends besides the warm-ups).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_digest_reference_opens_from_the_manifest_and_config_the_store_keeps() {
        let (port, _, lines) = holding_registry(0, 0, Duration::ZERO);
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let config_digest = Digest::sha256_of(config);
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","size":{},"digest":"{config_digest}"}},"layers":[]}}"#,
            config.len()
        );
        let digest = Digest::sha256_of(manifest.as_bytes());
        store.put_blob_bytes(&digest, manifest.as_bytes()).unwrap();
        store.put_blob_bytes(&config_digest, config).unwrap();
        let client = Arc::new(RegistryClient::new(Default::default()).unwrap());
        let r: Reference = format!("127.0.0.1:{port}/x/y@{digest}").parse().unwrap();
        let opened = LazyImage::open(&store, client, &r, FetchOptions::default()).await;
        assert!(
            matches!(opened, Err(OpenError::NoBootLayer(_))),
            "an image without a boot layer opened, or failed otherwise"
        );
        let lines = lines.lock().unwrap().clone();
        let fetched: Vec<&String> = lines
            .iter()
            .filter(|l| l.contains(&format!("/manifests/{digest}")) || l.contains("/blobs/"))
            .collect();
        assert!(
            fetched.is_empty(),
            "fetched again: {fetched:?} (all: {lines:?})"
        );
    }

    /// The first start from a registry knows nothing of its distance; a
    /// manifest long on its way, while the warm-ups beside it are too, has
    /// the start set's connections opened while it is awaited, all of them
    /// before it comes (on main: the manifest's own and two warm-ups,
    /// whatever the wait).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_far_registrys_manifest_has_the_start_sets_connections_opened_meanwhile() {
        // The warm-ups and the manifest's own connection.
        let wanted = CONNECTIONS_WHILE_WAITING.1 + 1;
        let (port, at_answer, _) = holding_registry(wanted, wanted, Duration::from_secs(5));
        open_first(port).await;
        assert_eq!(*at_answer.lock().unwrap(), Some(wanted));
    }

    /// A registry that answers the warm-ups within milliseconds is near,
    /// however long its manifest takes (a cold disk, a busy registry): it
    /// gets no more connections than before (seen opening 31 before the
    /// warm-ups' answer counted).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_near_registrys_slow_manifest_opens_no_more_connections() {
        // Held well past the wait that would open more.
        let hold = CONNECTIONS_WHILE_WAITING.0 * 6;
        // The warm-ups are answered once the three connections are open, so
        // that the manifest cannot go out on a warm-up's connection.
        let (port, at_answer, _) = holding_registry(CONNECTIONS_WHILE_WAITING.1 + 1, 3, hold);
        open_first(port).await;
        // Two warm-ups (a config and an index region's) and the manifest's.
        assert_eq!(*at_answer.lock().unwrap(), Some(3));
    }
}
