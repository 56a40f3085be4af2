//! Pins: content a live process uses although no image record names it yet
//! (a lazily started container whose layers are still arriving, the
//! snapshotter's and the Podman store's lazy roots). `prune` keeps what the
//! pin of a living process names; a pin left by a dead process counts for
//! nothing and is removed.

use std::collections::HashSet;
use std::path::PathBuf;

use lazylayer_oci::Digest;
use serde::{Deserialize, Serialize};

use crate::{io_err, Result, Store};

#[derive(Serialize, Deserialize)]
struct PinFile {
    pid: u32,
    digests: Vec<String>,
}

/// A pin that is taken off when dropped.
pub struct Pin {
    store: Store,
    name: String,
}

impl Drop for Pin {
    fn drop(&mut self) {
        self.store.unpin(&self.name);
    }
}

impl Store {
    fn pin_path(&self, name: &str) -> PathBuf {
        self.root.join("pins").join(format!("{name}.json"))
    }

    /// Record that this process uses `digests` (blobs and extracted layers),
    /// replacing an earlier pin of the same `name` (letters, digits, `-`, `_`, `.`).
    pub fn pin(&self, name: &str, digests: &[Digest]) -> Result<()> {
        let bad = name.is_empty()
            || name.starts_with('.')
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        assert!(!bad, "pin name {name:?}");
        let dir = self.root.join("pins");
        crate::create_private_dir(&dir).map_err(io_err("creating the pins directory", &dir))?;
        let file = PinFile {
            pid: std::process::id(),
            digests: digests.iter().map(|d| d.to_string()).collect(),
        };
        let path = self.pin_path(name);
        let bytes = serde_json::to_vec(&file).expect("serialisable");
        // The temp file beside the pin, not in tmp/: `prune` empties tmp/
        // and pins are written without the store lock.
        lazylayer_sys::durable::write_atomically(&path, &bytes)
            .map_err(io_err("storing a pin", &path))
    }

    /// [`Store::pin`], taken off again when the returned value is dropped.
    pub fn pin_guard(&self, name: &str, digests: &[Digest]) -> Result<Pin> {
        self.pin(name, digests)?;
        Ok(Pin {
            store: self.clone(),
            name: name.to_string(),
        })
    }

    pub fn unpin(&self, name: &str) {
        let _ = std::fs::remove_file(self.pin_path(name));
    }

    /// Hex digests named by the pins of living processes; dead processes'
    /// pins are deleted on the way.
    pub(crate) fn pinned(&self) -> HashSet<String> {
        let mut keep = HashSet::new();
        let Ok(rd) = std::fs::read_dir(self.root.join("pins")) else {
            return keep;
        };
        for e in rd.flatten() {
            // A pin being written (its temp file): not one yet.
            if e.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let Ok(bytes) = std::fs::read(e.path()) else {
                continue;
            };
            match serde_json::from_slice::<PinFile>(&bytes) {
                Ok(p) if PathBuf::from(format!("/proc/{}", p.pid)).exists() => {
                    keep.extend(
                        p.digests
                            .iter()
                            .filter_map(|d| d.split_once(':').map(|(_, h)| h.to_string())),
                    );
                }
                // A half-written pin cannot exist (temp + rename): this one's owner is gone.
                _ => {
                    tracing::debug!(pin = %e.path().display(), "removing a stale pin");
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_of_living_processes_count_dead_ones_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let a = Digest::sha256_of(b"a");
        let b = Digest::sha256_of(b"b");
        let guard = store.pin_guard("run-1", std::slice::from_ref(&a)).unwrap();
        // A pin whose process is gone (no pid 0 in /proc) counts for nothing.
        let stale = PinFile {
            pid: 0,
            digests: vec![b.to_string()],
        };
        let stale_path = store.pin_path("run-2");
        std::fs::write(&stale_path, serde_json::to_vec(&stale).unwrap()).unwrap();
        let kept = store.pinned();
        assert!(kept.contains(a.hex()));
        assert!(!kept.contains(b.hex()));
        assert!(!stale_path.exists(), "the stale pin is removed");
        // Re-pinning replaces; dropping the guard unpins.
        store.pin("run-1", std::slice::from_ref(&b)).unwrap();
        assert!(store.pinned().contains(b.hex()));
        drop(guard);
        assert!(store.pinned().is_empty());
    }
}
