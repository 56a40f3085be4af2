//! The bounded fuzz harness of tar headers through the layer extractor and
//! the data-span walker (issue #19). Archives are assembled from members of
//! every kind (hostile names, links, devices, whiteouts, PAX records, GNU
//! long names), then header fields are set to edge values (octal overflow,
//! base-256, signs, garbage, names with `..` or absolute), the header
//! checksum recomputed as an attacker would, and bytes edited or cut.
//! Extraction into a sandbox must return, and leave everything outside the
//! layer root as it was.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};

use common::*;
use lazylayer_layer::{data_spans, extract, ExtractOptions};
use lazylayer_testsupport::fuzz::fuzz;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use tar::EntryType;

/// Names an image may well hold: most members get one, so archives get
/// past the first refusal.
const SAFE_NAMES: &[&[u8]] = &[
    b"a",
    b"a/",
    b"a/f",
    b"a/b/c",
    b"./a/g",
    b"b",
    b"a/.wh.f",
    b"a/.wh..wh..opq",
];

const NAMES: &[&[u8]] = &[
    b"a",
    b"a/",
    b"a/f",
    b"a/b/c",
    b"./a/g",
    b"../evil",
    b"a/../../evil",
    b"/abs",
    b"a/.wh.f",
    b"a/.wh..wh..opq",
    b".wh..wh..opq",
    b".wh.",
    b".wh..wh.lazylayer.index.v1",
    b".",
    b"..",
    b"",
    b"a//b",
    b"\xff\xfe",
    b"a\x00b",
    b"link-to-outside/x",
];

const LINKS: &[&[u8]] = &[
    b"a/f",
    b"f",
    b"../../outside/secret",
    b"/etc/passwd",
    b"link-to-outside",
    b"a",
    b"",
    b".",
    b"a/../a/f",
];

/// Values for a numeric header field (octal text, base-256, junk).
const NUMBERS: &[&[u8]] = &[
    b"",
    b"0",
    b"0000000\0",
    b"7777777\0",
    b"77777777777\0",
    b"777777777777",
    b"\x80\0\0\0\0\0\0\0\0\0\0\x01",
    b"\x80\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff",
    b" 12 ",
    b"9",
    b"-1",
    b"1e9",
    b"\0\0\0\0",
];

const PAX_KEYS: &[&str] = &[
    "path",
    "linkpath",
    "size",
    "uid",
    "gid",
    "mtime",
    "uname",
    "SCHILY.xattr.user.a",
    "SCHILY.xattr.trusted.overlay.opaque",
    "SCHILY.xattr.security.capability",
    "LIBARCHIVE.xattr.user.b",
    "GNU.sparse.size",
    "GNU.sparse.map",
    "hdrcharset",
];

const PAX_VALUES: &[&[u8]] = &[
    b"a/long/name",
    b"../evil",
    b"/abs",
    b"18446744073709551615",
    b"18446744073709551616",
    b"-5",
    b"1.5",
    b"",
    b"y",
    b"\xff\x00",
    b"0,10,20",
];

const TYPEFLAGS: &[&[u8]] = &[b"x", b"g", b"L", b"K", b"S", b"D", b"M", b"V", b"\0", b"7"];
const MAGICS: &[&[u8]] = &[b"ustar\0", b"ustar ", b"\0\0\0\0\0\0"];

/// One member of an archive.
#[derive(Debug, Clone)]
enum Member {
    Entry {
        name: &'static [u8],
        kind: u8,
        link: &'static [u8],
        data: Vec<u8>,
        mode: u32,
        dev: (u32, u32),
    },
    Pax(Vec<(&'static str, &'static [u8])>),
    GnuLongName(Vec<u8>),
}

fn member() -> impl Strategy<Value = Member> {
    let kind = select(&b"0125346"[..]);
    prop_oneof![
        6 => (
            prop_oneof![4 => select(SAFE_NAMES), 1 => select(NAMES)],
            kind,
            select(LINKS),
            prop::collection::vec(any::<u8>(), 0..700),
            prop_oneof![Just(0o644u32), Just(0o7777), Just(0), any::<u32>()],
            prop_oneof![Just((0u32, 0u32)), Just((1, 3)), Just((8, 0)), (any::<u32>(), any::<u32>())],
        )
            .prop_map(|(name, kind, link, data, mode, dev)| Member::Entry {
                name,
                kind,
                link,
                data,
                mode,
                dev
            }),
        1 => prop::collection::vec((select(PAX_KEYS), select(PAX_VALUES)), 1..4).prop_map(Member::Pax),
        1 => prop_oneof![
            select(NAMES).prop_map(|n| n.to_vec()),
            (1usize..5000).prop_map(|n| b"d/".repeat(n)),
        ]
        .prop_map(Member::GnuLongName),
    ]
}

