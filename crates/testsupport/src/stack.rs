//! The container stacks a test runs against: the host's packages (Debian
//! 12: containerd 1.6, Podman 4.3) or today's (Debian sid: containerd 2.1,
//! Podman 5.8), the latter in a root of their own that `scripts/stack.sh`
//! builds and mounts (`build`, `up`) and `scripts/test.sh` brings up for the
//! suite. A test of the sid stack skips when it is not up, and fails so
//! under `CI`.
//!
//! Programs of the sid stack run through `chroot`: they share this host's
//! network and mount namespace, so what both sides must reach (a scratch
//! directory, a socket, the mounts made below it) lives in the stack's
//! shared directory, which is the same path inside the root and out.

use std::path::PathBuf;
use std::process::Command;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stack {
    /// The host's containerd, ctr, podman and runc.
    Bookworm,
    /// Debian sid's, in the root of `scripts/stack.sh`.
    Sid,
}

impl Stack {
    pub fn name(self) -> &'static str {
        match self {
            Stack::Bookworm => "bookworm",
            Stack::Sid => "sid",
        }
    }

    /// True when the stack can be used; else the test is skipped with the
    /// reason printed (under `CI` it fails: [`crate::skip_because`]).
    pub fn ready(self, test: &str) -> bool {
        match self {
            Stack::Bookworm => true,
            Stack::Sid => {
                let (root, shared) = (sid_root(), sid_shared());
                let up = root.join(".lazylayer-stack").is_file()
                    && crate::is_mount_point(&root.join(shared.strip_prefix("/").unwrap()));
                up || !crate::skip_because(&format!(
                    "{test} needs the sid stack up at {} (scripts/stack.sh build && scripts/stack.sh up)",
                    root.display()
                ))
            }
        }
    }

    /// `program` of this stack, to be given arguments.
    pub fn command(self, program: &str) -> Command {
        match self {
            Stack::Bookworm => Command::new(program),
            Stack::Sid => {
                let mut c = Command::new("chroot");
                c.arg(sid_root()).arg(program);
                c
            }
        }
    }

    /// Where this process finds `path` as the stack's programs name it.
    /// Below the shared directory the two are the same path, except below
    /// a mount a program made private (containers-storage makes its
    /// driver's directory a private mount, so a container's root Podman
    /// mounts there is seen only through the stack's root).
    pub fn host_view(self, path: &std::path::Path) -> PathBuf {
        match self {
            Stack::Bookworm => path.to_path_buf(),
            Stack::Sid => sid_root().join(path.strip_prefix("/").unwrap_or(path)),
        }
    }

    /// A scratch directory this process and the stack's programs both see
    /// at its path (with the mounts made below it, by either side).
    pub fn tempdir(self) -> tempfile::TempDir {
        match self {
            Stack::Bookworm => tempfile::tempdir().unwrap(),
            Stack::Sid => tempfile::tempdir_in(sid_shared()).unwrap(),
        }
    }
}

fn sid_root() -> PathBuf {
    std::env::var_os("LAZYLAYER_SID_ROOT")
        .map_or_else(|| "/var/cache/lazylayer/sid-root".into(), PathBuf::from)
}

fn sid_shared() -> PathBuf {
    std::env::var_os("LAZYLAYER_SID_SHARED")
        .map_or_else(|| "/tmp/lazylayer-sid".into(), PathBuf::from)
}

/// Each test named here runs once per Podman: `NAME::bookworm` (Debian
/// 12's 4.3) and `NAME::sid` (5.8, in the root of scripts/stack.sh); `NAME`
/// is a function of the calling module taking the [`Stack`].
#[macro_export]
macro_rules! on_each_podman {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[test]
            fn bookworm() {
                super::$name($crate::Stack::Bookworm)
            }
            #[test]
            fn sid() {
                super::$name($crate::Stack::Sid)
            }
        }
    )*};
}
