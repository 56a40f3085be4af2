//! A mounted lazylayer file system as a value: unmounted on drop.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};

use crate::filesystem::{FsStats, LazyFs};
use crate::source::ContentSource;
use crate::FsError;

pub struct FsMount {
    session: Option<BackgroundSession>,
    target: PathBuf,
    stats: Arc<FsStats>,
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
        let mut cfg = Config::default();
        cfg.mount_options = vec![
            MountOption::FSName("lazylayer".into()),
            MountOption::Subtype("lazylayer".into()),
            MountOption::RO,
            MountOption::DefaultPermissions,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::Exec,
        ];
        cfg.acl = SessionACL::All;
        // Several threads so that one reader blocked on a download does not
        // stall every other file access.
        cfg.n_threads = Some(threads.max(1));
        cfg.clone_fd = true;
        let stats = fs.stats();
        let session = fuser::spawn_mount(fs, target, &cfg).map_err(|source| FsError::Mount {
            path: target.to_path_buf(),
            source,
        })?;
        Ok(FsMount {
            session: Some(session),
            target: target.to_path_buf(),
            stats,
        })
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// How the mounted file system served requests so far (live counters).
    pub fn stats(&self) -> Arc<FsStats> {
        self.stats.clone()
    }

    /// Unmount now (also done on drop).
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> std::io::Result<()> {
        if let Some(s) = self.session.take() {
            // If something still holds the mount (a crashed overlay user),
            // detach it so no mount outlives us.
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(target = %self.target.display(), error = %e, "unmount failed; detaching");
                let _ = rustix::mount::unmount(&self.target, rustix::mount::UnmountFlags::DETACH);
                return Err(e);
            }
        }
        Ok(())
    }
}

impl Drop for FsMount {
    fn drop(&mut self) {
        let _ = self.do_unmount();
    }
}
