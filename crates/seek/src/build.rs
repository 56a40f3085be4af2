//! Building a seek index: one pass of inflate over the blob, checkpoints at
//! block boundaries, a tar walk over the output.

use std::io::{self, BufReader, Read};

use sha2::{Digest as _, Sha256};
use zlib_rs::{InflateFlush, ReturnCode};

use crate::inflater::{RawInflater, AT_BLOCK_BOUNDARY, BUFFERED_BITS, LAST_BLOCK};
use crate::{Checkpoint, FileSpan, Result, SeekError, SeekIndex, WINDOW_SIZE};

impl SeekIndex {
    /// Index the gzip layer blob `blob` reads, with a checkpoint about every
    /// `span` compressed bytes. `layer_digest` is the SHA-256 of the bytes
    /// read (the caller compares it with the layer's digest).
    ///
    /// Single-member gzip only (what every image builder writes): a second
    /// member is refused with [`SeekError::MultiMember`]; zero padding after
    /// the member is accepted.
    pub fn build(blob: impl Read, span: u64) -> Result<SeekIndex> {
        let mut gz = GzipIndexer::new(blob, span.max(1))?;
        let files = lazylayer_layer::data_spans(BufReader::with_capacity(64 * 1024, &mut gz))
            .map_err(tar_err)?;
        // The tar's end marker may come before the gzip member's end: read
        // to the end so the trailer (CRC, size) and the digest are checked.
        io::copy(&mut gz, &mut io::sink()).map_err(tar_err)?;
        let mut files: Vec<(Vec<u8>, FileSpan)> = files.into_iter().collect();
        files.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(SeekIndex {
            layer_digest: gz.hasher.finalize().into(),
            compressed_size: gz.consumed,
            uncompressed_size: gz.out_total,
            span,
            checkpoints: gz.checkpoints,
            files,
        })
    }
}

/// A tar entry error: the indexer's own errors travel inside io::Error.
fn tar_err(e: io::Error) -> SeekError {
    match e.get_ref().and_then(|i| i.downcast_ref::<Wrapped>()) {
        Some(_) => {
            let inner = e.into_inner().expect("checked above");
            *inner.downcast::<Wrapped>().expect("checked above").0
        }
        None => SeekError::Tar(e),
    }
}

#[derive(Debug)]
struct Wrapped(Box<SeekError>);
impl std::fmt::Display for Wrapped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
impl std::error::Error for Wrapped {}

fn wrap(e: SeekError) -> io::Error {
    io::Error::other(Wrapped(Box::new(e)))
}

/// `.wh.NAME` deletes NAME and `.wh..wh..opq` marks an opaque directory:
/// neither is a file of the image (other `.wh..wh.` names are plain files).
/// Inflates a gzip blob as a `Read` of its uncompressed bytes, recording
/// checkpoints as it goes.
struct GzipIndexer<R> {
    input: R,
    inbuf: Vec<u8>,
    in_pos: usize,
    in_len: usize,
    /// Blob bytes handed to the inflater (or the header/trailer parser).
    consumed: u64,
    hasher: Sha256,
    inflater: RawInflater,
    span: u64,
    out_total: u64,
    /// The last output bytes, at least WINDOW_SIZE once there are that many.
    history: Vec<u8>,
    crc: u32,
    checkpoints: Vec<Checkpoint>,
    done: bool,
}

impl<R: Read> GzipIndexer<R> {
    fn new(input: R, span: u64) -> Result<Self> {
        let mut me = GzipIndexer {
            input,
            inbuf: vec![0; 64 * 1024],
            in_pos: 0,
            in_len: 0,
            consumed: 0,
            hasher: Sha256::new(),
            inflater: RawInflater::new(),
            span,
            out_total: 0,
            history: Vec::with_capacity(2 * WINDOW_SIZE),
            crc: 0,
            checkpoints: Vec::new(),
            done: false,
        };
        me.gzip_header()?;
        // Raw inflate starts inside the first block header without a stop:
        // the first checkpoint is the start of the deflate data.
        me.checkpoints.push(Checkpoint {
            uncompressed: 0,
            compressed: me.consumed,
            bits: 0,
            window: Vec::new(),
        });
        Ok(me)
    }

    /// Refill the input buffer; false at the blob's end.
    fn fill(&mut self) -> Result<bool> {
        if self.in_pos < self.in_len {
            return Ok(true);
        }
        let n = loop {
            match self.input.read(&mut self.inbuf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(SeekError::Read(e)),
            }
        };
        self.hasher.update(&self.inbuf[..n]);
        self.in_pos = 0;
        self.in_len = n;
        Ok(n > 0)
    }

    fn byte(&mut self) -> Result<Option<u8>> {
        if !self.fill()? {
            return Ok(None);
        }
        let b = self.inbuf[self.in_pos];
        self.in_pos += 1;
        self.consumed += 1;
        Ok(Some(b))
    }

    fn need_byte(&mut self, what: &str) -> Result<u8> {
        self.byte()?
            .ok_or_else(|| SeekError::NotGzip(format!("the blob ends in the gzip {what}")))
    }

