//! Opening a path below a directory, never through a symlink and never out
//! of it: layer directories and rootfs trees come from untrusted images, so
//! a symlink planted by one entry must not redirect a later open.
//!
//! Every lookup goes through `openat2` with [`RESOLVE_BENEATH`]; what is
//! then created, removed or changed acts on a single name relative to the
//! directory fd so obtained.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{Mode, OFlags, ResolveFlags};

/// `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`. No
/// `O_NOFOLLOW` has to go with these for directories: `RESOLVE_NO_SYMLINKS`
/// already refuses a trailing symlink, with `ELOOP`, whereas
/// `O_NOFOLLOW|O_DIRECTORY` would turn that into an `ENOTDIR`
/// indistinguishable from a regular file in the way.
pub const RESOLVE_BENEATH: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

/// `dir` itself, `O_PATH`: the anchor of lookups beneath it.
pub fn open_root(dir: &Path) -> rustix::io::Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// `openat2(dir, rel, flags, RESOLVE_BENEATH)`. `EXDEV` means `rel` tried
/// to leave `dir`, `ELOOP` that it goes through a symlink.
pub fn openat_beneath<P: rustix::path::Arg>(
    dir: impl AsFd,
    rel: P,
    flags: OFlags,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(dir, rel, flags, Mode::empty(), RESOLVE_BENEATH)
}

/// Open the regular file `rel` below `dir` read-only, never following a
/// symlink on the way: layer directories come from untrusted images.
///
/// Anything but a regular file is refused *before* it is opened for reading:
/// the path is first opened `O_PATH` (which opens nothing on a device or a
/// FIFO) and its type checked, then reopened `O_NONBLOCK | O_NOCTTY` and
/// checked to be the same inode. Opening a device node as root would hand the
/// host's device to a container outside its device rules; opening a FIFO
/// would block the reader in the kernel for good.
pub fn open_beneath(dir: &std::path::Path, rel: &[u8]) -> io::Result<File> {
    use std::os::unix::ffi::OsStrExt;
    let root = open_root(dir)?;
    let rel = std::ffi::OsStr::from_bytes(rel);
    let probe = openat_beneath(
        &root,
        rel,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
    )?;
    let before = rustix::fs::fstat(&probe)?;
    refuse_unless_regular(&before, dir, rel)?;
    let fd = openat_beneath(
        &root,
        rel,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
    )?;
    let after = rustix::fs::fstat(&fd)?;
    refuse_unless_regular(&after, dir, rel)?;
    if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino) {
        return Err(io::Error::other(format!(
            "{} in {} was replaced while being opened",
            rel.to_string_lossy(),
            dir.display()
        )));
    }
    Ok(File::from(fd))
}

fn refuse_unless_regular(
    st: &rustix::fs::Stat,
    dir: &std::path::Path,
    rel: &std::ffi::OsStr,
) -> io::Result<()> {
    let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if kind == rustix::fs::FileType::RegularFile {
        return Ok(());
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidData,
        format!(
            "the index names {} a regular file, but {} holds a {} there; refusing to open it",
            rel.to_string_lossy(),
            dir.display(),
            kind_name(kind)
        ),
    ))
}

fn kind_name(k: rustix::fs::FileType) -> &'static str {
    use rustix::fs::FileType as T;
    match k {
        T::RegularFile => "regular file",
        T::Directory => "directory",
        T::Symlink => "symlink",
        T::Fifo => "FIFO",
        T::Socket => "socket",
        T::CharacterDevice => "character device",
        T::BlockDevice => "block device",
        T::Unknown => "file of unknown type",
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn tree() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("root/etc")).unwrap();
        std::fs::write(d.path().join("root/etc/passwd"), b"inside").unwrap();
        std::fs::write(d.path().join("secret"), b"outside").unwrap();
        d
    }

    #[test]
    fn a_regular_file_below_opens() {
        let d = tree();
        let mut s = String::new();
        open_beneath(&d.path().join("root"), b"etc/passwd")
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "inside");
    }

    /// Neither `..` nor a symlink (absolute, relative, in the middle or at
    /// the end) leads out, or anywhere at all.
    #[test]
    fn no_way_out_and_no_symlink() {
        let d = tree();
        let root = d.path().join("root");
        std::os::unix::fs::symlink(d.path().join("secret"), root.join("abs")).unwrap();
        std::os::unix::fs::symlink("passwd", root.join("etc/rel")).unwrap();
        std::os::unix::fs::symlink("etc", root.join("dirlink")).unwrap();
        for (rel, errno) in [
            (&b"../secret"[..], rustix::io::Errno::XDEV),
            (b"dirlink/passwd", rustix::io::Errno::LOOP),
        ] {
            let e = open_beneath(&root, rel).unwrap_err();
            assert_eq!(
                e.raw_os_error(),
                Some(errno.raw_os_error()),
                "{}: {e}",
                String::from_utf8_lossy(rel)
            );
        }
        // A trailing symlink is the symlink itself (O_NOFOLLOW): refused as
        // one, never opened through.
        for rel in [&b"abs"[..], b"etc/rel"] {
            let e = open_beneath(&root, rel).unwrap_err();
            assert!(e.to_string().contains("holds a symlink"), "{e}");
        }
    }

    /// A FIFO is refused, and without blocking (a plain open would wait for
    /// a writer for good); a directory is refused too.
    #[test]
    fn a_fifo_or_a_directory_is_refused_unopened() {
        let d = tree();
        let root = d.path().join("root");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            root.join("fifo"),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let e = open_beneath(&root, b"fifo").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("holds a FIFO"), "{e}");
        let e = open_beneath(&root, b"etc").unwrap_err();
        assert!(e.to_string().contains("holds a directory"), "{e}");
    }

    #[test]
    fn directories_open_beneath_their_root_only() {
        let d = tree();
        let root = open_root(&d.path().join("root")).unwrap();
        let etc = openat_beneath(&root, "etc", OFlags::PATH | OFlags::DIRECTORY).unwrap();
        assert!(openat_beneath(&etc, "passwd", OFlags::RDONLY).is_ok());
        assert_eq!(
            openat_beneath(&etc, "../../secret", OFlags::RDONLY).unwrap_err(),
            rustix::io::Errno::XDEV
        );
    }
}
