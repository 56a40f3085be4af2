//! File-system operations confined to a layer root.
//!
//! Every lookup of a multi-component path goes through `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`, and every
//! create, remove or metadata change then acts on a single name relative to the
//! directory fd so obtained, with "no follow" semantics. A symlink planted by an
//! earlier tar entry therefore can never redirect a later write.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use lazylayer_sys::beneath::{open_root, openat_beneath};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::LayerError;

/// Mode given to directories the archive implies but does not list.
pub(crate) const IMPLICIT_DIR_MODE: u32 = 0o755;

/// Why resolving a directory path inside the root failed.
pub(crate) enum ResolveError {
    /// A component is a symlink, or resolution tried to leave the root.
    Symlink,
    /// A component is missing.
    Missing,
    /// A component exists but is not a directory.
    NotDir,
    Other(io::Error),
}

impl From<Errno> for ResolveError {
    fn from(e: Errno) -> Self {
        match e {
            // EXDEV is what RESOLVE_BENEATH reports for an escape attempt.
            Errno::LOOP | Errno::XDEV => ResolveError::Symlink,
            Errno::NOENT => ResolveError::Missing,
            Errno::NOTDIR => ResolveError::NotDir,
            e => ResolveError::Other(e.into()),
        }
    }
}

impl ResolveError {
    /// The error for an entry whose own path could not be resolved.
    pub(crate) fn for_entry(self, entry: &Path, op: &'static str) -> LayerError {
        match self {
            ResolveError::Symlink => LayerError::ThroughSymlink {
                path: entry.to_owned(),
            },
            ResolveError::NotDir => LayerError::NotADirectory {
                path: entry.to_owned(),
            },
            ResolveError::Missing => {
                LayerError::io(entry, op, io::Error::from(io::ErrorKind::NotFound))
            }
            ResolveError::Other(e) => LayerError::io(entry, op, e),
        }
    }
}

/// What was found at a name before an entry replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Replaced {
    Nothing,
    /// A non-directory was unlinked.
    Unlinked,
    /// A directory tree was removed.
    RemovedTree,
    /// A directory was kept because the new entry is a directory too.
    KeptDir,
}

/// A layer root plus a one-entry cache of the last parent directory opened:
/// tar writers emit a directory's children together, so most entries reuse it.
pub(crate) struct Beneath {
    root: OwnedFd,
    cache: Option<(PathBuf, Rc<OwnedFd>)>,
}

impl Beneath {
    pub(crate) fn open(root: &Path) -> Result<Self, LayerError> {
        let root_fd = open_root(root).map_err(|e| LayerError::io(root, "open layer root", e))?;
        Ok(Beneath {
            root: root_fd,
            cache: None,
        })
    }

    /// Open an existing directory beneath the root (empty path = the root).
    /// `O_PATH` unless `readable`, which metadata calls on the fd need.
    pub(crate) fn open_dir(&self, rel: &Path, readable: bool) -> Result<OwnedFd, ResolveError> {
        let access = if readable {
            OFlags::RDONLY
        } else {
            OFlags::PATH
        };
        let rel: &Path = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        // No `O_NOFOLLOW`: see `RESOLVE_BENEATH` on trailing symlinks.
        Ok(openat_beneath(
            &self.root,
            rel,
            access | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?)
    }

    /// The directory `rel`, creating missing components as implicit
    /// directories (mode 0755, owned by root when `chown`).
    pub(crate) fn dir_creating(
        &mut self,
        rel: &Path,
        chown: bool,
    ) -> Result<Rc<OwnedFd>, ResolveError> {
        if let Some((p, fd)) = &self.cache {
            if p == rel {
                return Ok(fd.clone());
            }
        }
        let fd = match self.open_dir(rel, false) {
            Ok(fd) => fd,
            Err(ResolveError::Missing) => self.walk_creating(rel, chown)?,
            Err(e) => return Err(e),
        };
        let fd = Rc::new(fd);
        self.cache = Some((rel.to_owned(), fd.clone()));
        Ok(fd)
    }

    fn walk_creating(&self, rel: &Path, chown: bool) -> Result<OwnedFd, ResolveError> {
        let mut cur = self.open_dir(Path::new(""), false)?;
        for comp in rel.iter() {
            let open = |dir: &OwnedFd| {
                openat_beneath(
                    dir,
                    comp,
                    OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                )
            };
            cur = match open(&cur) {
                Ok(fd) => fd,
                Err(Errno::NOENT) => {
                    match rfs::mkdirat(&cur, comp, Mode::from_raw_mode(IMPLICIT_DIR_MODE)) {
                        Ok(()) | Err(Errno::EXIST) => {}
                        Err(e) => return Err(e.into()),
                    }
                    let fd = openat_beneath(
                        &cur,
                        comp,
                        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                    )?;
                    // Explicit, so neither the umask nor a setgid parent
                    // decides an implicit directory's mode or group.
                    rfs::fchmod(&fd, Mode::from_raw_mode(IMPLICIT_DIR_MODE))?;
                    if chown {
                        rfs::fchown(&fd, Some(rfs::Uid::ROOT), Some(rfs::Gid::ROOT))?;
                    }
                    fd
                }
                Err(e) => return Err(e.into()),
            };
        }
        Ok(cur)
    }

    /// Forget the cached parent; called whenever a directory tree is removed,
    /// since the cached fd could then refer to a deleted directory.
    pub(crate) fn invalidate(&mut self) {
        self.cache = None;
    }

    /// Make room for a new entry `name` in `dir`: unlink a non-directory,
    /// remove a directory tree unless the new entry is a directory too.
    pub(crate) fn clear(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        new_is_dir: bool,
    ) -> io::Result<Replaced> {
        let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => return Ok(Replaced::Nothing),
            Err(e) => return Err(e.into()),
        };
        if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
            if new_is_dir {
                return Ok(Replaced::KeptDir);
            }
            self.invalidate();
            remove_tree(dir, name)?;
            Ok(Replaced::RemovedTree)
        } else {
            rfs::unlinkat(dir, name, AtFlags::empty())?;
            Ok(Replaced::Unlinked)
        }
    }
}

