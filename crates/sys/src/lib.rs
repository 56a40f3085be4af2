//! What the other crates need from the host, written once.
//!
//! Each small job has one module here, named after what it holds, and no
//! lazylayer crate below it: every crate may depend on this one.
//!
//! - [`mountinfo`]: `/proc/self/mountinfo`, parsed with its `\ooo` escapes
//!   undone.
//! - [`beneath`]: opening a path below a directory with `openat2`, never
//!   through a symlink and never out of the directory.
//! - [`durable`]: writes that survive a crash and a power loss.
//! - [`error`]: an error with its causes on one line, and the
//!   `{what} {path}: {source}` I/O error the crates' own errors wrap.
//! - [`digest`]: the `sha256:<hex>` text of a hash.
//! - [`size`]: a byte count as people read it.
//! - [`range_lock`]: byte-range locks between processes (one chunk each).
//! - [`death_watch`]: a FUSE mount force-unmounted when the process that
//!   serves it dies, so that none of its own waits on it outlives it.
//! - [`socket`]: a unix socket private to its owner.

pub mod beneath;
pub mod death_watch;
pub mod digest;
pub mod durable;
pub mod error;
pub mod mountinfo;
pub mod range_lock;
pub mod size;
pub mod socket;

pub use digest::{sha256_digest, sha256_digest_of};
pub use error::{error_chain, IoError};
pub use size::ByteSize;