/// An edit of the assembled archive.
#[derive(Debug, Clone)]
enum TarEdit {
    /// Header `Index` (of those the archive has), field `Index`, a value;
    /// `bool`: recompute the header checksum afterwards.
    Field(Index, Index, &'static [u8], bool),
    Byte(Index, u8),
    /// Cut the archive short.
    Truncate(Index),
}

/// ustar header fields: (offset, length).
const FIELDS: &[(usize, usize)] = &[
    (0, 100),   // name
    (100, 8),   // mode
    (108, 8),   // uid
    (116, 8),   // gid
    (124, 12),  // size
    (136, 12),  // mtime
    (156, 1),   // typeflag
    (157, 100), // linkname
    (257, 6),   // magic
    (263, 2),   // version
    (329, 8),   // devmajor
    (337, 8),   // devminor
    (345, 155), // prefix
];

fn tar_edit() -> impl Strategy<Value = TarEdit> {
    let value = prop_oneof![
        select(NUMBERS),
        select(NAMES),
        select(TYPEFLAGS),
        select(MAGICS),
    ];
    prop_oneof![
        6 => (any::<Index>(), any::<Index>(), value, prop::bool::weighted(0.9))
            .prop_map(|(h, f, v, seal)| TarEdit::Field(h, f, v, seal)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| TarEdit::Byte(i, b)),
        1 => any::<Index>().prop_map(TarEdit::Truncate),
    ]
}

/// The archive's bytes and where each of its member headers starts.
fn assemble(members: &[Member]) -> (Vec<u8>, Vec<usize>) {
    let mut t = RawTar::new();
    let mut headers = Vec::new();
    for m in members {
        headers.push(t.bytes.len());
        match m {
            Member::Entry {
                name,
                kind,
                link,
                data,
                mode,
                dev,
            } => {
                let kind = EntryType::new(*kind);
                let data: &[u8] = if kind == EntryType::Regular {
                    data
                } else {
                    b""
                };
                let mut raw = Raw::new(name, kind);
                raw.link = link;
                raw.data = data;
                raw.mode = *mode;
                raw.dev = *dev;
                t.add(raw);
            }
            Member::Pax(records) => {
                t.pax(records);
            }
            Member::GnuLongName(name) => {
                let mut body = name.clone();
                body.push(0);
                t.extension(EntryType::GNULongName, b"././@LongLink", &body);
            }
        }
    }
    (t.finish(), headers)
}

fn set_checksum(header: &mut [u8]) {
    header[148..156].fill(b' ');
    let sum: u32 = header.iter().map(|&b| u32::from(b)).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

fn archive() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::collection::vec(member(), 1..8),
        prop::collection::vec(tar_edit(), 0..5),
    )
        .prop_map(|(members, edits)| {
            let (mut bytes, headers) = assemble(&members);
            for e in edits {
                match e {
                    TarEdit::Field(h, f, v, seal) => {
                        let at = *h.get(&headers);
                        let (off, len) = *f.get(FIELDS);
                        let Some(header) = bytes.get_mut(at..at + 512) else {
                            continue;
                        };
                        let field = &mut header[off..off + len];
                        field.fill(0);
                        let n = v.len().min(len);
                        field[..n].copy_from_slice(&v[..n]);
                        if seal {
                            set_checksum(header);
                        }
                    }
                    TarEdit::Byte(..) if bytes.is_empty() => {}
                    TarEdit::Byte(i, b) => {
                        let at = i.index(bytes.len());
                        bytes[at] = b;
                    }
                    TarEdit::Truncate(i) => bytes.truncate(i.index(bytes.len() + 1)),
                }
            }
            bytes
        })
}

#[test]
fn fuzz_tar_headers_through_the_extractor() {
    let opts = ExtractOptions {
        // Bounds a case's disk use; refusals of bigger archives are tested
        // in hostile.rs.
        max_total_bytes: 1 << 20,
        max_entries: 1000,
        chown: is_root(),
    };
    let extracted = AtomicUsize::new(0);
    fuzz("tar headers (extract, data_spans)", archive(), |tar| {
        let sb = Sandbox::in_memory();
        // A symlink to outside, planted before extraction, as an earlier
        // entry of a hostile layer could have left it.
        std::os::unix::fs::symlink(&sb.outside, sb.root.join("link-to-outside")).unwrap();
        let r = extract(&tar[..], &sb.root, &opts, &mut |_| {});
        match &r {
            Ok(_) => {
                extracted.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        sb.assert_outside_untouched();
        let _ = data_spans(&tar[..]);
        Ok(())
    });
    eprintln!("tar: {} archives extracted", extracted.into_inner());
}

/// A boot layer's chunks and its index region, as the lazy reader takes
/// them from the registry: one gzip member or zstd frame each, decompressed
/// to an expected length (a chunk) or up to a bound (the region). Damaged
/// pieces must be refused or decompress within the bound.
#[test]
fn fuzz_boot_chunks_and_index_region_decompression() {
    use lazylayer_index::chunks::ChunkCompression;
    use lazylayer_layer::chunked::{compress_piece, decompress_bounded, decompress_piece};

    let plain: Vec<u8> = (0..20_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let pieces = [ChunkCompression::Gzip, ChunkCompression::Zstd]
        .map(|c| (c, compress_piece(&plain, c).unwrap()));
    let damage = prop_oneof![
        3 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| (i, Some(b), 0usize)),
        1 => any::<Index>().prop_map(|i| (i, None, 0usize)),
        1 => (any::<Index>(), 1usize..64).prop_map(|(i, n)| (i, None, n)),
    ];
    let input = (
        0usize..2,
        prop::collection::vec(damage, 0..4),
        prop_oneof![Just(0i64), -2i64..=2, any::<i16>().prop_map(i64::from)],
    );
    fuzz(
        "boot chunk and index region",
        input,
        |(which, damages, delta)| {
            let (c, piece) = &pieces[which];
            let mut bytes = piece.clone();
            for (at, put, append) in damages {
                if append > 0 {
                    bytes.extend(std::iter::repeat_n(0x5a, append));
                    continue;
                }
                if bytes.is_empty() {
                    continue;
                }
                let i = at.index(bytes.len());
                match put {
                    Some(b) => bytes[i] = b,
                    None => bytes.truncate(i),
                }
            }
            let expected = (plain.len() as i64 + delta).max(0) as usize;
            if let Ok(out) = decompress_piece(&bytes, *c, expected) {
                prop_assert_eq!(out.len(), expected);
            }
            let max = expected as u64;
            if let Ok(out) = decompress_bounded(&bytes, *c, max) {
                prop_assert!(out.len() as u64 <= max);
            }
            Ok(())
        },
    );
}
