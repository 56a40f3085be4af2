//! The file system through a real FUSE mount, compared with the directory
//! tree it was indexed from. Needs root (mount(2), mknod, chown, trusted
//! xattrs); every test named `root_…` skips with a message otherwise.
//!
//! `bench_read_throughput` (ignored) compares read speed through the mount
//! with and without passthrough and through a kernel overlayfs:
//! `cargo test --release -p lazylayer-fs -- --ignored --nocapture`.

use std::collections::BTreeSet;
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant, UNIX_EPOCH};

use lazylayer_fs::{
    Access, BootOnlySource, ContentSource, FsMount, FsOptions, FsStats, LayerDirSource, LazyFs,
    Trace, TraceEvent,
};
use lazylayer_index::{build_index, BootIndex, IndexEntry};
use lazylayer_testsupport::Overlay;
use sha2::{Digest, Sha256};

const DIFF_ID: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";
const BIG: usize = 20 << 20;

fn have_root(test: &str) -> bool {
    lazylayer_testsupport::require_root(test, "FUSE and overlay mounts, mknod, chown")
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("not an OS error: {e}"))
}

const EIO: i32 = 5;
const ENOENT: i32 = 2;
const ENOTDIR: i32 = 20;
const EROFS: i32 = 30;
const ENODATA: i32 = 61;

/// Deterministic, incompressible-looking bytes.
fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut out = vec![0u8; len];
    fill_pseudo_random(&mut out, &mut (seed | 1));
    out
}

fn fill_pseudo_random(buf: &mut [u8], state: &mut u64) {
    for chunk in buf.chunks_mut(8) {
        let v = xorshift(state).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A small tree with one of everything the index describes.
fn make_tree(root: &Path) {
    use rustix::fs::{mknodat, FileType, Mode, CWD};
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = root.join(rel);
        std::fs::write(&p, data).unwrap();
        chmod(&p, mode);
    };
    for d in ["a", "a/b", "bin", "dev", "data", "sticky", "sgid"] {
        std::fs::create_dir(root.join(d)).unwrap();
    }
    chmod(&root.join("sticky"), 0o1777);
    chmod(&root.join("sgid"), 0o2775);
    chmod(&root.join("a/b"), 0o750);
    w("a/hello.txt", b"hello, world\n", 0o644);
    File::options()
        .write(true)
        .open(root.join("a/hello.txt"))
        .unwrap()
        .set_modified(UNIX_EPOCH + Duration::new(1_600_000_000, 123_456_789))
        .unwrap();
    rustix::fs::setxattr(
        root.join("a/hello.txt"),
        "user.greeting",
        b"hi there",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    rustix::fs::setxattr(
        root.join("a"),
        "user.dir",
        b"",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    std::os::unix::fs::symlink("hello.txt", root.join("a/link")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs")).unwrap();
    w("a/hl1", b"linked\n", 0o640);
    std::fs::hard_link(root.join("a/hl1"), root.join("a/b/hl2")).unwrap();
    w("a/b/empty", b"", 0o600);
    std::os::unix::fs::chown(root.join("a/b/empty"), Some(1000), Some(2000)).unwrap();
    w("bin/tool", b"#!/bin/sh\necho tool\n", 0o4755);
    w("bin/sgid-tool", b"#!/bin/sh\n", 0o2711);
    let node = |rel: &str, ft: FileType, mode: u32, dev| {
        mknodat(CWD, root.join(rel), ft, Mode::from_raw_mode(mode), dev).unwrap();
        chmod(&root.join(rel), mode);
    };
    node(
        "dev/null",
        FileType::CharacterDevice,
        0o666,
        rustix::fs::makedev(1, 3),
    );
    // A minor above 255 exercises the split minor encoding.
    node(
        "dev/disk",
        FileType::BlockDevice,
        0o660,
        rustix::fs::makedev(259, 300),
    );
    node("dev/fifo", FileType::Fifo, 0o644, 0);
    w("data/small.bin", &pseudo_random(4097, 1), 0o644);
    w("data/big.bin", &pseudo_random(BIG, 2), 0o644);
    let odd = root.join(OsStr::from_bytes(b"caf\xe9"));
    std::fs::write(odd, b"latin-1 name\n").unwrap();
}

fn index_of(dir: &Path) -> BootIndex {
    build_index(&[(DIFF_ID.to_string(), dir.to_path_buf())]).unwrap()
}

/// A mounted `LazyFs`, unmounted on drop (also when a test panics). Field
/// order is drop order: anything stacked on the mount goes first, the
/// mount point's temp dir last.
struct Mounted {
    overlays: Vec<Overlay>,
    mount: Option<FsMount>,
    stats: Arc<FsStats>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mounted {
    fn new<S: ContentSource>(
        index: BootIndex,
        source: S,
        trace: Option<Arc<Trace>>,
        passthrough: bool,
    ) -> Mounted {
        let opts = FsOptions {
            passthrough,
            ..FsOptions::default()
        };
        Mounted::with_options(index, source, trace, opts)
    }

    fn with_options<S: ContentSource>(
        index: BootIndex,
        source: S,
        trace: Option<Arc<Trace>>,
        opts: FsOptions,
    ) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mnt");
        std::fs::create_dir(&path).unwrap();
        let fs = LazyFs::new(Arc::new(index), source, trace, opts);
        let stats = fs.stats();
        let mount = FsMount::mount(fs, &path, 2).unwrap();
        Mounted {
            overlays: Vec::new(),
            mount: Some(mount),
            stats,
            path,
            _dir: dir,
        }
    }

    fn layer_dir(src: &Path, passthrough: bool) -> Mounted {
        let source = LayerDirSource {
            layer_dirs: vec![src.to_path_buf()],
        };
        Mounted::new(index_of(src), source, None, passthrough)
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }

    /// Let the kernel open files alone from now on (an image all local).
    fn kernel_opens(&self) {
        self.mount.as_ref().unwrap().opens_switch().turn_on();
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.overlays.clear();
        if let Some(m) = self.mount.take() {
            if let Err(e) = m.unmount() {
                eprintln!("unmounting {}: {e}", self.path.display());
            }
        }
    }
}

fn sorted_names(dir: &Path) -> Vec<OsString> {
    let mut v: Vec<OsString> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

fn xattrs(p: &Path) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut names = vec![0u8; 4096];
    let n = rustix::fs::llistxattr(p, &mut names[..]).unwrap();
    let mut out: Vec<(Vec<u8>, Vec<u8>)> = names[..n]
        .split(|b| *b == 0)
        .filter(|n| !n.is_empty())
        .map(|name| {
            let name_os = OsStr::from_bytes(name);
            let mut val = vec![0u8; 65536];
            let len = rustix::fs::lgetxattr(p, name_os, &mut val[..]).unwrap();
            (name.to_vec(), val[..len].to_vec())
        })
        .collect();
    out.sort();
    out
}

/// Every name, stat field, link target and xattr of `src` appears unchanged
/// under `mnt`; with `blocks`, a file's block count is its size's (as this
/// file system reports it; overlayfs reports the backing file's).
fn compare_trees(src: &Path, mnt: &Path, blocks: bool) -> usize {
    let mut count = 0;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let (s, m) = (src.join(&rel), mnt.join(&rel));
        let (sm, mm) = (
            std::fs::symlink_metadata(&s).unwrap(),
            std::fs::symlink_metadata(&m).unwrap(),
        );
        let what = rel.display();
        assert_eq!(mm.mode(), sm.mode(), "{what}: mode");
        assert_eq!((mm.uid(), mm.gid()), (sm.uid(), sm.gid()), "{what}: owner");
        assert_eq!(
            (mm.mtime(), mm.mtime_nsec()),
            (sm.mtime(), sm.mtime_nsec()),
            "{what}: mtime"
        );
        assert_eq!(mm.nlink(), sm.nlink(), "{what}: nlink");
        assert_eq!(mm.rdev(), sm.rdev(), "{what}: rdev");
        assert_eq!(xattrs(&m), xattrs(&s), "{what}: xattrs");
        count += 1;
        if sm.is_dir() {
            let names = sorted_names(&s);
            assert_eq!(sorted_names(&m), names, "{what}: entries");
            stack.extend(names.into_iter().map(|n| rel.join(n)));
        } else {
            assert_eq!(mm.size(), sm.size(), "{what}: size");
            if blocks {
                assert_eq!(mm.blocks(), sm.size().div_ceil(512), "{what}: blocks");
            }
        }
        if sm.file_type().is_symlink() {
            assert_eq!(
                std::fs::read_link(&m).unwrap(),
                std::fs::read_link(&s).unwrap()
            );
        }
    }
    count
}

/// The index is read by the kernel exactly as the source tree is seen.
#[test]
fn root_metadata_matches_source_tree() {
    if !have_root("root_metadata_matches_source_tree") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::layer_dir(src.path(), true);

    let n = compare_trees(src.path(), &m.path, true);
    assert!(n >= 20, "walked only {n} entries");

    // Spot checks of what compare_trees covers generically.
    let tool = std::fs::metadata(m.p("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755, "setuid kept");
    assert_eq!(
        std::fs::metadata(m.p("sticky")).unwrap().mode() & 0o7777,
        0o1777
    );
    let null = std::fs::symlink_metadata(m.p("dev/null")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &null.file_type()
    ));
    assert_eq!(
        (
            rustix::fs::major(null.rdev()),
            rustix::fs::minor(null.rdev())
        ),
        (1, 3)
    );
    let disk = std::fs::symlink_metadata(m.p("dev/disk")).unwrap();
    assert_eq!(
        (
            rustix::fs::major(disk.rdev()),
            rustix::fs::minor(disk.rdev())
        ),
        (259, 300)
    );
    assert_eq!(
        std::fs::read_link(m.p("a/link")).unwrap(),
        Path::new("hello.txt")
    );
    // Through the symlink, to the file.
    assert_eq!(std::fs::read(m.p("a/link")).unwrap(), b"hello, world\n");

    let hl1 = std::fs::metadata(m.p("a/hl1")).unwrap();
    let hl2 = std::fs::metadata(m.p("a/b/hl2")).unwrap();
    assert_eq!(hl1.ino(), hl2.ino(), "hardlinks share an inode");
    assert_eq!((hl1.nlink(), hl2.nlink()), (2, 2));
    assert_ne!(
        hl1.ino(),
        std::fs::metadata(m.p("a/hello.txt")).unwrap().ino()
    );

    let mut buf = [0u8; 64];
    let n = rustix::fs::getxattr(m.p("a/hello.txt"), "user.greeting", &mut buf[..]).unwrap();
    assert_eq!(&buf[..n], b"hi there");
    let err = rustix::fs::getxattr(m.p("a/hello.txt"), "user.absent", &mut buf[..]).unwrap_err();
    assert_eq!(err.raw_os_error(), ENODATA);
    let mut tiny = [0u8; 2];
    let err = rustix::fs::getxattr(m.p("a/hello.txt"), "user.greeting", &mut tiny[..]).unwrap_err();
    assert_eq!(err, rustix::io::Errno::RANGE);

    for missing in ["nope", "a/nope", "a/b/nope/deeper"] {
        let e = std::fs::symlink_metadata(m.p(missing)).unwrap_err();
        assert_eq!(errno(&e), ENOENT, "{missing}");
    }
    let e = std::fs::symlink_metadata(m.p("a/hello.txt/x")).unwrap_err();
    assert_eq!(errno(&e), ENOTDIR);
    let odd = m.path.join(OsStr::from_bytes(b"caf\xe9"));
    assert_eq!(std::fs::read(odd).unwrap(), b"latin-1 name\n");
}

#[test]
fn root_statfs_describes_the_image() {
    if !have_root("root_statfs_describes_the_image") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let index = index_of(src.path());
    let blocks: u64 = index.entries.iter().map(|e| e.size.div_ceil(4096)).sum();
    let entries = index.len() as u64;
    let m = Mounted::new(
        index,
        LayerDirSource {
            layer_dirs: vec![src.path().to_path_buf()],
        },
        None,
        true,
    );
    let fs = rustix::fs::statfs(&m.path).unwrap();
    const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;
    assert_eq!(fs.f_type as i64, FUSE_SUPER_MAGIC);
    let vfs = rustix::fs::statvfs(&m.path).unwrap();
    assert_eq!(vfs.f_bsize, 4096);
    assert_eq!(vfs.f_frsize, 4096);
    assert_eq!(vfs.f_blocks, blocks);
    assert_eq!((vfs.f_bfree, vfs.f_bavail, vfs.f_ffree), (0, 0, 0));
    assert_eq!(vfs.f_files, entries);
    assert_eq!(vfs.f_namemax, 255);
    assert!(vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY));
    // The image is untrusted and the mount reachable from the host.
    assert!(vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::NOSUID));
    assert!(vfs.f_flag.contains(rustix::fs::StatVfsMountFlags::NODEV));
}

/// A read-only view of `len` bytes of `f`, for as long as it lives.
struct Mapping(*mut std::ffi::c_void, usize);

// A mapping of a file the test reads through the kernel's page cache.
#[allow(unsafe_code)]
impl Mapping {
    fn new(f: &File, len: usize) -> Mapping {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        // SAFETY: a fresh private read-only mapping, unmapped in Drop; the
        // file under it never changes.
        let p = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ,
                MapFlags::PRIVATE,
                f,
                0,
            )
        }
        .unwrap();
        Mapping(p, len)
    }
    fn bytes(&self) -> &[u8] {
        // SAFETY: mapped readable for self.1 bytes while self lives.
        unsafe { std::slice::from_raw_parts(self.0 as *const u8, self.1) }
    }
}

