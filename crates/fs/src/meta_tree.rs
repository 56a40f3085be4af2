//! A lazy root as the kernel's overlayfs sees a local one: every path of the
//! image as a *metadata stub* in a tree of its own (on tmpfs), its bytes in
//! a data-only lower layer.
//!
//! A stub is an empty, sparse file with the entry's size, owner, mode, times
//! and xattrs, and two xattrs overlayfs reads (Linux 6.5+, "data-only lower
//! layers"): `trusted.overlay.metacopy` (its data is elsewhere) and
//! `trusted.overlay.redirect` (where: `/<layer blob hex>/fs/<path>`, the
//! path of the file in the store's extracted layer). The container's
//! overlay stacks the tree over two data-only layers, tried in order when a
//! file is first opened: the store's `layers/sha256` directory, which holds
//! a layer only once it is verified and extracted (it is renamed into
//! place), and this file system mounted as a [`DataView`], which serves the
//! same names from the boot layer, ranges and on-demand fetches. A file
//! whose layer is local is then read by the kernel from the store with no
//! daemon in the way, and every stat, lookup and listing is tmpfs's.
//!
//! Stubs are made from the index alone: nothing in the store or a layer is
//! opened. The index's rules (see `BootIndex::new`) keep names to one
//! component, parents to earlier directories, and `trusted.overlay.*` out
//! of the image's xattrs, so no stub can point anywhere but the image's own
//! layer files.

use std::ffi::OsStr;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use lazylayer_index::{BootIndex, FileKind, IndexEntry};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps, XattrFlags};

/// Names of a data view's top directories, each a store layer's blob digest
/// (hex, one algorithm's) holding, below `fs/`, the files of one source:
/// `names[n]` the index's layer `n` (the files it is the topmost holder
/// of), then, with `boot`, the extracted boot layer (the files it holds).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataView {
    names: Vec<String>,
    boot: bool,
}

