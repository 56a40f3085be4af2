//! Where file content comes from.

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use lazylayer_index::IndexEntry;
use lazylayer_sys::beneath::open_beneath;

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
    /// `passthrough`: a file opened now would be read by the kernel straight
    /// from it (FUSE passthrough); without it, a file's reads come to the
    /// daemon either way, and ranged content has its local bytes handed to
    /// the page cache at open ([`RangedContent::local_ranges`]).
    fn ranged(
        &self,
        _idx: u32,
        _entry: &IndexEntry,
        _passthrough: bool,
    ) -> Option<Arc<dyn RangedContent>> {
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
    /// The byte ranges that are local and verified now, in order: the file
    /// system hands them to the kernel's page cache when the file is opened,
    /// so a program's reads of them never come to the daemon. None by default.
    fn local_ranges(&self) -> Vec<std::ops::Range<u64>> {
        Vec::new()
    }
}

/// What the file system reads an open file's bytes from.
#[derive(Clone)]
pub enum Content {
    File(Arc<File>),
    Ranged(Arc<dyn RangedContent>),
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
