//! Writing the boot layer: the selected entries copied from the merged view
//! of SRC (so a runtime that applies every layer gets the very same root),
//! behind the index, as a chunked layer (see `lazylayer_index::chunks`): the
//! index region first, then the content in independently compressed chunks,
//! in first-access order, so a start fetches the index and then only the
//! chunks the traced workload read.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use lazylayer_fs::TraceRead;
use lazylayer_index::chunks::{BootContent, ChunkCompression};
use lazylayer_index::{BootIndex, FileKind, DIGESTS_FILE_NAME, INDEX_FILE_NAME};
use lazylayer_layer::chunked::{compress_chunks, compress_piece, metadata_entry_tar};
use lazylayer_layer::{Compression, DataSpan, LayerDigests, LayerWriter};
use lazylayer_sys::{sha256_digest, sha256_digest_of};
use sha2::{Digest as _, Sha256};

use crate::OptimizeError;

/// How the boot layer's content is cut and compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    /// Uncompressed bytes per chunk.
    pub chunk_size: u32,
    pub compression: ChunkCompression,
}

impl Default for BootLayout {
    /// Measured on the python3 image (docs/boot-layer.md): 8 KiB zstd
    /// chunks fetch the least before the start (4.08 MB; 16 KiB: 4.25 MB),
    /// and started python3 at 10 Mbit/s in 3.62 s (16 KiB: 3.72 s).
    fn default() -> Self {
        BootLayout {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: ChunkCompression::Zstd,
        }
    }
}

pub const DEFAULT_CHUNK_SIZE: u32 = 8 << 10;

/// Facts about a written boot layer.
#[derive(Debug, Clone)]
pub struct BootLayer {
    pub digests: LayerDigests,
    /// Entries copied (files, dirs, links), not counting the index.
    pub entries: usize,
    /// Bytes of regular-file content copied.
    pub file_bytes: u64,
    /// Bytes of the encoded index (uncompressed).
    pub index_bytes: u64,
    pub layout: BootLayout,
    /// Compressed length and digest of the index region at the blob's start.
    pub region: (u64, String),
    /// Files whose digests the boot content's digests file holds, and the
    /// bytes of its entries (uncompressed).
    pub file_digests: (usize, u64),
    pub chunks: usize,
    pub start_chunks: usize,
    /// What a lazy start fetches before anything else: the index region and
    /// the chunks the trace read, compressed.
    pub start_bytes: u64,
}

fn layer_err(what: &str) -> impl Fn(lazylayer_layer::LayerError) -> OptimizeError + '_ {
    move |source| OptimizeError::Layer {
        what: what.into(),
        source,
    }
}

