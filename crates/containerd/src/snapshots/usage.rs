//! Disk use of a snapshot's own directory, counted as `du` does.

use std::collections::HashSet;
use std::path::Path;

use super::{Snapshots, Usage};
use crate::error::{Result, SnapshotError};

impl Snapshots {
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
    use std::collections::BTreeMap;
    use std::os::unix::fs::MetadataExt;
    use std::path::PathBuf;

    use crate::snapshots::{Kind, RemoteLayer, Snapshots, Usage};
    use crate::SnapshotError;

    /// A snapshot's own directory counted as `du` does: every inode once (a
    /// hardlink is not counted twice), allocated blocks; a remote snapshot
    /// has no directory and uses nothing; an unknown key is NotFound.
    #[test]
    fn usage_counts_inodes_once_and_remote_snapshots_as_empty() {
        let t = tempfile::tempdir().unwrap();
        let s = Snapshots::open(t.path()).unwrap();
        let m = s.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
        let fs = PathBuf::from(&m[0].source);
        let empty = s.usage("a").unwrap();
        assert_eq!(empty.inodes, 1, "the fs directory itself");

        std::fs::create_dir(fs.join("d")).unwrap();
        std::fs::write(fs.join("d/f"), vec![7u8; 100_000]).unwrap();
        std::fs::hard_link(fs.join("d/f"), fs.join("link")).unwrap();
        let u = s.usage("a").unwrap();
        assert_eq!(u.inodes, 3, "fs, d and f (its hardlink counted once)");
        let blocks: i64 = [fs.clone(), fs.join("d"), fs.join("d/f")]
            .iter()
            .map(|p| std::fs::metadata(p).unwrap().blocks() as i64 * 512)
            .sum();
        assert_eq!(u.size, blocks);
        assert!(u.size >= 100_000, "{u:?}");

        s.commit_remote(
            "r",
            "",
            BTreeMap::new(),
            RemoteLayer {
                image_ref: "reg/img:boot".into(),
                manifest_digest: "sha256:abcd".into(),
                layer_digest: "sha256:1234".into(),
                top: true,
            },
        )
        .unwrap();
        assert_eq!(s.usage("r").unwrap(), Usage::default());
        assert!(matches!(s.usage("nope"), Err(SnapshotError::NotFound(_))));
    }
}
