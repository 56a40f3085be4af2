//! The pull manager and the lazy content source.
//!
//! [`LayerFetcher`] owns the fetch of every layer of one image: a layer is
//! fetched once however many readers wait for it, readers' requests start a
//! fetch at once, and a background prefetch takes the rest with bounded
//! concurrency. Layers stream through the store's pipeline (download →
//! verify → decompress → extract), and each file becomes readable as soon as
//! its tar entry is on disk. A reader waits only for *its* file, and never
//! longer than a bound: then it gets EIO.
//!
//! [`LazyImage`] opens an optimized image: resolve it, fetch its boot layer,
//! load the index. [`LazyRoot`] is what `run`, the containerd snapshotter and
//! the Podman store use: the image pinned, mounted through the FUSE file
//! system, prefetched once the start has settled, recorded once complete,
//! and all of it undone on drop.

mod bandwidth;
mod boot;
mod fetcher;
mod image_root;
mod lazy;
mod local;
mod root;
mod span;
mod tasks;

pub use bandwidth::Bandwidth;
pub use boot::{reap_chunk_caches, BootChunks};
pub use fetcher::{FetchOptions, LayerFetcher, LayerState, LayerStatus};
pub use image_root::ImageRoot;
pub use lazy::{LazyImage, LazySource, OpenError};
pub use local::{holds_index, index_mask, is_optimized, local_image, stacked_lowers};
pub use root::{LazyRoot, MountOptions, RootProgress};
pub use span::MAX_SPAN_FILE;

/// Background prefetch of a lazily started container waits until its start
/// has settled: file-system requests stopped for this long...
pub const PREFETCH_QUIET: std::time::Duration = std::time::Duration::from_millis(200);
/// ...or this long after the mount at the latest.
pub const PREFETCH_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Store(#[from] lazylayer_store::StoreError),
    #[error(transparent)]
    Oci(#[from] lazylayer_oci::OciError),
    #[error(transparent)]
    Fs(#[from] lazylayer_fs::FsError),
    #[error("boot index of {image}")]
    Index {
        image: String,
        #[source]
        source: lazylayer_index::IndexError,
    },
    #[error("{image}: {reason}")]
    BadImage { image: String, reason: String },
    #[error("{what} ({path})")]
    Io {
        what: String,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether a layer fetch failed because the registry could not be reached
/// (worth trying again once it can), not because of what it sent.
pub(crate) fn is_network(e: &lazylayer_store::StoreError) -> bool {
    matches!(e, lazylayer_store::StoreError::Oci(o) if o.is_network())
}

/// The metrics' word for why a layer fetch failed.
pub(crate) fn error_cause(e: &lazylayer_store::StoreError) -> lazylayer_metrics::FetchErrorCause {
    use lazylayer_metrics::FetchErrorCause as C;
    use lazylayer_oci::OciError as O;
    use lazylayer_store::StoreError as S;
    match e {
        S::Io(_) => C::Disk,
        S::Layer { .. } | S::BadImage { .. } => C::Content,
        S::DiffIdMismatch { .. } => C::Digest,
        S::Worker { .. } => C::Other,
        S::Oci(o) => match o {
            O::DigestMismatch { .. } | O::SizeMismatch { .. } | O::TooLarge { .. } => C::Digest,
            O::NotFound { .. } | O::Unauthorized { .. } | O::Status { .. } | O::Auth { .. } => {
                C::Status
            }
            O::NoAnswer { .. } => C::Timeout,
            O::Interrupted { reason, .. }
                if reason.starts_with("no data") || reason.starts_with("only") =>
            {
                C::Timeout
            }
            O::Interrupted { .. } | O::Http { .. } | O::Unreachable { .. } => C::Connection,
            O::Io { .. } => C::Disk,
            _ => C::Other,
        },
    }
}