/// Why a data view or a stub tree could not be made.
#[derive(Debug, thiserror::Error)]
pub enum MetaTreeError {
    #[error("data view: {0:?} is not a layer digest's hex (64 or 128 lowercase hex digits)")]
    BadRoot(String),
    #[error("metadata tree: {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl DataView {
    /// `layers[n]`: the blob digest (hex) of the index's layer `n`; `boot`:
    /// that of the boot layer when it is extracted in the store (its files
    /// are then read from there from the start).
    pub fn new(layers: &[String], boot: Option<&str>) -> Result<DataView, MetaTreeError> {
        let names: Vec<String> = layers
            .iter()
            .cloned()
            .chain(boot.map(str::to_owned))
            .collect();
        for h in &names {
            // One safe path component: a digest's hex (sha256 or sha512).
            if ![64, 128].contains(&h.len())
                || !h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            {
                return Err(MetaTreeError::BadRoot(h.clone()));
            }
        }
        Ok(DataView {
            names,
            boot: boot.is_some(),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.names.len()
    }

    /// The top directories' names: blob digests' hex, the boot layer's last
    /// when the view has it.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The top directory named `name`.
    pub(crate) fn root_named(&self, name: &[u8]) -> Option<u32> {
        self.names
            .iter()
            .position(|h| h.as_bytes() == name)
            .map(|r| r as u32)
    }

    /// The boot layer's top directory, when the view has one.
    fn boot_root(&self) -> Option<usize> {
        self.boot.then(|| self.names.len() - 1)
    }

    /// Whether top directory `r` holds the file `e`.
    pub(crate) fn holds(&self, r: u32, e: &IndexEntry) -> bool {
        match self.boot_root() {
            Some(b) if b == r as usize => e.in_boot,
            _ => e.layer == r && (r as usize) < self.names.len(),
        }
    }

    /// Where a stub of `e` points: the boot layer's copy when the boot layer
    /// is extracted and holds it, else the layer's.
    pub(crate) fn redirect(&self, e: &IndexEntry) -> Option<Vec<u8>> {
        let layers = self.names.len() - usize::from(self.boot);
        let r = match self.boot_root() {
            Some(b) if e.in_boot => b,
            _ => Some(e.layer as usize).filter(|n| *n < layers)?,
        };
        let hex = &self.names[r];
        let mut to = Vec::with_capacity(hex.len() + e.path.len() + 6);
        to.push(b'/');
        to.extend_from_slice(hex.as_bytes());
        to.extend_from_slice(b"/fs/");
        to.extend_from_slice(&e.path);
        Some(to)
    }
}

/// What [`build`] made.
#[derive(Debug, Clone, Copy, Default)]
pub struct TreeStats {
    pub entries: usize,
    /// Regular files whose data is elsewhere (empty files need none).
    pub stubs: usize,
    pub micros: u64,
}

pub(crate) const METACOPY: &str = "trusted.overlay.metacopy";
pub(crate) const REDIRECT: &str = "trusted.overlay.redirect";

/// Make the stub tree of `index` in `dir` (an empty directory, best on a
/// tmpfs of its own, mounted nosuid,nodev), pointing into `view`'s names.
///
/// Directories first, then the other entries on a few threads (the tree is
/// on the start's path: python3's 7,600 entries take ~65 ms on one thread
/// here, a handful of system calls each), then hard links, then the
/// directories' own attributes.
pub fn build(index: &BootIndex, view: &DataView, dir: &Path) -> Result<TreeStats, MetaTreeError> {
    let t0 = Instant::now();
    let root = rfs::open(
        dir,
        OFlags::DIRECTORY | OFlags::RDONLY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", dir, e))?;
    let maker = Maker {
        umask: umask(),
        index,
        view,
        dir,
        root: &root,
    };
    let n = index.len();
    maker.make(1..n, Pass::Dirs)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, |t| t.get())
        .clamp(1, 4);
    let per = n.div_ceil(threads).max(1);
    let stubs = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let range = (t * per).max(1)..((t + 1) * per).min(n);
                let maker = &maker;
                s.spawn(move || maker.make(range, Pass::Others))
            })
            .collect();
        handles.into_iter().try_fold(0, |sum, h| {
            let made = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))?;
            Ok::<_, MetaTreeError>(sum + made)
        })
    })?;
    maker.make(1..n, Pass::Links)?;
    // Directories' own attributes last, deepest first: making children
    // changes a directory's times, and its mode may not let us in.
    for e in index
        .entries
        .iter()
        .rev()
        .filter(|e| e.kind == FileKind::Dir)
    {
        let rel = if e.path.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(&e.path))
        };
        set_xattrs_at(&dir.join(rel), e)?;
        set_owner_mode_times(&root, rel, e)
            .map_err(|er| io_err("chown/chmod/utimes", &dir.join(rel), er))?;
    }
    Ok(TreeStats {
        entries: n,
        stubs,
        micros: t0.elapsed().as_micros() as u64,
    })
}

/// Which entries a pass of [`Maker::make`] makes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Dirs,
    /// Files (each hard-link group's first member), symlinks, nodes.
    Others,
    /// The other members of hard-link groups.
    Links,
}

struct Maker<'a> {
    /// The process's, which new files' modes pass through.
    umask: u32,
    index: &'a BootIndex,
    view: &'a DataView,
    dir: &'a Path,
    root: &'a OwnedFd,
}

