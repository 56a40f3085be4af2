//! Writing the boot layer: the selected entries copied from the merged view
//! of SRC (so a runtime that applies every layer gets the very same root),
//! then the index file.

use std::ffi::OsStr;
use std::io::BufWriter;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use lazylayer_layer::index::{BootIndex, INDEX_FILE_NAME};
use lazylayer_layer::{Compression, LayerDigests, LayerWriter};

use crate::OptimizeError;

/// Facts about a written boot layer.
#[derive(Debug, Clone)]
pub struct BootLayer {
    pub digests: LayerDigests,
    /// Entries copied (files, dirs, links), not counting the index.
    pub entries: usize,
    /// Bytes of regular-file content copied.
    pub file_bytes: u64,
    pub index_bytes: u64,
}

/// Mark `selection` as in-boot in `index` and drop those entries' content
/// digests, copy the entries from `merged_root` (a read-only view of SRC's
/// merged root file system) into a gzip layer at `out`, and append the
/// encoded index last.
pub fn write_boot_layer(
    index: &mut BootIndex,
    selection: &[u32],
    merged_root: &Path,
    out: &Path,
) -> Result<BootLayer, OptimizeError> {
    for e in index.entries.iter_mut() {
        e.in_boot = false;
    }
    for &i in selection {
        let e = &mut index.entries[i as usize];
        e.in_boot = true;
        // The boot layer is fetched and verified against its blob digest
        // before the container starts, so a per-file digest would only
        // cost 32 index bytes per file. Files left in SRC's layers keep
        // theirs: those layers are read while still streaming.
        e.digest = None;
    }
    let file =
        std::fs::File::create(out).map_err(|e| OptimizeError::io("creating boot layer", out, e))?;
    let mut w = LayerWriter::new(BufWriter::with_capacity(1 << 20, file), Compression::Gzip);
    let mut file_bytes = 0u64;
    for &i in selection {
        let e = &index.entries[i as usize];
        if e.kind == lazylayer_layer::index::FileKind::File {
            file_bytes += e.size;
        }
        w.append_path(merged_root, Path::new(OsStr::from_bytes(&e.path)))
            .map_err(|source| OptimizeError::Layer {
                what: "writing boot layer".into(),
                source,
            })?;
    }
    let encoded = index.encode();
    // Read-only and dated at the epoch: the index is data, and a fixed time
    // keeps the layer reproducible for the same trace.
    w.append_bytes(Path::new(INDEX_FILE_NAME), 0o444, 0, &encoded)
        .map_err(|source| OptimizeError::Layer {
            what: "writing boot index".into(),
            source,
        })?;
    let digests = w.finish().map_err(|source| OptimizeError::Layer {
        what: "finishing boot layer".into(),
        source,
    })?;
    Ok(BootLayer {
        digests,
        entries: selection.len(),
        file_bytes,
        index_bytes: encoded.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_layer::index::{build_index, FileKind};

    #[test]
    fn boot_entries_drop_their_digests_others_keep_them() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("layer");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/boot"), "read at start").unwrap();
        std::fs::write(root.join("lazy"), "read later").unwrap();
        let mut index = build_index(&[("sha256:test".into(), root.clone())]).unwrap();
        let at = |index: &BootIndex, p: &str| index.lookup(p.as_bytes()).unwrap();
        let (d, boot, lazy) = (at(&index, "d"), at(&index, "d/boot"), at(&index, "lazy"));
        let lazy_digest = index.entries[lazy as usize].digest;
        assert!(lazy_digest.is_some());
        assert!(index.entries[boot as usize].digest.is_some());
        let full_len = index.encode().len() as u64;

        let out = tmp.path().join("boot.tar.gz");
        let layer = write_boot_layer(&mut index, &[d, boot], &root, &out).unwrap();

        let boot_e = &index.entries[boot as usize];
        assert!(boot_e.in_boot);
        assert_eq!(boot_e.digest, None, "the boot layer's digest covers it");
        assert_eq!(index.entries[lazy as usize].digest, lazy_digest);
        assert!(!index.entries[lazy as usize].in_boot);
        for e in &index.entries {
            assert!(!(e.in_boot && e.digest.is_some()), "{:?}", e.path);
            assert!(e.digest.is_none() || e.kind == FileKind::File);
        }
        // The index written is the edited one: one digest (32 bytes) fewer.
        assert_eq!(layer.index_bytes, index.encode().len() as u64);
        assert_eq!(layer.index_bytes, full_len - 32);
    }
}
