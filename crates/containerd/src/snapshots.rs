//! Snapshot metadata and mount rules, as containerd's overlayfs snapshotter
//! has them, plus *remote* snapshots: committed layers of an optimized image
//! that have no directory because the lazy file system serves them.
//!
//! Layout under the snapshotter's directory:
//! - `metadata.json`: every snapshot (rewritten atomically on each change, so a
//!   restart or a crash mid-write finds either the old or the new state);
//! - `snapshots/<id>/fs` and `snapshots/<id>/work`: a local snapshot's content
//!   and overlayfs work dir;
//! - `lazy/<manifest hex>/`: where an optimized image's FUSE root is mounted.
//!
//! A remote layer *below* an image's boot layer (a plain image sharing it
//! stands on it) is served from its extracted tree in the lazylayer store,
//! which has overlayfs's own layout and so is a ready lower directory.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::error::{io, Result, SnapshotError};

/// containerd's label naming the committed snapshot a Prepare wants to end
/// up as (the layer's chain ID when unpacking).
pub const LABEL_TARGET_REF: &str = "containerd.io/snapshot.ref";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

/// Seconds and nanoseconds since the epoch (protobuf's Timestamp shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Time {
    pub secs: i64,
    pub nanos: i32,
}

impl Time {
    pub fn now() -> Time {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Time {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }
}

/// Where a remote snapshot's content lives: one layer of an optimized image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteLayer {
    pub image_ref: String,
    pub manifest_digest: String,
    pub layer_digest: String,
    /// The image's top (boot) layer: the lazy mount of the whole image stands
    /// for it and everything below.
    pub top: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Snapshot {
    id: u64,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    created: Time,
    updated: Time,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remote: Option<RemoteLayer>,
    /// For an active or view snapshot on an optimized image that was local
    /// whole when it was made: the store's layer directories (top first)
    /// that stand in for the image's lazy mount. Kept, so its mounts never
    /// change under containerd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    image_lowers: Vec<PathBuf>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Db {
    next_id: u64,
    snapshots: BTreeMap<String, Snapshot>,
}

/// What containerd sees of a snapshot (Stat, List, Update).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Info {
    pub name: String,
    pub parent: Option<String>,
    pub kind: Kind,
    pub created: Time,
    pub updated: Time,
    pub labels: BTreeMap<String, String>,
}

/// One mount in containerd's form (`mount(8)` type, source, options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub fstype: String,
    pub source: String,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// The snapshot metadata and directories of one snapshotter.
pub struct Snapshots {
    dir: PathBuf,
    db: Mutex<Db>,
    /// Where remote layers below a boot layer are found extracted.
    layer_store: Option<lazylayer_store::Store>,
}

impl Snapshots {
    /// Open (or create) the snapshotter's state in `dir`.
    pub fn open(dir: &Path) -> Result<Snapshots> {
        for d in [dir.to_path_buf(), dir.join("snapshots"), dir.join("lazy")] {
            // Private: snapshots hold images' setuid binaries and devices.
            lazylayer_store::create_private_dir(&d)
                .map_err(io("creating the snapshotter directory", &d))?;
        }
        let path = dir.join("metadata.json");
        let db = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| SnapshotError::Metadata { path, source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Db {
                next_id: 1,
                ..Db::default()
            },
            Err(e) => return Err(io("reading snapshot metadata", &path)(e)),
        };
        Ok(Snapshots {
            dir: dir.to_path_buf(),
            db: Mutex::new(db),
            layer_store: None,
        })
    }

    /// Serve remote layers below a boot layer from `store`'s extracted layers.
    pub fn with_layer_store(mut self, store: lazylayer_store::Store) -> Snapshots {
        self.layer_store = Some(store);
        self
    }

    /// The extracted tree of remote layer `r`, if the store has all of it.
    fn remote_layer_dir(&self, r: &RemoteLayer) -> Option<PathBuf> {
        let digest = r.layer_digest.parse().ok()?;
        self.layer_store.as_ref()?.layer_dir(&digest)
    }

