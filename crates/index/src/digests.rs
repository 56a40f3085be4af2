//! The content digests of files outside the boot layer, kept apart from the
//! index (format version 5).
//!
//! Only a read of an untraced file needs its digest (to check bytes taken
//! from a layer still streaming, or from a ranged span), never a start; yet
//! SHA-256s do not compress, and they were most of the index region a start
//! fetches before anything else (python3: 6,038 digests, 193 KB of a 347 KB
//! region). So a chunked boot layer may carry them in a file of their own,
//! [`DIGESTS_FILE_NAME`], whose entries open the boot content tar (fetched
//! like boot file bytes: by chunks, after the start set, or when a read
//! first needs one). The index keeps which entries have a digest (their
//! flag), how many content bytes the file's entries take, and the file's
//! SHA-256, so the file is checked whole before any digest in it is used.
//!
//! The file: the magic [`DIGESTS_MAGIC`], then one 32-byte SHA-256 per entry
//! flagged as having a digest, in entry order. Nothing else.

use sha2::{Digest, Sha256};

use crate::{BootIndex, IndexError};

/// Name of the digests file at the root of a boot layer (format 5). A
/// `.wh..wh.` name, like the index's, so no runtime materialises it.
pub const DIGESTS_FILE_NAME: &str = ".wh..wh.lazylayer.digests.v1";

/// First bytes of the digests file.
pub const DIGESTS_MAGIC: [u8; 8] = *b"LLDIGST\0";

/// Where an index keeps its files' digests when they are not inline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalDigests {
    /// Bytes at the start of the boot content tar that hold the digests
    /// file's entries (a multiple of 512, within the content).
    pub tar_len: u64,
    /// SHA-256 of the digests file.
    pub sha256: [u8; 32],
    /// The entries it holds a digest for, ascending: those whose record
    /// carries the digest flag.
    pub entries: Vec<u32>,
}

impl ExternalDigests {
    /// Length the digests file must have.
    pub fn file_len(&self) -> u64 {
        DIGESTS_MAGIC.len() as u64 + self.entries.len() as u64 * 32
    }

    /// Most content bytes the file's entries may take: each byte of it at
    /// most three in the headers (escaped), plus the headers themselves. A
    /// reader allocates no more than this for them.
    pub fn max_tar_len(&self) -> u64 {
        let n = self.file_len();
        3 * n + 4096 * (n / 65536 + 2)
    }

    /// Whether entry `idx` has a digest in the file.
    pub fn holds(&self, idx: u32) -> bool {
        self.entries.binary_search(&idx).is_ok()
    }

    /// The digests file checked against the index: its SHA-256, its length
    /// and its magic.
    pub fn table(&self, file: &[u8]) -> Result<DigestTable, IndexError> {
        let bad = |what: String| IndexError::Invalid {
            what: format!("digests file: {what}"),
        };
        if file.len() as u64 != self.file_len() {
            return Err(bad(format!(
                "{} bytes, the index says {}",
                file.len(),
                self.file_len()
            )));
        }
        if Sha256::digest(file).as_slice() != self.sha256 {
            return Err(bad("its SHA-256 is not the one the index names".into()));
        }
        if file[..DIGESTS_MAGIC.len()] != DIGESTS_MAGIC {
            return Err(bad("bad magic".into()));
        }
        let digests = file[DIGESTS_MAGIC.len()..]
            .chunks_exact(32)
            .map(|d| {
                let mut a = [0u8; 32];
                a.copy_from_slice(d);
                a
            })
            .collect();
        Ok(DigestTable {
            entries: self.entries.clone(),
            digests,
        })
    }
}

/// The digests of an index's files, checked: entry → SHA-256.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestTable {
    entries: Vec<u32>,
    digests: Vec<[u8; 32]>,
}

impl DigestTable {
    pub fn get(&self, idx: u32) -> Option<[u8; 32]> {
        let at = self.entries.binary_search(&idx).ok()?;
        Some(self.digests[at])
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl BootIndex {
    /// The digests file for this index's inline digests; None when no entry
    /// has one.
    pub fn digest_file(&self) -> Option<Vec<u8>> {
        let mut out = DIGESTS_MAGIC.to_vec();
        for e in &self.entries {
            if let Some(d) = &e.digest {
                out.extend_from_slice(d);
            }
        }
        (out.len() > DIGESTS_MAGIC.len()).then_some(out)
    }

    /// Move the digests out of the entries into the file
    /// [`BootIndex::digest_file`] gave, whose entries take `tar_len` bytes at
    /// the start of the boot content. The index then encodes as format 5;
    /// it needs a boot content section to encode at all.
    pub fn move_digests_out(&mut self, tar_len: u64) {
        let Some(file) = self.digest_file() else {
            return;
        };
        let mut entries = Vec::new();
        for (i, e) in self.entries.iter_mut().enumerate() {
            if e.digest.take().is_some() {
                entries.push(i as u32);
            }
        }
        self.external = Some(ExternalDigests {
            tar_len,
            sha256: Sha256::digest(&file).into(),
            entries,
        });
    }
}
