//! `lazylayer check`: verify what the store holds, and with `repair` remove
//! what is damaged so that the next pull or start fetches it again.
//!
//! What is checked, and how each is known good:
//! - blobs/ and files/: the content hashes to its file name.
//! - layers/: a layer is complete when its `layer.json` is in place (it is
//!   renamed in with the tree, after a sync); the record must name the
//!   directory's digest, `fs/` must exist, and its regular files must add up
//!   to the bytes the record says were written (a power loss before this
//!   release's syncs could leave files empty under a complete-looking record).
//! - images/: every record parses and names only content that is present:
//!   its manifest, config (and index) blobs, and each layer's blob and tree.
//! - partial/: a kept download prefix is no longer than its layer's blob.
//! - chunks/ (boot chunk caches): the presence marks are 0 or 1 and the
//!   sparse blob has the layer's size. (Each chunk marked present is checked
//!   against its digest again when the next start loads it.)
//! - used.json: parses.
//!
//! Damage to a digest's blob or tree removes both (a tree without its blob
//! would never be fetched again: the pull sees the layer and skips it); a
//! record naming removed content is removed too, so the next pull of that
//! image fetches what is missing.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use lazylayer_oci::Digest;
use serde::Serialize;

use crate::{read_dir_or_empty, FileLock, ImageRecord, LayerRecord, Result, Store};

/// One thing wrong in the store.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Problem {
    pub path: PathBuf,
    pub kind: ProblemKind,
    /// What is wrong, in words.
    pub detail: String,
    /// Removed by `repair` (false without it, or when it is in use).
    pub repaired: bool,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum ProblemKind {
    /// A blob whose content does not hash to its name.
    BadBlob,
    /// A single range-read file whose content does not hash to its name.
    BadFile,
    /// An extracted layer without a valid record, tree or content.
    IncompleteLayer,
    /// An image record that does not parse.
    UnreadableRecord,
    /// An image record naming a blob or layer the store does not hold.
    MissingContent,
    /// A kept download prefix longer than the blob it is a prefix of.
    BadPartial,
    /// A boot chunk cache whose files do not fit its layer.
    BadChunkCache,
    /// The last-used file does not parse.
    UnreadableUsage,
}

/// What [`Store::check`] found.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CheckReport {
    pub blobs: u64,
    pub layers: u64,
    pub images: u64,
    pub problems: Vec<Problem>,
}

impl CheckReport {
    /// Problems still there (found and not repaired).
    pub fn unrepaired(&self) -> usize {
        self.problems.iter().filter(|p| !p.repaired).count()
    }
}

