//! OCI whiteouts become overlayfs whiteouts, proved against the kernel.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use lazylayer_layer::*;
use rustix::fs::{self as rfs, FileType};

fn is_whiteout(p: &Path) -> bool {
    match rfs::lstat(p) {
        Ok(st) => {
            FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice
                && rfs::major(st.st_rdev) == 0
                && rfs::minor(st.st_rdev) == 0
        }
        Err(_) => false,
    }
}

fn opaque_xattr(p: &Path) -> Option<Vec<u8>> {
    xattrs(p).get(&b"trusted.overlay.opaque"[..]).cloned()
}

#[test]
fn root_whiteouts_and_opaque_markers_become_overlayfs_metadata() {
    if skip_unless_root("root_whiteouts_and_opaque_markers_become_overlayfs_metadata") {
        return;
    }
    let mut t = RawTar::new();
    t.add(Raw::dir(b"d/"));
    t.add(Raw::file(b"d/.wh..wh..opq", b""));
    t.add(Raw::file(b"d/kept", b"k"));
    t.add(Raw::file(b".wh.x", b""));
    t.add(Raw::file(b"sub/deeper/.wh.y", b""));
    // Opaque marker in a directory the archive never lists.
    t.add(Raw::file(b"implied/.wh..wh..opq", b""));
    // Reserved names other than the opaque marker are plain entries.
    t.add(Raw::file(b".wh..wh.index", b"boot index"));
    t.add(Raw::file(b"d/.wh..wh.other", b"o"));
    let tar = t.finish();

    let sb = Sandbox::new();
    let mut events = Vec::new();
    extract(&tar[..], &sb.root, &ExtractOptions::default(), &mut |e| {
        events.push((e.path.to_path_buf(), e.kind))
    })
    .unwrap();
    let r = &sb.root;
    assert!(is_whiteout(&r.join("x")));
    assert!(!r.join(".wh.x").exists());
    assert!(is_whiteout(&r.join("sub/deeper/y")));
    assert_eq!(opaque_xattr(&r.join("d")).as_deref(), Some(&b"y"[..]));
    assert!(!r.join("d/.wh..wh..opq").exists());
    assert_eq!(std::fs::read(r.join("d/kept")).unwrap(), b"k");
    assert_eq!(opaque_xattr(&r.join("implied")).as_deref(), Some(&b"y"[..]));
    assert_eq!(opaque_xattr(&r.join("sub")), None);
    assert_eq!(
        std::fs::read(r.join(".wh..wh.index")).unwrap(),
        b"boot index"
    );
    assert_eq!(std::fs::read(r.join("d/.wh..wh.other")).unwrap(), b"o");
    assert!(events.contains(&(PathBuf::from("x"), EntryKind::Whiteout)));
    assert!(events.contains(&(PathBuf::from("d"), EntryKind::OpaqueDir)));
    assert!(events.contains(&(PathBuf::from(".wh..wh.index"), EntryKind::File)));
    sb.assert_outside_untouched();
}

#[test]
fn root_whiteout_replaces_an_earlier_entry_of_the_same_layer() {
    if skip_unless_root("root_whiteout_replaces_an_earlier_entry_of_the_same_layer") {
        return;
    }
    let mut t = RawTar::new();
    t.add(Raw::dir(b"gone/"));
    t.add(Raw::file(b"gone/child", b"c"));
    t.add(Raw::file(b".wh.gone", b""));
    let tar = t.finish();
    let sb = Sandbox::new();
    extract(&tar[..], &sb.root, &ExtractOptions::default(), &mut |_| {}).unwrap();
    assert!(is_whiteout(&sb.root.join("gone")));
}