/// `rm -r` of `name` in `dir`, never following a symlink: every directory is
/// opened by a single name with `O_NOFOLLOW` relative to its parent's fd.
/// A loop over an explicit stack, not recursion: a layer may nest
/// directories as deep as the path limit allows (~2,000 levels), which
/// overflowed a 2 MiB thread stack (issue #19). One fd per level is open.
fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let mut stack = vec![open_for_removal(dir, name)?];
    loop {
        let Some(top) = stack.last_mut() else {
            return Ok(());
        };
        if let Some(sub) = top.subdirs.pop() {
            let level = open_for_removal(top.fd.as_fd(), OsStr::from_bytes(&sub))?;
            stack.push(level);
            continue;
        }
        let done = stack.pop().expect("the stack has a top");
        drop(done.fd);
        let parent = stack.last().map_or(dir, |l| l.fd.as_fd());
        rfs::unlinkat(parent, OsStr::from_bytes(&done.name), AtFlags::REMOVEDIR)?;
    }
}

/// A directory being removed: open, emptied of everything but the
/// subdirectories still listed.
struct RemovalLevel {
    fd: OwnedFd,
    name: Vec<u8>,
    subdirs: Vec<Vec<u8>>,
}

/// Open directory `name` in `dir`, unlink what in it is not a directory,
/// and list its subdirectories.
fn open_for_removal(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<RemovalLevel> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    // Names are collected before unlinking so the directory stream is not
    // mutated while it is being read.
    let mut children = Vec::new();
    {
        let mut it = rfs::Dir::read_from(&fd)?;
        while let Some(ent) = it.read() {
            let ent = ent?;
            let n = ent.file_name().to_bytes();
            if n == b"." || n == b".." {
                continue;
            }
            children.push((n.to_vec(), ent.file_type()));
        }
    }
    let mut subdirs = Vec::new();
    for (child, ftype) in children {
        let is_dir = match ftype {
            rfs::FileType::Directory => true,
            rfs::FileType::Unknown => {
                let st = rfs::statat(&fd, OsStr::from_bytes(&child), AtFlags::SYMLINK_NOFOLLOW)?;
                rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory
            }
            _ => false,
        };
        if is_dir {
            subdirs.push(child);
        } else {
            rfs::unlinkat(&fd, OsStr::from_bytes(&child), AtFlags::empty())?;
        }
    }
    Ok(RemovalLevel {
        fd,
        name: name.as_bytes().to_vec(),
        subdirs,
    })
}

/// A path that reaches `name` inside the directory `dir` without resolving
/// anything but the exact directory the fd refers to (a magic link). Used with
/// the `l*xattr` calls, which have no `*at` form in rustix, and for `chmod` of
/// an `O_PATH` fd, which `fchmod` refuses.
pub(crate) fn proc_fd_path(dir: BorrowedFd<'_>, name: Option<&OsStr>) -> PathBuf {
    let mut p = PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()));
    if let Some(name) = name {
        p.push(name);
    }
    p
}