#[allow(unsafe_code)]
impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what new() mapped.
        unsafe { rustix::mm::munmap(self.0, self.1).unwrap() };
    }
}

fn check_content(src: &Path, m: &Mounted) {
    check_content_at(src, &m.path)
}

fn check_content_at(src: &Path, mnt: &Path) {
    let at = |rel: &str| mnt.join(rel);
    for rel in [
        "a/hello.txt",
        "a/b/empty",
        "a/hl1",
        "a/b/hl2",
        "bin/tool",
        "data/small.bin",
        "data/big.bin",
    ] {
        let want = sha256(&std::fs::read(src.join(rel)).unwrap());
        assert_eq!(
            sha256(&std::fs::read(at(rel)).unwrap()),
            want,
            "{rel}: read"
        );
        let f = File::open(at(rel)).unwrap();
        let len = f.metadata().unwrap().len() as usize;
        if len > 0 {
            let map = Mapping::new(&f, len);
            assert_eq!(sha256(map.bytes()), want, "{rel}: mmap");
        }
    }
    // Odd offsets and a read past the end.
    let f = File::open(at("data/big.bin")).unwrap();
    let mut buf = vec![0u8; 10_000];
    let n = f.read_at(&mut buf, BIG as u64 - 1234).unwrap();
    assert_eq!(n, 1234);
    let want = std::fs::read(src.join("data/big.bin")).unwrap();
    assert_eq!(&buf[..n], &want[BIG - 1234..]);
    assert_eq!(f.read_at(&mut buf, BIG as u64 + 5).unwrap(), 0);
}

#[test]
fn root_content_with_passthrough() {
    if !have_root("root_content_with_passthrough") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::layer_dir(src.path(), true);
    check_content(src.path(), &m);
    assert!(m.stats.passthrough_opens() > 0);
    assert_eq!(
        (m.stats.daemon_opens(), m.stats.read_requests()),
        (0, 0),
        "the kernel read from the backing files itself"
    );

    // Several handles of one inode at once (two names of a hardlink, the
    // same name twice) share one backing file; then all closed and reopened.
    let hl1 = File::open(m.p("a/hl1")).unwrap();
    let hl2 = File::open(m.p("a/b/hl2")).unwrap();
    let again = File::open(m.p("a/hl1")).unwrap();
    let read = |mut f: &File| {
        let mut s = String::new();
        f.read_to_string(&mut s).unwrap();
        s
    };
    for f in [&hl1, &hl2, &again] {
        assert_eq!(read(f), "linked\n");
    }
    drop((hl1, hl2, again));
    assert_eq!(std::fs::read(m.p("a/b/hl2")).unwrap(), b"linked\n");
    assert_eq!(m.stats.read_requests(), 0);
}

#[test]
fn root_content_without_passthrough() {
    if !have_root("root_content_without_passthrough") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::layer_dir(src.path(), false);
    check_content(src.path(), &m);
    assert_eq!(m.stats.passthrough_opens(), 0);
    assert!(m.stats.daemon_opens() > 0);
    assert!(m.stats.read_requests() > 0);
}

/// Backing files on a stacked file system (here an overlayfs, as when
/// lazylayer itself runs in a container) exceed our stack depth: the kernel
/// refuses them as backing files, and reads go through the daemon instead.
#[test]
fn root_passthrough_falls_back_for_stacked_backing_files() {
    if !have_root("root_passthrough_falls_back_for_stacked_backing_files") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let dir = tempfile::tempdir().unwrap();
    let (empty, view) = (dir.path().join("empty"), dir.path().join("view"));
    std::fs::create_dir(&empty).unwrap();
    std::fs::create_dir(&view).unwrap();
    let _ovl = Overlay::mount(&[src.path(), &empty], None, &view).unwrap();
    let m = Mounted::new(
        index_of(src.path()),
        LayerDirSource {
            layer_dirs: vec![view.clone()],
        },
        None,
        true,
    );
    check_content(src.path(), &m);
    assert_eq!(m.stats.passthrough_opens(), 0);
    assert!(m.stats.daemon_opens() > 0 && m.stats.read_requests() > 0);
}

/// The container-root setup: overlayfs with our mount as its lower layer.
#[test]
fn root_overlay_on_top_with_passthrough() {
    if !have_root("root_overlay_on_top_with_passthrough") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let mut m = Mounted::layer_dir(src.path(), true);
    let dir = tempfile::tempdir().unwrap();
    let (upper, work, merged) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let ovl = Overlay::mount(&[&m.path], Some((&upper, &work)), &merged)
        .expect("overlayfs over a passthrough FUSE mount (stack depth 1 + 1)");
    m.overlays.push(ovl);

    let big = std::fs::read(src.path().join("data/big.bin")).unwrap();
    assert_eq!(
        sha256(&std::fs::read(merged.join("data/big.bin")).unwrap()),
        sha256(&big)
    );
    let f = File::open(merged.join("data/big.bin")).unwrap();
    assert_eq!(sha256(Mapping::new(&f, BIG).bytes()), sha256(&big), "mmap");
    drop(f);
    assert_eq!(
        std::fs::read(merged.join("a/link")).unwrap(),
        b"hello, world\n"
    );
    assert!(m.stats.passthrough_opens() > 0);
    assert_eq!(m.stats.read_requests(), 0, "passthrough under overlayfs");

    // New files land in upper; a changed lower file is copied up whole.
    std::fs::write(merged.join("new.txt"), b"fresh\n").unwrap();
    assert_eq!(std::fs::read(upper.join("new.txt")).unwrap(), b"fresh\n");
    assert!(!m.p("new.txt").exists());
    let mut f = File::options()
        .append(true)
        .open(merged.join("a/hello.txt"))
        .unwrap();
    f.write_all(b"more\n").unwrap();
    drop(f);
    assert_eq!(
        std::fs::read(upper.join("a/hello.txt")).unwrap(),
        b"hello, world\nmore\n"
    );
    assert_eq!(
        std::fs::read(m.p("a/hello.txt")).unwrap(),
        b"hello, world\n"
    );
    std::fs::remove_file(merged.join("bin/tool")).unwrap();
    assert!(!merged.join("bin/tool").exists());
    assert!(m.p("bin/tool").exists());

    // Passthrough puts our mount at stack depth 1, so the overlay is at the
    // kernel's maximum (2): nothing more can stack on a container root.
    let (up2, work2, merged2) = (
        dir.path().join("upper2"),
        dir.path().join("work2"),
        dir.path().join("merged2"),
    );
    for d in [&up2, &work2, &merged2] {
        std::fs::create_dir(d).unwrap();
    }
    match Overlay::mount(&[&merged], Some((&up2, &work2)), &merged2) {
        Ok(o) => {
            drop(o);
            panic!("an overlay on the overlay mounted: stack depth is not what we think");
        }
        Err(e) => eprintln!("overlay on the container root refused as expected: {e}"),
    }
}

