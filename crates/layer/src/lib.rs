//! The layer codec: OCI layer tar streams (plain, gzip, zstd) in and out.
//!
//! # On-disk layer format
//!
//! [`extract`] turns one layer into one directory that serves as an overlayfs
//! *lower* layer, the way containerd's overlay snapshotter stores layers:
//!
//! | in the tar (OCI image spec)  | on disk                                          |
//! |------------------------------|--------------------------------------------------|
//! | `DIR/.wh.NAME`               | `DIR/NAME`: character device 0:0 (an overlayfs whiteout) |
//! | `DIR/.wh..wh..opq`           | xattr `trusted.overlay.opaque=y` on `DIR`         |
//! | any other `.wh..wh.*` name   | an ordinary entry of that name (lazylayer's boot index is one); an empty one carrying content in `LAZYLAYER.data` PAX records ([`metadata`]) gets that content |
//! | file, dir, symlink, hardlink, char/block device, fifo | the same, with mode (incl. setuid/setgid/sticky), uid/gid, mtime and `SCHILY.xattr.*` xattrs |
//!
//! Directories the archive implies but does not list are created 0755 root:root.
//! A later entry for a path replaces an earlier one (a directory replacing a
//! directory only updates its metadata). `trusted.overlay.*` xattrs carried in
//! the archive are ignored: only whiteout entries may produce overlayfs
//! metadata. Directory modes and mtimes are applied last, deepest first.
//!
//! # Safety rules for untrusted archives
//!
//! - Entry paths and hardlink targets must be relative, free of `..` and NUL;
//!   `./` prefixes and repeated slashes are normalised away ([`normalize`]).
//! - Nothing is resolved through a symlink: parents are opened with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)` and
//!   every entry is created relative to that fd, never following its final
//!   name. A path through a symlink is an error, as is a hardlink whose target
//!   is outside the layer, missing, or a directory. Symlink *targets* are
//!   stored verbatim: they are only ever resolved inside a container's root.
//! - Regular files are always created fresh (`O_CREAT|O_EXCL|O_NOFOLLOW` after
//!   removing what was there), so an earlier device node or symlink at the same
//!   path is never opened for writing.
//! - [`ExtractOptions`] caps total data and entry count, checked before data
//!   is written; extended headers are capped too. A stream cut inside an
//!   entry is an error, never a short file.
//!
//! On any error the half-written directory is the caller's to delete; nothing
//! outside it has been touched.
//!
//! # Building
//!
//! [`LayerWriter`] writes deterministic layers (ustar + PAX only where needed,
//! gzip with mtime 0 and a fixed OS byte) and returns the blob digest and
//! diff_id together.

mod beneath;
pub mod chunked;
mod compression;
mod error;
mod extract;
pub mod metadata;
mod path;
mod spans;
mod writer;

pub use compression::{decoder, Compression};
pub use error::LayerError;
pub use extract::{extract, EntryEvent, EntryKind, ExtractOptions, ExtractStats};
pub use path::{normalize, OPAQUE_MARKER, WHITEOUT_META_PREFIX, WHITEOUT_PREFIX};
pub use spans::{data_spans, DataSpan};
pub use writer::{LayerDigests, LayerWriter};

/// xattrs as (name, value) byte strings.
pub(crate) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;
