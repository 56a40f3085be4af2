//! The store as a bounded cache: disk usage as `du` counts it, a last-used
//! time per image, and eviction of the least recently used images that no
//! living process uses, down to a size limit.
//!
//! Usage is the bytes on disk (`st_blocks` × 512, hard links once) of
//! `blobs/`, `layers/`, `files/` and `partial/`; `images/`, `pins/`,
//! `locks/` and `tmp/` are bookkeeping or work in progress and not counted.
//!
//! Eviction never removes what the pin of a living process names, a layer
//! that appears in a mount's options (an overlay lowerdir of a running
//! container: belt and braces beyond pins), nor a layer whose lock someone
//! holds (it is being fetched). It holds the store lock *shared*, as pulls
//! do, so it never waits for a pull nor blocks one; `prune` (exclusive)
//! waits for it.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::{io_err, read_dir_or_empty, FileLock, ImageRecord, Result, Store};

/// Content directories whose bytes count towards the limit, in the order
/// they are walked (a hard link between two counts in the first).
pub const COUNTED_DIRS: [&str; 4] = ["blobs", "layers", "files", "partial"];

/// Unreferenced content younger than this is left alone: it may be a
/// pull's or a lazy start's that is about to be named by a pin or record.
const ORPHAN_GRACE: Duration = Duration::from_secs(120);

/// Set once "the limit cannot be reached" was logged; cleared once it is.
static WARNED_OVER: AtomicBool = AtomicBool::new(false);

/// References evicted by this process (the latest, bounded).
static EVICTED_REFS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
const EVICTED_REFS_KEPT: usize = 1000;

/// The references this process evicted so far, oldest first (the latest
/// thousand), including those evicted on the background thread.
pub fn evicted_images() -> Vec<String> {
    EVICTED_REFS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

/// Bytes on disk per content directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StoreUsage {
    pub blobs: u64,
    pub layers: u64,
    pub files: u64,
    pub partial: u64,
}

impl StoreUsage {
    pub fn total(&self) -> u64 {
        self.blobs + self.layers + self.files + self.partial
    }
}

/// What [`Store::evict_to`] did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct EvictReport {
    pub limit: u64,
    pub usage_before: u64,
    pub usage_after: u64,
    /// References whose records were removed (their content is fetched
    /// again by the next pull or lazy start).
    pub images_evicted: Vec<String>,
    /// Content no record or pin named (left by interrupted or finished
    /// lazy starts), partial downloads and range-read files removed.
    pub unreferenced_removed: u64,
    pub bytes_freed: u64,
    /// References skipped because a living process uses them.
    pub images_in_use: Vec<String>,
    /// Bytes of content that could not be evicted because it is in use.
    pub in_use_bytes: u64,
}

/// One image's share of the store (for `lazylayer df`).
#[derive(Debug, Clone, Serialize)]
pub struct ImageUsage {
    pub reference: String,
    pub manifest_digest: String,
    /// Bytes on disk of its blobs and extracted layers.
    pub bytes: u64,
    /// The part of `bytes` another image record names too.
    pub shared_bytes: u64,
    /// Unix milliseconds it was last pulled, started or mounted.
    pub last_used_ms: u64,
    /// A living process pins some of its content, or a mount stacks one of
    /// its layers.
    pub in_use: bool,
}

/// Shared by a store's clones: the limit and the background evictor's state.
#[derive(Debug)]
pub(crate) struct Limit {
    bytes: u64,
    running: AtomicBool,
    again: AtomicBool,
}

/// Bytes on disk under `path` (not following symlinks), as `du` counts them:
/// every inode once (`seen`), directories included.
fn disk_bytes(path: &Path, seen: &mut HashSet<(u64, u64)>) -> u64 {
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut n = 0;
    if m.nlink() <= 1 || m.is_dir() || seen.insert((m.dev(), m.ino())) {
        n += m.blocks() * 512;
    }
    if m.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                n += disk_bytes(&e.path(), seen);
            }
        }
    }
    n
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hex digests of the store's layers that some mount names in its options
/// or root (an overlay's lowerdir, a bind of a layer directory).
fn mounted_layers(root: &Path) -> HashSet<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
    layers_in_mountinfo(&text, &root)
}

