//! Remote snapshots: committed layers of an optimized image with no
//! directory, served by the image's lazy mount (its top, boot layer) or by
//! the store's extracted layers (those below it).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use super::{ancestry, check_parent, Db, Kind, RemoteLayer, Snapshot, Snapshots, Time};
use crate::error::{Result, SnapshotError};

impl Snapshots {
    /// The extracted tree of remote layer `r`, if the store has all of it.
    pub(super) fn remote_layer_dir(&self, r: &RemoteLayer) -> Option<PathBuf> {
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

    /// Where the lazy root of the image with this manifest digest is mounted.
    pub fn lazy_dir(&self, manifest_digest: &str) -> PathBuf {
        let hex = manifest_digest
            .split_once(':')
            .map_or(manifest_digest, |(_, h)| h);
        self.dir.join("lazy").join(hex)
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
}

/// The first remote snapshot in `name`'s chain when it is an image's top
/// layer, i.e. when the chain is served by that image's lazy mount.
pub(super) fn remote_top(db: &Db, name: &str) -> Option<RemoteLayer> {
    for (_, s) in ancestry(db, Some(name)) {
        if let Some(r) = &s?.remote {
            return r.top.then(|| r.clone());
        }
    }
    None
}
