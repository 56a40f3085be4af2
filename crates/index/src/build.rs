//! Build the boot index from extracted, overlayfs-style layer directories.
//!
//! The merge follows overlayfs's lookup rules for a stack of read-only lower
//! layers, directory by directory. A merged directory has a *stack*: the
//! layers (top first) in which it is a directory and whose contents show
//! through. For each name found in the stack's layers, the topmost layer
//! decides: a whiteout (char device 0:0) hides the name, a non-directory is
//! the entry, a directory starts a new stack that goes on down the parent's
//! stack, skipping layers without the name, adding layers where the name is a
//! directory, and ending after an opaque one (`trusted.overlay.opaque=y`) or
//! at a layer where the name is a whiteout or a non-directory. The root's
//! stack is every layer: like the kernel, an opaque marker on a layer's root
//! is ignored.

use crate::xattr::read_sized;
use std::collections::{btree_map, BTreeMap, HashMap};
use std::ffi::OsStr;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

// Layers are lazylayer's own extractions, but resolving beneath the root
// without symlinks costs nothing and keeps a damaged store from making the
// builder read outside a layer.
use lazylayer_sys::beneath::openat_beneath;
use rustix::fs::{self as rfs, AtFlags, Dir, FileType, Mode, OFlags, Stat};
use rustix::io::Errno;
use sha2::{Digest, Sha256};

use super::{
    BootIndex, FileKind, IndexEntry, IndexError, DIGESTS_FILE_NAME, INDEX_FILE_NAME, MAX_ENTRIES,
    OVERLAY_XATTR_PREFIX,
};
use crate::MAX_PATH_LEN;

const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;
/// An xattr call failed: the xattr's name (empty for a listing) and why.
type XattrFault = (Vec<u8>, io::Error);

/// Read size when hashing file contents: files may be GBs, memory stays flat.
const HASH_BUF_LEN: usize = 256 * 1024;

