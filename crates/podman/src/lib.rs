//! Podman (containers-storage) support: an *additional layer store* that
//! serves lazylayer-optimized images lazily to an unmodified Podman.
//!
//! For each image, the store lays out `DIR/<base64 of REF>/<layer digest>/`
//! with `diff`, `info` and `blob`: the top (boot) layer's `diff` is the
//! image's lazy merged root (a [`LazyRoot`], bind-mounted), the other layers'
//! are empty. Podman then pulls only manifest and config, and its containers
//! run on the lazy root. An image the lazylayer store holds whole is laid
//! out without FUSE: each layer's `diff` is that layer's extracted tree in
//! the store (the boot layer's with its index file hidden), and Podman
//! stacks them with overlayfs itself. See docs/podman.md.

pub mod auth_helper;

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use lazylayer_fetch::{FetchError, FetchOptions};
use lazylayer_fs::{Held, Holder};
use lazylayer_oci::{Digest, Reference, RegistryClient, Repository};
use lazylayer_root::{LazyRoot, MountOptions, OpenError};
use lazylayer_store::{Pin, Store};
use lazylayer_sys::error_chain;

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("{0}: optimize it first (`lazylayer optimize`)")]
    NoBootLayer(lazylayer_root::NoBootLayer),
    #[error("opening {image}")]
    Open {
        image: String,
        #[source]
        source: Box<FetchError>,
    },
    #[error("{image} is already served at {}", path.display())]
    AlreadyServed { image: String, path: PathBuf },
    #[error("{what} ({})", path.display())]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> PodmanError {
    let (what, path) = (what.to_string(), path.to_path_buf());
    move |source| PodmanError::Io { what, path, source }
}

/// How the store serves its images.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// The additional layer store directory Podman is configured with.
    pub dir: PathBuf,
    pub fetch: FetchOptions,
    /// How lazy roots serve: the background prefetch once a start has
    /// settled (a container's first reads, or 2 s after the mount), FUSE
    /// passthrough.
    pub mount: MountOptions,
    /// Keeps each lazy root's FUSE connection while no store serves it (a
    /// crash, a restart, an upgrade); None: roots die with the process.
    pub holder: Option<Holder>,
}

/// How long a graceful stop waits for reads waiting on content.
const DRAIN_MAX: Duration = Duration::from_secs(10);

const HELD_KIND: &str = "podman-store";

/// What the holder keeps beside a lazy root's descriptors.
#[derive(serde::Serialize, serde::Deserialize)]
struct HeldRoot {
    kind: String,
    target: String,
    image_ref: String,
    base: String,
}

/// Podman's name for an image's directory in the store: the reference as
/// Podman names it, base64 with the standard alphabet (a '/' in it simply
/// nests directories).
pub fn image_dir_name(reference: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(reference.as_bytes())
}

/// One image laid out for Podman; undone on drop (the mounts on its `diff`
/// directories, directories, then the lazy root: FUSE, fetches, pin; or the
/// pin of a local image's layers) unless left for the next store.
struct Served {
    base: PathBuf,
    mounted: Vec<PathBuf>,
    reference: Reference,
    layers: usize,
    root: Option<LazyRoot>,
    _pin: Option<Pin>,
    holder: Option<Holder>,
}

impl Served {
    /// Leave everything mounted and laid out for the next store.
    fn leave(mut self) {
        if let Some(r) = self.root.take() {
            r.leave();
        }
        self.holder = None;
        self.mounted.clear();
        self.base = PathBuf::new();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if self.base.as_os_str().is_empty() {
            return;
        }
        for m in self.mounted.iter().rev() {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.base);
        if let Some(root) = self.root.take() {
            let target = root.path().map(Path::to_path_buf);
            drop(root);
            if let (Some(h), Some(t)) = (&self.holder, target) {
                let _ = h.drop_entry(&t.display().to_string());
            }
        }
    }
}

/// The images a running store serves. Dropped: every entry is removed and
/// every lazy root unmounted (each image is recorded in the lazylayer store
/// once all its layers arrived); [`LayerStore::stop`] keeps those in use.
pub struct LayerStore {
    served: Vec<Served>,
    /// Images the registry refused for want of credentials, by their
    /// position among the images served (it names their pins).
    waiting: Vec<(usize, Reference)>,
}