/// [`mounted_layers`] of a mountinfo text, `root` canonical. A bind mount
/// shows its source as a path inside its file system (field 4), so that is
/// also read as a full path through where that file system is mounted.
fn layers_in_mountinfo(text: &str, root: &Path) -> HashSet<String> {
    let mounts = lazylayer_sys::mountinfo::parse(text);
    // Every path a mount names, unescaped: its root, mount point, source
    // and options (an overlay's lowerdir).
    let mut texts: Vec<String> = mounts
        .iter()
        .flat_map(|m| {
            [&m.root, &m.mount_point, &m.source]
                .into_iter()
                .chain(&m.super_options)
                .cloned()
        })
        .collect();
    for m in &mounts {
        let (dev, src) = (&m.device, &m.root);
        for m2 in &mounts {
            let (dev2, root2, at) = (&m2.device, &m2.root, &m2.mount_point);
            if dev2 == dev {
                if let Some(rest) = src.strip_prefix(root2.as_str()) {
                    let at = at.trim_end_matches('/');
                    texts.push(format!("{at}/{}", rest.trim_start_matches('/')));
                }
            }
        }
    }
    let mut out = HashSet::new();
    for alg in ["sha256", "sha512"] {
        let needle = format!("{}/layers/{alg}/", root.display());
        for line in &texts {
            let mut rest = line.as_str();
            while let Some(i) = rest.find(&needle) {
                rest = &rest[i + needle.len()..];
                let hex: String = rest.chars().take_while(char::is_ascii_hexdigit).collect();
                if !hex.is_empty() {
                    out.insert(hex);
                }
            }
        }
    }
    out
}

fn young(m: &std::fs::Metadata) -> bool {
    m.modified()
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_none_or(|age| age < ORPHAN_GRACE)
}

impl Store {
    /// This store, evicting down to `limit` bytes after layers and images
    /// land ([`Store::enforce_limit_soon`]); None: unlimited.
    pub fn with_size_limit(mut self, limit: Option<u64>) -> Store {
        self.limit = limit.map(|bytes| {
            Arc::new(Limit {
                bytes,
                running: AtomicBool::new(false),
                again: AtomicBool::new(false),
            })
        });
        self
    }

    pub fn size_limit(&self) -> Option<u64> {
        self.limit.as_ref().map(|l| l.bytes)
    }

    /// Bytes on disk of the content directories, as `du` counts them.
    pub fn usage(&self) -> StoreUsage {
        let mut seen = HashSet::new();
        let mut u = [0u64; 4];
        for (i, d) in COUNTED_DIRS.iter().enumerate() {
            u[i] = disk_bytes(&self.root.join(d), &mut seen);
        }
        StoreUsage {
            blobs: u[0],
            layers: u[1],
            files: u[2],
            partial: u[3],
        }
    }

    /// [`StoreUsage::total`] of [`Store::usage`] (for a metrics endpoint).
    pub fn usage_bytes(&self) -> u64 {
        self.usage().total()
    }

    pub(crate) fn used_path(&self) -> PathBuf {
        self.root.join("used.json")
    }

