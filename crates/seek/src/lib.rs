//! Seek indexes for gzip layers: read one file of an original layer with one
//! ranged GET instead of downloading the whole layer.
//!
//! A [`SeekIndex`] is built by inflating a layer blob once
//! ([`SeekIndex::build`]). On the way it records zran-style *checkpoints* at
//! deflate block boundaries, about every `span` compressed bytes: where the
//! block starts (byte and bit) in the blob, the uncompressed offset there and
//! the 32 KiB of output before it, which is all a raw inflater needs to
//! resume there. The uncompressed stream is walked as a tar at the same time,
//! recording each regular file's data offset and size.
//!
//! To read a file: [`SeekIndex::file`] gives its span in the uncompressed
//! tar, [`SeekIndex::plan`] the compressed byte range to fetch, and
//! [`SeekIndex::extract`] decompresses exactly the wanted bytes from it. The
//! caller verifies them (the boot index has each file's SHA-256).
//!
//! The encoding ([`SeekIndex::encode`], [`SeekIndex::decode`]) is versioned
//! and checksummed; decode treats its input as hostile. See
//! `docs/seek-index.md`.

pub mod artifact;
mod build;
mod extract;
mod format;
// zlib-rs' raw inflate stream (Z_BLOCK stops, prime, dictionaries).
#[allow(unsafe_code)]
mod inflater;

pub use format::{MAGIC, VERSION};

/// Media type of a seek-index blob, and artifact type of the manifest that
/// carries an image's seek indexes.
pub const MEDIA_TYPE: &str = "application/vnd.lazylayer.seek-index.v1";
/// Annotation on each seek-index descriptor: the digest of the layer it indexes.
pub const ANNOTATION_LAYER: &str = "io.lazylayer.seek.layer";
/// Compressed bytes between checkpoints unless told otherwise. Each
/// checkpoint costs ~15 KB of index (its window, deflated) and a read costs
/// ~one span: 256 KiB gave the fewest bytes in all (index + spans) for
/// python3's `import sqlite3`, against 64 KiB..1 MiB (docs/seek-index.md).
pub const DEFAULT_SPAN: u64 = 256 * 1024;
/// Deflate's window: the history a resumed inflater needs.
pub const WINDOW_SIZE: usize = 32 * 1024;

/// A place to resume inflating: a deflate block boundary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    /// Offset in the uncompressed stream (the tar).
    pub uncompressed: u64,
    /// First blob byte wholly after the boundary; with `bits` > 0 the block
    /// starts in the byte before, at its top `bits` bits.
    pub compressed: u64,
    pub bits: u8,
    /// The (up to) 32 KiB of uncompressed output before the boundary.
    pub window: Vec<u8>,
}

/// A regular file's data in the uncompressed tar (the layer codec's type).
pub use lazylayer_layer::DataSpan as FileSpan;

/// What to fetch to read some uncompressed bytes: blob bytes
/// `compressed_start..compressed_end`, inflated from checkpoint `checkpoint`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub checkpoint: usize,
    pub compressed_start: u64,
    pub compressed_end: u64,
}

impl Plan {
    pub fn compressed_len(&self) -> u64 {
        self.compressed_end - self.compressed_start
    }
}

/// One gzip layer's seek index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekIndex {
    /// SHA-256 of the compressed blob (the layer's digest).
    pub layer_digest: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    /// The checkpoint spacing it was built with (compressed bytes).
    pub span: u64,
    /// Sorted by offset, the first at the start of the deflate data.
    pub checkpoints: Vec<Checkpoint>,
    /// Regular files (hardlinks resolved to their target's data), sorted by path.
    pub files: Vec<(Vec<u8>, FileSpan)>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeekError {
    #[error("reading the layer blob")]
    Read(#[source] std::io::Error),
    #[error("not a gzip blob: {0}")]
    NotGzip(String),
    #[error("the blob holds more than one gzip member (a second starts at byte {at}); seek indexes cover single-member layers only")]
    MultiMember { at: u64 },
    #[error("corrupt deflate data near compressed byte {at}: {reason}")]
    Corrupt { at: u64, reason: String },
    #[error("reading the layer's tar stream")]
    Tar(#[source] std::io::Error),
    #[error("seek index: {0}")]
    Decode(String),
    #[error("seek index checksum mismatch")]
    Checksum,
    #[error("extracting bytes {off}+{len}: {reason}")]
    Extract { off: u64, len: u64, reason: String },
}

pub type Result<T, E = SeekError> = std::result::Result<T, E>;

impl SeekIndex {
    /// The data of the regular file at `path` (an index path: relative, no
    /// leading `./`), if this layer holds one.
    pub fn file(&self, path: &[u8]) -> Option<FileSpan> {
        self.files
            .binary_search_by(|(p, _)| p.as_slice().cmp(path))
            .ok()
            .map(|i| self.files[i].1)
    }

    /// The compressed range to fetch for uncompressed bytes `off..off+len`:
    /// from the last checkpoint at or before `off` to the first at or after
    /// the end (or the blob's end).
    pub fn plan(&self, off: u64, len: u64) -> Plan {
        let end = off.saturating_add(len);
        let cp = self
            .checkpoints
            .partition_point(|c| c.uncompressed <= off)
            .saturating_sub(1);
        let c = &self.checkpoints[cp];
        let compressed_start = c.compressed - u64::from(c.bits > 0);
        let compressed_end = self.checkpoints[cp + 1..]
            .iter()
            .find(|c| c.uncompressed >= end)
            .map_or(self.compressed_size, |c| c.compressed);
        Plan {
            checkpoint: cp,
            compressed_start,
            compressed_end,
        }
    }
}