impl Store {
    /// Verify the store (see the module's documentation); with `repair`,
    /// remove what is damaged. Holds the store lock, shared to look and
    /// exclusive to repair (waiting for running pulls and layer fetches).
    pub fn check(&self, repair: bool) -> Result<CheckReport> {
        let lock = self.lock_path("store.lock");
        let _lock = if repair {
            FileLock::exclusive(&lock)?
        } else {
            FileLock::shared(&lock)?
        };
        let mut rep = CheckReport::default();
        // Hex digests whose blob or tree is damaged (removed when repairing).
        let mut damaged: HashSet<String> = HashSet::new();

        for alg in ["sha256", "sha512"] {
            for e in read_dir_or_empty(&self.root.join("blobs").join(alg))? {
                rep.blobs += 1;
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(detail) = content_mismatch(alg, &name, &path) {
                    damaged.insert(name);
                    rep.problems
                        .push(problem(path, ProblemKind::BadBlob, detail));
                }
            }
            for e in read_dir_or_empty(&self.root.join("layers").join(alg))? {
                rep.layers += 1;
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(detail) = layer_damage(&format!("{alg}:{name}"), &e.path()) {
                    damaged.insert(name);
                    rep.problems
                        .push(problem(e.path(), ProblemKind::IncompleteLayer, detail));
                }
            }
        }
        for e in read_dir_or_empty(&self.root.join("files").join("sha256"))? {
            let path = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(detail) = content_mismatch("sha256", &name, &path) {
                let mut p = problem(path.clone(), ProblemKind::BadFile, detail);
                p.repaired = repair && remove(&path, "removing a damaged file");
                rep.problems.push(p);
            }
        }
        if repair {
            for p in rep
                .problems
                .iter_mut()
                .filter(|p| matches!(p.kind, ProblemKind::BadBlob | ProblemKind::IncompleteLayer))
            {
                let hex = hex_of_content_path(&p.path);
                p.repaired = match self.remove_content(&hex) {
                    Ok(Some(_)) => true,
                    Ok(None) => false,
                    Err(e) => {
                        tracing::warn!(path = %p.path.display(), error = %e, "cannot remove damaged content");
                        false
                    }
                };
            }
        }

        // Records, and the layer sizes they give (for partials and caches).
        let mut layer_sizes: HashMap<String, u64> = HashMap::new();
        for e in read_dir_or_empty(&self.root.join("images"))? {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            rep.images += 1;
            let rec = match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<ImageRecord>(&b).map_err(|e| e.to_string()))
            {
                Ok(r) => r,
                Err(why) => {
                    let mut p = problem(
                        path.clone(),
                        ProblemKind::UnreadableRecord,
                        format!("image record does not parse: {why}"),
                    );
                    p.repaired = repair && remove(&path, "removing an unreadable record");
                    rep.problems.push(p);
                    continue;
                }
            };
            for l in &rec.layers {
                layer_sizes.insert(l.digest.hex().to_string(), l.size);
            }
            let missing = self.missing_content(&rec, &damaged);
            if !missing.is_empty() {
                let mut p = problem(
                    path.clone(),
                    ProblemKind::MissingContent,
                    format!(
                        "image record of {} names {}",
                        rec.reference,
                        missing.join(", ")
                    ),
                );
                p.repaired = repair && remove(&path, "removing a record naming missing content");
                rep.problems.push(p);
            }
        }

        for alg in ["sha256", "sha512"] {
            for e in read_dir_or_empty(&self.root.join("partial").join(alg))? {
                let path = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                let Some(&size) = layer_sizes.get(&name) else {
                    continue;
                };
                if len > size {
                    let mut p = problem(
                        path.clone(),
                        ProblemKind::BadPartial,
                        format!(
                            "partial download of {len} bytes, longer than its {size}-byte blob"
                        ),
                    );
                    p.repaired = repair
                        && self.with_layer_lock(&name, || {
                            remove(&path, "removing a damaged partial download")
                        });
                    rep.problems.push(p);
                }
            }
        }

        for e in read_dir_or_empty(&crate::chunk_caches_root(&self.root))? {
            let dir = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(detail) = chunk_cache_damage(&dir, layer_sizes.get(&name).copied()) {
                let mut p = problem(dir.clone(), ProblemKind::BadChunkCache, detail);
                p.repaired = repair && remove_chunk_cache(&dir);
                rep.problems.push(p);
            }
        }

