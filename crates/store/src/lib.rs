//! The content store: verified blobs, extracted layers and image records on
//! local disk, shared by every image and every lazylayer process.
//!
//! Layout under the root (default `/var/lib/lazylayer`):
//! ```text
//! blobs/sha256/<hex>            manifests, configs, compressed layers (verified)
//! layers/sha256/<hex>/fs/       a layer extracted overlayfs-style (keyed by its blob digest)
//! layers/sha256/<hex>/layer.json
//! images/<sha256 of ref>.json   one record per image reference
//! locks/                        flock files: one per layer, one for the store
//! pins/<name>.json              content live processes use without an image record
//! tmp/                          work in progress; renamed into place when verified
//! files/sha256/<hex>            single files read by range from a layer not fetched
//!                               whole (seek indexes), keyed by their content's SHA-256
//! partial/sha256/<hex>          the received prefix of a cut layer download, resumed
//!                               by the next fetch of that layer (which holds its lock)
//! ```
//! Everything enters through `tmp/` and a rename, so a crash or a bad blob
//! leaves the store as it was; content is synced before the rename and the
//! directory after it ([`durable`]), so a power loss does too. `check`
//! verifies all of it after the fact (see the `check` module). Pulls hold the store lock shared and a per-layer
//! lock exclusive (two processes never fetch the same layer twice), and so
//! does every single-layer fetch; `prune` holds the store lock exclusive and
//! keeps what image records and the pins of living processes name.
//!
//! With a size limit ([`Store::with_size_limit`]) the store is a cache:
//! `used.json` records when each image was last used, and the least
//! recently used images nobody uses are evicted when it grows past the
//! limit (see the `cache` module).

mod cache;
mod check;
use lazylayer_sys::durable;
mod error;
mod lock;
mod pins;
mod pull;
mod push;
mod reader;
mod resolve;
mod size;
mod source;
mod spans;

use std::path::{Path, PathBuf};

use lazylayer_oci::{Digest, Reference};
use lazylayer_sys::IoError;
use serde::{Deserialize, Serialize};

pub use cache::{evicted_images, EvictReport, ImageUsage, StoreUsage, COUNTED_DIRS};
pub use check::{CheckReport, Problem, ProblemKind};
pub use error::StoreError;
pub use lock::FileLock;
pub use pins::Pin;
pub use pull::{unix_now, NoProgress, PullOptions, PullProgress};
pub use push::{PushCounts, PushReport};
pub use resolve::{layer_refs, resolve_layers, ResolvedLayers};
pub use size::{parse_size, SizeError};
pub use source::{BlobStream, BoxFuture, LayerEvents, LocalBlob, NoEvents, RegistryBlobs};
pub use spans::FetchLock;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// One layer of an image as recorded in the store.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRef {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub media_type: String,
}

/// What `pull` leaves behind for an image reference.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    pub reference: String,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    #[serde(default)]
    pub index_digest: Option<Digest>,
    pub config_digest: Digest,
    pub layers: Vec<LayerRef>,
    pub platform: String,
    /// Unix seconds.
    pub pulled_at: u64,
    /// The boot artifact the image was started from, when its boot layer
    /// is not one of its own layers (`optimize --attach`): kept with the
    /// image for its next lazy start, never part of its root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attached: Option<AttachedBoot>,
}

/// A boot layer attached to an image: the artifact manifest (a blob of the
/// store) and the layer it names.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachedBoot {
    pub artifact: Digest,
    pub layer: LayerRef,
}

impl ImageRecord {
    /// Every blob (and extracted layer) the image consists of, its attached
    /// boot artifact's included.
    pub fn digests(&self) -> Vec<Digest> {
        let mut v = vec![self.manifest_digest.clone(), self.config_digest.clone()];
        v.extend(self.index_digest.clone());
        v.extend(self.layers.iter().map(|l| l.digest.clone()));
        if let Some(a) = &self.attached {
            v.push(a.artifact.clone());
            v.push(a.layer.digest.clone());
        }
        v
    }

    pub fn total_size(&self) -> u64 {
        self.layers.iter().map(|l| l.size).sum()
    }
}

/// Facts about one extracted layer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
    pub entries: u64,
    pub file_bytes: u64,
}