/// An image the store serves.
pub struct ServedImage<'a> {
    pub reference: &'a Reference,
    pub layers: usize,
}

impl LayerStore {
    /// Open each of `images` lazily (manifest, config and boot layer) and lay
    /// it out in `opts.dir` (created private: it exposes images' roots).
    pub async fn serve(
        store: &Store,
        client: Arc<RegistryClient>,
        images: &[Reference],
        opts: &StoreOptions,
    ) -> Result<LayerStore, PodmanError> {
        lazylayer_store::create_private_dir(&opts.dir)
            .map_err(io("creating the layer store directory", &opts.dir))?;
        let mut held = held_roots(opts.holder.as_ref());
        let mut layer_store = LayerStore {
            served: Vec::new(),
            waiting: Vec::new(),
        };
        for (i, reference) in images.iter().enumerate() {
            match serve_one(store, client.clone(), reference, i, opts, &mut held).await? {
                Some(s) => layer_store.served.push(s),
                None => layer_store.waiting.push((i, reference.clone())),
            }
        }
        // Kept for images this store no longer serves: no user is known
        // to this store; they are cleared once nobody has them mounted.
        for h in held {
            tracing::warn!(
                mount = h.name,
                "the descriptor holder keeps a root of an image not served now; leaving it"
            );
        }
        Ok(layer_store)
    }

    /// Images whose registry wants credentials the store did not have:
    /// served once they arrive ([`LayerStore::credentials_arrived`]).
    pub fn waiting(&self) -> impl Iterator<Item = &Reference> {
        self.waiting.iter().map(|(_, r)| r)
    }

    /// Credentials for `repository` arrived (in `client`'s keychain):
    /// serve the images of it that waited for them. Returns those now
    /// served; an image the registry still refuses keeps waiting.
    pub async fn credentials_arrived(
        &mut self,
        store: &Store,
        client: Arc<RegistryClient>,
        opts: &StoreOptions,
        repository: &Repository,
    ) -> Result<Vec<Reference>, PodmanError> {
        let mut now_served = Vec::new();
        let mut still = Vec::new();
        let mut waiting = std::mem::take(&mut self.waiting).into_iter();
        // Roots the previous store left (its holder keeps them), asked for
        // once, when an image is to be served: each is taken over now.
        let mut held: Option<Vec<Held>> = None;
        while let Some((i, reference)) = waiting.next() {
            if reference.repository != *repository {
                still.push((i, reference));
                continue;
            }
            let held = held.get_or_insert_with(|| held_roots(opts.holder.as_ref()));
            match serve_one(store, client.clone(), &reference, i, opts, held).await {
                Ok(Some(s)) => {
                    self.served.push(s);
                    now_served.push(reference);
                }
                Ok(None) => still.push((i, reference)),
                Err(e) => {
                    // This one and those not tried yet keep waiting.
                    still.push((i, reference));
                    still.extend(waiting);
                    self.waiting = still;
                    return Err(e);
                }
            }
        }
        self.waiting = still;
        Ok(now_served)
    }

    pub fn images(&self) -> impl Iterator<Item = ServedImage<'_>> {
        self.served.iter().map(|s| ServedImage {
            reference: &s.reference,
            layers: s.layers,
        })
    }

    /// A graceful stop: unmount and remove the images no container uses;
    /// leave those in use mounted and laid out for the next store (when a
    /// holder keeps their connections), once reads waiting for content were
    /// answered (up to 10 s; the kernel sends the rest again to the next one).
    pub async fn stop(self) {
        let t0 = std::time::Instant::now();
        for s in self.served {
            // Only lazy roots are left: a local image's layers are plain
            // directories, which containers keep through their overlay.
            if s.holder.is_none() || s.root.is_none() || !in_use(&s.base) {
                drop(s);
                continue;
            }
            let waiting = || s.root.as_ref().map_or(0, |r| r.waiting());
            while waiting() > 0 && t0.elapsed() < DRAIN_MAX {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tracing::info!(image = %s.reference, "in use by a container: left mounted for the next store");
            s.leave();
        }
    }
}

