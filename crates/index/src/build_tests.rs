//! build_index against real layer directories, and against the kernel's own
//! overlayfs as ground truth.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::OsStr;
use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{lchown, symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags, CWD,
};

use super::*;

fn skip_unless_root(test: &str) -> bool {
    !lazylayer_testsupport::require_root(test, "mknod whiteouts, trusted.* xattrs, chown, mount")
}

/// Layer directories l0 (bottom) .. lN in one temp dir.
struct Layers {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    count: usize,
}

impl Layers {
    fn new(count: usize) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let base = tmp.path().to_owned();
        for l in 0..count {
            fs::create_dir(base.join(format!("l{l}"))).unwrap();
        }
        Layers {
            _tmp: tmp,
            base,
            count,
        }
    }

    fn p(&self, layer: usize, rel: &str) -> PathBuf {
        self.pb(layer, rel.as_bytes())
    }

    fn pb(&self, layer: usize, rel: &[u8]) -> PathBuf {
        let root = self.base.join(format!("l{layer}"));
        if rel.is_empty() {
            root
        } else {
            root.join(OsStr::from_bytes(rel))
        }
    }

    fn parent(&self, layer: usize, rel: &[u8]) -> PathBuf {
        let p = self.pb(layer, rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    }

    fn dir(&self, layer: usize, rel: &str, mode: u32) -> &Self {
        let p = self.parent(layer, rel.as_bytes());
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    fn file(&self, layer: usize, rel: &str, data: &str) -> &Self {
        self.file_b(layer, rel.as_bytes(), data.as_bytes())
    }

    fn file_b(&self, layer: usize, rel: &[u8], data: &[u8]) -> &Self {
        fs::write(self.parent(layer, rel), data).unwrap();
        self
    }

    fn symlink(&self, layer: usize, rel: &str, target: &str) -> &Self {
        symlink(target, self.parent(layer, rel.as_bytes())).unwrap();
        self
    }

    fn hardlink(&self, layer: usize, existing: &str, rel: &str) -> &Self {
        fs::hard_link(self.p(layer, existing), self.parent(layer, rel.as_bytes())).unwrap();
        self
    }

    fn node(&self, layer: usize, rel: &str, kind: FileType, major: u32, minor: u32) -> &Self {
        let p = self.parent(layer, rel.as_bytes());
        rfs::mknodat(
            CWD,
            &p,
            kind,
            Mode::from_raw_mode(0o640),
            rfs::makedev(major, minor),
        )
        .unwrap();
        self
    }

    /// An overlayfs whiteout: char device 0:0.
    fn whiteout(&self, layer: usize, rel: &str) -> &Self {
        self.node(layer, rel, FileType::CharacterDevice, 0, 0)
    }

    fn opaque(&self, layer: usize, rel: &str) -> &Self {
        let p = self.p(layer, rel);
        fs::create_dir_all(&p).unwrap();
        rfs::lsetxattr(&p, "trusted.overlay.opaque", b"y", XattrFlags::empty()).unwrap();
        self
    }

    fn xattr(&self, layer: usize, rel: &str, name: &str, value: &[u8]) -> &Self {
        rfs::lsetxattr(self.p(layer, rel), name, value, XattrFlags::empty()).unwrap();
        self
    }

    fn mtime(&self, layer: usize, rel: &str, sec: i64, nsec: i64) -> &Self {
        let t = Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        };
        let ts = Timestamps {
            last_access: t,
            last_modification: t,
        };
        rfs::utimensat(CWD, self.p(layer, rel), &ts, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        self
    }

    fn spec(&self) -> Vec<(String, PathBuf)> {
        (0..self.count)
            .map(|l| (format!("sha256:{:064x}", l + 1), self.p(l, "")))
            .collect()
    }

    fn build(&self) -> BootIndex {
        build_index(&self.spec()).unwrap()
    }
}

fn get<'a>(idx: &'a BootIndex, path: &str) -> &'a IndexEntry {
    let i = idx
        .lookup(path.as_bytes())
        .unwrap_or_else(|| panic!("{path} missing from the index"));
    &idx.entries[i as usize]
}

