//! A snapshot's mounts, as containerd's overlayfs snapshotter gives them: a
//! bind of its directory, or an overlay on the lower directories of its
//! parent chain (a remote boot layer standing for the whole image).

use std::path::{Path, PathBuf};

use super::{ancestry, Db, Kind, Mount, Snapshots};
use crate::error::{Result, SnapshotError};

impl Snapshots {
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>> {
        let db = self.lock();
        self.mounts_in(&db, key)
    }

    pub(super) fn mounts_in(&self, db: &Db, key: &str) -> Result<Vec<Mount>> {
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
    pub(super) fn lowers(
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
}
