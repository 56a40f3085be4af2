//! The seek index's binary encoding (little-endian throughout):
//!
//! ```text
//! magic "LLSEEKIX" | version u16 | flags u16 (0)
//! layer digest [32] | compressed size u64 | uncompressed size u64 | span u64
//! checkpoint count u32 | file count u32
//! checkpoints: uncompressed u64 | compressed u64 | bits u8 |
//!              window length u16 | deflated length u32 | raw-deflated window
//! files (sorted by path): path length u16 | path | data offset u64 | size u64
//! SHA-256 of everything above [32]
//! ```

use sha2::{Digest as _, Sha256};

use crate::inflater::{deflate_raw, inflate_raw_bounded};
use crate::{Checkpoint, FileSpan, Result, SeekError, SeekIndex, WINDOW_SIZE};

pub const MAGIC: &[u8; 8] = b"LLSEEKIX";
pub const VERSION: u16 = 1;

const HEADER_LEN: usize = 8 + 2 + 2 + 32 + 8 * 3 + 4 * 2;
const MIN_CHECKPOINT_LEN: usize = 8 + 8 + 1 + 2 + 4;
const MIN_FILE_LEN: usize = 2 + 1 + 8 + 8;
const CHECKSUM_LEN: usize = 32;

impl SeekIndex {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.layer_digest);
        for v in [self.compressed_size, self.uncompressed_size, self.span] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&(self.checkpoints.len() as u32).to_le_bytes());
        out.extend_from_slice(&(self.files.len() as u32).to_le_bytes());
        for c in &self.checkpoints {
            out.extend_from_slice(&c.uncompressed.to_le_bytes());
            out.extend_from_slice(&c.compressed.to_le_bytes());
            out.push(c.bits);
            out.extend_from_slice(&(c.window.len() as u16).to_le_bytes());
            let w = deflate_raw(&c.window);
            out.extend_from_slice(&(w.len() as u32).to_le_bytes());
            out.extend_from_slice(&w);
        }
        for (path, f) in &self.files {
            out.extend_from_slice(&(path.len() as u16).to_le_bytes());
            out.extend_from_slice(path);
            out.extend_from_slice(&f.offset.to_le_bytes());
            out.extend_from_slice(&f.size.to_le_bytes());
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Decode an encoded index. The input is hostile: every count is bounded
    /// by the bytes left before anything is allocated for it, offsets must
    /// grow and stay inside the sizes given, windows inflate to at most
    /// 32 KiB, paths must be normalised index paths.
    pub fn decode(data: &[u8]) -> Result<SeekIndex> {
        if data.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than a header",
                data.len()
            )));
        }
        if &data[..8] != MAGIC {
            return Err(bad("not a lazylayer seek index (bad magic)"));
        }
        let (body, sum) = data.split_at(data.len() - CHECKSUM_LEN);
        let mut r = Reader { buf: body, pos: 8 };
        let version = r.u16()?;
        if version != VERSION {
            return Err(bad(format!(
                "version {version}; this build reads version {VERSION}"
            )));
        }
        if Sha256::digest(body).as_slice() != sum {
            return Err(SeekError::Checksum);
        }
        if r.u16()? != 0 {
            return Err(bad("unknown flags"));
        }
        let layer_digest: [u8; 32] = r.take(32)?.try_into().unwrap();
        let compressed_size = r.u64()?;
        let uncompressed_size = r.u64()?;
        let span = r.u64()?;
        let n_cp = r.u32()? as usize;
        let n_files = r.u32()? as usize;
        if n_cp == 0 {
            return Err(bad("no checkpoint"));
        }
        if n_cp > r.left() / MIN_CHECKPOINT_LEN {
            return Err(bad(format!(
                "{n_cp} checkpoints cannot fit in {} bytes",
                r.left()
            )));
        }
        let mut checkpoints: Vec<Checkpoint> = Vec::with_capacity(n_cp);
        for i in 0..n_cp {
            let uncompressed = r.u64()?;
            let compressed = r.u64()?;
            let bits = r.u8()?;
            let window_len = r.u16()? as usize;
            let deflated_len = r.u32()? as usize;
            let deflated = r.take(deflated_len)?;
            let what = |m: &str| bad(format!("checkpoint {i}: {m}"));
            if bits > 7 || (bits > 0 && compressed == 0) {
                return Err(what("bad bit offset"));
            }
            if compressed >= compressed_size || uncompressed > uncompressed_size {
                return Err(what("beyond the blob"));
            }
            if let Some(prev) = checkpoints.last() {
                if compressed <= prev.compressed || uncompressed <= prev.uncompressed {
                    return Err(what("offsets do not grow"));
                }
            } else if uncompressed != 0 {
                return Err(what("the first checkpoint is not at the start"));
            }
            if window_len > WINDOW_SIZE || window_len as u64 > uncompressed {
                return Err(what("window longer than 32 KiB or than the data before it"));
            }
            let window = inflate_raw_bounded(deflated, window_len)
                .filter(|w| w.len() == window_len)
                .ok_or_else(|| what("window does not inflate to its length"))?;
            checkpoints.push(Checkpoint {
                uncompressed,
                compressed,
                bits,
                window,
            });
        }
        if n_files > r.left() / MIN_FILE_LEN {
            return Err(bad(format!(
                "{n_files} files cannot fit in {} bytes",
                r.left()
            )));
        }
        let mut files: Vec<(Vec<u8>, FileSpan)> = Vec::with_capacity(n_files);
        for i in 0..n_files {
            let len = r.u16()? as usize;
            let path = r.take(len)?.to_vec();
            let offset = r.u64()?;
            let size = r.u64()?;
            let shown = String::from_utf8_lossy(&path).into_owned();
            let valid = lazylayer_layer::normalize(&path)
                .is_ok_and(|p| p.as_os_str().as_encoded_bytes() == path.as_slice());
            if !valid {
                return Err(bad(format!("file {i}: bad path {shown:?}")));
            }
            if files.last().is_some_and(|(p, _)| *p >= path) {
                return Err(bad(format!("file {i}: {shown:?} out of order or repeated")));
            }
            if offset
                .checked_add(size)
                .is_none_or(|end| end > uncompressed_size)
            {
                return Err(bad(format!("file {i}: {shown:?} beyond the tar's end")));
            }
            files.push((path, FileSpan { offset, size }));
        }
        if r.left() != 0 {
            return Err(bad(format!("{} bytes after the last file", r.left())));
        }
        Ok(SeekIndex {
            layer_digest,
            compressed_size,
            uncompressed_size,
            span,
            checkpoints,
            files,
        })
    }
}

fn bad(m: impl Into<String>) -> SeekError {
    SeekError::Decode(m.into())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(bad(format!(
                "truncated: {n} bytes wanted at offset {}, {} left",
                self.pos,
                self.left()
            )));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
}
