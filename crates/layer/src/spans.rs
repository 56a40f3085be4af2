//! Where each regular file's bytes lie in an uncompressed tar stream.

use std::collections::HashMap;
use std::io::{self, Read};

use crate::{normalize, OPAQUE_MARKER, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX};

/// A file's data in a tar stream: `size` bytes at `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DataSpan {
    pub offset: u64,
    pub size: u64,
}

/// Every regular file of the tar `r` reads, by path as the extractor
/// normalises it, with tar semantics: a hardlink maps to its target's data,
/// a later entry replaces the path (one with no plain data, such as a
/// directory, symlink or sparse file, removes it), whiteouts are not files,
/// names the extractor would refuse are skipped.
pub fn data_spans(r: impl Read) -> io::Result<HashMap<Vec<u8>, DataSpan>> {
    let mut files: HashMap<Vec<u8>, DataSpan> = HashMap::new();
    let norm = |p: &[u8]| {
        normalize(p)
            .ok()
            .map(|p| p.into_os_string().into_encoded_bytes())
    };
    let mut ar = tar::Archive::new(r);
    for entry in ar.entries()? {
        let entry = entry?;
        let Some(path) = norm(&entry.path_bytes()) else {
            continue;
        };
        if is_whiteout(&path) {
            continue;
        }
        use tar::EntryType as T;
        match entry.header().entry_type() {
            T::Regular | T::Continuous => {
                let span = DataSpan {
                    offset: entry.raw_file_position(),
                    size: entry.size(),
                };
                files.insert(path, span);
            }
            T::Link => {
                let target = entry.link_name_bytes().and_then(|t| norm(&t));
                match target.and_then(|t| files.get(&t).copied()) {
                    Some(span) => files.insert(path, span),
                    None => files.remove(&path),
                };
            }
            _ => {
                files.remove(&path);
            }
        }
    }
    Ok(files)
}

fn is_whiteout(path: &[u8]) -> bool {
    let name = path.rsplit(|&b| b == b'/').next().unwrap_or(path);
    name == OPAQUE_MARKER.as_bytes()
        || (name.starts_with(WHITEOUT_PREFIX.as_bytes())
            && !name.starts_with(WHITEOUT_META_PREFIX.as_bytes()))
}
