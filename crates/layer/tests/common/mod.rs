//! Helpers shared by the integration tests: a raw tar builder that can write
//! what `tar::Builder` refuses (`..`, absolute paths), and tree snapshots for
//! field-by-field comparison.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{self as rfs, AtFlags, FileType};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Print why a test is skipped and return true when not running as root.
pub fn skip_unless_root(test: &str) -> bool {
    !lazylayer_testsupport::require_root(test, "chown, mknod, trusted.* xattrs, mount")
}

/// One raw tar member.
pub struct Raw<'a> {
    pub name: &'a [u8],
    pub kind: EntryType,
    pub link: &'a [u8],
    pub data: &'a [u8],
    pub mode: u32,
    /// Size written in the header; defaults to `data.len()`.
    pub declared_size: Option<u64>,
    pub dev: (u32, u32),
}

impl<'a> Raw<'a> {
    pub fn new(name: &'a [u8], kind: EntryType) -> Self {
        Raw {
            name,
            kind,
            link: b"",
            data: b"",
            mode: if kind == EntryType::Directory {
                0o755
            } else {
                0o644
            },
            declared_size: None,
            dev: (0, 0),
        }
    }

    pub fn file(name: &'a [u8], data: &'a [u8]) -> Self {
        Raw {
            data,
            ..Raw::new(name, EntryType::Regular)
        }
    }

    pub fn dir(name: &'a [u8]) -> Self {
        Raw::new(name, EntryType::Directory)
    }

    pub fn symlink(name: &'a [u8], target: &'a [u8]) -> Self {
        Raw {
            link: target,
            ..Raw::new(name, EntryType::Symlink)
        }
    }

    pub fn hardlink(name: &'a [u8], target: &'a [u8]) -> Self {
        Raw {
            link: target,
            ..Raw::new(name, EntryType::Link)
        }
    }
}

/// Builds tar bytes header by header, writing names straight into the header
/// fields so nothing is validated.
#[derive(Default)]
pub struct RawTar {
    pub bytes: Vec<u8>,
}

impl RawTar {
    pub fn new() -> Self {
        RawTar::default()
    }

    pub fn add(&mut self, e: Raw<'_>) -> &mut Self {
        let mut h = Header::new_ustar();
        assert!(e.name.len() <= 100, "use pax() for long names");
        h.as_old_mut().name[..e.name.len()].copy_from_slice(e.name);
        h.as_old_mut().linkname[..e.link.len()].copy_from_slice(e.link);
        h.set_entry_type(e.kind);
        h.set_mode(e.mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_600_000_000);
        h.set_size(e.declared_size.unwrap_or(e.data.len() as u64));
        if matches!(e.kind, EntryType::Char | EntryType::Block) {
            h.set_device_major(e.dev.0).unwrap();
            h.set_device_minor(e.dev.1).unwrap();
        }
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(e.data);
        if e.declared_size.is_none() {
            self.pad(e.data.len());
        }
        self
    }

    /// A PAX extended header applying to the next member.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = 3 + k.len() + v.len();
            let mut len = rest + 1;
            while rest + len.to_string().len() != len {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.extension(EntryType::XHeader, b"PaxHeaders/x", &body)
    }

    /// An extension member (PAX `x`, GNU `L`/`K`) with the given body.
    pub fn extension(&mut self, kind: EntryType, name: &[u8], body: &[u8]) -> &mut Self {
        let mut h = Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(body.len() as u64);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(body);
        self.pad(body.len());
        self
    }

    fn pad(&mut self, len: usize) {
        let rem = len % 512;
        if rem != 0 {
            self.bytes.extend(std::iter::repeat_n(0u8, 512 - rem));
        }
    }

    /// Append the end-of-archive marker and return the bytes.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut b = std::mem::take(&mut self.bytes);
        b.extend_from_slice(&[0; 1024]);
        b
    }
}

/// Everything compared about one file-system object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub ftype: String,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only (a directory's size depends on the file system).
    pub size: Option<u64>,
    pub mtime: i64,
    pub link: Option<Vec<u8>>,
    pub rdev: Option<(u32, u32)>,
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
    pub content: Option<String>,
}

/// lstat-level snapshot of a tree, keyed by relative path ("" is the root),
/// plus the hardlink partition (groups of paths sharing an inode).
pub struct Snapshot {
    pub nodes: BTreeMap<PathBuf, Node>,
    pub link_groups: Vec<Vec<PathBuf>>,
}