impl Maker<'_> {
    /// Make the entries of `range` that `pass` is for; the stubs made.
    fn make(&self, range: std::ops::Range<usize>, pass: Pass) -> Result<usize, MetaTreeError> {
        let (index, root) = (self.index, self.root);
        let mut stubs = 0;
        // The directory entries are made in: entries come grouped by
        // parent, so one open directory saves a walk from the top per entry.
        let mut parent: Option<(u32, OwnedFd)> = None;
        for i in range {
            let e = &index.entries[i];
            let first =
                (e.hardlink_group != 0).then(|| index.hardlink_members(e.hardlink_group)[0]);
            let this = match e.kind {
                FileKind::Dir => Pass::Dirs,
                _ if first.is_some_and(|f| f as usize != i) => Pass::Links,
                _ => Pass::Others,
            };
            if this != pass {
                continue;
            }
            let full = || self.dir.join(OsStr::from_bytes(&e.path));
            if parent.as_ref().is_none_or(|(p, _)| *p != e.parent) {
                let p = &index.entries[e.parent as usize].path;
                let rel = if p.is_empty() {
                    OsStr::new(".")
                } else {
                    OsStr::from_bytes(p)
                };
                let fd = rfs::openat(
                    root,
                    rel,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .map_err(|er| io_err("open", &full(), er))?;
                parent = Some((e.parent, fd));
            }
            let Some((_, at)) = &parent else {
                unreachable!("opened above")
            };
            let name = OsStr::from_bytes(index.name(i as u32));
            if pass == Pass::Links {
                // One inode, as in the image: a member of any kind.
                let f = OsStr::from_bytes(&index.entries[first.unwrap_or_default() as usize].path);
                rfs::linkat(root, f, at, name, AtFlags::empty())
                    .map_err(|er| io_err("link", &full(), er))?;
                continue;
            }
            match e.kind {
                FileKind::Dir => {
                    rfs::mkdirat(at, name, Mode::from_raw_mode(0o700))
                        .map_err(|er| io_err("mkdir", &full(), er))?;
                    continue;
                }
                FileKind::File => {
                    stubs += usize::from(e.size > 0);
                    make_stub(at, name, e, self.view, self.umask)
                        .map_err(|er| io_err("create", &full(), er))?;
                    continue;
                }
                FileKind::Symlink => {
                    let target = e.link_target.as_deref().unwrap_or_default();
                    rfs::symlinkat(OsStr::from_bytes(target), at, name)
                        .map_err(|er| io_err("symlink", &full(), er))?;
                }
                FileKind::CharDev | FileKind::BlockDev | FileKind::Fifo | FileKind::Socket => {
                    // As overlayfs over the extracted layers shows them; the
                    // tmpfs is nodev, and opening one in the container is the
                    // container's device policy's call, as with any image.
                    let kind = rfs::FileType::from_raw_mode(e.kind.type_bits());
                    rfs::mknodat(at, name, kind, Mode::from_raw_mode(0o600), e.rdev)
                        .map_err(|er| io_err("mknod", &full(), er))?;
                }
            }
            set_xattrs_at(&full(), e)?;
            set_owner_mode_times(at, name, e)
                .map_err(|er| io_err("chown/chmod/utimes", &full(), er))?;
        }
        Ok(stubs)
    }
}

/// A regular file's stub: sparse, its size, its attributes, and where its
/// bytes are (nothing for an empty one: it needs no data).
fn make_stub(
    at: &OwnedFd,
    name: &OsStr,
    e: &IndexEntry,
    view: &DataView,
    umask: u32,
) -> rustix::io::Result<()> {
    let mode = e.mode & 0o7777;
    // Made with its final mode when the umask leaves it whole and no chown
    // follows (which would clear setuid and setgid): a system call less
    // per file, on the start's path.
    let root_owned = (e.uid, e.gid) == (0, 0);
    let final_mode = root_owned && mode & umask == 0;
    let f = rfs::openat(
        at,
        name,
        OFlags::CREATE | OFlags::EXCL | OFlags::WRONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(if final_mode { mode } else { 0o600 }),
    )?;
    if e.size > 0 {
        rfs::ftruncate(&f, e.size)?;
        let to = view.redirect(e).ok_or(rustix::io::Errno::NOENT)?;
        rfs::fsetxattr(&f, METACOPY, b"", XattrFlags::empty())?;
        rfs::fsetxattr(&f, REDIRECT, &to, XattrFlags::empty())?;
    }
    for (n, v) in &e.xattrs {
        rfs::fsetxattr(&f, OsStr::from_bytes(n), v, XattrFlags::empty())?;
    }
    // Owner first: a chown clears setuid and setgid bits. A new file is
    // root's already.
    if !root_owned {
        rfs::fchown(
            &f,
            Some(rfs::Uid::from_raw(e.uid)),
            Some(rfs::Gid::from_raw(e.gid)),
        )?;
    }
    if !final_mode {
        rfs::fchmod(&f, Mode::from_raw_mode(mode))?;
    }
    let t = mtime(e);
    rfs::futimens(
        &f,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
    )
}