/// Serve `reference` (the `i`th image): take over its lazy root from the
/// previous store if `held` has it, else lay it out anew. None: its
/// registry wants credentials the client does not have (yet).
async fn serve_one(
    store: &Store,
    client: Arc<RegistryClient>,
    reference: &Reference,
    i: usize,
    opts: &StoreOptions,
    held: &mut Vec<Held>,
) -> Result<Option<Served>, PodmanError> {
    let pin = format!("podman-store-{}-{i}", std::process::id());
    let work = work_dir(store, &opts.dir, reference);
    let target = work.join("root");
    let base = opts.dir.join(image_dir_name(&reference.to_string()));
    let kept = held
        .iter()
        .position(|h| Path::new(&h.name) == target)
        .map(|k| held.swap_remove(k));
    if let Some(h) = kept {
        match take_over(
            store,
            client.clone(),
            reference,
            opts,
            &pin,
            &base,
            &target,
            h,
        )
        .await
        {
            Ok(s) => {
                tracing::info!(image = %reference, mount = %target.display(), "took over a lazy root left by the previous store");
                return Ok(Some(s));
            }
            // Left mounted (the holder keeps it) for the credential Podman's
            // next pull brings: clearing it would take the file system from
            // under the running containers.
            Err(TakeOver::Unauthorized(e)) => {
                tracing::warn!(image = %reference, error = %e, "the registry wants credentials to take over the lazy root; left as it is, waiting for them (Podman's additional-layer-store-auth-helper)");
                return Ok(None);
            }
            Err(TakeOver::Failed(e)) => {
                tracing::error!(image = %reference, error = %e, "cannot take over the lazy root; serving it anew")
            }
        }
    }
    // Left by a store that died with nobody keeping its connection
    // (dead: ENOTCONN), or by one that could not be taken over.
    clear_layout(&base, &target, opts.holder.as_ref());
    if let Some(local) = lay_out_local(store, reference, &opts.dir, &pin)? {
        return Ok(Some(local));
    }
    let opened = LazyRoot::open(store, client, reference, opts.fetch.clone(), &pin);
    let root = match opened.await {
        Ok(root) => root,
        Err(OpenError::NoBootLayer(r)) => return Err(PodmanError::NoBootLayer(r)),
        Err(OpenError::Failed(source)) if source.is_unauthorized() => {
            tracing::warn!(image = %reference, error = %error_chain(&source), "the registry wants credentials; waiting for them (Podman's additional-layer-store-auth-helper)");
            return Ok(None);
        }
        Err(OpenError::Failed(source)) => {
            return Err(PodmanError::Open {
                image: reference.to_string(),
                source: Box::new(source),
            })
        }
    };
    let s = lay_out(
        root,
        &opts.dir,
        &work,
        opts.mount.clone(),
        opts.holder.clone(),
    )?;
    hold(&s, opts.holder.as_ref());
    Ok(Some(s))
}

/// Where an image's lazy root is mounted: stable across restarts (the
/// next store finds it), one per layer store directory and image.
fn work_dir(store: &Store, dir: &Path, reference: &Reference) -> PathBuf {
    let key = Digest::sha256_of(format!("{}\n{reference}", dir.display()).as_bytes());
    let hex = key.to_string();
    let hex = hex.trim_start_matches("sha256:");
    store.root().join("podman-store").join(&hex[..16])
}

/// Hand `s`'s connection to the holder (logged, not fatal: the root works,
/// it just dies with this process).
fn hold(s: &Served, holder: Option<&Holder>) {
    let Some(root) = &s.root else { return };
    let (Some(h), Some(fds), Some(target)) = (holder, root.handover_fds(), root.path()) else {
        return;
    };
    let target = target.display().to_string();
    let meta = HeldRoot {
        kind: HELD_KIND.into(),
        target: target.clone(),
        image_ref: root.reference().to_string(),
        base: s.base.display().to_string(),
    };
    let meta = serde_json::to_value(meta).expect("serialisable");
    if let Err(e) = h.put(&target, meta, &fds) {
        tracing::warn!(mount = target, error = %e, "the lazy root will not survive a restart of the store");
    }
}

/// The lazy roots `holder` keeps (none without one, or when it cannot say).
fn held_roots(holder: Option<&Holder>) -> Vec<Held> {
    let Some(h) = holder else {
        return Vec::new();
    };
    h.list().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "asking the descriptor holder for the lazy roots it keeps");
        Vec::new()
    })
}

