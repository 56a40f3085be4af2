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