/// Mark `selection` as in-boot in `index` and drop those entries' content
/// digests (chunk digests cover them), copy the entries from `merged_root`
/// (a read-only view of SRC's merged root file system) into a content tar,
/// cut it into chunks, record where each file lies and which chunks `reads`
/// touched, and write index region + chunks to `out`.
pub fn write_boot_layer(
    index: &mut BootIndex,
    selection: &[u32],
    reads: &[TraceRead],
    merged_root: &Path,
    out: &Path,
    layout: BootLayout,
) -> Result<BootLayer, OptimizeError> {
    for e in index.entries.iter_mut() {
        e.in_boot = false;
    }
    for &i in selection {
        let e = &mut index.entries[i as usize];
        e.in_boot = true;
        e.digest = None;
    }
    let io = |what: &'static str, p: &Path| {
        let p = p.to_path_buf();
        move |e| OptimizeError::io(what, &p, e)
    };

    // 1. The content: the files' digests (a file of their own, out of the
    // index region a start waits for: lazylayer_index::ExternalDigests),
    // then every selected entry, in selection (first-access) order.
    let digests_tar = match index.digest_file() {
        Some(file) => metadata_entry_tar(Path::new(DIGESTS_FILE_NAME), 0o444, 0, &file)
            .map_err(layer_err("writing file digests"))?,
        None => Vec::new(),
    };
    let tar_path = out.with_extension("content.tar");
    let file = File::create(&tar_path).map_err(io("creating boot content", &tar_path))?;
    let mut bw = BufWriter::with_capacity(1 << 20, file);
    bw.write_all(&digests_tar)
        .map_err(io("writing boot content", &tar_path))?;
    let mut w = LayerWriter::new(bw, Compression::None);
    let mut file_bytes = 0u64;
    for &i in selection {
        let e = &index.entries[i as usize];
        if e.kind == FileKind::File {
            file_bytes += e.size;
        }
        w.append_path(merged_root, Path::new(OsStr::from_bytes(&e.path)))
            .map_err(layer_err("writing boot layer"))?;
    }
    let (_, mut bw) = w
        .finish_into_inner()
        .map_err(layer_err("finishing boot content"))?;
    bw.flush().map_err(io("writing boot content", &tar_path))?;
    drop(bw);

    // 2. Where each file's data lies in it.
    let offsets = data_offsets(&tar_path)?;
    let mut files = Vec::new();
    for (i, e) in index.entries.iter().enumerate() {
        if e.in_boot && e.kind == FileKind::File {
            let off = offsets.get(&e.path).map(|s| s.offset).ok_or_else(|| {
                OptimizeError::BadImage(format!(
                    "boot layer: no data written for {}",
                    String::from_utf8_lossy(&e.path)
                ))
            })?;
            files.push((i as u32, off));
        }
    }

    // 3. Chunks.
    let chunks_path = out.with_extension("chunks");
    let (chunks, content_len) = {
        let mut src = BufReader::with_capacity(
            1 << 20,
            File::open(&tar_path).map_err(io("reading boot content", &tar_path))?,
        );
        let mut dst = BufWriter::with_capacity(
            1 << 20,
            File::create(&chunks_path).map_err(io("creating boot chunks", &chunks_path))?,
        );
        let r = compress_chunks(
            &mut src,
            layout.chunk_size,
            layout.compression,
            &mut dst,
            &mut Sha256::new(),
        )
        .map_err(io("compressing boot chunks", &chunks_path))?;
        dst.flush()
            .map_err(io("writing boot chunks", &chunks_path))?;
        r
    };

    if !digests_tar.is_empty() {
        index.move_digests_out(digests_tar.len() as u64);
    }

    // 4. The chunks the workload read, in the order it read them.
    let mut content = BootContent {
        compression: layout.compression,
        chunk_size: layout.chunk_size,
        content_len,
        chunks,
        files,
        start: Vec::new(),
    };
    let mut seen = vec![false; content.chunks.len()];
    for r in reads {
        let Some(idx) = index.lookup(&r.path) else {
            continue;
        };
        let e = &index.entries[idx as usize];
        let Some(off) = content.file_offset(idx) else {
            continue;
        };
        if r.offset >= e.size {
            continue;
        }
        let len = r.len.min(e.size - r.offset);
        for c in content.chunks_covering(off + r.offset, len) {
            if !std::mem::replace(&mut seen[c as usize], true) {
                content.start.push(c);
            }
        }
    }
    content.validate(index).map_err(OptimizeError::Index)?;
    let start_chunks = content.start.len();
    let start_content: u64 = content
        .start
        .iter()
        .map(|&c| u64::from(content.chunks[c as usize].compressed_len))
        .sum();
    let n_chunks = content.chunks.len();
    index.boot = Some(content);

    // 5. The index region, then the blob: region + chunks.
    let encoded = index.encode();
    // Read-only and dated at the epoch: the index is data, and a fixed time
    // keeps the layer reproducible for the same trace. In the entries'
    // headers, not as content: containers-storage could not rebuild the
    // layer for `podman save`/`push` otherwise (lazylayer_layer::metadata).
    let index_tar = metadata_entry_tar(Path::new(INDEX_FILE_NAME), 0o444, 0, &encoded)
        .map_err(layer_err("writing boot index"))?;
    let region = compress_piece(&index_tar, layout.compression)
        .map_err(io("compressing boot index", out))?;
    let mut diff = Sha256::new();
    diff.update(&index_tar);
    hash_file(&tar_path, &mut diff)?;
    let mut blob_hash = Sha256::new();
    blob_hash.update(&region);
    let mut outf = BufWriter::with_capacity(
        1 << 20,
        File::create(out).map_err(io("creating boot layer", out))?,
    );
    outf.write_all(&region)
        .map_err(io("writing boot layer", out))?;
    let mut size = region.len() as u64;
    {
        let mut src = File::open(&chunks_path).map_err(io("reading boot chunks", &chunks_path))?;
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = src
                .read(&mut buf)
                .map_err(io("reading boot chunks", &chunks_path))?;
            if n == 0 {
                break;
            }
            blob_hash.update(&buf[..n]);
            outf.write_all(&buf[..n])
                .map_err(io("writing boot layer", out))?;
            size += n as u64;
        }
    }
    outf.flush().map_err(io("writing boot layer", out))?;
    let _ = std::fs::remove_file(&tar_path);
    let _ = std::fs::remove_file(&chunks_path);
    let region_digest = sha256_digest_of(&region);
    Ok(BootLayer {
        digests: LayerDigests {
            digest: sha256_digest(blob_hash.finalize()),
            diff_id: sha256_digest(diff.finalize()),
            size,
        },
        entries: selection.len(),
        file_bytes,
        index_bytes: encoded.len() as u64,
        layout,
        region: (region.len() as u64, region_digest),
        file_digests: (
            index.external.as_ref().map_or(0, |x| x.entries.len()),
            digests_tar.len() as u64,
        ),
        chunks: n_chunks,
        start_chunks,
        start_bytes: region.len() as u64 + start_content,
    })
}

