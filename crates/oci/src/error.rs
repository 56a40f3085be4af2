use crate::digest::Digest;
use lazylayer_sys::ByteSize;

/// Errors of the registry client and the format types. Each names the image,
/// repository or blob it concerns.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("invalid image reference {reference:?}: {reason}")]
    InvalidReference { reference: String, reason: String },
    #[error("invalid digest {digest:?}: {reason}")]
    InvalidDigest { digest: String, reason: String },
    #[error("{what} {expected}: content has digest {actual} (corrupt or tampered data)")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("{what}: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        what: String,
        expected: u64,
        actual: u64,
    },
    #[error("{what}: not found on {registry} ({status})")]
    NotFound {
        what: String,
        registry: String,
        status: u16,
    },
    #[error("{what}: access denied by {registry} ({status}){hint}")]
    Unauthorized {
        what: String,
        registry: String,
        status: u16,
        hint: String,
    },
    #[error("{what}: registry {registry} answered {status}: {body}")]
    Status {
        what: String,
        registry: String,
        status: u16,
        body: String,
    },
    #[error("{what}: cannot reach registry {registry}")]
    Http {
        what: String,
        registry: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{what}: unsupported or malformed manifest: {reason}")]
    BadManifest { what: String, reason: String },
    #[error("{what}: no manifest for platform {platform} (available: {available})")]
    NoPlatform {
        what: String,
        platform: String,
        available: String,
    },
    #[error("{what}: authentication failed: {reason}")]
    Auth { what: String, reason: String },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: download consumer stopped")]
    ConsumerGone { what: String },
    #[error(
        "registry {registry} stopped sending {what} at {} of {} ({reason}); tried {tries} times",
        ByteSize(*at),
        total.map_or_else(|| "?".into(), |t| ByteSize(t).to_string())
    )]
    Interrupted {
        what: String,
        registry: String,
        /// Bytes of the blob received.
        at: u64,
        total: Option<u64>,
        /// Why the last try ended.
        reason: String,
        tries: u32,
    },
    #[error("registry {registry} did not answer the request for {what} within {secs:.0} s; tried {tries} times")]
    NoAnswer {
        what: String,
        registry: String,
        secs: f64,
        tries: u32,
    },
    /// The host's breaker is open (see `breaker`): not asked at all.
    #[error(
        "{what}: registry {registry} unreachable for {} s (network failure: {cause}); {}",
        down_for.as_secs(),
        next_probe(retry_in)
    )]
    Unreachable {
        what: String,
        registry: String,
        down_for: std::time::Duration,
        /// Why the host's last try failed.
        cause: String,
        retry_in: std::time::Duration,
    },
    #[error("{path}: {reason}")]
    Config { path: String, reason: String },
    #[error("{registry} is blocked in {path}: refusing to pull from it")]
    Blocked { registry: String, path: String },
    #[error(
        "no host configured to {purpose} images of {registry} (see its hosts.toml capabilities)"
    )]
    NoHost { registry: String, purpose: String },
    #[error("{what}: larger than the limit of {limit} bytes (at least {size}); refused")]
    TooLarge { what: String, size: u64, limit: u64 },
}

/// When an open breaker's host is asked again, in words.
fn next_probe(retry_in: &std::time::Duration) -> String {
    let secs = retry_in.as_secs_f64().ceil();
    if secs < 1.0 {
        "probing it now".into()
    } else {
        format!("next probe in {secs} s")
    }
}

impl OciError {
    /// The registry could not be reached or stopped answering (refused or
    /// broken connections, no answer, a stalled download, its breaker
    /// open), as opposed to answering with an error or with bad bytes.
    pub fn is_network(&self) -> bool {
        matches!(
            self,
            OciError::Http { .. }
                | OciError::NoAnswer { .. }
                | OciError::Interrupted { .. }
                | OciError::Unreachable { .. }
        )
    }

    /// Whether the registry wants credentials this client does not have
    /// (or refused those it sent): worth trying again once some arrive.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, OciError::Unauthorized { .. } | OciError::Auth { .. })
    }
}

pub type Result<T, E = OciError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interrupted_download_says_how_far_it_got() {
        let e = OciError::Interrupted {
            what: "blob sha256:ab of r/x".into(),
            registry: "r.example".into(),
            at: 1500,
            total: None,
            reason: "response ended early".into(),
            tries: 2,
        };
        assert_eq!(
            e.to_string(),
            "registry r.example stopped sending blob sha256:ab of r/x at 1.5 kB of ? (response ended early); tried 2 times"
        );
    }
}