    /// Digests (layers and manifests) of every remote snapshot: what the
    /// lazy roots and the snapshots below boot layers read from the store;
    /// and the layers that snapshots made on images local whole stack
    /// (`image_lowers`: named by path, so they count even where no remote
    /// snapshot names that layer).
    pub fn remote_digests(&self) -> Vec<String> {
        let db = self.lock();
        let mut v: Vec<String> = db
            .snapshots
            .values()
            .filter_map(|s| s.remote.as_ref())
            .flat_map(|r| [r.layer_digest.clone(), r.manifest_digest.clone()])
            .collect();
        v.extend(
            db.snapshots
                .values()
                .flat_map(|s| s.image_lowers.iter())
                .filter_map(|p| lazylayer_store::layer_digest_of_fs_path(p)),
        );
        v.sort();
        v.dedup();
        v
    }

    /// Remote layers a snapshot on `parent` would need from the store (those
    /// below a boot layer, not under a lazy root) that it does not have yet.
    pub fn remote_layers_missing(&self, parent: &str) -> Vec<RemoteLayer> {
        let db = self.lock();
        let mut out = Vec::new();
        for (_, s) in ancestry(&db, (!parent.is_empty()).then_some(parent)) {
            let Some(s) = s else { break };
            match &s.remote {
                Some(r) if r.top => break,
                Some(r) if self.remote_layer_dir(r).is_none() => out.push(r.clone()),
                _ => {}
            }
        }
        out
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the lazy root of the image with this manifest digest is mounted.
    pub fn lazy_dir(&self, manifest_digest: &str) -> PathBuf {
        let hex = manifest_digest
            .split_once(':')
            .map_or(manifest_digest, |(_, h)| h);
        self.dir.join("lazy").join(hex)
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.dir.join("snapshots").join(id.to_string())
    }

    fn lock(&self) -> MutexGuard<'_, Db> {
        // A panic mid-change leaves the in-memory db as it was before the
        // save that did not happen; the file stays the source of truth.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self, db: &Db) -> Result<()> {
        let path = self.dir.join("metadata.json");
        let bytes = serde_json::to_vec_pretty(db).map_err(|source| SnapshotError::Metadata {
            path: path.clone(),
            source,
        })?;
        // Its directory synced too: containerd is told a snapshot exists
        // only once its record would survive a power loss.
        lazylayer_store::durable::write_atomically(&path, &bytes)
            .map_err(io("writing snapshot metadata", &path))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.lock().snapshots.contains_key(key)
    }

    /// The remote top layer a new snapshot on `parent` would stand on, if its
    /// parent chain is served by a lazy mount.
    pub fn remote_top_of(&self, parent: &str) -> Option<RemoteLayer> {
        if parent.is_empty() {
            return None;
        }
        let db = self.lock();
        remote_top(&db, parent)
    }

    /// The remote top layer under the active or view snapshot `key`, if any.
    pub fn remote_top_under(&self, key: &str) -> Option<RemoteLayer> {
        let db = self.lock();
        let s = db
            .snapshots
            .get(key)
            .filter(|s| s.image_lowers.is_empty())?;
        remote_top(&db, s.parent.as_deref()?)
    }

    /// Active and view snapshots standing on this image's lazy mount.
    pub fn lazy_users(&self, manifest_digest: &str) -> usize {
        let db = self.lock();
        db.snapshots
            .values()
            .filter(|s| s.kind != Kind::Committed && s.image_lowers.is_empty())
            .filter_map(|s| s.parent.as_deref())
            .filter_map(|p| remote_top(&db, p))
            .filter(|r| r.manifest_digest == manifest_digest)
            .count()
    }

    /// Manifests of every image some active or view snapshot stands on.
    pub fn lazy_images_in_use(&self) -> Vec<RemoteLayer> {
        let db = self.lock();
        let mut seen = HashSet::new();
        db.snapshots
            .values()
            .filter(|s| s.kind != Kind::Committed && s.image_lowers.is_empty())
            .filter_map(|s| s.parent.as_deref())
            .filter_map(|p| remote_top(&db, p))
            .filter(|r| seen.insert(r.manifest_digest.clone()))
            .collect()
    }

