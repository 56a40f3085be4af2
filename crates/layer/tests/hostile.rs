//! Hostile archives: each must fail with its specific error (or be neutralised)
//! and leave everything outside the layer root as it was.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use lazylayer_layer::*;
use rustix::fs::{self as rfs, FileType};
use tar::EntryType;

fn opts() -> ExtractOptions {
    ExtractOptions {
        chown: is_root(),
        ..Default::default()
    }
}

fn run(sb: &Sandbox, tar: &[u8], o: &ExtractOptions) -> Result<ExtractStats, LayerError> {
    extract(tar, &sb.root, o, &mut |_| {})
}

/// Extract `entries` into a fresh sandbox and return the error, having
/// checked that nothing outside the root changed.
fn refused(entries: &[Raw<'_>]) -> LayerError {
    let mut t = RawTar::new();
    for e in entries {
        t.add(Raw { ..*e });
    }
    let tar = t.finish();
    let sb = Sandbox::new();
    let err = run(&sb, &tar, &opts()).expect_err("hostile archive accepted");
    sb.assert_outside_untouched();
    err
}

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

#[test]
fn parent_components_are_refused() {
    for name in ["../evil", "a/../../evil", "a/..", "./../evil"] {
        let err = refused(&[Raw::file(name.as_bytes(), b"x")]);
        match err {
            LayerError::ParentComponent { path } => assert_eq!(path, p(name)),
            e => panic!("{name}: {e}"),
        }
    }
}

#[test]
fn absolute_paths_are_refused() {
    let name = "/lazylayer-test-abs/evil";
    let err = refused(&[Raw::file(name.as_bytes(), b"x")]);
    assert!(
        matches!(err, LayerError::AbsolutePath { ref path } if path == &p(name)),
        "{err}"
    );
    assert!(!Path::new("/lazylayer-test-abs").exists());
}

#[test]
fn writing_through_a_symlink_to_outside_is_refused() {
    let sb = Sandbox::new();
    let target = sb.outside_str();
    let mut t = RawTar::new();
    t.add(Raw::symlink(b"link", target.as_bytes()));
    t.add(Raw::file(b"link/evil", b"x"));
    let tar = t.finish();
    let err = run(&sb, &tar, &opts()).unwrap_err();
    assert!(
        matches!(err, LayerError::ThroughSymlink { ref path } if path == &p("link/evil")),
        "{err}"
    );
    sb.assert_outside_untouched();
}

#[test]
fn writing_through_a_parent_symlink_is_refused() {
    let err = refused(&[Raw::symlink(b"d", b".."), Raw::file(b"d/evil", b"x")]);
    assert!(
        matches!(err, LayerError::ThroughSymlink { ref path } if path == &p("d/evil")),
        "{err}"
    );
    // Also as a directory and a symlink created through it.
    let err = refused(&[Raw::symlink(b"d", b".."), Raw::dir(b"d/newdir/")]);
    assert!(matches!(err, LayerError::ThroughSymlink { .. }), "{err}");
    let err = refused(&[Raw::symlink(b"d", b"/"), Raw::symlink(b"d/x", b"y")]);
    assert!(matches!(err, LayerError::ThroughSymlink { .. }), "{err}");
    // An opaque marker may not mark a directory reached through a symlink.
    let err = refused(&[Raw::symlink(b"d", b".."), Raw::file(b"d/.wh..wh..opq", b"")]);
    assert!(matches!(err, LayerError::ThroughSymlink { .. }), "{err}");
    // Nor a whiteout be created through one.
    let err = refused(&[Raw::symlink(b"d", b".."), Raw::file(b"d/.wh.outside", b"")]);
    assert!(matches!(err, LayerError::ThroughSymlink { .. }), "{err}");
}

#[test]
fn hardlinks_out_of_the_layer_are_refused() {
    for target in [
        &b"../outside/secret"[..],
        b"/etc/passwd",
        b"a/../../outside/secret",
    ] {
        let err = refused(&[Raw::hardlink(b"h", target)]);
        assert!(
            matches!(err, LayerError::HardlinkEscape { ref path, .. } if path == &p("h")),
            "{err}"
        );
    }
    // Absolute path to the sandbox's own outside file.
    let sb = Sandbox::new();
    let secret = format!("{}/secret", sb.outside_str());
    let mut t = RawTar::new();
    t.add(Raw::hardlink(b"h", secret.as_bytes()));
    let err = run(&sb, &t.finish(), &opts()).unwrap_err();
    assert!(matches!(err, LayerError::HardlinkEscape { .. }), "{err}");
    assert!(!sb.root.join("h").exists());
    sb.assert_outside_untouched();
}

#[test]
fn hardlinks_through_a_symlinked_dir_are_refused() {
    let sb = Sandbox::new();
    let out = sb.outside_str();
    let mut t = RawTar::new();
    t.add(Raw::symlink(b"s", out.as_bytes()));
    t.add(Raw::hardlink(b"h", b"s/secret"));
    let err = run(&sb, &t.finish(), &opts()).unwrap_err();
    assert!(
        matches!(err, LayerError::HardlinkEscape { ref path, ref target } if path == &p("h") && target == &p("s/secret")),
        "{err}"
    );
    assert!(!sb.root.join("h").exists());
    sb.assert_outside_untouched();

    // Even a symlink that stays inside the layer is not followed.
    let err = refused(&[
        Raw::file(b"f", b"x"),
        Raw::symlink(b"s", b"."),
        Raw::hardlink(b"h", b"s/f"),
    ]);
    assert!(matches!(err, LayerError::HardlinkEscape { .. }), "{err}");
}

#[test]
fn hardlinks_to_missing_or_directories_are_refused() {
    let err = refused(&[Raw::hardlink(b"h", b"nothing")]);
    assert!(
        matches!(err, LayerError::HardlinkTargetMissing { .. }),
        "{err}"
    );
    let err = refused(&[Raw::hardlink(b"h", b"no/such/dir")]);
    assert!(
        matches!(err, LayerError::HardlinkTargetMissing { .. }),
        "{err}"
    );
    let err = refused(&[Raw::dir(b"d/"), Raw::hardlink(b"h", b"d")]);
    assert!(
        matches!(err, LayerError::HardlinkToDirectory { .. }),
        "{err}"
    );
    let err = refused(&[Raw::hardlink(b"h", b".")]);
    assert!(
        matches!(err, LayerError::HardlinkToDirectory { .. }),
        "{err}"
    );
}

#[test]
fn hardlink_to_a_symlink_links_the_symlink_itself() {
    let sb = Sandbox::new();
    let out = format!("{}/secret", sb.outside_str());
    let mut t = RawTar::new();
    t.add(Raw::symlink(b"s", out.as_bytes()));
    t.add(Raw::hardlink(b"h", b"s"));
    run(&sb, &t.finish(), &opts()).unwrap();
    let st = rfs::lstat(sb.root.join("h")).unwrap();
    assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Symlink);
    assert_eq!(st.st_nlink, 2);
    sb.assert_outside_untouched();
}

