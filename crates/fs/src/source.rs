//! Where file content comes from.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Mutex;

use lazylayer_layer::index::IndexEntry;
use rustix::fs::{Mode, OFlags, ResolveFlags};

/// Supplies the content of regular files. `open` may block (a lazy source
/// waits for a download) but must give up after a bounded time with an error,
/// which the file system turns into EIO for the reader.
pub trait ContentSource: Send + Sync + 'static {
    fn open(&self, idx: u32, entry: &IndexEntry) -> io::Result<File>;
}

/// Open `rel` below `dir` read-only, never following a symlink on the way:
/// layer directories come from untrusted images.
pub fn open_beneath(dir: &std::path::Path, rel: &[u8]) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let root = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let rel = std::ffi::OsStr::from_bytes(rel);
    let fd = rustix::fs::openat2(
        &root,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?;
    Ok(File::from(fd))
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
