//! Where the boot layer's file content lies, for random access (format
//! version 4).
//!
//! A chunked boot layer is one blob in two parts, both plain members of the
//! layer's compression (gzip members or zstd frames), so that every runtime
//! applies it as an ordinary layer:
//!
//! 1. the *index region*: the tar entry of the index file, compressed on its
//!    own, first in the blob. Its compressed length and digest are manifest
//!    annotations, so a reader fetches it with one Range GET and verifies it
//!    before decompressing a byte.
//! 2. the *content*: the tar stream of every boot entry (and the end-of-archive
//!    blocks), cut into pieces of [`BootContent::chunk_size`] uncompressed
//!    bytes, each compressed independently. The index holds each chunk's
//!    compressed length and SHA-256, and each boot file's offset in that tar
//!    stream, so a read of a boot file needs only the chunks that cover it.

use crate::{BootIndex, FileKind, IndexError};

/// How each chunk (and the index region) is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkCompression {
    Gzip,
    Zstd,
}

impl ChunkCompression {
    pub fn code(self) -> u8 {
        match self {
            ChunkCompression::Gzip => 1,
            ChunkCompression::Zstd => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            1 => Some(ChunkCompression::Gzip),
            2 => Some(ChunkCompression::Zstd),
            _ => None,
        }
    }
}

/// One independently compressed piece of the content tar stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub compressed_len: u32,
    /// SHA-256 of the compressed bytes: checked before decompressing.
    pub sha256: [u8; 32],
}

/// Smallest and largest chunk a reader accepts: bounds what one fetch and
/// one decompression may cost.
pub const MIN_CHUNK_SIZE: u32 = 4 << 10;
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;

/// The random-access description of a chunked boot layer's content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootContent {
    pub compression: ChunkCompression,
    /// Uncompressed bytes per chunk (the last one may be shorter).
    pub chunk_size: u32,
    /// Length of the uncompressed content tar stream.
    pub content_len: u64,
    pub chunks: Vec<Chunk>,
    /// (entry, offset of its data in the content tar), sorted by entry; every
    /// in-boot regular file with content has one.
    pub files: Vec<(u32, u64)>,
    /// Chunks the traced workload read, in first-access order: fetched
    /// before anything else when the image starts.
    pub start: Vec<u32>,
}

impl BootContent {
    /// Byte range of chunk `i` in the blob, relative to the content's start.
    pub fn chunk_range(&self, i: u32) -> (u64, u64) {
        // Callers hold a validated table; prefix sums are cheap enough for
        // the few hundred chunks of a boot layer, and built once by callers
        // that need many (see `chunk_offsets`).
        let start: u64 = self.chunks[..i as usize]
            .iter()
            .map(|c| u64::from(c.compressed_len))
            .sum();
        (
            start,
            start + u64::from(self.chunks[i as usize].compressed_len),
        )
    }

    /// Every chunk's start in the blob relative to the content's start, plus
    /// the end of the last one.
    pub fn chunk_offsets(&self) -> Vec<u64> {
        let mut out = Vec::with_capacity(self.chunks.len() + 1);
        let mut at = 0u64;
        out.push(0);
        for c in &self.chunks {
            at += u64::from(c.compressed_len);
            out.push(at);
        }
        out
    }

    /// Compressed bytes of the content part.
    pub fn compressed_len(&self) -> u64 {
        self.chunks
            .iter()
            .map(|c| u64::from(c.compressed_len))
            .sum()
    }

    /// Uncompressed length of chunk `i`.
    pub fn chunk_len(&self, i: u32) -> u64 {
        let start = u64::from(i) * u64::from(self.chunk_size);
        (self.content_len - start).min(u64::from(self.chunk_size))
    }

    /// Chunks covering content bytes `[off, off + len)` (empty for `len` 0).
    pub fn chunks_covering(&self, off: u64, len: u64) -> std::ops::Range<u32> {
        if len == 0 || off >= self.content_len {
            return 0..0;
        }
        let end = (off + len).min(self.content_len);
        let cs = u64::from(self.chunk_size);
        (off / cs) as u32..end.div_ceil(cs) as u32
    }

    /// Offset of entry `idx`'s data in the content tar.
    pub fn file_offset(&self, idx: u32) -> Option<u64> {
        self.files
            .binary_search_by_key(&idx, |&(e, _)| e)
            .ok()
            .map(|i| self.files[i].1)
    }

    /// Check the table against itself and against `index`'s entries.
    pub fn validate(&self, index: &BootIndex) -> Result<(), IndexError> {
        let bad = |what: String| IndexError::Invalid {
            what: format!("boot content: {what}"),
        };
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&self.chunk_size) {
            return Err(bad(format!("chunk size {}", self.chunk_size)));
        }
        let want = self.content_len.div_ceil(u64::from(self.chunk_size));
        if want != self.chunks.len() as u64 {
            return Err(bad(format!(
                "{} chunks for {} content bytes of {}-byte chunks",
                self.chunks.len(),
                self.content_len,
                self.chunk_size
            )));
        }
        // A compressed chunk larger than this is no compression a writer
        // would choose; refusing it bounds a single fetch.
        let max_compressed = u64::from(self.chunk_size) * 2 + 4096;
        if let Some(c) = self
            .chunks
            .iter()
            .find(|c| c.compressed_len == 0 || u64::from(c.compressed_len) > max_compressed)
        {
            return Err(bad(format!(
                "chunk of {} compressed bytes",
                c.compressed_len
            )));
        }
        let mut last: Option<u32> = None;
        for &(idx, off) in &self.files {
            if last.is_some_and(|l| l >= idx) {
                return Err(bad(format!("file entries not strictly sorted at {idx}")));
            }
            last = Some(idx);
            let Some(e) = index.entries.get(idx as usize) else {
                return Err(bad(format!("entry {idx} does not exist")));
            };
            if e.kind != FileKind::File || !e.in_boot {
                return Err(bad(format!(
                    "entry {idx} ({}) is not a boot file",
                    String::from_utf8_lossy(&e.path)
                )));
            }
            if off
                .checked_add(e.size)
                .is_none_or(|end| end > self.content_len)
            {
                return Err(bad(format!(
                    "entry {idx} ({}) lies outside the content",
                    String::from_utf8_lossy(&e.path)
                )));
            }
        }
        for e in index.entries.iter().enumerate() {
            let (i, e) = e;
            if e.kind == FileKind::File && e.in_boot && self.file_offset(i as u32).is_none() {
                return Err(bad(format!(
                    "boot file {} has no offset",
                    String::from_utf8_lossy(&e.path)
                )));
            }
        }
        if let Some(s) = self
            .start
            .iter()
            .find(|&&s| s as usize >= self.chunks.len())
        {
            return Err(bad(format!("start chunk {s} does not exist")));
        }
        Ok(())
    }
}