/// Merge overlay-style layer dirs (bottom first) into the index of the
/// merged image, applying whiteouts (char 0:0) and opaque dirs
/// (`trusted.overlay.opaque=y`) exactly like overlayfs does.
///
/// `in_boot` is false everywhere (the caller marks boot paths). Metadata is
/// read with `lstat` and `llistxattr`/`lgetxattr` (`trusted.overlay.*`
/// skipped); the root takes the topmost layer root's. Every regular file
/// gets its content `digest` (SHA-256), read from the layer that holds it,
/// so building reads the content of every visible file once (once per inode
/// for hard links). Files of one layer sharing an inode form a hardlink
/// group when at least two of them are visible in the merged view. A
/// root-level [`INDEX_FILE_NAME`] (or [`DIGESTS_FILE_NAME`]) is left out:
/// it is the index's own storage, which standard runtimes never materialise.
///
/// Needs `CAP_SYS_ADMIN` (root) to see `trusted.*` xattrs, hence opaque
/// markers; /proc must be mounted (xattrs of symlinks and devices are read
/// through `/proc/self/fd/N/NAME`, relative to an open directory).
/// Entries come out directory by directory, each directory's children
/// together and sorted by name, depth first.
pub fn build_index(layers: &[(String, PathBuf)]) -> Result<BootIndex, IndexError> {
    if layers.is_empty() {
        return Err(IndexError::NoLayers);
    }
    if !rustix::process::geteuid().is_root() {
        tracing::warn!("building a boot index without root: trusted.overlay.opaque markers are invisible, so opaque directories would merge with the layers below");
    }
    let opened = layers
        .iter()
        .map(|(diff_id, dir)| {
            let root = rfs::open(
                dir,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| IndexError::LayerIo {
                diff_id: diff_id.clone(),
                path: dir.clone(),
                op: "open layer directory",
                source: e.into(),
            })?;
            Ok(Layer { diff_id, dir, root })
        })
        .collect::<Result<Vec<_>, IndexError>>()?;

    let top = opened.len() - 1;
    let mut entries = vec![opened[top].root_entry(top)?];
    let mut pending = vec![PendingDir {
        idx: 0,
        rel: Vec::new(),
        stack: (0..opened.len()).rev().collect(),
    }];
    // (layer, st_dev, st_ino) -> (names in the layer, visible entries in entry order).
    let mut inodes: HashMap<(usize, u64, u64), (u64, Vec<u32>)> = HashMap::new();
    let mut hasher = ContentHasher::default();

    while let Some(dir) = pending.pop() {
        let mut subdirs = Vec::new();
        for (name, sighting) in list_merged(&opened, &dir)? {
            let Sighting::Found { layer, meta, stack } = sighting else {
                continue;
            };
            if dir.idx == 0
                && (name == INDEX_FILE_NAME.as_bytes() || name == DIGESTS_FILE_NAME.as_bytes())
            {
                continue;
            }
            let mut path = dir.rel.clone();
            if !path.is_empty() {
                path.push(b'/');
            }
            path.extend_from_slice(&name);
            if path.len() > MAX_PATH_LEN {
                return Err(IndexError::PathTooLong {
                    diff_id: opened[layer].diff_id.clone(),
                    path: opened[layer].show(&path),
                    limit: MAX_PATH_LEN,
                });
            }
            if entries.len() >= MAX_ENTRIES {
                return Err(IndexError::TooManyEntries {
                    limit: MAX_ENTRIES as u64,
                });
            }
            let idx = entries.len() as u32;
            // nlink counts names in the layer, visible or not; whether two
            // remain visible is settled once the walk is over.
            if meta.kind != FileKind::Dir && meta.nlink > 1 {
                inodes
                    .entry((layer, meta.dev, meta.ino))
                    .or_insert_with(|| (meta.nlink, Vec::new()))
                    .1
                    .push(idx);
            }
            let digest = match meta.kind {
                FileKind::File => Some(hasher.digest(&opened[layer], layer, &path, &meta)?),
                _ => None,
            };
            let mut entry = meta.into_entry(path.clone(), dir.idx, layer);
            entry.digest = digest;
            entries.push(entry);
            if let Some(stack) = stack {
                subdirs.push(PendingDir {
                    idx,
                    rel: path,
                    stack: stack.layers,
                });
            }
        }
        // Reversed so the first subdirectory is listed next: depth first.
        pending.extend(subdirs.into_iter().rev());
    }

    // Names an upper layer removed still count: overlayfs reports the
    // layer's link count for a file it has not copied up.
    for (nlink, members) in inodes.values() {
        if *nlink > members.len() as u64 {
            let count = u16::try_from(*nlink).unwrap_or(u16::MAX);
            for &m in members {
                entries[m as usize].link_count = count;
            }
        }
    }
    // Numbered in order of first member, as BootIndex::new requires.
    let mut groups: Vec<Vec<u32>> = inodes
        .into_values()
        .map(|(_, m)| m)
        .filter(|m| m.len() > 1)
        .collect();
    groups.sort_unstable_by_key(|m| m[0]);
    for (g, members) in groups.iter().enumerate() {
        for &m in members {
            entries[m as usize].hardlink_group = g as u32 + 1;
        }
    }
    tracing::debug!(
        layers = layers.len(),
        entries = entries.len(),
        hardlink_groups = groups.len(),
        "built boot index"
    );
    BootIndex::new(layers.iter().map(|(id, _)| id.clone()).collect(), entries)
}

struct Layer<'a> {
    diff_id: &'a String,
    dir: &'a Path,
    root: OwnedFd,
}

/// A merged directory whose children are still to be listed.
struct PendingDir {
    idx: u32,
    rel: Vec<u8>,
    /// Layers in which this path is a directory that shows through, top first.
    stack: Vec<usize>,
}

/// What the topmost layer holding a name makes of it.
enum Sighting {
    /// A whiteout: the name and everything below it are gone.
    Hidden,
    Found {
        layer: usize,
        meta: Meta,
        /// For a directory: the layers merged into it so far.
        stack: Option<DirStack>,
    },
}

struct DirStack {
    layers: Vec<usize>,
    /// Whether lower layers may still add to the stack: false once an
    /// opaque directory, a whiteout or a non-directory has been met.
    open: bool,
}