/// Why a lazy root left by the previous store was not taken over.
#[derive(Debug)]
enum TakeOver {
    /// The registry wants credentials this store does not have (yet).
    Unauthorized(String),
    Failed(String),
}

/// Take over the root an earlier store left at `target`, laid out in `base`.
#[allow(clippy::too_many_arguments)]
async fn take_over(
    store: &Store,
    client: Arc<RegistryClient>,
    reference: &Reference,
    opts: &StoreOptions,
    pin: &str,
    base: &Path,
    target: &Path,
    h: Held,
) -> Result<Served, TakeOver> {
    let failed = |e: String| TakeOver::Failed(e);
    let meta: HeldRoot = serde_json::from_value(h.meta).map_err(|e| failed(e.to_string()))?;
    if meta.kind != HELD_KIND || meta.image_ref != reference.to_string() {
        return Err(failed(format!("kept for {} {}", meta.kind, meta.image_ref)));
    }
    if !lazylayer_sys::mountinfo::is_mount_point(target) {
        return Err(failed("no longer mounted".into()));
    }
    let [device, table]: [OwnedFd; 2] = h
        .fds
        .try_into()
        .map_err(|v: Vec<OwnedFd>| failed(format!("{} descriptors kept, not 2", v.len())))?;
    let mut root = match LazyRoot::open(store, client, reference, opts.fetch.clone(), pin).await {
        Ok(r) => r,
        Err(OpenError::NoBootLayer(r)) => return Err(failed(r.to_string())),
        Err(OpenError::Failed(e)) if e.is_unauthorized() => {
            return Err(TakeOver::Unauthorized(error_chain(&e)))
        }
        Err(OpenError::Failed(e)) => return Err(failed(error_chain(&e))),
    };
    root.resume(target, opts.mount.clone(), device, table)
        .map_err(|e| failed(error_chain(&e)))?;
    let top = root
        .layers()
        .last()
        .map(|l| l.digest.to_string())
        .unwrap_or_default();
    let bind = base.join(top).join("diff");
    if !lazylayer_sys::mountinfo::is_mount_point(&bind) {
        rustix::mount::mount_bind(target, &bind)
            .map_err(|e| failed(format!("bind-mounting the lazy root: {e}")))?;
    }
    Ok(Served {
        base: base.to_path_buf(),
        mounted: vec![bind],
        reference: reference.clone(),
        layers: root.layers().len(),
        root: Some(root),
        _pin: None,
        holder: opts.holder.clone(),
    })
}

/// Remove what an earlier store left of an image: its layout in `base`
/// (bind mounts detached) and its lazy mount at `target`.
fn clear_layout(base: &Path, target: &Path, holder: Option<&Holder>) {
    let below = format!("{}/", base.display());
    for m in lazylayer_sys::mountinfo::mount_points() {
        if m.starts_with(&below) {
            let _ = rustix::mount::unmount(m.as_str(), rustix::mount::UnmountFlags::DETACH);
        }
    }
    if lazylayer_sys::mountinfo::is_mount_point(target) {
        tracing::info!(mount = %target.display(), "detached a lazy mount left by a previous store");
        let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
    }
    if let Some(h) = holder {
        let _ = h.drop_entry(&target.display().to_string());
    }
    if base.exists() {
        let _ = std::fs::remove_dir_all(base);
    }
}

/// Whether a container's overlay stands on a layer of the image laid out in
/// `base` (its lowerdir names a directory there). Overlayfs takes private
/// clones of its lower mounts, so an unmount would succeed under a running
/// container: mountinfo's overlay options are what tell. Relative lower
/// paths (which Podman uses for long option strings) cannot be placed:
/// counted as in use, so that nothing running loses its root.
fn in_use(base: &Path) -> bool {
    overlay_stands_on(&lazylayer_sys::mountinfo::read(), base)
}

