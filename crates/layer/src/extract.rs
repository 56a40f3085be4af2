//! Streaming extraction of a layer's tar stream into an overlayfs lower dir.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use tar::EntryType;

mod meta;

use self::meta::{read_meta, Meta};
use crate::beneath::{proc_fd_path, Beneath, Replaced, ResolveError};
use crate::path::{classify, normalize, split_parent, SpecialName};
use crate::{LayerError, Xattrs};

/// Limits and policy for [`extract`].
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// Upper bound on the sum of regular-file sizes (and of any data carried by
    /// other entries). Checked against each entry's declared size before its
    /// data is written, so a decompression bomb fails fast.
    pub max_total_bytes: u64,
    /// Upper bound on the number of tar entries.
    pub max_entries: u64,
    /// Apply the archive's uid/gid (needs root). When false, files belong to
    /// the extracting user.
    pub chown: bool,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            max_total_bytes: 64 << 30,
            max_entries: 10_000_000,
            chown: true,
        }
    }
}

/// Totals for one extracted layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtractStats {
    /// Tar entries processed (extension headers such as PAX or GNU long names
    /// are part of the entry they describe and not counted separately).
    pub entries: u64,
    /// Sum of regular-file sizes written.
    pub file_bytes: u64,
    /// Uncompressed bytes consumed from the stream, including headers, padding,
    /// the end-of-archive marker and any trailing data.
    pub tar_bytes: u64,
}

/// What an extracted entry became on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EntryKind {
    File,
    Directory,
    Symlink,
    /// A second name for an earlier entry of this layer.
    Hardlink,
    CharDevice,
    BlockDevice,
    Fifo,
    /// An OCI `.wh.NAME` entry, stored as the overlayfs whiteout (char 0:0) at
    /// the event's path.
    Whiteout,
    /// An OCI `.wh..wh..opq` entry; the event's path is the now-opaque
    /// directory.
    OpaqueDir,
}

/// Reported after an entry is completely on disk (data written and metadata
/// applied, except directory mode and mtime, which are applied at the end).
#[derive(Debug, Clone, Copy)]
pub struct EntryEvent<'a> {
    /// Relative to the layer root, normalised; empty for the root itself.
    pub path: &'a Path,
    pub kind: EntryKind,
    /// Size of a regular file (for a hardlink, of its target); 0 otherwise.
    pub size: u64,
}

/// Extended headers (PAX records, GNU long names) between two entries are
/// read into memory by the tar crate; this bounds them so a hostile archive
/// cannot make it allocate without limit.
const MAX_HEADER_BYTES: u64 = 16 << 20;

