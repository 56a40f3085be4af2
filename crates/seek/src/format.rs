//! The seek index's binary encoding (little-endian throughout), version 2:
//!
//! ```text
//! head:
//!   magic "LLSEEKIX" | version u16 = 2 | flags u16 (0)
//!   layer digest [32] | compressed size u64 | uncompressed size u64 | span u64
//!   checkpoint count u32 | file count u32
//!   file table length u32 | file table deflated length u32
//!   checkpoints: uncompressed u64 | compressed u64 | bits u8 |
//!                window length u16 | deflated length u32 | window SHA-256 [32]
//!   file table, raw-deflated: (path length u16 | path | data offset u64 | size u64)*
//!                             sorted by path
//!   SHA-256 of the head above [32]
//! windows: each checkpoint's raw-deflated window, in order, back to back
//! ```
//!
//! A reader fetches the head alone by range and then only the windows its
//! reads need. Version 1 (the windows inline in the checkpoint records, the
//! file table raw, one checksum at the end) is still decoded whole.

use sha2::{Digest as _, Sha256};

use crate::inflater::{deflate_raw, inflate_raw_bounded};
use crate::{
    Checkpoint, FileSpan, Mark, Result, SeekError, SeekHead, SeekIndex, WindowRef, WINDOW_SIZE,
};

pub const MAGIC: &[u8; 8] = b"LLSEEKIX";
pub const VERSION: u16 = 2;
/// Windows inline, one piece; written until 2026-12, still read whole.
const VERSION_1: u16 = 1;

const HEADER_LEN: usize = 8 + 2 + 2 + 32 + 8 * 3 + 4 * 4;
const V1_HEADER_LEN: usize = 8 + 2 + 2 + 32 + 8 * 3 + 4 * 2;
const MARK_LEN: usize = 8 + 8 + 1 + 2 + 4 + 32;
const MIN_CHECKPOINT_LEN: usize = 8 + 8 + 1 + 2 + 4;
const MIN_FILE_LEN: usize = 2 + 1 + 8 + 8;
const CHECKSUM_LEN: usize = 32;
/// A 32 KiB window deflates to at most this (stored blocks' overhead).
const MAX_DEFLATED_WINDOW: usize = WINDOW_SIZE + 1024;
/// Deflate's best ratio is ~1032:1: a file table that claims to inflate
/// further is a bomb, refused before anything is allocated for it.
const MAX_INFLATE_RATIO: u64 = 1032;
/// Largest file table (inflated) a reader accepts: a million long paths.
const MAX_FILE_TABLE: u64 = 256 << 20;

impl SeekIndex {
    /// Version 2: the head, then the windows. Deterministic.
    pub fn encode(&self) -> Vec<u8> {
        let windows: Vec<Vec<u8>> = self
            .checkpoints
            .iter()
            .map(|c| deflate_raw(&c.window))
            .collect();
        let mut table = Vec::new();
        for (path, f) in &self.files {
            table.extend_from_slice(&(path.len() as u16).to_le_bytes());
            table.extend_from_slice(path);
            table.extend_from_slice(&f.offset.to_le_bytes());
            table.extend_from_slice(&f.size.to_le_bytes());
        }
        let deflated_table = deflate_raw(&table);

        let mut out = Vec::new();
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&self.layer_digest);
        for v in [self.compressed_size, self.uncompressed_size, self.span] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for n in [
            self.checkpoints.len(),
            self.files.len(),
            table.len(),
            deflated_table.len(),
        ] {
            out.extend_from_slice(&(n as u32).to_le_bytes());
        }
        for (c, w) in self.checkpoints.iter().zip(&windows) {
            out.extend_from_slice(&c.uncompressed.to_le_bytes());
            out.extend_from_slice(&c.compressed.to_le_bytes());
            out.push(c.bits);
            out.extend_from_slice(&(c.window.len() as u16).to_le_bytes());
            out.extend_from_slice(&(w.len() as u32).to_le_bytes());
            out.extend_from_slice(&Sha256::digest(w));
        }
        out.extend_from_slice(&deflated_table);
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        for w in &windows {
            out.extend_from_slice(w);
        }
        out
    }

    /// Decode a whole encoded index, either version. The input is hostile:
    /// every count is bounded by the bytes left before anything is
    /// allocated for it, offsets must grow and stay inside the sizes given,
    /// windows inflate to at most 32 KiB, paths must be normalised index
    /// paths, and no byte may be left over.
    pub fn decode(data: &[u8]) -> Result<SeekIndex> {
        if version_of(data)? == VERSION_1 {
            return decode_v1(data);
        }
        let head = SeekHead::decode(data)?;
        let mut checkpoints = Vec::with_capacity(head.marks.len());
        let mut end = head.head_len;
        for (i, m) in head.marks.iter().enumerate() {
            let w = &m.window;
            let deflated = usize::try_from(w.offset)
                .ok()
                .and_then(|at| data.get(at..at + w.deflated_len as usize))
                .ok_or_else(|| bad(format!("window {i} lies beyond the index's end")))?;
            checkpoints.push(Checkpoint {
                uncompressed: m.uncompressed,
                compressed: m.compressed,
                bits: m.bits,
                window: head.inflate_window(i, deflated)?,
            });
            end = w.offset + u64::from(w.deflated_len);
        }
        if end != data.len() as u64 {
            return Err(bad(format!(
                "{} bytes after the last window",
                data.len() as u64 - end.min(data.len() as u64)
            )));
        }
        Ok(SeekIndex {
            layer_digest: head.layer_digest,
            compressed_size: head.compressed_size,
            uncompressed_size: head.uncompressed_size,
            span: head.span,
            checkpoints,
            files: head.files,
        })
    }
}

