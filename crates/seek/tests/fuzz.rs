//! Hostile seek indexes behind a valid checksum (issue #19): every field of
//! a valid index (header, each checkpoint, each file record) at edge values,
//! then the bounded fuzz harness mixing field edits, byte edits, cuts,
//! insertions and garbage. Each input is resealed (its SHA-256 trailer
//! recomputed, as an attacker would), so the decoder's own checks run. A
//! decode must return; an index it accepts must plan and extract reads of
//! the real blob without panicking, and round-trip.

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use lazylayer_seek::{SeekIndex, MAGIC, VERSION};
use lazylayer_testsupport::fuzz::{apply_edits, edge_values, edits, fuzz, Edit, Field, Layout};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const CHECKSUM_LEN: usize = 32;
/// Header fields (docs/seek-index.md): version, flags, first digest byte,
/// compressed size, uncompressed size, span, checkpoint and file counts.
const HEADER: [(usize, usize); 8] = [
    (8, 2),
    (10, 2),
    (12, 1),
    (44, 8),
    (52, 8),
    (60, 8),
    (68, 4),
    (72, 4),
];
const HEADER_LEN: usize = 76;

/// A small gzip layer: compressible and random files, so the index has
/// several checkpoints with windows and a dozen file records.
fn layer() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for i in 0..24 {
        let data: Vec<u8> = if i % 3 == 0 {
            lazylayer_testsupport::incompressible(8000, i)
        } else {
            format!("line {i} of a text file\n")
                .repeat(200)
                .into_bytes()
        };
        let mut h = tar::Header::new_gnu();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        tar.append_data(&mut h, format!("dir{}/file{i}", i % 3), &data[..])
            .unwrap();
    }
    let raw = tar.into_inner().unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&raw).unwrap();
    gz.finish().unwrap()
}

fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - CHECKSUM_LEN;
    let sum = Sha256::digest(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum);
}

fn u(bytes: &[u8], at: usize, width: usize) -> usize {
    Field::new(at, width).read(bytes).unwrap() as usize
}

/// Every field of a valid encoding: the header, each checkpoint's offsets,
/// bit count, window and deflated lengths, each file's path length, offset
/// and size.
fn fields(bytes: &[u8]) -> Vec<Field> {
    let f = Field::new;
    let mut out: Vec<Field> = HEADER.iter().map(|&(at, w)| f(at, w)).collect();
    let mut p = HEADER_LEN;
    for _ in 0..u(bytes, 68, 4) {
        out.extend([
            f(p, 8),
            f(p + 8, 8),
            f(p + 16, 1),
            f(p + 17, 2),
            f(p + 19, 4),
        ]);
        p += 23 + u(bytes, p + 19, 4);
    }
    for _ in 0..u(bytes, 72, 4) {
        let len = u(bytes, p, 2);
        out.extend([f(p, 2), f(p + 2 + len, 8), f(p + 10 + len, 8)]);
        p += 18 + len;
    }
    assert_eq!(p, bytes.len() - CHECKSUM_LEN, "seek index walked whole");
    out
}

/// Sizes and offsets a field is compared with or added to.
fn related(bytes: &[u8]) -> Vec<u64> {
    [44, 52, 60]
        .iter()
        .filter_map(|&at| Field::new(at, 8).read(bytes))
        .collect()
}

/// Decode `bytes`: an error is fine; an accepted index must plan and
/// extract every file of `gz` without panicking and round-trip. Returns
/// whether it was accepted.
fn check(bytes: &[u8], gz: &[u8]) -> Result<bool, TestCaseError> {
    let idx = match SeekIndex::decode(bytes) {
        Ok(idx) => idx,
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            return Ok(false);
        }
    };
    for (i, (path, span)) in idx.files.iter().enumerate() {
        prop_assert_eq!(idx.file(path), Some(*span));
        let plan = idx.plan(span.offset, span.size);
        prop_assert!(plan.compressed_start <= plan.compressed_end);
        // The index may lie about the blob: extraction then fails or gives
        // other bytes (the caller checks digests), but returns. Every
        // fifth file: inflating is what costs time here.
        let range = plan.compressed_start as usize..plan.compressed_end as usize;
        if let Some(bytes) = gz.get(range).filter(|_| i % 5 == 0) {
            let _ = idx.extract(&plan, bytes, span.offset, span.size);
        }
    }
    let _ = idx.plan(idx.uncompressed_size, u64::MAX);
    match SeekIndex::decode(&idx.encode()) {
        Ok(again) => prop_assert_eq!(again, idx),
        Err(e) => prop_assert!(
            false,
            "the accepted index re-encodes into a refused one: {e}"
        ),
    }
    Ok(true)
}

struct Sample {
    gz: Vec<u8>,
    bytes: Vec<u8>,
    fields: Vec<Field>,
}

fn sample() -> Sample {
    let gz = layer();
    let idx = SeekIndex::build(&gz[..], 1024).unwrap();
    assert!(
        idx.checkpoints.len() >= 3,
        "{} checkpoints",
        idx.checkpoints.len()
    );
    let bytes = idx.encode();
    let fields = fields(&bytes);
    Sample { gz, bytes, fields }
}

/// Property: every field of a valid seek index at every edge value,
/// resealed, decodes to a clear error or a usable index.
#[test]
fn seek_decode_survives_every_field_at_every_edge_value() {
    let s = sample();
    let mut decoded = 0;
    for &f in &s.fields {
        for v in edge_values(&s.bytes, f, CHECKSUM_LEN, &related(&s.bytes)) {
            let mut b = s.bytes.clone();
            f.write(&mut b, v);
            reseal(&mut b);
            if let Err(e) = check(&b, &s.gz) {
                panic!("field at {} set to {v}: {e}", f.at);
            }
            decoded += 1;
        }
    }
    assert!(decoded > 1000, "{decoded} inputs");
}

#[derive(Debug, Clone)]
enum Input {
    Edited(Vec<Edit>),
    /// Any bytes behind the magic and version.
    Garbage(Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        9 => edits().prop_map(Input::Edited),
        1 => prop::collection::vec(any::<u8>(), 0..400).prop_map(Input::Garbage),
    ]
}

/// The bounded fuzz harness of the seek index (`LAZYLAYER_FUZZ_CASES`, see
/// `lazylayer_testsupport::fuzz`).
#[test]
fn fuzz_seek_index_decode() {
    let s = sample();
    let layout = Layout {
        fields: &s.fields,
        hot: HEADER.len(),
        keep_head: 10,
        trailer: CHECKSUM_LEN,
        related: &related,
    };
    let accepted = AtomicUsize::new(0);
    fuzz("seek index", input(), |input| {
        let mut b = match &input {
            Input::Edited(edits) => {
                let mut b = s.bytes.clone();
                apply_edits(&mut b, &layout, edits);
                b
            }
            Input::Garbage(g) => {
                let mut b = MAGIC.to_vec();
                b.extend_from_slice(&VERSION.to_le_bytes());
                b.extend_from_slice(g);
                b.resize(b.len().max(HEADER_LEN + CHECKSUM_LEN), 0);
                b
            }
        };
        if b.len() >= CHECKSUM_LEN {
            reseal(&mut b);
        }
        if check(&b, &s.gz)? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    eprintln!("seek index: {} inputs accepted", accepted.into_inner());
}