        let used = self.used_path();
        if let Ok(bytes) = std::fs::read(&used) {
            if let Err(e) = serde_json::from_slice::<HashMap<String, u64>>(&bytes) {
                let mut p = problem(
                    used.clone(),
                    ProblemKind::UnreadableUsage,
                    format!("last-used file does not parse: {e}"),
                );
                p.repaired = repair && remove(&used, "removing the last-used file");
                rep.problems.push(p);
            }
        }
        for p in &rep.problems {
            tracing::debug!(path = %p.path.display(), kind = ?p.kind, detail = %p.detail, repaired = p.repaired, "store damage");
        }
        Ok(rep)
    }

    /// What `rec` names that is absent or damaged, as "blob D" / "layer D".
    fn missing_content(&self, rec: &ImageRecord, damaged: &HashSet<String>) -> Vec<String> {
        let mut out = Vec::new();
        let blob_ok = |d: &Digest| self.has_blob(d) && !damaged.contains(d.hex());
        let mut blobs = vec![&rec.manifest_digest, &rec.config_digest];
        blobs.extend(rec.index_digest.as_ref());
        for d in blobs {
            if !blob_ok(d) {
                out.push(format!("blob {d}, which is missing or damaged"));
            }
        }
        for l in &rec.layers {
            if !blob_ok(&l.digest) {
                out.push(format!(
                    "layer blob {}, which is missing or damaged",
                    l.digest
                ));
            }
            if self.layer_dir(&l.digest).is_none() || damaged.contains(l.digest.hex()) {
                out.push(format!(
                    "extracted layer {}, which is missing or damaged",
                    l.digest
                ));
            }
        }
        out
    }

    /// Run `f` holding layer `hex`'s lock, unless a fetch of it holds it.
    fn with_layer_lock(&self, hex: &str, f: impl FnOnce() -> bool) -> bool {
        match FileLock::try_exclusive(&self.lock_path(&format!("{hex}.lock"))) {
            Ok(Some(_lock)) => f(),
            _ => false,
        }
    }
}

fn problem(path: PathBuf, kind: ProblemKind, detail: String) -> Problem {
    Problem {
        path,
        kind,
        detail,
        repaired: false,
    }
}

fn remove(path: &Path, what: &str) -> bool {
    match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "{what}");
            false
        }
    }
}

/// `.../blobs/sha256/<hex>` or `.../layers/sha256/<hex>` → `<hex>`.
fn hex_of_content_path(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Why the file at `path` is not the content named `alg:name`, if it is not.
fn content_mismatch(alg: &str, name: &str, path: &Path) -> Option<String> {
    let expected: Digest = match format!("{alg}:{name}").parse() {
        Ok(d) => d,
        Err(_) => return Some(format!("{name:?} is not a {alg} digest")),
    };
    let mut f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => return Some(format!("cannot be read: {e}")),
    };
    let mut hasher = expected.hasher();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) => return Some(format!("cannot be read: {e}")),
        }
    }
    let actual = hasher.finish();
    (actual != expected).then(|| format!("content ({len} bytes) hashes to {actual}"))
}

/// Why the layer directory `base` is not the complete layer `digest`, if it is not.
fn layer_damage(digest: &str, base: &Path) -> Option<String> {
    let meta = base.join("layer.json");
    let rec: LayerRecord = match std::fs::read(&meta) {
        Ok(b) => match serde_json::from_slice(&b) {
            Ok(r) => r,
            Err(e) => return Some(format!("layer.json does not parse: {e}")),
        },
        Err(e) => return Some(format!("no readable layer.json: {e}")),
    };
    if rec.digest.to_string() != digest {
        return Some(format!("layer.json is the record of {}", rec.digest));
    }
    let fs = base.join("fs");
    if !fs.is_dir() {
        return Some("no fs/ tree".into());
    }
    let bytes = match regular_file_bytes(&fs) {
        Ok(b) => b,
        Err(e) => return Some(format!("fs/ cannot be walked: {e}")),
    };
    (bytes != rec.file_bytes).then(|| {
        format!(
            "its files hold {bytes} bytes, its record says {} were written",
            rec.file_bytes
        )
    })
}

/// Sizes of the regular files under `dir`, each inode once (hard links).
fn regular_file_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = HashSet::new();
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let m = e.path().symlink_metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else if m.is_file() && seen.insert(m.ino()) {
                total += m.len();
            }
        }
    }
    Ok(total)
}

/// Why a boot chunk cache does not fit its layer (of `layer_size` bytes,
/// when an image record says), if it does not.
fn chunk_cache_damage(dir: &Path, layer_size: Option<u64>) -> Option<String> {
    if let Ok(marks) = std::fs::read(dir.join("present")) {
        if let Some(i) = marks.iter().position(|&m| m > 1) {
            return Some(format!("presence mark {i} is {}, not 0 or 1", marks[i]));
        }
    }
    let blob_len = std::fs::metadata(dir.join("blob")).ok().map(|m| m.len());
    match (blob_len, layer_size) {
        (Some(len), Some(size)) if len > size => {
            Some(format!("its blob is {len} bytes, the layer {size}"))
        }
        _ => None,
    }
}