/// A node at `x` followed by a regular file `x`: the file replaces it, the
/// node is never opened for writing.
#[test]
fn root_device_node_is_replaced_not_written() {
    if skip_unless_root("root_device_node_is_replaced_not_written") {
        return;
    }
    let mut t = RawTar::new();
    t.add(Raw {
        dev: (1, 3),
        ..Raw::new(b"x", EntryType::Char)
    });
    t.add(Raw::file(b"x", b"data"));
    let sb = Sandbox::new();
    run(&sb, &t.finish(), &opts()).unwrap();
    let st = rfs::lstat(sb.root.join("x")).unwrap();
    assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::RegularFile);
    assert_eq!(std::fs::read(sb.root.join("x")).unwrap(), b"data");
    sb.assert_outside_untouched();
}

/// A fifo at `x` followed by a file `x`: opening the fifo for writing would
/// block forever, so finishing at all shows it was replaced.
#[test]
fn fifo_is_replaced_not_opened() {
    let mut t = RawTar::new();
    t.add(Raw::new(b"x", EntryType::Fifo));
    t.add(Raw::file(b"x", b"data"));
    let tar = t.finish();
    let sb = Sandbox::new();
    let root = sb.root.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let o = ExtractOptions {
            chown: false,
            ..Default::default()
        };
        let _ = tx.send(extract(&tar[..], &root, &o, &mut |_| {}).map(|_| ()));
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("extraction hung: the fifo was opened")
        .unwrap();
    let st = rfs::lstat(sb.root.join("x")).unwrap();
    assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::RegularFile);
    assert_eq!(std::fs::read(sb.root.join("x")).unwrap(), b"data");
}