    /// Prepare (`Kind::Active`) or View (`Kind::View`) `key` on `parent`
    /// (empty: none). Returns its mounts.
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>> {
        self.create_on(kind, key, parent, labels, Vec::new())
    }

    /// [`Snapshots::create`] on a parent chain topped by a remote boot layer
    /// whose image is local whole: `image_lowers` (the store's layer
    /// directories, top first) stand in for the image's lazy mount.
    pub fn create_on_local_image(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        image_lowers: Vec<PathBuf>,
    ) -> Result<Vec<Mount>> {
        self.create_on(kind, key, parent, labels, image_lowers)
    }

    fn create_on(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        image_lowers: Vec<PathBuf>,
    ) -> Result<Vec<Mount>> {
        if key.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "snapshot key must not be empty".into(),
            ));
        }
        assert!(
            kind != Kind::Committed,
            "create makes active or view snapshots"
        );
        let mut db = self.lock();
        if db.snapshots.contains_key(key) {
            return Err(SnapshotError::AlreadyExists(key.to_string()));
        }
        let parent = check_parent(&db, parent)?;
        let id = db.next_id;
        let sdir = self.snapshot_dir(id);
        for d in [sdir.join("fs"), sdir.join("work")] {
            std::fs::create_dir_all(&d).map_err(io("creating a snapshot directory", &d))?;
        }
        let now = Time::now();
        db.next_id += 1;
        db.snapshots.insert(
            key.to_string(),
            Snapshot {
                id,
                kind,
                parent,
                labels,
                created: now,
                updated: now,
                remote: None,
                image_lowers,
            },
        );
        let mounts = self.mounts_in(&db, key);
        // Undo in memory when the save (or the mount rule) fails, so memory
        // and disk agree; the directory is left to Cleanup.
        match mounts.and_then(|m| self.save(&db).map(|()| m)) {
            Ok(m) => Ok(m),
            Err(e) => {
                db.snapshots.remove(key);
                Err(e)
            }
        }
    }

    /// Record `name` as a committed remote snapshot on `parent`: no directory,
    /// its content is `remote`'s layer.
    pub fn commit_remote(
        &self,
        name: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        remote: RemoteLayer,
    ) -> Result<()> {
        let mut db = self.lock();
        if db.snapshots.contains_key(name) {
            return Err(SnapshotError::AlreadyExists(name.to_string()));
        }
        let parent = check_parent(&db, parent)?;
        let id = db.next_id;
        db.next_id += 1;
        let now = Time::now();
        db.snapshots.insert(
            name.to_string(),
            Snapshot {
                id,
                kind: Kind::Committed,
                parent,
                labels,
                created: now,
                updated: now,
                remote: Some(remote),
                image_lowers: Vec::new(),
            },
        );
        if let Err(e) = self.save(&db) {
            db.snapshots.remove(name);
            return Err(e);
        }
        Ok(())
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let db = self.lock();
        self.mounts_in(&db, key)
    }

    fn mounts_in(&self, db: &Db, key: &str) -> Result<Vec<Mount>> {
        let s = db
            .snapshots
            .get(key)
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if s.kind == Kind::Committed {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: "a committed snapshot has no mounts; view or prepare on it".into(),
            });
        }
        let lowers = self.lowers(db, s.parent.as_deref(), &s.image_lowers)?;
        let sdir = self.snapshot_dir(s.id);
        let path = |p: &Path| p.display().to_string();
        let bind = |src: &Path, ro: bool| Mount {
            fstype: "bind".into(),
            source: path(src),
            options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
        };
        let lowerdir = || {
            format!(
                "lowerdir={}",
                lowers.iter().map(|p| path(p)).collect::<Vec<_>>().join(":")
            )
        };
        Ok(vec![match (s.kind, lowers.as_slice()) {
            (Kind::Active, []) => bind(&sdir.join("fs"), false),
            (Kind::View, []) => bind(&sdir.join("fs"), true),
            // overlayfs needs two lowers without an upper: one is a ro bind.
            (Kind::View, [only]) => bind(only, true),
            (Kind::View, _) => Mount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options: vec![lowerdir()],
            },
            (_, _) => Mount {
                fstype: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    format!("workdir={}", path(&sdir.join("work"))),
                    format!("upperdir={}", path(&sdir.join("fs"))),
                    lowerdir(),
                ],
            },
        }])
    }

    /// Lower directories for a snapshot on `parent`, top first; a remote
    /// boot layer stands for the whole image: its lazy mount, or
    /// `image_lowers` when the snapshot was made on the image local whole.
    fn lowers(
        &self,
        db: &Db,
        parent: Option<&str>,
        image_lowers: &[PathBuf],
    ) -> Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for (name, p) in ancestry(db, parent) {
            let p = p.ok_or_else(|| SnapshotError::NotFound(name.to_string()))?;
            match &p.remote {
                // The whole merged image: nothing below it counts.
                Some(r) if r.top => {
                    if image_lowers.is_empty() {
                        out.push(self.lazy_dir(&r.manifest_digest));
                    } else {
                        out.extend_from_slice(image_lowers);
                    }
                    break;
                }
                Some(r) => match self.remote_layer_dir(r) {
                    Some(dir) => out.push(dir),
                    None => {
                        return Err(SnapshotError::FailedPrecondition {
                            key: name.to_string(),
                            reason: format!(
                                "remote layer {} of {} is below the image's boot layer \
                                 and not in the store yet",
                                r.layer_digest, r.image_ref
                            ),
                        })
                    }
                },
                None => out.push(self.snapshot_dir(p.id).join("fs")),
            }
        }
        Ok(out)
    }

    /// Turn active snapshot `key` into committed snapshot `name` (same
    /// directory); `labels` replace its labels.
    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<()> {
        if name.is_empty() {
            return Err(SnapshotError::InvalidArgument(
                "commit name must not be empty".into(),
            ));
        }
        let mut db = self.lock();
        if db.snapshots.contains_key(name) {
            return Err(SnapshotError::AlreadyExists(name.to_string()));
        }
        let s = db
            .snapshots
            .get(key)
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        if s.kind != Kind::Active {
            return Err(SnapshotError::FailedPrecondition {
                key: key.to_string(),
                reason: format!(
                    "only an active snapshot can be committed, not a {:?} one",
                    s.kind
                ),
            });
        }
        let old = db.snapshots.remove(key).expect("checked above");
        let now = Time::now();
        let committed = Snapshot {
            kind: Kind::Committed,
            labels,
            created: now,
            updated: now,
            ..old.clone()
        };
        db.snapshots.insert(name.to_string(), committed);
        if let Err(e) = self.save(&db) {
            db.snapshots.remove(name);
            db.snapshots.insert(key.to_string(), old);
            return Err(e);
        }
        Ok(())
    }

    /// Remove `key` (refused while another snapshot has it as parent).
    /// Returns the lazy image it stood on, so the caller can drop the mount
    /// once nothing uses it.
    pub fn remove(&self, key: &str) -> Result<Option<RemoteLayer>> {
        let (removed, under) = {
            let mut db = self.lock();
            let s = db
                .snapshots
                .get(key)
                .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            if let Some((child, _)) = db
                .snapshots
                .iter()
                .find(|(_, c)| c.parent.as_deref() == Some(key))
            {
                return Err(SnapshotError::FailedPrecondition {
                    key: key.to_string(),
                    reason: format!("snapshot {child:?} has it as parent"),
                });
            }
            let under = match (&s.kind, s.parent.as_deref()) {
                (Kind::Committed, _) | (_, None) => None,
                (_, Some(p)) => remote_top(&db, p),
            };
            let removed = db.snapshots.remove(key).expect("checked above");
            if let Err(e) = self.save(&db) {
                db.snapshots.insert(key.to_string(), removed);
                return Err(e);
            }
            (removed, under)
        };
        // Outside the lock: deleting a big tree should not stall other calls.
        // A failure here only leaves garbage that Cleanup retries.
        if removed.remote.is_none() {
            let d = self.snapshot_dir(removed.id);
            if let Err(e) = std::fs::remove_dir_all(&d) {
                tracing::warn!(dir = %d.display(), error = %e, "removing a snapshot directory");
            }
        }
        Ok(under)
    }

    pub fn stat(&self, key: &str) -> Result<Info> {
        let db = self.lock();
        let s = db
            .snapshots
            .get(key)
            .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
        Ok(info(key, s))
    }

    /// Update labels (the only mutable field). `paths` is the field mask:
    /// empty or `labels` replaces them all, `labels.KEY` sets or deletes one.
    pub fn update(&self, new: &Info, paths: &[String]) -> Result<Info> {
        let mut db = self.lock();
        let s = db
            .snapshots
            .get_mut(&new.name)
            .ok_or_else(|| SnapshotError::NotFound(new.name.clone()))?;
        let before = s.clone();
        if paths.is_empty() {
            s.labels = new.labels.clone();
        }
        for p in paths {
            if p == "labels" {
                s.labels = new.labels.clone();
            } else if let Some(k) = p.strip_prefix("labels.") {
                match new.labels.get(k) {
                    Some(v) => s.labels.insert(k.to_string(), v.clone()),
                    None => s.labels.remove(k),
                };
            } else {
                *s = before;
                return Err(SnapshotError::InvalidArgument(format!(
                    "cannot update field {p:?} of snapshot {:?}",
                    new.name
                )));
            }
        }
        s.updated = Time::now();
        let out = info(&new.name, s);
        if let Err(e) = self.save(&db) {
            db.snapshots.insert(new.name.clone(), before);
            return Err(e);
        }
        Ok(out)
    }

    pub fn list(&self) -> Vec<Info> {
        let db = self.lock();
        db.snapshots.iter().map(|(k, s)| info(k, s)).collect()
    }

    /// Disk use of a snapshot's own directory (0 for a remote one).
    pub fn usage(&self, key: &str) -> Result<Usage> {
        let (id, remote) = {
            let db = self.lock();
            let s = db
                .snapshots
                .get(key)
                .ok_or_else(|| SnapshotError::NotFound(key.to_string()))?;
            (s.id, s.remote.is_some())
        };
        if remote {
            return Ok(Usage::default());
        }
        let mut u = Usage::default();
        let mut seen = HashSet::new();
        du(&self.snapshot_dir(id).join("fs"), &mut u, &mut seen);
        Ok(u)
    }

    /// Delete snapshot directories no snapshot owns (left by a crash or a
    /// failed removal). Returns how many went.
    pub fn cleanup(&self) -> Result<usize> {
        let root = self.dir.join("snapshots");
        let owned: HashSet<String> = {
            let db = self.lock();
            db.snapshots.values().map(|s| s.id.to_string()).collect()
        };
        let rd = std::fs::read_dir(&root).map_err(io("listing snapshot directories", &root))?;
        let mut n = 0;
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !owned.contains(&name) {
                // Re-check under the lock: a Prepare may have taken this id since.
                if self
                    .lock()
                    .snapshots
                    .values()
                    .any(|s| s.id.to_string() == name)
                {
                    continue;
                }
                let p = e.path();
                std::fs::remove_dir_all(&p)
                    .map_err(io("removing an unused snapshot directory", &p))?;
                n += 1;
            }
        }
        Ok(n)
    }
}

