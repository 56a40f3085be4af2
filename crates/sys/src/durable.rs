//! Writes that survive a power loss: content reaches the disk before the
//! name that makes it visible, and the name before anyone is told.
//!
//! A rename alone is atomic against a crash of the process (the kernel
//! keeps the page cache), not against a power loss: ext4 and xfs may commit
//! the rename before the file's data, and then the new name points at an
//! empty or short file. So every record the store, the snapshotter and the
//! runtime keep is written by [`write_atomically`] (temp file, `fsync`,
//! rename, `fsync` of the directory), and trees and large files are synced
//! ([`sync_filesystem`], `sync_all`) before [`rename_durably`] moves them in.

use std::io::Write;
use std::path::Path;

/// Replace `dest` with `bytes` so that a crash or a power loss at any moment
/// leaves either the old content or the new one, never a mix or an empty
/// file. The temp file is made in `dest`'s own directory (a rename does not
/// cross file systems); its name starts with `.` and ends with `.tmp`.
pub fn write_atomically(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = parent_of(dest)?;
    write_atomically_via(dir, dest, bytes)
}

/// [`write_atomically`] with the temp file made in `scratch` (on the same
/// file system as `dest`): for a store whose `tmp/` is where leftovers of a
/// killed process are cleared.
pub fn write_atomically_via(scratch: &Path, dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_via_temp(scratch, dest, bytes, true)?;
    sync_dir(parent_of(dest)?)
}

/// Replace `dest` with `bytes` atomically against a crash of the process
/// (temp file and rename), but with no `fsync`: after a power loss `dest`
/// may be empty or old. Only for what is rewritten often and worthless once
/// stale (a progress display), where a sync each time would make the file
/// system flush everything else being written.
pub fn write_atomically_unsynced(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    replace_via_temp(parent_of(dest)?, dest, bytes, false)
}

/// `bytes` into a temp file in `scratch` (`.NAME.*.tmp`), synced first when
/// `sync_data`, then renamed over `dest`.
fn replace_via_temp(
    scratch: &Path,
    dest: &Path,
    bytes: &[u8],
    sync_data: bool,
) -> std::io::Result<()> {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(scratch)?;
    tmp.write_all(bytes)?;
    if sync_data {
        // The data first: a rename that reaches the disk before its data
        // would name an empty file after a power loss.
        tmp.as_file().sync_all()?;
    }
    tmp.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

/// Rename `from` (a file or a tree whose content is already synced) to
/// `to`, then sync `to`'s directory so that the new name is on disk when
/// this returns.
pub fn rename_durably(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(parent_of(to)?)
}

/// `fsync` a directory: makes the entries created, renamed or removed in it
/// durable (a file's own `fsync` does not cover its name).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let d = rustix::fs::open(
        dir,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    rustix::fs::fsync(&d)?;
    Ok(())
}

/// `fsync` a file by path (any open mode flushes the inode's data).
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// `syncfs(2)` of the file system holding `path`: every dirty file and
/// directory on it reaches the disk. For an extracted layer (thousands of
/// files) this is one call, and measured cheaper than an `fsync` per file
/// (see docs/security.md, "Power loss and kill -9").
pub fn sync_filesystem(path: &Path) -> std::io::Result<()> {
    let d = rustix::fs::open(
        path,
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    rustix::fs::syncfs(&d)?;
    Ok(())
}

fn parent_of(p: &Path) -> std::io::Result<&Path> {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => Ok(d),
        Some(_) => Ok(Path::new(".")),
        None => Err(std::io::Error::other(format!(
            "{} has no parent directory",
            p.display()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// Pages of `path` in the page cache not yet written to disk, from
    /// cachestat(2) (Linux 6.5): what a power loss would lose.
    #[allow(unsafe_code)] // cachestat(2) has no wrapper in libc or rustix.
    fn dirty_pages(path: &Path) -> u64 {
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct CacheStat {
            cache: u64,
            dirty: u64,
            writeback: u64,
            evicted: u64,
            recently_evicted: u64,
        }
        // The number is the same on every architecture (the unified table).
        const SYS_CACHESTAT: libc::c_long = 451;
        let f = std::fs::File::open(path).unwrap();
        let range = Range { off: 0, len: 0 };
        let mut st = CacheStat::default();
        // SAFETY: both pointers are to live values of the kernel's layouts.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut st as *mut CacheStat,
                0u32,
            )
        };
        assert_eq!(r, 0, "cachestat: {}", std::io::Error::last_os_error());
        st.dirty + st.writeback
    }

    #[test]
    fn an_atomic_write_leaves_no_dirty_page_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let data = vec![7u8; 256 * 1024];
        // The control: a plain write leaves dirty pages a power loss drops,
        // so the probe can see the difference.
        let plain = dir.path().join("plain.json");
        std::fs::write(&plain, &data).unwrap();
        assert!(dirty_pages(&plain) > 0, "a plain write is not yet on disk");

        let dest = dir.path().join("record.json");
        write_atomically(&dest, &data).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), data);
        assert_eq!(dirty_pages(&dest), 0, "the record is on disk");
        // Replacing works the same way.
        write_atomically(&dest, b"{}").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"{}");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names.len(), 2, "no temp file is left: {names:?}");
    }

    /// Atomic only: the content is whole and no temp file stays. (Its pages
    /// are left to the kernel's writeback, which may or may not have run:
    /// nothing to assert there.)
    #[test]
    fn an_unsynced_write_replaces_whole_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("status.json");
        write_atomically_unsynced(&dest, b"{\"a\":1}").unwrap();
        write_atomically_unsynced(&dest, &[5u8; 256 * 1024]).unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), vec![5u8; 256 * 1024]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_tree_synced_by_syncfs_has_no_dirty_page() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<_> = (0..20).map(|i| dir.path().join(format!("f{i}"))).collect();
        for f in &files {
            std::fs::write(f, vec![1u8; 64 * 1024]).unwrap();
        }
        assert!(files.iter().any(|f| dirty_pages(f) > 0));
        sync_filesystem(dir.path()).unwrap();
        for f in &files {
            assert_eq!(dirty_pages(f), 0, "{}", f.display());
        }
        let moved = dir.path().join("moved");
        rename_durably(&files[0], &moved).unwrap();
        assert!(moved.is_file() && !files[0].exists());
    }
}