#[test]
fn invalid_whiteout_names_are_refused() {
    for name in [&b".wh."[..], b".wh..", b"d/.wh..."] {
        let mut t = RawTar::new();
        t.add(Raw::file(name, b""));
        let tar = t.finish();
        let sb = Sandbox::new();
        let err = extract(&tar[..], &sb.root, &ExtractOptions::default(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(err, LayerError::InvalidWhiteout { .. }),
            "{}: {err}",
            String::from_utf8_lossy(name)
        );
    }
}

/// An overlayfs mount that is unmounted when dropped, even if the test panics.
struct OverlayMount {
    target: PathBuf,
}

impl OverlayMount {
    fn mount(lowers: &[&Path], target: &Path) -> std::io::Result<Self> {
        let lowerdir = lowers
            .iter()
            .map(|p| p.to_str().unwrap())
            .collect::<Vec<_>>()
            .join(":");
        let out = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("ro,lowerdir={lowerdir}"))
            .arg(target)
            .output()?;
        if !out.status.success() {
            return Err(std::io::Error::other(format!(
                "mount failed: {}",
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(OverlayMount {
            target: target.to_owned(),
        })
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.target)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !ok {
            eprintln!("warning: could not unmount {}", self.target.display());
        }
    }
}

fn overlay_supported() -> bool {
    std::fs::read_to_string("/proc/filesystems")
        .map(|s| s.lines().any(|l| l.trim_end().ends_with("overlay")))
        .unwrap_or(false)
}

/// End to end: two layers written by `LayerWriter`, extracted, and stacked by
/// the kernel's overlayfs. What the upper layer whites out or makes opaque
/// must vanish from the merged view; everything else must show.
#[test]
fn root_overlay_mount_hides_whiteouts_and_opaque_dirs() {
    if skip_unless_root("root_overlay_mount_hides_whiteouts_and_opaque_dirs") {
        return;
    }
    if !overlay_supported() {
        assert!(
            std::env::var_os("CI").is_none(),
            "root_overlay_mount_hides_whiteouts_and_opaque_dirs: kernel has no overlayfs"
        );
        eprintln!(
            "skipping root_overlay_mount_hides_whiteouts_and_opaque_dirs: kernel has no overlayfs"
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();

    // Lower layer source.
    let lsrc = t.join("lower-src");
    for d in ["opq/sub", "keep"] {
        std::fs::create_dir_all(lsrc.join(d)).unwrap();
    }
    for (f, c) in [
        ("x", "lower x"),
        ("y", "lower y"),
        ("opq/old", "old"),
        ("opq/sub/deep", "deep"),
        ("keep/file", "kept"),
    ] {
        std::fs::write(lsrc.join(f), c).unwrap();
    }
    let mut lower_blob = Vec::new();
    let mut w = LayerWriter::new(&mut lower_blob, Compression::Gzip);
    for p in [
        "x",
        "y",
        "opq",
        "opq/old",
        "opq/sub",
        "opq/sub/deep",
        "keep",
        "keep/file",
    ] {
        w.append_path(&lsrc, Path::new(p)).unwrap();
    }
    w.finish().unwrap();

    // Upper layer: delete x, make opq opaque with one new child, add to keep.
    let usrc = t.join("upper-src");
    std::fs::create_dir_all(usrc.join("opq")).unwrap();
    std::fs::create_dir_all(usrc.join("keep")).unwrap();
    std::fs::write(usrc.join("opq/new"), "new").unwrap();
    std::fs::write(usrc.join("keep/added"), "added").unwrap();
    let mut upper_blob = Vec::new();
    let mut w = LayerWriter::new(&mut upper_blob, Compression::Gzip);
    w.append_whiteout(Path::new("x")).unwrap();
    w.append_path(&usrc, Path::new("opq")).unwrap();
    w.append_opaque(Path::new("opq")).unwrap();
    w.append_path(&usrc, Path::new("opq/new")).unwrap();
    w.append_path(&usrc, Path::new("keep")).unwrap();
    w.append_path(&usrc, Path::new("keep/added")).unwrap();
    w.finish().unwrap();

    let lower = t.join("lower");
    let upper = t.join("upper");
    let merged = t.join("merged");
    for (blob, dir) in [(&lower_blob, &lower), (&upper_blob, &upper)] {
        std::fs::create_dir(dir).unwrap();
        extract(
            decoder(&blob[..], Compression::Gzip).unwrap(),
            dir,
            &ExtractOptions::default(),
            &mut |_| {},
        )
        .unwrap();
    }
    std::fs::create_dir(&merged).unwrap();

    let mount = OverlayMount::mount(&[&upper, &lower], &merged).unwrap();
    let ls = |rel: &str| {
        let mut v: Vec<String> = std::fs::read_dir(merged.join(rel))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(ls(""), ["keep", "opq", "y"], "x is whited out");
    assert!(!merged.join("x").exists());
    assert_eq!(ls("opq"), ["new"], "opaque dir hides the lower children");
    assert!(!merged.join("opq/sub/deep").exists());
    assert_eq!(ls("keep"), ["added", "file"], "non-opaque dirs merge");
    assert_eq!(
        std::fs::read_to_string(merged.join("y")).unwrap(),
        "lower y"
    );
    assert_eq!(
        std::fs::read_to_string(merged.join("opq/new")).unwrap(),
        "new"
    );
    assert_eq!(
        std::fs::read_to_string(merged.join("keep/file")).unwrap(),
        "kept"
    );
    drop(mount);
    assert!(
        std::fs::read_dir(&merged).unwrap().next().is_none(),
        "unmounted"
    );
}

/// A metadata entry (a reserved `.wh..wh.*` name) may carry its content in
/// `LAZYLAYER.data` PAX records of empty entries, which standard runtimes
/// skip and containers-storage can rebuild: the writer splits it into parts
/// named `NAME`, `NAME.1`, `NAME.2`, … (containers-storage fails on two
/// entries of one `.wh.` name), the extractor joins the parts that follow at
/// once into one file `NAME`; a part out of its place is a file of its own.
/// A malformed record, or a stray `%` in one, is an error; the records on
/// an ordinary name are not content.
#[test]
fn root_metadata_entries_carry_their_content_in_their_headers() {
    if skip_unless_root("root_metadata_entries_carry_their_content_in_their_headers") {
        return;
    }
    let big: Vec<u8> = (0..metadata::PART_BYTES * 2 + 100)
        .map(|i| (i % 253) as u8)
        .collect();
    let mut w = LayerWriter::new(Vec::new(), Compression::None);
    w.append_metadata(Path::new(".wh..wh.big"), 0o444, 0, &big)
        .unwrap();
    w.append_metadata(Path::new("d/.wh..wh.small"), 0o400, 7, b"small")
        .unwrap();
    assert!(matches!(
        w.append_metadata(Path::new("plain"), 0o444, 0, b"x"),
        Err(LayerError::NotMetadataName { .. })
    ));
    let (_, tar) = w.finish_into_inner().unwrap();
    // Three empty entries for the big one, one for the small: no content.
    let mut a = tar::Archive::new(&tar[..]);
    let sizes: Vec<(Vec<u8>, u64)> = a
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.path_bytes().into_owned(), e.size())
        })
        .collect();
    let names: Vec<&[u8]> = sizes.iter().map(|(n, _)| &n[..]).collect();
    assert_eq!(
        names,
        [
            &b".wh..wh.big"[..],
            b".wh..wh.big.1",
            b".wh..wh.big.2",
            b"d/.wh..wh.small"
        ]
    );
    assert!(sizes.iter().all(|(_, s)| *s == 0));

    let sb = Sandbox::new();
    let mut events = Vec::new();
    let stats = extract(&tar[..], &sb.root, &ExtractOptions::default(), &mut |e| {
        events.push((e.path.to_path_buf(), e.size))
    })
    .unwrap();
    let r = &sb.root;
    assert_eq!(std::fs::read(r.join(".wh..wh.big")).unwrap(), big);
    assert!(!r.join(".wh..wh.big.1").exists());
    assert_eq!(std::fs::read(r.join("d/.wh..wh.small")).unwrap(), b"small");
    let st = rfs::lstat(r.join("d/.wh..wh.small")).unwrap();
    assert_eq!((st.st_mode & 0o7777, st.st_mtime), (0o400, 7));
    assert_eq!(stats.file_bytes, big.len() as u64 + 5);
    assert_eq!(
        events.last(),
        Some(&(PathBuf::from("d/.wh..wh.small"), 5)),
        "{events:?}"
    );

    // A part after another entry, or out of order, is a file of its own;
    // the same name again starts the file anew.
    let mut t = RawTar::new();
    t.pax(&[("LAZYLAYER.data", b"first")]);
    t.add(Raw::file(b".wh..wh.x", b""));
    t.add(Raw::file(b"between", b"b"));
    t.pax(&[("LAZYLAYER.data", b"late")]);
    t.add(Raw::file(b".wh..wh.x.1", b""));
    t.pax(&[("LAZYLAYER.data", b"skipped")]);
    t.add(Raw::file(b".wh..wh.x.3", b""));
    t.pax(&[("LAZYLAYER.data", b"sec%0A=%25ond\0")]);
    t.add(Raw::file(b".wh..wh.x", b""));
    // On an ordinary name, or on an entry with content, the record is no content.
    t.pax(&[("LAZYLAYER.data", b"ignored")]);
    t.add(Raw::file(b"ordinary", b""));
    t.pax(&[("LAZYLAYER.data", b"ignored")]);
    t.add(Raw::file(b".wh..wh.y", b"own"));
    let sb = Sandbox::new();
    extract(
        &t.finish()[..],
        &sb.root,
        &ExtractOptions::default(),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(
        std::fs::read(sb.root.join(".wh..wh.x")).unwrap(),
        b"sec\n=%ond\0"
    );
    assert_eq!(std::fs::read(sb.root.join(".wh..wh.x.1")).unwrap(), b"late");
    assert_eq!(
        std::fs::read(sb.root.join(".wh..wh.x.3")).unwrap(),
        b"skipped"
    );
    assert_eq!(std::fs::read(sb.root.join("ordinary")).unwrap(), b"");
    assert_eq!(std::fs::read(sb.root.join(".wh..wh.y")).unwrap(), b"own");

    // The extractor refuses the archive and leaves no file behind.
    let refused = |t: &mut RawTar| {
        let sb = Sandbox::new();
        let err = extract(
            &t.finish()[..],
            &sb.root,
            &ExtractOptions::default(),
            &mut |_| {},
        );
        assert!(!sb.root.join(".wh..wh.x").exists());
        sb.assert_outside_untouched();
        match err {
            Err(LayerError::BadPaxRecord { key, .. }) => key,
            other => panic!("{other:?}"),
        }
    };
    let mut t = RawTar::new();
    t.extension(
        tar::EntryType::XHeader,
        b"PaxHeaders/x",
        b"99 LAZYLAYER.data=short\n",
    );
    t.add(Raw::file(b".wh..wh.x", b""));
    refused(&mut t);
    let mut t = RawTar::new();
    t.pax(&[("LAZYLAYER.data", b"100%")]);
    t.add(Raw::file(b".wh..wh.x", b""));
    assert_eq!(refused(&mut t), "LAZYLAYER.data");
}
