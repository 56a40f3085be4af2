//! An image's root for a container, lazy or local.
//!
//! [`LazyImage`] opens an optimized image, or a plain one with a boot layer
//! attached to it ([`attached`]): resolve it, fetch its boot layer's index. [`LazyRoot`] is what `run`, the containerd snapshotter and
//! the Podman store use: the image pinned, mounted through the FUSE file
//! system, prefetched once the start has settled, recorded once complete,
//! and all of it undone on drop. An image the store holds whole needs no
//! FUSE: its layers are stacked by overlayfs ([`stacked_lowers`]), and
//! [`ImageRoot`] picks between the two.
//!
//! The fetching itself (layers, boot chunks, ranges) is `lazylayer_fetch`'s.

mod annotations;
pub mod attached;
mod image_root;
mod lazy;
mod local;
mod meta;
mod root;

pub use image_root::ImageRoot;
pub use lazy::{LazyImage, NoBootLayer, OpenError};
pub use local::{holds_index, index_mask, is_optimized, local_image, stacked_lowers};
pub use meta::kernel_has_data_only_layers;
pub use root::{LazyRoot, MountOptions, RootProgress, Stack};

/// Background prefetch of a lazily started container waits until its start
/// has settled: file-system requests stopped for this long...
pub const PREFETCH_QUIET: std::time::Duration = std::time::Duration::from_millis(200);
/// ...or this long after the mount at the latest.
pub const PREFETCH_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// An image that is not what a lazy start needs, and why.
pub(crate) fn bad(
    image: &lazylayer_oci::Reference,
    reason: impl Into<String>,
) -> lazylayer_fetch::FetchError {
    lazylayer_fetch::FetchError::BadImage {
        image: image.to_string(),
        reason: reason.into(),
    }
}
