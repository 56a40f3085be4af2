//! Byte ranges of blobs (HTTP Range), streamed or read into memory.

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};

use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::hosts::{Endpoint, Purpose};
use crate::reference::Repository;

use super::failover::fails_over;
use super::resuming_body::ResumingBody;
use super::status::{header_text, status_failure};
use super::{BodyStream, RegistryClient};

impl RegistryClient {
    /// Read `len` bytes of a blob from `start`. Uses HTTP Range; when the
    /// server answers 200 instead of 206 the prefix is read and discarded
    /// (docker-registry as a pull-through mirror does so for a blob it has
    /// not cached yet). A broken response resumes on the next host.
    /// A range cannot be digest-verified on its own: callers check what it holds.
    pub async fn get_blob_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Bytes> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        if len == 0 {
            return Ok(Bytes::new());
        }
        let (ranged, mut body) = self.blob_range_stream(repo, digest, start, len).await?;
        let skip = if ranged { 0 } else { start };
        let mut out = Vec::with_capacity(len as usize);
        let mut seen = 0u64;
        while let Some(c) = body.next().await {
            let c = c?;
            let c_start = seen;
            seen += c.len() as u64;
            if seen <= skip {
                continue;
            }
            let from = skip.saturating_sub(c_start) as usize;
            let want = (len as usize) - out.len();
            let take = (c.len() - from).min(want);
            out.extend_from_slice(&c[from..from + take]);
            if out.len() as u64 == len {
                break;
            }
        }
        if (out.len() as u64) < len {
            return Err(OciError::SizeMismatch {
                what,
                expected: len,
                actual: out.len() as u64,
            });
        }
        Ok(Bytes::from(out))
    }

    /// One GET of a blob from byte `from` (to `to`, inclusive, or the end)
    /// on `ep`: `(true, end)` for a 206 of exactly that start (`end`: one
    /// past its last byte), `(false, length)` for a 200 (the whole blob).
    pub(super) async fn open_range_at(
        &self,
        what: &str,
        repo: &Repository,
        ep: &Endpoint,
        digest: &Digest,
        from: u64,
        to: Option<u64>,
    ) -> Result<(bool, Option<u64>, Response)> {
        let url = ep.url(&format!("blobs/{digest}"));
        let range = match to {
            Some(to) => format!("bytes={from}-{to}"),
            None => format!("bytes={from}-"),
        };
        let resp = self
            .send(what, repo, ep, &[Self::pull_scope(ep)], true, &|c| {
                c.get(url.clone()).header(RANGE, range.clone())
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = header_text(resp.headers(), CONTENT_RANGE)
                    .unwrap_or("")
                    .to_string();
                match range_end(&cr, from) {
                    Some(end) => Ok((true, Some(end), resp)),
                    None => Err(OciError::Status {
                        what: what.into(),
                        registry: ep.label().into(),
                        status: 206,
                        body: format!("Content-Range {cr:?} is not the range asked for ({range})"),
                    }),
                }
            }
            StatusCode::OK => {
                let len = resp.content_length();
                Ok((false, len, resp))
            }
            _ => Err(status_failure(what, ep.label(), resp).await),
        }
    }

    /// GET bytes `[start, start + len)` of a blob with HTTP Range and hand
    /// back the body as it streams. `true`: the server sent that range (206
    /// with a matching Content-Range); `false`: it ignored Range and sends
    /// the whole blob from byte 0 (200), which the caller may use as a
    /// stream of everything. A response that breaks is resumed with Range
    /// on the next host, if any. Nothing is verified here: callers check
    /// what the bytes hold.
    pub async fn blob_range_stream(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<(bool, BodyStream)> {
        self.blob_range_stream_inner(repo, digest, start, len, false)
            .await
            .map(|(r, b)| (r, b.expect("a body unless range_only")))
    }

    /// With `range_only`, a mirror that answers 200 is passed over (its
    /// body unread) for the next host, and a 200 from the last host gives `None`.
    pub(super) async fn blob_range_stream_inner(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
        range_only: bool,
    ) -> Result<(bool, Option<BodyStream>)> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        let eps = self.endpoints(repo, Purpose::Pull)?;
        let to = start + len.max(1) - 1;
        let mut host = 0;
        loop {
            let ep = &eps[host];
            let last = host + 1 == eps.len();
            let opened = self
                .open_range_at(&what, repo, ep, digest, start, Some(to))
                .await;
            let e = match opened {
                Ok((false, _, _)) if range_only && last => return Ok((false, None)),
                Ok((false, _, resp)) if range_only => {
                    drop(resp);
                    OciError::Status {
                        what: what.clone(),
                        registry: ep.label().into(),
                        status: 200,
                        body: "the whole blob instead of the range asked for (a mirror that has not cached it yet)".into(),
                    }
                }
                Ok((ranged, end, resp)) => {
                    tracing::debug!(%what, host = %ep.label(), ranged, "range served");
                    let state = ResumingBody {
                        client: self.clone(),
                        what,
                        repo: repo.clone(),
                        digest: digest.clone(),
                        eps,
                        host,
                        pos: if ranged { start } else { 0 },
                        end,
                        skip: 0,
                        body: Some(Box::pin(resp.bytes_stream())),
                    };
                    return Ok((ranged, Some(state.into_stream())));
                }
                Err(e) => e,
            };
            if last || !fails_over(&e) {
                return Err(e);
            }
            tracing::warn!(%what, host = %ep.label(), source = %ep.source, error = %e, "host failed; trying the next one");
            self.note_failure(ep, &e);
            host += 1;
        }
    }

    /// `len` bytes of a blob from `start` for callers that want the range or
    /// nothing: `None` when the registry ignores Range (answers 200), whose
    /// body is then not read. A mirror answering 200 (docker-registry's
    /// proxy does for a blob it has not cached) is passed over for the next
    /// host. The bytes are not verified here.
    pub async fn get_blob_range_only(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Option<Bytes>> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let (_, body) = self
            .blob_range_stream_inner(repo, digest, start, len, true)
            .await?;
        // Dropped unread: the connection closes, the blob is not sent.
        let Some(mut body) = body else {
            return Ok(None);
        };
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            let c = c?;
            if out.len() as u64 + c.len() as u64 > len {
                return Err(OciError::TooLarge {
                    what,
                    size: out.len() as u64 + c.len() as u64,
                    limit: len,
                });
            }
            out.extend_from_slice(&c);
        }
        if out.len() as u64 != len {
            return Err(OciError::SizeMismatch {
                what,
                expected: len,
                actual: out.len() as u64,
            });
        }
        Ok(Some(Bytes::from(out)))
    }
}