/// What `prune` removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct PruneReport {
    pub blobs_removed: u64,
    pub layers_removed: u64,
    pub tmp_removed: u64,
    /// Prefixes of cut layer downloads.
    pub partials_removed: u64,
    /// Single files read by range (a cache: kept while any lazy root runs).
    pub files_removed: u64,
    pub bytes_freed: u64,
}

#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
    /// Evict down to this after content lands; None: unlimited.
    limit: Option<std::sync::Arc<cache::Limit>>,
}

fn io_err(what: impl Into<String>, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    let path = path.to_path_buf();
    move |source| StoreError::Io(IoError { what, path, source })
}

/// Where boot layers' chunk caches live, one directory each: `<root>/chunks`.
pub fn chunk_caches_root(store_root: &Path) -> PathBuf {
    store_root.join("chunks")
}

/// The chunk cache of boot layer `d`: `<root>/chunks/<hex>`.
pub fn chunk_cache_dir(store_root: &Path, d: &Digest) -> PathBuf {
    chunk_caches_root(store_root).join(d.hex())
}

/// A layer's directory, `<root>/layers/<algorithm>/<hex>`.
fn layer_base_in(store_root: &Path, d: &Digest) -> PathBuf {
    store_root
        .join("layers")
        .join(d.algorithm().as_str())
        .join(d.hex())
}

/// Whether layer `d` is complete in the store at `store_root` (its record
/// is written last): [`Store::layer_dir`]'s test, for a caller holding only
/// the root.
pub fn layer_complete(store_root: &Path, d: &Digest) -> bool {
    layer_base_in(store_root, d).join("layer.json").is_file()
}

impl Store {
    /// Open (creating if needed) a store rooted at `root`.
    ///
    /// The root is made private (0700, tightened if an older release left it
    /// open): extracted layers hold the image's setuid binaries and device
    /// nodes as they are, and no host user but root may reach them
    /// (CVE-2021-41091 is that hole in Docker's store).
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        create_private_dir(&root).map_err(io_err("creating the store", &root))?;
        for sub in ["blobs/sha256", "layers/sha256", "images", "locks", "tmp"] {
            let p = root.join(sub);
            create_private_dir(&p).map_err(io_err("creating store directory", &p))?;
        }
        Ok(Store { root, limit: None })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    pub fn has_blob(&self, d: &Digest) -> bool {
        self.blob_path(d).is_file()
    }

