//! lazylayer's FUSE file system.
//!
//! It serves the *merged* root file system of an image, read-only, from a
//! [`BootIndex`]: every stat, readdir, readlink, getxattr and "no such file"
//! is answered from the index alone. Only opening a file's content goes to a
//! [`ContentSource`], which decides where the bytes come from:
//!
//! * trace mode (`optimize`): the image's extracted layers, all local, while a
//!   [`Trace`] records every path the workload touches, in first-access order;
//! * boot-only mode: only the boot layer; any other content is a violation
//!   (proves a boot layer is complete);
//! * lazy mode (`run`): the boot layer first, else the one layer holding the
//!   path, fetched on demand, with a bounded wait that ends in EIO.
//!
//! A kernel overlayfs is mounted on top by the caller for the container's writes.

// FUSE passthrough: wrapping and closing backing ids.
#[allow(unsafe_code)]
mod filesystem;
// The stub tree of a lazy root that overlayfs reads (metacopy + redirect).
pub mod meta_tree;
pub mod stub_image;
// The holder's pre_exec (setsid in the child).
#[allow(unsafe_code)]
pub mod holder;
mod mount;
pub mod panics;
mod pool;
pub mod source;
// The open table: a shared memfd mapping read through atomics.
#[allow(unsafe_code)]
mod table;
mod trace;

pub use filesystem::{FsOptions, FsStats, LazyFs, OpensSwitch};
pub use holder::{Held, Holder};
pub use meta_tree::{DataView, MetaTreeError, TreeStats};
pub use mount::FsMount;
pub use panics::panic_message;
pub use source::{BootOnlySource, Content, ContentSource, LayerDirSource, RangedContent};
pub use trace::{Access, Trace, TraceEvent, TraceFile, TraceRead};

/// Readahead of files read through the daemon while tracing, and of a lazy
/// root served from a chunked boot layer: the same limit in both, so a start
/// asks for the chunks its trace saw. One page, i.e. none: every byte read
/// ahead of the program at start is a byte fetched before it can go on.
/// Measured on python3 (docs/index-format.md): with 32 KiB the trace read
/// 11.2 MB and a start fetched 5.1 MB; with none, 8.1 MB and 4.3 MB.
pub const BOOT_READAHEAD: u32 = 4 << 10;

/// Errors of mounting and of trace files.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("mounting the lazylayer file system at {path}")]
    Mount {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace file {path}")]
    TraceFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trace file {path}: {reason}")]
    BadTrace {
        path: std::path::PathBuf,
        reason: String,
    },
}
