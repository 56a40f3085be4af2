//! Hostile boot indexes behind a valid checksum (issue #19): every field of
//! a valid version 3 and version 4 index, the boot content section (chunk
//! table, file offsets, start list) included, set to edge values; then the
//! bounded fuzz harness mixing field edits, byte edits, cuts, insertions and
//! plain garbage. Each input is resealed (its SHA-256 trailer recomputed, as
//! an attacker would), so the decoder's own checks are what is exercised.
//! A decode must return; an index it accepts must be usable without panics
//! and encode to an index that decodes to itself.

use std::sync::atomic::{AtomicUsize, Ordering};

use lazylayer_testsupport::fuzz::fuzz;
use proptest::prelude::*;
use proptest::sample::Index;

use super::format::{get_u32, get_u64, hdr, rec, reseal, CHECKSUM_LEN, HEADER_LEN};
use super::tests::{small_index, with_boot};
use super::*;

/// One fixed-position integer of an encoding.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
}

/// The two valid encodings the edits start from: version 3 (no boot
/// content) and version 4 (with it).
fn samples() -> [Vec<u8>; 2] {
    [small_index().encode(), with_boot(small_index()).encode()]
}

/// How many of [`fields`]' first fields are the header's.
const HEADER_FIELDS: usize = 12;

/// Every fixed-position field of a valid encoding: the header, each layer
/// id's length, each entry record's fields and, in version 4, the boot
/// content header and each chunk, file and start record.
fn fields(bytes: &[u8]) -> Vec<Field> {
    let f = |at, width| Field { at, width };
    let mut out = vec![f(hdr::VERSION, 4), f(hdr::FLAGS, 4)];
    out.extend([hdr::LAYER_COUNT, hdr::ENTRY_COUNT].map(|at| f(at, 4)));
    out.extend(
        [
            hdr::LAYERS_OFF,
            hdr::LAYERS_LEN,
            hdr::ENTRIES_OFF,
            hdr::NAMES_OFF,
            hdr::NAMES_LEN,
            hdr::BLOB_OFF,
            hdr::BLOB_LEN,
            hdr::TOTAL_LEN,
        ]
        .map(|at| f(at, 8)),
    );
    let mut at = HEADER_LEN;
    for _ in 0..get_u32(bytes, hdr::LAYER_COUNT) {
        out.push(f(at, 4));
        at += 4 + get_u32(bytes, at) as usize;
    }
    let entries_off = get_u64(bytes, hdr::ENTRIES_OFF) as usize;
    for i in 0..get_u32(bytes, hdr::ENTRY_COUNT) as usize {
        let r = entries_off + i * format::RECORD_LEN;
        out.extend(
            [
                (rec::PARENT, 4),
                (rec::NAME_OFF, 4),
                (rec::NAME_LEN, 4),
                (rec::KIND, 1),
                (rec::FLAGS, 1),
                (rec::LINK_COUNT, 2),
                (rec::MODE, 4),
                (rec::UID, 4),
                (rec::GID, 4),
                (rec::MTIME_NSEC, 4),
                (rec::SIZE, 8),
                (rec::MTIME_SEC, 8),
                (rec::RDEV, 8),
                (rec::LAYER, 4),
                (rec::HARDLINK_GROUP, 4),
                (rec::DATA_OFF, 8),
                (rec::LINK_LEN, 4),
                (rec::XATTR_COUNT, 4),
            ]
            .map(|(off, width)| f(r + off, width)),
        );
    }
    if get_u32(bytes, hdr::FLAGS) & 1 != 0 {
        let b = (get_u64(bytes, hdr::BLOB_OFF) + get_u64(bytes, hdr::BLOB_LEN)) as usize;
        // compression, reserved, chunk size, content length, the three
        // counts, reserved.
        out.extend(
            [
                (0, 1),
                (1, 1),
                (4, 4),
                (8, 8),
                (16, 4),
                (20, 4),
                (24, 4),
                (28, 4),
            ]
            .map(|(off, width)| f(b + off, width)),
        );
        let (nc, nf, ns) = (
            get_u32(bytes, b + 16) as usize,
            get_u32(bytes, b + 20) as usize,
            get_u32(bytes, b + 24) as usize,
        );
        let mut p = b + 32;
        for _ in 0..nc {
            out.extend([f(p, 4), f(p + 4, 1)]);
            p += 36;
        }
        for _ in 0..nf {
            out.extend([f(p, 4), f(p + 4, 8)]);
            p += 12;
        }
        for _ in 0..ns {
            out.push(f(p, 4));
            p += 4;
        }
        assert_eq!(p, bytes.len() - CHECKSUM_LEN, "boot section walked whole");
    }
    out
}

