//! An optimized image opened for a lazy start.

use std::sync::Arc;

use lazylayer_fetch::{
    BootBlob, BootChunks, BootContentSource, BootRegion, ChunkedBoot, FetchError, FetchOptions,
    LayerFetcher, LazySource,
};
use lazylayer_fs::{FsOptions, LazyFs};
use lazylayer_index::{BootIndex, INDEX_FILE_NAME};
use lazylayer_oci::manifest::RawManifest;
use lazylayer_oci::{Digest, Reference, RegistryClient, ResolvedImage};
use lazylayer_store::{ImageRecord, LayerRef, NoEvents, NoProgress, RegistryBlobs, Store};

use crate::annotations::{boot_annotations, BootAnnotations};
use crate::bad;

/// Why an image cannot be opened lazily.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// A plain image: the caller falls back to a full pull.
    #[error("{0} has no lazylayer boot layer")]
    NoBootLayer(String),
    #[error(transparent)]
    Failed(#[from] FetchError),
}

/// An optimized image opened for a lazy start: boot layer local, index
/// loaded, its other layers known. Cheap to clone; it fetches nothing by
/// itself: a [`LazyRoot`](crate::LazyRoot) mounts it and fetches the rest.
#[derive(Clone)]
pub struct LazyImage {
    pub(crate) reference: Reference,
    /// The record to save once every layer is local (boot layer last).
    pub(crate) record: ImageRecord,
    pub(crate) config_bytes: Vec<u8>,
    pub(crate) index: Arc<BootIndex>,
    pub(crate) boot: BootContentSource,
    pub(crate) client: Arc<RegistryClient>,
    pub(crate) opts: FetchOptions,
    /// True when everything came from the store, without any network.
    pub(crate) offline: bool,
}

impl LazyImage {
    /// Open `reference`: from the store when it holds the whole image (no
    /// network at all), else manifest + config + boot layer from the registry.
    pub async fn open(
        store: &Store,
        client: Arc<RegistryClient>,
        reference: &Reference,
        opts: FetchOptions,
    ) -> Result<LazyImage, OpenError> {
        let local = crate::local::local_image(store, reference);
        let (raw, config_bytes, layers, offline, fetched_region) = match local {
            Some(rec) => {
                let manifest = store
                    .read_blob(&rec.manifest_digest)
                    .map_err(FetchError::from)?;
                let config = store
                    .read_blob(&rec.config_digest)
                    .map_err(FetchError::from)?;
                let raw = RawManifest {
                    bytes: manifest.into(),
                    media_type: rec.manifest_media_type.clone(),
                    digest: rec.manifest_digest.clone(),
                };
                (raw, config, rec.layers.clone(), true, None)
            }
            None => {
                let (image, region) = Self::resolve(store, &client, reference, &opts).await?;
                let layers =
                    lazylayer_store::layer_refs(reference, &image).map_err(FetchError::from)?;
                store
                    .put_blob_bytes(&image.manifest.digest, &image.manifest.bytes)
                    .map_err(FetchError::from)?;
                let config_digest = image.config_digest().map_err(FetchError::from)?;
                store
                    .put_blob_bytes(&config_digest, &image.config_bytes)
                    .map_err(FetchError::from)?;
                (
                    image.manifest.clone(),
                    image.config_bytes.to_vec(),
                    layers,
                    false,
                    region,
                )
            }
        };
        let BootAnnotations {
            layer: boot_digest,
            region,
        } = boot_annotations(reference, &raw)?
            .ok_or_else(|| OpenError::NoBootLayer(reference.to_string()))?;
        let boot = layers
            .last()
            .filter(|l| l.digest == boot_digest)
            .cloned()
            .ok_or_else(|| {
                OpenError::Failed(bad(
                    reference,
                    format!("the boot layer {boot_digest} is not the image's top layer"),
                ))
            })?;
        let (index, boot_source) = match region {
            // A chunked boot layer not in the store yet: the index first,
            // the content while the container runs.
            Some((region_len, region_digest)) if store.layer_dir(&boot.digest).is_none() => {
                let fetched = match fetched_region {
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
                        layer: &boot,
                        region_len,
                        region_digest: &region_digest,
                        read_timeout: opts.read_timeout,
                        pull: opts.pull.clone(),
                    },
                )?;
                (index, BootContentSource::Chunks(chunks))
            }
            _ => {
                store
                    .ensure_layer(
                        &RegistryBlobs::new(&*client, reference.repository.clone()),
                        &boot,
                        &opts.pull,
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
        let lower = &layers[..layers.len() - 1];
        let expected: Vec<String> = lower.iter().map(|l| l.diff_id.to_string()).collect();
        if index.layers != expected {
            return Err(bad(
                reference,
                "the boot index describes other layers than the image has",
            )
            .into());
        }
        let config_digest = Digest::sha256_of(&config_bytes);
        let record = ImageRecord {
            reference: lazylayer_store::reference_key(reference),
            manifest_digest: raw.digest.clone(),
            manifest_media_type: raw.media_type.clone(),
            index_digest: None,
            config_digest,
            layers: layers.clone(),
            platform: opts.pull.platform.to_string(),
            pulled_at: lazylayer_store::unix_now(),
        };
        Ok(LazyImage {
            reference: reference.clone(),
            record,
            config_bytes,
            index: Arc::new(index),
            boot: boot_source,
            client,
            opts,
            offline,
        })
    }

    /// Manifest, then the config and (for a chunked boot layer not in the
    /// store) the boot layer's index region at once: one round trip for
    /// both, where one after the other cost two. The region's result is
    /// the caller's to check (None: not fetched here).
    async fn resolve(
        store: &Store,
        client: &Arc<RegistryClient>,
        reference: &Reference,
        opts: &FetchOptions,
    ) -> Result<(ResolvedImage, Option<Result<BootRegion, FetchError>>), OpenError> {
        // After the manifest, the config and the index region go out
        // together: a second connection opened beside the manifest's saves
        // one of them a handshake (a round trip over HTTP/1.1, two over
        // TLS). From a registry the last start measured far, the start
        // set's connections too (it follows two round trips later).
        let connections =
            lazylayer_fetch::connections_to_open(store, &reference.repository.registry);
        client.warm_up(
            &reference.repository,
            lazylayer_oci::Purpose::Pull,
            connections,
        );
        let m = client
            .resolve_manifest(reference, &opts.pull.platform)
            .await
            .map_err(FetchError::from)?;
        let blob = match boot_annotations(reference, &m.manifest)? {
            Some(BootAnnotations {
                layer,
                region: Some((region_len, region_digest)),
            }) if store.layer_dir(&layer).is_none() => m
                .parsed
                .layers()
                .last()
                .filter(|d| d.digest().to_string() == layer.to_string())
                .map(|d| (layer, d.size(), region_len, region_digest)),
            _ => None,
        };
        let image_name = reference.to_string();
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
                    },
                )
                .await,
            )
        };
        let (image, region) = tokio::join!(client.fetch_config(reference, m), region);
        Ok((image.map_err(FetchError::from)?, region))
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
        let lower = &self.record.layers[..self.record.layers.len() - 1];
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
            &self.record.manifest_digest,
            self.client.clone(),
            fetcher,
            self.boot.clone(),
            self.index.external.clone(),
            self.offline,
        );
        LazyFs::new(self.index.clone(), source, None, opts)
    }
}