pub fn snapshot(root: &Path) -> Snapshot {
    let mut nodes = BTreeMap::new();
    let mut inodes: BTreeMap<(u64, u64), Vec<PathBuf>> = BTreeMap::new();
    walk(root, Path::new(""), &mut nodes, &mut inodes);
    let mut link_groups: Vec<Vec<PathBuf>> = inodes.into_values().filter(|g| g.len() > 1).collect();
    link_groups.sort();
    Snapshot { nodes, link_groups }
}

fn walk(
    root: &Path,
    rel: &Path,
    nodes: &mut BTreeMap<PathBuf, Node>,
    inodes: &mut BTreeMap<(u64, u64), Vec<PathBuf>>,
) {
    let full = if rel.as_os_str().is_empty() {
        root.to_path_buf()
    } else {
        root.join(rel)
    };
    let st = rfs::statat(rfs::CWD, &full, AtFlags::SYMLINK_NOFOLLOW).unwrap();
    let ft = FileType::from_raw_mode(st.st_mode);
    let node = Node {
        ftype: format!("{ft:?}"),
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        size: (ft == FileType::RegularFile).then_some(st.st_size as u64),
        mtime: st.st_mtime,
        link: (ft == FileType::Symlink)
            .then(|| rfs::readlink(&full, Vec::new()).unwrap().into_bytes()),
        rdev: matches!(ft, FileType::CharacterDevice | FileType::BlockDevice)
            .then(|| (rfs::major(st.st_rdev), rfs::minor(st.st_rdev))),
        xattrs: xattrs(&full),
        content: (ft == FileType::RegularFile)
            .then(|| hex::encode(Sha256::digest(std::fs::read(&full).unwrap()))),
    };
    if ft != FileType::Directory {
        inodes
            .entry((st.st_dev, st.st_ino))
            .or_default()
            .push(rel.to_path_buf());
    }
    nodes.insert(rel.to_path_buf(), node);
    if ft == FileType::Directory {
        let mut children: Vec<_> = std::fs::read_dir(&full)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        children.sort();
        for c in children {
            walk(root, &rel.join(c), nodes, inodes);
        }
    }
}

pub fn xattrs(path: &Path) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut names = vec![0u8; 65536];
    let n = match rfs::llistxattr(path, &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => 0,
        Err(e) => panic!("llistxattr {}: {e}", path.display()),
    };
    let mut out = BTreeMap::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
        let mut val = vec![0u8; 65536];
        let m = rfs::lgetxattr(path, OsStr::from_bytes(name), &mut val[..]).unwrap();
        out.insert(name.to_vec(), val[..m].to_vec());
    }
    out
}

/// Assert two snapshots are equal, naming the first difference.
pub fn assert_same_tree(want: &Snapshot, got: &Snapshot) {
    let wk: Vec<_> = want.nodes.keys().collect();
    let gk: Vec<_> = got.nodes.keys().collect();
    assert_eq!(wk, gk, "paths differ");
    for (p, w) in &want.nodes {
        assert_eq!(w, &got.nodes[p], "node {} differs", p.display());
    }
    assert_eq!(want.link_groups, got.link_groups, "hardlink groups differ");
}

/// A scratch area: `root` (the layer dir) next to `outside`, which holds one
/// file, `secret`, that no archive may touch.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    pub root: PathBuf,
    pub outside: PathBuf,
}

impl Sandbox {
    pub fn new() -> Self {
        Self::with_dir(tempfile::tempdir().unwrap())
    }

    /// A sandbox in memory (tmpfs) when the machine has one: for tests that
    /// make thousands.
    pub fn in_memory() -> Self {
        match tempfile::tempdir_in("/dev/shm") {
            Ok(dir) => Self::with_dir(dir),
            Err(_) => Self::new(),
        }
    }

    fn with_dir(dir: tempfile::TempDir) -> Self {
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret"), b"secret").unwrap();
        rfs::chmod(outside.join("secret"), rfs::Mode::from_raw_mode(0o644)).unwrap();
        Sandbox { dir, root, outside }
    }

    /// Nothing was created, removed or changed outside `root`.
    pub fn assert_outside_untouched(&self) {
        let mut top: Vec<_> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        top.sort();
        assert_eq!(
            top,
            ["outside", "root"],
            "something appeared next to the layer root"
        );
        let inside: Vec<_> = std::fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(inside, ["secret"], "something appeared in the outside dir");
        let secret = self.outside.join("secret");
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
        let st = rfs::lstat(&secret).unwrap();
        assert_eq!(st.st_nlink, 1, "outside file gained a hardlink");
        assert_eq!(st.st_mode & 0o7777, 0o644, "outside file mode changed");
    }

    pub fn outside_str(&self) -> String {
        self.outside.to_str().unwrap().to_owned()
    }
}
