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

/// Mark `selection` as in-boot in `index`, copy those entries from
/// `merged_root` (a read-only view of SRC's merged root file system) into a
/// gzip layer at `out`, and append the encoded index last.
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
        index.entries[i as usize].in_boot = true;
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