/// Without passthrough our mount is depth 0, so a further overlay fits.
#[test]
fn root_nested_overlay_without_passthrough() {
    if !have_root("root_nested_overlay_without_passthrough") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"x").unwrap();
    let mut m = Mounted::layer_dir(src.path(), false);
    let dir = tempfile::tempdir().unwrap();
    let d = |n: &str| {
        let p = dir.path().join(n);
        std::fs::create_dir(&p).unwrap();
        p
    };
    let (u1, w1, m1, u2, w2, m2) = (d("u1"), d("w1"), d("m1"), d("u2"), d("w2"), d("m2"));
    m.overlays
        .push(Overlay::mount(&[&m.path], Some((&u1, &w1)), &m1).unwrap());
    m.overlays
        .insert(0, Overlay::mount(&[&m1], Some((&u2, &w2)), &m2).unwrap());
    assert_eq!(std::fs::read(m2.join("f")).unwrap(), b"x");
}

#[test]
fn root_trace_records_first_accesses_in_order() {
    if !have_root("root_trace_records_first_accesses_in_order") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let trace = Arc::new(Trace::new());
    let m = Mounted::new(
        index_of(src.path()),
        LayerDirSource {
            layer_dirs: vec![src.path().to_path_buf()],
        },
        Some(trace.clone()),
        true,
    );
    std::fs::metadata(m.p("a/hello.txt")).unwrap();
    assert!(std::fs::metadata(m.p("a/missing")).is_err());
    assert!(std::fs::metadata(m.p("gone")).is_err());
    std::fs::read(m.p("a/hello.txt")).unwrap();
    sorted_names(&m.p("a/b"));
    std::fs::read_link(m.p("a/link")).unwrap();
    // Repeats add nothing.
    std::fs::read(m.p("a/hello.txt")).unwrap();
    assert!(std::fs::metadata(m.p("gone")).is_err());
    sorted_names(&m.p("a/b"));

    let ev = |p: &str, access| TraceEvent {
        path: p.as_bytes().to_vec(),
        access,
    };
    assert_eq!(
        trace.events(),
        vec![
            ev("a", Access::Lookup),
            ev("a/hello.txt", Access::Lookup),
            ev("a/missing", Access::Missing),
            ev("gone", Access::Missing),
            ev("a/hello.txt", Access::Open),
            ev("a/b", Access::Lookup),
            ev("a/b", Access::Readdir),
            ev("a/link", Access::Lookup),
            ev("a/link", Access::Readlink),
        ]
    );
}

#[test]
fn root_boot_only_source_flags_violations() {
    if !have_root("root_boot_only_source_flags_violations") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let mut index = index_of(src.path());
    let boot = index.lookup(b"a/hello.txt").unwrap();
    index.entries[boot as usize].in_boot = true;
    let source = Arc::new(BootOnlySource::new(src.path().to_path_buf()));
    let m = Mounted::new(index, source.clone(), None, true);

    assert_eq!(
        std::fs::read(m.p("a/hello.txt")).unwrap(),
        b"hello, world\n"
    );
    let e = std::fs::read(m.p("bin/tool")).unwrap_err();
    assert_eq!(errno(&e), EIO);
    // Metadata never needs content.
    assert!(std::fs::metadata(m.p("data/big.bin")).is_ok());
    assert_eq!(source.violations(), vec![b"bin/tool".to_vec()]);
}

#[test]
fn root_writes_are_refused() {
    if !have_root("root_writes_are_refused") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::layer_dir(src.path(), true);
    let refused = |what: &str, r: io::Result<()>| {
        let e = r.expect_err(what);
        assert_eq!(errno(&e), EROFS, "{what}: {e}");
    };
    refused("create", File::create(m.p("a/new")).map(drop));
    refused(
        "open for writing",
        File::options()
            .write(true)
            .open(m.p("a/hello.txt"))
            .map(drop),
    );
    refused("mkdir", std::fs::create_dir(m.p("newdir")));
    refused("unlink", std::fs::remove_file(m.p("a/hello.txt")));
    refused(
        "rename",
        std::fs::rename(m.p("a/hello.txt"), m.p("a/renamed")),
    );
    refused(
        "chmod",
        std::fs::set_permissions(m.p("a/hello.txt"), std::fs::Permissions::from_mode(0o600)),
    );
    refused(
        "setxattr",
        rustix::fs::setxattr(
            m.p("a/hello.txt"),
            "user.x",
            b"y",
            rustix::fs::XattrFlags::empty(),
        )
        .map_err(io::Error::from),
    );
    assert_eq!(
        std::fs::read(src.path().join("a/hello.txt")).unwrap(),
        b"hello, world\n"
    );
}

/// Content that never arrives: the source gives up after a while, the reader
/// sees EIO rather than waiting forever.
struct FailingSource {
    delay: Duration,
}

impl ContentSource for FailingSource {
    fn open(&self, _idx: u32, _entry: &IndexEntry) -> io::Result<File> {
        std::thread::sleep(self.delay);
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "layer not downloaded",
        ))
    }
}

#[test]
fn root_failing_source_gives_eio() {
    if !have_root("root_failing_source_gives_eio") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::new(
        index_of(src.path()),
        FailingSource {
            delay: Duration::from_millis(300),
        },
        None,
        true,
    );
    let (tx, rx) = mpsc::channel();
    for rel in ["a/hello.txt", "data/big.bin"] {
        let (p, tx) = (m.p(rel), tx.clone());
        std::thread::spawn(move || tx.send(std::fs::read(p).map(drop)).unwrap());
    }
    for _ in 0..2 {
        let r = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("reader hung on a failing source");
        assert_eq!(errno(&r.unwrap_err()), EIO);
    }
    // The mount stays usable.
    assert!(std::fs::metadata(m.p("a/hello.txt")).is_ok());
}

/// Content that is still on its way: `try_open` says so, and `open` waits
/// until the gate opens (bounded, so a broken test cannot hang for good).
struct WaitingSource {
    dir: PathBuf,
    gate: Arc<Gate>,
    /// Opens waiting now.
    waiting: Arc<std::sync::atomic::AtomicUsize>,
}

#[derive(Default)]
struct Gate {
    open: std::sync::Mutex<bool>,
    cv: std::sync::Condvar,
}

impl Gate {
    /// Wait until the gate opens (at most 120 s: a broken test cannot hang for good).
    fn pass(&self) {
        let g = self.open.lock().unwrap();
        let _ = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(120), |open| !*open)
            .unwrap();
    }

    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl ContentSource for WaitingSource {
    fn open(&self, _idx: u32, entry: &IndexEntry) -> io::Result<File> {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiting.fetch_add(1, SeqCst);
        self.gate.pass();
        self.waiting.fetch_sub(1, SeqCst);
        lazylayer_sys::beneath::open_beneath(&self.dir, &entry.path)
    }
    fn try_open(&self, idx: u32, entry: &IndexEntry) -> Option<io::Result<File>> {
        let open = *self.gate.open.lock().unwrap();
        open.then(|| self.open(idx, entry))
    }
}

/// Opens the gate when dropped (a failing test must not leave readers
/// blocked in the mount it unmounts).
struct ReleaseOnDrop(Arc<Gate>);
impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        self.0.release();
    }
}

