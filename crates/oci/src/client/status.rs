//! Reading a registry's answers: a header as text, the error for a status, bounded reads of
//! bodies, and the shortened error body shown in messages.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{AsHeaderName, HeaderMap};
use reqwest::{Response, StatusCode};

use crate::error::{OciError, Result};

use super::RegistryClient;

/// A header of an answer as text: None when it is absent or not visible
/// ASCII (outside input, read as such).
pub(super) fn header_text(headers: &HeaderMap, name: impl AsHeaderName) -> Option<&str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

pub(super) fn status_error(
    what: &str,
    registry: &str,
    status: StatusCode,
    body: String,
) -> OciError {
    let code = status.as_u16();
    match status {
        StatusCode::NOT_FOUND => OciError::NotFound {
            what: what.into(),
            registry: registry.into(),
            status: code,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::Unauthorized {
            what: what.into(),
            registry: registry.into(),
            status: code,
            hint: String::new(),
        },
        _ => OciError::Status {
            what: what.into(),
            registry: registry.into(),
            status: code,
            body,
        },
    }
}

/// The error for `resp`'s status (not one the caller accepts), with the
/// start of its body.
pub(super) async fn status_failure(what: &str, registry: &str, resp: Response) -> OciError {
    let status = resp.status();
    status_error(
        what,
        registry,
        status,
        RegistryClient::body_text(resp).await,
    )
}

/// `resp` when `accepted` takes its status, else the error for it.
pub(super) async fn expect_status(
    what: &str,
    registry: &str,
    resp: Response,
    accepted: impl Fn(StatusCode) -> bool,
) -> Result<Response> {
    if accepted(resp.status()) {
        Ok(resp)
    } else {
        Err(status_failure(what, registry, resp).await)
    }
}

/// Most of an error body that is read: enough for a registry's JSON error,
/// while an endless body (hostile or broken server) cannot fill memory.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// How much of an error body goes into the message.
const SHOWN_ERROR_BODY: usize = 300;
/// Longest time spent reading an error body: one trickling byte by byte
/// must not hold the error back.
const ERROR_BODY_TIME: Duration = Duration::from_secs(5);

/// An error body as shown in a message: its first characters, and a note
/// when it was longer or was cut off while reading.
fn shown_body(body: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(body);
    let mut shown: String = text.chars().take(SHOWN_ERROR_BODY).collect();
    if cut {
        shown.push_str(&format!(
            " … (body cut: read only its first {} bytes)",
            body.len()
        ));
    } else if shown.len() < text.len() {
        shown.push_str(&format!(" … ({} bytes in all)", body.len()));
    }
    shown
}

pub(super) fn retryable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

impl RegistryClient {
    pub(super) async fn read_limited(
        what: &str,
        registry: &str,
        resp: Response,
        limit: u64,
    ) -> Result<Bytes> {
        if let Some(len) = resp.content_length() {
            if len > limit {
                return Err(OciError::TooLarge {
                    what: what.into(),
                    size: len,
                    limit,
                });
            }
        }
        let mut out = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(c) = s.next().await {
            let c = c.map_err(|e| OciError::Http {
                what: what.into(),
                registry: registry.into(),
                source: e,
            })?;
            if out.len() as u64 + c.len() as u64 > limit {
                return Err(OciError::TooLarge {
                    what: what.into(),
                    size: out.len() as u64 + c.len() as u64,
                    limit,
                });
            }
            out.extend_from_slice(&c);
        }
        Ok(Bytes::from(out))
    }

    /// The start of an error response's body for the message, read with a
    /// size and time limit; says so when the body was cut.
    pub(super) async fn body_text(resp: Response) -> String {
        let mut out = Vec::new();
        let mut cut = false;
        let deadline = tokio::time::Instant::now() + ERROR_BODY_TIME;
        let mut s = resp.bytes_stream();
        loop {
            match tokio::time::timeout_at(deadline, s.next()).await {
                Ok(Some(Ok(c))) => {
                    let room = MAX_ERROR_BODY - out.len();
                    if c.len() >= room {
                        // At the limit: whatever follows is not read.
                        out.extend_from_slice(&c[..room]);
                        cut = true;
                        break;
                    }
                    out.extend_from_slice(&c);
                }
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        // Dropping the stream closes the connection: the rest is never read.
        drop(s);
        shown_body(&out, cut)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_are_shortened_and_cuts_said() {
        assert_eq!(shown_body(b"oops", false), "oops");
        let long = vec![b'x'; 1000];
        let s = shown_body(&long, false);
        assert!(s.starts_with(&"x".repeat(SHOWN_ERROR_BODY)));
        assert!(s.ends_with("(1000 bytes in all)"), "{s}");
        let s = shown_body(&long, true);
        assert!(
            s.ends_with("(body cut: read only its first 1000 bytes)"),
            "{s}"
        );
    }

    /// A registry's answer with `status` and `body`, built in memory.
    fn answer(status: u16, body: &'static str) -> Response {
        Response::from(http::Response::builder().status(status).body(body).unwrap())
    }

    #[tokio::test]
    async fn an_accepted_answer_is_handed_back() {
        let resp = expect_status("manifest of r/x", "reg", answer(201, "{}"), |s| {
            s.is_success()
        })
        .await
        .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    }

    #[tokio::test]
    async fn a_refused_answer_becomes_the_error_for_its_status() {
        let only_202 = |s| s == StatusCode::ACCEPTED;
        let e = expect_status("push of r/x", "reg", answer(200, ""), only_202)
            .await
            .unwrap_err();
        assert!(matches!(e, OciError::Status { status: 200, .. }), "{e}");

        let e = status_failure("blob b of r/x", "reg", answer(404, "gone")).await;
        assert!(
            matches!(&e, OciError::NotFound { status: 404, registry, .. } if registry == "reg"),
            "{e}"
        );
        for code in [401, 403] {
            let e = status_failure("blob b of r/x", "reg", answer(code, "")).await;
            assert!(
                matches!(e, OciError::Unauthorized { status, .. } if status == code),
                "{e}"
            );
        }
        let e = status_failure("blob b of r/x", "reg", answer(500, "{\"errors\":[]}")).await;
        assert_eq!(
            e.to_string(),
            "blob b of r/x: registry reg answered 500: {\"errors\":[]}"
        );
    }

    #[tokio::test]
    async fn an_endless_error_body_is_read_only_up_to_the_limit() {
        let huge: &'static str = "y".repeat(MAX_ERROR_BODY * 3).leak();
        let e = status_failure("manifest of r/x", "reg", answer(502, huge)).await;
        let OciError::Status { body, .. } = e else {
            panic!("{e}")
        };
        assert!(body.starts_with(&"y".repeat(SHOWN_ERROR_BODY)), "{body}");
        assert!(
            body.ends_with(&format!(
                "(body cut: read only its first {MAX_ERROR_BODY} bytes)"
            )),
            "{body}"
        );
    }
}