/// The process's umask, read without changing it (`umask(2)` sets one to
/// read it, which other threads would see meanwhile). Unknown: all bits,
/// i.e. every mode is set explicitly.
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let v = s.lines().find_map(|l| l.strip_prefix("Umask:"))?;
            u32::from_str_radix(v.trim(), 8).ok()
        })
        .unwrap_or(0o777)
}

fn mtime(e: &IndexEntry) -> Timespec {
    Timespec {
        tv_sec: e.mtime_sec,
        tv_nsec: e.mtime_nsec.into(),
    }
}

fn set_xattrs_at(path: &Path, e: &IndexEntry) -> Result<(), MetaTreeError> {
    for (n, v) in &e.xattrs {
        rfs::lsetxattr(path, OsStr::from_bytes(n), v, XattrFlags::empty())
            .map_err(|er| io_err("setxattr", path, er))?;
    }
    Ok(())
}

/// Owner first: a chown clears setuid and setgid bits.
fn set_owner_mode_times(
    at: &impl rustix::fd::AsFd,
    rel: impl rustix::path::Arg + Copy,
    e: &IndexEntry,
) -> rustix::io::Result<()> {
    let nofollow = AtFlags::SYMLINK_NOFOLLOW;
    if (e.uid, e.gid) != (0, 0) {
        rfs::chownat(
            at,
            rel,
            Some(rfs::Uid::from_raw(e.uid)),
            Some(rfs::Gid::from_raw(e.gid)),
            nofollow,
        )?;
    }
    if e.kind != FileKind::Symlink {
        rfs::chmodat(
            at,
            rel,
            Mode::from_raw_mode(e.mode & 0o7777),
            AtFlags::empty(),
        )?;
    }
    let t = mtime(e);
    rfs::utimensat(
        at,
        rel,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        nofollow,
    )
}

fn io_err(op: &'static str, path: &Path, e: rustix::io::Errno) -> MetaTreeError {
    MetaTreeError::Io {
        op,
        path: path.to_path_buf(),
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, layer: u32, in_boot: bool) -> IndexEntry {
        IndexEntry {
            layer,
            in_boot,
            ..IndexEntry::plain(path.as_bytes(), FileKind::File, 1)
        }
    }

    #[test]
    fn a_stub_points_at_its_layer_or_at_the_extracted_boot_layer() {
        let (a, b, boot) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        let view = DataView::new(&[a.clone(), b.clone()], Some(&boot)).unwrap();
        let to = |e: &IndexEntry| String::from_utf8(view.redirect(e).unwrap()).unwrap();
        assert_eq!(to(&file("usr/x", 1, false)), format!("/{b}/fs/usr/x"));
        assert_eq!(to(&file("usr/x", 0, true)), format!("/{boot}/fs/usr/x"));
        assert!(view.holds(0, &file("usr/x", 0, false)));
        assert!(!view.holds(0, &file("usr/x", 1, false)));
        assert!(view.holds(2, &file("usr/x", 1, true)));
        assert_eq!(view.root_named(b.as_bytes()), Some(1));
        assert_eq!(view.root_named(b"fs"), None);
        // Without the boot layer extracted, a boot file is its layer's.
        let view = DataView::new(std::slice::from_ref(&a), None).unwrap();
        assert_eq!(
            String::from_utf8(view.redirect(&file("y", 0, true)).unwrap()).unwrap(),
            format!("/{a}/fs/y")
        );
    }

    #[test]
    fn names_that_are_not_layer_digests_are_refused() {
        for bad in [
            "",
            "..",
            "ab",
            &"A".repeat(64),
            &format!("{}/", "a".repeat(63)),
        ] {
            assert!(
                DataView::new(&[bad.to_string()], None).is_err(),
                "{bad:?} accepted"
            );
        }
        assert!(DataView::new(&["a".repeat(64)], Some("../x")).is_err());
    }
}
