//! Format, validation and lookup tests of the boot index.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use proptest::prelude::*;

use sha2::{Digest, Sha256};

use super::format::{
    get_u32, get_u64, hdr, rec, reseal, set_u32, set_u64, CHECKSUM_LEN, HEADER_LEN, RECORD_LEN,
};
use super::*;

pub(crate) fn entry(path: &[u8], parent: u32, kind: FileKind) -> IndexEntry {
    IndexEntry {
        parent,
        ..IndexEntry::plain(path, kind, 0)
    }
}

fn layer_ids(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("sha256:{:064x}", i + 1)).collect()
}

/// A small index using every kind and field.
fn small_entries() -> Vec<IndexEntry> {
    let mut v = vec![entry(b"", 0, FileKind::Dir)]; // 0
    v.push(entry(b"etc", 0, FileKind::Dir)); // 1
    v.push(entry(b"usr", 0, FileKind::Dir)); // 2
    let mut bin = entry(b"bin", 0, FileKind::Symlink); // 3
    bin.link_target = Some(b"usr/bin".to_vec());
    bin.size = 7;
    v.push(bin);
    v.push(entry(b"dev", 0, FileKind::Dir)); // 4
    let mut passwd = entry(b"etc/passwd", 1, FileKind::File); // 5
    passwd.size = 1234;
    passwd.uid = 1000;
    passwd.gid = 100;
    passwd.mtime_sec = -5;
    passwd.mtime_nsec = 999_999_999;
    passwd.xattrs = vec![
        (b"security.capability".to_vec(), vec![1, 0, 0, 2]),
        (b"user.empty".to_vec(), Vec::new()),
    ];
    passwd.in_boot = true;
    passwd.layer = 1;
    passwd.digest = Some(sha256(b"passwd content"));
    v.push(passwd);
    v.push(entry(b"usr/bin", 2, FileKind::Dir)); // 6
    let mut null = entry(b"dev/null", 4, FileKind::CharDev); // 7
    null.rdev = rustix::fs::makedev(1, 3);
    v.push(null);
    let mut sda = entry(b"dev/sda", 4, FileKind::BlockDev); // 8
    sda.rdev = rustix::fs::makedev(8, 0);
    v.push(sda);
    v.push(entry(b"dev/fifo", 4, FileKind::Fifo)); // 9
    v.push(entry(b"dev/sock", 4, FileKind::Socket)); // 10
    for name in [&b"usr/bin/a"[..], b"usr/bin/b", b"usr/bin/caf\xe9"] {
        let mut f = entry(name, 6, FileKind::File); // 11, 12, 13
        f.size = 42;
        f.mode = 0o4755;
        f.hardlink_group = 1;
        f.layer = 1;
        f.digest = Some(sha256(b"a and b"));
        v.push(f);
    }
    v[13].hardlink_group = 0;
    v[13].mode = 0o1777;
    // A file without a digest, as the boot layer's files are.
    v[13].digest = None;
    v
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// Entry flag bit 1 (version 2): the entry's data starts with a digest.
const FLAG_DIGEST: u8 = 2;

pub(crate) fn small_index() -> BootIndex {
    BootIndex::new(layer_ids(2), small_entries()).unwrap()
}

#[test]
fn index_round_trips_byte_for_byte() {
    let idx = small_index();
    let bytes = idx.encode();
    assert_eq!(bytes, idx.encode(), "encoding is deterministic");
    let back = BootIndex::decode(&bytes).unwrap();
    assert_eq!(back, idx);
    assert_eq!(back.encode(), bytes);
    assert_eq!(&bytes[..8], b"LLIDX\0\0\0");
    assert_eq!(get_u32(&bytes, hdr::VERSION), 3);
}

#[test]
fn index_round_trips_file_digests() {
    let idx = small_index();
    let bytes = idx.encode();
    let back = BootIndex::decode(&bytes).unwrap();
    let digest = |p: &[u8]| back.entries[back.lookup(p).unwrap() as usize].digest;
    // A file with a digest and xattrs, hard-linked files, a file without.
    assert_eq!(digest(b"etc/passwd"), Some(sha256(b"passwd content")));
    assert_eq!(digest(b"usr/bin/a"), Some(sha256(b"a and b")));
    assert_eq!(digest(b"usr/bin/b"), Some(sha256(b"a and b")));
    assert_eq!(digest(b"usr/bin/caf\xe9"), None);
    assert_eq!(digest(b"bin"), None);
    assert_eq!(digest(b"etc"), None);
    let passwd = &back.entries[5];
    assert_eq!(passwd.xattrs, idx.entries[5].xattrs);
    assert!(passwd.in_boot);

    // The flag is set exactly on the entries with a digest, and their data
    // starts with it (before the xattrs).
    let blob = get_u64(&bytes, hdr::BLOB_OFF) as usize;
    for (i, e) in idx.entries.iter().enumerate() {
        let r = record(&bytes, i);
        assert_eq!(
            bytes[r + rec::FLAGS] & FLAG_DIGEST != 0,
            e.digest.is_some(),
            "entry {i}"
        );
        if let Some(d) = e.digest {
            let at = blob + get_u64(&bytes, r + rec::DATA_OFF) as usize;
            assert_eq!(bytes[at..at + 32], d, "entry {i}");
        }
    }
    // 32 blob bytes per digest, nothing else.
    let mut none = small_entries();
    none.iter_mut().for_each(|e| e.digest = None);
    let without = BootIndex::new(layer_ids(2), none).unwrap().encode();
    assert_eq!(bytes.len(), without.len() + 3 * 32);
}

#[test]
fn index_decodes_version_1() {
    // An index without digests, as a version-1 writer laid it out.
    let mut v = small_entries();
    v.iter_mut().for_each(|e| e.digest = None);
    let idx = BootIndex::new(layer_ids(2), v).unwrap();
    let mut b = idx.encode();
    set_u32(&mut b, hdr::VERSION, 1);
    reseal(&mut b);
    assert_eq!(BootIndex::decode(&b).unwrap(), idx);
    // And the documented example as the previous release wrote it.
    assert_eq!(
        BootIndex::decode(&unhex(DOC_EXAMPLE_V1)).unwrap(),
        doc_example_v1()
    );
}

#[test]
fn index_lookup_children_and_names() {
    let idx = small_index();
    assert_eq!(idx.len(), 14);
    assert!(!idx.is_empty());
    assert_eq!(idx.lookup(b""), Some(0));
    assert_eq!(idx.lookup(b"/"), Some(0));
    assert_eq!(idx.lookup(b"etc/passwd"), Some(5));
    assert_eq!(idx.lookup(b"/usr//bin/a/"), Some(11));
    assert_eq!(idx.lookup(b"usr/bin/caf\xe9"), Some(13));
    assert_eq!(idx.lookup(b"usr/bin/c"), None);
    assert_eq!(idx.lookup(b"etc/passwd/x"), None, "through a file");
    assert_eq!(idx.lookup(b"bin/a"), None, "symlinks are not followed");
    assert_eq!(idx.lookup(b"usr/../etc"), None);
    for (i, e) in idx.entries.iter().enumerate() {
        assert_eq!(idx.lookup(&e.path), Some(i as u32));
        if i > 0 {
            assert_eq!(
                idx.lookup_child(e.parent, idx.name(i as u32)),
                Some(i as u32)
            );
        }
    }
    let names = |d| {
        idx.children(d)
            .iter()
            .map(|&c| idx.name(c).to_vec())
            .collect::<Vec<_>>()
    };
    assert_eq!(names(0), [&b"bin"[..], b"dev", b"etc", b"usr"]);
    assert_eq!(names(4), [&b"fifo"[..], b"null", b"sda", b"sock"]);
    assert!(idx.children(5).is_empty(), "a file has no children");
    assert!(idx.children(99).is_empty());
    assert_eq!(idx.name(0), b"");
    assert_eq!(idx.name(13), b"caf\xe9");
    assert_eq!(idx.name(99), b"");
    assert_eq!(idx.lookup_child(5, b"x"), None);
    assert_eq!(idx.hardlink_group_count(), 1);
    assert_eq!(idx.hardlink_members(1), [11, 12]);
    assert!(idx.hardlink_members(0).is_empty());
    assert!(idx.hardlink_members(2).is_empty());
}

#[test]
fn index_children_are_sorted_whatever_the_entry_order() {
    let mut v = vec![entry(b"", 0, FileKind::Dir)];
    for name in [&b"zeta"[..], b"alpha", b"\xff", b"Beta", b"a.b"] {
        v.push(entry(name, 0, FileKind::File));
    }
    let idx = BootIndex::new(layer_ids(1), v).unwrap();
    let names: Vec<&[u8]> = idx.children(0).iter().map(|&c| idx.name(c)).collect();
    assert_eq!(names, [&b"Beta"[..], b"a.b", b"alpha", b"zeta", b"\xff"]);
    assert_eq!(idx.lookup(b"alpha"), Some(2));
}

// ---- decode refusals ----

#[test]
fn index_decode_refuses_wrong_magic() {
    let mut b = small_index().encode();
    b[0] = b'X';
    assert!(matches!(BootIndex::decode(&b), Err(IndexError::BadMagic)));
    assert!(matches!(
        BootIndex::decode(b"PK\x03\x04"),
        Err(IndexError::BadMagic)
    ));
    assert!(matches!(
        BootIndex::decode(b""),
        Err(IndexError::Truncated { .. })
    ));
}

#[test]
fn index_decode_refuses_version_6() {
    let mut b = small_index().encode();
    set_u32(&mut b, hdr::VERSION, 6);
    let err = BootIndex::decode(&b).unwrap_err();
    assert!(
        matches!(err, IndexError::UnsupportedVersion { found: 6 }),
        "{err}"
    );
    assert!(
        err.to_string().contains(
            "boot index format version 6 is not supported: this lazylayer reads versions 1 to 5"
        ),
        "{err}"
    );
    // Same with a valid checksum: the version is refused, not the layout.
    reseal(&mut b);
    assert!(matches!(
        BootIndex::decode(&b),
        Err(IndexError::UnsupportedVersion { found: 6 })
    ));
    // A future index may be shorter than a v2 header: still a version error.
    assert!(matches!(
        BootIndex::decode(&b[..12]),
        Err(IndexError::UnsupportedVersion { found: 6 })
    ));
    for v in [0, u32::MAX] {
        set_u32(&mut b, hdr::VERSION, v);
        reseal(&mut b);
        let r = BootIndex::decode(&b);
        assert!(
            matches!(r, Err(IndexError::UnsupportedVersion { found }) if found == v),
            "{r:?}"
        );
    }
}

#[test]
fn index_decode_refuses_every_truncation() {
    let b = small_index().encode();
    for n in 0..b.len() {
        match BootIndex::decode(&b[..n]) {
            Err(IndexError::Truncated { actual, .. }) => assert_eq!(actual, n as u64),
            other => panic!("truncated at {n}: {other:?}"),
        }
    }
    let mut longer = b.clone();
    longer.push(0);
    assert!(matches!(
        BootIndex::decode(&longer),
        Err(IndexError::Malformed { .. })
    ));
}

#[test]
fn index_decode_detects_every_flipped_byte() {
    let b = small_index().encode();
    for i in 0..b.len() {
        for bit in [0x01u8, 0x80] {
            let mut c = b.clone();
            c[i] ^= bit;
            let r = BootIndex::decode(&c);
            let ok = match i {
                0..8 => matches!(r, Err(IndexError::BadMagic)),
                // 3 ^ 1 is version 2, which is read: its checksum fails.
                8 if bit == 0x01 => matches!(r, Err(IndexError::ChecksumMismatch)),
                8..12 => matches!(r, Err(IndexError::UnsupportedVersion { .. })),
                80..88 => matches!(
                    r,
                    Err(IndexError::Truncated { .. } | IndexError::Malformed { .. })
                ),
                _ => matches!(r, Err(IndexError::ChecksumMismatch)),
            };
            assert!(ok, "byte {i} ^ {bit:#x}: {r:?}");
        }
    }
}

fn sealed(edit: impl FnOnce(&mut Vec<u8>)) -> Result<BootIndex, IndexError> {
    let mut b = small_index().encode();
    edit(&mut b);
    reseal(&mut b);
    BootIndex::decode(&b)
}

/// Offset of entry `i`'s record in the small index.
fn record(b: &[u8], i: usize) -> usize {
    get_u32(b, hdr::ENTRIES_OFF) as usize + i * RECORD_LEN
}

#[test]
fn index_decode_refuses_counts_larger_than_the_input() {
    for count in [u32::MAX, 15, 1 << 20] {
        let r = sealed(|b| set_u32(b, hdr::ENTRY_COUNT, count));
        assert!(
            matches!(r, Err(IndexError::Malformed { .. })),
            "{count}: {r:?}"
        );
    }
    let r = sealed(|b| set_u32(b, hdr::LAYER_COUNT, u32::MAX));
    assert!(matches!(r, Err(IndexError::Malformed { .. })), "{r:?}");
    let r = sealed(|b| set_u64(b, hdr::BLOB_LEN, u64::MAX - 10));
    assert!(matches!(r, Err(IndexError::Malformed { .. })), "{r:?}");
    let r = sealed(|b| set_u64(b, hdr::NAMES_LEN, u64::MAX));
    assert!(matches!(r, Err(IndexError::Malformed { .. })), "{r:?}");
    let r = sealed(|b| {
        let at = record(b, 5) + rec::XATTR_COUNT;
        set_u32(b, at, u32::MAX)
    });
    assert!(matches!(r, Err(IndexError::Malformed { .. })), "{r:?}");
    let r = sealed(|b| {
        let at = record(b, 3) + rec::LINK_LEN;
        set_u32(b, at, u32::MAX)
    });
    assert!(matches!(r, Err(IndexError::Malformed { .. })), "{r:?}");
}

#[test]
fn index_decode_refuses_hostile_sealed_records() {
    let malformed =
        |r: Result<BootIndex, IndexError>| matches!(r, Err(IndexError::Malformed { .. }));
    let base = record(&small_index().encode(), 0);
    let at = |i: usize, f: usize| base + i * RECORD_LEN + f;
    assert!(matches!(
        sealed(|b| set_u32(b, hdr::FLAGS, 4)),
        Err(IndexError::UnknownFlags { flags: 4 })
    ));
    // parent == self, parent after self
    assert!(malformed(sealed(|b| set_u32(b, at(5, rec::PARENT), 5))));
    assert!(malformed(sealed(|b| set_u32(b, at(5, rec::PARENT), 9))));
    assert!(malformed(sealed(|b| set_u32(b, at(0, rec::PARENT), 1))));
    // parent is a file
    let r = sealed(|b| set_u32(b, at(7, rec::PARENT), 5));
    assert!(
        matches!(r, Err(IndexError::InvalidEntry { index: 7, .. })),
        "{r:?}"
    );
    // name outside the table, overlong
    assert!(malformed(sealed(|b| set_u32(
        b,
        at(5, rec::NAME_OFF),
        u32::MAX
    ))));
    assert!(malformed(sealed(|b| set_u32(b, at(5, rec::NAME_LEN), 256))));
    assert!(malformed(sealed(|b| set_u32(b, at(0, rec::NAME_LEN), 1))));
    // unknown kind, unknown entry flags, reserved bytes
    assert!(malformed(sealed(|b| b[at(5, rec::KIND)] = 0)));
    assert!(malformed(sealed(|b| b[at(5, rec::KIND)] = 8)));
    assert!(malformed(sealed(|b| b[at(5, rec::FLAGS)] |= 4)));
    assert!(malformed(sealed(|b| b[at(5, rec::FLAGS)] |= 0x80)));
    // a link count below 2, on a directory, or in a version-2 index
    assert!(matches!(
        sealed(|b| b[at(5, rec::LINK_COUNT)] = 1),
        Err(IndexError::InvalidEntry { index: 5, .. })
    ));
    assert!(matches!(
        sealed(|b| b[at(11, rec::LINK_COUNT)] = 1),
        Err(IndexError::InvalidEntry { index: 11, .. })
    ));
    assert!(matches!(
        sealed(|b| b[at(1, rec::LINK_COUNT)] = 3),
        Err(IndexError::InvalidEntry { index: 1, .. })
    ));
    assert_eq!(
        sealed(|b| b[at(5, rec::LINK_COUNT)] = 3).unwrap().entries[5].link_count,
        3
    );
    assert!(malformed(sealed(|b| {
        b[at(5, rec::LINK_COUNT)] = 3;
        set_u32(b, hdr::VERSION, 2);
    })));
    // blob data shared or skipped
    assert!(malformed(sealed(|b| set_u64(b, at(5, rec::DATA_OFF), 0))));
    // a target on a directory
    assert!(malformed(sealed(|b| set_u32(b, at(1, rec::LINK_LEN), 1))));
    // a layer out of range, a bad mode: rule violations behind a valid layout
    let r = sealed(|b| set_u32(b, at(5, rec::LAYER), 2));
    assert!(
        matches!(r, Err(IndexError::InvalidEntry { index: 5, .. })),
        "{r:?}"
    );
    let r = sealed(|b| set_u32(b, at(5, rec::MODE), 0o100644));
    assert!(
        matches!(r, Err(IndexError::InvalidEntry { index: 5, .. })),
        "{r:?}"
    );
    // two siblings with one name (entry 8 renamed to entry 7's name)
    let r = sealed(|b| {
        let off = get_u32(b, at(7, rec::NAME_OFF));
        set_u32(b, at(8, rec::NAME_OFF), off);
        set_u32(b, at(8, rec::NAME_LEN), 4);
    });
    assert!(matches!(r, Err(IndexError::InvalidEntry { .. })), "{r:?}");
    // a layer id that is not UTF-8
    assert!(malformed(sealed(|b| b[HEADER_LEN + 4] = 0xff)));
}

/// The error of `r`, which must be a malformed-layout one.
fn malformed_what(r: Result<BootIndex, IndexError>) -> String {
    match r {
        Err(IndexError::Malformed { what, .. }) => what,
        other => panic!("not a malformed index: {other:?}"),
    }
}

#[test]
fn index_decode_refuses_digest_flag_on_non_files() {
    let base = record(&small_index().encode(), 0);
    let flags = |i: usize| base + i * RECORD_LEN + rec::FLAGS;
    // Root, a directory, a symlink, a char device, a fifo: refused on the
    // flag itself, before any blob byte is read as a digest.
    for i in [0, 1, 3, 7, 9] {
        let what = malformed_what(sealed(|b| b[flags(i)] |= FLAG_DIGEST));
        assert!(
            what.contains(&format!("entry {i}:")) && what.contains("not a regular file"),
            "entry {i}: {what}"
        );
    }
}

#[test]
fn index_decode_refuses_digest_flag_in_version_1() {
    // Version 2 bytes with digests, labelled version 1: bit 1 is an unknown
    // flag there, whatever the blob holds.
    let what = malformed_what(sealed(|b| set_u32(b, hdr::VERSION, 1)));
    assert!(
        what.contains("entry 5:") && what.contains("unknown entry flags 0x3"),
        "{what}"
    );
}

#[test]
fn index_decode_refuses_missing_digest_bytes() {
    // The flag on the last entry, which has no data: the blob ends first.
    let base = record(&small_index().encode(), 0);
    let what = malformed_what(sealed(|b| {
        b[base + 13 * RECORD_LEN + rec::FLAGS] |= FLAG_DIGEST
    }));
    assert!(what.contains("32 bytes needed, 0 left"), "{what}");
    // The flag on an entry with data of its own: the digest swallows it and
    // the next entry's data offset no longer follows.
    let what = malformed_what(sealed(|b| {
        b[base + 3 * RECORD_LEN + rec::FLAGS] |= FLAG_DIGEST;
        b[base + 3 * RECORD_LEN + rec::KIND] = FileKind::File.code();
        set_u32(b, base + 3 * RECORD_LEN + rec::LINK_LEN, 0);
    }));
    assert!(what.contains("data offset"), "{what}");

    // A blob cut inside the last entry's digest (sizes fixed up, so only
    // the digest is short).
    let mut v = small_entries();
    v[13].digest = Some(sha256(b"last"));
    let mut b = BootIndex::new(layer_ids(2), v).unwrap().encode();
    let body = b.len() - CHECKSUM_LEN;
    b.drain(body - 16..body);
    let blob_len = get_u64(&b, hdr::BLOB_LEN);
    set_u64(&mut b, hdr::BLOB_LEN, blob_len - 16);
    let total = b.len() as u64;
    set_u64(&mut b, hdr::TOTAL_LEN, total);
    reseal(&mut b);
    let what = malformed_what(BootIndex::decode(&b));
    assert!(what.contains("32 bytes needed, 16 left"), "{what}");
}

#[test]
fn index_new_refuses_rule_violations() {
    let check = |what: &str, edit: &dyn Fn(&mut Vec<IndexEntry>)| {
        let mut v = small_entries();
        edit(&mut v);
        assert!(BootIndex::new(layer_ids(2), v).is_err(), "accepted: {what}");
    };
    check("root not a dir", &|v| v[0].kind = FileKind::File);
    check("root with a path", &|v| v[0].path = b"x".to_vec());
    check("path not under parent", &|v| {
        v[5].path = b"usr/passwd".to_vec()
    });
    check("empty name", &|v| v[5].path = b"etc/".to_vec());
    check("dot name", &|v| v[1].path = b"..".to_vec());
    check("duplicate", &|v| v[2].path = b"etc".to_vec());
    check("mode type bits", &|v| v[5].mode = 0o100644);
    check("nsec", &|v| v[5].mtime_nsec = 1_000_000_000);
    check("symlink size", &|v| v[3].size = 3);
    check("symlink no target", &|v| v[3].link_target = None);
    check("target on file", &|v| {
        v[5].link_target = Some(b"x".to_vec())
    });
    check("dir size", &|v| v[1].size = 4096);
    check("whiteout", &|v| v[7].rdev = 0);
    check("rdev on file", &|v| v[5].rdev = 1);
    check("overlay xattr", &|v| {
        v[5].xattrs = vec![(b"trusted.overlay.opaque".to_vec(), b"y".to_vec())]
    });
    check("unsorted xattrs", &|v| v[5].xattrs.reverse());
    check("layer", &|v| v[5].layer = 2);
    check("single-member group", &|v| v[12].hardlink_group = 0);
    check("group 2 before 1", &|v| {
        v[11].hardlink_group = 2;
        v[12].hardlink_group = 2;
    });
    check("dir in group", &|v| {
        v[6].hardlink_group = 1;
    });
    check("group across layers", &|v| v[12].layer = 0);
    check("digest on a dir", &|v| v[1].digest = Some([7; 32]));
    check("digest on a symlink", &|v| v[3].digest = Some([7; 32]));
    check("digest on a device", &|v| v[7].digest = Some([7; 32]));
    let mut v = small_entries();
    v[6].digest = Some([7; 32]);
    let err = BootIndex::new(layer_ids(2), v).unwrap_err();
    assert!(
        matches!(err, IndexError::InvalidEntry { index: 6, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("usr/bin"), "{err}");
    assert!(
        err.to_string()
            .contains("only regular files have a content digest"),
        "{err}"
    );
    assert!(
        BootIndex::new(Vec::new(), small_entries()).is_err(),
        "no layers"
    );
    assert!(
        BootIndex::new(layer_ids(2), Vec::new()).is_err(),
        "no entries"
    );
}

// ---- property tests ----

#[derive(Debug, Clone)]
struct Node {
    parent: usize,
    name: Vec<u8>,
    kind: u8,
    meta: (u32, u32, u32, u64, i64, u32),
    rdev: u64,
    target: Vec<u8>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    group: u8,
    layer: u8,
    in_boot: bool,
    digest: Option<[u8; 32]>,
}

fn node() -> impl Strategy<Value = Node> {
    let name_byte =
        prop::sample::select(vec![b'a', b'b', b'.', b'-', b' ', b'\n', 0x80, 0xe9, 0xff]);
    let non_nul = 1u8..=255;
    (
        (
            any::<usize>(),
            prop::collection::vec(name_byte, 1..5),
            0u8..7,
        ),
        (
            0u32..0o10000,
            any::<u32>(),
            any::<u32>(),
            any::<u64>(),
            any::<i64>(),
            0u32..1_000_000_000,
        ),
        (1u64.., prop::collection::vec(non_nul.clone(), 0..12)),
        prop::collection::vec(
            (
                prop::collection::vec(non_nul, 1..4),
                prop::collection::vec(any::<u8>(), 0..6),
            ),
            0..3,
        ),
        (
            0u8..6,
            any::<u8>(),
            any::<bool>(),
            any::<Option<[u8; 32]>>(),
        ),
    )
        .prop_map(
            |(
                (parent, name, kind),
                meta,
                (rdev, target),
                xattrs,
                (group, layer, in_boot, digest),
            )| Node {
                parent,
                name,
                kind,
                meta,
                rdev,
                target,
                xattrs,
                group,
                layer,
                in_boot,
                digest,
            },
        )
}

/// A valid index from arbitrary nodes: invalid or duplicate names are
/// dropped, hardlink groups renumbered and their members made alike.
fn tree(layer_count: usize, nodes: &[Node]) -> BootIndex {
    const KINDS: [FileKind; 7] = [
        FileKind::File,
        FileKind::Dir,
        FileKind::Symlink,
        FileKind::CharDev,
        FileKind::BlockDev,
        FileKind::Fifo,
        FileKind::Socket,
    ];
    let mut entries = vec![entry(b"", 0, FileKind::Dir)];
    let mut dirs = vec![0u32];
    let mut seen = HashSet::new();
    let mut raw_groups: BTreeMap<u8, Vec<usize>> = BTreeMap::new();
    for n in nodes {
        if n.name == b"." || n.name == b".." {
            continue;
        }
        let parent = dirs[n.parent % dirs.len()];
        if !seen.insert((parent, n.name.clone())) {
            continue;
        }
        let kind = KINDS[n.kind as usize];
        let mut path = entries[parent as usize].path.clone();
        if !path.is_empty() {
            path.push(b'/');
        }
        path.extend_from_slice(&n.name);
        let mut e = entry(&path, parent, kind);
        let (mode, uid, gid, size, sec, nsec) = n.meta;
        (e.mode, e.uid, e.gid, e.mtime_sec, e.mtime_nsec) = (mode, uid, gid, sec, nsec);
        e.layer = n.layer as u32 % layer_count as u32;
        e.in_boot = n.in_boot;
        let mut xattrs: Vec<(Vec<u8>, Vec<u8>)> = n
            .xattrs
            .iter()
            .map(|(k, v)| ([&b"user."[..], k].concat(), v.clone()))
            .collect();
        xattrs.sort();
        xattrs.dedup_by(|a, b| a.0 == b.0);
        e.xattrs = xattrs;
        match kind {
            FileKind::File => (e.size, e.digest) = (size, n.digest),
            FileKind::Symlink => {
                e.size = n.target.len() as u64;
                e.link_target = Some(n.target.clone());
            }
            FileKind::CharDev | FileKind::BlockDev => e.rdev = n.rdev,
            _ => {}
        }
        if kind == FileKind::Dir {
            dirs.push(entries.len() as u32);
        } else if n.group < 3 {
            raw_groups.entry(n.group).or_default().push(entries.len());
        }
        entries.push(e);
    }
    let mut groups: Vec<Vec<usize>> = raw_groups.into_values().filter(|m| m.len() > 1).collect();
    groups.sort_by_key(|m| m[0]);
    for (g, members) in groups.iter().enumerate() {
        let head = entries[members[0]].clone();
        for &m in members {
            let e = &mut entries[m];
            (e.kind, e.mode, e.uid, e.gid, e.size) =
                (head.kind, head.mode, head.uid, head.gid, head.size);
            (e.mtime_sec, e.mtime_nsec, e.rdev) = (head.mtime_sec, head.mtime_nsec, head.rdev);
            (e.link_target, e.xattrs, e.layer, e.digest) = (
                head.link_target.clone(),
                head.xattrs.clone(),
                head.layer,
                head.digest,
            );
            e.hardlink_group = g as u32 + 1;
        }
    }
    BootIndex::new(layer_ids(layer_count), entries).expect("generated index is valid")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn index_round_trips_random_trees(layers in 1usize..4, nodes in prop::collection::vec(node(), 0..40)) {
        let idx = tree(layers, &nodes);
        let bytes = idx.encode();
        let back = BootIndex::decode(&bytes).unwrap();
        prop_assert_eq!(&back, &idx);
        prop_assert_eq!(back.encode(), bytes);
        for (i, e) in back.entries.iter().enumerate() {
            prop_assert_eq!(back.lookup(&e.path), Some(i as u32));
            let kids = back.children(i as u32);
            prop_assert!(kids.windows(2).all(|w| back.name(w[0]) < back.name(w[1])));
            prop_assert!(kids.iter().all(|&k| back.entries[k as usize].parent == i as u32));
            if e.hardlink_group != 0 {
                prop_assert!(back.hardlink_members(e.hardlink_group).contains(&(i as u32)));
            }
        }
        let total_kids: usize = (0..back.len() as u32).map(|d| back.children(d).len()).sum();
        prop_assert_eq!(total_kids, back.len() - 1);
    }

    /// Whatever a hostile writer puts behind a valid checksum, decode
    /// returns (it may even accept), it never panics.
    #[test]
    fn index_decode_survives_sealed_garbage(
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in any::<prop::sample::Index>(),
        do_cut in any::<bool>(),
    ) {
        let mut b = small_index().encode();
        let body = b.len() - CHECKSUM_LEN;
        for (at, v) in edits {
            // Keep magic and version so the edits reach the deeper checks.
            let i = 12 + at.index(body - 12);
            b[i] = v;
        }
        if do_cut {
            let keep = HEADER_LEN + cut.index(body - HEADER_LEN);
            b.drain(keep..body);
        }
        reseal(&mut b);
        if let Ok(idx) = BootIndex::decode(&b) {
            prop_assert_eq!(BootIndex::decode(&idx.encode()).unwrap(), idx);
        }
    }
}

// ---- scale ----

/// 100 directories of 1000 entries: files, symlinks, hardlink pairs, xattrs.
fn synthetic(dirs: usize, per_dir: usize) -> BootIndex {
    let mut entries = vec![
        entry(b"", 0, FileKind::Dir),
        entry(b"usr", 0, FileKind::Dir),
    ];
    let mut group = 0;
    for d in 0..dirs {
        entries.push(entry(format!("usr/lib{d:03}").as_bytes(), 1, FileKind::Dir));
    }
    let dir_entries: Vec<(u32, Vec<u8>)> = (2..entries.len())
        .map(|i| (i as u32, entries[i].path.clone()))
        .collect();
    for (dir_idx, dir_path) in dir_entries {
        for f in 0..per_dir {
            let path = [&dir_path[..], format!("/module_{f:04}.py").as_bytes()].concat();
            let mut e = entry(&path, dir_idx, FileKind::File);
            e.size = (f * 37) as u64;
            e.mtime_nsec = f as u32;
            e.layer = (f % 3) as u32;
            e.in_boot = f % 7 == 0;
            if f % 10 == 9 {
                e.kind = FileKind::Symlink;
                let t = format!("../lib000/module_{:04}.py", f - 1).into_bytes();
                e.size = t.len() as u64;
                e.link_target = Some(t);
            }
            if f % 50 == 1 {
                e.xattrs = vec![(b"user.origin".to_vec(), b"synthetic".to_vec())];
            }
            entries.push(e);
            if f % 100 == 3 {
                // The next file is a second name of this one.
                group += 1;
                let last = entries.len() - 1;
                entries[last].hardlink_group = group;
                let mut twin = entries[last].clone();
                twin.path = [&dir_path[..], format!("/module_{f:04}.link").as_bytes()].concat();
                entries.push(twin);
            }
        }
    }
    BootIndex::new(layer_ids(3), entries).unwrap()
}

#[test]
fn index_decodes_100k_entries() {
    let idx = synthetic(100, 1000);
    assert!(idx.len() > 100_000, "{}", idx.len());
    let t = Instant::now();
    let bytes = idx.encode();
    let encode_time = t.elapsed();
    let t = Instant::now();
    let back = BootIndex::decode(&bytes).unwrap();
    let decode_time = t.elapsed();
    println!(
        "boot index: {} entries, {} bytes ({:.1} bytes/entry); encode {:?}, decode {:?}",
        idx.len(),
        bytes.len(),
        bytes.len() as f64 / idx.len() as f64,
        encode_time,
        decode_time
    );
    assert_eq!(back, idx);
    assert_eq!(
        back.lookup(b"usr/lib042/module_0500.py")
            .map(|i| back.name(i)),
        Some(&b"module_0500.py"[..])
    );
    assert_eq!(back.children(1).len(), 100);
}

/// The worked example of docs/index-format.md: `hello` is left in the
/// image's layer (so it carries its digest), the symlink `hi` is in the
/// boot layer.
fn doc_example() -> BootIndex {
    let mut v = doc_example_v1().entries;
    v[1].in_boot = false;
    v[1].digest = Some(sha256(b"hello\n"));
    v[2].in_boot = true;
    BootIndex::new(doc_example_v1().layers, v).unwrap()
}

/// The worked example of format version 1 (no digests; `hello` in the boot
/// layer), as documented before version 2.
fn doc_example_v1() -> BootIndex {
    let mut root = entry(b"", 0, FileKind::Dir);
    root.mtime_sec = 1_700_000_000;
    let mut hello = entry(b"hello", 0, FileKind::File);
    (hello.uid, hello.gid, hello.size, hello.mtime_nsec) = (1000, 1000, 6, 500_000_000);
    hello.xattrs = vec![(b"user.k".to_vec(), b"v".to_vec())];
    hello.in_boot = true;
    let mut hi = entry(b"hi", 0, FileKind::Symlink);
    hi.mode = 0o777;
    hi.link_target = Some(b"hello".to_vec());
    hi.size = 5;
    BootIndex::new(
        vec!["sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into()],
        vec![root, hello, hi],
    )
    .unwrap()
}

/// Golden bytes of [`doc_example_v1`], written by the last version-1
/// release: they must decode for as long as version 1 is supported.
const DOC_EXAMPLE_V1: &str = concat!(
    "4c4c494458000000010000000000000001000000030000005800000000000000",
    "4b00000000000000a30000000000000093010000000000000700000000000000",
    "9a010000000000001400000000000000ce010000000000004700000073686132",
    "35363a6533623063343432393866633163313439616662663463383939366662",
    "3932343237616534316534363439623933346361343935393931623738353262",
    "38353500000000000000000000000002000000ed010000000000000000000000",
    "000000000000000000000000f153650000000000000000000000000000000000",
    "0000000000000000000000000000000000000000000000000000000500000001",
    "010000a4010000e8030000e80300000065cd1d060000000000000000f1536500",
    "0000000000000000000000000000000000000000000000000000000000000001",
    "00000000000000050000000200000003000000ff010000000000000000000000",
    "000000050000000000000000f153650000000000000000000000000000000000",
    "0000000f00000000000000050000000000000068656c6c6f6869060000000100",
    "0000757365722e6b7668656c6c6f90c9e383bfb1e428e4eaaffcb12720c838e7",
    "4c776e850d52d7ebcd061858a3ba",
);

fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

/// Golden bytes: any change to the encoding (which needs a new format
/// version) fails here first. The same bytes are dumped in the docs.
#[test]
fn index_format_matches_the_documented_example() {
    let hex = concat!(
        "4c4c494458000000030000000000000001000000030000005800000000000000",
        "4b00000000000000a30000000000000093010000000000000700000000000000",
        "9a010000000000003400000000000000ee010000000000004700000073686132",
        "35363a6533623063343432393866633163313439616662663463383939366662",
        "3932343237616534316534363439623933346361343935393931623738353262",
        "38353500000000000000000000000002000000ed010000000000000000000000",
        "000000000000000000000000f153650000000000000000000000000000000000",
        "0000000000000000000000000000000000000000000000000000000500000001",
        "020000a4010000e8030000e80300000065cd1d060000000000000000f1536500",
        "0000000000000000000000000000000000000000000000000000000000000001",
        "00000000000000050000000200000003010000ff010000000000000000000000",
        "000000050000000000000000f153650000000000000000000000000000000000",
        "0000002f00000000000000050000000000000068656c6c6f68695891b5b522d5",
        "df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03060000000100",
        "0000757365722e6b7668656c6c6f9b0f5cd18a383fc52c12bcaad634f2e8cd47",
        "395d1172a69ee0d4aafc172c2a7a",
    );
    let golden = unhex(hex);
    assert_eq!(golden.len(), 494);
    assert_eq!(doc_example().encode(), golden);
    assert_eq!(BootIndex::decode(&golden).unwrap(), doc_example());
}

/// A boot content table for `small_index()`'s in-boot files, laid out the
/// way the boot layer writer does (each file at a 512-byte boundary).
pub(crate) fn with_boot(idx: BootIndex) -> BootIndex {
    with_boot_after(idx, 0)
}

/// [`with_boot`] with the boot files after `first` content bytes (where
/// the digests file's entries go, format 5).
fn with_boot_after(mut idx: BootIndex, first: u64) -> BootIndex {
    use crate::chunks::{BootContent, Chunk, ChunkCompression};
    let mut files = Vec::new();
    let mut at = first;
    for (i, e) in idx.entries.iter().enumerate() {
        if e.in_boot && e.kind == FileKind::File {
            at += 512;
            files.push((i as u32, at));
            at += e.size.div_ceil(512) * 512;
        }
    }
    let content_len = at + 1024;
    let chunk_size = 4096u32;
    let n = content_len.div_ceil(u64::from(chunk_size));
    idx.boot = Some(BootContent {
        compression: ChunkCompression::Zstd,
        chunk_size,
        content_len,
        chunks: (0..n)
            .map(|i| Chunk {
                compressed_len: 100 + i as u32,
                sha256: [i as u8; 32],
            })
            .collect(),
        files,
        start: vec![0],
    });
    idx
}

#[test]
fn index_with_boot_content_round_trips_as_version_4() {
    let idx = with_boot(small_index());
    assert!(!idx.boot.as_ref().unwrap().files.is_empty());
    let bytes = idx.encode();
    assert_eq!(get_u32(&bytes, hdr::VERSION), 4);
    assert_eq!(get_u32(&bytes, hdr::FLAGS), 1);
    let back = BootIndex::decode(&bytes).unwrap();
    assert_eq!(back, idx);
    assert_eq!(back.encode(), bytes);
    let b = back.boot.unwrap();
    let (i, off) = b.files[0];
    assert_eq!(b.file_offset(i), Some(off));
    assert_eq!(b.chunks_covering(off, 1), 0..1);
    assert_eq!(b.chunk_range(0), (0, 100));
    assert_eq!(b.chunk_offsets()[1], 100);
    // Without boot content the same index is still written as version 3.
    assert_eq!(get_u32(&small_index().encode(), hdr::VERSION), 3);
}

#[test]
fn index_decode_refuses_hostile_boot_content() {
    let idx = with_boot(small_index());
    let bytes = idx.encode();
    let boot_at = bytes.len() - CHECKSUM_LEN - {
        let b = idx.boot.as_ref().unwrap();
        32 + b.chunks.len() * 36 + b.files.len() * 12 + b.start.len() * 4
    };
    let edited = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        reseal(&mut b);
        BootIndex::decode(&b)
    };
    let refused = |r: Result<BootIndex, IndexError>, want: &str| {
        let e = r.expect_err("hostile boot content accepted");
        assert!(e.to_string().contains(want), "{e}");
    };
    // Counts that claim more records than there are bytes.
    refused(edited(&|b| set_u32(b, boot_at + 16, u32::MAX)), "need");
    refused(edited(&|b| set_u32(b, boot_at + 20, 1_000_000)), "need");
    // Unknown compression, reserved bytes.
    refused(edited(&|b| b[boot_at] = 9), "unknown compression");
    refused(edited(&|b| b[boot_at + 2] = 1), "reserved");
    // A chunk size out of bounds; a content length that needs other chunks.
    refused(edited(&|b| set_u32(b, boot_at + 4, 16)), "chunk size");
    refused(
        edited(&|b| b[boot_at + 8..boot_at + 16].copy_from_slice(&(1u64 << 40).to_le_bytes())),
        "chunks for",
    );
    // A file offset past the content's end, a file that is not a boot file.
    let files_at = boot_at + 32 + idx.boot.as_ref().unwrap().chunks.len() * 36;
    refused(
        edited(&|b| b[files_at + 4..files_at + 12].copy_from_slice(&u64::MAX.to_le_bytes())),
        "outside the content",
    );
    refused(edited(&|b| set_u32(b, files_at, 0)), "not a boot file");
    // The flag on a version 3 index is unknown.
    assert!(matches!(
        edited(&|b| set_u32(b, hdr::VERSION, 3)),
        Err(IndexError::UnknownFlags { flags: 1 })
    ));
    // Truncated by a start entry: the counts no longer add up.
    let mut short = bytes.clone();
    short.drain(short.len() - CHECKSUM_LEN - 4..short.len() - CHECKSUM_LEN);
    let total = short.len() as u64;
    short[hdr::TOTAL_LEN..hdr::TOTAL_LEN + 8].copy_from_slice(&total.to_le_bytes());
    reseal(&mut short);
    assert!(BootIndex::decode(&short).is_err());
}

/// Issue #19: a version 4 index whose blob section claims to end near
/// `u64::MAX`. The check `end + BOOT_HEADER_LEN <= body` overflowed (a panic
/// in debug builds; in release the sum wrapped, passed, and slicing the boot
/// section panicked). The checksum is recomputed, as an attacker would.
#[test]
fn index_decode_refuses_boot_section_offsets_that_overflow() {
    let bytes = with_boot(small_index()).encode();
    let blob_off = get_u64(&bytes, hdr::BLOB_OFF);
    for end in [u64::MAX, u64::MAX - 1, u64::MAX - 31, u64::MAX - 32] {
        let mut b = bytes.clone();
        set_u64(&mut b, hdr::BLOB_LEN, end - blob_off);
        reseal(&mut b);
        let r = BootIndex::decode(&b);
        assert!(
            malformed_what(r).contains("do not fit"),
            "blob ending at {end}"
        );
    }
}

/// `small_index()` with boot content and its digests apart, as the boot
/// layer writer makes it (their entries in the first 1024 content bytes),
/// and the digests file.
pub(crate) fn with_digests_apart() -> (BootIndex, Vec<u8>) {
    let mut idx = with_boot_after(small_index(), 1024);
    let file = idx.digest_file().unwrap();
    idx.move_digests_out(1024);
    (idx, file)
}

#[test]
fn index_with_digests_apart_round_trips_as_version_5() {
    let inline = with_boot_after(small_index(), 1024);
    let (idx, file) = with_digests_apart();
    // Two digests (usr/bin/a and b; passwd's is a boot file's, yet still a
    // digest the caller chose to keep): the file is the magic and them.
    assert_eq!(file.len(), 8 + 3 * 32);
    assert!(idx.entries.iter().all(|e| e.digest.is_none()));
    let bytes = idx.encode();
    assert_eq!(get_u32(&bytes, hdr::VERSION), 5);
    assert_eq!(get_u32(&bytes, hdr::FLAGS), 3);
    // The index lost the digests' 32 bytes each and gained the 40-byte section.
    assert_eq!(bytes.len() + 3 * 32, inline.encode().len() + 40);
    let back = BootIndex::decode(&bytes).unwrap();
    assert_eq!(back, idx);
    assert_eq!(back.encode(), bytes);
    let x = back.external.as_ref().unwrap();
    assert_eq!(x.entries, vec![5, 11, 12]);
    assert_eq!(x.tar_len, 1024);
    // The file gives each entry its digest back, and nothing for the others.
    let table = x.table(&file).unwrap();
    for (i, e) in inline.entries.iter().enumerate() {
        assert_eq!(table.get(i as u32), e.digest, "entry {i}");
    }
    // A file that is not the one the index names is refused whole.
    let mut other = file.clone();
    other[20] ^= 1;
    assert!(x.table(&other).unwrap_err().to_string().contains("SHA-256"));
    assert!(x
        .table(&file[..file.len() - 32])
        .unwrap_err()
        .to_string()
        .contains("bytes"));
    let mut magic = file.clone();
    magic[0] = b'X';
    let mut x2 = x.clone();
    x2.sha256 = sha256(&magic);
    assert!(x2.table(&magic).unwrap_err().to_string().contains("magic"));
    // Digests inline stay version 4.
    assert_eq!(get_u32(&inline.encode(), hdr::VERSION), 4);
}

#[test]
fn index_decode_refuses_hostile_digests_section() {
    let (idx, _) = with_digests_apart();
    let bytes = idx.encode();
    let section = get_u64(&bytes, hdr::BLOB_OFF) as usize + get_u64(&bytes, hdr::BLOB_LEN) as usize;
    let edited = |f: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        f(&mut b);
        reseal(&mut b);
        BootIndex::decode(&b)
    };
    // Version 5 needs both flags; version 4 knows only the first.
    assert!(matches!(
        edited(&|b| set_u32(b, hdr::FLAGS, 1)),
        Err(IndexError::UnknownFlags { flags: 1 })
    ));
    assert!(matches!(
        edited(&|b| set_u32(b, hdr::VERSION, 4)),
        Err(IndexError::UnknownFlags { flags: 3 })
    ));
    // Where the file lies: whole tar blocks, before the first boot file.
    for tar_len in [0u64, 100, 2048, u64::MAX] {
        let r = edited(&|b| set_u64(b, section, tar_len));
        assert!(malformed_what(r).contains("digests section"), "{tar_len}");
    }
    // No entry flagged: nothing to keep apart.
    let r = edited(&|b| {
        for i in [5, 11, 12] {
            let at = record(b, i) + rec::FLAGS;
            b[at] &= !FLAG_DIGEST;
        }
    });
    assert!(malformed_what(r).contains("no entry"));
    // The flag on a directory is still refused.
    let r = edited(&|b| {
        let at = record(b, 1) + rec::FLAGS;
        b[at] |= FLAG_DIGEST;
    });
    assert!(malformed_what(r).contains("not a regular file"));
}