struct Meta {
    kind: FileKind,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime_sec: i64,
    mtime_nsec: u32,
    rdev: u64,
    link_target: Option<Vec<u8>>,
    xattrs: Xattrs,
    dev: u64,
    ino: u64,
    nlink: u64,
}

impl Meta {
    // Stat's field types differ between architectures; the casts are no-ops
    // on some of them.
    #[allow(clippy::unnecessary_cast)]
    fn new(st: &Stat, kind: FileKind, link_target: Option<Vec<u8>>, xattrs: Xattrs) -> Self {
        let size = match (kind, &link_target) {
            (FileKind::File, _) => st.st_size as u64,
            (FileKind::Symlink, Some(t)) => t.len() as u64,
            _ => 0,
        };
        let rdev = match kind {
            FileKind::CharDev | FileKind::BlockDev => st.st_rdev as u64,
            _ => 0,
        };
        Meta {
            kind,
            mode: st.st_mode as u32 & 0o7777,
            uid: st.st_uid,
            gid: st.st_gid,
            size,
            mtime_sec: st.st_mtime as i64,
            mtime_nsec: st.st_mtime_nsec as u32,
            rdev,
            link_target,
            xattrs,
            dev: st.st_dev as u64,
            ino: st.st_ino as u64,
            nlink: st.st_nlink as u64,
        }
    }

    fn into_entry(self, path: Vec<u8>, parent: u32, layer: usize) -> IndexEntry {
        IndexEntry {
            path,
            parent,
            kind: self.kind,
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            mtime_sec: self.mtime_sec,
            mtime_nsec: self.mtime_nsec,
            rdev: self.rdev,
            link_target: self.link_target,
            xattrs: self.xattrs,
            hardlink_group: 0,
            link_count: 0,
            layer: layer as u32,
            in_boot: false,
            digest: None,
        }
    }
}

/// Content digests of regular files, hashed once per inode.
struct ContentHasher {
    buf: Vec<u8>,
    /// Digests of hard-linked files by (layer, st_dev, st_ino): the other
    /// names of an inode get the digest without reading it again.
    linked: HashMap<(usize, u64, u64), [u8; 32]>,
}

impl Default for ContentHasher {
    fn default() -> Self {
        ContentHasher {
            buf: vec![0; HASH_BUF_LEN],
            linked: HashMap::new(),
        }
    }
}

impl ContentHasher {
    /// SHA-256 of the regular file `rel` of `layer`, sighted with `meta`.
    fn digest(
        &mut self,
        layer: &Layer<'_>,
        li: usize,
        rel: &[u8],
        meta: &Meta,
    ) -> Result<[u8; 32], IndexError> {
        let key = (li, meta.dev, meta.ino);
        if meta.nlink > 1 {
            if let Some(d) = self.linked.get(&key) {
                return Ok(*d);
            }
        }
        // Beneath the layer root without following symlinks, like every
        // other lookup here; NONBLOCK so that a file swapped for a fifo since
        // the lstat cannot hang the open (the fstat below then refuses it).
        let fd = openat_beneath(
            &layer.root,
            rel,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOFOLLOW | OFlags::NOCTTY | OFlags::NONBLOCK,
        )
        .map_err(|e| layer.io_err(rel, "open file", e))?;
        // The digest must describe the file the entry's metadata came from.
        let st = rfs::fstat(&fd).map_err(|e| layer.io_err(rel, "stat", e))?;
        #[allow(clippy::unnecessary_cast)]
        let same = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile
            && (st.st_dev as u64, st.st_ino as u64) == (meta.dev, meta.ino);
        if !same {
            return Err(layer.io_err(rel, "open file", changed("replaced")));
        }
        let mut file = std::fs::File::from(fd);
        let mut sha = Sha256::new();
        let mut total = 0u64;
        loop {
            match file.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    sha.update(&self.buf[..n]);
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(layer.io_err(rel, "read file", e)),
            }
        }
        // A size and a digest from different versions of the file would make
        // every verified read of it fail.
        if total != meta.size {
            return Err(layer.io_err(rel, "read file", changed("resized")));
        }
        let digest: [u8; 32] = sha.finalize().into();
        if meta.nlink > 1 {
            self.linked.insert(key, digest);
        }
        Ok(digest)
    }
}

