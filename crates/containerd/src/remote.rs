//! The snapshotter proper: [`Snapshots`] plus optimized images, which it
//! claims as remote snapshots on Prepare and serves through one lazy FUSE
//! mount per image while containers use it.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use lazylayer_fetch::{FetchError, FetchOptions};
use lazylayer_fs::{FsOptions, Held, Holder};
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_root::{LazyImage, LazyRoot, MountOptions, OpenError};
use lazylayer_store::{NoEvents, NoProgress, PullOptions, RegistryBlobs, Store};
use lazylayer_sys::error_chain;
use tokio::sync::{Mutex, OnceCell};

use crate::error::{io, Result, SnapshotError};
use crate::snapshots::{Info, Kind, Mount, RemoteLayer, Snapshots, Usage, LABEL_TARGET_REF};

/// Labels the CRI plugin (or `lazylayer containerd pull`) puts on a layer's
/// Prepare, naming the image and layer it unpacks.
pub const LABEL_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";
pub const LABEL_MANIFEST_DIGEST: &str = "containerd.io/snapshot/cri.manifest-digest";
pub const LABEL_LAYER_DIGEST: &str = "containerd.io/snapshot/cri.layer-digest";
pub const LABEL_IMAGE_LAYERS: &str = "containerd.io/snapshot/cri.image-layers";

/// One image's open: the image, or None for a plain one, once resolved. A
/// failed open leaves it empty, so the next caller tries again.
type Opening = Arc<OnceCell<Option<Arc<LazyImage>>>>;

/// Optimized images, resolved from the registry into the lazylayer store.
pub struct Images {
    store: Store,
    client: Arc<RegistryClient>,
    /// manifest digest → the image's open, shared by every caller (two
    /// layers of one image open it, fetching its boot layer, once). The map
    /// is locked only to find or add a cell, never across the registry:
    /// a stalled image holds up its own callers, not other images'.
    opened: std::sync::Mutex<HashMap<String, Opening>>,
    /// manifest digest → what an open found (kept when the image is let go,
    /// a few hundred bytes): whether a new snapshot can stand on the store's
    /// layers is then answered without the registry.
    known: std::sync::Mutex<HashMap<String, KnownImage>>,
    fetch: FetchOptions,
    mount: MountOptions,
}

impl Images {
    pub fn new(store: Store, client: Arc<RegistryClient>) -> Images {
        Images {
            store,
            client,
            opened: std::sync::Mutex::new(HashMap::new()),
            known: std::sync::Mutex::new(HashMap::new()),
            fetch: FetchOptions::default(),
            // The container starts from the boot layer, the rest follows once
            // its start has settled (prefetching earlier takes its CPU).
            mount: MountOptions {
                fs: FsOptions::default(),
                prefetch: true,
                // A holder keeps the roots over a restart.
                force_unmount_on_death: false,
                // containerd stacks the FUSE root itself (its mount list).
                meta_tree: None,
            },
        }
    }

    /// How lazy roots fetch (timeouts, prefetch bandwidth) and serve
    /// (prefetch, passthrough).
    pub fn with_options(mut self, fetch: FetchOptions, mount: MountOptions) -> Images {
        self.fetch = fetch;
        self.mount = mount;
        self
    }