/// [`in_use`] for the given mounts.
fn overlay_stands_on(mounts: &[lazylayer_sys::mountinfo::Mount], base: &Path) -> bool {
    let Ok(base) = base.canonicalize() else {
        return false;
    };
    for m in mounts {
        if m.fs_type != "overlay" {
            continue;
        }
        for o in &m.super_options {
            let Some(lowers) = o.strip_prefix("lowerdir=") else {
                continue;
            };
            for l in lowers.split(':').filter(|l| !l.is_empty()) {
                let p = Path::new(l);
                if !p.is_absolute() {
                    return true;
                }
                if p.canonicalize().is_ok_and(|c| c.starts_with(&base)) {
                    return true;
                }
            }
        }
    }
    false
}

fn lay_out(
    mut root: LazyRoot,
    dir: &Path,
    work: &Path,
    opts: MountOptions,
    holder: Option<Holder>,
) -> Result<Served, PodmanError> {
    let reference = root.reference().to_string();
    let base = dir.join(image_dir_name(&reference));
    if base.exists() {
        return Err(PodmanError::AlreadyServed {
            image: reference,
            path: base,
        });
    }
    let target = work.join("root");
    std::fs::create_dir_all(&target).map_err(io("creating the mount point", &target))?;
    let (reference, layers) = (root.reference().clone(), root.layers().to_vec());
    root.mount(&target, opts)
        .map_err(|source| PodmanError::Open {
            image: reference.to_string(),
            source: Box::new(source),
        })?;
    // A view of the lazy root, not the layers themselves: the top one holds
    // the whole image, the others nothing.
    let diffs = layer_dirs(&base, &reference, &layers, "lazylayer-view")?;
    let mut served = Served {
        base,
        mounted: Vec::new(),
        reference,
        layers: layers.len(),
        root: Some(root),
        _pin: None,
        holder,
    };
    let top_diff = diffs.last().expect("an optimized image has layers");
    rustix::mount::mount_bind(&target, top_diff)
        .map_err(|e| io("bind-mounting the lazy root", top_diff)(e.into()))?;
    served.mounted.push(top_diff.clone());
    Ok(served)
}

/// Podman's directory for each of `layers` (`diff`, empty `blob`, `info`)
/// under `base`; returns the `diff` directories, bottom first. The
/// diff-digest is one of our own, tagged `view`, not the layer's real one:
/// containers-storage reuses layers by digest, and these are views.
fn layer_dirs(
    base: &Path,
    reference: &Reference,
    layers: &[lazylayer_store::LayerRef],
    view: &str,
) -> Result<Vec<PathBuf>, PodmanError> {
    let mut diffs = Vec::new();
    for l in layers {
        let ld = base.join(l.digest.to_string());
        let diff = ld.join("diff");
        std::fs::create_dir_all(&diff).map_err(io("creating a layer directory", &diff))?;
        let blob = ld.join("blob");
        std::fs::write(&blob, b"").map_err(io("writing a layer blob", &blob))?;
        let digest = Digest::sha256_of(format!("{view}:{reference}:{}", l.diff_id).as_bytes());
        // toc-digest: Podman 5 finds a layer here by the TOC digest its
        // descriptor carries (`lazylayer optimize` names each layer's by its
        // blob digest, this directory's name) and wants it repeated here.
        let info = serde_json::json!({
            "compressed-size": l.size,
            "diff-digest": digest.to_string(),
            "toc-digest": l.digest.to_string(),
        });
        let path = ld.join("info");
        // Podman may read it at any moment: never a half-written one.
        lazylayer_sys::durable::write_atomically(&path, info.to_string().as_bytes())
            .map_err(io("writing a layer info", &path))?;
        diffs.push(diff);
    }
    Ok(diffs)
}

