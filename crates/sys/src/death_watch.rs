//! Ending a FUSE connection when the process that serves it dies.
//!
//! A process that serves a FUSE mount and also uses it (the overlay it
//! stacks on top, the image's /etc/passwd it reads) can be killed while one
//! of its own threads waits for an answer. Once the server has read a
//! request, the kernel does not end that wait, not even on SIGKILL. The
//! server threads die; the waiting thread lives on, and with it the
//! process's descriptors, /dev/fuse among them. The connection never ends,
//! so the wait never ends, and the process never exits.
//!
//! [`ForceUnmountOnDeath`] breaks that circle from outside: a forked child
//! that holds none of the process's descriptors and waits. The kernel
//! signals it when the thread that forked it exits (`PR_SET_PDEATHSIG`),
//! which that thread does only when it is disarmed or the process dies.
//! The child then unmounts the mount with `MNT_FORCE`, which for FUSE
//! aborts the connection: every waiting request fails, and the process can
//! finish dying. Only for a mount no one else keeps: a descriptor holder
//! that keeps a connection for the next server wants the opposite.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::mpsc;

/// Force-unmounts a mount when this process dies, until disarmed (dropped).
pub struct ForceUnmountOnDeath {
    /// Dropped to disarm: the watching thread then kills the child.
    stop: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ForceUnmountOnDeath {
    /// Arm for the mount at `target`: from now on, if this process dies
    /// (killed, aborted, exited) before this value is dropped, `target` is
    /// unmounted with `MNT_FORCE`. Costs one thread and one small process.
    pub fn arm(target: &Path) -> io::Result<ForceUnmountOnDeath> {
        let path = CString::new(target.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the mount point"))?;
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        let (stop, stopped) = mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("unmount-on-death".into())
            .spawn(move || {
                // The child's parent is this thread: it must live exactly as
                // long as the arming.
                let child = match Watcher::fork(&path) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                // Disarmed: nothing is sent, the sender is dropped.
                let _ = stopped.recv();
                child.kill_and_reap();
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(ForceUnmountOnDeath {
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => {
                let _ = thread.join();
                Err(io::Error::other(
                    "the watching thread ended before it forked",
                ))
            }
        }
    }
}

impl Drop for ForceUnmountOnDeath {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The forked child, by a pidfd (its pid may be reused once reaped).
struct Watcher {
    pidfd: i32,
}

impl Watcher {
    #[allow(unsafe_code)] // fork(2) and what its child may call.
    fn fork(target: &CString) -> io::Result<Watcher> {
        // SAFETY: getpid has no preconditions.
        let parent = unsafe { libc::getpid() };
        // SAFETY: the child runs only `watch`, which makes async-signal-safe
        // system calls on data prepared before the fork (no allocation, no
        // lock), so the other threads' state copied mid-way is never used.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                // SAFETY: in the child of fork, as `watch` requires.
                unsafe { watch(target.as_ptr(), parent) }
            }
            pid => {
                // SAFETY: pidfd_open takes a pid and flags, no pointers.
                let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
                if fd < 0 {
                    let e = io::Error::last_os_error();
                    // SAFETY: `pid` is our child, not yet reaped.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, std::ptr::null_mut(), 0);
                    }
                    return Err(e);
                }
                Ok(Watcher { pidfd: fd as i32 })
            }
        }
    }

    #[allow(unsafe_code)] // pidfd_send_signal(2), waitid(2), close(2).
    fn kill_and_reap(self) {
        // SAFETY: `pidfd` is ours and open; the null info pointer is allowed.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd,
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            );
            let mut info: libc::siginfo_t = std::mem::zeroed();
            while libc::waitid(
                libc::P_PIDFD,
                self.pidfd as libc::id_t,
                &mut info,
                libc::WEXITED,
            ) == -1
                && io::Error::last_os_error().raw_os_error() == Some(libc::EINTR)
            {}
            libc::close(self.pidfd);
        }
    }
}

/// The child: wait for the parent thread's death, then force the unmount.
///
/// # Safety
/// Only in the child of `fork`, with `target` a valid C string.
#[allow(unsafe_code)]
unsafe fn watch(target: *const libc::c_char, parent: libc::pid_t) -> ! {
    // SAFETY: plain system calls on local data; see the function's contract.
    unsafe {
        // None of the parent's descriptors may live on here: /dev/fuse would
        // keep the connection, a lock file its lock, a pipe its reader waiting.
        if libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32) != 0 {
            // Before Linux 5.9: one by one, up to the descriptor limit.
            let mut lim: libc::rlimit = std::mem::zeroed();
            let top = match libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) {
                0 => lim.rlim_cur.min(1 << 20) as libc::c_int,
                _ => 1 << 16,
            };
            for fd in 0..top {
                libc::close(fd);
            }
        }
        // Every signal blocked (a Ctrl-C to the terminal's process group
        // must not end the watch); the parent-death signal is waited for.
        let mut all: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::sigprocmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
        let mut death: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut death);
        libc::sigaddset(&mut death, libc::SIGUSR1);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGUSR1 as libc::c_ulong);
        libc::prctl(libc::PR_SET_NAME, c"lazylayer-watch".as_ptr());
        // The parent thread may have died before the prctl: the whole
        // process gone shows as a new parent.
        if libc::getppid() == parent {
            while libc::sigwaitinfo(&death, std::ptr::null_mut()) != libc::SIGUSR1 {}
        }
        libc::umount2(target, libc::MNT_FORCE);
        libc::_exit(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Armed and disarmed in a process that lives on: the watcher holds none
    /// of this process's descriptors (a lock or /dev/fuse would live on in
    /// it), then it is gone (reaped: no zombie left) and the mount point
    /// untouched.
    #[test]
    fn disarming_reaps_the_child() {
        let dir = tempfile::tempdir().unwrap();
        let before = children();
        let w = ForceUnmountOnDeath::arm(dir.path()).unwrap();
        let now = children();
        assert_eq!(now.len(), before.len() + 1, "one watcher forked");
        let child = now.iter().find(|c| !before.contains(c)).unwrap();
        let fds = || {
            std::fs::read_dir(format!("/proc/{child}/fd"))
                .unwrap()
                .count()
        };
        let t0 = std::time::Instant::now();
        while fds() > 0 && t0.elapsed() < std::time::Duration::from_secs(5) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(fds(), 0, "the watcher kept descriptors of its parent");
        drop(w);
        assert_eq!(children(), before, "the watcher is reaped");
        assert!(dir.path().is_dir());
    }

    fn children() -> Vec<String> {
        let me = std::process::id();
        let mut out = Vec::new();
        for t in std::fs::read_dir(format!("/proc/{me}/task")).unwrap() {
            let kids = t.unwrap().path().join("children");
            let text = std::fs::read_to_string(kids).unwrap_or_default();
            out.extend(text.split_whitespace().map(str::to_string));
        }
        out.sort();
        out
    }
}
