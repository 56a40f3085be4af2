//! A lazy root's stub tree ([`lazylayer_fs::meta_tree`]), for the
//! container's overlay to stack over the store's layers and the FUSE data
//! view: an EROFS image of it ([`lazylayer_fs::stub_image`]) where the
//! kernel mounts one from a file, else a tmpfs of its own.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lazylayer_fetch::FetchError;
use lazylayer_fs::{meta_tree, stub_image, DataView, TreeStats};
use lazylayer_index::{BootIndex, FileKind};
use rustix::mount::{MountFlags, UnmountFlags};

/// Whether this kernel's overlayfs takes data-only lower layers (Linux 6.5).
pub fn kernel_has_data_only_layers() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 5)
}

/// The stub tree of a mounted lazy root: a tmpfs at `dir`, unmounted (and
/// with it every stub) on drop.
#[derive(Debug)]
pub(crate) struct MetaTree {
    dir: PathBuf,
    pub(crate) stats: TreeStats,
    pub(crate) pins: Arc<LayerPins>,
}

/// The data layers' `<hex>/fs` directories in the store, held open
/// (`O_PATH`) while the tree lives. Kernel overlayfs holds each of its
/// layers' roots, but a data layer's root is the store's layer directory
/// and every stub's redirect passes `<hex>/fs` below it: unheld, a cold
/// cache (memory pressure, or a drop) loses those two dentries per layer
/// and the first open through each pays their directory reads from disk
/// (python3's cold `cat`: 42.7 against 39.9 ms on overlayfs unheld, 35.9
/// against 38.7 ms held, median of 10 containers each).
#[derive(Debug)]
pub(crate) struct LayerPins {
    layers: PathBuf,
    names: Vec<String>,
    held: Mutex<Vec<(usize, OwnedFd)>>,
}

impl LayerPins {
    /// Hold the layers now in the store that are not held yet (a layer
    /// extracted later is held once [`hold_present`](Self::hold_present)
    /// runs again); returns how many are held.
    pub(crate) fn hold_present(&self) -> usize {
        use rustix::fs::{open, Mode, OFlags};
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for (n, name) in self.names.iter().enumerate() {
            if held.iter().any(|(h, _)| *h == n) {
                continue;
            }
            let dir = self.layers.join(name).join("fs");
            match open(
                &dir,
                OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            ) {
                Ok(fd) => held.push((n, fd)),
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => {
                    tracing::debug!(dir = %dir.display(), error = %e, "not holding a data layer")
                }
            }
        }
        held.len()
    }
}

impl MetaTree {
    /// Mount `index`'s stubs, pointing into `view`, at `dir` (an empty
    /// directory): an EROFS image of them in an unnamed file, or,
    /// where the kernel or the index rules that out, a tmpfs holding them
    /// as files.
    pub(crate) fn mount(
        dir: &Path,
        index: &BootIndex,
        view: &DataView,
        layers: &Path,
    ) -> Result<MetaTree, FetchError> {
        let pins = Arc::new(LayerPins {
            layers: layers.to_path_buf(),
            names: view.names().to_vec(),
            held: Mutex::new(Vec::new()),
        });
        let t0 = std::time::Instant::now();
        let (tree, erofs) = match Self::mount_image(dir, index, view) {
            Ok(stubs) => (
                MetaTree {
                    dir: dir.to_path_buf(),
                    stats: TreeStats {
                        entries: index.len(),
                        stubs,
                        micros: t0.elapsed().as_micros() as u64,
                    },
                    pins,
                },
                true,
            ),
            Err(why) => {
                tracing::debug!(dir = %dir.display(), %why, "stubs as a tmpfs tree");
                (Self::mount_tmpfs(dir, index, view, pins)?, false)
            }
        };
        tree.pins.hold_present();
        tracing::debug!(dir = %dir.display(), erofs, entries = tree.stats.entries, stubs = tree.stats.stubs, micros = tree.stats.micros, "metadata tree made");
        Ok(tree)
    }

    /// The EROFS image, mounted; the stubs made.
    fn mount_image(dir: &Path, index: &BootIndex, view: &DataView) -> Result<usize, String> {
        let image = stub_image::build(index, view).map_err(|e| e.to_string())?;
        // The unnamed image file goes beside the tree, in the container's
        // directory, on the store's disk.
        let scratch = dir.parent().unwrap_or(dir);
        stub_image::mount(&image.bytes, dir, scratch)
            .map_err(|e| format!("mounting its EROFS image: {e}"))?;
        tracing::debug!(
            bytes = image.bytes.len(),
            inodes = image.inodes,
            "stub image mounted"
        );
        Ok(image.stubs)
    }

    fn mount_tmpfs(
        dir: &Path,
        index: &BootIndex,
        view: &DataView,
        pins: Arc<LayerPins>,
    ) -> Result<MetaTree, FetchError> {
        let fail = |what: String| {
            FetchError::Io(lazylayer_sys::IoError::on(
                "mounting the lazy root's metadata tree (`run --lazy-root fuse` does without)",
                dir,
            )(std::io::Error::other(what)))
        };
        // Bounded by what the tree needs: an inode per entry, times four so
        // the xattrs fit (tmpfs counts them against the same budget: python3's
        // 7,572 entries used 8,983 of it) and a page per symlink whose target
        // is not stored inline. A limit, not a reservation.
        let inodes = index.len() as u64 * 4 + 4096;
        let links = index
            .entries
            .iter()
            .filter(|e| e.kind == FileKind::Symlink)
            .count() as u64;
        let size = (links + 256) * 4096;
        let data = format!("mode=0755,nr_inodes={inodes},size={size}");
        let options = std::ffi::CString::new(data.clone()).map_err(|e| fail(e.to_string()))?;
        rustix::mount::mount(
            "lazylayer-meta",
            dir,
            "tmpfs",
            MountFlags::NOSUID | MountFlags::NODEV,
            options.as_c_str(),
        )
        .map_err(|e| fail(format!("mount -t tmpfs -o {data}: {e}")))?;
        let mut tree = MetaTree {
            dir: dir.to_path_buf(),
            stats: TreeStats::default(),
            pins,
        };
        tree.stats = meta_tree::build(index, view, dir).map_err(|e| fail(e.to_string()))?;
        Ok(tree)
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for MetaTree {
    fn drop(&mut self) {
        let r = match rustix::mount::unmount(&self.dir, UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(&self.dir, UnmountFlags::DETACH),
            r => r,
        };
        if let Err(e) = r {
            tracing::warn!(dir = %self.dir.display(), error = %e, "unmounting the metadata tree");
        }
    }
}
