//! Finding and removing the mounts below a directory, by whole path components:
//! the mounts of container `a` are below `containers/a/`, never `containers/ab/`.

use std::path::{Path, PathBuf};

use rustix::mount::UnmountFlags;

/// Mount points at or below `dir` in `mountinfo` (the text of
/// /proc/self/mountinfo), in mount order (a mount stacked on another comes after it).
pub fn mounts_below_in(mountinfo: &str, dir: &Path) -> Vec<PathBuf> {
    lazylayer_sys::mountinfo::parse(mountinfo)
        .into_iter()
        .map(|m| PathBuf::from(m.mount_point))
        // Path::starts_with compares components: "/x/ab" does not start with "/x/a".
        .filter(|t| t.starts_with(dir))
        .collect()
}

/// Mount points at or below `dir` in our mount namespace, in mount order.
pub fn mounts_below(dir: &Path) -> Vec<PathBuf> {
    let dir = std::fs::canonicalize(dir)
        .or_else(|_| std::path::absolute(dir))
        .unwrap_or_else(|_| dir.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mounts_below_in(&info, &dir)
}

/// Unmounts everything at or below `dir`, last mounted first (an overlay before
/// the FUSE file system it stands on); a busy mount is detached. Failures are
/// logged: what cannot be unmounted now cannot be helped by the caller either.
pub fn unmount_below(dir: &Path) {
    for t in mounts_below(dir).iter().rev() {
        let r = match rustix::mount::unmount(t, UnmountFlags::empty()) {
            Err(rustix::io::Errno::BUSY) => rustix::mount::unmount(t, UnmountFlags::DETACH),
            r => r,
        };
        match r {
            Ok(()) => tracing::debug!(mount = %t.display(), "unmounted"),
            // Already gone (unmounted along with a parent, or by someone else).
            Err(rustix::io::Errno::INVAL | rustix::io::Errno::NOENT) => {}
            Err(e) => tracing::warn!(mount = %t.display(), error = %e, "cannot unmount"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INFO: &str = "\
22 1 0:21 / / rw - ext4 /dev/sda1 rw
30 22 0:40 / /s/containers/ab/lower ro - fuse.lazylayer lazylayer ro
31 22 0:41 / /s/containers/ab/rootfs rw - overlay overlay rw
32 22 0:42 / /s/containers/a/lower ro - fuse.lazylayer lazylayer ro
33 22 0:43 / /s/containers/a/rootfs rw - overlay overlay rw
34 22 0:44 / /s/containers/a rw - tmpfs tmpfs rw
35 22 0:45 / /s/containers/a\\040b/rootfs rw - overlay overlay rw
";

    #[test]
    fn matches_whole_components_only_in_mount_order() {
        let p = |v: &[&str]| v.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            mounts_below_in(INFO, Path::new("/s/containers/a")),
            p(&[
                "/s/containers/a/lower",
                "/s/containers/a/rootfs",
                "/s/containers/a"
            ])
        );
        assert_eq!(
            mounts_below_in(INFO, Path::new("/s/containers/ab")),
            p(&["/s/containers/ab/lower", "/s/containers/ab/rootfs"])
        );
        // A trailing separator changes nothing; an escaped space is a space.
        assert_eq!(
            mounts_below_in(INFO, Path::new("/s/containers/ab/")).len(),
            2
        );
        assert_eq!(
            mounts_below_in(INFO, Path::new("/s/containers/a b")),
            p(&["/s/containers/a b/rootfs"])
        );
        assert_eq!(mounts_below_in(INFO, Path::new("/s/containers/")).len(), 6);
        assert!(mounts_below_in(INFO, Path::new("/s/cont")).is_empty());
    }

    /// Issue #19: `\777` is not an escape the kernel writes (it escapes a
    /// backslash as `\134`), but three octal digits above 0o377 made the
    /// byte arithmetic overflow ("attempt to multiply with overflow").
    #[test]
    fn octal_beyond_a_byte_is_kept_as_text() {
        let info = "36 22 0:46 / /s/x\\777\\040y rw - tmpfs tmpfs rw\n";
        assert_eq!(
            mounts_below_in(info, Path::new("/s")),
            [PathBuf::from("/s/x\\777 y")]
        );
    }

    /// Any line, however broken, gives mount points or nothing, never a
    /// panic; what is found is below the directory asked for.
    #[test]
    fn fuzz_mountinfo_lines() {
        use lazylayer_testsupport::fuzz::fuzz;
        use proptest::prelude::*;
        let piece = proptest::sample::select(vec![
            " ",
            "\\",
            "\\040",
            "\\777",
            "\\0",
            "\\",
            "7",
            "/s",
            "/s/a",
            "/",
            "-",
            " - ",
            "\n",
            "é",
            "22 1 0:21 ",
            "overlay",
            "lowerdir=/s/a:/s/b",
        ]);
        let text = prop_oneof![
            3 => proptest::collection::vec(piece, 0..24).prop_map(|p| p.concat()),
            1 => any::<String>(),
        ];
        fuzz("mountinfo (runtime)", text, |t| {
            for m in mounts_below_in(&t, Path::new("/s")) {
                prop_assert!(m.starts_with("/s"), "{}", m.display());
            }
            Ok(())
        });
    }
}