fn changed(how: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("file {how} while the index was built"),
    )
}

/// The children of merged directory `dir`, by name, each decided by the
/// topmost layer of `dir`'s stack that has it.
fn list_merged(
    layers: &[Layer<'_>],
    dir: &PendingDir,
) -> Result<BTreeMap<Vec<u8>, Sighting>, IndexError> {
    let mut out: BTreeMap<Vec<u8>, Sighting> = BTreeMap::new();
    let rel: &[u8] = if dir.rel.is_empty() { b"." } else { &dir.rel };
    for &li in &dir.stack {
        let layer = &layers[li];
        let fd = openat_beneath(
            &layer.root,
            rel,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )
        .map_err(|e| layer.io_err(&dir.rel, "open directory", e))?;
        let mut listing =
            Dir::read_from(&fd).map_err(|e| layer.io_err(&dir.rel, "read directory", e))?;
        while let Some(ent) = listing.read() {
            let ent = ent.map_err(|e| layer.io_err(&dir.rel, "read directory", e))?;
            let name = ent.file_name().to_bytes();
            if name == b"." || name == b".." {
                continue;
            }
            match out.entry(name.to_vec()) {
                btree_map::Entry::Vacant(v) => {
                    v.insert(layer.sight(li, fd.as_fd(), &dir.rel, name)?);
                }
                btree_map::Entry::Occupied(mut o) => {
                    if let Sighting::Found {
                        stack: Some(stack), ..
                    } = o.get_mut()
                    {
                        if stack.open {
                            layer.extend_stack(li, fd.as_fd(), &dir.rel, name, stack)?;
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

impl Layer<'_> {
    /// The topmost layer's root, as the merged root.
    fn root_entry(&self, layer: usize) -> Result<IndexEntry, IndexError> {
        let st = rfs::fstat(&self.root).map_err(|e| self.io_err(b"", "stat", e))?;
        let xattrs =
            read_xattrs(XattrSource::Fd(self.root.as_fd())).map_err(|e| self.xattr_err(b"", e))?;
        Ok(Meta::new(&st, FileKind::Dir, None, xattrs).into_entry(Vec::new(), 0, layer))
    }

    /// First (topmost) sighting of `name` in directory `dir` (at `rel`).
    fn sight(
        &self,
        li: usize,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        name: &[u8],
    ) -> Result<Sighting, IndexError> {
        let child = join(rel, name);
        let st = rfs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err(&child, "lstat", e))?;
        let kind = match FileType::from_raw_mode(st.st_mode) {
            FileType::CharacterDevice if st.st_rdev == 0 => return Ok(Sighting::Hidden),
            FileType::RegularFile => FileKind::File,
            FileType::Directory => FileKind::Dir,
            FileType::Symlink => FileKind::Symlink,
            FileType::CharacterDevice => FileKind::CharDev,
            FileType::BlockDevice => FileKind::BlockDev,
            FileType::Fifo => FileKind::Fifo,
            FileType::Socket => FileKind::Socket,
            FileType::Unknown => {
                return Err(self.io_err(
                    &child,
                    "lstat",
                    io::Error::new(io::ErrorKind::InvalidData, "unknown file type"),
                ))
            }
        };
        let link_target = match kind {
            FileKind::Symlink => Some(
                rfs::readlinkat(dir, OsStr::from_bytes(name), Vec::new())
                    .map_err(|e| self.io_err(&child, "readlink", e))?
                    .into_bytes(),
            ),
            _ => None,
        };
        let proc = proc_path(dir, name);
        let xattrs =
            read_xattrs(XattrSource::Path(&proc)).map_err(|e| self.xattr_err(&child, e))?;
        let stack = match kind {
            FileKind::Dir => Some(DirStack {
                layers: vec![li],
                open: !is_opaque(&proc).map_err(|e| self.xattr_err(&child, e))?,
            }),
            _ => None,
        };
        Ok(Sighting::Found {
            layer: li,
            meta: Meta::new(&st, kind, link_target, xattrs),
            stack,
        })
    }

    /// A lower sighting of a name already merged as a directory: a directory
    /// joins the stack, anything else (whiteout included) ends it.
    fn extend_stack(
        &self,
        li: usize,
        dir: BorrowedFd<'_>,
        rel: &[u8],
        name: &[u8],
        stack: &mut DirStack,
    ) -> Result<(), IndexError> {
        let child = join(rel, name);
        let st = rfs::statat(dir, OsStr::from_bytes(name), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| self.io_err(&child, "lstat", e))?;
        if FileType::from_raw_mode(st.st_mode) == FileType::Directory {
            stack.layers.push(li);
            if is_opaque(&proc_path(dir, name)).map_err(|e| self.xattr_err(&child, e))? {
                stack.open = false;
            }
        } else {
            stack.open = false;
        }
        Ok(())
    }

    fn show(&self, rel: &[u8]) -> PathBuf {
        self.dir.join(OsStr::from_bytes(rel))
    }

    fn io_err(&self, rel: &[u8], op: &'static str, e: impl Into<io::Error>) -> IndexError {
        IndexError::LayerIo {
            diff_id: self.diff_id.clone(),
            path: self.show(rel),
            op,
            source: e.into(),
        }
    }

    fn xattr_err(&self, rel: &[u8], (name, source): XattrFault) -> IndexError {
        IndexError::LayerXattr {
            diff_id: self.diff_id.clone(),
            path: self.show(rel),
            name: String::from_utf8_lossy(&name).into_owned(),
            source,
        }
    }
}

fn join(rel: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = rel.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// `/proc/self/fd/N/NAME`: names `name` in open directory `dir` for the
/// path-only xattr calls (symlinks and devices cannot be opened to use the
/// fd variants), resolved from the fd rather than from the layer path, which
/// could exceed `PATH_MAX` for a deep tree.
fn proc_path(dir: BorrowedFd<'_>, name: &[u8]) -> PathBuf {
    let mut p = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    PathBuf::from(OsStr::from_bytes(&p))
}

fn is_opaque(path: &Path) -> Result<bool, XattrFault> {
    let mut buf = [0u8; 8];
    match rfs::lgetxattr(path, OPAQUE_XATTR, &mut buf[..]) {
        Ok(n) => Ok(&buf[..n] == b"y"),
        // Absent, unsupported, or a value longer than "y": not opaque.
        Err(Errno::NODATA | Errno::NOTSUP | Errno::RANGE) => Ok(false),
        Err(e) => Err((OPAQUE_XATTR.as_bytes().to_vec(), e.into())),
    }
}

enum XattrSource<'a> {
    Fd(BorrowedFd<'a>),
    /// Not followed if it is a symlink.
    Path(&'a Path),
}

impl XattrSource<'_> {
    fn list(&self, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrSource::Fd(fd) => rfs::flistxattr(fd, buf),
            XattrSource::Path(p) => rfs::llistxattr(*p, buf),
        }
    }

    fn get(&self, name: &OsStr, buf: &mut [u8]) -> rustix::io::Result<usize> {
        match self {
            XattrSource::Fd(fd) => rfs::fgetxattr(fd, name, buf),
            XattrSource::Path(p) => rfs::lgetxattr(*p, name, buf),
        }
    }
}

/// All xattrs but `trusted.overlay.*`, sorted by name. An error carries the
/// xattr name (empty when listing failed).
fn read_xattrs(src: XattrSource<'_>) -> Result<Xattrs, XattrFault> {
    let names = match read_sized(|buf| src.list(buf)) {
        Ok(n) => n,
        Err(Errno::NOTSUP) => return Ok(Vec::new()),
        Err(e) => return Err((Vec::new(), e.into())),
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            continue;
        }
        match read_sized(|buf| src.get(OsStr::from_bytes(name), buf)) {
            Ok(value) => out.push((name.to_vec(), value)),
            // Removed between list and get: not part of the file now.
            Err(Errno::NODATA) => {}
            Err(e) => return Err((name.to_vec(), e.into())),
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
#[path = "build_tests.rs"]
mod tests;
