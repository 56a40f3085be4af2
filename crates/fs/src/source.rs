//! Where file content comes from.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lazylayer_index::IndexEntry;
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Supplies the content of regular files. `open` may block (a lazy source
/// waits for a download) but must give up after a bounded time with an error,
/// which the file system turns into EIO for the reader.
pub trait ContentSource: Send + Sync + 'static {
    fn open(&self, idx: u32, entry: &IndexEntry) -> io::Result<File>;

    /// [`ContentSource::open`] if it can answer without waiting, else
    /// `None`: the file system then calls `open` on a thread of its own, so
    /// that waiting opens never hold its few worker threads. The default
    /// answers every open at once.
    fn try_open(&self, idx: u32, entry: &IndexEntry) -> Option<io::Result<File>> {
        Some(self.open(idx, entry))
    }

    /// Content read by ranges instead of through a file, for a file whose
    /// bytes arrive piece by piece (a chunked boot layer): asked before
    /// `open`, and `None` (the default) means "open it as a file".
    fn ranged(&self, _idx: u32, _entry: &IndexEntry) -> Option<Arc<dyn RangedContent>> {
        None
    }
}

/// A file's content, readable at any offset, possibly before all of it is
/// local. Reads never go past the file's size (the file system clamps them).
pub trait RangedContent: Send + Sync {
    /// Read `buf.len()` bytes at `offset` if they are local (or known to be
    /// unavailable); `None` when they must be waited for. Never blocks on the
    /// network: called on the file system's worker threads.
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>>;
    /// Read, waiting for the bytes, for a bounded time; then an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// What the file system reads an open file's bytes from.
#[derive(Clone)]
pub enum Content {
    File(Arc<File>),
    Ranged(Arc<dyn RangedContent>),
}

/// Open the regular file `rel` below `dir` read-only, never following a
/// symlink on the way: layer directories come from untrusted images.
///
/// Anything but a regular file is refused *before* it is opened for reading:
/// the path is first opened `O_PATH` (which opens nothing on a device or a
/// FIFO) and its type checked, then reopened `O_NONBLOCK | O_NOCTTY` and
/// checked to be the same inode. Opening a device node as root would hand the
/// host's device to a container outside its device rules; opening a FIFO
/// would block the reader in the kernel for good.
pub fn open_beneath(dir: &std::path::Path, rel: &[u8]) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let rel = std::ffi::OsStr::from_bytes(rel);
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    let probe = rustix::fs::openat2(
        &root,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )?;
    let before = rustix::fs::fstat(&probe)?;
    refuse_unless_regular(&before, dir, rel)?;
    let fd = rustix::fs::openat2(
        &root,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
        resolve,
    )?;
    let after = rustix::fs::fstat(&fd)?;
    refuse_unless_regular(&after, dir, rel)?;
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) {
        return Err(io::Error::other(format!(
            "{} in {} was replaced while being opened",
            rel.to_string_lossy(),
            dir.display()
        )));
    }
    Ok(File::from(fd))
}

fn refuse_unless_regular(
    st: &rustix::fs::Stat,
    dir: &std::path::Path,
    rel: &std::ffi::OsStr,
) -> io::Result<()> {
    let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if kind == rustix::fs::FileType::RegularFile {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the index names {} a regular file, but {} holds a {} there; refusing to open it",
            rel.to_string_lossy(),
            dir.display(),
            kind_name(kind)
        ),
    ))
}

fn kind_name(k: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType as T;
    match k {
        T::RegularFile => "regular file",
        T::Directory => "directory",
        T::Symlink => "symlink",
        T::Fifo => "FIFO",
        T::Socket => "socket",
        T::CharacterDevice => "character device",
        T::BlockDevice => "block device",
        T::Unknown => "file of unknown type",
    }
}

/// Content from extracted layer directories, all local (trace mode, and
/// lazy mode once everything has arrived).
pub struct LayerDirSource {
    /// One directory per index layer, in the index's layer order.
    pub layer_dirs: Vec<PathBuf>,
}

impl ContentSource for LayerDirSource {
    fn open(&self, _idx: u32, entry: &IndexEntry) -> io::Result<File> {
        let dir = self.layer_dirs.get(entry.layer as usize).ok_or_else(|| {
            io::Error::other(format!(
                "index names layer {} of {}",
                entry.layer,
                self.layer_dirs.len()
            ))
        })?;
        open_beneath(dir, &entry.path)
    }
}

/// Serves only what the boot layer holds; anything else is recorded as a
/// violation and fails with EIO. Used to prove a boot layer is complete.
pub struct BootOnlySource {
    pub boot_dir: PathBuf,
    pub violations: Mutex<Vec<Vec<u8>>>,
}

impl BootOnlySource {
    pub fn new(boot_dir: PathBuf) -> Self {
        BootOnlySource {
            boot_dir,
            violations: Mutex::new(Vec::new()),
        }
    }
    pub fn violations(&self) -> Vec<Vec<u8>> {
        self.violations.lock().unwrap().clone()
    }
}

impl ContentSource for BootOnlySource {
    fn open(&self, _idx: u32, entry: &IndexEntry) -> io::Result<File> {
        if !entry.in_boot {
            self.violations.lock().unwrap().push(entry.path.clone());
            return Err(io::Error::from_raw_os_error(
                rustix::io::Errno::IO.raw_os_error(),
            ));
        }
        open_beneath(&self.boot_dir, &entry.path)
    }
}

impl<T: ContentSource> ContentSource for std::sync::Arc<T> {
    fn open(&self, idx: u32, entry: &IndexEntry) -> io::Result<File> {
        (**self).open(idx, entry)
    }
}
