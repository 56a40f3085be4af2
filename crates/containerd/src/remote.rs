//! The snapshotter proper: [`Snapshots`] plus optimized images, which it
//! claims as remote snapshots on Prepare and serves through one lazy FUSE
//! mount per image while containers use it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lazylayer_fetch::{FetchError, FetchOptions, LazyImage, LazyRoot, MountOptions, OpenError};
use lazylayer_fs::FsOptions;
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_store::{NoEvents, NoProgress, PullOptions, RegistryBlobs, Store};
use tokio::sync::Mutex;

use crate::error::{io, Result, SnapshotError};
use crate::snapshots::{Info, Kind, Mount, RemoteLayer, Snapshots, Usage, LABEL_TARGET_REF};

/// Labels the CRI plugin (or `lazylayer containerd pull`) puts on a layer's
/// Prepare, naming the image and layer it unpacks.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// Optimized images, resolved from the registry into the lazylayer store.
pub struct Images {
    store: Store,
    client: Arc<RegistryClient>,
    /// manifest digest → the opened image, or None for a plain one. One
    /// lock for all: it also keeps two layers of one image from opening
    /// (fetching the boot layer) twice.
    opened: Mutex<HashMap<String, Option<Arc<LazyImage>>>>,
}

impl Images {
    pub fn new(store: Store, client: Arc<RegistryClient>) -> Images {
        Images {
            store,
            client,
            opened: Mutex::new(HashMap::new()),
        }
    }

    /// The image `image_ref` pinned at `manifest_digest`, opened lazily
    /// (manifest, config and boot layer fetched); None when it has no boot layer.
    pub async fn open(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<Arc<LazyImage>>> {
        let mut opened = self.opened.lock().await;
        if let Some(o) = opened.get(manifest_digest) {
            return Ok(o.clone());
        }
        let err = |source: FetchError| SnapshotError::Image {
            image: format!("{image_ref}@{manifest_digest}"),
            source: Box::new(source),
        };
        let mut reference: Reference = image_ref.parse().map_err(|e| err(FetchError::Oci(e)))?;
        let digest: Digest = manifest_digest
            .parse()
            .map_err(|e| err(FetchError::Oci(e)))?;
        reference.digest = Some(digest);
        let o = match LazyImage::open(
            &self.store,
            self.client.clone(),
            &reference,
            FetchOptions::default(),
        )
        .await
        {
            Ok(img) => Some(Arc::new(img)),
            Err(OpenError::NoBootLayer(_)) => None,
            Err(OpenError::Failed(e)) => return Err(err(e)),
        };
        opened.insert(manifest_digest.to_string(), o.clone());
        Ok(o)
    }

    /// Fetch remote layer `r` of its image into the store, whole and verified.
    async fn fetch_layer(&self, r: &RemoteLayer) -> Result<()> {
        let image = format!("{}@{}", r.image_ref, r.manifest_digest);
        let precondition = |reason: String| SnapshotError::FailedPrecondition {
            key: r.layer_digest.clone(),
            reason,
        };
        let img = self
            .open(&r.image_ref, &r.manifest_digest)
            .await?
            .ok_or_else(|| precondition(format!("{image} no longer has a boot layer")))?;
        let layer = img
            .layers()
            .iter()
            .find(|l| l.digest.to_string() == r.layer_digest)
            .ok_or_else(|| precondition(format!("{image} has no layer {}", r.layer_digest)))?;
        self.store
            .ensure_layer(
                &RegistryBlobs::new(&*self.client, img.reference().repository.clone()),
                layer,
                &PullOptions::default(),
                Arc::new(NoProgress),
                Arc::new(NoEvents),
            )
            .await
            .map_err(|e| SnapshotError::Image {
                image,
                source: Box::new(FetchError::from(e)),
            })?;
        Ok(())
    }

    /// The remote layer a Prepare with these labels asks for, if its image
    /// is optimized and has that layer.
    async fn claim(&self, c: &Claim) -> Result<Option<RemoteLayer>> {
        let Some(img) = self.open(&c.image_ref, &c.manifest_digest).await? else {
            return Ok(None);
        };
        let layers = img.layers();
        let Some(i) = layers
            .iter()
            .position(|l| l.digest.to_string() == c.layer_digest)
        else {
            tracing::warn!(image = %c.image_ref, layer = %c.layer_digest, "the image has no such layer; not claiming it");
            return Ok(None);
        };
        Ok(Some(RemoteLayer {
            image_ref: c.image_ref.clone(),
            manifest_digest: c.manifest_digest.clone(),
            layer_digest: c.layer_digest.clone(),
            top: i + 1 == layers.len(),
        }))
    }
}

/// What a Prepare's labels ask for when they name an image layer.
struct Claim {
    target: String,
    image_ref: String,
    manifest_digest: String,
    layer_digest: String,
}

impl Claim {
    fn from_labels(labels: &BTreeMap<String, String>) -> Option<Claim> {
        let get = |k: &str| labels.get(k).filter(|v| !v.is_empty()).cloned();
        Some(Claim {
            target: get(LABEL_TARGET_REF)?,
            image_ref: get(LABEL_IMAGE_REF)?,
            manifest_digest: get(LABEL_MANIFEST_DIGEST)?,
            layer_digest: get(LABEL_LAYER_DIGEST)?,
        })
    }
}

pub struct Snapshotter {
    snapshots: Snapshots,
    images: Option<Images>,
    /// manifest digest → its lazy root, mounted. The lock is held across
    /// "mount, then record the snapshot" and "remove, then maybe unmount", so
    /// a root is never dropped under a snapshot being created on it.
    mounts: Mutex<HashMap<String, LazyRoot>>,
    /// What the pin names now: it is rewritten only when this changes
    /// (most Removes are of ordinary snapshots).
    pinned: std::sync::Mutex<Option<Vec<String>>>,
}

impl Snapshotter {
    /// Open the snapshotter's state in `dir`. Without `images`, nothing is
    /// claimed remotely (a plain overlayfs snapshotter).
    pub fn open(dir: &Path, images: Option<Images>) -> Result<Snapshotter> {
        let mut snapshots = Snapshots::open(dir)?;
        if let Some(i) = &images {
            snapshots = snapshots.with_layer_store(i.store.clone());
        }
        // Our FUSE mounts die with the process that served them; a restart
        // finds them dead (ENOTCONN). Detach them so they can be mounted anew.
        detach_mounts_below(&dir.join("lazy"));
        let sn = Snapshotter {
            snapshots,
            images,
            mounts: Mutex::new(HashMap::new()),
            pinned: std::sync::Mutex::new(None),
        };
        sn.repin();
        Ok(sn)
    }

