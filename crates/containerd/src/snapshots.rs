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

mod mounts;
mod remote_layers;
#[cfg(test)]
mod tests;
mod usage;

use remote_layers::remote_top;

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

    pub fn dir(&self) -> &Path {
        &self.dir
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
        lazylayer_sys::durable::write_atomically(&path, &bytes)
            .map_err(io("writing snapshot metadata", &path))
    }

    pub fn exists(&self, key: &str) -> bool {
        self.lock().snapshots.contains_key(key)
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
