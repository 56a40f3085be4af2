//! The digests of the files outside the boot layer, for an index that
//! keeps them apart (format 5, `lazylayer_index::ExternalDigests`): their
//! file opens the boot content, so it comes by chunks like a boot file's
//! bytes, after the start set (the boot layer's background fetch) or when a
//! read first needs a digest, and is checked whole against the SHA-256 the
//! index names before any digest in it is used.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use lazylayer_index::{DigestTable, ExternalDigests, IndexEntry, DIGESTS_FILE_NAME};

use crate::source::BootContentSource;

/// Each file's digest, wherever the index keeps it. Cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct FileDigests {
    apart: Option<Arc<Apart>>,
}

struct Apart {
    image: Arc<str>,
    external: ExternalDigests,
    from: BootContentSource,
    /// The checked table, once read.
    table: OnceLock<Result<Arc<DigestTable>, String>>,
}

impl FileDigests {
    /// The digests of an index whose entries carry them (`external` None),
    /// or of one that keeps them in `boot`'s digests file.
    pub fn new(
        image: Arc<str>,
        external: Option<ExternalDigests>,
        boot: &BootContentSource,
    ) -> FileDigests {
        FileDigests {
            apart: external.map(|external| {
                Arc::new(Apart {
                    image,
                    external,
                    from: boot.clone(),
                    table: OnceLock::new(),
                })
            }),
        }
    }

    /// Entry `idx`'s digest (None: it has none), waiting for the digests
    /// file if it is not read yet: at most the boot layer's read timeout.
    /// Blocking: never on a FUSE worker thread.
    pub fn get(&self, idx: u32, entry: &IndexEntry) -> io::Result<Option<[u8; 32]>> {
        match &self.apart {
            Some(a) if a.external.holds(idx) => Ok(a.table(true)?.and_then(|t| t.get(idx))),
            _ => Ok(entry.digest),
        }
    }

    /// [`FileDigests::get`] without waiting: None when the digests file is
    /// not at hand yet (and its chunks are asked for).
    pub fn try_get(&self, idx: u32, entry: &IndexEntry) -> Option<Option<[u8; 32]>> {
        match &self.apart {
            Some(a) if a.external.holds(idx) => match a.table(false) {
                Ok(Some(t)) => Some(t.get(idx)),
                // The open's own thread waits, and reports the error.
                _ => None,
            },
            _ => Some(entry.digest),
        }
    }
}

impl Apart {
    /// The table; None when `wait` is false and it is not local yet. A file
    /// that does not match the index is refused for good; a wait that timed
    /// out is tried again by the next read.
    fn table(&self, wait: bool) -> io::Result<Option<Arc<DigestTable>>> {
        if let Some(known) = self.table.get() {
            return known.clone().map(Some).map_err(io::Error::other);
        }
        // From its entries at the start of the chunked content, or from
        // the extracted boot layer.
        let file = match &self.from {
            BootContentSource::Chunks(c) => {
                let len = self.external.tar_len;
                let tar = match wait {
                    true => c.read_prefix(len)?,
                    false => match c.try_read_prefix(len) {
                        Some(r) => r?,
                        None => return Ok(None),
                    },
                };
                lazylayer_layer::metadata::read_file(&tar, DIGESTS_FILE_NAME.as_bytes())
                    .map_err(|e| e.to_string())
            }
            BootContentSource::Dir(d) => read_bounded(d, self.external.file_len()),
        };
        let checked = file
            .and_then(|f| {
                self.external
                    .table(&f)
                    .map_err(|e| format!("{}: {e}", self.image))
            })
            .map(Arc::new);
        if let Err(e) = &checked {
            tracing::warn!(image = %self.image, error = %e, "the files' digests cannot be used: untraced files come only from verified layers");
        }
        self.table
            .get_or_init(|| checked)
            .clone()
            .map(Some)
            .map_err(io::Error::other)
    }
}

/// The extracted boot layer's digests file, if it has the length the index
/// says (read no further).
fn read_bounded(dir: &std::path::Path, len: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let path: PathBuf = dir.join(DIGESTS_FILE_NAME);
    let f = lazylayer_sys::beneath::open_beneath(dir, DIGESTS_FILE_NAME.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut out = Vec::new();
    f.take(len + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_index::{FileKind, DIGESTS_MAGIC};
    use sha2::{Digest as _, Sha256};

    /// A regular file outside the boot layer.
    fn file_entry() -> IndexEntry {
        IndexEntry {
            in_boot: false,
            ..crate::boot::tests::entry(b"f", FileKind::File, 1)
        }
    }

    /// An extracted boot layer whose digests file holds `digests` for
    /// entries 3 and 7, and what the index says of it (`named`: the file
    /// the index names).
    fn apart(dir: &std::path::Path, file: &[u8], named: &[u8]) -> FileDigests {
        std::fs::write(dir.join(DIGESTS_FILE_NAME), file).unwrap();
        let external = ExternalDigests {
            tar_len: 1024,
            sha256: Sha256::digest(named).into(),
            entries: vec![3, 7],
        };
        FileDigests::new(
            "img".into(),
            Some(external),
            &BootContentSource::Dir(dir.to_path_buf()),
        )
    }

    #[test]
    fn digests_kept_apart_are_served_only_from_the_file_the_index_names() {
        let dir = tempfile::tempdir().unwrap();
        let mut file = DIGESTS_MAGIC.to_vec();
        file.extend_from_slice(&[3u8; 32]);
        file.extend_from_slice(&[7u8; 32]);
        let e = file_entry();
        let d = apart(dir.path(), &file, &file);
        assert_eq!(d.get(3, &e).unwrap(), Some([3u8; 32]));
        assert_eq!(d.try_get(7, &e), Some(Some([7u8; 32])));
        // An entry the file does not hold has none (its own field).
        assert_eq!(d.get(4, &e).unwrap(), None);

        // Another file in its place: no digest from it, ever; the open
        // falls back to the verified layer.
        let mut other = file.clone();
        other[40] ^= 1;
        let d = apart(dir.path(), &other, &file);
        let err = d.get(3, &e).unwrap_err();
        assert!(err.to_string().contains("SHA-256"), "{err}");
        assert_eq!(d.try_get(3, &e), None);
        assert_eq!(d.get(4, &e).unwrap(), None);
        // A longer one is not read past the length the index says.
        let mut longer = file.clone();
        longer.extend_from_slice(&[0u8; 1 << 20]);
        let d = apart(dir.path(), &longer, &file);
        assert!(d.get(7, &e).unwrap_err().to_string().contains("bytes"));

        // Digests in the entries need no file.
        let inline = FileDigests::default();
        let mut with = file_entry();
        with.digest = Some([9u8; 32]);
        assert_eq!(inline.get(3, &with).unwrap(), Some([9u8; 32]));
    }
}