const OVERLAY_XATTR_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// Extract an uncompressed layer tar stream into `root`, an existing (normally
/// empty) directory that becomes one overlayfs lower layer.
///
/// OCI whiteouts become overlayfs whiteouts (char device 0:0), opaque markers
/// become `trusted.overlay.opaque=y`. On error the directory is left half
/// written and the caller is expected to delete it; nothing is ever created,
/// changed or opened for writing outside `root`. The reader is consumed to EOF
/// on success so that a hasher wrapped around it sees every byte.
pub fn extract<R: Read>(
    tar_stream: R,
    root: &Path,
    opts: &ExtractOptions,
    on_entry: &mut dyn FnMut(&EntryEvent<'_>),
) -> Result<ExtractStats, LayerError> {
    let guard = Rc::new(Guard::default());
    let mut archive = tar::Archive::new(GuardedReader {
        inner: tar_stream,
        guard: guard.clone(),
    });
    let mut ex = Extractor {
        fs: Beneath::open(root)?,
        opts,
        stats: ExtractStats::default(),
        data_bytes: 0,
        deferred_dirs: BTreeMap::new(),
        last: PathBuf::new(),
        buf: vec![0; 256 << 10],
        continuing: None,
    };
    {
        let mut entries = archive.entries().map_err(|e| ex.read_error(e))?;
        loop {
            guard.limit.set(Some(guard.count.get() + MAX_HEADER_BYTES));
            let next = entries.next();
            guard.limit.set(None);
            let mut entry = match next {
                None => {
                    // A proper end is a zero block; shorter runs of zeros are
                    // just the last entry's padding.
                    if guard.trailing_zeros.get() < 512 {
                        // EOF at a header boundary: every entry so far is
                        // complete, and the blob digest (checked by the
                        // caller) catches a cut download, so only warn.
                        tracing::warn!(after = %ex.last.display(), "tar stream has no end-of-archive marker");
                    }
                    break;
                }
                Some(Err(e)) if guard.tripped.get() => {
                    tracing::debug!(error = %e, "extended headers over limit");
                    return Err(LayerError::TooLarge {
                        path: ex.last.clone(),
                        what: "extended header bytes",
                        limit: MAX_HEADER_BYTES,
                    });
                }
                Some(Err(e)) => return Err(ex.read_error(e)),
                Some(Ok(entry)) => entry,
            };
            ex.entry(&mut entry, on_entry)?;
        }
    }
    ex.apply_deferred_dirs()?;

    // Drain what follows the end-of-archive marker (the rest of the marker,
    // record padding) so a caller's digest covers the whole blob. Bounded like
    // file data: it is decompressed work too.
    let mut rest = archive.into_inner();
    let allowed = opts.max_total_bytes.saturating_sub(ex.data_bytes);
    let drained =
        io::copy(&mut (&mut rest).take(allowed), &mut io::sink()).map_err(|e| ex.read_error(e))?;
    if drained == allowed {
        let mut probe = [0u8; 1];
        if rest.read(&mut probe).map_err(|e| ex.read_error(e))? > 0 {
            return Err(LayerError::TooLarge {
                path: PathBuf::from("<data after end of archive>"),
                what: "total bytes",
                limit: opts.max_total_bytes,
            });
        }
    }
    ex.stats.tar_bytes = guard.count.get();
    Ok(ex.stats)
}

/// Shared between the reader handed to the tar crate and the extraction loop.
#[derive(Default)]
struct Guard {
    count: Cell<u64>,
    /// While `Some`, reading past this stream offset fails (see
    /// [`MAX_HEADER_BYTES`]).
    limit: Cell<Option<u64>>,
    tripped: Cell<bool>,
    /// Zero bytes at the end of what has been read so far.
    trailing_zeros: Cell<u64>,
}

struct GuardedReader<R> {
    inner: R,
    guard: Rc<Guard>,
}

impl<R: Read> Read for GuardedReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let count = self.guard.count.get();
        let buf = match self.guard.limit.get() {
            Some(limit) => {
                let room = limit.saturating_sub(count);
                if room == 0 && !buf.is_empty() {
                    self.guard.tripped.set(true);
                    return Err(io::Error::other("extended tar headers exceed limit"));
                }
                let n = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
                &mut buf[..n]
            }
            None => buf,
        };
        let n = self.inner.read(buf)?;
        self.guard.count.set(count + n as u64);
        let got = &buf[..n];
        let zeros = match got.iter().rposition(|&b| b != 0) {
            Some(last) => (n - last - 1) as u64,
            None => self.guard.trailing_zeros.get() + n as u64,
        };
        self.guard.trailing_zeros.set(zeros);
        Ok(n)
    }
}

struct Extractor<'o> {
    fs: Beneath,
    opts: &'o ExtractOptions,
    stats: ExtractStats,
    /// File bytes plus data carried by non-file entries (drained, not written).
    data_bytes: u64,
    /// Directory mode and mtime, applied after all children are written so
    /// neither a read-only mode nor the children's creation disturbs them.
    deferred_dirs: BTreeMap<PathBuf, (u32, Timespec)>,
    /// Last entry read, for errors about the stream itself.
    last: PathBuf,
    buf: Vec<u8>,
    /// The metadata file the previous entry wrote, which its next part,
    /// following at once, continues ([`crate::metadata`]).
    continuing: Option<Continuing>,
}

/// A metadata file being written part by part.
struct Continuing {
    path: PathBuf,
    file: File,
    size: u64,
    /// The number of the part that may come next.
    next: u32,
}

