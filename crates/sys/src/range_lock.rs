//! Byte-range locks between processes: open file description locks
//! (`fcntl(2)`, `F_OFD_SETLK`). Unlike POSIX record locks they belong to the
//! open file, not the process, so closing another handle of the same file
//! does not drop them; unlike `flock(2)` they cover a range, so two
//! processes can each own some chunks of one cache file. The kernel releases
//! them when the last handle goes, a crashed process included.
//!
//! Handles that share one open file description (a `File` and its clones,
//! every thread of a process using it) never conflict with each other.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// One lock request: `len` bytes at `start` of `file`, write (exclusive)
/// or unlock, waiting or not.
#[allow(unsafe_code)] // rustix and std lock whole files only.
fn ofd_lock(file: &File, start: u64, len: u64, kind: i32, wait: bool) -> io::Result<bool> {
    let too_big = |_| io::Error::new(io::ErrorKind::InvalidInput, "lock range past i64");
    // SAFETY: `flock` is plain data; all-zero is a valid value (l_pid must
    // be 0 for OFD locks), the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = i64::try_from(start).map_err(too_big)?;
    fl.l_len = i64::try_from(len).map_err(too_big)?;
    let cmd = if wait {
        libc::F_OFD_SETLKW
    } else {
        libc::F_OFD_SETLK
    };
    loop {
        // SAFETY: the descriptor is open for the borrow of `file`, and `fl`
        // is a valid, initialized flock that outlives the call.
        let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl as *mut libc::flock) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EAGAIN) | Some(libc::EACCES) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

/// Take the write lock on `len` bytes at `start` if no other open file
/// holds any of them; false if one does.
pub fn try_lock_range(file: &File, start: u64, len: u64) -> io::Result<bool> {
    ofd_lock(file, start, len, libc::F_WRLCK, false)
}

/// Take the write lock on `len` bytes at `start`, waiting for other open
/// files to release them. Blocking: call off an async runtime's threads.
pub fn lock_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    ofd_lock(file, start, len, libc::F_WRLCK, true).map(|_| ())
}

/// Release `len` bytes at `start` (those not locked are left as they are).
pub fn unlock_range(file: &File, start: u64, len: u64) -> io::Result<()> {
    ofd_lock(file, start, len, libc::F_UNLCK, false).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    fn two_opens() -> (tempfile::TempDir, File, File) {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::write(&p, [0u8; 16]).unwrap();
        let a = File::options().read(true).write(true).open(&p).unwrap();
        let b = File::options().read(true).write(true).open(&p).unwrap();
        (dir, a, b)
    }

    #[test]
    fn a_range_held_by_one_open_file_is_refused_to_another_until_released() {
        let (_d, a, b) = two_opens();
        assert!(try_lock_range(&a, 2, 3).unwrap());
        // Overlapping: refused; beside it: granted.
        assert!(!try_lock_range(&b, 4, 1).unwrap());
        assert!(try_lock_range(&b, 5, 1).unwrap());
        // The same open file (a clone shares it) never conflicts with itself.
        let a2 = a.try_clone().unwrap();
        assert!(try_lock_range(&a2, 2, 1).unwrap());
        unlock_range(&a, 2, 3).unwrap();
        assert!(try_lock_range(&b, 2, 3).unwrap());
    }

    #[test]
    fn a_waiting_lock_is_granted_when_the_holder_releases_or_closes() {
        let (_d, a, b) = two_opens();
        assert!(try_lock_range(&a, 0, 1).unwrap());
        let (tx, rx) = mpsc::channel();
        let waiter = std::thread::spawn(move || {
            lock_range(&b, 0, 1).unwrap();
            tx.send(()).unwrap();
            b
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "granted while held"
        );
        // Closing the holder releases its locks, as a process that dies does.
        drop(a);
        rx.recv_timeout(Duration::from_secs(10))
            .expect("granted once released");
        waiter.join().unwrap();
    }
}