    pub fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let p = self.blob_path(d);
        let data = std::fs::read(&p).map_err(io_err(format!("reading blob {d}"), &p))?;
        // Re-verify on read: the store is plain files anyone with root can edit.
        d.verify(&format!("stored blob {d}"), &data)?;
        Ok(data)
    }

    /// Store a small blob (manifest, config) after checking its digest;
    /// durable when this returns (see [`durable`]).
    pub fn put_blob_bytes(&self, d: &Digest, data: &[u8]) -> Result<()> {
        d.verify(&format!("blob {d}"), data)?;
        let dest = self.blob_path(d);
        if dest.is_file() {
            return Ok(());
        }
        durable::write_atomically_via(&self.tmp_dir(), &dest, data)
            .map_err(io_err(format!("storing blob {d}"), &dest))
    }

    /// Where a single file read by range is kept, by its content's digest.
    pub fn file_path(&self, d: &Digest) -> PathBuf {
        self.root
            .join("files")
            .join(d.algorithm().as_str())
            .join(d.hex())
    }

    /// Keep one file's content (read by range from a layer not fetched
    /// whole) after checking it hashes to `d`; returns its path. Private
    /// directories, and a temp file renamed into place, as for blobs.
    pub fn put_file(&self, d: &Digest, data: &[u8]) -> Result<PathBuf> {
        d.verify(&format!("file content {d}"), data)?;
        let dest = self.file_path(d);
        if dest.is_file() {
            return Ok(dest);
        }
        let dir = dest.parent().expect("file paths have a parent");
        create_private_dir(dir).map_err(io_err("creating the files directory", dir))?;
        durable::write_atomically_via(&self.tmp_dir(), &dest, data)
            .map_err(io_err(format!("storing file content {d}"), &dest))?;
        Ok(dest)
    }

    fn layer_base(&self, d: &Digest) -> PathBuf {
        layer_base_in(&self.root, d)
    }

    /// The directory of every layer whose digest has `d`'s algorithm
    /// (`layers/<algorithm>`): each complete one is `<hex>/fs` in it, renamed
    /// into place only once verified and extracted.
    pub fn layers_root(&self, d: &Digest) -> PathBuf {
        self.root.join("layers").join(d.algorithm().as_str())
    }

    /// Where a layer's extracted tree lives once complete (whether or not it is yet).
    pub fn layer_fs_path(&self, d: &Digest) -> PathBuf {
        self.layer_base(d).join("fs")
    }

    /// The extracted tree of a layer, if it is complete in the store.
    pub fn layer_dir(&self, d: &Digest) -> Option<PathBuf> {
        layer_complete(&self.root, d).then(|| self.layer_fs_path(d))
    }

    pub fn layer_record(&self, d: &Digest) -> Option<LayerRecord> {
        let p = self.layer_base(d).join("layer.json");
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    fn image_path(&self, reference: &str) -> PathBuf {
        let key = Digest::sha256_of(reference.as_bytes());
        self.root.join("images").join(format!("{}.json", key.hex()))
    }

    /// The record of a pulled image, by reference as given to `pull`.
    pub fn image(&self, reference: &Reference) -> Option<ImageRecord> {
        let p = self.image_path(&reference_key(reference));
        std::fs::read(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    pub fn images(&self) -> Result<Vec<ImageRecord>> {
        let dir = self.root.join("images");
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).map_err(io_err("listing images", &dir))? {
            let e = e.map_err(io_err("listing images", &dir))?;
            if e.path().extension().is_some_and(|x| x == "json") {
                match std::fs::read(e.path()).map(|b| serde_json::from_slice::<ImageRecord>(&b)) {
                    Ok(Ok(r)) => out.push(r),
                    _ => {
                        tracing::warn!(path = %e.path().display(), "skipping unreadable image record")
                    }
                }
            }
        }
        out.sort_by(|a, b| a.reference.cmp(&b.reference));
        Ok(out)
    }

    pub fn save_image(&self, rec: &ImageRecord) -> Result<()> {
        let dest = self.image_path(&rec.reference);
        let bytes = serde_json::to_vec_pretty(rec).expect("serialisable record");
        durable::write_atomically_via(&self.tmp_dir(), &dest, &bytes)
            .map_err(io_err("saving image record", &dest))?;
        // Recorded means just pulled or just fully fetched: used now.
        self.touch_image(&rec.reference);
        self.enforce_limit_soon();
        Ok(())
    }

    /// Forget an image reference (its content stays until `prune`).
    pub fn remove_image(&self, reference: &Reference) -> Result<bool> {
        let p = self.image_path(&reference_key(reference));
        match std::fs::remove_file(&p) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(StoreError::Io(IoError {
                what: "removing image record".into(),
                path: p,
                source: e,
            })),
        }
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Where the received prefix of a layer blob's download is kept until
    /// the blob is complete and verified (then it is renamed to
    /// [`Store::blob_path`]). Only the holder of the layer's lock touches it.
    pub fn partial_path(&self, d: &Digest) -> PathBuf {
        self.partial_dir(d).join(d.hex())
    }

    pub(crate) fn partial_dir(&self, d: &Digest) -> PathBuf {
        self.root.join("partial").join(d.algorithm().as_str())
    }

    pub(crate) fn lock_path(&self, name: &str) -> PathBuf {
        self.root.join("locks").join(name)
    }

    /// Remove blobs and layers that neither an image record nor the pin of a
    /// living process references, leftovers in `tmp/` and the prefixes of cut
    /// downloads in `partial/`. Waits for running pulls and layer fetches to
    /// finish (they hold the store lock shared), so none of these is in use.
    pub fn prune(&self) -> Result<PruneReport> {
        let _lock = FileLock::exclusive(&self.lock_path("store.lock"))?;
        let mut keep = self.pinned();
        let keep_files = !keep.is_empty();
        for img in self.images()? {
            keep.insert(img.manifest_digest.hex().to_string());
            keep.insert(img.config_digest.hex().to_string());
            if let Some(i) = &img.index_digest {
                keep.insert(i.hex().to_string());
            }
            for l in &img.layers {
                keep.insert(l.digest.hex().to_string());
            }
        }
        let mut rep = PruneReport::default();
        for alg in ["sha256", "sha512"] {
            let blobs = self.root.join("blobs").join(alg);
            for e in read_dir_or_empty(&blobs)? {
                let name = e.file_name().to_string_lossy().to_string();
                if !keep.contains(&name) {
                    rep.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                    std::fs::remove_file(e.path()).map_err(io_err("removing blob", &e.path()))?;
                    rep.blobs_removed += 1;
                }
            }
            let layers = self.root.join("layers").join(alg);
            for e in read_dir_or_empty(&layers)? {
                let name = e.file_name().to_string_lossy().to_string();
                if !keep.contains(&name) {
                    rep.bytes_freed += self
                        .layer_record_at(&e.path())
                        .map(|r| r.file_bytes)
                        .unwrap_or(0);
                    std::fs::remove_dir_all(e.path())
                        .map_err(io_err("removing layer", &e.path()))?;
                    rep.layers_removed += 1;
                }
            }
        }
        // Spans are kept only for lazy starts in flight (a span lost here is
        // fetched again).
        let _ = std::fs::remove_dir_all(self.root.join("spans"));
        for e in read_dir_or_empty(&self.tmp_dir())? {
            let p = e.path();
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            r.map_err(io_err("removing leftover", &p))?;
            rep.tmp_removed += 1;
        }
        // Files read by range are keyed by content, not by image: kept while
        // any lazy root is live (it may open them again), removed otherwise.
        let files = if keep_files {
            Vec::new()
        } else {
            read_dir_or_empty(&self.root.join("files").join("sha256"))?
        };
        for e in files {
            let p = e.path();
            rep.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
            std::fs::remove_file(&p).map_err(io_err("removing file content", &p))?;
            rep.files_removed += 1;
        }
        for alg in ["sha256", "sha512"] {
            for e in read_dir_or_empty(&self.root.join("partial").join(alg))? {
                let p = e.path();
                rep.bytes_freed += e.metadata().map(|m| m.len()).unwrap_or(0);
                std::fs::remove_file(&p).map_err(io_err("removing partial download", &p))?;
                rep.partials_removed += 1;
            }
        }
        Ok(rep)
    }

    fn layer_record_at(&self, base: &Path) -> Option<LayerRecord> {
        std::fs::read(base.join("layer.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }
}

/// Create `dir` (and missing parents) readable by root only: 0700 on every
/// directory created, and on `dir` itself when it exists with looser bits.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o7700))?;
    }
    Ok(())
}

/// The inverse of [`Store::layer_fs_path`]: `sha256:<hex>` of a store layer
/// directory `.../layers/sha256/<hex>/fs` (None for any other path), for
/// callers that hold layer paths (overlay lowerdirs) rather than digests.
pub fn layer_digest_of_fs_path(p: &Path) -> Option<String> {
    let hex_dir = p.parent()?;
    let alg = hex_dir.parent()?;
    (alg.parent()?.file_name()? == "layers").then_some(())?;
    let hex = hex_dir.file_name()?.to_str()?;
    let alg = alg.file_name()?.to_str()?;
    (hex.chars().all(|c| c.is_ascii_hexdigit()) && !hex.is_empty()).then(|| format!("{alg}:{hex}"))
}

/// The key an image is filed under: the reference as the user wrote it, normalised.
pub fn reference_key(r: &Reference) -> String {
    r.to_string()
}

fn read_dir_or_empty(p: &Path) -> Result<Vec<std::fs::DirEntry>> {
    match std::fs::read_dir(p) {
        Ok(rd) => rd
            .collect::<std::io::Result<Vec<_>>>()
            .map_err(io_err("listing", p)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(StoreError::Io(IoError {
            what: "listing".into(),
            path: p.to_path_buf(),
            source: e,
        })),
    }
}

#[cfg(test)]
mod layer_path_tests {
    use super::*;

    #[test]
    fn store_layer_paths_name_their_digest() {
        let hex = "ab".repeat(32);
        let p = PathBuf::from(format!("/var/lib/lazylayer/layers/sha256/{hex}/fs"));
        assert_eq!(layer_digest_of_fs_path(&p), Some(format!("sha256:{hex}")));
        assert_eq!(
            layer_digest_of_fs_path(Path::new("/var/lib/lazylayer/snapshotter/hide")),
            None
        );
        assert_eq!(layer_digest_of_fs_path(Path::new("/fs")), None);
        // What layer_fs_path gives reads back.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(
            layer_digest_of_fs_path(&store.layer_fs_path(&d)),
            Some(d.to_string())
        );
    }
}