/// The length of the head of `encoded`, a version 2 index (what `optimize`
/// announces in the artifact so readers fetch just that), from its header.
pub fn head_len(encoded: &[u8]) -> Option<u64> {
    if version_of(encoded).ok()? != VERSION {
        return None;
    }
    let mut r = Reader {
        buf: encoded.get(..HEADER_LEN)?,
        pos: 8 + 2,
    };
    let f = Fixed::read(&mut r).ok()?;
    let _table_len = r.u32().ok()?;
    let len = head_len_of(f.n_cp, r.u32().ok()?);
    (len <= encoded.len() as u64).then_some(len)
}

/// Bytes of a version 2 head with `n_cp` checkpoints and a file table of
/// `table_deflated` bytes, its checksum included. Fits in u64: 32-bit
/// counts times small constants.
fn head_len_of(n_cp: u32, table_deflated: u32) -> u64 {
    HEADER_LEN as u64
        + u64::from(n_cp) * MARK_LEN as u64
        + u64::from(table_deflated)
        + CHECKSUM_LEN as u64
}

impl SeekHead {
    /// Decode the head of a version 2 index from `data`, which holds at
    /// least the head (a whole index will do: what follows is not read).
    /// Hostile input, checked as [`SeekIndex::decode`] says.
    pub fn decode(data: &[u8]) -> Result<SeekHead> {
        let version = version_of(data)?;
        if version != VERSION {
            return Err(bad(format!(
                "version {version} has no head to read alone; fetch it whole"
            )));
        }
        if data.len() < HEADER_LEN + CHECKSUM_LEN {
            return Err(bad(format!("{} bytes is shorter than a head", data.len())));
        }
        let mut r = Reader {
            buf: data,
            pos: 8 + 2,
        };
        let f = Fixed::read(&mut r)?;
        let table_len = u64::from(r.u32()?);
        let table_deflated = r.u32()?;
        let head_len = head_len_of(f.n_cp, table_deflated);
        let (n_cp, n_files) = (u64::from(f.n_cp), u64::from(f.n_files));
        let table_deflated = u64::from(table_deflated);
        if head_len > data.len() as u64 {
            return Err(bad(format!(
                "truncated: the head has {head_len} bytes, {} here",
                data.len()
            )));
        }
        let head_len_usize = head_len as usize;
        let (body, sum) = data[..head_len_usize].split_at(head_len_usize - CHECKSUM_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err(SeekError::Checksum);
        }
        if n_cp == 0 {
            return Err(bad("no checkpoint"));
        }
        let mut marks: Vec<Mark> = Vec::with_capacity(n_cp as usize);
        let mut window_at = head_len;
        for i in 0..n_cp {
            let uncompressed = r.u64()?;
            let compressed = r.u64()?;
            let bits = r.u8()?;
            let len = r.u16()?;
            let deflated_len = r.u32()?;
            let sha256: [u8; 32] = r.take(32)?.try_into().unwrap();
            let what = |m: &str| bad(format!("checkpoint {i}: {m}"));
            check_checkpoint(
                marks.last().map(|m| (m.uncompressed, m.compressed)),
                (uncompressed, compressed, bits, len as usize),
                (f.compressed_size, f.uncompressed_size),
            )
            .map_err(|m| what(&m))?;
            if deflated_len as usize > MAX_DEFLATED_WINDOW {
                return Err(what("deflated window longer than any 32 KiB window's"));
            }
            marks.push(Mark {
                uncompressed,
                compressed,
                bits,
                window: WindowRef {
                    offset: window_at,
                    deflated_len,
                    len,
                    sha256,
                },
            });
            window_at += u64::from(deflated_len);
        }
        let deflated = r.take(table_deflated as usize)?;
        if n_files * MIN_FILE_LEN as u64 > table_len
            || table_len > MAX_FILE_TABLE
            || table_len > table_deflated.saturating_mul(MAX_INFLATE_RATIO) + 64
        {
            return Err(bad(format!(
                "a file table of {table_len} bytes ({table_deflated} deflated) for {n_files} files"
            )));
        }
        let table = inflate_raw_bounded(deflated, table_len as usize)
            .filter(|t| t.len() as u64 == table_len)
            .ok_or_else(|| bad("the file table does not inflate to its length"))?;
        let mut t = Reader {
            buf: &table,
            pos: 0,
        };
        let files = read_files(&mut t, n_files as usize, f.uncompressed_size)?;
        if t.left() != 0 {
            return Err(bad(format!("{} bytes after the last file", t.left())));
        }
        Ok(SeekHead {
            layer_digest: f.layer_digest,
            compressed_size: f.compressed_size,
            uncompressed_size: f.uncompressed_size,
            span: f.span,
            head_len,
            marks,
            files,
        })
    }
}

