//! Hostile seek indexes behind a valid checksum (issue #19): every field of
//! a valid index's head (header, each checkpoint record) at edge values,
//! then the bounded fuzz harness mixing field edits, byte edits, cuts,
//! insertions and garbage. The head is what a reader fetches by range and
//! decodes alone; each input is resealed (its SHA-256 trailer recomputed,
//! as an attacker would), so the decoder's own checks run, and decoded
//! alone and with the real windows after it. A decode must return; an
//! index it accepts must plan and extract reads of the real blob without
//! panicking, and round-trip. (The file table is deflated: its records'
//! checks are reached through `seek.rs`'s edited indexes.)

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

use lazylayer_seek::{head_len, SeekHead, SeekIndex, MAGIC, VERSION};
use lazylayer_testsupport::fuzz::{apply_edits, edge_values, edits, fuzz, Edit, Field, Layout};
use proptest::prelude::*;
use sha2::{Digest, Sha256};

const CHECKSUM_LEN: usize = 32;
/// Header fields (docs/seek-index.md): version, flags, first digest byte,
/// compressed size, uncompressed size, span, checkpoint and file counts,
/// the file table's length and deflated length.
const HEADER: [(usize, usize); 10] = [
    (8, 2),
    (10, 2),
    (12, 1),
    (44, 8),
    (52, 8),
    (60, 8),
    (68, 4),
    (72, 4),
    (76, 4),
    (80, 4),
];
const HEADER_LEN: usize = 84;
const MARK_LEN: usize = 55;

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

/// Every field of a valid head: the header, each checkpoint's offsets, bit
/// count, window and deflated lengths and the first byte of its window's
/// SHA-256.
fn fields(head: &[u8]) -> Vec<Field> {
    let f = Field::new;
    let mut out: Vec<Field> = HEADER.iter().map(|&(at, w)| f(at, w)).collect();
    let mut p = HEADER_LEN;
    for _ in 0..u(head, 68, 4) {
        out.extend([
            f(p, 8),
            f(p + 8, 8),
            f(p + 16, 1),
            f(p + 17, 2),
            f(p + 19, 4),
            f(p + 23, 1),
        ]);
        p += MARK_LEN;
    }
    p += u(head, 80, 4);
    assert_eq!(p, head.len() - CHECKSUM_LEN, "seek index head walked whole");
    out
}

/// Sizes and offsets a field is compared with or added to.
fn related(bytes: &[u8]) -> Vec<u64> {
    [44, 52, 60]
        .iter()
        .filter_map(|&at| Field::new(at, 8).read(bytes))
        .collect()
}

/// Decode `head` alone and followed by `windows` (the real ones): an
/// error is fine; an accepted head must plan and extract every file of
/// `gz` without panicking, an accepted whole index must round-trip.
/// Returns whether the head was accepted.
fn check(head: &[u8], windows: &[u8], gz: &[u8]) -> Result<bool, TestCaseError> {
    let mut whole = head.to_vec();
    whole.extend_from_slice(windows);
    match SeekIndex::decode(&whole) {
        Ok(idx) => match SeekIndex::decode(&idx.encode()) {
            Ok(again) => prop_assert_eq!(again, idx),
            Err(e) => prop_assert!(
                false,
                "the accepted index re-encodes into a refused one: {e}"
            ),
        },
        Err(e) => prop_assert!(!e.to_string().is_empty()),
    }
    let h = match SeekHead::decode(head) {
        Ok(h) => h,
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            return Ok(false);
        }
    };
    for (i, (path, span)) in h.files.iter().enumerate() {
        prop_assert_eq!(h.file(path), Some(*span));
        let plan = h.plan(span.offset, span.size);
        prop_assert!(plan.compressed_start <= plan.compressed_end);
        // The head may lie about the blob and the windows: extraction then
        // fails or gives other bytes (the caller checks digests), but
        // returns. Every fifth file: inflating is what costs time here.
        if i % 5 != 0 {
            continue;
        }
        let w = *h
            .window(plan.checkpoint)
            .expect("a plan names a checkpoint");
        let deflated = (w.offset as usize).checked_add(w.deflated_len as usize);
        let deflated = deflated.and_then(|end| whole.get(w.offset as usize..end));
        let range = plan.compressed_start as usize..plan.compressed_end as usize;
        if let (Some(d), Some(bytes)) = (deflated, gz.get(range)) {
            if let Ok(window) = h.inflate_window(plan.checkpoint, d) {
                let _ = h.extract(&plan, &window, bytes, span.offset, span.size);
            }
        }
    }
    let _ = h.plan(h.uncompressed_size, u64::MAX);
    Ok(true)
}

struct Sample {
    gz: Vec<u8>,
    /// The encoded index's head, and the windows after it.
    bytes: Vec<u8>,
    windows: Vec<u8>,
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
    let mut bytes = idx.encode();
    let windows = bytes.split_off(head_len(&bytes).unwrap() as usize);
    let fields = fields(&bytes);
    Sample {
        gz,
        bytes,
        windows,
        fields,
    }
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
            if let Err(e) = check(&b, &s.windows, &s.gz) {
                panic!("field at {} set to {v}: {e}", f.at);
            }
            decoded += 1;
        }
    }
    // The head's fields only (the file table is deflated): ~700 inputs.
    assert!(decoded > 500, "{decoded} inputs");
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
        if check(&b, &s.windows, &s.gz)? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    eprintln!("seek index: {} inputs accepted", accepted.into_inner());
}
