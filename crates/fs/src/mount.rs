//! A mounted lazylayer file system as a value: unmounted on drop, unless
//! left mounted for the next server ([`FsMount::leave`]), which takes it over
//! with [`FsMount::resume`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, Session, SessionACL};

use lazylayer_sys::death_watch::ForceUnmountOnDeath;

use crate::filesystem::{FsStats, LazyFs, OpensSwitch};
use crate::source::ContentSource;
use crate::table::{OpenTable, FLAG_INITIALIZED};
use crate::FsError;

pub struct FsMount {
    session: Option<BackgroundSession>,
    target: PathBuf,
    stats: Arc<FsStats>,
    opens: OpensSwitch,
    /// The connection, kept for a holder ([`FsMount::handover_fds`]).
    device: OwnedFd,
    table: Arc<OpenTable>,
    /// Counted in the process's metrics while served here.
    _counted: lazylayer_metrics::MountedRoot,
    /// Set by [`FsMount::force_unmount_on_death`].
    death_watch: Option<ForceUnmountOnDeath>,
}

/// `FUSE_NOTIFY_RESEND` (Linux 6.9): the kernel queues again every request
/// a server read and did not answer.
const FUSE_NOTIFY_RESEND: i32 = 7;

fn session_config(threads: usize) -> Config {
    let mut cfg = Config::default();
    cfg.acl = SessionACL::All;
    // Several threads so that one reader blocked on a download does not
    // stall every other file access. All on the one descriptor (no
    // FUSE_DEV_IOC_CLONE): requests read on a cloned descriptor are failed
    // by the kernel when the process holding it dies, while those on a
    // descriptor the holder keeps open stay queued for the next server.
    cfg.n_threads = Some(threads.max(1));
    cfg.clone_fd = false;
    cfg
}