/// Opens that must wait for their content do not hold the FUSE worker
/// threads: with more of them waiting than the mount has workers (2), a
/// stat and a listing of other paths still answer, and the opens complete
/// once the content is there.
#[test]
fn root_waiting_opens_leave_the_worker_threads_free() {
    use std::sync::atomic::Ordering::SeqCst;
    if !have_root("root_waiting_opens_leave_the_worker_threads_free") {
        return;
    }
    const OPENS: usize = 8;
    let src = tempfile::tempdir().unwrap();
    std::fs::create_dir(src.path().join("other")).unwrap();
    std::fs::write(src.path().join("other/x"), b"x").unwrap();
    for i in 0..OPENS {
        std::fs::write(src.path().join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let gate = Arc::new(Gate::default());
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = WaitingSource {
        dir: src.path().to_path_buf(),
        gate: gate.clone(),
        waiting: waiting.clone(),
    };
    let m = Mounted::new(index_of(src.path()), source, None, false);
    let _release = ReleaseOnDrop(gate.clone());

    let (tx, rx) = mpsc::channel();
    for i in 0..OPENS {
        let (p, tx) = (m.p(&format!("f{i}")), tx.clone());
        std::thread::spawn(move || tx.send((i, std::fs::read(p))).unwrap());
    }
    let t = Instant::now();
    while waiting.load(SeqCst) < OPENS {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "only {} of {OPENS} opens reached the source",
            waiting.load(SeqCst)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (mtx, mrx) = mpsc::channel();
    let (x, other) = (m.p("other/x"), m.p("other"));
    std::thread::spawn(move || {
        let len = std::fs::metadata(x).map(|md| md.len());
        let names = std::fs::read_dir(other).map(|d| d.count());
        let _ = mtx.send((len.unwrap(), names.unwrap()));
    });
    let got = mrx
        .recv_timeout(Duration::from_secs(20))
        .expect("stat/readdir stalled behind waiting opens");
    assert_eq!(got, (1, 1));
    assert_eq!(waiting.load(SeqCst), OPENS, "the opens were still waiting");

    gate.release();
    for _ in 0..OPENS {
        let (i, r) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(r.unwrap(), format!("file {i}").into_bytes());
    }
}

/// A source with a bug: opening `boom` panics (on the FUSE worker thread,
/// since `try_open` answers at once), anything else opens from `dir`.
struct PanickingSource {
    dir: PathBuf,
}

impl ContentSource for PanickingSource {
    fn open(&self, _idx: u32, entry: &IndexEntry) -> io::Result<File> {
        if entry.path.ends_with(b"boom") {
            panic!(
                "injected fault opening {}",
                String::from_utf8_lossy(&entry.path)
            );
        }
        lazylayer_sys::beneath::open_beneath(&self.dir, &entry.path)
    }
}

/// A panic while serving one request answers that request EIO and leaves
/// the mount served: more panics than the mount has worker threads (2), and
/// then other files still read.
#[test]
fn root_a_panicking_request_gets_eio_and_the_mount_keeps_serving() {
    if !have_root("root_a_panicking_request_gets_eio_and_the_mount_keeps_serving") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("boom"), b"never served").unwrap();
    std::fs::write(src.path().join("fine"), b"served").unwrap();
    let source = PanickingSource {
        dir: src.path().to_path_buf(),
    };
    let m = Mounted::new(index_of(src.path()), source, None, false);
    let (tx, rx) = mpsc::channel();
    for _ in 0..4 {
        let (boom, fine, tx) = (m.p("boom"), m.p("fine"), tx.clone());
        // On threads of their own: a mount that stopped serving hangs them.
        std::thread::spawn(move || {
            let _ = tx.send((std::fs::read(boom), std::fs::read(fine)));
        });
        let (boom, fine) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the mount stopped serving after a panic");
        assert_eq!(errno(&boom.unwrap_err()), EIO);
        assert_eq!(fine.unwrap(), b"served");
    }
}

/// Requests that must wait run on a bounded pool. With 2 threads and a
/// queue of 2, of 8 opens waiting at once 2 reach the source, 2 queue, and
/// the other 4 are answered EIO at once (counted); once the content is there
/// the 4 accepted ones complete.
#[test]
fn root_waiting_requests_past_the_pool_bound_get_eio_at_once() {
    use std::sync::atomic::Ordering::SeqCst;
    if !have_root("root_waiting_requests_past_the_pool_bound_get_eio_at_once") {
        return;
    }
    const OPENS: usize = 8;
    let (threads, queue) = (2, 2);
    let src = tempfile::tempdir().unwrap();
    for i in 0..OPENS {
        std::fs::write(src.path().join(format!("f{i}")), format!("file {i}")).unwrap();
    }
    let gate = Arc::new(Gate::default());
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = WaitingSource {
        dir: src.path().to_path_buf(),
        gate: gate.clone(),
        waiting: waiting.clone(),
    };
    let opts = FsOptions {
        passthrough: false,
        waiting_threads: threads,
        waiting_queue: queue,
        ..FsOptions::default()
    };
    let m = Mounted::with_options(index_of(src.path()), source, None, opts);
    let _release = ReleaseOnDrop(gate.clone());

    let (tx, rx) = mpsc::channel();
    let t = Instant::now();
    for i in 0..OPENS {
        let (p, tx) = (m.p(&format!("f{i}")), tx.clone());
        std::thread::spawn(move || tx.send((i, std::fs::read(p))).unwrap());
    }
    let refused = OPENS - threads - queue;
    for _ in 0..refused {
        let (i, r) = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("no waiting open past the bound was refused");
        assert_eq!(errno(&r.unwrap_err()), EIO, "f{i}");
    }
    eprintln!(
        "{refused} opens past the bound refused within {:?}",
        t.elapsed()
    );
    assert_eq!(m.stats.refused_waits(), refused as u64);
    let t = Instant::now();
    while waiting.load(SeqCst) < threads {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "the pool's threads never started"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        waiting.load(SeqCst),
        threads,
        "no more than the pool's threads wait"
    );
    assert_eq!(m.stats.waiting(), (threads + queue) as u64);

    gate.release();
    for _ in 0..threads + queue {
        let (i, r) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(r.unwrap(), format!("file {i}").into_bytes());
    }
}

/// Every listing comes with attributes, past its first reply too: `ls -l`
/// or `find -printf %s` of a directory larger than one reply costs a few
/// requests, not a LOOKUP per entry.
#[test]
fn root_listing_and_stat_of_a_large_directory_cost_no_request_per_entry() {
    if !have_root("root_listing_and_stat_of_a_large_directory_cost_no_request_per_entry") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let dir = src.path().join("many");
    std::fs::create_dir(&dir).unwrap();
    let n = 2000;
    for i in 0..n {
        std::fs::write(dir.join(format!("module_{i:04}.py")), vec![b'#'; i % 300]).unwrap();
    }
    let m = Mounted::layer_dir(src.path(), false);
    let before = m.stats.requests();
    // Listed whole first, then each stat'ed, as `find` and `tar` do: no
    // stat between two requests of the listing hints the kernel to ask for
    // attributes again ("auto" mode asks for them in the first only).
    let names: Vec<_> = std::fs::read_dir(m.p("many"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), n);
    for name in names {
        let i: usize = name.to_str().unwrap()[7..11].parse().unwrap();
        let md = std::fs::symlink_metadata(m.p("many").join(&name)).unwrap();
        assert_eq!(md.len(), (i % 300) as u64);
    }
    let requests = m.stats.requests() - before;
    assert!(
        requests < 100,
        "{requests} requests to list and stat {n} entries"
    );
}

/// A listing much larger than one readdir buffer resumes from each reply's
/// last offset.
#[test]
fn root_readdir_10k_entries() {
    if !have_root("root_readdir_10k_entries") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let big = src.path().join("big");
    std::fs::create_dir(&big).unwrap();
    let mut want = BTreeSet::new();
    for i in 0..10_000 {
        // Names of varying length, so entries straddle buffer ends unevenly.
        let name = format!("entry-{i:05}-{}", "x".repeat(i % 37));
        File::create(big.join(&name)).unwrap();
        want.insert(OsString::from(name));
    }
    std::fs::create_dir(big.join("subdir")).unwrap();
    want.insert("subdir".into());
    let m = Mounted::layer_dir(src.path(), true);

    for round in 0..2 {
        let mut seen = BTreeSet::new();
        for e in std::fs::read_dir(m.p("big")).unwrap() {
            let e = e.unwrap();
            assert!(seen.insert(e.file_name()), "duplicate {:?}", e.file_name());
        }
        assert_eq!(seen, want, "round {round}");
    }
    assert_eq!(std::fs::metadata(m.p("big")).unwrap().nlink(), 3);

    // Restarting mid-way (telldir/seekdir), also on a fresh handle,
    // continues exactly there.
    let open_dir = || {
        let fd = rustix::fs::openat(
            rustix::fs::CWD,
            m.p("big"),
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        rustix::fs::Dir::new(fd).unwrap()
    };
    let mut d = open_dir();
    let mut off = 0;
    for _ in 0..5000 {
        off = d.read().unwrap().unwrap().offset();
    }
    let next = d.read().unwrap().unwrap().file_name().to_owned();
    d.rewind();
    d.seek(off).unwrap();
    assert_eq!(d.read().unwrap().unwrap().file_name(), next.as_c_str());
    let mut fresh = open_dir();
    fresh.seek(off).unwrap();
    assert_eq!(fresh.read().unwrap().unwrap().file_name(), next.as_c_str());
}

// ---------------------------------------------------------------------------
// Read throughput.

const BENCH_SIZE: usize = 200 << 20;
const RANDOM_READS: usize = 2000;
const ROUNDS: usize = 5;

fn drop_caches() {
    rustix::fs::sync();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
}

/// MB/s of reading `p` whole with 1 MiB reads.
fn seq_read(p: &Path) -> f64 {
    let start = Instant::now();
    let mut f = File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0usize;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        total += n;
    }
    assert_eq!(total, BENCH_SIZE);
    total as f64 / 1e6 / start.elapsed().as_secs_f64()
}

/// ops/s of 4 KiB reads at the given offsets.
fn random_reads(p: &Path, offsets: &[u64]) -> f64 {
    let start = Instant::now();
    let f = File::open(p).unwrap();
    let mut buf = [0u8; 4096];
    for &off in offsets {
        assert_eq!(f.read_at(&mut buf, off).unwrap(), 4096);
    }
    offsets.len() as f64 / start.elapsed().as_secs_f64()
}

#[test]
#[ignore = "benchmark: cargo test --release -p lazylayer-fs -- --ignored --nocapture"]
fn bench_read_throughput() {
    if !have_root("bench_read_throughput") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    {
        let mut f = std::io::BufWriter::new(File::create(src.path().join("big.bin")).unwrap());
        let mut chunk = vec![0u8; 1 << 20];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..BENCH_SIZE / chunk.len() {
            fill_pseudo_random(&mut chunk, &mut state);
            f.write_all(&chunk).unwrap();
        }
        f.into_inner().unwrap().sync_all().unwrap();
    }
    let mut state = 42u64;
    let pages = (BENCH_SIZE / 4096) as u64;
    let offsets: Vec<u64> = (0..RANDOM_READS)
        .map(|_| (xorshift(&mut state) % pages) * 4096)
        .collect();

    let with = Mounted::layer_dir(src.path(), true);
    let without = Mounted::layer_dir(src.path(), false);
    // The default of a lazy root once every byte is local.
    let kernel = Mounted::layer_dir(src.path(), false);
    kernel.kernel_opens();
    let ovl_dir = tempfile::tempdir().unwrap();
    let (empty, view) = (ovl_dir.path().join("empty"), ovl_dir.path().join("view"));
    std::fs::create_dir(&empty).unwrap();
    std::fs::create_dir(&view).unwrap();
    let overlay = Overlay::mount(&[src.path(), &empty], None, &view).unwrap();

    let setups: [(&str, PathBuf); 5] = [
        ("lazylayer, passthrough", with.p("big.bin")),
        ("lazylayer, no passthrough", without.p("big.bin")),
        ("lazylayer, kernel opens", kernel.p("big.bin")),
        ("kernel overlayfs (ro)", view.join("big.bin")),
        ("host ext4 (reference)", src.path().join("big.bin")),
    ];
    // Rounds interleave the setups so background noise (other builds on
    // this 2-core machine) spreads evenly; the median of each is reported.
    let mut results = vec![[Vec::new(), Vec::new(), Vec::new(), Vec::new()]; setups.len()];
    for _ in 0..ROUNDS {
        for (r, (_, p)) in results.iter_mut().zip(&setups) {
            drop_caches();
            r[2].push(random_reads(p, &offsets));
            drop_caches();
            r[0].push(seq_read(p));
            r[1].push(seq_read(p));
            r[3].push(random_reads(p, &offsets));
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!(
        "\n{} MB file, {} random 4 KiB reads; cold = after drop_caches; median of {} rounds",
        BENCH_SIZE >> 20,
        RANDOM_READS,
        ROUNDS
    );
    println!(
        "{:<28} {:>13} {:>13} {:>15} {:>15}",
        "setup", "seq cold MB/s", "seq warm MB/s", "rand cold op/s", "rand warm op/s"
    );
    for ((name, _), r) in setups.iter().zip(&mut results) {
        let [a, b, c, d] = r;
        println!(
            "{name:<28} {:>13.0} {:>13.0} {:>15.0} {:>15.0}",
            median(a),
            median(b),
            median(c),
            median(d)
        );
    }
    println!(
        "passthrough mount: {} passthrough opens, {} daemon reads; other mount: {} daemon reads",
        with.stats.passthrough_opens(),
        with.stats.read_requests(),
        without.stats.read_requests()
    );
    drop(overlay);
}

/// Hostile images: an index (image data) may call any path of a layer a
/// regular file. Whatever the layer really holds there — a device node, a
/// FIFO, a file of another size — the reader gets EIO within a bound, the
/// daemon never opens a device for it and never blocks on a FIFO.
#[test]
fn root_content_that_is_not_the_indexed_regular_file_is_refused() {
    if !have_root("root_content_that_is_not_the_indexed_regular_file_is_refused") {
        return;
    }
    use rustix::fs::{mknodat, FileType, CWD};
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    std::fs::create_dir(s.join("evil")).unwrap();
    // The host's root disk (its first bytes must never reach a container),
    // /dev/zero's numbers (readable everywhere: what the old code served),
    // and a FIFO nobody writes to.
    let host_disk = std::fs::metadata("/").unwrap().dev();
    let nodes = [
        ("evil/disk", FileType::BlockDevice, host_disk),
        (
            "evil/zero",
            FileType::CharacterDevice,
            rustix::fs::makedev(1, 5),
        ),
        ("evil/fifo", FileType::Fifo, 0),
    ];
    for (rel, kind, dev) in nodes {
        mknodat(
            CWD,
            s.join(rel),
            kind,
            rustix::fs::Mode::from_raw_mode(0o644),
            dev,
        )
        .unwrap();
    }
    std::fs::write(s.join("evil/short"), b"12345").unwrap();
    // The index lies: every one of them is a 4096-byte regular file.
    let mut idx = index_of(s);
    for e in idx.entries.iter_mut() {
        if e.path.starts_with(b"evil/") {
            (e.kind, e.size, e.rdev, e.mode) = (lazylayer_index::FileKind::File, 4096, 0, 0o644);
        }
    }
    let idx = BootIndex::new(idx.layers, idx.entries).unwrap();
    // Opens through the daemon (with and without passthrough), and opens
    // the kernel answers alone: then the first READ checks the content.
    for (passthrough, kernel_opens) in [(true, false), (false, false), (true, true)] {
        let source = LayerDirSource {
            layer_dirs: vec![s.to_path_buf()],
        };
        let m = Mounted::new(idx.clone(), source, None, passthrough);
        if kernel_opens {
            m.kernel_opens();
        }
        let (tx, rx) = mpsc::channel();
        for rel in ["evil/disk", "evil/zero", "evil/fifo", "evil/short"] {
            let (p, tx) = (m.p(rel), tx.clone());
            std::thread::spawn(move || {
                let r = std::fs::read(&p);
                tx.send((rel, r)).unwrap()
            });
        }
        for _ in 0..4 {
            let (rel, r) = rx
                .recv_timeout(Duration::from_secs(20))
                .expect("a reader hung on content that is not a regular file");
            match r {
                Ok(bytes) => panic!(
                    "{rel} (passthrough {passthrough}, kernel opens {kernel_opens}): served {} bytes of a non-file",
                    bytes.len()
                ),
                Err(e) => assert_eq!(errno(&e), EIO, "{rel}: {e}"),
            }
        }
        // The mount stays usable.
        assert!(std::fs::metadata(m.p("evil/short")).unwrap().is_file());
    }
}

/// A hardlink pair an upper layer split (one name whited out): overlayfs
/// (podman, containerd) reports the lower inode's link count, 2, for the name
/// left; so must the lazy file system.
#[test]
fn root_split_hardlink_keeps_its_layers_link_count_like_overlayfs() {
    if !have_root("root_split_hardlink_keeps_its_layers_link_count_like_overlayfs") {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let (l0, l1, ovl) = (
        t.path().join("l0"),
        t.path().join("l1"),
        t.path().join("ovl"),
    );
    for d in [&l0, &l1, &ovl] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(l0.join("kept"), b"pair\n").unwrap();
    std::fs::hard_link(l0.join("kept"), l0.join("gone")).unwrap();
    std::fs::write(l0.join("trio"), b"three\n").unwrap();
    std::fs::hard_link(l0.join("trio"), l0.join("trio2")).unwrap();
    std::fs::hard_link(l0.join("trio"), l0.join("trio3")).unwrap();
    for wh in ["gone", "trio3"] {
        rustix::fs::mknodat(
            rustix::fs::CWD,
            l1.join(wh),
            rustix::fs::FileType::CharacterDevice,
            rustix::fs::Mode::from_raw_mode(0o644),
            0,
        )
        .unwrap();
    }
    let layers = [
        (DIFF_ID.to_string(), l0.clone()),
        (
            "sha256:0000000000000000000000000000000000000000000000000000000000000002".to_string(),
            l1.clone(),
        ),
    ];
    let idx = build_index(&layers).unwrap();
    let m = Mounted::new(
        idx,
        LayerDirSource {
            layer_dirs: vec![l0.clone(), l1.clone()],
        },
        None,
        true,
    );
    let _kernel = Overlay::mount(&[&l1, &l0], None, &ovl).unwrap();
    for name in ["kept", "trio", "trio2"] {
        let want = std::fs::metadata(ovl.join(name)).unwrap().nlink();
        let got = std::fs::metadata(m.p(name)).unwrap().nlink();
        assert_eq!(got, want, "{name}: nlink lazylayer vs kernel overlayfs");
    }
    assert_eq!(std::fs::metadata(ovl.join("kept")).unwrap().nlink(), 2);
    assert!(!m.p("gone").exists());
}

/// The lazy root is mounted nosuid,nodev: a host user who reaches it runs
/// an image's setuid-root binary without privilege and cannot open its
/// device nodes. A container keeps both: it runs on an overlayfs stacked on
/// top, whose own mount flags are the ones that count.
#[test]
fn root_host_users_get_no_setuid_or_devices_from_the_mount() {
    if !have_root("root_host_users_get_no_setuid_or_devices_from_the_mount") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let s = src.path();
    let id = which("id");
    std::fs::copy(&id, s.join("id")).unwrap();
    chmod(&s.join("id"), 0o4755);
    rustix::fs::mknodat(
        rustix::fs::CWD,
        s.join("null"),
        rustix::fs::FileType::CharacterDevice,
        rustix::fs::Mode::from_raw_mode(0o666),
        rustix::fs::makedev(1, 3),
    )
    .unwrap();
    let m = Mounted::layer_dir(s, true);
    // Reachable by anyone (the temp dir holding the mount point is the only
    // private step on the way), so only the mount flags protect it here.
    chmod(m.path.parent().unwrap(), 0o755);
    let opts = mount_options(&m.path);
    assert!(opts.contains(&"nosuid".to_string()), "{opts:?}");
    assert!(opts.contains(&"nodev".to_string()), "{opts:?}");

    let as_nobody = |args: &[&str]| {
        std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .expect("setpriv (util-linux) must be installed")
    };
    let out = as_nobody(&[m.p("id").to_str().unwrap(), "-u"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "65534",
        "{out:?}"
    );
    let out = as_nobody(&["head", "-c", "0", m.p("null").to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a host user opened the image's device: {out:?}"
    );

    // The container's view: an overlay on top keeps setuid working.
    let upper = m._dir.path().join("upper");
    let work = m._dir.path().join("work");
    let merged = m._dir.path().join("merged");
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let _ovl = Overlay::mount(&[&m.path], Some((&upper, &work)), &merged).unwrap();
    let out = as_nobody(&[merged.join("id").to_str().unwrap(), "-u"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{out:?}");
}

fn which(tool: &str) -> PathBuf {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .unwrap_or_else(|| panic!("{tool} not found on PATH"))
}

/// The options of the mount at `target`, from /proc/self/mountinfo.
fn mount_options(target: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let t = target.to_str().unwrap();
    let line = info
        .lines()
        .rfind(|l| l.split(' ').nth(4) == Some(t))
        .unwrap_or_else(|| panic!("{t} is not mounted"));
    line.split(' ')
        .nth(5)
        .unwrap()
        .split(',')
        .map(str::to_string)
        .collect()
}

/// Every entry under `root`, its metadata, each directory listed and each
/// symlink read: what `find -printf` or `tar c` asks of a file system.
fn walk_metadata(root: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            n += 1;
            if m.is_dir() {
                stack.push(p);
            } else if m.file_type().is_symlink() {
                std::fs::read_link(&p).unwrap();
            }
        }
    }
    n
}

/// After a first walk, the kernel answers a walk over the same tree from its
/// caches (entries, attributes, listings, symlink targets): not one request
/// reaches the daemon, so a warm `find`/`tar c` of a lazy root costs what it
/// costs on a local file system.
#[test]
fn root_metadata_walks_after_the_first_are_served_by_kernel_caches() {
    if !have_root("root_metadata_walks_after_the_first_are_served_by_kernel_caches") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::layer_dir(src.path(), true);
    let n = walk_metadata(&m.path);
    let after_first = m.stats.requests();
    assert!(
        n >= 20 && after_first > 0,
        "{n} entries, {after_first} requests"
    );
    assert_eq!(walk_metadata(&m.path), n);
    assert_eq!(
        m.stats.requests() - after_first,
        0,
        "requests of a second walk reached the daemon"
    );
}

/// Once the kernel opens files alone (every byte of the image local), an
/// open, its reads of cached pages and its close reach the daemon no more:
/// a server that opens the same files for every request pays what a native
/// open costs. Content is checked at the first READ as at an open; handles
/// opened before go on reading; ranged content too. Not with passthrough:
/// the kernel fails a cached read of an inode with a passthrough file open,
/// so opens keep coming to the daemon there.
#[test]
fn root_opens_reach_the_daemon_no_more_once_the_kernel_opens_files_alone() {
    if !have_root("root_opens_reach_the_daemon_no_more_once_the_kernel_opens_files_alone") {
        return;
    }
    let (src, bytes, source) = ranged_big_bin(0..BIG as u64, None);
    let small = std::fs::read(src.path().join("data/small.bin")).unwrap();
    for passthrough in [false, true] {
        let m = Mounted::new(index_of(src.path()), source.clone(), None, passthrough);
        // Open before the switch, and kept open across it (a running
        // process's mapped library).
        let before_switch = File::open(m.p("a/hello.txt")).unwrap();
        let mut head = [0u8; 5];
        before_switch.read_exact_at(&mut head, 0).unwrap();
        m.kernel_opens();
        let files = [
            ("a/hello.txt", b"hello, world\n".to_vec()),
            ("data/small.bin", small.clone()),
            ("a/b/hl2", b"linked\n".to_vec()),
            ("data/big.bin", bytes.to_vec()),
        ];
        let pass = || {
            for (rel, want) in &files {
                let got = std::fs::read(m.p(rel))
                    .unwrap_or_else(|e| panic!("{rel} (passthrough {passthrough}): {e}"));
                assert!(
                    got == *want,
                    "{rel}: {} bytes, not the {} indexed",
                    got.len(),
                    want.len()
                );
            }
        };
        // The first pass reads each file's pages once (by inode, handle 0).
        pass();
        // Requests other than READs (opens, flushes, releases, lookups):
        // none once the kernel opens files alone. READs only for pages the
        // kernel let go (readahead still counting, reclaim): a few.
        let (others0, reads0) = others_and_reads(&m);
        for _ in 0..50 {
            pass();
        }
        let (others1, reads1) = others_and_reads(&m);
        if passthrough {
            assert!(!m.stats.kernel_opens());
            assert!(
                others1 - others0 >= 200,
                "{} requests: opens must still come with passthrough",
                others1 - others0
            );
        } else {
            assert!(m.stats.kernel_opens());
            assert_eq!(
                others1 - others0,
                0,
                "50 passes of opens, cached reads and closes reached the daemon"
            );
            assert!(
                reads1 - reads0 < 50,
                "{} READs in 50 passes",
                reads1 - reads0
            );
        }
        // The handle from before the switch reads on, and closes.
        let mut s = String::new();
        (&before_switch).read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello, world\n");
        drop(before_switch);
        // Pages the kernel let go are read again (by inode).
        let f = File::open(m.p("data/small.bin")).unwrap();
        rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let mut again = Vec::new();
        (&f).read_to_end(&mut again).unwrap();
        assert_eq!(again, small);
    }
}

/// Once the kernel opens files alone, a file whose first READ comes at a
/// random place has its local copy read ahead whole (the kernel reads a
/// FUSE file ahead only as far as each random request), and one read from
/// its start is left to the kernel's own readahead.
#[test]
fn root_a_file_first_read_at_random_is_read_ahead_whole() {
    if !have_root("root_a_file_first_read_at_random_is_read_ahead_whole") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let (random, seq) = (
        src.path().join("data/big.bin"),
        src.path().join("data/seq.bin"),
    );
    let seq_bytes = pseudo_random(BIG, 3);
    std::fs::write(&seq, &seq_bytes).unwrap();
    let m = Mounted::layer_dir(src.path(), false);
    m.kernel_opens();
    // The layer's copies out of the page cache: what a cold read finds.
    for p in [&random, &seq] {
        evict(p);
        assert!(
            resident(p) < BIG as u64 / 64,
            "{} still cached",
            p.display()
        );
    }
    let want = pseudo_random(BIG, 2); // make_tree's big.bin
    let at = (9 << 20) + 123;
    let mut got = [0u8; 4096];
    File::open(m.p("data/big.bin"))
        .unwrap()
        .read_exact_at(&mut got, at as u64)
        .unwrap();
    assert!(got[..] == want[at..at + 4096]);
    let mut head = [0u8; 4096];
    File::open(m.p("data/seq.bin"))
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(head[..] == seq_bytes[..4096]);
    wait_resident(std::slice::from_ref(&random), BIG as u64);
    assert_eq!(
        resident(&random),
        BIG as u64,
        "the file read at random was not read ahead whole"
    );
    let seq_cached = resident(&seq);
    assert!(
        seq_cached < BIG as u64 / 4,
        "{seq_cached} bytes of the file read from its start were read ahead"
    );
}

/// Once the kernel opens files alone, two first READs in the order a tree
/// walk reads (`tar`: depth first, names sorted) have the next files' local
/// copies read into the page cache ahead of the walker; one first READ alone
/// reads nothing ahead.
#[test]
fn root_a_walk_has_the_next_files_read_ahead() {
    if !have_root("root_a_walk_has_the_next_files_read_ahead") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let dir = src.path().join("walk");
    std::fs::create_dir_all(dir.join("c")).unwrap();
    let size = 96 << 10;
    // Walk order: a, b, (empty and the symlink are no files to read), c/x, d, e.
    let files = ["a.bin", "b.bin", "c/x.bin", "d.bin", "e.bin"];
    for (n, f) in files.iter().enumerate() {
        std::fs::write(dir.join(f), pseudo_random(size, 10 + n as u64)).unwrap();
    }
    std::fs::write(dir.join("b.empty"), b"").unwrap();
    std::os::unix::fs::symlink("a.bin", dir.join("b.link")).unwrap();
    let m = Mounted::layer_dir(src.path(), false);
    m.kernel_opens();
    for f in files {
        evict(&dir.join(f));
    }
    let read = |n: usize| {
        let got = std::fs::read(m.p(&format!("walk/{}", files[n]))).unwrap();
        assert!(got == pseudo_random(size, 10 + n as u64), "{}", files[n]);
    };
    let ahead = &files[2..];
    read(0);
    // Nothing runs ahead of a single read; a little time to show it.
    std::thread::sleep(Duration::from_millis(300));
    for f in ahead {
        assert_eq!(resident(&dir.join(f)), 0, "{f} read ahead after one read");
    }
    read(1);
    // The walk is on: the next files come into the page cache without a
    // reader, on a thread of the daemon's.
    let paths: Vec<PathBuf> = ahead.iter().map(|f| dir.join(f)).collect();
    wait_resident(&paths, size as u64);
    for f in ahead {
        assert_eq!(
            resident(&dir.join(f)),
            size as u64,
            "{f} not read ahead of the walk"
        );
    }
}

/// Two walks at once (two `tar`s, or a backup beside a server reading its
/// own files) each have their next files read ahead: one walker's reads do
/// not end the other's walk.
#[test]
fn root_two_walks_at_once_both_have_their_next_files_read_ahead() {
    if !have_root("root_two_walks_at_once_both_have_their_next_files_read_ahead") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let size = 64 << 10;
    let files = ["a.bin", "b.bin", "c.bin", "d.bin", "e.bin"];
    let trees = ["walk1", "walk2"];
    for (t, tree) in trees.iter().enumerate() {
        std::fs::create_dir_all(src.path().join(tree)).unwrap();
        for (n, f) in files.iter().enumerate() {
            let bytes = pseudo_random(size, (100 * t + n) as u64);
            std::fs::write(src.path().join(tree).join(f), bytes).unwrap();
        }
    }
    let m = Mounted::layer_dir(src.path(), false);
    m.kernel_opens();
    for tree in trees {
        for f in files {
            evict(&src.path().join(tree).join(f));
        }
    }
    // Interleaved: each walker's first READs alternate with the other's.
    for (n, f) in files.iter().enumerate().take(2) {
        for (t, tree) in trees.iter().enumerate() {
            let got = std::fs::read(m.p(&format!("{tree}/{f}"))).unwrap();
            assert!(got == pseudo_random(size, (100 * t + n) as u64));
        }
    }
    let root = src.path();
    let ahead: Vec<PathBuf> = trees
        .iter()
        .flat_map(|t| files[2..].iter().map(move |f| root.join(t).join(f)))
        .collect();
    wait_resident(&ahead, size as u64);
    for p in &ahead {
        assert_eq!(resident(p), size as u64, "{} not read ahead", p.display());
    }
}

/// Once every byte is local the mount reads ahead 1 MiB (one READ of the
/// largest size FUSE allows) instead of the kernel's 128 KiB: a large
/// sequential read then costs an eighth of the round trips.
#[test]
fn root_reads_ahead_wider_once_the_kernel_opens_files_alone() {
    if !have_root("root_reads_ahead_wider_once_the_kernel_opens_files_alone") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let m = Mounted::layer_dir(src.path(), false);
    let st = rustix::fs::statx(
        rustix::fs::CWD,
        &m.path,
        rustix::fs::AtFlags::empty(),
        rustix::fs::StatxFlags::empty(),
    )
    .unwrap();
    let ra = PathBuf::from(format!(
        "/sys/class/bdi/{}:{}/read_ahead_kb",
        st.stx_dev_major, st.stx_dev_minor
    ));
    let kb = || -> u32 {
        std::fs::read_to_string(&ra)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    assert!(kb() < 1024, "{} KiB before the switch", kb());
    m.kernel_opens();
    assert_eq!(kb(), 1024, "the switch left the readahead as it was");
    // A sequential read of 20 MiB, none of it cached: READs of up to 1 MiB.
    let f = File::open(m.p("data/big.bin")).unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let before = m.stats.read_requests();
    let mut got = Vec::new();
    (&f).read_to_end(&mut got).unwrap();
    assert!(got == pseudo_random(BIG, 2), "big.bin read back wrong");
    let reads = m.stats.read_requests() - before;
    assert!(reads <= 60, "{reads} READs for 20 MiB");
}

/// `p` written out and dropped from the page cache: what a cold read of a
/// layer's file finds.
fn evict(p: &Path) {
    let f = File::open(p).unwrap();
    f.sync_all().unwrap();
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
}

/// Wait, bounded, until each of `paths` has `bytes` in the page cache: a
/// read-ahead runs on without its reader. The caller asserts what came.
fn wait_resident(paths: &[PathBuf], bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while paths.iter().any(|p| resident(p) < bytes) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Bytes of `p` in the page cache (util-linux's `fincore`).
fn resident(p: &Path) -> u64 {
    let out = std::process::Command::new(which("fincore"))
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .arg(p)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fincore: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// Requests other than READs so far, and READs.
fn others_and_reads(m: &Mounted) -> (u64, u64) {
    let (all, reads) = (m.stats.requests(), m.stats.read_requests());
    (all - reads, reads)
}

/// An image with no extended attribute anywhere tells the kernel so at the
/// first GETXATTR (ENOSYS): an overlayfs on the root asks for two on every
/// lookup (`trusted.overlay.metacopy`, `security.capability`), ~6,100
/// round trips in a `find /usr` of python3. One with xattrs serves them all
/// (root_metadata_matches_source_tree).
#[test]
fn root_an_image_without_xattrs_is_asked_for_one_once() {
    if !have_root("root_an_image_without_xattrs_is_asked_for_one_once") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    for i in 0..20 {
        std::fs::write(src.path().join(format!("f{i}")), b"x").unwrap();
    }
    let m = Mounted::layer_dir(src.path(), true);
    let before = m.stats.requests();
    for i in 0..20 {
        let mut buf = [0u8; 64];
        for name in ["trusted.overlay.metacopy", "security.capability", "user.x"] {
            let e = rustix::fs::lgetxattr(m.p(&format!("f{i}")), name, &mut buf[..]).unwrap_err();
            assert_eq!(e, rustix::io::Errno::NOTSUP, "f{i} {name}");
        }
    }
    // The stats of the 20 files (a LOOKUP each, an attribute or two) and
    // one GETXATTR: not 60 more.
    assert!(
        m.stats.requests() - before <= 25,
        "{} requests for 20 lookups and 60 getxattrs",
        m.stats.requests() - before
    );
    assert_eq!(
        rustix::fs::llistxattr(m.p("f0"), &mut [0u8; 64][..]).unwrap(),
        0,
        "listing names still answers (none)"
    );
}

/// Ranged content (a boot file arriving by chunks) with only `local` of
/// its bytes here; the rest "arrives" when a reader waits for it.
struct PartlyLocal {
    bytes: Arc<Vec<u8>>,
    local: std::ops::Range<u64>,
    /// When set, a read that needs bytes from outside `local` (a fetch)
    /// waits until the gate opens, counted in the number while it waits.
    gate: Option<(Arc<Gate>, Arc<std::sync::atomic::AtomicUsize>)>,
}

impl lazylayer_fs::RangedContent for PartlyLocal {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        let end = offset + buf.len() as u64;
        (offset >= self.local.start && end <= self.local.end).then(|| self.read_at(buf, offset))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = offset + buf.len() as u64;
        let fetched = offset < self.local.start || end > self.local.end;
        if let (Some((gate, waiting)), true) = (&self.gate, fetched) {
            waiting.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            gate.pass();
        }
        let o = offset as usize;
        buf.copy_from_slice(&self.bytes[o..o + buf.len()]);
        Ok(())
    }
    fn local_ranges(&self) -> Vec<std::ops::Range<u64>> {
        vec![self.local.clone()]
    }
}

#[derive(Clone)]
struct RangedSource {
    dir: PathBuf,
    file: Vec<u8>,
    content: Arc<PartlyLocal>,
}

impl ContentSource for RangedSource {
    fn open(&self, _idx: u32, entry: &IndexEntry) -> io::Result<File> {
        lazylayer_sys::beneath::open_beneath(&self.dir, &entry.path)
    }
    fn ranged(
        &self,
        _idx: u32,
        entry: &IndexEntry,
        _passthrough: bool,
    ) -> Option<Arc<dyn lazylayer_fs::RangedContent>> {
        (entry.path == self.file)
            .then(|| self.content.clone() as Arc<dyn lazylayer_fs::RangedContent>)
    }
}

/// A tree (kept while the tempdir lives) whose data/big.bin is ranged
/// content with `local` present, and that file's bytes.
fn ranged_big_bin(
    local: std::ops::Range<u64>,
    gate: Option<(Arc<Gate>, Arc<std::sync::atomic::AtomicUsize>)>,
) -> (tempfile::TempDir, Arc<Vec<u8>>, RangedSource) {
    let src = tempfile::tempdir().unwrap();
    make_tree(src.path());
    let bytes = Arc::new(std::fs::read(src.path().join("data/big.bin")).unwrap());
    let source = RangedSource {
        dir: src.path().to_path_buf(),
        file: b"data/big.bin".to_vec(),
        content: Arc::new(PartlyLocal {
            bytes: bytes.clone(),
            local,
            gate,
        }),
    };
    (src, bytes, source)
}

/// The local bytes of ranged content are in the page cache once the file
/// is open: reading them brings no READ to the daemon (a program mapping
/// its libraries faulted them in a page at a time, ~1,400 READs for
/// python3), only whole pages are handed over, and what was not local is
/// still read through the daemon, every byte right.
#[test]
fn root_local_bytes_of_ranged_content_are_in_the_page_cache_at_open() {
    if !have_root("root_local_bytes_of_ranged_content_are_in_the_page_cache_at_open") {
        return;
    }
    // Unaligned at both ends: the pages 8192..696320 are whole.
    let (src, bytes, source) = ranged_big_bin(5000..700_000, None);
    let m = Mounted::new(index_of(src.path()), source, None, true);
    let f = File::open(m.p("data/big.bin")).unwrap();
    assert_eq!(m.stats.preloaded_bytes(), 696_320 - 8192);
    let mut buf = vec![0u8; 696_320 - 8192];
    f.read_exact_at(&mut buf, 8192).unwrap();
    assert!(buf == bytes[8192..696_320], "preloaded bytes differ");
    assert_eq!(m.stats.read_requests(), 0, "preloaded pages were READ");
    // The rest comes through the daemon.
    let mut all = Vec::new();
    (&f).read_to_end(&mut all).unwrap();
    assert!(all == *bytes, "the file read back differs");
    assert!(m.stats.read_requests() > 0);
}

/// A second open of a file whose READ is waiting for a fetch returns at
/// once. The READ holds its pages locked in the kernel; storing them into
/// the page cache at that open waited on those locks, so the open hung
/// until the fetch came, and a server killed meanwhile never exited (its
/// thread stuck on the lock, the READ never answered): CI's kill -9 of a
/// lazy run hung for 90 minutes. Only an inode's first open stores pages.
#[test]
fn root_an_open_beside_a_waiting_read_does_not_wait_for_it() {
    if !have_root("root_an_open_beside_a_waiting_read_does_not_wait_for_it") {
        return;
    }
    let gate = Arc::new(Gate::default());
    let _release = ReleaseOnDrop(gate.clone());
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (src, bytes, source) = ranged_big_bin(0..1 << 20, Some((gate.clone(), waiting.clone())));
    let m = Mounted::new(index_of(src.path()), source, None, true);
    let path = m.p("data/big.bin");
    let f = File::open(&path).unwrap();
    assert_eq!(m.stats.preloaded_bytes(), 1 << 20);
    // Out of the page cache again, so a read locks local pages as well.
    rustix::fs::fadvise(&f, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    // Local pages and the first page past them: one READ, waiting at the gate.
    let reader = {
        let f = f.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            f.read_exact_at(&mut buf, (1 << 20) - (32 << 10))
                .map(|()| buf)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while waiting.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the read never reached the fetch"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let (tx, rx) = mpsc::channel();
    let opener = {
        let path = path.clone();
        std::thread::spawn(move || {
            let r = File::open(&path);
            let _ = tx.send(());
            r
        })
    };
    // Generous: the open needs no fetch, only the daemon's reply.
    let opened_at_once = rx.recv_timeout(Duration::from_secs(5)).is_ok();
    gate.release();
    let second = opener.join().unwrap().unwrap();
    let buf = reader.join().unwrap().unwrap();
    let at = (1usize << 20) - (32 << 10);
    assert!(buf == bytes[at..at + (64 << 10)], "the waited read differs");
    assert!(
        opened_at_once,
        "the second open waited for the first one's pending READ"
    );
    let mut all = Vec::new();
    (&second).read_to_end(&mut all).unwrap();
    assert!(all == *bytes, "the file read back differs");
}

/// Closing a file asks nothing of the daemon. A FLUSH at close waits for
/// its answer without end (the kernel forces it), so a process that had
/// its own mount's files open and was killed hung in its exit, its server
/// threads gone: CI's kill -9 of a lazy run that was reading the image's
/// /etc/passwd. Opens say FOPEN_NOFLUSH; a RELEASE does not wait.
#[test]
fn root_closing_a_file_sends_no_flush() {
    if !have_root("root_closing_a_file_sends_no_flush") {
        return;
    }
    let (src, _, source) = ranged_big_bin(0..1 << 20, None);
    for passthrough in [true, false] {
        let m = Mounted::new(index_of(src.path()), source.clone(), None, passthrough);
        // A file read through the daemon or passed through, and ranged content.
        for path in ["a/hello.txt", "data/big.bin"] {
            let f = File::open(m.p(path)).unwrap();
            let mut head = [0u8; 4];
            f.read_exact_at(&mut head, 0).unwrap();
            let before = m.stats.requests();
            drop(f);
            assert_eq!(
                m.stats.requests(),
                before,
                "closing {path} (passthrough {passthrough}) sent a request"
            );
        }
    }
}

/// The role of this test binary run again as a child: the server of its own
/// mount, armed with `force_unmount_on_death`.
const SELF_SERVER: &str = "LAZYLAYER_TEST_SELF_SERVER";

/// A server killed while one of its own threads waits on its mount (an OPEN
/// its server read and had not answered: the kernel does not end that wait
/// on SIGKILL) still exits, because the armed mount is force-unmounted from
/// outside. The server is this test binary again, in a child process (the
/// role above): it opens a file whose content never comes, and is killed.
#[test]
fn root_a_server_killed_while_it_waits_on_its_own_mount_exits() {
    const NAME: &str = "root_a_server_killed_while_it_waits_on_its_own_mount_exits";
    if let Ok(dir) = std::env::var(SELF_SERVER) {
        serve_and_open_own_file(Path::new(&dir));
        return;
    }
    if !have_root(NAME) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("src")).unwrap();
    std::fs::create_dir(dir.path().join("mnt")).unwrap();
    std::fs::write(dir.path().join("src/f"), b"never served").unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(SELF_SERVER, dir.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mnt = dir.path().join("mnt");
    // Whatever happens below, nothing stays mounted or stuck.
    let _cleanup = Finally(|| {
        lazylayer_testsupport::abort_fuse_below(&mnt);
        let _ = rustix::mount::unmount(&mnt, rustix::mount::UnmountFlags::DETACH);
    });
    let mut out = io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("SELF-SERVER-WAITING") {
        line.clear();
        let n = io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert!(n > 0, "the serving child ended before its open waited");
    }
    lazylayer_testsupport::kill_9_and_reap(
        &mut child,
        &mnt,
        "the server killed while it waited on its own mount",
        Duration::from_secs(30),
    );
    // The connection is over: the mount (left behind, busy when it was
    // forced) answers no more.
    let e = std::fs::metadata(mnt.join("f")).unwrap_err();
    assert_eq!(errno(&e), ENOTCONN, "{e}");
}

const ENOTCONN: i32 = 107;

/// Runs `f` when dropped.
struct Finally<F: FnMut()>(F);
impl<F: FnMut()> Drop for Finally<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// The child's part: mount `dir/src` at `dir/mnt` with a source that never
/// delivers, arm the mount, say "waiting" once the open of `f` is in the
/// source, and wait in that open until killed.
fn serve_and_open_own_file(dir: &Path) {
    use std::sync::atomic::Ordering::SeqCst;
    let waiting = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let source = WaitingSource {
        dir: dir.join("src"),
        gate: Arc::new(Gate::default()),
        waiting: waiting.clone(),
    };
    let fs = LazyFs::new(
        Arc::new(index_of(&dir.join("src"))),
        source,
        None,
        FsOptions::default(),
    );
    let mut m = FsMount::mount(fs, &dir.join("mnt"), 2).unwrap();
    m.force_unmount_on_death().unwrap();
    std::thread::spawn(move || {
        while waiting.load(SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut o = io::stdout();
        o.write_all(b"\nSELF-SERVER-WAITING\n").unwrap();
        o.flush().unwrap();
    });
    // Blocks until killed (or the gate's bound, 120 s, if nobody kills).
    let _ = std::fs::read(dir.join("mnt/f"));
    drop(m);
}

/// A tmpfs of a test's own, unmounted on drop (also when the test panics).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        rustix::mount::mount(
            "test-meta",
            at,
            "tmpfs",
            rustix::mount::MountFlags::NOSUID | rustix::mount::MountFlags::NODEV,
            c"mode=0755",
        )
        .unwrap();
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        use rustix::mount::{unmount, UnmountFlags};
        if unmount(&self.0, UnmountFlags::empty()).is_err() {
            let _ = unmount(&self.0, UnmountFlags::DETACH);
        }
    }
}

/// The stub tree of the source tree's index, stacked by overlayfs over the
/// store's layer directory (`layers/<hex>/fs`) and, as a second data-only
/// layer, this file system's data view: what a container's overlay root is.
struct StubRoot {
    overlay: Option<Overlay>,
    fs: Mounted,
    _meta: Tmpfs,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

const HEX: &str = "00000000000000000000000000000000000000000000000000000000000000aa";

fn stub_root(store: &Path, src: &Path) -> StubRoot {
    stub_root_as(store, src, false)
}

/// With `erofs`, the stubs are an EROFS image ([`lazylayer_fs::stub_image`])
/// instead of a tmpfs tree.
fn stub_root_as(store: &Path, src: &Path, erofs: bool) -> StubRoot {
    let index = index_of(src);
    let view = Arc::new(lazylayer_fs::DataView::new(&[HEX.to_string()], None).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let meta = if erofs {
        let image = lazylayer_fs::stub_image::build(&index, &view).unwrap();
        assert_eq!(image.inodes + hard_links(&index), index.len());
        let at = dir.path().join("meta");
        std::fs::create_dir(&at).unwrap();
        lazylayer_fs::stub_image::mount(&image.bytes, &at, dir.path()).unwrap();
        Tmpfs(at)
    } else {
        let meta = Tmpfs::mount(&dir.path().join("meta"));
        let made = lazylayer_fs::meta_tree::build(&index, &view, &meta.0).unwrap();
        assert_eq!(made.entries, index.len());
        meta
    };
    let source = LayerDirSource {
        layer_dirs: vec![src.to_path_buf()],
    };
    let opts = FsOptions {
        passthrough: false,
        data_view: Some(view),
        ..FsOptions::default()
    };
    let fs = Mounted::with_options(index, source, None, opts);
    let path = dir.path().join("root");
    std::fs::create_dir(&path).unwrap();
    // Read-only: with an upper, the root directory would be the upper's.
    let lowers = format!(
        "{}::{}::{}",
        meta.0.display(),
        store.display(),
        fs.path.display()
    );
    let overlay = Overlay::mount(&[Path::new(&lowers)], None, &path).unwrap();
    StubRoot {
        overlay: Some(overlay),
        fs,
        _meta: meta,
        path,
        _dir: dir,
    }
}

impl Drop for StubRoot {
    fn drop(&mut self) {
        self.overlay.take();
    }
}

/// A store directory holding `make_tree`'s tree as the extracted layer
/// `HEX`: (the store, the layer's `fs`).
fn layer_in_store() -> (tempfile::TempDir, PathBuf) {
    let store = tempfile::tempdir().unwrap();
    let src = store.path().join(HEX).join("fs");
    std::fs::create_dir_all(&src).unwrap();
    make_tree(&src);
    (store, src)
}

/// The stub tree shows the source tree's every name, stat field, link
/// target and xattr (none of its own), and each file's bytes are the
/// layer's: read by the kernel from the store's directory, no request to
/// this file system's data view.
#[test]
fn root_stub_tree_over_the_stores_layer_is_the_source_tree() {
    if !have_root("root_stub_tree_over_the_stores_layer_is_the_source_tree") {
        return;
    }
    let (store, src) = layer_in_store();
    let root = stub_root(store.path(), &src);
    let n = compare_trees(&src, &root.path, false);
    assert!(n >= 20, "walked only {n} entries");
    check_content_at(&src, &root.path);
    let tool = std::fs::metadata(root.path.join("bin/tool")).unwrap();
    assert_eq!(tool.mode() & 0o7777, 0o4755);
    assert_eq!(
        root.fs.stats.read_requests(),
        0,
        "a local layer's files are read without the daemon"
    );
}

/// The `k`th name of the EROFS test's large directory: four first
/// characters (two sort before `.`), lengths up to 100.
fn many_name(k: usize) -> String {
    format!(
        "{}entry-{k:04}-{}",
        ["-", "+", "a", "~"][k % 4],
        "x".repeat(k % 90)
    )
}

/// Names of index entries that are a hard link to an earlier one.
fn hard_links(index: &BootIndex) -> usize {
    (0..index.len())
        .filter(|&i| {
            let g = index.entries[i].hardlink_group;
            g != 0 && index.hardlink_members(g)[0] as usize != i
        })
        .count()
}

/// The EROFS image of the stubs is the same root as the tmpfs tree: every
/// name, stat field, link target and xattr of the source, the bytes the
/// layer's, read by the kernel from the store; also for what the tmpfs
/// tree's test does not make: a directory over several blocks, names that
/// sort before `.`, a symlink target too long to follow its inode, a
/// `security.` xattr.
#[test]
fn root_stub_image_over_the_stores_layer_is_the_source_tree() {
    if !have_root("root_stub_image_over_the_stores_layer_is_the_source_tree") {
        return;
    }
    let (store, src) = layer_in_store();
    let many = src.join("many");
    std::fs::create_dir(&many).unwrap();
    for k in 0..700 {
        let name = many_name(k);
        std::fs::write(many.join(&name), format!("{k}\n")).unwrap();
    }
    std::os::unix::fs::symlink("t/".repeat(1500), many.join("long-link")).unwrap();
    // Targets of every length class, so that inodes whose target follows
    // them land at every offset of a block, some moved to the next one.
    for k in 1..160usize {
        let target = "y".repeat((k * 37) % 4000 + 1);
        std::os::unix::fs::symlink(target, many.join(format!("ln{k:03}"))).unwrap();
    }
    std::fs::create_dir(many.join("sub")).unwrap();
    rustix::fs::setxattr(
        many.join("+entry-0001-x"),
        "security.lazylayer-test",
        b"v",
        rustix::fs::XattrFlags::empty(),
    )
    .unwrap();
    let root = stub_root_as(store.path(), &src, true);
    let n = compare_trees(&src, &root.path, false);
    assert!(n >= 880, "walked only {n} entries");
    check_content_at(&src, &root.path);
    for absent in [
        "many/entry-0000-",
        "many/,",
        "many/zzz",
        "many/-entry-0000-x",
    ] {
        assert!(!root.path.join(absent).exists(), "{absent} found");
    }
    for k in [0, 1, 349, 698, 699] {
        let name = many_name(k);
        assert_eq!(
            std::fs::read_to_string(root.path.join("many").join(&name)).unwrap(),
            format!("{k}\n"),
            "{name} looked up"
        );
    }
    assert_eq!(
        root.fs.stats.read_requests(),
        0,
        "a local layer's files are read without the daemon"
    );
}

/// A layer not in the store (not fetched yet) is read through the data
/// view: the same bytes, through this file system.
#[test]
fn root_stub_tree_reads_a_layer_not_in_the_store_through_the_data_view() {
    if !have_root("root_stub_tree_reads_a_layer_not_in_the_store_through_the_data_view") {
        return;
    }
    let layer = tempfile::tempdir().unwrap();
    make_tree(layer.path());
    let empty_store = tempfile::tempdir().unwrap();
    let root = stub_root(empty_store.path(), layer.path());
    check_content_at(layer.path(), &root.path);
    assert!(root.fs.stats.read_requests() > 0);
    // The data view names only what the layer holds, nothing else.
    let view = &root.fs.path;
    assert!(view.join(HEX).join("fs/a/hello.txt").is_file());
    assert!(!view.join(HEX).join("fs/a/missing").exists());
    assert!(
        !view.join("a/hello.txt").exists(),
        "no root view beside the data view"
    );
    let other = HEX.replace("aa", "bb");
    assert!(!view.join(other).join("fs/a/hello.txt").exists());
}