#[test]
fn symlink_then_file_replaces_the_symlink() {
    let sb = Sandbox::new();
    let secret = format!("{}/secret", sb.outside_str());
    let out = sb.outside_str();
    let mut t = RawTar::new();
    t.add(Raw::symlink(b"x", secret.as_bytes()));
    t.add(Raw::file(b"x", b"overwritten?"));
    // A symlinked dir replaced by a real one keeps later children inside.
    t.add(Raw::symlink(b"d", out.as_bytes()));
    t.add(Raw::dir(b"d/"));
    t.add(Raw::file(b"d/secret", b"inside"));
    run(&sb, &t.finish(), &opts()).unwrap();
    assert_eq!(std::fs::read(sb.root.join("x")).unwrap(), b"overwritten?");
    assert_eq!(std::fs::read(sb.root.join("d/secret")).unwrap(), b"inside");
    let st = rfs::lstat(sb.root.join("d")).unwrap();
    assert_eq!(FileType::from_raw_mode(st.st_mode), FileType::Directory);
    sb.assert_outside_untouched();
}

#[test]
fn dir_replaced_by_file_and_file_by_dir() {
    let mut t = RawTar::new();
    t.add(Raw::dir(b"a/"));
    t.add(Raw::dir(b"a/b/"));
    t.add(Raw::file(b"a/b/c", b"c"));
    t.add(Raw::file(b"a", b"now a file"));
    t.add(Raw::file(b"f", b"f"));
    t.add(Raw::dir(b"f/"));
    t.add(Raw::file(b"f/g", b"g"));
    let sb = Sandbox::new();
    run(&sb, &t.finish(), &opts()).unwrap();
    assert_eq!(std::fs::read(sb.root.join("a")).unwrap(), b"now a file");
    assert_eq!(std::fs::read(sb.root.join("f/g")).unwrap(), b"g");
    sb.assert_outside_untouched();
}

#[test]
fn path_through_a_regular_file_is_refused() {
    let err = refused(&[Raw::file(b"f", b"x"), Raw::file(b"f/g", b"y")]);
    assert!(
        matches!(err, LayerError::NotADirectory { ref path } if path == &p("f/g")),
        "{err}"
    );
}

#[test]
fn non_directory_root_entry_is_refused() {
    let err = refused(&[Raw::file(b".", b"")]);
    assert!(matches!(err, LayerError::RootEntry { .. }), "{err}");
    let err = refused(&[Raw::symlink(b".", b"/etc")]);
    assert!(matches!(err, LayerError::RootEntry { .. }), "{err}");
}

#[test]
fn nul_in_a_pax_path_is_refused() {
    let mut t = RawTar::new();
    t.pax(&[("path", b"a\0b")]);
    t.add(Raw::file(b"placeholder", b"x"));
    let sb = Sandbox::new();
    let err = run(&sb, &t.finish(), &opts()).unwrap_err();
    assert!(matches!(err, LayerError::NulInPath { .. }), "{err}");
}

#[test]
fn overlay_xattrs_from_the_archive_are_ignored() {
    if skip_unless_root("overlay_xattrs_from_the_archive_are_ignored") {
        return;
    }
    let mut t = RawTar::new();
    t.pax(&[
        ("SCHILY.xattr.trusted.overlay.redirect", b"/etc"),
        ("SCHILY.xattr.trusted.overlay.opaque", b"y"),
        ("SCHILY.xattr.user.kept", b"1"),
    ]);
    t.add(Raw::dir(b"d/"));
    let sb = Sandbox::new();
    run(&sb, &t.finish(), &opts()).unwrap();
    let x = xattrs(&sb.root.join("d"));
    assert_eq!(
        x.keys().cloned().collect::<Vec<_>>(),
        [b"user.kept".to_vec()]
    );
}

