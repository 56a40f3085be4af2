//! An image whose every layer is in the store needs no FUSE: the kernel's
//! overlayfs stacks the store's extracted layers directly (native speed for
//! metadata walks and reads alike).
//!
//! The one thing overlayfs would show that the image does not have is the
//! boot index, which the store keeps as an ordinary root-level file of the
//! boot layer (`LazyImage` reads it from there). A small directory holding
//! an overlay whiteout of that name, stacked on top, hides it.

use std::path::{Path, PathBuf};

use lazylayer_fetch::FetchError;
use lazylayer_index::{DIGESTS_FILE_NAME, INDEX_FILE_NAME};
use lazylayer_oci::Reference;
use lazylayer_store::{ImageRecord, LayerRef, Store};

use crate::annotations::boot_annotations;

/// The store's record of `reference` when the store also holds every one of
/// its layers extracted (what lets a start need no network at all).
pub fn local_image(store: &Store, reference: &Reference) -> Option<ImageRecord> {
    store.image(reference).filter(|r| {
        r.layers
            .iter()
            .all(|l| store.layer_dir(&l.digest).is_some())
    })
}

/// True when the stored manifest of `rec` announces a boot layer, which is
/// its top layer: an optimized image (a plain one has no index to hide, and
/// keeps its own start path); or when the image was started from an
/// attached boot layer (its layers alone make its root).
pub fn is_optimized(
    store: &Store,
    reference: &Reference,
    rec: &ImageRecord,
) -> Result<bool, FetchError> {
    if rec.attached.is_some() {
        return Ok(true);
    }
    let raw = lazylayer_oci::manifest::RawManifest {
        bytes: store.read_blob(&rec.manifest_digest)?.into(),
        media_type: rec.manifest_media_type.clone(),
        digest: rec.manifest_digest.clone(),
    };
    Ok(boot_annotations(reference, &raw)?
        .is_some_and(|b| rec.layers.last().is_some_and(|top| top.digest == b.layer)))
}

/// Overlayfs lower directories of an image's merged root straight from the
/// store, top first: every layer's extracted tree (`layers` bottom first, as
/// records list them), with the index whiteout on top when the top layer is
/// a boot layer. None when some layer is not extracted in the store.
pub fn stacked_lowers(
    store: &Store,
    layers: &[LayerRef],
) -> Result<Option<Vec<PathBuf>>, FetchError> {
    let Some(mut dirs) = layers
        .iter()
        .rev()
        .map(|l| store.layer_dir(&l.digest))
        .collect::<Option<Vec<PathBuf>>>()
    else {
        return Ok(None);
    };
    if dirs.first().is_some_and(|top| holds_index(top)) {
        dirs.insert(0, index_mask(store)?);
    }
    Ok(Some(dirs))
}

/// True when the extracted layer `dir` carries a boot index file.
pub fn holds_index(dir: &Path) -> bool {
    dir.join(INDEX_FILE_NAME).symlink_metadata().is_ok()
}

/// The boot layer's own files, hidden from containers.
const MASKED: [&str; 2] = [INDEX_FILE_NAME, DIGESTS_FILE_NAME];

/// A directory (under the store root, made once and shared) whose only
/// entries are overlay whiteouts (char devices 0:0) named like the boot
/// index and its digests file: stacked over a boot layer, it hides them.
pub fn index_mask(store: &Store) -> Result<PathBuf, FetchError> {
    // Not "boot-index": that mask, made by earlier releases, hides the
    // index alone.
    let dir = store.root().join("masks").join("boot-metadata");
    if dir.join(INDEX_FILE_NAME).symlink_metadata().is_ok() {
        return Ok(dir);
    }
    let io = |what: &str, path: &Path| {
        let io = lazylayer_sys::IoError::on(what, path);
        move |source: std::io::Error| FetchError::Io(io(source))
    };
    let parent = store.root().join("masks");
    lazylayer_store::create_private_dir(&parent)
        .map_err(io("creating the masks directory", &parent))?;
    // Made aside and renamed into place: a concurrent start sees either no
    // mask or a whole one.
    let made = parent.join(format!(
        ".boot-index-{}-{}",
        std::process::id(),
        std::time::UNIX_EPOCH.elapsed().map_or(0, |d| d.as_nanos())
    ));
    let _ = std::fs::remove_dir_all(&made);
    std::fs::create_dir(&made).map_err(io("creating the index mask", &made))?;
    // The index last: a mask is whole once the index's whiteout is there.
    for name in MASKED.iter().rev() {
        let made_node = rustix::fs::mknodat(
            rustix::fs::CWD,
            made.join(name),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::empty(),
            0,
        );
        if let Err(e) = made_node {
            let _ = std::fs::remove_dir_all(&made);
            return Err(io("making the index whiteout", &made)(e.into()));
        }
    }
    match std::fs::rename(&made, &dir) {
        Ok(()) => Ok(dir),
        // Another process got there first: its mask serves as well.
        Err(_) if dir.join(INDEX_FILE_NAME).symlink_metadata().is_ok() => {
            let _ = std::fs::remove_dir_all(&made);
            Ok(dir)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&made);
            Err(io("placing the index mask", &dir)(e))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[test]
    fn index_mask_is_one_whiteout_made_once() {
        if !rustix::process::geteuid().is_root() {
            assert!(
                std::env::var_os("CI").is_none(),
                "needs root (mknod of a whiteout); CI runs every test"
            );
            eprintln!("skipped: mknod of a whiteout needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let m = index_mask(&store).unwrap();
        let again = index_mask(&store).unwrap();
        assert_eq!(m, again);
        let mut entries: Vec<_> = std::fs::read_dir(&m).unwrap().flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        let names: Vec<_> = entries.iter().map(|e| e.file_name()).collect();
        assert_eq!(names, [DIGESTS_FILE_NAME, INDEX_FILE_NAME]);
        for e in &entries {
            let meta = e.path().symlink_metadata().unwrap();
            assert!(meta.file_type().is_char_device());
            assert_eq!(std::os::unix::fs::MetadataExt::rdev(&meta), 0);
        }
        // No temp directories left beside it.
        let masks: Vec<_> = std::fs::read_dir(m.parent().unwrap()).unwrap().collect();
        assert_eq!(masks.len(), 1);
    }
}
