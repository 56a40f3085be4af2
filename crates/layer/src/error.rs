use std::io;
use std::path::PathBuf;

use crate::Compression;

/// Everything that can go wrong while decoding, extracting or building a layer.
///
/// Every variant names the entry (or file) involved, so a failed pull can be
/// traced back to one tar member. Paths are relative to the layer root; entries
/// refused before normalisation carry the raw path from the archive.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("entry {}: empty path", path.display())]
    EmptyPath { path: PathBuf },

    #[error("entry {}: absolute path not allowed in a layer", path.display())]
    AbsolutePath { path: PathBuf },

    #[error("entry {}: `..` component not allowed in a layer", path.display())]
    ParentComponent { path: PathBuf },

    #[error("entry {}: NUL byte in path", path.display())]
    NulInPath { path: PathBuf },

    #[error("entry {}: path longer than {limit} bytes", path.display())]
    PathTooLong { path: PathBuf, limit: usize },

    #[error("entry {}: path goes through a symlink inside the layer", path.display())]
    ThroughSymlink { path: PathBuf },

    #[error("entry {}: a parent component is not a directory", path.display())]
    NotADirectory { path: PathBuf },

    #[error("entry {}: a {kind} cannot be stored at the layer root", path.display())]
    RootEntry { path: PathBuf, kind: &'static str },

    #[error("entry {}: hardlink target {} escapes the layer", path.display(), target.display())]
    HardlinkEscape { path: PathBuf, target: PathBuf },

    #[error("entry {}: hardlink target {} does not exist in this layer", path.display(), target.display())]
    HardlinkTargetMissing { path: PathBuf, target: PathBuf },

    #[error("entry {}: hardlink target {} is a directory", path.display(), target.display())]
    HardlinkToDirectory { path: PathBuf, target: PathBuf },

    #[error("entry {}: invalid whiteout name", path.display())]
    InvalidWhiteout { path: PathBuf },

    #[error("entry {}: only a `.wh..wh.*` name other than the opaque marker carries data in its headers", path.display())]
    NotMetadataName { path: PathBuf },

    #[error("entry {}: layer exceeds the {what} limit of {limit}", path.display())]
    TooLarge {
        path: PathBuf,
        what: &'static str,
        limit: u64,
    },

    #[error("entry {}: archive truncated, expected {expected} data bytes, got {actual}", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        actual: u64,
    },

    #[error("entry {}: unsupported tar entry type {kind}", path.display())]
    UnsupportedEntryType { path: PathBuf, kind: String },

    #[error("entry {}: malformed PAX record {key}", path.display())]
    BadPaxRecord { path: PathBuf, key: String },

    #[error("{}: unsupported file type for a layer ({kind})", path.display())]
    UnsupportedFileType { path: PathBuf, kind: &'static str },

    #[error("{}: file changed while it was being archived", path.display())]
    FileChanged { path: PathBuf },

    /// Reading or parsing the tar stream failed; `after` is the last entry read
    /// completely, or empty at the start of the archive. A layer read as it
    /// downloads can fail here before its digest is known: the message says
    /// what that means.
    #[error("reading tar stream after entry {:?}: {source} (corrupt or cut-short layer data)", after.display().to_string())]
    ReadArchive {
        after: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("setting up {compression:?} decoder")]
    Decoder {
        compression: Compression,
        #[source]
        source: io::Error,
    },

    #[error("{}: xattr {name}: {source}", path.display())]
    Xattr {
        path: PathBuf,
        name: String,
        #[source]
        source: io::Error,
    },

    /// A file-system operation on the layer (extraction) or the source tree
    /// (building) failed.
    #[error("{}: {op}: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
}

impl LayerError {
    pub(crate) fn io(
        path: impl Into<PathBuf>,
        op: &'static str,
        source: impl Into<io::Error>,
    ) -> Self {
        LayerError::Io {
            path: path.into(),
            op,
            source: source.into(),
        }
    }
}
