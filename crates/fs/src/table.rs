//! The part of a mounted file system's state the kernel depends on, kept in
//! shared memory (a memfd) so that it outlives the serving process: a
//! restarted server maps the same memfd (handed over with the /dev/fuse
//! descriptor) and goes on where the old one stopped.
//!
//! Everything else is derivable from the index: inode numbers are entry
//! indexes plus one, attributes and names come from the entries. What is not
//! is which inodes the kernel has open in passthrough mode, through which
//! registered backing file: an open of such an inode must reuse that backing
//! id (the kernel refuses a second backing file on an inode with open files),
//! and its last release must unregister it. Those live here, with the file
//! handle counter (so handles stay unique across servers) and what INIT
//! negotiated.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::SealFlags;

const MAGIC: u64 = u64::from_le_bytes(*b"llfstab1");
const HEADER_WORDS: usize = 4;
/// Header word: the next file handle to give out.
const NEXT_FH: usize = 1;
/// Header word: flags negotiated at INIT.
const FLAGS: usize = 2;
/// Header word: the number of inode slots (the index's entry count).
const SLOTS: usize = 3;

/// INIT answered (a server taking over must not expect one).
pub const FLAG_INITIALIZED: u64 = 1;
/// The kernel agreed to FUSE passthrough at INIT.
pub const FLAG_PASSTHROUGH: u64 = 2;

/// Seals of the memfd: its size is fixed once made, since a shrink under
/// the servers' mappings would kill them (SIGBUS) on their next access, and
/// the seals themselves are final. Writes stay allowed: the table is
/// written through a shared mapping.
const SIZE_SEALS: SealFlags = SealFlags::SHRINK
    .union(SealFlags::GROW)
    .union(SealFlags::SEAL);

/// Per-inode I/O state in shared memory.
pub struct OpenTable {
    fd: OwnedFd,
    ptr: NonNull<AtomicU64>,
    words: usize,
}

// SAFETY: the mapping is only accessed through atomics, and lives as long as
// the value.
unsafe impl Send for OpenTable {}
// SAFETY: as for Send: shared access goes through atomics only.
unsafe impl Sync for OpenTable {}

impl OpenTable {
    /// A new, zeroed table for `slots` inodes.
    pub fn create(slots: usize) -> std::io::Result<OpenTable> {
        use rustix::fs::MemfdFlags;
        let fd = rustix::fs::memfd_create(
            "lazylayer-fs-state",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        let words = HEADER_WORDS + slots;
        rustix::fs::ftruncate(&fd, (words * 8) as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SIZE_SEALS)?;
        let t = OpenTable::map(fd, words)?;
        t.word(0).store(MAGIC, Ordering::Relaxed);
        t.word(NEXT_FH).store(1, Ordering::Relaxed);
        t.word(SLOTS).store(slots as u64, Ordering::Relaxed);
        Ok(t)
    }

    /// The table a previous server left in `fd`, which must be one for
    /// `slots` inodes (the same index).
    pub fn adopt(fd: OwnedFd, slots: usize) -> std::io::Result<OpenTable> {
        let words = HEADER_WORDS + slots;
        let len = rustix::fs::fstat(&fd)?.st_size;
        let bad = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidData, why);
        if len != (words * 8) as i64 {
            return Err(bad(format!(
                "the handed-over file-system state is {len} bytes, not {} for {slots} inodes",
                words * 8
            )));
        }
        // Tables made before they were sealed: seal them now if the memfd
        // allows it (one made without ALLOW_SEALING never does).
        if !rustix::fs::fcntl_get_seals(&fd)?.contains(SealFlags::SHRINK) {
            if let Err(e) = rustix::fs::fcntl_add_seals(&fd, SIZE_SEALS) {
                tracing::warn!(error = %e, "the handed-over file-system state cannot be sealed; a holder of it could still resize it");
            }
        }
        let t = OpenTable::map(fd, words)?;
        if t.word(0).load(Ordering::Relaxed) != MAGIC
            || t.word(SLOTS).load(Ordering::Relaxed) != slots as u64
        {
            return Err(bad("the handed-over file-system state is not ours".into()));
        }
        Ok(t)
    }