/// Lay out an optimized image the lazylayer store holds whole, without FUSE:
/// each layer's `diff` is its extracted tree in the store (bound read-only),
/// the boot layer's a read-only overlayfs of the index whiteout over it, so
/// that the index file stays out of containers. None when the image is not
/// local whole (it is served lazily then).
fn lay_out_local(
    store: &Store,
    reference: &Reference,
    dir: &Path,
    pin: &str,
) -> Result<Option<Served>, PodmanError> {
    let failed = |source: FetchError| PodmanError::Open {
        image: reference.to_string(),
        source: Box::new(source),
    };
    let Some(rec) = lazylayer_root::local_image(store, reference) else {
        return Ok(None);
    };
    if !lazylayer_root::is_optimized(store, reference, &rec).map_err(failed)? {
        return Ok(None);
    }
    let Some(stores) = rec
        .layers
        .iter()
        .map(|l| store.layer_dir(&l.digest))
        .collect::<Option<Vec<PathBuf>>>()
    else {
        return Ok(None);
    };
    let pin = store
        .pin_guard(pin, &rec.digests())
        .map_err(|e| failed(e.into()))?;
    store.touch_image(&rec.reference);
    let base = dir.join(image_dir_name(&reference.to_string()));
    if base.exists() {
        return Err(PodmanError::AlreadyServed {
            image: reference.to_string(),
            path: base,
        });
    }
    // The real layers this time (the boot one with its index hidden): a
    // tag of their own, so Podman never mixes them up with lazy views.
    let diffs = layer_dirs(&base, reference, &rec.layers, "lazylayer-native-view")?;
    let mut served = Served {
        base,
        mounted: Vec::new(),
        reference: reference.clone(),
        layers: rec.layers.len(),
        root: None,
        _pin: Some(pin),
        holder: None,
    };
    let top = stores.len() - 1;
    for (i, (src, diff)) in stores.iter().zip(&diffs).enumerate() {
        if i == top && lazylayer_root::holds_index(src) {
            let mask = lazylayer_root::index_mask(store).map_err(failed)?;
            let data = format!("lowerdir={}:{}", mask.display(), src.display());
            let data = std::ffi::CString::new(data).expect("store paths hold no NUL");
            rustix::mount::mount(
                "overlay",
                diff,
                "overlay",
                rustix::mount::MountFlags::RDONLY,
                data.as_c_str(),
            )
            .map_err(|e| io("mounting the boot layer without its index", diff)(e.into()))?;
            served.mounted.push(diff.clone());
            continue;
        }
        rustix::mount::mount_bind(src, diff)
            .map_err(|e| io("bind-mounting a stored layer", diff)(e.into()))?;
        served.mounted.push(diff.clone());
        // Read-only: Podman only stacks it, and the store is shared.
        rustix::mount::mount_remount(
            diff,
            rustix::mount::MountFlags::BIND | rustix::mount::MountFlags::RDONLY,
            "",
        )
        .map_err(|e| io("making a stored layer's bind read-only", diff)(e.into()))?;
    }
    Ok(Some(served))
}

#[cfg(test)]
mod layout_tests;

#[cfg(test)]
mod tests {
    #[test]
    fn image_dirs_are_standard_base64() {
        assert_eq!(super::image_dir_name(""), "");
        assert_eq!(super::image_dir_name("f"), "Zg==");
        assert_eq!(super::image_dir_name("fo"), "Zm8=");
        assert_eq!(super::image_dir_name("foo"), "Zm9v");
        assert_eq!(
            super::image_dir_name("127.0.0.1:58775/lazylayer/busybox:latest"),
            "MTI3LjAuMC4xOjU4Nzc1L2xhenlsYXllci9idXN5Ym94OmxhdGVzdA=="
        );
    }

    /// An overlay whose lowerdir is below the layout counts, even under a
    /// path with a space (mountinfo writes `\040`); one elsewhere, or a
    /// mount of another type naming it, does not; a relative lowerdir
    /// cannot be placed and counts.
    #[test]
    fn an_overlay_on_the_layout_keeps_it_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("image a");
        std::fs::create_dir_all(base.join("layer/diff")).unwrap();
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        let esc = |p: &std::path::Path| p.display().to_string().replace(' ', "\\040");
        let line = |fs: &str, lower: &str| {
            format!(
                "50 22 0:50 / /run/c/rootfs rw - {fs} overlay rw,lowerdir={lower},upperdir=/u\n"
            )
        };
        let stands_on =
            |text: String| super::overlay_stands_on(&lazylayer_sys::mountinfo::parse(&text), &base);
        let lower = format!(
            "{}:{}",
            esc(&dir.path().join("other")),
            esc(&base.join("layer/diff"))
        );
        assert!(stands_on(line("overlay", &lower)));
        assert!(!stands_on(line("overlay", &esc(&dir.path().join("other")))));
        assert!(!stands_on(line("tmpfs", &lower)));
        assert!(stands_on(line("overlay", "l/ABC:l/DEF")));
        assert!(!stands_on(String::new()));
    }
}