impl Extractor<'_> {
    fn read_error(&self, source: io::Error) -> LayerError {
        LayerError::ReadArchive {
            after: self.last.clone(),
            source,
        }
    }

    fn entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        on_entry: &mut dyn FnMut(&EntryEvent<'_>),
    ) -> Result<(), LayerError> {
        // Only an entry that follows at once continues a metadata file.
        let continued = self.continuing.take();
        let raw = entry.path_bytes().into_owned();
        let shown = PathBuf::from(OsStr::from_bytes(&raw));
        self.stats.entries += 1;
        if self.stats.entries > self.opts.max_entries {
            return Err(LayerError::TooLarge {
                path: shown,
                what: "entry count",
                limit: self.opts.max_entries,
            });
        }
        let etype = entry.header().entry_type();
        if etype.is_pax_global_extensions() {
            // Global PAX defaults (for example a comment) carry nothing this
            // codec applies.
            self.drain(entry, &shown)?;
            self.last = shown;
            return Ok(());
        }
        let path = normalize(&raw)?;
        self.last = path.clone();
        let meta = read_meta(entry, &path, |e| self.read_error(e))?;

        // Old (v7) archives mark directories with a trailing slash only.
        let etype = if etype == EntryType::Regular && raw.ends_with(b"/") {
            EntryType::Directory
        } else {
            etype
        };

        if path.as_os_str().is_empty() {
            if etype != EntryType::Directory {
                return Err(LayerError::RootEntry {
                    path: shown,
                    kind: "non-directory",
                });
            }
            self.drain(entry, &path)?;
            self.directory(&path, &meta)?;
            on_entry(&EntryEvent {
                path: &path,
                kind: EntryKind::Directory,
                size: 0,
            });
            return Ok(());
        }

        let (parent, name) = split_parent(&path);
        match classify(name.as_bytes()) {
            SpecialName::Opaque => {
                self.drain(entry, &path)?;
                let dir = parent.to_owned();
                self.opaque(&dir, &path)?;
                on_entry(&EntryEvent {
                    path: &dir,
                    kind: EntryKind::OpaqueDir,
                    size: 0,
                });
                return Ok(());
            }
            SpecialName::Whiteout(hidden) => {
                if hidden.is_empty() || hidden == b"." || hidden == b".." {
                    return Err(LayerError::InvalidWhiteout { path });
                }
                self.drain(entry, &path)?;
                let target = parent.join(OsStr::from_bytes(hidden));
                self.whiteout(&target, &meta)?;
                on_entry(&EntryEvent {
                    path: &target,
                    kind: EntryKind::Whiteout,
                    size: 0,
                });
                return Ok(());
            }
            SpecialName::Plain => {}
        }
        if matches!(etype, EntryType::Regular | EntryType::Continuous)
            && entry.size() == 0
            && crate::metadata::is_metadata_name(name.as_bytes())
        {
            let data =
                crate::metadata::entry_data(entry).map_err(|_| LayerError::BadPaxRecord {
                    path: path.clone(),
                    key: crate::metadata::PAX_DATA_KEY.into(),
                })?;
            if let Some(data) = data {
                let (file, size) = self.metadata_file(&path, &meta, &data, continued)?;
                on_entry(&EntryEvent {
                    path: &file,
                    kind: EntryKind::File,
                    size,
                });
                return Ok(());
            }
        }

        let (kind, size) = match etype {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = self.file(entry, &path, &meta)?;
                (EntryKind::File, size)
            }
            EntryType::Directory => {
                self.drain(entry, &path)?;
                self.directory(&path, &meta)?;
                (EntryKind::Directory, 0)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.drain(entry, &path)?;
                self.symlink(&path, &target, &meta)?;
                (EntryKind::Symlink, 0)
            }
            EntryType::Link => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                self.drain(entry, &path)?;
                let size = self.hardlink(&path, &target)?;
                (EntryKind::Hardlink, size)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let h = entry.header();
                let dev = if etype == EntryType::Fifo {
                    0
                } else {
                    let bad = |_| LayerError::BadPaxRecord {
                        path: path.clone(),
                        key: "devmajor/devminor".into(),
                    };
                    let major = h.device_major().map_err(bad)?.unwrap_or(0);
                    let minor = h.device_minor().map_err(bad)?.unwrap_or(0);
                    rfs::makedev(major, minor)
                };
                let (ftype, kind) = match etype {
                    EntryType::Char => (rfs::FileType::CharacterDevice, EntryKind::CharDevice),
                    EntryType::Block => (rfs::FileType::BlockDevice, EntryKind::BlockDevice),
                    _ => (rfs::FileType::Fifo, EntryKind::Fifo),
                };
                self.drain(entry, &path)?;
                self.node(&path, ftype, dev, &meta)?;
                (kind, 0)
            }
            other => {
                return Err(LayerError::UnsupportedEntryType {
                    path,
                    kind: format!("{other:?}"),
                })
            }
        };
        on_entry(&EntryEvent {
            path: &path,
            kind,
            size,
        });
        Ok(())
    }

    /// Read and discard an entry's data (non-file entries normally carry
    /// none), counting it against the size limit.
    fn drain<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
    ) -> Result<(), LayerError> {
        let size = entry.size();
        if size == 0 {
            return Ok(());
        }
        self.charge(size, path)?;
        let got = io::copy(entry, &mut io::sink()).map_err(|e| self.read_error(e))?;
        if got != size {
            return Err(LayerError::Truncated {
                path: path.to_owned(),
                expected: size,
                actual: got,
            });
        }
        Ok(())
    }

    fn charge(&mut self, size: u64, path: &Path) -> Result<(), LayerError> {
        match self.data_bytes.checked_add(size) {
            Some(total) if total <= self.opts.max_total_bytes => {
                self.data_bytes = total;
                Ok(())
            }
            _ => Err(LayerError::TooLarge {
                path: path.to_owned(),
                what: "total file bytes",
                limit: self.opts.max_total_bytes,
            }),
        }
    }

    /// The parent directory of `path`, created implicitly if missing, and
    /// the entry's own name.
    fn parent_of<'p>(&mut self, path: &'p Path) -> Result<(Rc<OwnedFd>, &'p OsStr), LayerError> {
        let (parent, name) = split_parent(path);
        let fd = self
            .fs
            .dir_creating(parent, self.opts.chown)
            .map_err(|e| e.for_entry(path, "open parent directory"))?;
        Ok((fd, name))
    }

    /// Remove whatever an earlier entry left at `name`.
    fn clear(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        new_is_dir: bool,
    ) -> Result<Replaced, LayerError> {
        let r = self
            .fs
            .clear(dir, name, new_is_dir)
            .map_err(|e| LayerError::io(path, "remove earlier entry", e))?;
        if r == Replaced::RemovedTree {
            let gone: Vec<PathBuf> = self
                .deferred_dirs
                .range(path.to_path_buf()..)
                .take_while(|(p, _)| p.starts_with(path))
                .map(|(p, _)| p.clone())
                .collect();
            for p in gone {
                self.deferred_dirs.remove(&p);
            }
        }
        Ok(r)
    }

    fn file<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        path: &Path,
        meta: &Meta,
    ) -> Result<u64, LayerError> {
        let size = entry.size();
        self.charge(size, path)?;
        let mut file = self.create_file(path)?;
        let mut written = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.read_error(e)),
            };
            file.write_all(&self.buf[..n])
                .map_err(|e| LayerError::io(path, "write file", e))?;
            written += n as u64;
        }
        if written != size {
            // Leave no short file that could be mistaken for a complete one.
            let (dir, name) = self.parent_of(path)?;
            let _ = rfs::unlinkat(&*dir, name, AtFlags::empty());
            return Err(LayerError::Truncated {
                path: path.to_owned(),
                expected: size,
                actual: written,
            });
        }
        self.stats.file_bytes += size;
        self.finish_file(&file, path, meta)?;
        Ok(size)
    }

    /// A new, empty regular file at `path`, whatever an earlier entry left there.
    fn create_file(&mut self, path: &Path) -> Result<File, LayerError> {
        let (dir, name) = self.parent_of(path)?;
        self.clear(dir.as_fd(), name, path, false)?;
        // O_EXCL after the removal above: whatever an earlier (possibly
        // hostile) entry put here, a device node or a symlink, is never opened.
        let fd = rfs::openat(
            &*dir,
            name,
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(0o600),
        )
        .map_err(|e| LayerError::io(path, "create file", e))?;
        Ok(File::from(fd))
    }

    /// Owner, mode, xattrs and mtime of a written file.
    fn finish_file(&self, file: &File, path: &Path, meta: &Meta) -> Result<(), LayerError> {
        // Owner before mode: chown clears setuid/setgid bits.
        if self.opts.chown {
            rfs::fchown(file, Some(uid(meta.uid)), Some(gid(meta.gid)))
                .map_err(|e| LayerError::io(path, "chown", e))?;
        }
        rfs::fchmod(file, Mode::from_raw_mode(meta.mode))
            .map_err(|e| LayerError::io(path, "chmod", e))?;
        set_xattrs(path, &meta.xattrs, |n, v| {
            rfs::fsetxattr(file, n, v, XattrFlags::empty())
        })?;
        rfs::futimens(file, &times(meta.mtime))
            .map_err(|e| LayerError::io(path, "set mtime", e))?;
        Ok(())
    }

    /// A metadata entry's content carried in its headers: a new file, or
    /// the next part of the one the previous entry began (named as
    /// [`crate::metadata::part_name`] says). Returns the file written and
    /// its size so far.
    fn metadata_file(
        &mut self,
        path: &Path,
        meta: &Meta,
        data: &[u8],
        continued: Option<Continuing>,
    ) -> Result<(PathBuf, u64), LayerError> {
        self.charge(data.len() as u64, path)?;
        let mut c = match continued {
            Some(c)
                if crate::metadata::part_name(c.path.as_os_str().as_bytes(), c.next)
                    == path.as_os_str().as_bytes() =>
            {
                c
            }
            _ => Continuing {
                path: path.to_owned(),
                file: self.create_file(path)?,
                size: 0,
                next: 0,
            },
        };
        c.file
            .write_all(data)
            .map_err(|e| LayerError::io(&c.path, "write file", e))?;
        self.stats.file_bytes += data.len() as u64;
        self.finish_file(&c.file, &c.path, meta)?;
        c.size += data.len() as u64;
        c.next += 1;
        let done = (c.path.clone(), c.size);
        self.continuing = Some(c);
        Ok(done)
    }

    fn directory(&mut self, path: &Path, meta: &Meta) -> Result<(), LayerError> {
        let fd = if path.as_os_str().is_empty() {
            self.fs
                .open_dir(path, true)
                .map_err(|e| e.for_entry(path, "open layer root"))?
        } else {
            let (dir, name) = self.parent_of(path)?;
            if self.clear(dir.as_fd(), name, path, true)? != Replaced::KeptDir {
                rfs::mkdirat(&*dir, name, Mode::from_raw_mode(0o700))
                    .map_err(|e| LayerError::io(path, "mkdir", e))?;
            }
            rfs::openat(
                &*dir,
                name,
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| LayerError::io(path, "open directory", e))?
        };
        if self.opts.chown {
            rfs::fchown(&fd, Some(uid(meta.uid)), Some(gid(meta.gid)))
                .map_err(|e| LayerError::io(path, "chown", e))?;
        }
        set_xattrs(path, &meta.xattrs, |n, v| {
            rfs::fsetxattr(&fd, n, v, XattrFlags::empty())
        })?;
        self.deferred_dirs
            .insert(path.to_owned(), (meta.mode, meta.mtime));
        Ok(())
    }

    fn opaque(&mut self, dir: &Path, marker: &Path) -> Result<(), LayerError> {
        // Make sure the directory exists (it may only be implied), then mark it.
        self.fs
            .dir_creating(dir, self.opts.chown)
            .map_err(|e| e.for_entry(marker, "create opaque directory"))?;
        let fd = self
            .fs
            .open_dir(dir, true)
            .map_err(|e| e.for_entry(marker, "open opaque directory"))?;
        rfs::fsetxattr(&fd, OPAQUE_XATTR, b"y", XattrFlags::empty()).map_err(|e| {
            LayerError::Xattr {
                path: dir.to_owned(),
                name: OPAQUE_XATTR.into(),
                source: e.into(),
            }
        })
    }

    fn whiteout(&mut self, target: &Path, meta: &Meta) -> Result<(), LayerError> {
        let (dir, name) = self.parent_of(target)?;
        self.clear(dir.as_fd(), name, target, false)?;
        rfs::mknodat(
            &*dir,
            name,
            rfs::FileType::CharacterDevice,
            Mode::empty(),
            rfs::makedev(0, 0),
        )
        .map_err(|e| LayerError::io(target, "mknod whiteout", e))?;
        self.owner_and_time(dir.as_fd(), name, target, meta)
    }

    fn symlink(&mut self, path: &Path, target: &[u8], meta: &Meta) -> Result<(), LayerError> {
        // The target is never resolved here: it only means something inside
        // the container's root, so it may point anywhere.
        let (dir, name) = self.parent_of(path)?;
        self.clear(dir.as_fd(), name, path, false)?;
        rfs::symlinkat(OsStr::from_bytes(target), &*dir, name)
            .map_err(|e| LayerError::io(path, "symlink", e))?;
        self.xattrs_by_name(dir.as_fd(), name, path, meta)?;
        self.owner_and_time(dir.as_fd(), name, path, meta)
    }

    fn node(
        &mut self,
        path: &Path,
        ftype: rfs::FileType,
        dev: rfs::Dev,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        let (dir, name) = self.parent_of(path)?;
        self.clear(dir.as_fd(), name, path, false)?;
        rfs::mknodat(&*dir, name, ftype, Mode::from_raw_mode(meta.mode), dev)
            .map_err(|e| LayerError::io(path, "mknod", e))?;
        if self.opts.chown {
            rfs::chownat(
                &*dir,
                name,
                Some(uid(meta.uid)),
                Some(gid(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| LayerError::io(path, "chown", e))?;
        }
        // mknod's mode is cut by the umask; set it exactly through an O_PATH
        // fd of the node itself (never opening the device).
        let node = rfs::openat(
            &*dir,
            name,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| LayerError::io(path, "open node", e))?;
        rfs::chmod(
            proc_fd_path(node.as_fd(), None),
            Mode::from_raw_mode(meta.mode),
        )
        .map_err(|e| LayerError::io(path, "chmod", e))?;
        self.xattrs_by_name(dir.as_fd(), name, path, meta)?;
        let ts = times(meta.mtime);
        rfs::utimensat(&*dir, name, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| LayerError::io(path, "set mtime", e))
    }

    fn hardlink(&mut self, path: &Path, raw_target: &[u8]) -> Result<u64, LayerError> {
        let shown_target = || PathBuf::from(OsStr::from_bytes(raw_target));
        let escape = || LayerError::HardlinkEscape {
            path: path.to_owned(),
            target: shown_target(),
        };
        let target = normalize(raw_target).map_err(|_| escape())?;
        if target.as_os_str().is_empty() {
            return Err(LayerError::HardlinkToDirectory {
                path: path.to_owned(),
                target: shown_target(),
            });
        }
        let (tparent, tname) = split_parent(&target);
        let tdir = self.fs.open_dir(tparent, false).map_err(|e| match e {
            ResolveError::Symlink => escape(),
            ResolveError::Missing | ResolveError::NotDir => LayerError::HardlinkTargetMissing {
                path: path.to_owned(),
                target: shown_target(),
            },
            ResolveError::Other(e) => LayerError::io(path, "open hardlink target directory", e),
        })?;
        let st = match rfs::statat(&tdir, tname, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) => st,
            Err(Errno::NOENT) => {
                return Err(LayerError::HardlinkTargetMissing {
                    path: path.to_owned(),
                    target: shown_target(),
                })
            }
            Err(e) => return Err(LayerError::io(path, "stat hardlink target", e)),
        };
        let ftype = rfs::FileType::from_raw_mode(st.st_mode);
        if ftype == rfs::FileType::Directory {
            return Err(LayerError::HardlinkToDirectory {
                path: path.to_owned(),
                target: shown_target(),
            });
        }
        let size = if ftype == rfs::FileType::RegularFile {
            st.st_size as u64
        } else {
            0
        };
        if target == path {
            // A link to itself: the name already is what it should be.
            return Ok(size);
        }
        let (dir, name) = self.parent_of(path)?;
        self.clear(dir.as_fd(), name, path, false)?;
        // Flags 0: a symlink target is linked itself, never followed.
        rfs::linkat(&tdir, tname, &*dir, name, AtFlags::empty()).map_err(|e| match e {
            Errno::NOENT => LayerError::HardlinkTargetMissing {
                path: path.to_owned(),
                target: shown_target(),
            },
            e => LayerError::io(path, "link", e),
        })?;
        Ok(size)
    }

    fn owner_and_time(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        if self.opts.chown {
            rfs::chownat(
                dir,
                name,
                Some(uid(meta.uid)),
                Some(gid(meta.gid)),
                AtFlags::SYMLINK_NOFOLLOW,
            )
            .map_err(|e| LayerError::io(path, "chown", e))?;
        }
        rfs::utimensat(dir, name, &times(meta.mtime), AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| LayerError::io(path, "set mtime", e))
    }

    /// xattrs on an entry that has no usable fd (symlinks, nodes): `lsetxattr`
    /// on `/proc/self/fd/DIR/NAME`, which resolves the exact parent directory
    /// and does not follow the final name.
    fn xattrs_by_name(
        &self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        path: &Path,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        if meta.xattrs.is_empty() {
            return Ok(());
        }
        let p = proc_fd_path(dir, Some(name));
        set_xattrs(path, &meta.xattrs, |n, v| {
            rfs::lsetxattr(&p, n, v, XattrFlags::empty())
        })
    }

    fn apply_deferred_dirs(&mut self) -> Result<(), LayerError> {
        let mut dirs: Vec<_> = std::mem::take(&mut self.deferred_dirs)
            .into_iter()
            .collect();
        // Deepest first, so a parent's mtime is set after everything below it.
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (path, (mode, mtime)) in dirs {
            let fd = self
                .fs
                .open_dir(&path, true)
                .map_err(|e| e.for_entry(&path, "open directory"))?;
            rfs::fchmod(&fd, Mode::from_raw_mode(mode))
                .map_err(|e| LayerError::io(&path, "chmod", e))?;
            rfs::futimens(&fd, &times(mtime)).map_err(|e| LayerError::io(&path, "set mtime", e))?;
        }
        Ok(())
    }
}