fn hash_file(path: &Path, h: &mut Sha256) -> Result<(), OptimizeError> {
    let mut f = File::open(path).map_err(|e| OptimizeError::io("reading boot content", path, e))?;
    std::io::copy(&mut f, h).map_err(|e| OptimizeError::io("reading boot content", path, e))?;
    Ok(())
}

/// Where every regular file's data lies in the tar at `path`.
fn data_offsets(path: &Path) -> Result<HashMap<Vec<u8>, DataSpan>, OptimizeError> {
    let bad = |e: std::io::Error| OptimizeError::io("reading boot content", path, e);
    let f = File::open(path).map_err(bad)?;
    lazylayer_layer::data_spans(BufReader::with_capacity(1 << 20, f)).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_index::build_index;

    fn read_of(p: &str, offset: u64, len: u64) -> TraceRead {
        TraceRead {
            path: p.as_bytes().to_vec(),
            offset,
            len,
        }
    }

    #[test]
    fn chunked_boot_layer_is_an_ordinary_layer_with_a_random_access_table() {
        for compression in [ChunkCompression::Gzip, ChunkCompression::Zstd] {
            let tmp = tempfile::tempdir().unwrap();
            let root = tmp.path().join("layer");
            std::fs::create_dir_all(root.join("d")).unwrap();
            // Big enough for several chunks; not compressible to nothing.
            let big: Vec<u8> = (0..300_000u32)
                .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
                .collect();
            std::fs::write(root.join("d/big"), &big).unwrap();
            std::fs::write(root.join("d/boot"), "read at start").unwrap();
            std::fs::hard_link(root.join("d/boot"), root.join("d/boot2")).unwrap();
            std::fs::write(root.join("lazy"), "read later").unwrap();
            let mut index = build_index(&[("sha256:test".into(), root.clone())]).unwrap();
            let at = |index: &BootIndex, p: &str| index.lookup(p.as_bytes()).unwrap();
            let sel: Vec<u32> = ["d", "d/boot", "d/boot2", "d/big"]
                .iter()
                .map(|p| at(&index, p))
                .collect();
            let lazy_digest = index.entries[at(&index, "lazy") as usize].digest;
            // The workload read the small file, then the big one's tail.
            let reads = [read_of("d/boot", 0, 13), read_of("d/big", 250_000, 50_000)];
            let out = tmp.path().join("boot.tar.gz");
            let layout = BootLayout {
                chunk_size: 65536,
                compression,
            };
            let layer = write_boot_layer(&mut index, &sel, &reads, &root, &out, layout).unwrap();

            // Boot entries lost their digests (chunk digests cover them);
            // the rest's moved out of the index, into a file of their own.
            assert!(index.entries.iter().all(|e| e.digest.is_none()));
            let apart = index.external.clone().expect("digests kept apart");
            assert_eq!(apart.entries, vec![at(&index, "lazy")]);
            assert!(!apart.holds(at(&index, "d/boot")));
            let boot = index.boot.clone().unwrap();
            assert!(layer.chunks >= 5, "{} chunks", layer.chunks);
            // The start list: the small file's chunk first, then the big file's tail only.
            let small_off = boot.file_offset(at(&index, "d/boot")).unwrap();
            let big_off = boot.file_offset(at(&index, "d/big")).unwrap();
            assert_eq!(boot.file_offset(at(&index, "d/boot2")), Some(small_off));
            let mut want: Vec<u32> = boot.chunks_covering(small_off, 13).collect();
            for c in boot.chunks_covering(big_off + 250_000, 50_000) {
                if !want.contains(&c) {
                    want.push(c);
                }
            }
            assert_eq!(boot.start, want);
            assert!(layer.start_chunks < layer.chunks);

            let blob = std::fs::read(&out).unwrap();
            assert_eq!(blob.len() as u64, layer.digests.size);
            assert_eq!(
                layer.digests.digest,
                format!("sha256:{}", hex::encode(Sha256::digest(&blob)))
            );
            // The whole blob is one tar stream a runtime reads as usual,
            // index first, whose hash is the diff_id.
            let mut tar = Vec::new();
            lazylayer_layer::decoder(&blob[..], compression.into())
                .unwrap()
                .read_to_end(&mut tar)
                .unwrap();
            assert_eq!(
                layer.digests.diff_id,
                format!("sha256:{}", hex::encode(Sha256::digest(&tar)))
            );
            let mut a = tar::Archive::new(&tar[..]);
            let names: Vec<Vec<u8>> = a
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path_bytes().into_owned())
                .collect();
            assert_eq!(names[0], INDEX_FILE_NAME.as_bytes());
            // The index rides in the entry's headers: it has no content of
            // its own to rebuild (containers-storage needs none).
            let mut a = tar::Archive::new(&tar[..]);
            let mut first = a.entries().unwrap().next().unwrap().unwrap();
            assert_eq!(first.size(), 0);
            let carried = lazylayer_layer::metadata::entry_data(&mut first).unwrap();
            assert_eq!(carried.as_deref(), Some(&index.encode()[..]));
            // Each chunk alone: its digest, and the file bytes at the recorded offsets.
            let (region_len, region_digest) = &layer.region;
            assert_eq!(
                *region_digest,
                format!(
                    "sha256:{}",
                    hex::encode(Sha256::digest(&blob[..*region_len as usize]))
                )
            );
            let offs = boot.chunk_offsets();
            let mut content = Vec::new();
            for (i, c) in boot.chunks.iter().enumerate() {
                let piece =
                    &blob[(region_len + offs[i]) as usize..(region_len + offs[i + 1]) as usize];
                assert_eq!(Sha256::digest(piece).as_slice(), c.sha256);
                content.extend(
                    lazylayer_layer::chunked::decompress_piece(
                        piece,
                        compression,
                        boot.chunk_len(i as u32) as usize,
                    )
                    .unwrap(),
                );
            }
            assert_eq!(
                &content[big_off as usize..big_off as usize + big.len()],
                &big[..]
            );
            assert_eq!(
                &content[small_off as usize..small_off as usize + 13],
                b"read at start"
            );
            // The digests file opens the content, in its own entries' headers,
            // and gives the untraced file its digest back.
            let file = lazylayer_layer::metadata::read_file(
                &content[..apart.tar_len as usize],
                DIGESTS_FILE_NAME.as_bytes(),
            )
            .unwrap();
            let table = apart.table(&file).unwrap();
            assert_eq!(Some(table.get(at(&index, "lazy")).unwrap()), lazy_digest);
            assert!(apart.tar_len < small_off.min(big_off));
            // The index in the blob is the index returned.
            assert_eq!(BootIndex::decode(&carried.unwrap()).unwrap(), index);
            assert_eq!(
                layer.start_bytes,
                region_len
                    + boot
                        .start
                        .iter()
                        .map(|&c| u64::from(boot.chunks[c as usize].compressed_len))
                        .sum::<u64>()
            );
        }
    }
}

#[cfg(test)]
mod layout_tests;