fn info(name: &str, s: &Snapshot) -> Info {
    Info {
        name: name.to_string(),
        parent: s.parent.clone(),
        kind: s.kind,
        created: s.created,
        updated: s.updated,
        labels: s.labels.clone(),
    }
}

fn check_parent(db: &Db, parent: &str) -> Result<Option<String>> {
    if parent.is_empty() {
        return Ok(None);
    }
    match db.snapshots.get(parent) {
        None => Err(SnapshotError::NotFound(parent.to_string())),
        Some(p) if p.kind != Kind::Committed => Err(SnapshotError::FailedPrecondition {
            key: parent.to_string(),
            reason: "a parent must be a committed snapshot".into(),
        }),
        Some(_) => Ok(Some(parent.to_string())),
    }
}

/// The first remote snapshot in `name`'s chain when it is an image's top
/// layer, i.e. when the chain is served by that image's lazy mount.
fn remote_top(db: &Db, name: &str) -> Option<RemoteLayer> {
    for (_, s) in ancestry(db, Some(name)) {
        if let Some(r) = &s?.remote {
            return r.top.then(|| r.clone());
        }
    }
    None
}

/// `name` and its ancestors, nearest first: each name with its snapshot, or
/// None for a name the metadata lacks (which ends the chain).
fn ancestry<'a>(
    db: &'a Db,
    name: Option<&'a str>,
) -> impl Iterator<Item = (&'a str, Option<&'a Snapshot>)> + 'a {
    let mut next = name;
    std::iter::from_fn(move || {
        let n = next.take()?;
        let s = db.snapshots.get(n);
        next = s.and_then(|s| s.parent.as_deref());
        Some((n, s))
    })
}