    /// RFC 1952 member header.
    fn gzip_header(&mut self) -> Result<()> {
        let mut fixed = [0u8; 10];
        for b in fixed.iter_mut() {
            *b = self.need_byte("header")?;
        }
        if fixed[0..2] != [0x1f, 0x8b] {
            return Err(SeekError::NotGzip("no gzip magic".into()));
        }
        if fixed[2] != 8 {
            return Err(SeekError::NotGzip(format!(
                "compression method {} (only deflate, 8, exists)",
                fixed[2]
            )));
        }
        let flags = fixed[3];
        if flags & 0xe0 != 0 {
            return Err(SeekError::NotGzip(format!(
                "reserved header flags {flags:#x}"
            )));
        }
        if flags & 0x04 != 0 {
            let lo = self.need_byte("extra field")?;
            let hi = self.need_byte("extra field")?;
            for _ in 0..u16::from_le_bytes([lo, hi]) {
                self.need_byte("extra field")?;
            }
        }
        for flag in [0x08u8, 0x10] {
            // FNAME, FCOMMENT: zero-terminated.
            if flags & flag != 0 {
                while self.need_byte("file name or comment")? != 0 {}
            }
        }
        if flags & 0x02 != 0 {
            self.need_byte("header CRC")?;
            self.need_byte("header CRC")?;
        }
        Ok(())
    }

    /// After the deflate stream: CRC-32 and size, then nothing but zeros.
    fn trailer(&mut self) -> Result<()> {
        let mut t = [0u8; 8];
        for b in t.iter_mut() {
            *b = self.need_byte("trailer")?;
        }
        let crc = u32::from_le_bytes(t[0..4].try_into().unwrap());
        let isize = u32::from_le_bytes(t[4..8].try_into().unwrap());
        if crc != self.crc || isize != self.out_total as u32 {
            return Err(SeekError::Corrupt {
                at: self.consumed,
                reason: "the gzip trailer's CRC-32 or size does not match the data".into(),
            });
        }
        let at = self.consumed;
        match self.byte()? {
            None => Ok(()),
            Some(0x1f) => Err(SeekError::MultiMember { at }),
            Some(0) => {
                while let Some(b) = self.byte()? {
                    if b != 0 {
                        return Err(SeekError::NotGzip(format!(
                            "data after the gzip member at byte {}",
                            self.consumed - 1
                        )));
                    }
                }
                Ok(())
            }
            Some(_) => Err(SeekError::NotGzip(format!(
                "data after the gzip member at byte {at}"
            ))),
        }
    }

    fn remember(&mut self, out: &[u8]) {
        self.crc = zlib_rs::crc32::crc32(self.crc, out);
        self.history.extend_from_slice(out);
        if self.history.len() > 2 * WINDOW_SIZE {
            let cut = self.history.len() - WINDOW_SIZE;
            self.history.drain(..cut);
        }
    }

    fn maybe_checkpoint(&mut self, data_type: i32) {
        if data_type & AT_BLOCK_BOUNDARY == 0 || data_type & LAST_BLOCK != 0 {
            return;
        }
        let last = self.checkpoints.last().expect("the first is pushed in new");
        if self.consumed - last.compressed < self.span || self.out_total == last.uncompressed {
            return;
        }
        // Bits inflate holds but has not used are not part of the block before.
        let pos = self.consumed * 8 - (data_type & BUFFERED_BITS) as u64;
        let compressed = pos.div_ceil(8);
        let keep = self.history.len().min(WINDOW_SIZE);
        self.checkpoints.push(Checkpoint {
            uncompressed: self.out_total,
            compressed,
            bits: (compressed * 8 - pos) as u8,
            window: self.history[self.history.len() - keep..].to_vec(),
        });
    }

    fn read_inner(&mut self, buf: &mut [u8]) -> Result<usize> {
        loop {
            if self.done || buf.is_empty() {
                return Ok(0);
            }
            if !self.fill()? {
                return Err(SeekError::Corrupt {
                    at: self.consumed,
                    reason: "the blob ends inside the deflate stream".into(),
                });
            }
            let step = self.inflater.inflate(
                &self.inbuf[self.in_pos..self.in_len],
                buf,
                InflateFlush::Block,
            );
            self.in_pos += step.consumed;
            self.consumed += step.consumed as u64;
            self.remember(&buf[..step.produced]);
            self.out_total += step.produced as u64;
            match step.code {
                ReturnCode::Ok | ReturnCode::BufError => self.maybe_checkpoint(step.data_type),
                ReturnCode::StreamEnd => {
                    self.done = true;
                    self.trailer()?;
                }
                rc => {
                    return Err(SeekError::Corrupt {
                        at: self.consumed,
                        reason: format!("inflate: {rc:?}"),
                    })
                }
            }
            if step.produced > 0 {
                return Ok(step.produced);
            }
        }
    }
}

impl<R: Read> Read for GzipIndexer<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_inner(buf).map_err(wrap)
    }
}
