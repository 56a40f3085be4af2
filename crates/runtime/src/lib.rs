//! Running a container from an image's config and an already-prepared root file system.
//!
//! This crate is the last step of `lazylayer run` and the tracing step of `optimize`:
//!
//! - [`write_bundle`] turns an OCI image config plus `docker run`-style overrides
//!   ([`RunSpec`]) into an OCI runtime bundle: Entrypoint + Cmd, Env, WorkingDir, User
//!   resolved against the image's own /etc/passwd and /etc/group, docker's default
//!   capabilities, mounts, masked paths and namespaces, and an `RLIMIT_NOFILE` equal to
//!   our own hard limit (root cannot raise rlimits on every host).
//! - [`ContainerBuilder`] is the one container start: an overlay over read-only
//!   lowers, a bundle, runc; the [`RunningContainer`] it gives is killed, deleted,
//!   unmounted and its directories removed on drop, in that order.
//! - [`Runc`] starts the bundle with `runc run` in the foreground; the [`Container`] it
//!   returns is a value whose drop kills the container and deletes runc's state.
//! - [`wait_ready`] waits for a [`WaitCondition`]: exit, a TCP port accepting inside
//!   the container's network namespace, a log line, or a time.
//! - [`OverlayMount`] is a kernel overlayfs mount, unmounted on drop: a writable
//!   container root on top of read-only lower directories.
//! - [`ContainerDir`] is a container's directory and record; its `reap_orphans`
//!   clears containers whose `lazylayer run` was killed outright.
//!
//! What it deliberately does not do: pull or unpack images (the store does), serve a
//! lazy file system (the FUSE crate does; this crate only mounts overlayfs on top of
//! whatever directories it is given), set up networking beyond "none" and "host",
//! apply a seccomp profile, use user namespaces, or speak to crun (it refuses
//! hybrid cgroup hosts) or containerd.

mod bundle;
mod container;
mod error;
mod mounts;
mod overlay;
mod ready;
mod runc;
mod signals;
mod state;
mod user;

pub use bundle::{validate_id, write_bundle, NetworkMode, RunSpec};
pub use container::{ContainerBuilder, RunningContainer};
pub use error::RuntimeError;
pub use mounts::{mounts_below, unmount_below};
pub use overlay::OverlayMount;
pub use ready::{wait_ready, Readiness, WaitCondition};
pub use runc::{Container, Killer, Runc, Stdio};
pub use signals::{signal_name, ForwardedSignals};
pub use state::{process_start_time, ContainerDir, ContainerState, ContainerStatus, Reaped};
