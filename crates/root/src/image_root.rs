//! An image's root for a container: lazily behind FUSE when the image has a
//! boot layer (its own, or one attached to it), else pulled fully and stacked from the store's extracted layers
//! (the fallback every plain image gets). An optimized image the store holds
//! whole is stacked from the store too: no FUSE once everything is local.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazylayer_fetch::{FetchError, FetchOptions};
use lazylayer_oci::{Reference, RegistryClient};
use lazylayer_store::{Pin, PullProgress, Store};

use crate::{LazyRoot, MountOptions, OpenError};

pub struct ImageRoot {
    /// Pinned, mounted, prefetching, recorded once complete; None for a
    /// fully pulled image.
    lazy: Option<LazyRoot>,
    /// Top first.
    lowers: Vec<PathBuf>,
    /// Data-only lowers below them, in order (a lazy root served as a stub
    /// tree: [`LazyRoot::stack`]).
    data_lowers: Vec<PathBuf>,
    config_bytes: Vec<u8>,
    /// An optimized image served from the store's layers without FUSE.
    native: bool,
    /// Keeps `prune` and eviction off the layers a native or fully pulled
    /// root stacks (a lazy root pins its own).
    _pin: Option<Pin>,
}

impl ImageRoot {
    /// Open `reference` lazily, mounted at `mount_at` (an empty directory)
    /// and pinned as `pin_name`; an image without a boot layer is pulled in
    /// full instead, `progress` told first (`full_pull`) and then of each layer.
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        store: &Store,
        client: Arc<RegistryClient>,
        reference: &Reference,
        opts: FetchOptions,
        pin_name: &str,
        mount_at: &Path,
        mount: MountOptions,
        progress: Arc<dyn PullProgress>,
    ) -> Result<ImageRoot, FetchError> {
        if let Some(root) = ImageRoot::open_native(store, reference, pin_name)? {
            store.touch_image(&lazylayer_store::reference_key(reference));
            return Ok(root);
        }
        let pull = opts.pull.clone();
        match LazyRoot::open(store, client.clone(), reference, opts, pin_name).await {
            Ok(mut root) => {
                root.mount(mount_at, mount)?;
                let (lowers, data_lowers) = match root.stack() {
                    Some(s) => (s.lowers, s.data),
                    None => (vec![mount_at.to_path_buf()], Vec::new()),
                };
                Ok(ImageRoot {
                    lowers,
                    data_lowers,
                    config_bytes: root.config_bytes().to_vec(),
                    lazy: Some(root),
                    native: false,
                    _pin: None,
                })
            }
            Err(OpenError::NoBootLayer(why)) => {
                progress.full_pull(reference, why.note.as_deref());
                // Pinned from the pull on: the eviction a pull triggers,
                // and prune, must leave the running container's layers.
                let (rec, pin) = store
                    .pull_pinned(&client, reference, &pull, progress, pin_name)
                    .await?;
                let lowers = rec
                    .layers
                    .iter()
                    .rev()
                    .filter_map(|l| store.layer_dir(&l.digest))
                    .collect();
                Ok(ImageRoot {
                    lazy: None,
                    lowers,
                    data_lowers: Vec::new(),
                    config_bytes: store.read_blob(&rec.config_digest)?,
                    native: false,
                    _pin: Some(pin),
                })
            }
            Err(OpenError::Failed(e)) => Err(e),
        }
    }

    /// An optimized image the store holds whole (image record, every layer
    /// extracted, the boot layer included): the kernel's overlayfs over the
    /// store's layers, no FUSE and no network. None when it is not that.
    fn open_native(
        store: &Store,
        reference: &Reference,
        pin_name: &str,
    ) -> Result<Option<ImageRoot>, FetchError> {
        let Some(rec) = crate::local_image(store, reference) else {
            return Ok(None);
        };
        if !crate::is_optimized(store, reference, &rec)? {
            return Ok(None);
        }
        let Some(lowers) = crate::stacked_lowers(store, &rec.layers)? else {
            return Ok(None);
        };
        let pin = store.pin_guard(pin_name, &rec.digests())?;
        tracing::info!(image = %reference, layers = rec.layers.len(), "every layer is local: kernel overlayfs over the store, no FUSE");
        Ok(Some(ImageRoot {
            lazy: None,
            lowers,
            data_lowers: Vec::new(),
            config_bytes: store.read_blob(&rec.config_digest)?,
            native: true,
            _pin: Some(pin),
        }))
    }

    /// True for an optimized image stacked from the store without FUSE.
    pub fn native(&self) -> bool {
        self.native
    }

    pub fn lazy(&self) -> Option<&LazyRoot> {
        self.lazy.as_ref()
    }

    /// The directories to stack, top first.
    pub fn lowers(&self) -> &[PathBuf] {
        &self.lowers
    }

    /// Data-only lowers below [`Self::lowers`], in the order tried.
    pub fn data_lowers(&self) -> &[PathBuf] {
        &self.data_lowers
    }

    pub fn config_bytes(&self) -> &[u8] {
        &self.config_bytes
    }
}
