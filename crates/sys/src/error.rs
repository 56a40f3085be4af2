//! Errors as the crates report them: a chain of causes on one line, and the
//! I/O failure that names what was being done and on which path.

use std::path::{Path, PathBuf};

/// An error and its causes on one line (for logs, gRPC messages and
/// reports).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    chain(e, false)
}

/// [`error_chain`] leaving out a cause whose text the line already holds:
/// for errors that repeat their cause in their own message (hyper's and
/// reqwest's do), so that a short line (a breaker's reason) says it once.
pub fn error_chain_without_repeats(e: &dyn std::error::Error) -> String {
    chain(e, true)
}

fn chain(e: &dyn std::error::Error, skip_repeats: bool) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let text = cause.to_string();
        if !(skip_repeats && out.contains(&text)) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = cause.source();
    }
    out
}

/// An I/O operation that failed: what was being done, on which path. The
/// message leaves the cause to [`error_chain`] (it is the `source`).
#[derive(Debug, thiserror::Error)]
#[error("{what} ({})", path.display())]
pub struct IoError {
    pub what: String,
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl IoError {
    /// A `map_err` closure: `.map_err(IoError::on("reading", &path))`. It
    /// owns copies of both, so it borrows nothing from the caller (a helper
    /// can return it).
    pub fn on(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> IoError {
        let (what, path) = (what.to_string(), path.to_path_buf());
        move |source| IoError { what, path, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_the_line_already_says_is_left_out_only_when_asked() {
        #[derive(Debug, thiserror::Error)]
        #[error("connection refused")]
        struct Refused;
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request: connection refused")]
        struct Sending(#[source] Refused);
        assert_eq!(
            error_chain_without_repeats(&Sending(Refused)),
            "error sending request: connection refused"
        );
        assert_eq!(
            error_chain(&Sending(Refused)),
            "error sending request: connection refused: connection refused"
        );
    }

    #[test]
    fn a_chain_names_every_cause_in_order() {
        let inner = IoError::on("reading the record", Path::new("/s/a b.json"))(
            std::io::Error::new(std::io::ErrorKind::NotFound, "gone"),
        );
        assert_eq!(inner.to_string(), "reading the record (/s/a b.json)");
        assert_eq!(
            error_chain(&inner),
            "reading the record (/s/a b.json): gone"
        );
        #[derive(Debug, thiserror::Error)]
        #[error("starting the container")]
        struct Outer(#[source] IoError);
        assert_eq!(
            error_chain(&Outer(inner)),
            "starting the container: reading the record (/s/a b.json): gone"
        );
    }
}
