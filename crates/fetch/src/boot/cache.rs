//! The on-disk chunk cache of a boot layer, `<store>/chunks/<hex>`: the
//! sparse compressed blob, the sparse content tar and one mark a chunk,
//! locked shared while in use, and reaped once the layer is stored whole.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use lazylayer_index::chunks::BootContent;
use lazylayer_layer::chunked::decompress_piece;
use lazylayer_oci::Digest;
use lazylayer_store::Store;
use lazylayer_sys::IoError;
use sha2::{Digest as _, Sha256};

use super::state::ChunkState;
use crate::FetchError;

/// Remove boot chunk caches no process uses (`<store root>/chunks/<hex>`):
/// with `all`, every one (prune); else those whose boot layer is stored whole
/// (they will not be read again).
pub fn reap_chunk_caches(store_root: &Path, all: bool) -> usize {
    let Ok(rd) = std::fs::read_dir(lazylayer_store::chunk_caches_root(store_root)) else {
        return 0;
    };
    let mut removed = 0;
    for e in rd.flatten() {
        let dir = e.path();
        // Named by the boot layer's hex digest (`chunk_cache_dir`).
        let stored = format!("sha256:{}", e.file_name().to_string_lossy())
            .parse::<Digest>()
            .is_ok_and(|d| lazylayer_store::layer_complete(store_root, &d));
        if !all && !stored {
            continue;
        }
        // In use: a start holds the lock shared.
        let Ok(lock) = File::options()
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("lock"))
        else {
            continue;
        };
        if rustix::fs::flock(&lock, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue;
        }
        match std::fs::remove_dir_all(&dir) {
            Ok(()) => {
                removed += 1;
                tracing::debug!(dir = %dir.display(), "removed a boot chunk cache");
            }
            Err(err) => {
                tracing::warn!(dir = %dir.display(), error = %err, "removing a boot chunk cache")
            }
        }
    }
    removed
}

/// The private cache directory of boot layer `digest`, `<store>/chunks/<hex>`,
/// locked shared for this start (a prune removing it meanwhile is noticed:
/// the lock file is then gone, and the directory is made anew).
pub(super) fn cache_dir(
    store: &Store,
    digest: &Digest,
) -> Result<(PathBuf, lazylayer_store::FileLock), FetchError> {
    use std::os::unix::fs::MetadataExt;
    let base = lazylayer_store::chunk_caches_root(store.root());
    let dir = lazylayer_store::chunk_cache_dir(store.root(), digest);
    for _ in 0..3 {
        lazylayer_store::create_private_dir(&base)
            .and_then(|_| lazylayer_store::create_private_dir(&dir))
            .map_err(io("creating the chunk cache directory", &dir))?;
        let lock_path = dir.join("lock");
        let lock = lazylayer_store::FileLock::shared(&lock_path)?;
        // Still the lock file at that path: not removed by a prune while we
        // waited for it.
        if std::fs::metadata(&lock_path).is_ok_and(|m| m.nlink() > 0) {
            return Ok((dir, lock));
        }
    }
    Err(FetchError::Io(IoError {
        what: "locking the chunk cache (removed under us three times)".into(),
        path: dir,
        source: io::Error::other("cache directory keeps disappearing"),
    }))
}

/// The index region kept in `blob` by an earlier start, if its bytes are
/// the ones the manifest names.
pub(super) fn cached_region(blob: &File, len: u64, digest: &Digest) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len as usize];
    blob.read_exact_at(&mut buf, 0).ok()?;
    (Digest::sha256_of(&buf) == *digest).then_some(buf)
}

/// The chunk states at open: chunks marked present whose kept bytes still
/// match their digest (their content rewritten from those bytes) are
/// present, the rest absent (and unmarked).
pub(super) fn load_kept(
    content: &BootContent,
    offsets: &[u64],
    region_len: u64,
    blob: &File,
    cache: &File,
    present: &File,
) -> Vec<ChunkState> {
    let n = content.chunks.len();
    let mut marks = vec![0u8; n];
    if present.read_exact_at(&mut marks, 0).is_err() {
        marks.fill(0);
    }
    let mut out = vec![ChunkState::Absent; n];
    let mut kept = 0usize;
    for c in 0..n {
        if marks[c] != 1 {
            continue;
        }
        let meta = &content.chunks[c];
        let mut buf = vec![0u8; meta.compressed_len as usize];
        let ok = blob
            .read_exact_at(&mut buf, region_len + offsets[c])
            .is_ok()
            && Sha256::digest(&buf).as_slice() == meta.sha256
            && decompress_piece(
                &buf,
                content.compression,
                content.chunk_len(c as u32) as usize,
            )
            .ok()
            .is_some_and(|data| {
                cache
                    .write_all_at(&data, c as u64 * u64::from(content.chunk_size))
                    .is_ok()
            });
        if ok {
            out[c] = ChunkState::Present;
            kept += 1;
        } else {
            let _ = present.write_all_at(&[0], c as u64);
        }
    }
    if kept > 0 {
        tracing::debug!(kept, chunks = n, "boot chunks kept by an earlier start");
    }
    out
}

/// The cache's sparse copy of the compressed blob (`<dir>/blob`).
pub(super) fn open_blob(dir: &Path) -> Result<File, FetchError> {
    let blob_path = dir.join("blob");
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&blob_path)
        .map_err(io("opening the boot blob", &blob_path))
}

/// The content tar and the chunk marks of the cache in `dir`, sized for
/// `content`; the blob sized to `layer_size` with `region` at its head.
pub(super) fn open_cache(
    dir: &Path,
    content: &BootContent,
    layer_size: u64,
    blob: &File,
    region: &[u8],
) -> Result<(File, File), FetchError> {
    let open_rw = |name: &str, len: u64| -> Result<File, FetchError> {
        let p = dir.join(name);
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(io("opening the boot chunk cache", &p))?;
        if f.metadata()
            .map_err(io("reading the boot chunk cache", &p))?
            .len()
            != len
        {
            f.set_len(len)
                .map_err(io("sizing the boot chunk cache", &p))?;
        }
        Ok(f)
    };
    let n = content.chunks.len();
    let cache = open_rw("content", content.content_len)?;
    let present = open_rw("present", n as u64)?;
    let blob_path = dir.join("blob");
    blob.set_len(layer_size)
        .map_err(io("sizing the boot blob", &blob_path))?;
    blob.write_all_at(region, 0)
        .map_err(io("writing the boot blob", &blob_path))?;
    Ok((cache, present))
}

fn io(what: &str, p: &Path) -> impl FnOnce(io::Error) -> FetchError {
    let io = IoError::on(what, p);
    move |source| FetchError::Io(io(source))
}