#[test]
fn truncated_file_data_is_an_error_not_a_short_file() {
    let mut t = RawTar::new();
    t.add(Raw::file(b"whole", b"w"));
    t.add(Raw {
        declared_size: Some(10_000),
        ..Raw::file(b"cut", &[b'c'; 3000])
    });
    // No padding, no end marker: the stream just stops.
    let tar = std::mem::take(&mut t.bytes);
    let sb = Sandbox::new();
    let mut seen = Vec::new();
    let err = extract(&tar[..], &sb.root, &opts(), &mut |e| {
        seen.push(e.path.to_path_buf())
    })
    .unwrap_err();
    match err {
        LayerError::Truncated {
            path,
            expected,
            actual,
        } => assert_eq!((path, expected, actual), (p("cut"), 10_000, 3000)),
        e => panic!("{e}"),
    }
    assert!(!sb.root.join("cut").exists(), "short file left behind");
    assert_eq!(seen, [p("whole")], "no event for the cut entry");
}

#[test]
fn truncated_header_is_an_error() {
    let mut t = RawTar::new();
    t.add(Raw::file(b"whole", b"w"));
    t.add(Raw::file(b"next", b"n"));
    let tar = &t.bytes[..1024 + 300];
    let sb = Sandbox::new();
    let err = run(&sb, tar, &opts()).unwrap_err();
    assert!(
        matches!(err, LayerError::ReadArchive { ref after, .. } if after == &p("whole")),
        "{err}"
    );
}

#[test]
fn trailing_data_is_drained_and_counted() {
    let mut t = RawTar::new();
    t.add(Raw::file(b"f", b"abc"));
    let mut tar = t.finish();
    tar.extend(std::iter::repeat_n(0u8, 9216)); // record padding
    tar.extend(b"trailing junk after the archive");
    let sb = Sandbox::new();
    let mut input = &tar[..];
    let stats = extract(&mut input, &sb.root, &opts(), &mut |_| {}).unwrap();
    assert!(input.is_empty(), "reader not drained");
    assert_eq!(stats.tar_bytes, tar.len() as u64);
    assert_eq!(stats.entries, 1);
    assert_eq!(stats.file_bytes, 3);
}

/// Counts bytes read through it.
struct Counting<R> {
    inner: R,
    n: std::rc::Rc<std::cell::Cell<u64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.n.set(self.n.get() + n as u64);
        Ok(n)
    }
}

/// gzip of `header` followed by `zeros` zero bytes, streamed (never held
/// uncompressed in memory).
fn gzip_with_zeros(header: &[u8], zeros: u64) -> Vec<u8> {
    // Level 6: zlib-rs's level 1 compresses zeros only ~100:1.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(header).unwrap();
    let chunk = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        gz.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    gz.finish().unwrap()
}

#[test]
fn gzip_bomb_stops_before_writing() {
    const BOMB: u64 = 200 << 20;
    let mut t = RawTar::new();
    t.add(Raw {
        declared_size: Some(BOMB),
        ..Raw::file(b"bomb", b"")
    });
    let blob = gzip_with_zeros(&t.bytes, BOMB + 1024);
    assert!(
        blob.len() < 1 << 20,
        "the bomb is small compressed: {}",
        blob.len()
    );

    let sb = Sandbox::new();
    let o = ExtractOptions {
        max_total_bytes: 10 << 20,
        ..opts()
    };
    let n = std::rc::Rc::new(std::cell::Cell::new(0));
    let input = Counting {
        inner: decoder(&blob[..], Compression::Gzip).unwrap(),
        n: n.clone(),
    };
    let start = Instant::now();
    let err = extract(input, &sb.root, &o, &mut |_| {}).unwrap_err();
    assert!(
        matches!(err, LayerError::TooLarge { ref path, limit, .. } if path == &p("bomb") && limit == 10 << 20),
        "{err}"
    );
    assert!(
        n.get() < 1 << 20,
        "decompressed {} bytes before refusing",
        n.get()
    );
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(!sb.root.join("bomb").exists());
}