    /// Last-used times (Unix ms) by image reference, as recorded.
    pub fn last_used(&self) -> HashMap<String, u64> {
        let p = self.used_path();
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
                // Only ever written whole (temp + rename): someone else wrote it.
                tracing::warn!(path = %p.display(), error = %e, "ignoring an unreadable last-used file");
                HashMap::new()
            }),
            Err(_) => HashMap::new(),
        }
    }

    /// Change the last-used file under its lock; written whole, atomically.
    fn update_used(&self, f: impl FnOnce(&mut HashMap<String, u64>)) -> Result<()> {
        let _lock = FileLock::exclusive(&self.lock_path("used.lock"))?;
        let mut used = self.last_used();
        f(&mut used);
        let dest = self.used_path();
        let bytes = serde_json::to_vec(&used).expect("serialisable");
        lazylayer_sys::durable::write_atomically_via(&self.tmp_dir(), &dest, &bytes)
            .map_err(io_err("saving the last-used file", &dest))
    }

    /// Record that the image filed under `reference` (as in its record) was
    /// used now: pulled, started, mounted. Best effort: a failure is logged.
    pub fn touch_image(&self, reference: &str) {
        let now = now_ms();
        if let Err(e) = self.update_used(|u| {
            u.insert(reference.to_string(), now);
        }) {
            tracing::warn!(image = reference, error = %e, "recording when the image was used");
        }
    }

    fn last_used_of(used: &HashMap<String, u64>, rec: &ImageRecord) -> u64 {
        used.get(&rec.reference)
            .copied()
            .unwrap_or(rec.pulled_at.saturating_mul(1000))
    }

    /// Hex digests no eviction may touch now: pinned by a living process,
    /// or a layer some mount stacks.
    fn in_use(&self) -> HashSet<String> {
        let mut s = self.pinned();
        s.extend(mounted_layers(&self.root));
        s
    }

    /// Bytes on disk of one digest's blob and extracted layer.
    fn content_bytes(&self, hex: &str, seen: &mut HashSet<(u64, u64)>) -> u64 {
        ["sha256", "sha512"]
            .iter()
            .map(|alg| {
                disk_bytes(&self.root.join("blobs").join(alg).join(hex), seen)
                    + disk_bytes(&self.root.join("layers").join(alg).join(hex), seen)
            })
            .sum()
    }

    /// Every image's share of the store, least recently used first.
    pub fn image_usage(&self) -> Result<Vec<ImageUsage>> {
        let images = self.images()?;
        let used = self.last_used();
        let in_use = self.in_use();
        let mut named: HashMap<String, usize> = HashMap::new();
        for img in &images {
            for d in dedup_hex(img) {
                *named.entry(d).or_default() += 1;
            }
        }
        let mut sizes: HashMap<String, u64> = HashMap::new();
        let mut out: Vec<ImageUsage> = images
            .iter()
            .map(|img| {
                let (mut bytes, mut shared) = (0, 0);
                for d in dedup_hex(img) {
                    let n = *sizes
                        .entry(d.clone())
                        .or_insert_with(|| self.content_bytes(&d, &mut HashSet::new()));
                    bytes += n;
                    if named[&d] > 1 {
                        shared += n;
                    }
                }
                ImageUsage {
                    reference: img.reference.clone(),
                    manifest_digest: img.manifest_digest.to_string(),
                    bytes,
                    shared_bytes: shared,
                    last_used_ms: Self::last_used_of(&used, img),
                    in_use: image_in_use(img, &in_use),
                }
            })
            .collect();
        out.sort_by_key(|u| u.last_used_ms);
        Ok(out)
    }

    /// Remove one digest's blob and extracted layer unless its lock is held
    /// (a fetch of it runs); returns the bytes freed, None when skipped.
    pub(crate) fn remove_content(&self, hex: &str) -> Result<Option<u64>> {
        let Some(_lock) = FileLock::try_exclusive(&self.lock_path(&format!("{hex}.lock")))? else {
            return Ok(None);
        };
        let mut freed = 0;
        for alg in ["sha256", "sha512"] {
            let layer = self.root.join("layers").join(alg).join(hex);
            if layer.exists() {
                freed += disk_bytes(&layer, &mut HashSet::new());
                // Renamed away first: a half-removed layer must never look
                // complete (its layer.json is what says so).
                let gone = self.tmp_dir().join(format!("evicted-{alg}-{hex}"));
                let _ = std::fs::remove_dir_all(&gone);
                std::fs::rename(&layer, &gone).map_err(io_err("evicting layer", &layer))?;
                std::fs::remove_dir_all(&gone).map_err(io_err("removing evicted layer", &gone))?;
            }
            let blob = self.root.join("blobs").join(alg).join(hex);
            if let Ok(m) = std::fs::symlink_metadata(&blob) {
                freed += m.blocks() * 512;
                std::fs::remove_file(&blob).map_err(io_err("evicting blob", &blob))?;
            }
        }
        Ok(Some(freed))
    }

    /// Remove content nothing names (no record, no living pin, no mount)
    /// and older than [`ORPHAN_GRACE`], partial downloads nobody is
    /// resuming, and range-read files while no lazy root runs.
    fn remove_unreferenced(
        &self,
        named: &HashSet<String>,
        in_use: &HashSet<String>,
        rep: &mut EvictReport,
    ) -> Result<()> {
        let mut orphans = HashSet::new();
        for alg in ["sha256", "sha512"] {
            for dir in ["blobs", "layers"] {
                for e in read_dir_or_empty(&self.root.join(dir).join(alg))? {
                    let hex = e.file_name().to_string_lossy().to_string();
                    if named.contains(&hex) || in_use.contains(&hex) {
                        continue;
                    }
                    if e.metadata().map(|m| young(&m)).unwrap_or(true) {
                        continue;
                    }
                    orphans.insert(hex);
                }
            }
        }
        for hex in orphans {
            if let Some(n) = self.remove_content(&hex)? {
                rep.unreferenced_removed += 1;
                rep.bytes_freed += n;
            }
        }
        for alg in ["sha256", "sha512"] {
            for e in read_dir_or_empty(&self.root.join("partial").join(alg))? {
                let hex = e.file_name().to_string_lossy().to_string();
                // Its fetch holds the layer lock; a free lock means a cut
                // download whose resume is worth less than the space.
                let Some(_lock) = FileLock::try_exclusive(&self.lock_path(&format!("{hex}.lock")))?
                else {
                    continue;
                };
                let p = e.path();
                let n = e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                std::fs::remove_file(&p).map_err(io_err("removing partial download", &p))?;
                rep.unreferenced_removed += 1;
                rep.bytes_freed += n;
            }
        }
        // Keyed by content, not by image: a running lazy root may open them again.
        if self.pinned().is_empty() {
            for e in read_dir_or_empty(&self.root.join("files").join("sha256"))? {
                let p = e.path();
                let n = e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
                std::fs::remove_file(&p).map_err(io_err("removing file content", &p))?;
                rep.unreferenced_removed += 1;
                rep.bytes_freed += n;
            }
        }
        Ok(())
    }

    /// Evict until the store's usage is at most `limit` bytes: first content
    /// nothing names, then whole images, least recently used first, with
    /// their records (a layer or blob another remaining image names stays).
    /// Images a living process uses are skipped; the report says how much
    /// is in use when that leaves the store over the limit.
    pub fn evict_to(&self, limit: u64) -> Result<EvictReport> {
        let _evicting = FileLock::exclusive(&self.lock_path("evict.lock"))?;
        // Shared, as pulls hold it: prune (exclusive) waits for us and we
        // never wait for a pull.
        let _store_lock = FileLock::shared(&self.lock_path("store.lock"))?;
        let mut rep = EvictReport {
            limit,
            usage_before: self.usage_bytes(),
            ..EvictReport::default()
        };
        if rep.usage_before <= limit {
            rep.usage_after = rep.usage_before;
            return Ok(rep);
        }
        let mut images = self.images()?;
        let used = self.last_used();
        images.sort_by_key(|i| Self::last_used_of(&used, i));
        let in_use = self.in_use();
        let mut named: HashMap<String, usize> = HashMap::new();
        for img in &images {
            for d in dedup_hex(img) {
                *named.entry(d).or_default() += 1;
            }
        }
        let named_set: HashSet<String> = named.keys().cloned().collect();
        self.remove_unreferenced(&named_set, &in_use, &mut rep)?;
        let mut usage = self.usage_bytes();
        let mut evicted = Vec::new();
        for img in &images {
            if usage <= limit {
                break;
            }
            let hexes = dedup_hex(img);
            if image_in_use(img, &in_use) {
                rep.images_in_use.push(img.reference.clone());
                continue;
            }
            // The record goes first: a crash then leaves unreferenced
            // content (removed by the next eviction or prune), never a
            // record whose layers are gone.
            let reference = img.reference.clone();
            let path = self.image_path(&reference);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("removing image record", &path)(e)),
            }
            for d in hexes {
                let n = named.get_mut(&d).expect("counted above");
                *n -= 1;
                // A layer a running container of another image stacks
                // (the base they share) stays.
                if *n == 0 && !in_use.contains(&d) {
                    if let Some(freed) = self.remove_content(&d)? {
                        rep.bytes_freed += freed;
                    }
                }
            }
            tracing::info!(image = %reference, "evicted from the store (least recently used)");
            evicted.push(reference.clone());
            rep.images_evicted.push(reference);
            usage = self.usage_bytes();
        }
        if !evicted.is_empty() {
            let gone: HashSet<String> = evicted.into_iter().collect();
            self.update_used(|u| u.retain(|r, _| !gone.contains(r)))?;
        }
        rep.usage_after = usage;
        let mut seen = HashSet::new();
        rep.in_use_bytes = in_use
            .iter()
            .map(|d| self.content_bytes(d, &mut seen))
            .sum();
        // The process's metrics (`lazylayer_evictions_total`, `..._evicted_bytes_total`).
        lazylayer_metrics::evicted(rep.images_evicted.len() as u64, rep.bytes_freed);
        {
            let mut refs = EVICTED_REFS.lock().unwrap_or_else(|e| e.into_inner());
            refs.extend(rep.images_evicted.iter().cloned());
            let over = refs.len().saturating_sub(EVICTED_REFS_KEPT);
            refs.drain(..over);
        }
        Ok(rep)
    }

    /// With a size limit set: evict down to it now, in this thread. Never
    /// fails: a failure is logged, and so is (once, until the limit is met
    /// again) a store left over the limit by content in use.
    pub fn enforce_limit(&self) -> Option<EvictReport> {
        let limit = self.size_limit()?;
        match self.evict_to(limit) {
            Ok(rep) => {
                if rep.usage_after > limit {
                    if !WARNED_OVER.swap(true, Ordering::Relaxed) {
                        tracing::warn!(
                            limit,
                            usage = rep.usage_after,
                            in_use = rep.in_use_bytes,
                            images_in_use = ?rep.images_in_use,
                            "the store stays over its size limit: the rest is in use by running containers or fetches"
                        );
                    }
                } else {
                    WARNED_OVER.store(false, Ordering::Relaxed);
                }
                if !rep.images_evicted.is_empty() || rep.unreferenced_removed > 0 {
                    tracing::info!(
                        evicted = ?rep.images_evicted,
                        unreferenced = rep.unreferenced_removed,
                        freed = rep.bytes_freed,
                        usage = rep.usage_after,
                        limit,
                        "store evicted down towards its size limit"
                    );
                }
                Some(rep)
            }
            Err(e) => {
                tracing::warn!(limit, error = %e, "evicting from the store");
                None
            }
        }
    }

    /// [`Store::enforce_limit`] on a background thread, once at a time per
    /// store (a call while one runs makes it run once more): called when a
    /// layer or an image has landed, so a fetch never waits for eviction.
    pub fn enforce_limit_soon(&self) {
        let Some(l) = self.limit.clone() else { return };
        l.again.store(true, Ordering::SeqCst);
        if l.running.swap(true, Ordering::SeqCst) {
            return;
        }
        let store = self.clone();
        let spawned = std::thread::Builder::new()
            .name("lazylayer-evict".into())
            .spawn(move || loop {
                l.again.store(false, Ordering::SeqCst);
                store.enforce_limit();
                l.running.store(false, Ordering::SeqCst);
                // A request that came while running, and nobody took it.
                if !l.again.load(Ordering::SeqCst) || l.running.swap(true, Ordering::SeqCst) {
                    return;
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "starting the store's evictor");
            if let Some(l) = &self.limit {
                l.running.store(false, Ordering::SeqCst);
            }
        }
    }
}