fn child_names(idx: &BootIndex, path: &str) -> Vec<String> {
    let d = idx.lookup(path.as_bytes()).unwrap();
    idx.children(d)
        .iter()
        .map(|&c| String::from_utf8_lossy(idx.name(c)).into_owned())
        .collect()
}

fn all_paths(idx: &BootIndex) -> Vec<String> {
    let mut v: Vec<String> = idx
        .entries
        .iter()
        .map(|e| String::from_utf8_lossy(&e.path).into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn index_build_upper_file_replaces_lower() {
    let t = Layers::new(2);
    t.file(0, "f", "old");
    t.file(0, "g", "only below");
    t.file(1, "f", "newer!");
    fs::set_permissions(t.p(0, "f"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(t.p(1, "f"), fs::Permissions::from_mode(0o600)).unwrap();
    t.mtime(0, "f", 100, 0).mtime(1, "f", 200, 5);

    let idx = t.build();
    let f = get(&idx, "f");
    assert_eq!((f.layer, f.size, f.mode), (1, 6, 0o600));
    assert_eq!((f.mtime_sec, f.mtime_nsec), (200, 5));
    assert_eq!(get(&idx, "g").layer, 0);
    assert!(idx.entries.iter().all(|e| !e.in_boot));
    assert_eq!(
        idx.layers,
        t.spec().into_iter().map(|(id, _)| id).collect::<Vec<_>>()
    );
}

#[test]
fn index_build_merges_dirs_with_metadata_from_the_topmost() {
    let t = Layers::new(3);
    t.dir(0, "d", 0o755)
        .file(0, "d/a", "a")
        .file(0, "d/e/x", "x");
    t.dir(1, "d", 0o700).file(1, "d/b", "b");
    // l1 has no d/e: the merge of d/e skips it and reaches l0.
    t.dir(2, "d", 0o750).file(2, "d/e/y", "y");
    let idx = t.build();

    let d = get(&idx, "d");
    assert_eq!((d.kind, d.mode, d.layer), (FileKind::Dir, 0o750, 2));
    assert_eq!(child_names(&idx, "d"), ["a", "b", "e"]);
    assert_eq!(child_names(&idx, "d/e"), ["x", "y"]);
    assert_eq!(get(&idx, "d/a").layer, 0);
    assert_eq!(get(&idx, "d/b").layer, 1);
    assert_eq!(get(&idx, "d/e").layer, 2);
    assert_eq!(get(&idx, "d/e/x").layer, 0);
    assert_eq!(get(&idx, "d/e/y").layer, 2);
    // Lookups on the built index.
    let di = idx.lookup(b"d").unwrap();
    let b = idx.lookup_child(di, b"b").unwrap();
    assert_eq!(idx.entries[b as usize].path, b"d/b");
    assert_eq!(idx.name(b), b"b");
    assert_eq!(idx.lookup_child(di, b"zz"), None);
    assert_eq!(
        idx.lookup(b"d/e/y"),
        idx.lookup_child(idx.lookup(b"d/e").unwrap(), b"y")
    );
    assert_eq!(child_names(&idx, ""), ["d"]);
    // Children come out together and sorted, parents first.
    for (i, e) in idx.entries.iter().enumerate().skip(1) {
        assert!((e.parent as usize) < i);
    }
}

#[test]
fn root_index_build_whiteout_removes_file_and_subtree() {
    if skip_unless_root("root_index_build_whiteout_removes_file_and_subtree") {
        return;
    }
    let t = Layers::new(3);
    t.file(0, "f", "f")
        .file(0, "d/x/y", "y")
        .file(0, "keep", "k");
    t.whiteout(1, "f").whiteout(1, "d").whiteout(1, "ghost");
    // A directory above a whiteout starts from nothing.
    t.file(2, "d/z", "z");
    let idx = t.build();
    assert_eq!(all_paths(&idx), ["", "d", "d/z", "keep"]);
    assert_eq!(idx.lookup(b"f"), None);
    assert_eq!(idx.lookup(b"d/x"), None);
    assert_eq!(
        idx.lookup(b"ghost"),
        None,
        "a whiteout itself is never shown"
    );
    assert_eq!(get(&idx, "d").layer, 2);
}

#[test]
fn root_index_build_opaque_dir_hides_lower_children_keeps_upper() {
    if skip_unless_root("root_index_build_opaque_dir_hides_lower_children_keeps_upper") {
        return;
    }
    let t = Layers::new(3);
    t.file(0, "d/a", "a")
        .file(0, "d/sub/c", "c")
        .file(0, "bottom/x", "x");
    t.opaque(1, "d").file(1, "d/n", "n");
    t.file(2, "d/u", "u").file(2, "d/sub/v", "v");
    // Opaque at the bottom hides nothing.
    t.opaque(0, "bottom");
    let idx = t.build();
    assert_eq!(child_names(&idx, "d"), ["n", "sub", "u"]);
    assert_eq!(child_names(&idx, "d/sub"), ["v"]);
    assert_eq!(child_names(&idx, "bottom"), ["x"]);
    assert!(
        get(&idx, "d").xattrs.is_empty(),
        "trusted.overlay.* is not image data"
    );
}

#[test]
fn index_build_nondir_replacing_dir_hides_subtree() {
    let t = Layers::new(2);
    t.file(0, "d/x/y", "y").file(0, "s/a", "a");
    t.file(1, "d", "now a file").symlink(1, "s", "elsewhere");
    let idx = t.build();
    assert_eq!(all_paths(&idx), ["", "d", "s"]);
    assert_eq!(
        (get(&idx, "d").kind, get(&idx, "d").layer),
        (FileKind::File, 1)
    );
    assert_eq!(
        get(&idx, "s").link_target.as_deref(),
        Some(&b"elsewhere"[..])
    );
    assert!(idx.children(idx.lookup(b"d").unwrap()).is_empty());
}

#[test]
fn index_build_dir_replacing_nondir_starts_fresh() {
    let t = Layers::new(3);
    t.file(0, "d/x", "x");
    t.file(1, "d", "file in between");
    t.file(2, "d/y", "y");
    t.file(0, "f", "file").file(1, "f/z", "z");
    let idx = t.build();
    assert_eq!(child_names(&idx, "d"), ["y"]);
    assert_eq!(get(&idx, "d").layer, 2);
    assert_eq!(child_names(&idx, "f"), ["z"]);
    assert_eq!(
        (get(&idx, "f").kind, get(&idx, "f").layer),
        (FileKind::Dir, 1)
    );
}

#[test]
fn index_build_hardlink_groups_count_visible_members() {
    let t = Layers::new(2);
    t.file(0, "a", "abc")
        .hardlink(0, "a", "b")
        .hardlink(0, "a", "sub/c");
    t.file(0, "p", "pq").hardlink(0, "p", "q");
    t.file(1, "sub/c", "replaced").file(1, "q", "replaced");
    t.file(1, "r", "rs").hardlink(1, "r", "s");
    // One inode named in two layers (a store that hard-links identical
    // files across layers would do this): not a hardlink of the image.
    t.file(0, "x", "shared");
    fs::hard_link(t.p(0, "x"), t.p(1, "y")).unwrap();
    let idx = t.build();

    let group = |p: &str| get(&idx, p).hardlink_group;
    assert_ne!(group("a"), 0);
    assert_eq!(group("a"), group("b"));
    assert_eq!(group("sub/c"), 0, "the replacement is a different file");
    assert_eq!(group("p"), 0, "q is hidden, p stands alone");
    assert_eq!(group("q"), 0);
    assert_ne!(group("r"), 0);
    assert_eq!(group("r"), group("s"));
    assert_ne!(group("a"), group("r"));
    assert_eq!((group("x"), group("y")), (0, 0));
    let members = |p: &str| {
        let mut v: Vec<String> = idx
            .hardlink_members(group(p))
            .iter()
            .map(|&m| String::from_utf8_lossy(&idx.entries[m as usize].path).into_owned())
            .collect();
        v.sort();
        v
    };
    assert_eq!(members("a"), ["a", "b"]);
    assert_eq!(members("r"), ["r", "s"]);
    assert_eq!(idx.hardlink_group_count(), 2);
}

#[test]
fn root_index_build_reads_every_kind_and_all_metadata() {
    if skip_unless_root("root_index_build_reads_every_kind_and_all_metadata") {
        return;
    }
    let t = Layers::new(2);
    fs::set_permissions(t.p(0, ""), fs::Permissions::from_mode(0o755)).unwrap();
    fs::set_permissions(t.p(1, ""), fs::Permissions::from_mode(0o711)).unwrap();
    t.file(1, "bin/su", "#!");
    // chown clears setuid, so it goes first.
    lchown(t.p(1, "bin/su"), Some(0), Some(42)).unwrap();
    fs::set_permissions(t.p(1, "bin/su"), fs::Permissions::from_mode(0o4755)).unwrap();
    t.dir(1, "tmp", 0o1777);
    t.symlink(1, "bin/sh", "busybox");
    lchown(t.p(1, "bin/sh"), Some(7), Some(8)).unwrap();
    t.xattr(1, "bin/sh", "trusted.lazylayer.test", b"on a symlink");
    t.node(1, "dev/null", FileType::CharacterDevice, 1, 3);
    t.node(1, "dev/sda", FileType::BlockDevice, 8, 0);
    t.node(1, "run/fifo", FileType::Fifo, 0, 0);
    std::os::unix::net::UnixListener::bind(t.p(1, "run/sock")).unwrap();
    t.file_b(1, b"caf\xe9", b"latin-1 name");
    t.xattr(1, "bin/su", "user.b", b"2")
        .xattr(1, "bin/su", "user.a", b"1");
    t.xattr(
        1,
        "bin/su",
        "security.capability",
        &[1, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    t.mtime(1, "bin/su", 1_600_000_000, 123_456_789);
    let idx = t.build();

    let root = &idx.entries[0];
    assert_eq!(
        (root.mode, root.layer, root.kind),
        (0o711, 1, FileKind::Dir)
    );
    let su = get(&idx, "bin/su");
    assert_eq!((su.mode, su.uid, su.gid, su.size), (0o4755, 0, 42, 2));
    assert_eq!((su.mtime_sec, su.mtime_nsec), (1_600_000_000, 123_456_789));
    let names: Vec<&[u8]> = su.xattrs.iter().map(|(n, _)| &n[..]).collect();
    assert_eq!(names, [&b"security.capability"[..], b"user.a", b"user.b"]);
    assert_eq!(get(&idx, "tmp").mode, 0o1777);
    let sh = get(&idx, "bin/sh");
    assert_eq!(
        (sh.kind, sh.size, sh.uid, sh.gid),
        (FileKind::Symlink, 7, 7, 8)
    );
    assert_eq!(sh.link_target.as_deref(), Some(&b"busybox"[..]));
    assert_eq!(
        sh.xattrs,
        [(b"trusted.lazylayer.test".to_vec(), b"on a symlink".to_vec())]
    );
    let null = get(&idx, "dev/null");
    assert_eq!(
        (null.kind, null.rdev, null.mode),
        (FileKind::CharDev, rfs::makedev(1, 3), 0o640)
    );
    assert_eq!(get(&idx, "dev/sda").kind, FileKind::BlockDev);
    assert_eq!(get(&idx, "dev/sda").rdev, rfs::makedev(8, 0));
    assert_eq!(get(&idx, "run/fifo").kind, FileKind::Fifo);
    assert_eq!(get(&idx, "run/sock").kind, FileKind::Socket);
    let cafe = idx.lookup(b"caf\xe9").expect("non-UTF-8 name");
    assert_eq!(idx.entries[cafe as usize].size, 12);
}

#[test]
fn index_build_records_file_content_digests() {
    use sha2::{Digest, Sha256};
    let sha = |data: &[u8]| -> [u8; 32] { Sha256::digest(data).into() };
    // Larger than the read buffer and not a multiple of it, so the digest
    // is streamed across several reads and a partial last one.
    let big: Vec<u8> = (0..700_001u32).map(|i| (i % 251) as u8).collect();
    let t = Layers::new(2);
    t.file(0, "f", "lower content")
        .file(0, "keep", "kept below");
    t.file(1, "f", "upper content");
    t.file(0, "a", "linked").hardlink(0, "a", "d/b");
    t.file_b(1, b"big", &big).file(1, "empty", "");
    t.dir(1, "dir", 0o755).symlink(1, "link", "f");
    let idx = t.build();

    let digest = |p: &str| get(&idx, p).digest;
    assert_eq!(
        digest("f"),
        Some(sha(b"upper content")),
        "the topmost layer's"
    );
    assert_eq!(digest("keep"), Some(sha(b"kept below")));
    assert_eq!(digest("big"), Some(sha(&big)));
    assert_eq!(digest("empty"), Some(sha(b"")));
    assert_ne!(get(&idx, "a").hardlink_group, 0);
    assert_eq!(
        get(&idx, "a").hardlink_group,
        get(&idx, "d/b").hardlink_group
    );
    assert_eq!(digest("a"), Some(sha(b"linked")));
    assert_eq!(digest("d/b"), Some(sha(b"linked")));
    for p in ["", "d", "dir", "link"] {
        assert_eq!(digest(p), None, "{p:?} is not a regular file");
    }
    // Every regular file has one, and they survive the format.
    for e in &idx.entries {
        assert_eq!(e.digest.is_some(), e.kind == FileKind::File, "{:?}", e.path);
    }
    assert_eq!(BootIndex::decode(&idx.encode()).unwrap(), idx);
}

#[test]
fn index_build_skips_its_own_file_at_the_root() {
    let t = Layers::new(2);
    t.file(0, "etc/hostname", "h");
    t.file(1, INDEX_FILE_NAME, "an index")
        .file(1, DIGESTS_FILE_NAME, "its digests")
        .file(1, &format!("d/{INDEX_FILE_NAME}"), "not one");
    let idx = t.build();
    assert_eq!(idx.lookup(INDEX_FILE_NAME.as_bytes()), None);
    assert_eq!(idx.lookup(DIGESTS_FILE_NAME.as_bytes()), None);
    assert!(idx
        .lookup(format!("d/{INDEX_FILE_NAME}").as_bytes())
        .is_some());
}

#[test]
fn index_build_errors_name_the_layer() {
    assert!(matches!(build_index(&[]), Err(IndexError::NoLayers)));
    let t = Layers::new(1);
    let mut spec = t.spec();
    spec.push(("sha256:missing".into(), t.base.join("nope")));
    let err = build_index(&spec).unwrap_err();
    assert!(matches!(err, IndexError::LayerIo { .. }), "{err:?}");
    assert!(err.to_string().contains("sha256:missing"), "{err}");
}

#[test]
fn index_build_handles_paths_up_to_the_limit() {
    // 16 components of 255 bytes: 4095 bytes, MAX_PATH_LEN exactly; longer
    // than PATH_MAX once the layer directory is prefixed.
    let t = Layers::new(1);
    let name = "n".repeat(255);
    let mut fd: OwnedFd = rfs::open(
        t.p(0, ""),
        OFlags::RDONLY | OFlags::DIRECTORY,
        Mode::empty(),
    )
    .unwrap();
    for _ in 0..16 {
        rfs::mkdirat(&fd, name.as_str(), Mode::from_raw_mode(0o755)).unwrap();
        fd = rfs::openat(
            &fd,
            name.as_str(),
            OFlags::RDONLY | OFlags::DIRECTORY,
            Mode::empty(),
        )
        .unwrap();
    }
    let idx = t.build();
    let deepest = vec![name.clone(); 16].join("/");
    assert_eq!(deepest.len(), crate::MAX_PATH_LEN);
    assert!(idx.lookup(deepest.as_bytes()).is_some());

    drop(
        rfs::openat(
            &fd,
            "x",
            OFlags::CREATE | OFlags::WRONLY,
            Mode::from_raw_mode(0o644),
        )
        .unwrap(),
    );
    let err = build_index(&t.spec()).unwrap_err();
    assert!(matches!(err, IndexError::PathTooLong { .. }), "{err:?}");
}

// ---- ground truth: the kernel's overlayfs ----

fn overlay_supported() -> bool {
    fs::read_to_string("/proc/filesystems")
        .map(|s| {
            s.lines()
                .any(|l| l.split_whitespace().last() == Some("overlay"))
        })
        .unwrap_or(false)
}

/// A read-only overlayfs mount of layer dirs, unmounted on drop (also when
/// the test panics).
struct OverlayMount {
    target: PathBuf,
    _mount: lazylayer_testsupport::Overlay,
}

impl OverlayMount {
    fn new(t: &Layers) -> Self {
        let target = t.base.join("merged");
        fs::create_dir(&target).unwrap();
        let lowers: Vec<PathBuf> = (0..t.count).rev().map(|l| t.p(l, "")).collect();
        let lowers: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        let mount = lazylayer_testsupport::Overlay::mount(&lowers, None, &target)
            .unwrap_or_else(|e| panic!("overlay mount at {}: {e}", target.display()));
        OverlayMount {
            target,
            _mount: mount,
        }
    }
}

/// What the merged view shows of one path.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    /// Files and symlinks only: a directory's st_size is the file system's.
    size: Option<u64>,
    mtime: (i64, u32),
    rdev: u64,
    target: Option<Vec<u8>>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    /// Regular files: SHA-256 of the content.
    digest: Option<[u8; 32]>,
    /// Non-directories: the link count `stat` reports.
    nlink: Option<u64>,
}

/// Every path with what it shows, and the hardlink groups as sets of paths.
type View = (BTreeMap<Vec<u8>, Seen>, BTreeSet<BTreeSet<Vec<u8>>>);

fn seen_from_index(idx: &BootIndex) -> View {
    let mut map = BTreeMap::new();
    for e in &idx.entries {
        let size = matches!(e.kind, FileKind::File | FileKind::Symlink).then_some(e.size);
        map.insert(
            e.path.clone(),
            Seen {
                kind: e.kind,
                mode: e.mode,
                uid: e.uid,
                gid: e.gid,
                size,
                mtime: (e.mtime_sec, e.mtime_nsec),
                rdev: e.rdev,
                target: e.link_target.clone(),
                xattrs: e.xattrs.clone(),
                digest: e.digest,
                nlink: (e.kind != FileKind::Dir).then(|| match (e.link_count, e.hardlink_group) {
                    (0, 0) => 1,
                    (0, g) => idx.hardlink_members(g).len() as u64,
                    (n, _) => u64::from(n),
                }),
            },
        );
    }
    let groups = (1..=idx.hardlink_group_count())
        .map(|g| {
            idx.hardlink_members(g)
                .iter()
                .map(|&m| idx.entries[m as usize].path.clone())
                .collect()
        })
        .collect();
    (map, groups)
}

#[allow(clippy::unnecessary_cast)]
fn seen_from_mount(root: &Path) -> View {
    let mut map = BTreeMap::new();
    let mut inodes: HashMap<u64, BTreeSet<Vec<u8>>> = HashMap::new();
    let mut todo = vec![Vec::<u8>::new()];
    while let Some(rel) = todo.pop() {
        let full = if rel.is_empty() {
            root.to_owned()
        } else {
            root.join(OsStr::from_bytes(&rel))
        };
        let st = rfs::lstat(&full).unwrap();
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::RegularFile => FileKind::File,
            FileType::Directory => FileKind::Dir,
            FileType::Symlink => FileKind::Symlink,
            FileType::CharacterDevice => FileKind::CharDev,
            FileType::BlockDevice => FileKind::BlockDev,
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::Unknown => panic!("unknown type at {}", full.display()),
        };
        let target = (kind == FileKind::Symlink)
            .then(|| fs::read_link(&full).unwrap().into_os_string().into_vec());
        let digest = (kind == FileKind::File).then(|| {
            use sha2::{Digest, Sha256};
            Sha256::digest(fs::read(&full).unwrap()).into()
        });
        let mut xattrs = Vec::new();
        let mut names = vec![0u8; 65536];
        let n = rfs::llistxattr(&full, &mut names[..]).unwrap();
        for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let mut value = vec![0u8; 65536];
            let vn = rfs::lgetxattr(&full, OsStr::from_bytes(name), &mut value[..]).unwrap();
            xattrs.push((name.to_vec(), value[..vn].to_vec()));
        }
        xattrs.sort();
        if kind == FileKind::Dir {
            for ent in fs::read_dir(&full).unwrap() {
                let name = ent.unwrap().file_name().into_vec();
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(&name);
                todo.push(child);
            }
        } else {
            inodes
                .entry(st.st_ino as u64)
                .or_default()
                .insert(rel.clone());
        }
        let size = matches!(kind, FileKind::File | FileKind::Symlink).then_some(st.st_size as u64);
        let rdev = if matches!(kind, FileKind::CharDev | FileKind::BlockDev) {
            st.st_rdev as u64
        } else {
            0
        };
        map.insert(
            rel,
            Seen {
                kind,
                mode: st.st_mode as u32 & 0o7777,
                uid: st.st_uid,
                gid: st.st_gid,
                size,
                mtime: (st.st_mtime as i64, st.st_mtime_nsec as u32),
                rdev,
                target,
                xattrs,
                digest,
                nlink: (kind != FileKind::Dir).then_some(st.st_nlink as u64),
            },
        );
    }
    let groups = inodes.into_values().filter(|m| m.len() > 1).collect();
    (map, groups)
}

/// Build the index and compare it with what the kernel's overlayfs shows
/// for the same layer dirs, path by path.
fn assert_matches_overlay(t: &Layers) -> BootIndex {
    let idx = t.build();
    let mount = OverlayMount::new(t);
    let (want_paths, want_groups) = seen_from_mount(&mount.target);
    drop(mount);
    let (got_paths, got_groups) = seen_from_index(&idx);
    let show = |m: &BTreeMap<Vec<u8>, Seen>| -> Vec<String> {
        m.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect()
    };
    assert_eq!(
        show(&got_paths),
        show(&want_paths),
        "paths: index vs overlayfs"
    );
    for (path, want) in &want_paths {
        assert_eq!(&got_paths[path], want, "{}", String::from_utf8_lossy(path));
    }
    assert_eq!(
        got_groups, want_groups,
        "hardlink groups: index vs overlayfs"
    );
    // And the index survives its own format.
    assert_eq!(BootIndex::decode(&idx.encode()).unwrap(), idx);
    idx
}

#[test]
fn root_index_build_matches_kernel_overlayfs() {
    if skip_unless_root("root_index_build_matches_kernel_overlayfs") {
        return;
    }
    if !overlay_supported() {
        assert!(
            std::env::var_os("CI").is_none(),
            "root_index_build_matches_kernel_overlayfs: kernel has no overlayfs"
        );
        eprintln!("skipping root_index_build_matches_kernel_overlayfs: kernel has no overlayfs");
        return;
    }
    let t = Layers::new(4);
    // l0: a base system.
    t.dir(0, "etc", 0o755)
        .file(0, "etc/passwd", "root:x:0:0")
        .file(0, "etc/group", "root:x:0:");
    t.file(0, "etc/old.conf", "old")
        .file(0, "etc/ssl/certs/ca.pem", "pem");
    t.file(0, "usr/bin/tool", "v1")
        .hardlink(0, "usr/bin/tool", "usr/bin/tool-alias");
    t.hardlink(0, "usr/bin/tool", "usr/bin/tool-third");
    t.file(0, "usr/lib/libc.so", "libc")
        .hardlink(0, "usr/lib/libc.so", "usr/lib/libc.so.6");
    t.symlink(0, "lib", "usr/lib");
    t.file(0, "var/cache/a", "a")
        .file(0, "var/cache/b", "b")
        .file(0, "var/log/x.log", "x");
    t.file(0, "opt/app/data", "d").file(0, "srv/was-file", "f");
    t.node(0, "dev/null", FileType::CharacterDevice, 1, 3);
    t.whiteout(0, "never-there");
    t.file_b(0, b"home/\xffname", b"non-utf8");
    t.xattr(0, "etc/passwd", "user.note", b"from l0");
    lchown(t.p(0, "etc/group"), Some(0), Some(42)).unwrap();
    // l1: updates, deletions, an opaque dir.
    t.dir(1, "etc", 0o750)
        .file(1, "etc/passwd", "root:x:0:0\nuser:x:1000:1000");
    t.whiteout(1, "etc/old.conf").whiteout(1, "etc/ssl");
    t.whiteout(1, "usr/bin/tool-third");
    t.opaque(1, "var/cache").file(1, "var/cache/c", "c");
    t.file(1, "opt", "opt is a file now");
    t.file(1, "usr/lib/libc.so.6", "newer libc");
    t.dir(1, "srv/was-file", 0o700)
        .file(1, "srv/was-file/inner", "i");
    t.xattr(1, "var/cache", "user.kept", b"yes");
    // l2: a middle layer with gaps; re-creates a deleted dir.
    t.file(2, "etc/ssl/new.pem", "new")
        .file(2, "usr/bin/tool2", "t2");
    t.symlink(2, "etc/localtime", "/usr/share/zoneinfo/UTC");
    t.node(2, "run/fifo", FileType::Fifo, 0, 0);
    t.mtime(2, "usr/bin/tool2", 1_234_567_890, 987_654_321);
    // l3: the top; a dir over the file, a file over the dir.
    t.dir(3, "opt", 0o755).file(3, "opt/fresh", "fresh");
    t.file(3, "var/log", "log is a file");
    t.file(3, "etc/passwd", "top passwd");
    fs::set_permissions(t.p(3, "etc/passwd"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(t.p(3, ""), fs::Permissions::from_mode(0o751)).unwrap();
    t.mtime(3, "", 1_111_111_111, 0);

    let idx = assert_matches_overlay(&t);
    // Spot checks of what the comparison covered.
    assert_eq!(
        child_names(&idx, "etc"),
        ["group", "localtime", "passwd", "ssl"]
    );
    assert_eq!(child_names(&idx, "etc/ssl"), ["new.pem"]);
    assert_eq!(child_names(&idx, "var/cache"), ["c"]);
    assert_eq!(child_names(&idx, "opt"), ["fresh"]);
    assert_eq!(get(&idx, "etc/passwd").layer, 3);
    // l3 holds etc/passwd, so etc itself too.
    assert_eq!(get(&idx, "etc").layer, 3);
    assert_eq!(get(&idx, "srv/was-file").layer, 1);
    assert_eq!(get(&idx, "usr/lib/libc.so").hardlink_group, 0);
    assert_ne!(get(&idx, "usr/bin/tool").hardlink_group, 0);
    // Split groups keep their layer's link count, as overlayfs shows it.
    assert_eq!(get(&idx, "usr/lib/libc.so").link_count, 2);
    assert_eq!(get(&idx, "usr/bin/tool").link_count, 3);
    assert_eq!(get(&idx, "etc/group").link_count, 0);
}

#[test]
fn root_index_build_ignores_opaque_layer_roots_like_overlayfs() {
    if skip_unless_root("root_index_build_ignores_opaque_layer_roots_like_overlayfs") {
        return;
    }
    if !overlay_supported() {
        assert!(
            std::env::var_os("CI").is_none(),
            "root_index_build_ignores_opaque_layer_roots_like_overlayfs: kernel has no overlayfs"
        );
        eprintln!("skipping root_index_build_ignores_opaque_layer_roots_like_overlayfs: kernel has no overlayfs");
        return;
    }
    let t = Layers::new(2);
    t.file(0, "a", "a");
    t.opaque(1, "").file(1, "b", "b");
    let idx = assert_matches_overlay(&t);
    assert_eq!(child_names(&idx, ""), ["a", "b"]);
}
