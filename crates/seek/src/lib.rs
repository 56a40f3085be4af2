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

pub use format::{head_len, MAGIC, VERSION};

/// Media type of a seek-index blob, and artifact type of the manifest that
/// carries an image's seek indexes.
pub const MEDIA_TYPE: &str = "application/vnd.lazylayer.seek-index.v1";
/// Annotation on each seek-index descriptor: the digest of the layer it indexes.
pub const ANNOTATION_LAYER: &str = "io.lazylayer.seek.layer";
/// Annotations on a version 2 seek-index descriptor: the length and the
/// SHA-256 (`sha256:<hex>`) of its head, so a reader fetches the head alone,
/// by range, and checks it. Without them a reader fetches the blob whole.
pub const ANNOTATION_HEAD_SIZE: &str = "io.lazylayer.seek.head.size";
pub const ANNOTATION_HEAD_DIGEST: &str = "io.lazylayer.seek.head.digest";
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
        find_file(&self.files, path)
    }

    /// The compressed range to fetch for uncompressed bytes `off..off+len`:
    /// from the last checkpoint at or before `off` to the first at or after
    /// the end (or the blob's end).
    pub fn plan(&self, off: u64, len: u64) -> Plan {
        plan_over(&self.checkpoints, self.compressed_size, off, len)
    }

    /// Uncompressed bytes `off..off+len` from `compressed`, the blob bytes
    /// `plan` names. Returns exactly `len` bytes or an error; inflates no
    /// further than needed. Bytes from a wrong or damaged `compressed` may
    /// come back as an error or as wrong bytes: the caller verifies them.
    pub fn extract(&self, plan: &Plan, compressed: &[u8], off: u64, len: u64) -> Result<Vec<u8>> {
        let cp = self
            .checkpoints
            .get(plan.checkpoint)
            .ok_or_else(|| extract_error(off, len, "the plan names no checkpoint of this index"))?;
        extract::extract(
            cp,
            &cp.window,
            self.uncompressed_size,
            plan,
            compressed,
            off,
            len,
        )
    }
}

/// Where one window lies in an encoded index (version 2): what a reader
/// holding only the head fetches, by range, to resume at that checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowRef {
    /// Offset in the encoded index, and length, of the raw-deflated window.
    pub offset: u64,
    pub deflated_len: u32,
    /// Its length inflated (at most [`WINDOW_SIZE`]).
    pub len: u16,
    /// SHA-256 of the deflated bytes, as they lie in the index.
    pub sha256: [u8; 32],
}

/// A checkpoint as the head gives it: where to resume, and where its
/// window lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub uncompressed: u64,
    pub compressed: u64,
    pub bits: u8,
    pub window: WindowRef,
}

/// The *head* of an encoded seek index (version 2): everything but the
/// windows. A reader fetches it by range (its length and SHA-256 ride in
/// the artifact), plans reads from it, and fetches the one window a read
/// needs beside the read's span; a whole index costs ~40x the head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeekHead {
    pub layer_digest: [u8; 32],
    pub compressed_size: u64,
    pub uncompressed_size: u64,
    pub span: u64,
    /// Bytes of the head, its checksum included: the windows follow.
    pub head_len: u64,
    pub marks: Vec<Mark>,
    pub files: Vec<(Vec<u8>, FileSpan)>,
}

impl SeekHead {
    /// See [`SeekIndex::file`].
    pub fn file(&self, path: &[u8]) -> Option<FileSpan> {
        find_file(&self.files, path)
    }

    /// See [`SeekIndex::plan`]; the plan's checkpoint names the window to
    /// fetch ([`SeekHead::window`]).
    pub fn plan(&self, off: u64, len: u64) -> Plan {
        plan_over(&self.marks, self.compressed_size, off, len)
    }

    /// Where the window of checkpoint `i` lies in the encoded index.
    pub fn window(&self, i: usize) -> Option<&WindowRef> {
        self.marks.get(i).map(|m| &m.window)
    }

    /// Window `i` from its deflated bytes, fetched from where
    /// [`SeekHead::window`] says: checked against its SHA-256, inflated to
    /// exactly its length.
    pub fn inflate_window(&self, i: usize, deflated: &[u8]) -> Result<Vec<u8>> {
        let w = self
            .window(i)
            .ok_or_else(|| SeekError::Decode(format!("no checkpoint {i}")))?;
        if deflated.len() != w.deflated_len as usize
            || <sha2::Sha256 as sha2::Digest>::digest(deflated).as_slice() != w.sha256
        {
            return Err(SeekError::Decode(format!(
                "window {i}: the bytes differ from the head's SHA-256"
            )));
        }
        format::inflate_window(deflated, w.len as usize)
            .ok_or_else(|| SeekError::Decode(format!("window {i} does not inflate to its length")))
    }

    /// See [`SeekIndex::extract`]; `window` is the plan's checkpoint's
    /// ([`SeekHead::inflate_window`]).
    pub fn extract(
        &self,
        plan: &Plan,
        window: &[u8],
        compressed: &[u8],
        off: u64,
        len: u64,
    ) -> Result<Vec<u8>> {
        let m = self
            .marks
            .get(plan.checkpoint)
            .ok_or_else(|| extract_error(off, len, "the plan names no checkpoint of this index"))?;
        if window.len() != m.window.len as usize {
            return Err(extract_error(
                off,
                len,
                "the window is not the checkpoint's",
            ));
        }
        extract::extract(
            m,
            window,
            self.uncompressed_size,
            plan,
            compressed,
            off,
            len,
        )
    }
}

/// Where a checkpoint resumes inflating: what planning and extracting need
/// of a built checkpoint and of a head's mark alike.
pub(crate) trait Resume {
    fn uncompressed(&self) -> u64;
    fn compressed(&self) -> u64;
    fn bits(&self) -> u8;
    /// The first blob byte to fetch: with bits, the byte before.
    fn first_byte(&self) -> u64 {
        self.compressed() - u64::from(self.bits() > 0)
    }
}

impl Resume for Checkpoint {
    fn uncompressed(&self) -> u64 {
        self.uncompressed
    }
    fn compressed(&self) -> u64 {
        self.compressed
    }
    fn bits(&self) -> u8 {
        self.bits
    }
}

impl Resume for Mark {
    fn uncompressed(&self) -> u64 {
        self.uncompressed
    }
    fn compressed(&self) -> u64 {
        self.compressed
    }
    fn bits(&self) -> u8 {
        self.bits
    }
}

fn find_file(files: &[(Vec<u8>, FileSpan)], path: &[u8]) -> Option<FileSpan> {
    files
        .binary_search_by(|(p, _)| p.as_slice().cmp(path))
        .ok()
        .map(|i| files[i].1)
}

fn plan_over<R: Resume>(cps: &[R], compressed_size: u64, off: u64, len: u64) -> Plan {
    let end = off.saturating_add(len);
    let cp = cps
        .partition_point(|c| c.uncompressed() <= off)
        .saturating_sub(1);
    let compressed_end = cps[cp + 1..]
        .iter()
        .find(|c| c.uncompressed() >= end)
        .map_or(compressed_size, |c| c.compressed());
    Plan {
        checkpoint: cp,
        compressed_start: cps[cp].first_byte(),
        compressed_end,
    }
}

fn extract_error(off: u64, len: u64, reason: &str) -> SeekError {
    SeekError::Extract {
        off,
        len,
        reason: reason.into(),
    }
}