/// Whether a living process uses the image itself: its manifest is pinned
/// (every user pins it: run, the snapshotter, the Podman store, a pull), or
/// every one of its layers is pinned or mounted. An image that merely
/// shares a layer with one in use is not (that layer stays when it goes).
fn image_in_use(img: &ImageRecord, in_use: &HashSet<String>) -> bool {
    in_use.contains(img.manifest_digest.hex())
        || (!img.layers.is_empty() && img.layers.iter().all(|l| in_use.contains(l.digest.hex())))
}

/// The hex digests an image's record names, once each.
fn dedup_hex(img: &ImageRecord) -> Vec<String> {
    let mut v: Vec<String> = img.digests().iter().map(|d| d.hex().to_string()).collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerRef;
    use lazylayer_oci::Digest;

    /// A store holding images made of fake content: each layer `name` is a
    /// blob of `kb` KiB and an extracted layer with a file of as much.
    struct Fixture {
        _dir: tempfile::TempDir,
        store: Store,
    }

    fn digest(name: &str) -> Digest {
        Digest::sha256_of(name.as_bytes())
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path()).unwrap();
            Fixture { _dir: dir, store }
        }

        fn layer(&self, name: &str, kb: usize) {
            let d = digest(name);
            std::fs::write(self.store.blob_path(&d), vec![7u8; kb << 10]).unwrap();
            let base = self.store.layer_base(&d);
            std::fs::create_dir_all(base.join("fs")).unwrap();
            std::fs::write(base.join("fs/data"), vec![1u8; kb << 10]).unwrap();
            std::fs::write(base.join("layer.json"), b"{}").unwrap();
        }

        /// An image of `layers` (created if missing, `kb` each), used at `used_ms`.
        fn image(&self, reference: &str, layers: &[&str], kb: usize, used_ms: u64) {
            for l in layers {
                if self.store.layer_dir(&digest(l)).is_none() {
                    self.layer(l, kb);
                }
            }
            let manifest = format!("manifest of {reference}");
            let config = format!("config of {reference}");
            for b in [&manifest, &config] {
                self.store.put_blob_bytes(&digest(b), b.as_bytes()).unwrap();
            }
            let rec = ImageRecord {
                reference: reference.into(),
                manifest_digest: digest(&manifest),
                manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
                index_digest: None,
                config_digest: digest(&config),
                layers: layers
                    .iter()
                    .map(|l| LayerRef {
                        digest: digest(l),
                        diff_id: digest(l),
                        size: 0,
                        media_type: String::new(),
                    })
                    .collect(),
                platform: "linux/amd64".into(),
                pulled_at: 0,
                attached: None,
            };
            self.store.save_image(&rec).unwrap();
            self.store
                .update_used(|u| {
                    u.insert(reference.into(), used_ms);
                })
                .unwrap();
        }

        fn refs(&self) -> Vec<String> {
            self.store
                .images()
                .unwrap()
                .into_iter()
                .map(|i| i.reference)
                .collect()
        }

        /// What a running container's process holds on its image.
        fn pin_image(&self, reference: &str) -> crate::Pin {
            let rec = (self.store.images().unwrap().into_iter())
                .find(|i| i.reference == reference)
                .unwrap();
            self.store.pin_guard("test-run", &rec.digests()).unwrap()
        }

        fn has_layer(&self, name: &str) -> bool {
            self.store.layer_dir(&digest(name)).is_some()
                && self.store.blob_path(&digest(name)).exists()
        }
    }

    #[test]
    fn usage_counts_blocks_like_du() {
        let f = Fixture::new();
        f.layer("a", 64);
        let u = f.store.usage();
        // Two 64 KiB files (blob + extracted), plus directories.
        assert!(u.blobs >= 64 << 10 && u.layers >= 64 << 10, "{u:?}");
        let out = std::process::Command::new("du")
            .args(["-s", "-c", "--block-size=1"])
            .args(
                COUNTED_DIRS
                    .iter()
                    .map(|d| f.store.root().join(d))
                    .filter(|p| p.exists()),
            )
            .output()
            .unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        let total: u64 = text
            .lines()
            .last()
            .and_then(|l| l.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(u.total(), total, "du says:\n{text}");
    }

    #[test]
    fn least_recently_used_images_go_first_whole_with_their_records() {
        let f = Fixture::new();
        f.image("old", &["old-base"], 256, 1_000);
        f.image("middle", &["middle-base"], 256, 2_000);
        f.image("new", &["new-base"], 256, 3_000);
        let before = f.store.usage_bytes();
        // Room for about two of the three.
        let rep = f.store.evict_to(before - (200 << 10)).unwrap();
        assert_eq!(rep.images_evicted, vec!["old".to_string()]);
        assert_eq!(f.refs(), vec!["middle".to_string(), "new".to_string()]);
        assert!(!f.has_layer("old-base"));
        assert!(f.has_layer("middle-base") && f.has_layer("new-base"));
        assert!(rep.usage_after <= before - (200 << 10), "{rep:?}");
        assert_eq!(rep.usage_after, f.store.usage_bytes());
        assert!(!f.store.last_used().contains_key("old"));
        // Using "middle" makes "new" the least recently used.
        f.store.touch_image("middle");
        let rep = f.store.evict_to(f.store.usage_bytes() - 1).unwrap();
        assert_eq!(rep.images_evicted, vec!["new".to_string()]);
        assert_eq!(f.refs(), vec!["middle".to_string()]);
        // Under the limit: nothing to do.
        let rep = f.store.evict_to(u64::MAX).unwrap();
        assert!(rep.images_evicted.is_empty());
    }

    #[test]
    fn pinned_images_are_never_evicted() {
        let f = Fixture::new();
        f.image("running", &["run-base"], 256, 1_000);
        f.image("idle", &["idle-base"], 256, 2_000);
        let _pin = f.pin_image("running");
        let rep = f.store.evict_to(0).unwrap();
        assert_eq!(rep.images_evicted, vec!["idle".to_string()]);
        assert_eq!(rep.images_in_use, vec!["running".to_string()]);
        assert!(f.has_layer("run-base"));
        assert!(
            rep.usage_after > 0 && rep.in_use_bytes >= 512 << 10,
            "{rep:?}"
        );
        // A pin whose process is gone counts for nothing.
        drop(_pin);
        let rep = f.store.evict_to(0).unwrap();
        assert_eq!(rep.images_evicted, vec!["running".to_string()]);
        assert!(!f.has_layer("run-base"));
    }

    #[test]
    fn a_layer_another_image_names_stays() {
        let f = Fixture::new();
        f.image("old", &["shared-base", "old-top"], 256, 1_000);
        f.image("new", &["shared-base", "new-top"], 256, 2_000);
        let rep = f.store.evict_to(f.store.usage_bytes() - 1).unwrap();
        assert_eq!(rep.images_evicted, vec!["old".to_string()]);
        assert!(f.has_layer("shared-base"), "shared with the image kept");
        assert!(!f.has_layer("old-top"));
        assert!(f.has_layer("new-top"));
    }

    #[test]
    fn an_image_sharing_a_layer_with_a_running_one_goes_but_the_layer_stays() {
        let f = Fixture::new();
        f.image("running", &["common-base", "run-top"], 256, 2_000);
        f.image("sharer", &["common-base", "sharer-top"], 256, 1_000);
        let _pin = f.pin_image("running");
        let rep = f.store.evict_to(0).unwrap();
        assert_eq!(rep.images_evicted, vec!["sharer".to_string()]);
        assert_eq!(f.refs(), vec!["running".to_string()]);
        assert!(f.has_layer("common-base") && f.has_layer("run-top"));
        assert!(!f.has_layer("sharer-top"));
    }

    #[test]
    fn a_layer_being_fetched_is_left_alone() {
        let f = Fixture::new();
        f.image("old", &["busy"], 256, 1_000);
        let hex = digest("busy").hex().to_string();
        let _fetching = FileLock::exclusive(&f.store.lock_path(&format!("{hex}.lock"))).unwrap();
        let rep = f.store.evict_to(0).unwrap();
        // The record goes; the locked content stays for its fetch.
        assert_eq!(rep.images_evicted, vec!["old".to_string()]);
        assert!(f.has_layer("busy"));
    }

    #[test]
    fn layers_named_by_mounts_are_found() {
        let root = Path::new("/var/lib/lazylayer");
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let text = format!(
            "36 25 0:33 / /run/c/rootfs rw - overlay overlay rw,lowerdir=/var/lib/lazylayer/layers/sha256/{a}/fs:/var/lib/lazylayer/layers/sha256/{b}/fs,upperdir=/u\n\
             37 25 0:34 / /x rw - overlay overlay rw,lowerdir=/elsewhere/layers/sha256/{}/fs\n",
            "ef".repeat(32)
        );
        let found = layers_in_mountinfo(&text, root);
        assert_eq!(found, HashSet::from([a.clone(), b.clone()]));
        // A bind of a layer of a store on its own file system (mounted at
        // /var/lib/lazylayer): the source is a path inside that file system.
        let text = format!(
            "40 25 8:17 / /var/lib/lazylayer rw - ext4 /dev/sdb1 rw\n\
             41 25 8:17 /layers/sha256/{a}/fs /mnt/view ro - ext4 /dev/sdb1 rw\n"
        );
        assert_eq!(layers_in_mountinfo(&text, root), HashSet::from([a]));
    }

    /// mountinfo writes a space as `\040`: a store under a path with a
    /// space still sees its layers under an overlay and a bind.
    #[test]
    fn layers_named_by_mounts_are_found_under_a_path_with_a_space() {
        let root = Path::new("/srv/lazy layer");
        let (a, b) = ("ab".repeat(32), "cd".repeat(32));
        let text = format!(
            "36 25 0:33 / /run/c\\040d/rootfs rw - overlay overlay rw,lowerdir=/srv/lazy\\040layer/layers/sha256/{a}/fs,upperdir=/u\n\
             40 25 8:17 / /srv/lazy\\040layer rw - ext4 /dev/sdb1 rw\n\
             41 25 8:17 /layers/sha256/{b}/fs /mnt/view ro - ext4 /dev/sdb1 rw\n"
        );
        assert_eq!(layers_in_mountinfo(&text, root), HashSet::from([a, b]));
    }

    /// The real /proc/self/mountinfo: a layer directory bound somewhere
    /// stays, though no pin names it (needs root to mount).
    #[test]
    fn root_a_layer_a_mount_stacks_is_never_evicted() {
        if !rustix::process::geteuid().is_root() {
            eprintln!("skipped: needs root to bind-mount a layer");
            return;
        }
        let f = Fixture::new();
        f.image("mounted", &["mounted-base"], 256, 1_000);
        let target = tempfile::tempdir().unwrap();
        let src = f.store.layer_dir(&digest("mounted-base")).unwrap();
        rustix::mount::mount_bind(&src, target.path()).unwrap();
        struct Unmount<'a>(&'a Path);
        impl Drop for Unmount<'_> {
            fn drop(&mut self) {
                let _ = rustix::mount::unmount(self.0, rustix::mount::UnmountFlags::DETACH);
            }
        }
        let guard = Unmount(target.path());
        let rep = f.store.evict_to(0).unwrap();
        assert!(rep.images_evicted.is_empty(), "{rep:?}");
        assert_eq!(rep.images_in_use, vec!["mounted".to_string()]);
        assert!(f.has_layer("mounted-base"));
        drop(guard);
        let rep = f.store.evict_to(0).unwrap();
        assert_eq!(rep.images_evicted, vec!["mounted".to_string()]);
    }
}
