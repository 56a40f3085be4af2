use std::path::PathBuf;

use lazylayer_sys::IoError;

/// What went wrong, with the snapshot or path it concerns. Each variant maps
/// to the gRPC status containerd expects (see `grpc::status`).
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {0:?} does not exist")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    #[error("snapshot {key:?}: {reason}")]
    FailedPrecondition { key: String, reason: String },
    #[error("{0}")]
    InvalidArgument(String),
    /// `{what} ({path})`, the cause as its source.
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("snapshot metadata {path}")]
    Metadata {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// A panic while serving a call: that call fails, the server goes on.
    #[error("internal error: {0}")]
    Internal(String),
    #[error("image {image}")]
    Image {
        image: String,
        #[source]
        source: Box<lazylayer_fetch::FetchError>,
    },
}

pub type Result<T, E = SnapshotError> = std::result::Result<T, E>;

pub(crate) fn io(
    what: impl Into<String>,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let (what, path) = (what.into(), path.to_path_buf());
    move |source| SnapshotError::Io(IoError { what, path, source })
}
