//! Chunked layers: a tar stream compressed as independent pieces (gzip
//! members or zstd frames), so that a reader holding a table of the pieces
//! can fetch and decompress any one of them alone. Every gzip and zstd
//! decoder reads concatenated members/frames as one stream, so to a runtime
//! the blob is an ordinary `tar+gzip` / `tar+zstd` layer.

use std::io::{self, Read, Write};
use std::path::Path;

use sha2::{Digest as _, Sha256};

use crate::{Compression, LayerError, LayerWriter};
use lazylayer_index::chunks::{Chunk, ChunkCompression};

/// gzip -9: chunks are compressed once, at optimize, and fetched at every
/// cold start; the level costs nothing at read time.
const GZIP_LEVEL: u32 = 9;
/// zstd -19 (not --ultra): a 8 MiB window at most, cheap to decode.
const ZSTD_LEVEL: i32 = 19;
/// "Unknown" OS in the gzip header, as the layer writer writes it.
const GZIP_OS_UNKNOWN: u8 = 255;

impl From<ChunkCompression> for Compression {
    fn from(c: ChunkCompression) -> Compression {
        match c {
            ChunkCompression::Gzip => Compression::Gzip,
            ChunkCompression::Zstd => Compression::Zstd,
        }
    }
}

/// Compress `data` as one self-contained member (gzip) or frame (zstd).
pub fn compress_piece(data: &[u8], c: ChunkCompression) -> io::Result<Vec<u8>> {
    match c {
        ChunkCompression::Gzip => {
            let mut enc = flate2::GzBuilder::new()
                .mtime(0)
                .operating_system(GZIP_OS_UNKNOWN)
                .write(
                    Vec::with_capacity(data.len() / 2),
                    flate2::Compression::new(GZIP_LEVEL),
                );
            enc.write_all(data)?;
            enc.finish()
        }
        ChunkCompression::Zstd => zstd::bulk::compress(data, ZSTD_LEVEL),
    }
}

thread_local! {
    static ZSTD_CONTEXT: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decompress one piece that must hold exactly `expected_len` bytes. Never
/// produces more than that (a hostile piece cannot inflate past it), and a
/// piece with trailing data or fewer bytes is an error.
pub fn decompress_piece(
    compressed: &[u8],
    c: ChunkCompression,
    expected_len: usize,
) -> Result<Vec<u8>, LayerError> {
    let err = |source: io::Error| LayerError::Decoder {
        compression: c.into(),
        source,
    };
    let mut out = Vec::with_capacity(expected_len);
    match c {
        ChunkCompression::Gzip => {
            // Single member: bytes after it are not this chunk's.
            let mut d = flate2::bufread::GzDecoder::new(compressed);
            d.by_ref()
                .take(expected_len as u64 + 1)
                .read_to_end(&mut out)
                .map_err(err)?;
            if !d.into_inner().is_empty() {
                return Err(err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "data after the chunk's gzip member",
                )));
            }
        }
        ChunkCompression::Zstd => {
            // Exactly one frame: bytes after it are not this chunk's.
            match zstd::zstd_safe::find_frame_compressed_size(compressed) {
                Ok(n) if n == compressed.len() => {}
                _ => {
                    return Err(err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the chunk is not exactly one zstd frame",
                    )))
                }
            }
            // One decompression context per thread, reused: creating one
            // per chunk (~100 KB zeroed) was most of a start's decompression
            // time. The output is bounded by its capacity (a frame that
            // holds more fails), the window as the stream decoder's was.
            ZSTD_CONTEXT
                .with(|cell| {
                    let mut cell = cell.borrow_mut();
                    if cell.is_none() {
                        let mut d = zstd::bulk::Decompressor::new()?;
                        d.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(23))?;
                        *cell = Some(d);
                    }
                    let d = cell.as_mut().expect("set above");
                    d.decompress_to_buffer(compressed, &mut out)
                })
                .map_err(err)?;
        }
    }
    if out.len() != expected_len {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("chunk holds {} bytes, {expected_len} expected", out.len()),
        )));
    }
    Ok(out)
}

/// Decompress one piece of unknown length, refusing more than `max` bytes.
pub fn decompress_bounded(
    compressed: &[u8],
    c: ChunkCompression,
    max: u64,
) -> Result<Vec<u8>, LayerError> {
    let err = |source: io::Error| LayerError::Decoder {
        compression: c.into(),
        source,
    };
    let mut out = Vec::new();
    crate::decoder(compressed, c.into())?
        .take(max + 1)
        .read_to_end(&mut out)
        .map_err(err)?;
    if out.len() as u64 > max {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("decompresses to more than {max} bytes"),
        )));
    }
    Ok(out)
}