impl FsMount {
    /// Mount `fs` read-only at `target` (an existing directory). The kernel
    /// checks permissions from the attributes we report (default_permissions),
    /// and every user may enter (allow_other), as in a container's root.
    ///
    /// `nosuid,nodev`: the image is untrusted, and this mount is reachable
    /// from the host. A container does not lose its setuid binaries or its
    /// devices by it: it runs on the overlayfs stacked on top, whose own
    /// mount flags count, and its /dev comes from its spec.
    pub fn mount<S: ContentSource>(
        fs: LazyFs<S>,
        target: &Path,
        threads: usize,
    ) -> Result<FsMount, FsError> {
        let err = |source: std::io::Error| FsError::Mount {
            path: target.to_path_buf(),
            source,
        };
        let table = Arc::new(OpenTable::create(fs.inodes()).map_err(err)?);
        let device = rustix::fs::open(
            "/dev/fuse",
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(|e| err(e.into()))?;
        // rootmode: the root's file type as the kernel must see it before
        // INIT; allow_other: containers run as any user.
        let data = format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,allow_other",
            std::os::fd::AsRawFd::as_raw_fd(&device)
        );
        let flags = rustix::mount::MountFlags::RDONLY
            | rustix::mount::MountFlags::NOSUID
            | rustix::mount::MountFlags::NODEV;
        let data = std::ffi::CString::new(data).expect("no NUL in mount options");
        rustix::mount::mount(
            "lazylayer",
            target,
            "fuse.lazylayer",
            flags,
            data.as_c_str(),
        )
        .map_err(|e| err(e.into()))?;
        let dup = |fd: &OwnedFd| fd.try_clone();
        let started = (|| {
            fs.attach(table.clone(), dup(&device)?);
            let stats = (fs.stats(), fs.opens_switch());
            // The handshake answers the INIT the mount queued.
            let session =
                Session::from_fd(fs, dup(&device)?, SessionACL::All, session_config(threads))?;
            Ok::<_, std::io::Error>((session.spawn()?, stats))
        })();
        match started {
            Ok((session, (stats, opens))) => Ok(FsMount::served(
                session, target, stats, opens, device, table,
            )),
            Err(e) => {
                let _ = rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH);
                Err(err(e))
            }
        }
    }

    /// Serve the live mount at `target` that an earlier server left (its
    /// /dev/fuse descriptor `device` and its state `table`, as
    /// [`FsMount::handover_fds`] gave them), for the same index. Requests
    /// the earlier server read and never answered are sent again.
    pub fn resume<S: ContentSource>(
        fs: LazyFs<S>,
        target: &Path,
        threads: usize,
        device: OwnedFd,
        table: OwnedFd,
    ) -> Result<FsMount, FsError> {
        let err = |source: std::io::Error| FsError::Mount {
            path: target.to_path_buf(),
            source,
        };
        let table = Arc::new(OpenTable::adopt(table, fs.inodes()).map_err(err)?);
        if table.flags() & FLAG_INITIALIZED == 0 {
            return Err(err(std::io::Error::other(
                "the handed-over connection never finished its INIT",
            )));
        }
        fs.attach(table.clone(), device.try_clone().map_err(err)?);
        let (stats, opens) = (fs.stats(), fs.opens_switch());
        let session = Session::resume(
            fs,
            device.try_clone().map_err(err)?,
            SessionACL::All,
            session_config(threads),
        )
        .spawn()
        .map_err(err)?;
        // Serving first, then the resend: the requests come back to us.
        let header = notify_header(FUSE_NOTIFY_RESEND);
        match rustix::io::write(&device, &header) {
            Ok(_) => {}
            // Before Linux 6.9: what the dead server had read stays
            // unanswered; later requests are served.
            Err(e) => {
                tracing::warn!(target = %target.display(), error = %e, "the kernel cannot resend requests in flight")
            }
        }
        Ok(FsMount::served(
            session, target, stats, opens, device, table,
        ))
    }

    /// The mount at `target`, served by `session` from now on (a new one
    /// or one taken over).
    fn served(
        session: BackgroundSession,
        target: &Path,
        stats: Arc<FsStats>,
        opens: OpensSwitch,
        device: OwnedFd,
        table: Arc<OpenTable>,
    ) -> FsMount {
        set_read_ahead_path(&opens, target);
        FsMount {
            session: Some(session),
            target: target.to_path_buf(),
            stats,
            opens,
            device,
            table,
            _counted: lazylayer_metrics::MountedRoot::start(),
            death_watch: None,
        }
    }

    /// For a mount no holder keeps, served by a process that also uses it
    /// (mounts an overlay on it, reads files from it): if this process dies
    /// while serving, the mount is force-unmounted from outside, which
    /// aborts its connection. Else a request of its own that its dead
    /// server had read would wait for ever, and keep the process from
    /// exiting ([`lazylayer_sys::death_watch`]). Undone by unmounting or
    /// leaving the mount.
    pub fn force_unmount_on_death(&mut self) -> Result<(), FsError> {
        let w = ForceUnmountOnDeath::arm(&self.target).map_err(|source| FsError::Mount {
            path: self.target.clone(),
            source,
        })?;
        self.death_watch = Some(w);
        Ok(())
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// The switch to opens the kernel answers alone, for a root whose every
    /// byte is local ([`OpensSwitch`]).
    pub fn opens_switch(&self) -> &OpensSwitch {
        &self.opens
    }

    /// How the mounted file system served requests so far (live counters).
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// What a holder must keep for the next server: the /dev/fuse
    /// connection and the shared state.
    pub fn handover_fds(&self) -> [BorrowedFd<'_>; 2] {
        [self.device.as_fd(), self.table.fd()]
    }

    /// Unmount now (also done on drop).
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.do_unmount()
    }

    /// Keep the mount for the next server: nothing is unmounted; this
    /// process's threads serve on until it exits, and a holder keeps the
    /// connection open after that.
    pub fn leave(mut self) {
        self.death_watch = None;
        if let Some(s) = self.session.take() {
            std::mem::forget(s);
        }
    }

    fn do_unmount(&mut self) -> std::io::Result<()> {
        let Some(s) = self.session.take() else {
            return Ok(());
        };
        // Disarmed once the unmount is done (or given up): until then a
        // death must still end the connection.
        let _watch = self.death_watch.take();
        if let Err(e) = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::empty()) {
            // Still in use (an overlay user that crashed): detach it so no
            // mount outlives us. The connection ends when its last user
            // lets go; the threads are not waited for.
            tracing::warn!(target = %self.target.display(), error = %e, "unmount failed; detaching");
            let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
            std::mem::forget(s);
            return Err(e.into());
        }
        // The kernel ends the connection when the superblock goes and the
        // threads see ENODEV. An overlay that still stands on this mount
        // (overlayfs keeps a private clone of its lowers) keeps it alive:
        // then the threads serve it until it goes, not waited for.
        let t0 = std::time::Instant::now();
        while !s.guard.is_finished() {
            if t0.elapsed() > std::time::Duration::from_secs(2) {
                tracing::warn!(target = %self.target.display(), "unmounted, but still in use below an overlay: served until it goes");
                std::mem::forget(s);
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        s.join()
    }
}

/// A notification's header: length, code (as the error field), unique 0.
fn notify_header(code: i32) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&16u32.to_ne_bytes());
    h[4..8].copy_from_slice(&code.to_ne_bytes());
    h
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let _ = self.do_unmount();
    }
}

/// Tell `opens` where the mount at `target` sets its readahead: sysfs names
/// a mount's backing device info after its device number. Asked without a
/// request to the file system (`AT_STATX_DONT_SYNC`: the device comes from
/// the superblock).
fn set_read_ahead_path(opens: &OpensSwitch, target: &Path) {
    use rustix::fs::{statx, AtFlags, StatxFlags, CWD};
    match statx(CWD, target, AtFlags::STATX_DONT_SYNC, StatxFlags::empty()) {
        Ok(st) => opens.set_read_ahead_path(PathBuf::from(format!(
            "/sys/class/bdi/{}:{}/read_ahead_kb",
            st.stx_dev_major, st.stx_dev_minor
        ))),
        Err(e) => {
            tracing::debug!(target = %target.display(), error = %e, "no device number for the mount's readahead")
        }
    }
}