    fn map(fd: OwnedFd, words: usize) -> std::io::Result<OpenTable> {
        // SAFETY: a fresh shared mapping of our own memfd, of its length.
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                words * 8,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )?
        };
        Ok(OpenTable {
            fd,
            ptr: NonNull::new(p.cast()).expect("mmap never returns null"),
            words,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        assert!(i < self.words);
        // SAFETY: in bounds of the mapping, 8-byte aligned (page-aligned base).
        unsafe { &*self.ptr.as_ptr().add(i) }
    }

    /// The memfd, to hand over.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn flags(&self) -> u64 {
        self.word(FLAGS).load(Ordering::Acquire)
    }

    pub fn set_flags(&self, flags: u64) {
        self.word(FLAGS).fetch_or(flags, Ordering::AcqRel);
    }

    pub fn clear_flags(&self, flags: u64) {
        self.word(FLAGS).fetch_and(!flags, Ordering::AcqRel);
    }

    /// A file handle never given out before on this connection.
    pub fn next_fh(&self) -> u64 {
        self.word(NEXT_FH).fetch_add(1, Ordering::Relaxed)
    }

    fn slot(&self, ino: u64) -> Option<&AtomicU64> {
        let i = usize::try_from(ino).ok()?.checked_sub(1)?;
        (HEADER_WORDS + i < self.words).then(|| self.word(HEADER_WORDS + i))
    }

    /// Open count and backing id (0: none) of inode `ino`.
    pub fn get(&self, ino: u64) -> (u32, u32) {
        let v = self.slot(ino).map_or(0, |s| s.load(Ordering::Acquire));
        (v as u32, (v >> 32) as u32)
    }

    /// Set inode `ino`'s open count and backing id. Callers serialize
    /// changes of one inode (the file system's open lock).
    pub fn set(&self, ino: u64, opens: u32, backing: u32) {
        if let Some(s) = self.slot(ino) {
            s.store(
                u64::from(opens) | (u64::from(backing) << 32),
                Ordering::Release,
            );
        }
    }
}

impl Drop for OpenTable {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.words * 8) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_survives_into_its_adopter_and_refuses_another_index() {
        let t = OpenTable::create(10).unwrap();
        t.set_flags(FLAG_INITIALIZED | FLAG_PASSTHROUGH);
        assert_eq!(t.next_fh(), 1);
        assert_eq!(t.next_fh(), 2);
        t.set(3, 2, 77);
        t.set(10, 1, 0);
        // Out of range or inode 0: ignored, reads as nothing open.
        t.set(11, 5, 5);
        t.set(0, 5, 5);
        assert_eq!(t.get(11), (0, 0));
        assert_eq!(t.get(0), (0, 0));

        let dup = t.fd().try_clone_to_owned().unwrap();
        let dup2 = t.fd().try_clone_to_owned().unwrap();
        drop(t);
        let a = OpenTable::adopt(dup, 10).unwrap();
        assert_eq!(a.flags(), FLAG_INITIALIZED | FLAG_PASSTHROUGH);
        assert_eq!(a.get(3), (2, 77));
        assert_eq!(a.get(10), (1, 0));
        assert_eq!(a.next_fh(), 3, "handles go on, never reused");
        let e = OpenTable::adopt(dup2, 11)
            .err()
            .expect("another index's size");
        assert!(e.to_string().contains("112 bytes, not 120"), "{e}");
    }

    /// The memfd is sealed at its size: whoever else holds it (the
    /// descriptor holder, a server taking over) cannot shrink it under a
    /// mapping, which would SIGBUS the server, nor grow it.
    #[test]
    fn the_shared_table_cannot_change_size() {
        let t = OpenTable::create(10).unwrap();
        let other = t.fd().try_clone_to_owned().unwrap();
        for len in [0, 8, 4096] {
            let e = rustix::fs::ftruncate(&other, len).expect_err("a resize must be refused");
            assert_eq!(e, rustix::io::Errno::PERM, "ftruncate to {len}");
        }
        t.set(10, 1, 2);
        assert_eq!(t.get(10), (1, 2), "the table still works");
        let adopted = OpenTable::adopt(other, 10).unwrap();
        assert_eq!(adopted.get(10), (1, 2));
    }
}