/// A window's deflated bytes, inflated to exactly `len` bytes.
pub(crate) fn inflate_window(deflated: &[u8], len: usize) -> Option<Vec<u8>> {
    if len > WINDOW_SIZE {
        return None;
    }
    inflate_raw_bounded(deflated, len).filter(|w| w.len() == len)
}

/// The version of an encoded index, after its magic.
fn version_of(data: &[u8]) -> Result<u16> {
    if data.len() < 10 {
        return Err(bad(format!(
            "{} bytes is shorter than a header",
            data.len()
        )));
    }
    if &data[..8] != MAGIC {
        return Err(bad("not a lazylayer seek index (bad magic)"));
    }
    let v = u16::from_le_bytes([data[8], data[9]]);
    if v != VERSION && v != VERSION_1 {
        return Err(bad(format!(
            "version {v}; this build reads versions {VERSION_1} and {VERSION}"
        )));
    }
    Ok(v)
}

/// A checkpoint's place against the previous one and the layer's sizes.
fn check_checkpoint(
    prev: Option<(u64, u64)>,
    (uncompressed, compressed, bits, window_len): (u64, u64, u8, usize),
    (compressed_size, uncompressed_size): (u64, u64),
) -> std::result::Result<(), String> {
    if bits > 7 || (bits > 0 && compressed == 0) {
        return Err("bad bit offset".into());
    }
    if compressed >= compressed_size || uncompressed > uncompressed_size {
        return Err("beyond the blob".into());
    }
    match prev {
        Some((u, c)) if compressed <= c || uncompressed <= u => {
            return Err("offsets do not grow".into())
        }
        None if uncompressed != 0 => return Err("the first checkpoint is not at the start".into()),
        _ => {}
    }
    if window_len > WINDOW_SIZE || window_len as u64 > uncompressed {
        return Err("window longer than 32 KiB or than the data before it".into());
    }
    Ok(())
}

/// `n` file records: normalised paths, sorted, unique, inside the tar.
fn read_files(
    r: &mut Reader<'_>,
    n: usize,
    uncompressed_size: u64,
) -> Result<Vec<(Vec<u8>, FileSpan)>> {
    if n > r.left() / MIN_FILE_LEN {
        return Err(bad(format!("{n} files cannot fit in {} bytes", r.left())));
    }
    let mut files: Vec<(Vec<u8>, FileSpan)> = Vec::with_capacity(n);
    for i in 0..n {
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
    Ok(files)
}

/// Version 1: header, checkpoints with their windows inline, the raw file
/// table, one checksum over all of it.
fn decode_v1(data: &[u8]) -> Result<SeekIndex> {
    if data.len() < V1_HEADER_LEN + CHECKSUM_LEN {
        return Err(bad(format!(
            "{} bytes is shorter than a header",
            data.len()
        )));
    }
    let (body, sum) = data.split_at(data.len() - CHECKSUM_LEN);
    if Sha256::digest(body).as_slice() != sum {
        return Err(SeekError::Checksum);
    }
    let mut r = Reader {
        buf: body,
        pos: 8 + 2,
    };
    let f = Fixed::read(&mut r)?;
    let (n_cp, n_files) = (f.n_cp as usize, f.n_files as usize);
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
        check_checkpoint(
            checkpoints.last().map(|c| (c.uncompressed, c.compressed)),
            (uncompressed, compressed, bits, window_len),
            (f.compressed_size, f.uncompressed_size),
        )
        .map_err(|m| what(&m))?;
        let window = inflate_window(deflated, window_len)
            .ok_or_else(|| what("window does not inflate to its length"))?;
        checkpoints.push(Checkpoint {
            uncompressed,
            compressed,
            bits,
            window,
        });
    }
    let files = read_files(&mut r, n_files, f.uncompressed_size)?;
    if r.left() != 0 {
        return Err(bad(format!("{} bytes after the last file", r.left())));
    }
    Ok(SeekIndex {
        layer_digest: f.layer_digest,
        compressed_size: f.compressed_size,
        uncompressed_size: f.uncompressed_size,
        span: f.span,
        checkpoints,
        files,
    })
}

/// The header fields both versions share, after magic and version.
struct Fixed {
    layer_digest: [u8; 32],
    compressed_size: u64,
    uncompressed_size: u64,
    span: u64,
    n_cp: u32,
    n_files: u32,
}

impl Fixed {
    fn read(r: &mut Reader<'_>) -> Result<Fixed> {
        if r.u16()? != 0 {
            return Err(bad("unknown flags"));
        }
        Ok(Fixed {
            layer_digest: r.take(32)?.try_into().unwrap(),
            compressed_size: r.u64()?,
            uncompressed_size: r.u64()?,
            span: r.u64()?,
            n_cp: r.u32()?,
            n_files: r.u32()?,
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
