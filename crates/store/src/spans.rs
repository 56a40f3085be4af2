//! Compressed spans of layers read by range (through seek indexes), kept
//! while the layer is not local, so that every process starting the image
//! reads each span from the registry once: the first takes the span's lock
//! and fetches it, the others wait for the lock and find it here. Removed
//! when the layer lands (and by `prune`): the layer then serves every file.

use std::fs::File;
use std::path::PathBuf;

use lazylayer_oci::Digest;
use lazylayer_sys::{durable, range_lock, IoError};

use crate::{create_private_dir, Result, Store};

/// The lock of one fetch of a blob's bytes (a span at an offset, or a
/// whole small blob at 0), held until dropped: other processes (and other
/// opens in this one) wanting the same wait for it.
pub struct FetchLock {
    _file: File,
}

impl Store {
    fn spans_dir(&self, layer: &Digest) -> PathBuf {
        self.root.join("spans").join(layer.hex())
    }

    /// Wait for, then take, the lock of fetching blob `layer`'s bytes
    /// starting at `start` (one byte-range lock in a file per blob). Blocking.
    pub fn fetch_lock(&self, layer: &Digest, start: u64) -> Result<FetchLock> {
        let dir = self.root.join("locks");
        create_private_dir(&dir).map_err(IoError::on("creating the lock directory", &dir))?;
        let path = dir.join(format!("fetch-{}.lock", layer.hex()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(IoError::on("opening a span lock", &path))?;
        range_lock::lock_range(&file, start, 1)
            .map_err(IoError::on("taking a span lock", &path))?;
        Ok(FetchLock { _file: file })
    }

    /// Keep `bytes`, the compressed span of `layer` at `start`, for the
    /// other processes reading it. Not synced: a span lost to a crash is
    /// fetched again.
    pub fn keep_span(&self, layer: &Digest, start: u64, bytes: &[u8]) -> Result<()> {
        let dir = self.spans_dir(layer);
        create_private_dir(&dir).map_err(IoError::on("creating the span directory", &dir))?;
        let dest = dir.join(format!("{start}-{}", bytes.len()));
        durable::write_atomically_unsynced(&dest, bytes)
            .map_err(IoError::on("keeping a span", &dest))?;
        Ok(())
    }

    /// Blob bytes `start..end` of `layer` if a kept span starting at
    /// `start` covers them. Unverified, as a registry's answer is: the file
    /// cut from them is checked against its SHA-256.
    pub fn kept_span(&self, layer: &Digest, start: u64, end: u64) -> Option<Vec<u8>> {
        let dir = self.spans_dir(layer);
        let prefix = format!("{start}-");
        for e in std::fs::read_dir(&dir).ok()?.flatten() {
            let name = e.file_name();
            let Some(len) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|l| l.parse::<u64>().ok())
            else {
                continue;
            };
            if start.checked_add(len).is_some_and(|to| to >= end) {
                let mut b = std::fs::read(e.path()).ok()?;
                if b.len() as u64 != len {
                    continue;
                }
                b.truncate((end - start) as usize);
                return Some(b);
            }
        }
        None
    }

    /// The layer is local: its kept spans are of no more use.
    pub fn forget_spans(&self, layer: &Digest) {
        let _ = std::fs::remove_dir_all(self.spans_dir(layer));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_span_serves_any_range_it_covers_from_its_start_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let layer = Digest::sha256_of(b"layer");
        store.keep_span(&layer, 100, b"0123456789").unwrap();
        assert_eq!(store.kept_span(&layer, 100, 104).unwrap(), b"0123");
        assert_eq!(store.kept_span(&layer, 100, 110).unwrap(), b"0123456789");
        // Past its end, or another start: not kept.
        assert!(store.kept_span(&layer, 100, 111).is_none());
        assert!(store.kept_span(&layer, 101, 104).is_none());
        assert!(store
            .kept_span(&Digest::sha256_of(b"other"), 100, 104)
            .is_none());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(store.spans_dir(&layer))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        store.forget_spans(&layer);
        assert!(store.kept_span(&layer, 100, 104).is_none());
    }

    #[test]
    fn a_fetch_lock_is_one_opener_at_a_time_per_start() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("s")).unwrap();
        let layer = Digest::sha256_of(b"layer");
        let held = store.fetch_lock(&layer, 7).unwrap();
        // Another start of the same layer is free.
        drop(store.fetch_lock(&layer, 8).unwrap());
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = store.clone();
        let l2 = layer.clone();
        let t = std::thread::spawn(move || {
            let _l = s2.fetch_lock(&l2, 7).unwrap();
            tx.send(()).unwrap();
        });
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(held);
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap();
        t.join().unwrap();
    }
}
