use lazylayer_oci::{Digest, OciError};
use lazylayer_sys::IoError;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// `{what} ({path})`, the cause as its source.
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Oci(#[from] OciError),
    #[error("layer {digest}")]
    Layer {
        digest: Digest,
        #[source]
        source: lazylayer_layer::LayerError,
    },
    #[error("layer {digest}: uncompressed content has digest {actual}, but the image config says {expected}")]
    DiffIdMismatch {
        digest: Digest,
        expected: Digest,
        actual: Digest,
    },
    #[error("{reference}: {reason}")]
    BadImage { reference: String, reason: String },
    #[error("{what}: worker failed: {reason}")]
    Worker { what: String, reason: String },
}