fn max_of(width: usize) -> u64 {
    u64::MAX >> (64 - 8 * width)
}

fn read_field(bytes: &[u8], f: Field) -> u64 {
    let mut a = [0u8; 8];
    a[..f.width].copy_from_slice(&bytes[f.at..f.at + f.width]);
    u64::from_le_bytes(a)
}

fn write_field(bytes: &mut [u8], f: Field, v: u64) {
    bytes[f.at..f.at + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
}

/// Values that sit on the decoder's boundaries: 0, 1, the type's maximum
/// and its neighbours, the original value's neighbours, and lengths near
/// the body's and the whole input's.
fn edge_values(bytes: &[u8], f: Field) -> Vec<u64> {
    let max = max_of(f.width);
    let orig = read_field(bytes, f);
    let len = bytes.len() as u64;
    let body = len.saturating_sub(CHECKSUM_LEN as u64);
    let mut v = vec![
        0,
        1,
        2,
        max,
        max - 1,
        max / 2 + 1,
        orig.wrapping_add(1),
        orig.wrapping_sub(1),
        orig.wrapping_add(32),
        len,
        len + 1,
        body,
        body.saturating_sub(1),
        body.saturating_sub(32),
        max.wrapping_sub(orig),
    ];
    // Values whose sum with a header offset or length lands at the top of
    // the range: the overflow of issue #19 (blob offset + length next to
    // u64::MAX, plus the boot header) hides there.
    if f.width == 8 {
        for at in (hdr::LAYERS_OFF..=hdr::TOTAL_LEN).step_by(8) {
            let other = get_u64(bytes, at);
            v.extend([
                max.wrapping_sub(other),
                max.wrapping_sub(other).wrapping_sub(16),
            ]);
        }
    }
    v.iter_mut().for_each(|x| *x &= max);
    v
}

/// Decode `bytes`: an error is fine; an accepted index must answer every
/// query without panicking and survive a round trip.
fn check(bytes: &[u8]) -> Result<(), TestCaseError> {
    let idx = match BootIndex::decode(bytes) {
        Ok(idx) => idx,
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            return Ok(());
        }
    };
    for i in 0..idx.len() as u32 {
        let _ = (idx.name(i), idx.children(i));
        let e = &idx.entries[i as usize];
        prop_assert_eq!(idx.lookup(&e.path), Some(i));
        let _ = idx.hardlink_members(e.hardlink_group);
    }
    if let Some(b) = &idx.boot {
        let offsets = b.chunk_offsets();
        for c in 0..b.chunks.len() as u32 {
            prop_assert_eq!(b.chunk_range(c).0, offsets[c as usize]);
            prop_assert!(b.chunk_len(c) <= u64::from(b.chunk_size));
        }
        prop_assert_eq!(b.compressed_len(), offsets[b.chunks.len()]);
        for &(e, off) in &b.files {
            prop_assert_eq!(b.file_offset(e), Some(off));
            let size = idx.entries[e as usize].size;
            let covering = b.chunks_covering(off, size);
            prop_assert!(covering.end as usize <= b.chunks.len());
        }
    }
    match BootIndex::decode(&idx.encode()) {
        Ok(again) => prop_assert_eq!(again, idx),
        Err(e) => prop_assert!(
            false,
            "the accepted index re-encodes into a refused one: {e}"
        ),
    }
    Ok(())
}

/// Property: every field of both sample indexes at every edge value,
/// resealed, decodes to a clear error or a usable index.
#[test]
fn index_decode_survives_every_field_at_every_edge_value() {
    let mut decoded = 0;
    for sample in samples() {
        for f in fields(&sample) {
            for v in edge_values(&sample, f) {
                let mut b = sample.clone();
                write_field(&mut b, f, v);
                reseal(&mut b);
                if let Err(e) = check(&b) {
                    panic!("field at {} set to {v}: {e}", f.at);
                }
                decoded += 1;
            }
        }
    }
    // Both samples walked: header, 15 records and the boot section.
    assert!(decoded > 4000, "{decoded} inputs");
}

/// The value a fuzz edit writes into a field.
#[derive(Debug, Clone)]
enum Value {
    Edge(Index),
    Random(u64),
}

