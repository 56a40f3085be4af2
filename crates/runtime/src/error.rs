use std::path::PathBuf;
use std::time::Duration;

/// Every failure of this crate, naming the container, path or command involved.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid container id {id:?}: {reason}")]
    InvalidId { id: String, reason: &'static str },

    /// The image config plus overrides cannot make a runnable process.
    #[error("container {id}: {reason}")]
    Config { id: String, reason: String },

    #[error("container {id}: user {user:?}: {reason}")]
    User {
        id: String,
        user: String,
        reason: String,
    },

    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("container {id}: cannot run `{command}`")]
    Spawn {
        id: String,
        command: String,
        #[source]
        source: std::io::Error,
    },

    /// runc ran but reported failure; `message` is its own error text.
    #[error("container {id}: `{command}` failed ({status}): {message}")]
    Runc {
        id: String,
        command: String,
        status: String,
        message: String,
    },

    #[error("container {id}: {condition} not reached within {timeout:?}")]
    Timeout {
        id: String,
        condition: String,
        timeout: Duration,
    },

    #[error("container {id}: cannot wait for {condition}: {reason}")]
    Readiness {
        id: String,
        condition: String,
        reason: String,
    },

    #[error("invalid wait condition {input:?}: {reason}")]
    WaitCondition { input: String, reason: String },

    #[error("overlay mount on {target}: {reason}")]
    Mount { target: PathBuf, reason: String },
}

impl RuntimeError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        RuntimeError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