    /// Keep `lazylayer prune` off the content remote snapshots use (their
    /// images are recorded in the store only once fully fetched).
    fn repin(&self) {
        let Some(images) = &self.images else { return };
        let wanted = self.snapshots.remote_digests();
        let mut pinned = self.pinned.lock().unwrap();
        if pinned.as_ref() == Some(&wanted) {
            return;
        }
        let digests: Vec<Digest> = wanted.iter().filter_map(|d| d.parse().ok()).collect();
        let name = format!("snapshotter-{}", std::process::id());
        match images.store.pin(&name, &digests) {
            Ok(()) => *pinned = Some(wanted),
            Err(e) => tracing::warn!(error = %e, "pinning the remote snapshots' content"),
        }
    }

    pub fn snapshots(&self) -> &Snapshots {
        &self.snapshots
    }

    pub async fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        if let (Some(images), Some(claim)) = (&self.images, Claim::from_labels(&labels)) {
            if self.snapshots.exists(&claim.target) {
                return Err(SnapshotError::AlreadyExists(claim.target));
            }
            match images.claim(&claim).await {
                Ok(Some(remote)) => {
                    tracing::info!(target = %claim.target, image = %claim.image_ref, layer = %claim.layer_digest, top = remote.top, "claimed a layer as remote");
                    self.snapshots
                        .commit_remote(&claim.target, parent, labels, remote)?;
                    self.repin();
                    // containerd's answer for "the target exists": it then
                    // finds our committed snapshot and downloads nothing.
                    return Err(SnapshotError::AlreadyExists(claim.target));
                }
                Ok(None) => {}
                // containerd can still download the layer itself.
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "cannot resolve the image; preparing a plain snapshot")
                }
            }
        }
        self.create(Kind::Active, key, parent, labels).await
    }

    pub async fn view(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.ensure_remote_layers(parent).await?;
        let mut mounts = self.mounts.lock().await;
        if let Some(r) = self.snapshots.remote_top_of(parent) {
            if let Some(lowers) = self.local_image_lowers(&r).await? {
                return self
                    .snapshots
                    .create_on_local_image(kind, key, parent, labels, lowers);
            }
            self.ensure_mounted(&mut mounts, &r).await?;
        }
        self.snapshots.create(kind, key, parent, labels)
    }

    /// The store's layer directories (top first, the boot index hidden) for
    /// a new snapshot on the image whose boot layer is `r`, when every layer
    /// of it is in the store: the kernel's overlayfs then serves it, no FUSE.
    /// None while something is still to fetch (the lazy root serves it).
    async fn local_image_lowers(&self, r: &RemoteLayer) -> Result<Option<Vec<PathBuf>>> {
        let Some(images) = &self.images else {
            return Ok(None);
        };
        let Some(img) = images.open(&r.image_ref, &r.manifest_digest).await? else {
            return Ok(None);
        };
        let lowers =
            lazylayer_fetch::stacked_lowers(&images.store, img.layers()).map_err(|source| {
                SnapshotError::Image {
                    image: r.image_ref.clone(),
                    source: Box::new(source),
                }
            })?;
        if lowers.is_some() {
            tracing::info!(image = %r.image_ref, "every layer is local: the snapshot stands on the store's layers, no FUSE");
        }
        Ok(lowers)
    }

    /// A snapshot on a remote layer *below* a boot layer (say a plain image
    /// that shares an optimized image's base layers, whose chain containerd
    /// finds already committed) cannot use the lazy root, which shows the
    /// whole optimized image: fetch those layers into the store in full.
    async fn ensure_remote_layers(&self, parent: &str) -> Result<()> {
        let missing = self.snapshots.remote_layers_missing(parent);
        if missing.is_empty() {
            return Ok(());
        }
        let images = self
            .images
            .as_ref()
            .ok_or_else(|| SnapshotError::FailedPrecondition {
                key: parent.to_string(),
                reason: "stands on remote layers, and this snapshotter has no registry access"
                    .into(),
            })?;
        for r in missing {
            tracing::info!(image = %r.image_ref, layer = %r.layer_digest, "fetching a remote layer in full for a snapshot below the boot layer");
            images.fetch_layer(&r).await?;
        }
        Ok(())
    }

    pub async fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        // After a restart the lazy root is mounted again on first need.
        if let Some(r) = self.snapshots.remote_top_under(key) {
            let mut mounts = self.mounts.lock().await;
            self.ensure_mounted(&mut mounts, &r).await?;
        }
        self.snapshots.mounts(key)
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        self.snapshots.commit(name, key, labels)
    }

    pub async fn remove(&self, key: &str) -> Result<()> {
        let mut mounts = self.mounts.lock().await;
        let under = self.snapshots.remove(key)?;
        self.repin();
        if let Some(r) = under {
            if self.snapshots.lazy_users(&r.manifest_digest) == 0 {
                if let Some(root) = mounts.remove(&r.manifest_digest) {
                    release(root);
                }
            }
        }
        Ok(())
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        self.snapshots.stat(key)
    }

    pub fn update(&self, info: &Info, paths: &[String]) -> Result<Info> {
        self.snapshots.update(info, paths)
    }

    pub fn list(&self) -> Vec<Info> {
        self.snapshots.list()
    }

    pub fn usage(&self, key: &str) -> Result<Usage> {
        self.snapshots.usage(key)
    }

    pub fn cleanup(&self) -> Result<usize> {
        self.snapshots.cleanup()
    }

    /// Unmount every lazy root (at shutdown).
    pub async fn shutdown(&self) {
        let mut mounts = self.mounts.lock().await;
        for (_, root) in mounts.drain() {
            release(root);
        }
    }

    async fn ensure_mounted(
        &self,
        mounts: &mut HashMap<String, LazyRoot>,
        r: &RemoteLayer,
    ) -> Result<()> {
        if mounts.contains_key(&r.manifest_digest) {
            return Ok(());
        }
        let precondition = |reason: String| SnapshotError::FailedPrecondition {
            key: r.layer_digest.clone(),
            reason,
        };
        let images = self.images.as_ref().ok_or_else(|| {
            precondition("a remote layer, and this snapshotter has no registry access".into())
        })?;
        let img = images
            .open(&r.image_ref, &r.manifest_digest)
            .await?
            .ok_or_else(|| precondition(format!("{} no longer has a boot layer", r.image_ref)))?;
        let dir = self.snapshots.lazy_dir(&r.manifest_digest);
        std::fs::create_dir_all(&dir).map_err(io("creating the lazy mount point", &dir))?;
        let failed = |source: FetchError| SnapshotError::Image {
            image: r.image_ref.clone(),
            source: Box::new(source),
        };
        // Pinned (until every layer is here no image record names them),
        // mounted; the container starts from the boot layer, the rest follows
        // once its start has settled (prefetching earlier takes its CPU).
        let hex: String = (r.manifest_digest.chars())
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let pin = format!("snapshotter-{}-{hex}", std::process::id());
        let mut root = LazyRoot::new(&images.store, (*img).clone(), &pin).map_err(failed)?;
        let opts = MountOptions {
            fs: FsOptions::default(),
            prefetch: true,
        };
        root.mount(&dir, opts).map_err(failed)?;
        tracing::info!(image = %r.image_ref, dir = %dir.display(), "lazy root mounted");
        mounts.insert(r.manifest_digest.clone(), root);
        Ok(())
    }
}

/// Unmount an image's lazy root (the image is recorded in the store once
/// every layer arrived, so `lazylayer run` and later mounts need no network).
fn release(root: LazyRoot) {
    let image = root.reference().to_string();
    drop(root);
    tracing::info!(image, "lazy root unmounted");
}

fn detach_mounts_below(dir: &Path) {
    let prefix = format!("{}/", dir.display());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut targets: Vec<&str> = info
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|t| t.starts_with(&prefix))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets {
        match rustix::mount::unmount(t, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => tracing::info!(mount = t, "detached a lazy mount left by a previous run"),
            Err(e) => tracing::warn!(mount = t, error = %e, "detaching a stale lazy mount"),
        }
    }
}

/// An error with its causes, one line (for logs and gRPC messages).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