#[test]
fn many_files_stop_at_the_byte_limit() {
    let data = vec![b'd'; 1 << 20];
    let names: Vec<String> = (0..20).map(|i| format!("f{i:02}")).collect();
    let mut t = RawTar::new();
    for n in &names {
        t.add(Raw::file(n.as_bytes(), &data));
    }
    let tar = t.finish();
    let sb = Sandbox::new();
    let o = ExtractOptions {
        max_total_bytes: 10 << 20,
        ..opts()
    };
    let err = run(&sb, &tar, &o).unwrap_err();
    assert!(
        matches!(err, LayerError::TooLarge { ref path, .. } if path == &p("f10")),
        "{err}"
    );
    let written: u64 = std::fs::read_dir(&sb.root)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert_eq!(written, 10 << 20);
}

#[test]
fn entry_count_bomb_stops_at_the_limit() {
    let names: Vec<String> = (0..1000).map(|i| format!("e{i:04}")).collect();
    let mut t = RawTar::new();
    for n in &names {
        t.add(Raw::file(n.as_bytes(), b""));
    }
    let tar = t.finish();
    let sb = Sandbox::new();
    let o = ExtractOptions {
        max_entries: 100,
        ..opts()
    };
    let err = run(&sb, &tar, &o).unwrap_err();
    assert!(
        matches!(err, LayerError::TooLarge { what: "entry count", ref path, .. } if path == &p("e0100")),
        "{err}"
    );
    assert_eq!(std::fs::read_dir(&sb.root).unwrap().count(), 100);
}

/// A GNU long-name header (or a PAX header) is read into memory by the tar
/// parser; a huge one must be refused rather than allocated.
#[test]
fn huge_extended_headers_are_refused() {
    for kind in [EntryType::GNULongName, EntryType::XHeader] {
        const HUGE: u64 = 100 << 20;
        let mut t = RawTar::new();
        t.add(Raw {
            declared_size: Some(HUGE),
            ..Raw::new(b"././@LongLink", kind)
        });
        let blob = gzip_with_zeros(&t.bytes, HUGE + 2048);
        let sb = Sandbox::new();
        let n = std::rc::Rc::new(std::cell::Cell::new(0));
        let input = Counting {
            inner: decoder(&blob[..], Compression::Gzip).unwrap(),
            n: n.clone(),
        };
        let err = extract(input, &sb.root, &opts(), &mut |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                LayerError::TooLarge {
                    what: "extended header bytes",
                    ..
                }
            ),
            "{kind:?}: {err}"
        );
        assert!(n.get() <= 17 << 20, "{kind:?}: read {} bytes", n.get());
    }
}

#[test]
fn missing_end_of_archive_marker_is_tolerated() {
    let mut t = RawTar::new();
    t.add(Raw::file(b"f", b"abc"));
    let tar = std::mem::take(&mut t.bytes);
    let sb = Sandbox::new();
    let stats = run(&sb, &tar, &opts()).unwrap();
    assert_eq!(stats.entries, 1);
    assert_eq!(std::fs::read(sb.root.join("f")).unwrap(), b"abc");
}

/// Issue #19: a tree 2,000 directories deep (within the 4,095-byte path
/// limit), then replaced by a file. Removing it recursed once per level and
/// overflowed a 2 MiB thread stack (the test thread's, a tokio worker's):
/// "thread ... has overflowed its stack", an abort no caller can catch.
#[test]
fn deep_tree_replaced_by_a_file_is_removed_without_recursion() {
    let deep = "d/".repeat(2000);
    let mut t = RawTar::new();
    t.pax(&[("path", deep.as_bytes())]);
    t.add(Raw::dir(b"placeholder"));
    t.add(Raw::file(b"d", b"now a file"));
    let tar = t.finish();
    let sb = Sandbox::in_memory();
    // On a thread with the stack size tokio's workers and test threads get.
    let root = sb.root.clone();
    let stats = std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(move || extract(&tar[..], &root, &opts(), &mut |_| {}))
        .unwrap()
        .join()
        .expect("extraction thread")
        .unwrap();
    assert_eq!(stats.entries, 2);
    assert_eq!(std::fs::read(sb.root.join("d")).unwrap(), b"now a file");
    sb.assert_outside_untouched();
}
