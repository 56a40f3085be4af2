//! Kernel overlayfs mounts as values: unmounted on drop.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use rustix::mount::{MountFlags, UnmountFlags};

use crate::RuntimeError;

/// A mounted kernel overlayfs (or, for a single read-only lower, a read-only bind
/// mount); unmounted on drop, lazily (MNT_DETACH) if it is still busy.
#[derive(Debug)]
pub struct OverlayMount {
    target: PathBuf,
    mounted: bool,
}

impl OverlayMount {
    /// A writable overlay of `lowers` (top first) with `upper` and `work` (which must be
    /// on the same file system) at `target`.
    pub fn mount(
        lowers: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<Self, RuntimeError> {
        Self::mount_with_data(lowers, &[], upper, work, target)
    }

    /// [`Self::mount`] with data-only lower layers below `lowers` (Linux
    /// 6.5+): never listed or looked up by name, only read through the
    /// `trusted.overlay.redirect` of a metacopy file in `lowers`, tried in
    /// order.
    pub fn mount_with_data(
        lowers: &[PathBuf],
        data: &[PathBuf],
        upper: &Path,
        work: &Path,
        target: &Path,
    ) -> Result<Self, RuntimeError> {
        let upper = absolute(upper, target)?;
        let work = absolute(work, target)?;
        let mut lowerdir = lower_list(lowers, target)?;
        for d in data {
            lowerdir.push_str("::");
            lowerdir.push_str(&option_path(&absolute(d, target)?, target)?);
        }
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            lowerdir,
            option_path(&upper, target)?,
            option_path(&work, target)?,
        );
        Self::overlay(target, &options, MountFlags::empty())
    }

    /// A read-only view of `lowers` (top first) at `target`.
    pub fn readonly(lowers: &[PathBuf], target: &Path) -> Result<Self, RuntimeError> {
        if let [only] = lowers {
            // overlayfs wants two lowers when there is no upper; one is just a ro bind.
            return Self::readonly_bind(only, target);
        }
        let options = format!("lowerdir={}", lower_list(lowers, target)?);
        Self::overlay(target, &options, MountFlags::RDONLY)
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Unmounts now, reporting failure (drop only logs it).
    pub fn unmount(mut self) -> Result<(), RuntimeError> {
        self.mounted = false;
        unmount(&self.target)
    }

    fn overlay(target: &Path, options: &str, flags: MountFlags) -> Result<Self, RuntimeError> {
        let target = absolute(target, target)?;
        let err = |reason: String| RuntimeError::Mount {
            target: target.clone(),
            reason,
        };
        // mount(2) copies at most one page of options; the kernel would cut the rest off
        // and fail obscurely (or mount fewer layers), so refuse up front.
        let page = rustix::param::page_size();
        if options.len() + 1 > page {
            return Err(err(format!(
                "overlay options are {} bytes, more than mount(2) accepts ({page}); \
                 use fewer or shorter lower directories",
                options.len()
            )));
        }
        let data = CString::new(options).map_err(|_| err("path holds a NUL byte".to_owned()))?;
        rustix::mount::mount("overlay", &target, "overlay", flags, data.as_c_str())
            .map_err(|e| err(format!("mount -t overlay -o {options}: {e}")))?;
        tracing::debug!(target = %target.display(), options, "overlay mounted");
        Ok(OverlayMount {
            target,
            mounted: true,
        })
    }

    fn readonly_bind(source: &Path, target: &Path) -> Result<Self, RuntimeError> {
        let target = absolute(target, target)?;
        let source = absolute(source, &target)?;
        let err = |reason: String| RuntimeError::Mount {
            target: target.clone(),
            reason,
        };
        rustix::mount::mount_bind(&source, &target)
            .map_err(|e| err(format!("bind {}: {e}", source.display())))?;
        let mount = OverlayMount {
            target: target.clone(),
            mounted: true,
        };
        // A bind mount ignores MS_RDONLY; read-only takes a remount of the bind itself.
        rustix::mount::mount_remount(&target, MountFlags::BIND | MountFlags::RDONLY, "")
            .map_err(|e| err(format!("remount read-only: {e}")))?;
        Ok(mount)
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(e) = unmount(&self.target) {
                tracing::warn!(error = %e, "overlay unmount failed");
            }
        }
    }
}

fn unmount(target: &Path) -> Result<(), RuntimeError> {
    let err = |e: rustix::io::Errno| RuntimeError::Mount {
        target: target.to_owned(),
        reason: format!("unmount: {e}"),
    };
    match rustix::mount::unmount(target, UnmountFlags::empty()) {
        Ok(()) => Ok(()),
        // Still in use (a process has its cwd there, say): detach now, freed when idle.
        Err(rustix::io::Errno::BUSY) => {
            rustix::mount::unmount(target, UnmountFlags::DETACH).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

fn absolute(path: &Path, target: &Path) -> Result<PathBuf, RuntimeError> {
    std::path::absolute(path).map_err(|e| RuntimeError::Mount {
        target: target.to_owned(),
        reason: format!("resolve {}: {e}", path.display()),
    })
}

fn lower_list(lowers: &[PathBuf], target: &Path) -> Result<String, RuntimeError> {
    if lowers.is_empty() {
        return Err(RuntimeError::Mount {
            target: target.to_owned(),
            reason: "no lower directories".to_owned(),
        });
    }
    let paths = lowers
        .iter()
        .map(|l| option_path(&absolute(l, target)?, target))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(paths.join(":"))
}

/// A path as it can stand in overlay's option string, where ',' separates options
/// and ':' separates lowers.
fn option_path(path: &Path, target: &Path) -> Result<String, RuntimeError> {
    let s = path.to_str().ok_or_else(|| RuntimeError::Mount {
        target: target.to_owned(),
        reason: format!("{} is not UTF-8", path.display()),
    })?;
    if s.contains([',', ':', '\\']) {
        return Err(RuntimeError::Mount {
            target: target.to_owned(),
            reason: format!("{s:?} holds ',', ':' or '\\', which overlay options cannot carry"),
        });
    }
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_unsafe_paths_and_long_options_before_mounting() {
        let target = Path::new("/nonexistent-target");
        let e = OverlayMount::readonly(&[], target).unwrap_err().to_string();
        assert!(e.contains("no lower directories"), "{e}");
        let e = OverlayMount::readonly(&["/a:b".into(), "/c".into()], target)
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"/a:b\""), "{e}");
        let many: Vec<PathBuf> = (0..500)
            .map(|i| format!("/layers/{i:04}/fs").into())
            .collect();
        let e = OverlayMount::readonly(&many, target)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("more than mount(2) accepts") && e.contains("/nonexistent-target"),
            "{e}"
        );
    }
}
