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
//! [`BootChunks`] fetches a chunked boot layer by ranges, and [`LazySource`]
//! serves the lazy file system's content from all of these. Mounting them
//! as an image's root is `lazylayer_root`'s.

mod bandwidth;
mod boot;
mod digests;
mod fetcher;
mod source;
mod span;
mod tasks;

pub use bandwidth::Bandwidth;
pub use boot::{
    connections_to_open, note_registry_round_trip, reap_chunk_caches, BootBlob, BootChunks,
    BootRegion, ChunkedBoot, CONNECTIONS_WHILE_WAITING,
};
pub use fetcher::{FetchOptions, LayerFetcher, LayerState, LayerStatus};
pub use source::{BootContentSource, LazySource};
pub use span::{SeekIndexes, MAX_SPAN_FILE};

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
    #[error(transparent)]
    Io(#[from] lazylayer_sys::IoError),
}

impl FetchError {
    /// Whether the registry refused for want of credentials (see
    /// [`lazylayer_oci::OciError::is_unauthorized`]).
    pub fn is_unauthorized(&self) -> bool {
        match self {
            FetchError::Oci(o) | FetchError::Store(lazylayer_store::StoreError::Oci(o)) => {
                o.is_unauthorized()
            }
            _ => false,
        }
    }
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
