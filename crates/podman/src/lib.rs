//! Podman (containers-storage) support: an *additional layer store* that
//! serves lazylayer-optimized images lazily to an unmodified Podman.
//!
//! For each image, the store lays out `DIR/<base64 of REF>/<layer digest>/`
//! with `diff`, `info` and `blob`: the top (boot) layer's `diff` is the
//! image's lazy merged root (a [`LazyRoot`], bind-mounted), the other layers'
//! are empty. Podman then pulls only manifest and config, and its containers
//! run on the lazy root. See docs/podman.md.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use lazylayer_fetch::{FetchError, FetchOptions, LazyRoot, MountOptions, OpenError};
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_store::Store;

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

/// One image laid out for Podman; undone on drop (bind mount, directories,
/// then the lazy root: FUSE, fetches, pin).
struct Served {
    base: PathBuf,
    bind: PathBuf,
    root: LazyRoot,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = rustix::mount::unmount(&self.bind, rustix::mount::UnmountFlags::DETACH);
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
            reference: s.root.reference(),
            layers: s.root.layers().len(),
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
    // Prefetch once the start has settled, as `run` and the snapshotter do.
    let opts = MountOptions {
        prefetch,
        ..MountOptions::default()
    };
    root.mount(&target, opts)
        .map_err(|source| PodmanError::Open {
            image: reference.clone(),
            source: Box::new(source),
        })?;
    let n = root.layers().len();
    let mut top_diff = PathBuf::new();
    for (i, l) in root.layers().iter().enumerate() {
        let ld = base.join(l.digest.to_string());
        let diff = ld.join("diff");
        std::fs::create_dir_all(&diff).map_err(io("creating a layer directory", &diff))?;
        let blob = ld.join("blob");
        std::fs::write(&blob, b"").map_err(io("writing a layer blob", &blob))?;
        // A diff-digest of our own, not the layer's real one: containers-storage
        // reuses layers by digest, and these are views (the top one holds the
        // whole image, the others nothing), not the layers themselves.
        let view =
            Digest::sha256_of(format!("lazylayer-view:{reference}:{}", l.diff_id).as_bytes());
        let info =
            serde_json::json!({ "compressed-size": l.size, "diff-digest": view.to_string() });
        let path = ld.join("info");
        std::fs::write(&path, info.to_string()).map_err(io("writing a layer info", &path))?;
        if i == n - 1 {
            top_diff = diff;
        }
    }
    rustix::mount::mount_bind(&target, &top_diff)
        .map_err(|e| io("bind-mounting the lazy root", &top_diff)(e.into()))?;
    Ok(Served {
        base,
        bind: top_diff,
        root,
    })
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
