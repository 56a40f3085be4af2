use std::path::PathBuf;

use lazylayer_oci::{Digest, OciError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{what} ({path})")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
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
