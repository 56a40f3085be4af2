//! Hostile boot indexes behind a valid checksum (issue #19): every field of
//! a valid version 3 and version 4 index, the boot content section (chunk
//! table, file offsets, start list) included, set to edge values; then the
//! bounded fuzz harness mixing field edits, byte edits, cuts, insertions and
//! plain garbage. Each input is resealed (its SHA-256 trailer recomputed, as
//! an attacker would), so the decoder's own checks are what is exercised.
//! A decode must return; an index it accepts must be usable without panics
//! and encode to an index that decodes to itself.

use std::sync::atomic::{AtomicUsize, Ordering};

use lazylayer_testsupport::fuzz::{apply_edits, edge_values, edits, fuzz, Edit, Field, Layout};
use proptest::prelude::*;

use super::format::{get_u32, get_u64, hdr, rec, reseal, set_u64, CHECKSUM_LEN, HEADER_LEN};
use super::tests::{small_index, with_boot, with_digests_apart};
use super::*;

/// The valid encodings the edits start from: version 3 (no boot content),
/// version 4 (with it) and version 5 (with the digests apart).
fn samples() -> [Vec<u8>; 3] {
    [
        small_index().encode(),
        with_boot(small_index()).encode(),
        with_digests_apart().0.encode(),
    ]
}

/// How many of [`fields`]' first fields are the header's.
const HEADER_FIELDS: usize = 12;

/// Every fixed-position field of a valid encoding: the header, each layer
/// id's length, each entry record's fields and, in version 4, the boot
/// content header and each chunk, file and start record.
fn fields(bytes: &[u8]) -> Vec<Field> {
    let f = Field::new;
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
    assert_eq!(out.len(), HEADER_FIELDS);
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
        let mut b = (get_u64(bytes, hdr::BLOB_OFF) + get_u64(bytes, hdr::BLOB_LEN)) as usize;
        if get_u32(bytes, hdr::FLAGS) & 2 != 0 {
            // The digests section: where the file lies, a byte of its SHA-256.
            out.extend([f(b, 8), f(b + 8, 1)]);
            b += 40;
        }
        // Compression, reserved, chunk size, content length, the three
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

/// The header's offsets and lengths: a field set to `max - one of them`
/// makes their sum reach the top of the range, where the overflow of issue
/// #19 (blob offset + length next to u64::MAX, plus the boot header) hid.
fn header_sums(bytes: &[u8]) -> Vec<u64> {
    (hdr::LAYERS_OFF..=hdr::TOTAL_LEN)
        .step_by(8)
        .filter_map(|at| Field::new(at, 8).read(bytes))
        .collect()
}

fn layout(fields: &[Field]) -> Layout<'_> {
    Layout {
        fields,
        hot: HEADER_FIELDS,
        keep_head: 12,
        trailer: CHECKSUM_LEN,
        related: &header_sums,
    }
}

/// Decode `bytes`: an error is fine; an accepted index must answer every
/// query without panicking and survive a round trip. Returns whether it
/// was accepted.
fn check(bytes: &[u8]) -> Result<bool, TestCaseError> {
    let idx = match BootIndex::decode(bytes) {
        Ok(idx) => idx,
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            return Ok(false);
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
    if let Some(x) = &idx.external {
        // Within the content, and a file of the length it names is checked.
        prop_assert!(x.tar_len <= idx.boot.as_ref().map_or(0, |b| b.content_len));
        let file = vec![0u8; x.file_len() as usize];
        prop_assert!(x.table(&file).is_err());
    }
    match BootIndex::decode(&idx.encode()) {
        Ok(again) => prop_assert_eq!(again, idx),
        Err(e) => prop_assert!(
            false,
            "the accepted index re-encodes into a refused one: {e}"
        ),
    }
    Ok(true)
}

/// Property: every field of both sample indexes at every edge value,
/// resealed, decodes to a clear error or a usable index.
#[test]
fn index_decode_survives_every_field_at_every_edge_value() {
    let mut decoded = 0;
    for sample in samples() {
        for f in fields(&sample) {
            for v in edge_values(&sample, f, CHECKSUM_LEN, &header_sums(&sample)) {
                let mut b = sample.clone();
                f.write(&mut b, v);
                reseal(&mut b);
                if let Err(e) = check(&b) {
                    panic!("field at {} set to {v}: {e}", f.at);
                }
                decoded += 1;
            }
        }
    }
    // Every sample walked: header, 15 records and the boot section.
    assert!(decoded > 4000, "{decoded} inputs");
}

#[derive(Debug, Clone)]
enum Input {
    /// Edits of sample `usize`; `bool`: set the total length to the length
    /// after the edits, so that cuts and insertions get past that check.
    Edited(usize, Vec<Edit>, bool),
    /// Any bytes behind a valid magic, a known version and a true length.
    Garbage(u32, Vec<u8>),
}

fn input() -> impl Strategy<Value = Input> {
    prop_oneof![
        9 => (0usize..3, edits(), any::<bool>())
            .prop_map(|(s, e, fix)| Input::Edited(s, e, fix)),
        1 => (1u32..=5, prop::collection::vec(any::<u8>(), 0..600))
            .prop_map(|(v, b)| Input::Garbage(v, b)),
    ]
}

fn build(samples: &[Vec<u8>; 3], fields: &[Vec<Field>; 3], input: &Input) -> Vec<u8> {
    let mut b = match input {
        Input::Edited(s, edits, _) => {
            let mut b = samples[*s].clone();
            apply_edits(&mut b, &layout(&fields[*s]), edits);
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
        set_u64(&mut b, hdr::TOTAL_LEN, n);
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
    let fields = [
        fields(&samples[0]),
        fields(&samples[1]),
        fields(&samples[2]),
    ];
    // The version 4 sample really carries a boot section, the version 5
    // one its digests apart too.
    assert_eq!(get_u32(&samples[1], hdr::FLAGS), 1);
    assert_eq!(get_u32(&samples[2], hdr::FLAGS), 3);
    let accepted = AtomicUsize::new(0);
    fuzz("boot index", input(), |input| {
        if check(&build(&samples, &fields, &input))? {
            accepted.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    });
    // Some edits leave a valid index (a mode, a uid): those reach the
    // queries and the round trip in `check`.
    eprintln!("boot index: {} inputs accepted", accepted.into_inner());
}