/// One edit of a valid encoding.
#[derive(Debug, Clone)]
enum Edit {
    Field(Index, Value),
    /// A header field: few, and the ones every section hangs on.
    HeaderField(Index, Value),
    Byte(Index, u8),
    Cut(Index, u8),
    Insert(Index, Vec<u8>),
}

#[derive(Debug, Clone)]
enum Input {
    /// Edits of sample `usize`; `bool`: set the total length to the length
    /// after the edits, so that cuts and insertions get past that check.
    Edited(usize, Vec<Edit>, bool),
    /// Any bytes behind a valid magic, a known version and a true length.
    Garbage(u32, Vec<u8>),
}

fn edit() -> impl Strategy<Value = Edit> {
    let value = prop_oneof![
        3 => any::<Index>().prop_map(Value::Edge),
        1 => any::<u64>().prop_map(Value::Random),
    ];
    prop_oneof![
        3 => (any::<Index>(), value.clone()).prop_map(|(i, v)| Edit::Field(i, v)),
        2 => (any::<Index>(), value).prop_map(|(i, v)| Edit::HeaderField(i, v)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Edit::Cut(i, n)),
        1 => (any::<Index>(), prop::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
    ]
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        9 => (0usize..2, prop::collection::vec(edit(), 1..5), any::<bool>())
            .prop_map(|(s, e, fix)| Input::Edited(s, e, fix)),
        1 => (1u32..=4, prop::collection::vec(any::<u8>(), 0..600))
            .prop_map(|(v, b)| Input::Garbage(v, b)),
    ]
}

fn build(samples: &[Vec<u8>; 2], fields: &[Vec<Field>; 2], input: &Input) -> Vec<u8> {
    let mut b = match input {
        Input::Edited(s, edits, _) => {
            let mut b = samples[*s].clone();
            for e in edits {
                let body = b.len() - CHECKSUM_LEN;
                match e {
                    Edit::Field(i, v) | Edit::HeaderField(i, v) => {
                        let f = match e {
                            Edit::HeaderField(..) => *i.get(&fields[*s][..HEADER_FIELDS]),
                            _ => *i.get(&fields[*s]),
                        };
                        if f.at + f.width > body {
                            continue;
                        }
                        let v = match v {
                            Value::Edge(i) => *i.get(&edge_values(&b, f)),
                            Value::Random(r) => r & max_of(f.width),
                        };
                        write_field(&mut b, f, v);
                    }
                    // Magic and version stay, so edits reach deeper checks.
                    Edit::Byte(i, v) => b[12 + i.index(body - 12)] = *v,
                    Edit::Cut(i, n) => {
                        let at = HEADER_LEN + i.index(body - HEADER_LEN);
                        let end = (at + usize::from(*n)).min(body);
                        b.drain(at..end);
                    }
                    Edit::Insert(i, bytes) => {
                        let at = HEADER_LEN + i.index(body - HEADER_LEN + 1);
                        b.splice(at..at, bytes.iter().copied());
                    }
                }
            }
            b
        }
        Input::Garbage(version, bytes) => {
            let mut b = format::MAGIC.to_vec();
            b.extend_from_slice(&version.to_le_bytes());
            b.extend_from_slice(bytes);
            b.resize(b.len().max(HEADER_LEN + CHECKSUM_LEN), 0);
            b
        }
    };
    let fix_total = matches!(input, Input::Edited(_, _, true) | Input::Garbage(..));
    if fix_total && b.len() >= HEADER_LEN + CHECKSUM_LEN {
        let n = b.len() as u64;
        format::set_u64(&mut b, hdr::TOTAL_LEN, n);
    }
    if b.len() >= CHECKSUM_LEN {
        reseal(&mut b);
    }
    b
}

/// The bounded fuzz harness of the boot index and its boot content section
/// (`LAZYLAYER_FUZZ_CASES`, see `lazylayer_testsupport::fuzz`).
#[test]
fn fuzz_boot_index_decode() {
    let samples = samples();
    let fields = [fields(&samples[0]), fields(&samples[1])];
    // Make sure the version 4 sample really carries a boot section.
    assert_eq!(get_u32(&samples[1], hdr::FLAGS), 1);
    let accepted = AtomicUsize::new(0);
    fuzz("boot index", input(), |input| {
        let b = build(&samples, &fields, &input);
        if BootIndex::decode(&b).is_ok() {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        check(&b)
    });
    // Some edits leave a valid index (a mode, a uid): those reach the
    // queries and the round trip in `check`.
    eprintln!("boot index: {} inputs accepted", accepted.into_inner());
}
