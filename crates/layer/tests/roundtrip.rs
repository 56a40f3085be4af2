//! Build a tree, write it with `LayerWriter`, extract it, compare field by field.

mod common;

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use common::*;
use lazylayer_layer::*;
use rustix::fs::{self as rfs, AtFlags, FileType, Mode, Timespec, Timestamps, XattrFlags};
use sha2::{Digest, Sha256};

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn chown(p: &Path, uid: u32, gid: u32) {
    rfs::chownat(
        rfs::CWD,
        p,
        Some(rfs::Uid::from_raw_unchecked(uid)),
        Some(rfs::Gid::from_raw_unchecked(gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .unwrap();
}

fn chmod(p: &Path, mode: u32) {
    rfs::chmod(p, Mode::from_raw_mode(mode)).unwrap();
}

fn file(p: &Path, data: &[u8], mode: u32, uid: u32, gid: u32) {
    std::fs::write(p, data).unwrap();
    chown(p, uid, gid);
    chmod(p, mode);
}

fn dir(p: &Path, mode: u32, uid: u32, gid: u32) {
    std::fs::create_dir(p).unwrap();
    chown(p, uid, gid);
    chmod(p, mode);
}

fn node(p: &Path, ft: FileType, mode: u32, major: u32, minor: u32) {
    rfs::mknodat(
        rfs::CWD,
        p,
        ft,
        Mode::from_raw_mode(mode),
        rfs::makedev(major, minor),
    )
    .unwrap();
    chmod(p, mode);
}

fn symlink(target: &[u8], p: &Path) {
    rfs::symlinkat(OsStr::from_bytes(target), rfs::CWD, p).unwrap();
}

fn setxattr(p: &Path, name: &str, value: &[u8]) {
    rfs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
}

/// A tree exercising every entry type and metadata field the codec carries.
fn build_tree(t: &Path) {
    dir(t, 0o751, 0, 0);
    setxattr(t, "user.root-attr", b"top");
    dir(&t.join("bin"), 0o755, 0, 0);
    file(&t.join("bin/tool"), &[7u8; 1000], 0o4755, 0, 0);
    std::fs::hard_link(t.join("bin/tool"), t.join("bin/tool-again")).unwrap();
    dir(&t.join("etc"), 0o2775, 10, 20);
    file(&t.join("etc/conf"), b"key=value\n", 0o640, 1000, 1001);
    setxattr(&t.join("etc/conf"), "user.comment", b"hello");
    setxattr(&t.join("etc/conf"), "trusted.binary", b"\0\x01\xff");
    setxattr(
        &t.join("etc/conf"),
        "security.capability-like",
        b"not-really",
    );
    symlink(b"conf", &t.join("etc/rel-link"));
    symlink(b"/etc/passwd", &t.join("etc/abs-link"));
    symlink(b"../nowhere", &t.join("etc/dangling"));
    std::fs::hard_link(t.join("etc/rel-link"), t.join("etc/rel-link-hard")).unwrap();
    chown(&t.join("etc/rel-link"), 5, 6);
    setxattr(&t.join("etc/rel-link"), "trusted.on-symlink", b"s");
    dir(&t.join("tmp"), 0o1777, 0, 0);
    dir(&t.join("empty"), 0o700, 7, 8);
    setxattr(&t.join("empty"), "user.dirattr", &[b'v'; 300]);
    dir(&t.join("dev"), 0o755, 0, 0);
    node(&t.join("dev/null"), FileType::CharacterDevice, 0o666, 1, 3);
    node(
        &t.join("dev/weird"),
        FileType::CharacterDevice,
        0o600,
        300,
        70000,
    );
    node(&t.join("dev/loop0"), FileType::BlockDevice, 0o660, 7, 0);
    chown(&t.join("dev/loop0"), 0, 6);
    node(&t.join("dev/fifo"), FileType::Fifo, 0o620, 0, 0);
    chown(&t.join("dev/fifo"), 33, 33);
    setxattr(&t.join("dev/fifo"), "trusted.on-fifo", b"f");
    // Ids beyond ustar's 7 octal digits need PAX records.
    dir(&t.join("big"), 0o755, 3_000_000, 4_000_000);
    file(&t.join("big/ids"), b"", 0o644, 2_097_152, 70_000);
    file(&t.join("big/513"), &[b'z'; 513], 0o644, 0, 0);
    // Long names: a prefix/name split, a component over 100 bytes (PAX path),
    // a path over 255 bytes, a long symlink target.
    let d120 = "d".repeat(120);
    dir(&t.join(&d120), 0o755, 0, 0);
    file(&t.join(&d120).join("f".repeat(90)), b"split", 0o644, 0, 0);
    file(
        &t.join(&d120).join("g".repeat(150)),
        b"pax path",
        0o644,
        0,
        0,
    );
    let deep = t.join(&d120).join("e".repeat(100)).join("h".repeat(100));
    std::fs::create_dir_all(&deep).unwrap();
    file(&deep.join("leaf"), b"deep", 0o600, 0, 0);
    symlink("t".repeat(200).as_bytes(), &t.join("long-target"));
    // A name that is not UTF-8.
    file(
        &t.join(OsStr::from_bytes(b"caf\xe9")),
        b"latin1",
        0o644,
        0,
        0,
    );
    file(&t.join("empty-file"), b"", 0o444, 0, 0);

    // Distinct mtimes everywhere (after all creation, which moves dir mtimes).
    let snap = snapshot(t);
    for (i, rel) in snap.nodes.keys().enumerate() {
        let p = if rel.as_os_str().is_empty() {
            t.to_path_buf()
        } else {
            t.join(rel)
        };
        let ts = Timespec {
            tv_sec: 1_500_000_000 + 37 * i as i64,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: ts,
            last_modification: ts,
        };
        rfs::utimensat(rfs::CWD, &p, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    }
}

/// Write every path of `tree` (parents first) into a layer.
fn write_layer(tree: &Path, c: Compression) -> (Vec<u8>, LayerDigests) {
    let mut blob = Vec::new();
    let mut w = LayerWriter::new(&mut blob, c);
    for rel in snapshot(tree).nodes.keys() {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel.as_path()
        };
        w.append_path(tree, rel).unwrap();
    }
    let d = w.finish().unwrap();
    (blob, d)
}

fn extract_blob(
    blob: &[u8],
    c: Compression,
    dst: &Path,
) -> (ExtractStats, Vec<(PathBuf, EntryKind, u64)>) {
    let mut events = Vec::new();
    let stats = extract(
        decoder(blob, c).unwrap(),
        dst,
        &ExtractOptions::default(),
        &mut |e: &EntryEvent<'_>| events.push((e.path.to_path_buf(), e.kind, e.size)),
    )
    .unwrap();
    (stats, events)
}

fn round_trip(c: Compression) {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build_tree(&tree);
    let want = snapshot(&tree);

    let (blob, digests) = write_layer(&tree, c);
    assert_eq!(Compression::sniff(&blob), c);
    assert_eq!(digests.digest, sha(&blob));
    assert_eq!(digests.size, blob.len() as u64);
    let mut tar = Vec::new();
    decoder(&blob[..], c)
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    assert_eq!(digests.diff_id, sha(&tar));
    if c == Compression::None {
        assert_eq!(digests.digest, digests.diff_id);
    }

    let dst = tmp.path().join("layer");
    std::fs::create_dir(&dst).unwrap();
    let (stats, events) = extract_blob(&blob, c, &dst);
    assert_same_tree(&want, &snapshot(&dst));

    assert_eq!(stats.tar_bytes, tar.len() as u64);
    assert_eq!(stats.entries, want.nodes.len() as u64);
    let first_names: u64 = {
        let mut seen = BTreeSet::new();
        let st_of = |rel: &Path| rfs::lstat(tree.join(rel)).unwrap();
        want.nodes
            .iter()
            .filter(|(_, n)| n.size.is_some())
            .filter(|(rel, _)| seen.insert(st_of(rel).st_ino))
            .map(|(_, n)| n.size.unwrap())
            .sum()
    };
    assert_eq!(stats.file_bytes, first_names);
    let evpaths: BTreeSet<_> = events.iter().map(|e| e.0.clone()).collect();
    let want_paths: BTreeSet<_> = want.nodes.keys().cloned().collect();
    assert_eq!(evpaths, want_paths);
    assert_eq!(events.len(), want.nodes.len(), "each entry reported once");
    let kind_of = |p: &str| events.iter().find(|e| e.0 == Path::new(p)).unwrap().1;
    assert_eq!(kind_of("bin/tool-again"), EntryKind::Hardlink);
    assert_eq!(kind_of("dev/fifo"), EntryKind::Fifo);
    assert_eq!(kind_of("dev/loop0"), EntryKind::BlockDevice);
    assert_eq!(
        events
            .iter()
            .find(|e| e.0 == Path::new("bin/tool-again"))
            .unwrap()
            .2,
        1000,
        "hardlink event reports the target's size"
    );
}

#[test]
fn root_round_trip_gzip() {
    if skip_unless_root("root_round_trip_gzip") {
        return;
    }
    round_trip(Compression::Gzip);
}

#[test]
fn root_round_trip_zstd() {
    if skip_unless_root("root_round_trip_zstd") {
        return;
    }
    round_trip(Compression::Zstd);
}

#[test]
fn root_round_trip_uncompressed() {
    if skip_unless_root("root_round_trip_uncompressed") {
        return;
    }
    round_trip(Compression::None);
}

/// Reading a layer compressed by the zstd crate's own encoder (as another
/// tool would write it), in two frames.
#[test]
fn root_extracts_foreign_zstd_stream() {
    if skip_unless_root("root_extracts_foreign_zstd_stream") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    build_tree(&tree);
    let (tar, _) = write_layer(&tree, Compression::None);
    let (a, b) = tar.split_at(tar.len() / 2);
    let mut blob = zstd::encode_all(a, 19).unwrap();
    blob.extend(zstd::encode_all(b, 1).unwrap());
    let dst = tmp.path().join("layer");
    std::fs::create_dir(&dst).unwrap();
    let (stats, _) = extract_blob(&blob, Compression::Zstd, &dst);
    assert_eq!(stats.tar_bytes, tar.len() as u64);
    assert_same_tree(&snapshot(&tree), &snapshot(&dst));
}

/// GNU long-name and long-link headers, as `tar::Builder` (and GNU tar) write
/// them, rather than our PAX records.
#[test]
fn extracts_gnu_long_names_and_links() {
    let long_dir = "l".repeat(150);
    let long_file = format!("{long_dir}/{}", "m".repeat(120));
    let long_target = "q".repeat(180);
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, &long_dir, &b""[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_mode(0o600);
    h.set_size(5);
    b.append_data(&mut h, &long_file, &b"hello"[..]).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    b.append_link(&mut h, "sym", &long_target).unwrap();
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    b.append_link(&mut h, "hard", &long_file).unwrap();
    let tar = b.into_inner().unwrap();

    let sb = Sandbox::new();
    let opts = ExtractOptions {
        chown: false,
        ..Default::default()
    };
    extract(&tar[..], &sb.root, &opts, &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(sb.root.join(&long_file)).unwrap(), b"hello");
    assert_eq!(
        std::fs::read_link(sb.root.join("sym")).unwrap(),
        PathBuf::from(&long_target)
    );
    let a = rfs::lstat(sb.root.join(&long_file)).unwrap();
    let h = rfs::lstat(sb.root.join("hard")).unwrap();
    assert_eq!((a.st_ino, a.st_nlink), (h.st_ino, 2));
    assert_eq!(a.st_mode & 0o7777, 0o600);
}

/// PAX records we do not write ourselves: fractional mtime, a path override
/// and a linkpath override.
#[test]
fn extracts_pax_overrides() {
    let mut t = RawTar::new();
    t.pax(&[("path", b"real/name.txt"), ("mtime", b"1234567890.25")]);
    t.add(Raw::file(b"short", b"data"));
    t.pax(&[("linkpath", b"real/name.txt")]);
    t.add(Raw::symlink(b"sym", b"ignored"));
    let tar = t.finish();
    let sb = Sandbox::new();
    let opts = ExtractOptions {
        chown: false,
        ..Default::default()
    };
    let stats = extract(&tar[..], &sb.root, &opts, &mut |_| {}).unwrap();
    assert_eq!(stats.entries, 2);
    let st = rfs::lstat(sb.root.join("real/name.txt")).unwrap();
    assert_eq!(
        (st.st_mtime, st.st_mtime_nsec),
        (1_234_567_890, 250_000_000)
    );
    assert!(!sb.root.join("short").exists());
    assert_eq!(
        std::fs::read_link(sb.root.join("sym")).unwrap(),
        Path::new("real/name.txt")
    );
    // The implied parent directory is 0755.
    let st = rfs::lstat(sb.root.join("real")).unwrap();
    assert_eq!(st.st_mode & 0o7777, 0o755);
}

/// A binary xattr value may hold a newline byte: a file capability of
/// CAP_DAC_OVERRIDE and CAP_FOWNER is `0x0a` in its permitted set (a real
/// image's telegraf binary carries one; containerd and Podman apply it). A
/// PAX record is length-prefixed, so the value is read whole, and records
/// after it (here the path) still apply; the writer's own output of such a
/// file reads back the same.
#[test]
fn root_binary_xattr_values_with_newline_bytes_extract() {
    if skip_unless_root("root_binary_xattr_values_with_newline_bytes_extract") {
        return;
    }
    // VFS_CAP_REVISION_2 | effective; permitted 0x0a (bits 1 and 3).
    let cap: &[u8] = &[
        0x01, 0x00, 0x00, 0x02, 0x0a, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x00, 0x00, 0x00,
    ];
    let long = format!("usr/local/{}/bin/agent", "d".repeat(120));
    let mut t = RawTar::new();
    t.pax(&[
        ("SCHILY.xattr.security.capability", cap),
        ("SCHILY.xattr.user.note", b"two\nlines\n"),
        ("path", long.as_bytes()),
    ]);
    t.add(Raw::file(b"short-name", b"#!/bin/sh\n"));
    let tar = t.finish();
    let sb = Sandbox::new();
    extract(&tar[..], &sb.root, &ExtractOptions::default(), &mut |_| {}).unwrap();
    let file = sb.root.join(&long);
    assert!(!sb.root.join("short-name").exists());
    let got = xattrs(&file);
    assert_eq!(
        got.get(&b"security.capability"[..]).map(|v| &v[..]),
        Some(cap)
    );
    assert_eq!(
        got.get(&b"user.note"[..]).map(|v| &v[..]),
        Some(&b"two\nlines\n"[..])
    );

    // Written by the layer writer from that file, and read back.
    let (blob, _) = write_layer(&sb.root, Compression::None);
    let back = Sandbox::new();
    extract(
        &blob[..],
        &back.root,
        &ExtractOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    let again = xattrs(&back.root.join(&long));
    assert_eq!(
        again.get(&b"security.capability"[..]).map(|v| &v[..]),
        Some(cap)
    );
}

#[test]
fn root_writer_is_deterministic() {
    if skip_unless_root("root_writer_is_deterministic") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    build_tree(&a);
    build_tree(&b);
    for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
        let (blob_a, da) = write_layer(&a, c);
        // Same tree, written again.
        let (blob_a2, da2) = write_layer(&a, c);
        assert_eq!(blob_a, blob_a2, "{c:?}: same tree twice");
        assert_eq!(da, da2);
        // An identical tree built elsewhere (other inodes, other ctimes).
        let (blob_b, db) = write_layer(&b, c);
        assert_eq!(da, db, "{c:?}: identical trees differ");
        assert_eq!(blob_a, blob_b);
    }

    // Reading a file changes its atime (forced here), which must not matter.
    let (_, before) = write_layer(&a, Compression::Gzip);
    let ts = Timespec {
        tv_sec: 1_900_000_000,
        tv_nsec: 0,
    };
    let times = Timestamps {
        last_access: ts,
        last_modification: Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
    };
    rfs::utimensat(rfs::CWD, a.join("etc/conf"), &times, AtFlags::empty()).unwrap();
    let (_, after) = write_layer(&a, Compression::Gzip);
    assert_eq!(before, after, "atime leaked into the layer");

    // ...while an mtime change must show (the check above can fail).
    let times = Timestamps {
        last_access: ts,
        last_modification: ts,
    };
    rfs::utimensat(rfs::CWD, a.join("etc/conf"), &times, AtFlags::empty()).unwrap();
    let (_, changed) = write_layer(&a, Compression::Gzip);
    assert_ne!(before.digest, changed.digest);
    assert_ne!(before.diff_id, changed.diff_id);
}

/// PAX headers only where ustar cannot express the entry; no user/group names.
#[test]
fn writer_uses_pax_only_where_needed() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::create_dir(t.join("d")).unwrap();
    std::fs::write(t.join("d/plain"), b"x").unwrap();
    std::fs::write(t.join("x".repeat(130)), b"y").unwrap();
    let mut blob = Vec::new();
    let mut w = LayerWriter::new(&mut blob, Compression::None);
    w.append_path(t, Path::new("d")).unwrap();
    w.append_path(t, Path::new("./d//plain")).unwrap();
    w.append_path(t, Path::new(&"x".repeat(130))).unwrap();
    w.append_bytes(Path::new(".wh..wh.index"), 0o644, 0, b"index")
        .unwrap();
    w.append_whiteout(Path::new("d/gone")).unwrap();
    w.append_opaque(Path::new("d")).unwrap();
    w.finish().unwrap();

    let mut ar = tar::Archive::new(&blob[..]);
    /// (type, path, uname, gname) of each raw header.
    type RawHeader = (tar::EntryType, Vec<u8>, Vec<u8>, Vec<u8>);
    let raw: Vec<RawHeader> = ar
        .entries()
        .unwrap()
        .raw(true)
        .map(|e| {
            let e = e.unwrap();
            let h = e.header();
            let u = h.as_ustar().expect("ustar headers");
            (
                h.entry_type(),
                h.path_bytes().into_owned(),
                u.uname.to_vec(),
                u.gname.to_vec(),
            )
        })
        .collect();
    let kinds: Vec<_> = raw.iter().map(|r| r.0).collect();
    use tar::EntryType::*;
    assert_eq!(
        kinds,
        [Directory, Regular, XHeader, Regular, Regular, Regular, Regular],
        "exactly one PAX header, for the long name"
    );
    let names: Vec<_> = raw
        .iter()
        .map(|r| String::from_utf8_lossy(&r.1).into_owned())
        .collect();
    assert_eq!(names[0], "d/");
    assert_eq!(names[1], "d/plain");
    assert_eq!(names[4], ".wh..wh.index");
    assert_eq!(names[5], "d/.wh.gone");
    assert_eq!(names[6], "d/.wh..wh..opq");
    assert!(raw
        .iter()
        .all(|r| r.2.iter().all(|&b| b == 0) && r.3.iter().all(|&b| b == 0)));
}

#[test]
fn writer_refuses_unsafe_relative_paths_and_sockets() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = LayerWriter::new(Vec::new(), Compression::None);
    assert!(matches!(
        w.append_path(tmp.path(), Path::new("../x")),
        Err(LayerError::ParentComponent { .. })
    ));
    assert!(matches!(
        w.append_path(tmp.path(), Path::new("/etc")),
        Err(LayerError::AbsolutePath { .. })
    ));
    let sock = tmp.path().join("sock");
    let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    assert!(matches!(
        w.append_path(tmp.path(), Path::new("sock")),
        Err(LayerError::UnsupportedFileType { kind: "socket", .. })
    ));
}

/// `trusted.overlay.*` describes the source's overlay mount, not the file:
/// the writer must not copy it into the layer.
#[test]
fn root_writer_drops_overlay_xattrs() {
    if skip_unless_root("root_writer_drops_overlay_xattrs") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    std::fs::create_dir(t.join("d")).unwrap();
    setxattr(&t.join("d"), "trusted.overlay.opaque", b"y");
    setxattr(&t.join("d"), "user.keep", b"1");
    setxattr(&t.join("d"), "trusted.keep", b"2");
    let mut blob = Vec::new();
    let mut w = LayerWriter::new(&mut blob, Compression::None);
    w.append_path(t, Path::new("d")).unwrap();
    w.finish().unwrap();

    let mut ar = tar::Archive::new(&blob[..]);
    let mut entries = ar.entries().unwrap();
    let mut e = entries.next().unwrap().unwrap();
    let keys: Vec<String> = e
        .pax_extensions()
        .unwrap()
        .expect("xattrs need a PAX header")
        .map(|r| r.unwrap().key().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        ["SCHILY.xattr.trusted.keep", "SCHILY.xattr.user.keep"]
    );
}