fn du(p: &Path, u: &mut Usage, seen: &mut HashSet<(u64, u64)>) {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return;
    };
    // Hardlinks count once, as du does.
    if seen.insert((m.dev(), m.ino())) {
        u.inodes += 1;
        u.size += (m.blocks() * 512) as i64;
    }
    if m.is_dir() {
        if let Ok(rd) = std::fs::read_dir(p) {
            for e in rd.flatten() {
                du(&e.path(), u, seen);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn remote(layer: &str, top: bool) -> RemoteLayer {
        RemoteLayer {
            image_ref: "reg/img:boot".into(),
            manifest_digest: "sha256:abcd".into(),
            layer_digest: layer.into(),
            top,
        }
    }

    fn lowerdir(m: &Mount) -> String {
        m.options
            .iter()
            .find_map(|o| o.strip_prefix("lowerdir="))
            .unwrap()
            .to_string()
    }

    #[test]
    fn prepare_commit_chain_gives_overlay_and_binds() {
        let t = tempfile::tempdir().unwrap();
        let s = Snapshots::open(t.path()).unwrap();
        let m = s.create(Kind::Active, "a1", "", BTreeMap::new()).unwrap();
        assert_eq!(m[0].fstype, "bind");
        assert_eq!(m[0].options, vec!["rw", "rbind"]);
        let l1 = PathBuf::from(&m[0].source);
        assert!(l1.is_dir());
        s.commit("l1", "a1", labels(&[("x", "y")])).unwrap();
        assert!(matches!(s.stat("a1"), Err(SnapshotError::NotFound(_))));
        let i = s.stat("l1").unwrap();
        assert_eq!(i.kind, Kind::Committed);
        assert_eq!(i.labels, labels(&[("x", "y")]));

        // A view on one parent: a read-only bind of it.
        let v = s.create(Kind::View, "v", "l1", BTreeMap::new()).unwrap();
        assert_eq!(v[0].fstype, "bind");
        assert_eq!(v[0].source, l1.display().to_string());
        assert_eq!(v[0].options, vec!["ro", "rbind"]);

        s.create(Kind::Active, "a2", "l1", BTreeMap::new()).unwrap();
        s.commit("l2", "a2", BTreeMap::new()).unwrap();
        let c = s.create(Kind::Active, "c", "l2", BTreeMap::new()).unwrap();
        assert_eq!(c[0].fstype, "overlay");
        let l2 = s.snapshot_dir(s.lock().snapshots["l2"].id).join("fs");
        assert_eq!(
            lowerdir(&c[0]),
            format!("{}:{}", l2.display(), l1.display())
        );
        assert!(c[0].options.iter().any(|o| o.starts_with("upperdir=")));
        assert!(c[0].options.iter().any(|o| o.starts_with("workdir=")));
        assert_eq!(s.mounts("c").unwrap(), c);

        // A view on two parents: an overlay without upper.
        let v2 = s.create(Kind::View, "v2", "l2", BTreeMap::new()).unwrap();
        assert_eq!(v2[0].fstype, "overlay");
        assert_eq!(v2[0].options, vec![format!("lowerdir={}", lowerdir(&c[0]))]);
    }

    #[test]
    fn errors_have_the_right_kinds() {
        let t = tempfile::tempdir().unwrap();
        let s = Snapshots::open(t.path()).unwrap();
        s.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
        assert!(matches!(
            s.create(Kind::Active, "a", "", BTreeMap::new()),
            Err(SnapshotError::AlreadyExists(_))
        ));
        assert!(matches!(
            s.create(Kind::Active, "b", "nope", BTreeMap::new()),
            Err(SnapshotError::NotFound(_))
        ));
        // An active snapshot cannot be a parent.
        assert!(matches!(
            s.create(Kind::Active, "b", "a", BTreeMap::new()),
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        assert!(matches!(
            s.create(Kind::Active, "", "", BTreeMap::new()),
            Err(SnapshotError::InvalidArgument(_))
        ));
        s.create(Kind::View, "v", "", BTreeMap::new()).unwrap();
        assert!(matches!(
            s.commit("c", "v", BTreeMap::new()),
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        s.commit("c", "a", BTreeMap::new()).unwrap();
        assert!(matches!(
            s.mounts("c"),
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        s.create(Kind::Active, "child", "c", BTreeMap::new())
            .unwrap();
        assert!(matches!(
            s.commit("c", "child", BTreeMap::new()),
            Err(SnapshotError::AlreadyExists(_))
        ));
        // Remove refuses a parent, then works once the child is gone.
        assert!(matches!(
            s.remove("c"),
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        s.remove("child").unwrap();
        s.remove("c").unwrap();
        assert!(matches!(s.remove("c"), Err(SnapshotError::NotFound(_))));
        assert!(matches!(
            s.update(
                &Info {
                    name: "v".into(),
                    parent: None,
                    kind: Kind::View,
                    created: Time::now(),
                    updated: Time::now(),
                    labels: BTreeMap::new()
                },
                &["parent".into()]
            ),
            Err(SnapshotError::InvalidArgument(_))
        ));
    }

    #[test]
    fn metadata_survives_reopen_and_remove_deletes_dirs() {
        let t = tempfile::tempdir().unwrap();
        let fs_dir;
        {
            let s = Snapshots::open(t.path()).unwrap();
            let m = s
                .create(Kind::Active, "a", "", labels(&[("k", "v")]))
                .unwrap();
            fs_dir = PathBuf::from(&m[0].source);
            std::fs::write(fs_dir.join("file"), b"hello").unwrap();
            s.commit("l", "a", labels(&[("k", "v")])).unwrap();
            s.commit_remote(
                "r",
                "l",
                labels(&[(LABEL_TARGET_REF, "r")]),
                remote("sha256:top", true),
            )
            .unwrap();
        }
        let s = Snapshots::open(t.path()).unwrap();
        let mut names: Vec<_> = s.list().into_iter().map(|i| i.name).collect();
        names.sort();
        assert_eq!(names, vec!["l", "r"]);
        assert_eq!(s.stat("r").unwrap().parent.as_deref(), Some("l"));
        assert!(s.usage("l").unwrap().size > 0);
        assert_eq!(s.usage("r").unwrap(), Usage::default());
        // New ids never reuse old ones.
        s.create(Kind::Active, "x", "", BTreeMap::new()).unwrap();
        assert_eq!(s.lock().snapshots["x"].id, 3);
        s.remove("r").unwrap();
        s.remove("l").unwrap();
        assert!(!fs_dir.exists());
    }

    #[test]
    fn remote_chain_mounts_the_lazy_root() {
        let t = tempfile::tempdir().unwrap();
        let s = Snapshots::open(t.path()).unwrap();
        s.commit_remote("c1", "", BTreeMap::new(), remote("sha256:l1", false))
            .unwrap();
        s.commit_remote("c2", "c1", BTreeMap::new(), remote("sha256:boot", true))
            .unwrap();
        assert_eq!(s.remote_top_of("c2").unwrap().layer_digest, "sha256:boot");
        assert_eq!(s.remote_top_of("c1"), None);
        assert_eq!(s.lazy_users("sha256:abcd"), 0);

        let m = s
            .create(Kind::Active, "ctr", "c2", BTreeMap::new())
            .unwrap();
        assert_eq!(m[0].fstype, "overlay");
        let lazy = s.lazy_dir("sha256:abcd");
        assert_eq!(lazy, t.path().join("lazy/abcd"));
        assert_eq!(lowerdir(&m[0]), lazy.display().to_string());
        let v = s.create(Kind::View, "view", "c2", BTreeMap::new()).unwrap();
        assert_eq!(v[0].fstype, "bind");
        assert_eq!(v[0].source, lazy.display().to_string());
        assert_eq!(s.lazy_users("sha256:abcd"), 2);
        assert_eq!(s.lazy_images_in_use().len(), 1);
        assert_eq!(
            s.remote_top_under("ctr").unwrap().layer_digest,
            "sha256:boot"
        );

        // A snapshot on a lower remote layer has nothing to mount.
        assert!(matches!(
            s.create(Kind::Active, "bad", "c1", BTreeMap::new()),
            Err(SnapshotError::FailedPrecondition { .. })
        ));
        assert!(!s.exists("bad"));

        // Removing reports the image the snapshot used, for unmounting.
        assert_eq!(
            s.remove("ctr").unwrap().unwrap().manifest_digest,
            "sha256:abcd"
        );
        s.remove("view").unwrap();
        assert_eq!(s.lazy_users("sha256:abcd"), 0);
        assert_eq!(s.remove("c2").unwrap(), None);
        s.remove("c1").unwrap();
    }

    #[test]
    fn a_snapshot_made_on_a_local_image_keeps_its_store_lowers() {
        let t = tempfile::tempdir().unwrap();
        let s = Snapshots::open(t.path()).unwrap();
        s.commit_remote("c1", "", BTreeMap::new(), remote("sha256:l1", false))
            .unwrap();
        s.commit_remote("c2", "c1", BTreeMap::new(), remote("sha256:boot", true))
            .unwrap();
        let lazy_ctr = s
            .create(Kind::Active, "lazy", "c2", BTreeMap::new())
            .unwrap();
        let store_dirs = vec![PathBuf::from("/store/mask"), PathBuf::from("/store/boot")];
        let m = s
            .create_on_local_image(Kind::Active, "native", "c2", BTreeMap::new(), store_dirs)
            .unwrap();
        assert_eq!(lowerdir(&m[0]), "/store/mask:/store/boot");
        // The lazy one keeps its mount; only it needs the lazy root.
        assert_eq!(
            lowerdir(&lazy_ctr[0]),
            s.lazy_dir("sha256:abcd").display().to_string()
        );
        assert_eq!(s.lazy_users("sha256:abcd"), 1);
        assert_eq!(s.remote_top_under("native"), None);
        // The same mounts after a restart (metadata reread).
        drop(s);
        let s = Snapshots::open(t.path()).unwrap();
        assert_eq!(s.mounts("native").unwrap(), m);
        s.remove("lazy").unwrap();
        assert_eq!(s.lazy_users("sha256:abcd"), 0);
        assert_eq!(s.lazy_images_in_use(), Vec::new());
    }

    #[test]
    fn update_labels_by_mask_and_cleanup_orphans() {
        let t = tempfile::tempdir().unwrap();
        let s = Snapshots::open(t.path()).unwrap();
        s.create(Kind::Active, "a", "", labels(&[("a", "1"), ("b", "2")]))
            .unwrap();
        let mut i = s.stat("a").unwrap();
        i.labels = labels(&[("b", "3"), ("c", "4")]);
        let out = s
            .update(&i, &["labels.b".into(), "labels.a".into()])
            .unwrap();
        assert_eq!(out.labels, labels(&[("b", "3")]));
        let out = s.update(&i, &[]).unwrap();
        assert_eq!(out.labels, labels(&[("b", "3"), ("c", "4")]));
        assert_eq!(s.stat("a").unwrap().labels, out.labels);

        std::fs::create_dir_all(t.path().join("snapshots/999/fs")).unwrap();
        assert_eq!(s.cleanup().unwrap(), 1);
        assert!(!t.path().join("snapshots/999").exists());
        assert!(t.path().join("snapshots/1/fs").exists());
    }
}