fn set_xattrs(
    path: &Path,
    xattrs: &Xattrs,
    mut set: impl FnMut(&OsStr, &[u8]) -> rustix::io::Result<()>,
) -> Result<(), LayerError> {
    for (name, value) in xattrs {
        let shown = || String::from_utf8_lossy(name).into_owned();
        if name.starts_with(OVERLAY_XATTR_PREFIX) {
            // overlayfs metadata (opaque, redirect, metacopy…) in a layer would
            // let the archive steer the kernel's lookups; only whiteout
            // entries may produce it.
            tracing::warn!(path = %path.display(), xattr = %shown(), "ignoring overlayfs xattr from archive");
            continue;
        }
        if name.contains(&0) {
            return Err(LayerError::Xattr {
                path: path.to_owned(),
                name: shown(),
                source: io::Error::new(io::ErrorKind::InvalidInput, "NUL in xattr name"),
            });
        }
        match set(OsStr::from_bytes(name), value) {
            Ok(()) => {}
            Err(Errno::NOTSUP) => {
                tracing::warn!(path = %path.display(), xattr = %shown(), "file system does not support this xattr; skipped");
            }
            Err(e) => {
                return Err(LayerError::Xattr {
                    path: path.to_owned(),
                    name: shown(),
                    source: e.into(),
                })
            }
        }
    }
    Ok(())
}

fn times(mtime: Timespec) -> Timestamps {
    // atime is set to mtime: archives carry no meaningful atime, and a fixed
    // value keeps extracted trees reproducible.
    Timestamps {
        last_access: mtime,
        last_modification: mtime,
    }
}

fn uid(raw: u32) -> rfs::Uid {
    rfs::Uid::from_raw_unchecked(raw)
}

fn gid(raw: u32) -> rfs::Gid {
    rfs::Gid::from_raw_unchecked(raw)
}