    /// The image `image_ref` pinned at `manifest_digest`, opened lazily
    /// (manifest, config and boot layer fetched); None when it has no boot layer.
    pub async fn open(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<Arc<LazyImage>>> {
        let opening = (self.opened.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .entry(manifest_digest.to_string())
            .or_default()
            .clone();
        let image = opening
            .get_or_try_init(|| self.open_from_registry(image_ref, manifest_digest))
            .await?;
        if let Some(img) = image {
            (self.known.lock())
                .unwrap_or_else(PoisonError::into_inner)
                .entry(manifest_digest.to_string())
                .or_insert_with(|| KnownImage {
                    record_reference: img.record_reference(),
                    layers: img.layers().to_vec(),
                });
        }
        Ok(image.clone())
    }

    /// Let the image go once no lazy root uses it, so its boot chunks'
    /// files are closed and memory freed on a node that has run many images;
    /// the next container opens it again (manifest and config from the
    /// registry, the boot chunks from the store's chunk cache).
    fn forget(&self, manifest_digest: &str) {
        (self.opened.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .remove(manifest_digest);
    }

    /// What an open of the image found, when that costs no network: it was
    /// opened before, or the store holds its record. None when only the
    /// registry could tell.
    fn known_offline(&self, image_ref: &str, manifest_digest: &str) -> Option<KnownImage> {
        let known = (self.known.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .get(manifest_digest)
            .cloned();
        known.or_else(|| {
            let reference = image_reference(image_ref, manifest_digest).ok()?;
            let rec = self.store.image(&reference)?;
            Some(KnownImage {
                record_reference: rec.reference,
                layers: rec.layers,
            })
        })
    }

    async fn open_from_registry(
        &self,
        image_ref: &str,
        manifest_digest: &str,
    ) -> Result<Option<Arc<LazyImage>>> {
        let reference = image_reference(image_ref, manifest_digest)?;
        let err = |source: FetchError| SnapshotError::Image {
            image: format!("{image_ref}@{manifest_digest}"),
            source: Box::new(source),
        };
        match LazyImage::open(
            &self.store,
            self.client.clone(),
            &reference,
            self.fetch.clone(),
        )
        .await
        {
            Ok(img) => Ok(Some(Arc::new(img))),
            Err(OpenError::NoBootLayer(why)) => {
                if why.note.is_some() {
                    tracing::warn!(image = %reference, "{why}: its layers are unpacked as they are");
                }
                Ok(None)
            }
            Err(OpenError::Failed(e)) => Err(err(e)),
        }
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
    /// manifest digest → the slot of its lazy root. The map is locked only
    /// to find or add a slot; a slot is locked across "mount, then record
    /// the snapshot" and "remove, then maybe unmount", so a root is never
    /// dropped under a snapshot being created on it, and an image whose
    /// mount waits on its registry holds up only its own snapshots.
    mounts: std::sync::Mutex<HashMap<String, RootSlot>>,
    /// What the pin names now: it is rewritten only when this changes
    /// (most Removes are of ordinary snapshots).
    pinned: std::sync::Mutex<Option<Vec<String>>>,
    /// Keeps each lazy root's FUSE connection while no snapshotter serves
    /// it (a crash, a restart, an upgrade); None: roots die with the process.
    holder: Option<Holder>,
}

/// One image's lazy root, None while not mounted.
type RootSlot = Arc<Mutex<Option<LazyRoot>>>;

/// How long a Prepare (or View) on an optimized image waits for its lazy
/// root before it answers anyway. containerd calls Prepare under a lock its
/// garbage collector takes exclusively, so a Prepare waiting on a stalled
/// registry would hold up every container start of the node; Mounts, which
/// a task's start calls under no such lock, waits for the root instead.
const PREPARE_MOUNT_WAIT: Duration = Duration::from_millis(500);

/// How long a graceful stop waits for reads waiting on content to be
/// answered before it leaves them to the next snapshotter (the kernel sends
/// them again).
const DRAIN_MAX: Duration = Duration::from_secs(10);

/// What the holder keeps beside a lazy root's descriptors: enough to open
/// the same image again.
#[derive(serde::Serialize, serde::Deserialize)]
struct HeldRoot {
    kind: String,
    target: String,
    image_ref: String,
    manifest_digest: String,
}

const HELD_KIND: &str = "containerd-snapshotter";

impl Snapshotter {
    /// Open the snapshotter's state in `dir`. Without `images`, nothing is
    /// claimed remotely (a plain overlayfs snapshotter).
    pub fn open(dir: &Path, images: Option<Images>) -> Result<Snapshotter> {
        let mut snapshots = Snapshots::open(dir)?;
        if let Some(i) = &images {
            snapshots = snapshots.with_layer_store(i.store.clone());
        }
        let sn = Snapshotter {
            snapshots,
            images,
            mounts: std::sync::Mutex::new(HashMap::new()),
            pinned: std::sync::Mutex::new(None),
            holder: None,
        };
        sn.repin();
        Ok(sn)
    }

    /// Keep every lazy root's FUSE connection in `holder`, so that running
    /// containers keep their file system across a crash or restart of this
    /// process ([`Snapshotter::recover`] takes them back).
    pub fn with_holder(mut self, holder: Holder) -> Snapshotter {
        self.holder = Some(holder);
        self
    }

    /// At start: take over the lazy roots a previous snapshotter left
    /// mounted (their connections kept by the holder), and detach those
    /// nobody kept (dead: ENOTCONN) so they can be mounted anew. Returns the
    /// roots taken over.
    pub async fn recover(&self) -> usize {
        // Runs before the snapshotter serves: nothing else uses the roots.
        let mut mounts = HashMap::new();
        let held = match &self.holder {
            Some(h) => h.list().unwrap_or_else(|e| {
                tracing::warn!(error = %e, "asking the descriptor holder for the lazy roots it keeps");
                Vec::new()
            }),
            None => Vec::new(),
        };
        let lazy = self.snapshots.dir().join("lazy");
        for h in held {
            let name = h.name.clone();
            match self.take_over(&mut mounts, h).await {
                Ok(image) => {
                    tracing::info!(image, mount = %name, "took over a lazy root left by the previous snapshotter")
                }
                Err(e) => {
                    tracing::error!(mount = %name, error = %error_chain(&*e), "cannot take over a lazy root; detaching it");
                    if Path::new(&name).starts_with(&lazy) {
                        let _ = rustix::mount::unmount(
                            name.as_str(),
                            rustix::mount::UnmountFlags::DETACH,
                        );
                    }
                    if let Some(hd) = &self.holder {
                        let _ = hd.drop_entry(&name);
                    }
                }
            }
        }
        // Taken over but no longer used (its last snapshot went while no
        // snapshotter ran): nothing will remove it later.
        let unused: Vec<String> = (mounts.keys())
            .filter(|d| self.snapshots.lazy_users(d) == 0)
            .cloned()
            .collect();
        for d in unused {
            if let Some(root) = mounts.remove(&d) {
                self.release(&d, root).await;
            }
        }
        // Our FUSE mounts die with the process that served them unless the
        // holder kept them; a dead one answers ENOTCONN.
        let kept: Vec<PathBuf> = mounts.keys().map(|m| self.snapshots.lazy_dir(m)).collect();
        detach_mounts_below(&lazy, &kept);
        self.repin();
        // Started now rather than by the first mount, which a container's
        // start waits for.
        if let (Some(h), Some(_)) = (&self.holder, &self.images) {
            if let Err(e) = h.start() {
                tracing::warn!(error = %e, "starting the descriptor holder; lazy roots will not survive a restart");
            }
        }
        let n = mounts.len();
        let mut slots = self.mounts.lock().unwrap_or_else(PoisonError::into_inner);
        for (digest, root) in mounts {
            slots.insert(digest, Arc::new(Mutex::new(Some(root))));
        }
        n
    }

    /// The slot of the image `manifest_digest`'s lazy root.
    fn slot(&self, manifest_digest: &str) -> RootSlot {
        (self.mounts.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .entry(manifest_digest.to_string())
            .or_default()
            .clone()
    }

    async fn take_over(
        &self,
        mounts: &mut HashMap<String, LazyRoot>,
        h: Held,
    ) -> std::result::Result<String, Box<dyn std::error::Error + Send + Sync>> {
        let meta: HeldRoot = serde_json::from_value(h.meta)?;
        if meta.kind != HELD_KIND {
            return Err(format!("kept by a {}, not by this snapshotter", meta.kind).into());
        }
        let dir = self.snapshots.lazy_dir(&meta.manifest_digest);
        if dir != Path::new(&meta.target) || h.name != meta.target {
            return Err(format!("not this snapshotter's mount ({})", dir.display()).into());
        }
        if !lazylayer_sys::mountinfo::is_mount_point(&dir) {
            return Err("no longer mounted".into());
        }
        let [device, table]: [OwnedFd; 2] = h
            .fds
            .try_into()
            .map_err(|v: Vec<OwnedFd>| format!("{} descriptors kept, not 2", v.len()))?;
        let images = self
            .images
            .as_ref()
            .ok_or("this snapshotter has no registry access")?;
        let img = images
            .open(&meta.image_ref, &meta.manifest_digest)
            .await?
            .ok_or("the image no longer has a boot layer")?;
        let mut root = LazyRoot::new(
            &images.store,
            (*img).clone(),
            &self.pin_name(&meta.manifest_digest),
        )?;
        root.resume(&dir, images.mount.clone(), device, table)?;
        mounts.insert(meta.manifest_digest, root);
        Ok(meta.image_ref)
    }

    fn pin_name(&self, manifest_digest: &str) -> String {
        let hex: String = (manifest_digest.chars())
            .filter(char::is_ascii_alphanumeric)
            .collect();
        format!("snapshotter-{}-{hex}", std::process::id())
    }

    /// Unmount a root nothing uses and tell the holder, off the async
    /// workers (an unmount waits for the kernel and the FUSE threads).
    async fn release(&self, manifest_digest: &str, root: LazyRoot) {
        let holder = self.holder.clone();
        let target = self.snapshots.lazy_dir(manifest_digest);
        let image = root.reference().to_string();
        let released =
            tokio::task::spawn_blocking(move || release(root, holder.as_ref(), &target)).await;
        if let Err(e) = released {
            tracing::error!(
                image,
                error = join_failure(e),
                "unmounting a lazy root failed"
            );
        }
        if let Some(images) = &self.images {
            images.forget(manifest_digest);
        }
    }

    /// Keep `lazylayer prune` off the content remote snapshots use (their
    /// images are recorded in the store only once fully fetched).
    fn repin(&self) {
        let Some(images) = &self.images else { return };
        let wanted = self.snapshots.remote_digests();
        let mut pinned = self.pinned.lock().unwrap_or_else(PoisonError::into_inner);
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
        self: &Arc<Self>,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        // A fault only the tests inject: no outside input is known to panic.
        #[cfg(test)]
        if key.starts_with("test-panic") {
            panic!("injected fault preparing {key}");
        }
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
        self: &Arc<Self>,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn create(
        self: &Arc<Self>,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.ensure_remote_layers(parent).await?;
        if let Some(r) = self.snapshots.remote_top_of(parent) {
            let slot = self.slot(&r.manifest_digest);
            let root = slot.lock().await;
            if let Some(lowers) = self.local_image_lowers(&r).await? {
                let m = self
                    .snapshots
                    .create_on_local_image(kind, key, parent, labels, lowers)?;
                // Pinned before eviction may look: the snapshot stacks the
                // store's layers directly.
                self.repin();
                self.touch(&r).await;
                return Ok(m);
            }
            // Recorded under the slot's lock, so a Remove of another
            // container cannot let the root go under this one.
            let m = self.snapshots.create(kind, key, parent, labels)?;
            let mounted = root.is_some();
            drop(root);
            if mounted {
                return Ok(m);
            }
            let task = tokio::spawn({
                let sn = self.clone();
                async move {
                    let image = r.image_ref.clone();
                    let mounted = sn.mount_root(r).await;
                    if let Err(e) = &mounted {
                        // Past the Prepare's wait nobody else hears of it.
                        tracing::warn!(image, error = %error_chain(e), "mounting the lazy root failed; Mounts tries again");
                    }
                    mounted
                }
            });
            return match tokio::time::timeout(PREPARE_MOUNT_WAIT, task).await {
                Ok(Ok(Ok(()))) => Ok(m),
                Ok(done) => {
                    let e = done.unwrap_or_else(|e| Err(SnapshotError::Internal(join_failure(e))));
                    let (sn, k) = (self.clone(), key.to_string());
                    if let Err(undo) = blocking(move || sn.snapshots.remove(&k)).await {
                        tracing::warn!(key, error = %error_chain(&undo), "removing the snapshot of a failed Prepare");
                    }
                    e.map(|()| m)
                }
                // Mounts, which the container's start calls, waits for the root.
                Err(_) => {
                    tracing::info!(
                        key,
                        "the lazy root is still being mounted; Mounts will wait for it"
                    );
                    Ok(m)
                }
            };
        }
        self.snapshots.create(kind, key, parent, labels)
    }

    /// Open `r`'s image before its slot is locked: the open may wait on the
    /// registry, and a Prepare of the image must not wait behind it for the
    /// slot (containerd holds a node-wide lock across Prepare).
    async fn open_unlocked(&self, r: &RemoteLayer) -> Result<()> {
        if let Some(images) = &self.images {
            images.open(&r.image_ref, &r.manifest_digest).await?;
        }
        Ok(())
    }

    /// Mount the lazy root of `r`'s image unless every snapshot on it went
    /// meanwhile (a Remove then has nothing to let go).
    async fn mount_root(self: Arc<Self>, r: RemoteLayer) -> Result<()> {
        self.open_unlocked(&r).await?;
        let slot = self.slot(&r.manifest_digest);
        let mut root = slot.lock().await;
        if self.snapshots.lazy_users(&r.manifest_digest) == 0 {
            return Ok(());
        }
        self.ensure_mounted(&mut root, &r).await
    }

    /// Record that a container uses the image of `r` now (for eviction's
    /// least-recently-used order).
    async fn touch(&self, r: &RemoteLayer) {
        let Some(images) = &self.images else { return };
        if let Some(known) = images.known_offline(&r.image_ref, &r.manifest_digest) {
            images.store.touch_image(&known.record_reference);
        }
    }

    /// The store's layer directories (top first, the boot index hidden) for
    /// a new snapshot on the image whose boot layer is `r`, when every layer
    /// of it is in the store: the kernel's overlayfs then serves it, no FUSE.
    /// None while something is still to fetch (the lazy root serves it).
    async fn local_image_lowers(&self, r: &RemoteLayer) -> Result<Option<Vec<PathBuf>>> {
        let Some(images) = &self.images else {
            return Ok(None);
        };
        // Whether the image is local is a question for the store: asking
        // the registry here would hold up the Prepare.
        let Some(known) = images.known_offline(&r.image_ref, &r.manifest_digest) else {
            return Ok(None);
        };
        let lowers =
            lazylayer_root::stacked_lowers(&images.store, &known.layers).map_err(|source| {
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
            self.open_unlocked(&r).await?;
            let slot = self.slot(&r.manifest_digest);
            let mut root = slot.lock().await;
            self.ensure_mounted(&mut root, &r).await?;
        }
        self.snapshots.mounts(key)
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        self.snapshots.commit(name, key, labels)
    }

    /// Remove `key` (its directory deleted off the async workers: a
    /// container's upper dir can be a big tree); its image's lazy root goes
    /// with its last user.
    pub async fn remove(self: &Arc<Self>, key: &str) -> Result<()> {
        let (sn, k) = (self.clone(), key.to_string());
        let under = blocking(move || sn.snapshots.remove(&k)).await?;
        self.repin();
        if let Some(r) = under {
            // Users are counted under the slot's lock: a Create that mounted
            // the root has recorded its snapshot by then.
            let slot = self.slot(&r.manifest_digest);
            let mut root = slot.lock().await;
            if self.snapshots.lazy_users(&r.manifest_digest) == 0 {
                if let Some(root) = root.take() {
                    self.release(&r.manifest_digest, root).await;
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

    /// Disk use, walked off the async workers.
    pub async fn usage(self: &Arc<Self>, key: &str) -> Result<Usage> {
        let (sn, k) = (self.clone(), key.to_string());
        blocking(move || sn.snapshots.usage(&k)).await
    }

    /// Directories no snapshot owns, deleted off the async workers.
    pub async fn cleanup(self: &Arc<Self>) -> Result<usize> {
        let sn = self.clone();
        blocking(move || sn.snapshots.cleanup()).await
    }

    /// At a graceful stop (no new requests come): unmount the lazy roots no
    /// container uses; keep those in use mounted for the next snapshotter,
    /// after reads waiting for content were answered (up to [`DRAIN_MAX`];
    /// the kernel sends the rest again to the next one). Without a holder,
    /// every root is unmounted.
    pub async fn shutdown(&self) {
        let slots: Vec<(String, RootSlot)> = (self.mounts.lock())
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        let t0 = std::time::Instant::now();
        for (digest, slot) in slots {
            let Some(root) = slot.lock().await.take() else {
                continue;
            };
            if self.holder.is_none() || self.snapshots.lazy_users(&digest) == 0 {
                self.release(&digest, root).await;
                continue;
            }
            while root.waiting() > 0 && t0.elapsed() < DRAIN_MAX {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!(image = %root.reference(), waiting = root.waiting(), "lazy root in use: left mounted for the next snapshotter");
            root.leave();
        }
    }

    /// Mount the lazy root of `r`'s image into its (locked) slot unless
    /// it is there: the image is opened (maybe from the registry) with only
    /// this image's slot held, and mounted off the async workers.
    async fn ensure_mounted(&self, slot: &mut Option<LazyRoot>, r: &RemoteLayer) -> Result<()> {
        if slot.is_some() {
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
        let image = r.image_ref.clone();
        let failed = move |source: FetchError| SnapshotError::Image {
            image: image.clone(),
            source: Box::new(source),
        };
        // Pinned (until every layer is here no image record names them),
        // mounted; the container starts from the boot layer, the rest follows
        // once its start has settled (prefetching earlier takes its CPU).
        let pin = self.pin_name(&r.manifest_digest);
        let (store, opts, holder, img, r2) = (
            images.store.clone(),
            images.mount.clone(),
            self.holder.clone(),
            (*img).clone(),
            r.clone(),
        );
        let root = blocking(move || {
            std::fs::create_dir_all(&dir).map_err(io("creating the lazy mount point", &dir))?;
            let mut root = LazyRoot::new(&store, img, &pin).map_err(&failed)?;
            root.mount(&dir, opts).map_err(&failed)?;
            tracing::info!(image = %r2.image_ref, dir = %dir.display(), "lazy root mounted");
            hold(holder.as_ref(), &dir, &r2, &root);
            Ok(root)
        })
        .await?;
        *slot = Some(root);
        Ok(())
    }
}

/// An opened image's record name and layers, bottom first.
#[derive(Clone)]
struct KnownImage {
    record_reference: String,
    layers: Vec<lazylayer_store::LayerRef>,
}

/// `image_ref` pinned at `manifest_digest`.
fn image_reference(image_ref: &str, manifest_digest: &str) -> Result<Reference> {
    let err = |source: lazylayer_oci::OciError| SnapshotError::Image {
        image: format!("{image_ref}@{manifest_digest}"),
        source: Box::new(FetchError::Oci(source)),
    };
    let mut reference: Reference = image_ref.parse().map_err(err)?;
    reference.digest = Some(manifest_digest.parse::<Digest>().map_err(err)?);
    Ok(reference)
}

/// Run blocking work (syscalls, tree walks) off the async workers. A panic
/// in it fails this call only.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(SnapshotError::Internal(join_failure(e))))
}

/// What a blocking task that did not finish said.
fn join_failure(e: tokio::task::JoinError) -> String {
    match e.try_into_panic() {
        Ok(payload) => format!("panicked: {}", lazylayer_fs::panic_message(&*payload)),
        Err(e) => e.to_string(),
    }
}

/// Hand `root`'s connection (mounted at `target`) to the holder (logged,
/// not fatal: the root works, it just dies with this process).
fn hold(holder: Option<&Holder>, target: &Path, r: &RemoteLayer, root: &LazyRoot) {
    let (Some(h), Some(fds)) = (holder, root.handover_fds()) else {
        return;
    };
    let target = target.display().to_string();
    let meta = HeldRoot {
        kind: HELD_KIND.into(),
        target: target.clone(),
        image_ref: r.image_ref.clone(),
        manifest_digest: r.manifest_digest.clone(),
    };
    let meta = serde_json::to_value(meta).expect("serialisable");
    if let Err(e) = h.put(&target, meta, &fds) {
        tracing::warn!(mount = target, error = %e, "the lazy root will not survive a restart of the snapshotter");
    }
}

/// Unmount an image's lazy root (the image is recorded in the store once
/// every layer arrived, so `lazylayer run` and later mounts need no network)
/// and tell the holder, which kept its connection at `target`.
fn release(root: LazyRoot, holder: Option<&Holder>, target: &Path) {
    let image = root.reference().to_string();
    drop(root);
    tracing::info!(image, "lazy root unmounted");
    // Until the next root is mounted there, a snapshot's mounts (which
    // Prepare may hand out before its root is mounted) name a lower that
    // does not exist, and fail, rather than an empty one.
    let _ = std::fs::remove_dir(target);
    if let Some(h) = holder {
        if let Err(e) = h.drop_entry(&target.display().to_string()) {
            tracing::warn!(mount = %target.display(), error = %e, "telling the descriptor holder");
        }
    }
}

/// Detach every mount below `dir` but those in `keep`.
fn detach_mounts_below(dir: &Path, keep: &[PathBuf]) {
    let prefix = format!("{}/", dir.display());
    let mut targets: Vec<String> = lazylayer_sys::mountinfo::mount_points()
        .into_iter()
        .filter(|t| t.starts_with(&prefix))
        .filter(|t| !keep.iter().any(|k| Path::new(t) == k))
        .collect();
    targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
    for t in targets.iter().map(String::as_str) {
        match rustix::mount::unmount(t, rustix::mount::UnmountFlags::DETACH) {
            Ok(()) => tracing::info!(mount = t, "detached a lazy mount left by a previous run"),
            Err(e) => tracing::warn!(mount = t, error = %e, "detaching a stale lazy mount"),
        }
    }
}

#[cfg(test)]
mod tests;