/// One past the last byte of a 206's `Content-Range` (`bytes a-b/total`)
/// when it starts at `from`; `None` for any other or a malformed one.
fn range_end(content_range: &str, from: u64) -> Option<u64> {
    let (a, b) = content_range
        .strip_prefix("bytes ")
        .and_then(|r| r.split('/').next())
        .and_then(|r| r.split_once('-'))
        .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)))?;
    // `b < u64::MAX`: one past it must not overflow (issue #19).
    (a == from && b >= a && b < u64::MAX).then(|| b + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_range_must_start_where_asked() {
        assert_eq!(range_end("bytes 100-199/1000", 100), Some(200));
        assert_eq!(range_end("bytes 100-199/*", 100), Some(200));
        assert_eq!(range_end("bytes 0-0/1", 0), Some(1));
        assert_eq!(range_end("bytes 0-199/1000", 100), None, "another start");
        assert_eq!(
            range_end("bytes 100-99/1000", 100),
            None,
            "end before start"
        );
    }

    #[test]
    fn a_malformed_or_overflowing_content_range_is_refused() {
        for cr in [
            "",
            "bytes",
            "bytes 100-",
            "bytes -199/1000",
            "items 100-199/1000",
            "bytes x-y/z",
        ] {
            assert_eq!(range_end(cr, 100), None, "{cr:?}");
        }
        let max = u64::MAX;
        assert_eq!(range_end(&format!("bytes 5-{max}/*"), 5), None);
        assert_eq!(range_end(&format!("bytes 5-{}/*", max - 1), 5), Some(max));
    }
}