/// Compress a tar stream read from `tar` in pieces of `chunk_size`
/// uncompressed bytes into `out`; feed the uncompressed bytes to `diff` (the
/// layer's diff_id hasher). Returns the pieces' table and the stream length.
pub fn compress_chunks(
    tar: &mut dyn Read,
    chunk_size: u32,
    c: ChunkCompression,
    out: &mut dyn Write,
    diff: &mut Sha256,
) -> io::Result<(Vec<Chunk>, u64)> {
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; chunk_size as usize];
    let mut total = 0u64;
    loop {
        let mut n = 0;
        while n < buf.len() {
            match tar.read(&mut buf[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if n == 0 {
            break;
        }
        diff.update(&buf[..n]);
        total += n as u64;
        let piece = compress_piece(&buf[..n], c)?;
        out.write_all(&piece)?;
        chunks.push(Chunk {
            compressed_len: piece.len() as u32,
            sha256: Sha256::digest(&piece).into(),
        });
        if n < buf.len() {
            break;
        }
    }
    Ok((chunks, total))
}

/// The tar bytes (headers, data, padding; no end-of-archive blocks) of one
/// regular file owned by root: a piece to put in front of another tar stream.
pub fn file_entry_tar(
    rel: &Path,
    mode: u32,
    mtime: u64,
    data: &[u8],
) -> Result<Vec<u8>, LayerError> {
    let mut w = LayerWriter::new(Vec::with_capacity(data.len() + 2048), Compression::None);
    w.append_bytes(rel, mode, mtime, data)?;
    let (_, mut tar) = w.finish_into_inner()?;
    // finish() ends the archive with exactly two zero blocks.
    tar.truncate(tar.len() - 1024);
    Ok(tar)
}

/// The tar entries (no end-of-archive marker) of a metadata entry `rel`
/// carrying `data` in its headers ([`LayerWriter::append_metadata`]).
pub fn metadata_entry_tar(
    rel: &Path,
    mode: u32,
    mtime: u64,
    data: &[u8],
) -> Result<Vec<u8>, LayerError> {
    let mut w = LayerWriter::new(
        Vec::with_capacity(data.len() * 4 / 3 + 4096),
        Compression::None,
    );
    w.append_metadata(rel, mode, mtime, data)?;
    let (_, mut tar) = w.finish_into_inner()?;
    tar.truncate(tar.len() - 1024);
    Ok(tar)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<u8> {
        (0..n)
            .map(|i| ((i * 7919) % 251) as u8 ^ (i / 1000) as u8)
            .collect()
    }

    #[test]
    fn pieces_decompress_alone_and_as_one_stream() {
        for c in [ChunkCompression::Gzip, ChunkCompression::Zstd] {
            let data = sample(300_000);
            let mut blob = Vec::new();
            let mut h = Sha256::new();
            let (chunks, total) =
                compress_chunks(&mut &data[..], 65536, c, &mut blob, &mut h).unwrap();
            assert_eq!(total, data.len() as u64);
            assert_eq!(chunks.len(), 5);
            assert_eq!(h.finalize().as_slice(), Sha256::digest(&data).as_slice());
            // Each piece alone.
            let mut at = 0usize;
            for (i, ch) in chunks.iter().enumerate() {
                let piece = &blob[at..at + ch.compressed_len as usize];
                assert_eq!(Sha256::digest(piece).as_slice(), ch.sha256);
                let want = &data[i * 65536..((i + 1) * 65536).min(data.len())];
                assert_eq!(decompress_piece(piece, c, want.len()).unwrap(), want);
                // A wrong expected length is an error, never a short or long chunk.
                assert!(decompress_piece(piece, c, want.len() - 1).is_err());
                assert!(decompress_piece(piece, c, want.len() + 1).is_err());
                at += ch.compressed_len as usize;
            }
            // The whole blob, as a runtime reads it.
            let mut all = Vec::new();
            crate::decoder(&blob[..], c.into())
                .unwrap()
                .read_to_end(&mut all)
                .unwrap();
            assert_eq!(all, data);
            // Two pieces given as one, or a cut piece: errors.
            let two = &blob[..(chunks[0].compressed_len + chunks[1].compressed_len) as usize];
            assert!(decompress_piece(two, c, 65536).is_err());
            let cut = &blob[..chunks[0].compressed_len as usize - 3];
            assert!(decompress_piece(cut, c, 65536).is_err());
        }
    }

    #[test]
    fn file_entry_tar_is_a_prefix_a_tar_reader_accepts() {
        let data = sample(1000);
        let mut tar = file_entry_tar(Path::new(".wh..wh.x"), 0o444, 0, &data).unwrap();
        assert_eq!(tar.len() % 512, 0);
        assert!(tar.len() >= 512 + 1000);
        tar.extend_from_slice(&[0; 1024]);
        let mut a = tar::Archive::new(&tar[..]);
        let mut e = a.entries().unwrap().next().unwrap().unwrap();
        assert_eq!(&*e.path_bytes(), b".wh..wh.x");
        let mut got = Vec::new();
        e.read_to_end(&mut got).unwrap();
        assert_eq!(got, data);
    }
}
