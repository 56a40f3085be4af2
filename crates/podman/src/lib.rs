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

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use lazylayer_fetch::{FetchError, FetchOptions, LazyRoot, MountOptions, OpenError};
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_store::{Pin, Store};

#[derive(Debug, thiserror::Error)]
pub enum PodmanError {
    #[error("{0} has no boot layer: optimize it first (`lazylayer optimize`)")]
    NoBootLayer(String),
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
    /// Fetch the remaining layers in the background once a start has
    /// settled (a container's first reads, or 2 s after the mount).
    pub prefetch: bool,
}

/// Podman's name for an image's directory in the store: the reference as
/// Podman names it, base64 with the standard alphabet (a '/' in it simply
/// nests directories).
pub fn image_dir_name(reference: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(reference.as_bytes())
}

/// One image laid out for Podman; undone on drop (the mounts on its `diff`
/// directories, directories, then the lazy root: FUSE, fetches, pin; or the
/// pin of a local image's layers).
struct Served {
    base: PathBuf,
    mounted: Vec<PathBuf>,
    reference: Reference,
    layers: usize,
    _root: Option<LazyRoot>,
    _pin: Option<Pin>,
}

impl Drop for Served {
    fn drop(&mut self) {
        for m in self.mounted.iter().rev() {
            let _ = rustix::mount::unmount(m, rustix::mount::UnmountFlags::DETACH);
        }
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

/// The images a running store serves. Dropped: every entry is removed and
/// every lazy root unmounted (each image is recorded in the lazylayer store
/// once all its layers arrived).
pub struct LayerStore {
    served: Vec<Served>,
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
        let mut served = Vec::new();
        for (i, reference) in images.iter().enumerate() {
            let pin = format!("podman-store-{}-{i}", std::process::id());
            if let Some(local) = lay_out_local(store, reference, &opts.dir, &pin)? {
                served.push(local);
                continue;
            }
            let opened = LazyRoot::open(store, client.clone(), reference, opts.fetch.clone(), &pin);
            let root = match opened.await {
                Ok(root) => root,
                Err(OpenError::NoBootLayer(r)) => return Err(PodmanError::NoBootLayer(r)),
                Err(OpenError::Failed(source)) => {
                    return Err(PodmanError::Open {
                        image: reference.to_string(),
                        source: Box::new(source),
                    })
                }
            };
            let work = store
                .root()
                .join("podman-store")
                .join(format!("{}-{i}", std::process::id()));
            served.push(lay_out(root, &opts.dir, &work, opts.prefetch)?);
        }
        Ok(LayerStore { served })
    }

    pub fn images(&self) -> impl Iterator<Item = ServedImage<'_>> {
        self.served.iter().map(|s| ServedImage {
            reference: &s.reference,
            layers: s.layers,
        })
    }
}

fn lay_out(
    mut root: LazyRoot,
    dir: &Path,
    work: &Path,
    prefetch: bool,
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
    // Prefetch once the start has settled, as `run` and the snapshotter do.
    let opts = MountOptions {
        prefetch,
        ..MountOptions::default()
    };
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
        _root: Some(root),
        _pin: None,
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
        let info =
            serde_json::json!({ "compressed-size": l.size, "diff-digest": digest.to_string() });
        let path = ld.join("info");
        std::fs::write(&path, info.to_string()).map_err(io("writing a layer info", &path))?;
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
    let Some(rec) = lazylayer_fetch::local_image(store, reference) else {
        return Ok(None);
    };
    if !lazylayer_fetch::is_optimized(store, reference, &rec).map_err(failed)? {
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
        _root: None,
        _pin: Some(pin),
    };
    let top = stores.len() - 1;
    for (i, (src, diff)) in stores.iter().zip(&diffs).enumerate() {
        if i == top && lazylayer_fetch::holds_index(src) {
            let mask = lazylayer_fetch::index_mask(store).map_err(failed)?;
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
}