/// Remove a chunk cache unless a start uses it (holds its lock shared).
fn remove_chunk_cache(dir: &Path) -> bool {
    match FileLock::try_exclusive(&dir.join("lock")) {
        Ok(Some(_lock)) => match std::fs::remove_dir_all(dir) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "removing a damaged chunk cache");
                false
            }
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LayerRef;

    /// A store holding one image of one real (tiny) layer, extracted as a
    /// pull would: blob, tree, layer.json, image record.
    fn store_with_image() -> (tempfile::TempDir, Store, ImageRecord) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let blob = b"pretend this is a gzipped tar".to_vec();
        let layer = Digest::sha256_of(&blob);
        std::fs::write(store.blob_path(&layer), &blob).unwrap();
        let base = store.layer_base(&layer);
        std::fs::create_dir_all(base.join("fs/bin")).unwrap();
        std::fs::write(base.join("fs/bin/sh"), b"#!shell").unwrap();
        std::fs::hard_link(base.join("fs/bin/sh"), base.join("fs/bin/ash")).unwrap();
        let lrec = LayerRecord {
            digest: layer.clone(),
            diff_id: Digest::sha256_of(b"tar"),
            size: blob.len() as u64,
            entries: 3,
            file_bytes: 7,
        };
        std::fs::write(base.join("layer.json"), serde_json::to_vec(&lrec).unwrap()).unwrap();
        let manifest = b"{\"manifest\":1}";
        let config = b"{\"config\":1}";
        let (md, cd) = (Digest::sha256_of(manifest), Digest::sha256_of(config));
        store.put_blob_bytes(&md, manifest).unwrap();
        store.put_blob_bytes(&cd, config).unwrap();
        let rec = ImageRecord {
            reference: "registry.test/app:1".into(),
            manifest_digest: md,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            index_digest: None,
            config_digest: cd,
            layers: vec![LayerRef {
                digest: layer,
                diff_id: lrec.diff_id,
                size: lrec.size,
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            }],
            platform: "linux/amd64".into(),
            pulled_at: 1,
            attached: None,
        };
        store.save_image(&rec).unwrap();
        (dir, store, rec)
    }

    fn kinds(rep: &CheckReport) -> Vec<ProblemKind> {
        rep.problems.iter().map(|p| p.kind).collect()
    }

    /// Check finds `want`; repair removes it, and the store checks clean after.
    fn found_and_repaired(store: &Store, want: &[ProblemKind]) -> CheckReport {
        let rep = store.check(false).unwrap();
        assert_eq!(kinds(&rep), want, "{:#?}", rep.problems);
        assert_eq!(rep.unrepaired(), want.len());
        let fixed = store.check(true).unwrap();
        assert_eq!(kinds(&fixed), want);
        assert_eq!(fixed.unrepaired(), 0, "{:#?}", fixed.problems);
        let after = store.check(false).unwrap();
        assert!(after.problems.is_empty(), "{:#?}", after.problems);
        fixed
    }

    #[test]
    fn an_intact_store_checks_clean() {
        let (_d, store, _rec) = store_with_image();
        let rep = store.check(false).unwrap();
        assert!(rep.problems.is_empty(), "{:#?}", rep.problems);
        assert_eq!((rep.blobs, rep.layers, rep.images), (3, 1, 1));
    }

    #[test]
    fn a_corrupt_blob_is_found_and_removed_with_its_layer_and_record() {
        let (_d, store, rec) = store_with_image();
        let blob = store.blob_path(&rec.layers[0].digest);
        let mut bytes = std::fs::read(&blob).unwrap();
        bytes[0] ^= 1;
        std::fs::write(&blob, bytes).unwrap();
        found_and_repaired(&store, &[ProblemKind::BadBlob, ProblemKind::MissingContent]);
        assert!(!blob.exists());
        assert!(store.layer_dir(&rec.layers[0].digest).is_none());
        assert!(store.images().unwrap().is_empty());
    }

    #[test]
    fn a_truncated_config_blob_is_found() {
        let (_d, store, rec) = store_with_image();
        std::fs::write(store.blob_path(&rec.config_digest), b"").unwrap();
        let fixed =
            found_and_repaired(&store, &[ProblemKind::BadBlob, ProblemKind::MissingContent]);
        assert!(
            fixed.problems[0].detail.contains("(0 bytes)"),
            "{:?}",
            fixed.problems[0]
        );
    }

    #[test]
    fn a_layer_emptied_by_a_power_loss_is_found() {
        let (_d, store, rec) = store_with_image();
        let fs = store.layer_fs_path(&rec.layers[0].digest);
        // What ext4 could leave of an unsynced file after a power loss.
        std::fs::write(fs.join("bin/sh"), b"").unwrap();
        found_and_repaired(
            &store,
            &[ProblemKind::IncompleteLayer, ProblemKind::MissingContent],
        );
    }

    #[test]
    fn a_layer_without_its_record_or_tree_is_found() {
        let (_d, store, rec) = store_with_image();
        let base = store.layer_base(&rec.layers[0].digest);
        std::fs::remove_dir_all(base.join("fs")).unwrap();
        found_and_repaired(
            &store,
            &[ProblemKind::IncompleteLayer, ProblemKind::MissingContent],
        );
        let (_d, store, rec) = store_with_image();
        let base = store.layer_base(&rec.layers[0].digest);
        std::fs::write(base.join("layer.json"), b"{\"dig").unwrap();
        found_and_repaired(
            &store,
            &[ProblemKind::IncompleteLayer, ProblemKind::MissingContent],
        );
    }

    #[test]
    fn a_record_naming_a_missing_blob_is_removed() {
        let (_d, store, rec) = store_with_image();
        std::fs::remove_file(store.blob_path(&rec.manifest_digest)).unwrap();
        found_and_repaired(&store, &[ProblemKind::MissingContent]);
        assert!(store.images().unwrap().is_empty());
        // The layer it named is intact and stays for the next pull.
        assert!(store.layer_dir(&rec.layers[0].digest).is_some());
    }

    #[test]
    fn an_unreadable_record_is_found() {
        let (_d, store, _rec) = store_with_image();
        std::fs::write(store.root().join("images/broken.json"), b"{\"refer").unwrap();
        found_and_repaired(&store, &[ProblemKind::UnreadableRecord]);
    }

    #[test]
    fn a_partial_longer_than_its_blob_is_found() {
        let (_d, store, rec) = store_with_image();
        let d = &rec.layers[0].digest;
        std::fs::create_dir_all(store.partial_dir(d)).unwrap();
        std::fs::write(
            store.partial_path(d),
            vec![0u8; rec.layers[0].size as usize + 1],
        )
        .unwrap();
        found_and_repaired(&store, &[ProblemKind::BadPartial]);
        assert!(!store.partial_path(d).exists());
    }

    #[test]
    fn a_corrupt_file_and_chunk_cache_and_usage_file_are_found() {
        let (_d, store, rec) = store_with_image();
        let f = store
            .put_file(&Digest::sha256_of(b"file"), b"file")
            .unwrap();
        std::fs::write(&f, b"fil").unwrap();
        let cache = crate::chunk_cache_dir(store.root(), &rec.layers[0].digest);
        std::fs::create_dir_all(&cache).unwrap();
        std::fs::write(cache.join("present"), [0, 1, 7]).unwrap();
        std::fs::write(store.used_path(), b"{\"registry.test/app:1\": 1").unwrap();
        found_and_repaired(
            &store,
            &[
                ProblemKind::BadFile,
                ProblemKind::BadChunkCache,
                ProblemKind::UnreadableUsage,
            ],
        );
        assert!(!cache.exists());
    }
}
