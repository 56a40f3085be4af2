//! Whole blobs: small ones into memory, large ones streamed with resumes
//! after broken or stalled connections, verified at the end.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_RANGE, RANGE};
use reqwest::{Response, StatusCode};
use tokio::sync::mpsc;

use crate::digest::{Digest, DigestHasher};
use crate::error::{OciError, Result};
use crate::hosts::{Endpoint, Purpose};
use crate::reference::Repository;
use lazylayer_sys::ByteSize;

use super::failover::fails_over;
use super::status::{expect_status, header_text, status_failure};
use super::{BlobResume, RegistryClient};

/// Why one response of a blob download ended before the blob did.
enum Broken {
    Error(String),
    Stalled {
        bytes: u64,
        secs: f64,
        min_speed: u64,
    },
    EndedEarly,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Error(e) => write!(f, "connection broken: {e}"),
            Broken::Stalled { bytes: 0, secs, .. } => write!(f, "no data for {secs:.0} s"),
            Broken::Stalled {
                bytes,
                secs,
                min_speed,
            } => write!(
                f,
                "only {} in {secs:.0} s, below {}/s",
                ByteSize(*bytes),
                ByteSize(*min_speed)
            ),
            Broken::EndedEarly => write!(f, "response ended early"),
        }
    }
}

impl RegistryClient {
    /// Fetch a small blob into memory, verified (for configs and the like);
    /// a host that sends other bytes than the digest names is passed over.
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: Option<u64>,
        limit: u64,
    ) -> Result<Bytes> {
        let what = format!("blob {digest} of {repo}");
        self.on_hosts(&what, repo, Purpose::Pull, |ep| {
            let what = what.clone();
            async move {
                let url = ep.url(&format!("blobs/{digest}"));
                let resp = self
                    .send(&what, repo, &ep, &[Self::pull_scope(&ep)], true, &|c| {
                        c.get(url.clone())
                    })
                    .await?;
                let resp = expect_status(&what, ep.label(), resp, |s| s.is_success()).await?;
                let bytes = Self::read_limited(
                    &what,
                    ep.label(),
                    resp,
                    limit.min(size.unwrap_or(u64::MAX)),
                )
                .await?;
                if let Some(s) = size {
                    if bytes.len() as u64 != s {
                        return Err(OciError::SizeMismatch {
                            what,
                            expected: s,
                            actual: bytes.len() as u64,
                        });
                    }
                }
                digest.verify(&what, &bytes)?;
                tracing::info!(blob = %digest, host = %ep.label(), bytes = bytes.len(), "blob served");
                Ok(bytes)
            }
        })
        .await
    }

    /// Stream a blob into `tx`, resuming with `Range` after a broken or
    /// stalled connection (or skipping what we have when the server ignores
    /// Range), and verify its digest and size at the end. The consumer must
    /// not trust the bytes until this returns `Ok`. `progress` is told each
    /// chunk's length.
    pub async fn download_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        expected_size: Option<u64>,
        tx: mpsc::Sender<Bytes>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        let from = BlobResume::start(digest);
        self.download_blob_from(repo, digest, expected_size, from, tx, progress)
            .await
    }

    /// [`RegistryClient::download_blob`] after a prefix the caller already
    /// holds (`from.offset` bytes, already fed to `from.hasher`): only the
    /// rest is requested and sent to `tx`, and counted in `progress`; the
    /// digest and size checks at the end cover the whole blob. When a host
    /// fails (unreachable, missing the blob, or broken mid-download after
    /// its attempts) the download resumes with Range from the next host.
    pub async fn download_blob_from(
        &self,
        repo: &Repository,
        digest: &Digest,
        expected_size: Option<u64>,
        from: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        let what = format!("blob {digest} of {repo}");
        let eps = self.endpoints(repo, Purpose::Pull)?;
        let mut host = 0usize;
        let from_offset = from.offset;
        let mut dl = Download {
            what,
            expected_size,
            hasher: from.hasher,
            got: from.offset,
            tx,
            progress,
        };
        if let Some(exp) = expected_size.filter(|e| dl.got > *e) {
            return Err(OciError::SizeMismatch {
                what: dl.what,
                expected: exp,
                actual: dl.got,
            });
        }
        let stall = self.cfg.stall_timeout.max(Duration::from_millis(100));
        let mut failures = 0u32;
        // On a fault of the current host: on to the next one (the bytes so
        // far are kept; the next host is asked for the rest), or, on the
        // last host, the error.
        macro_rules! next_host_or_fail {
            ($err:expr) => {{
                let e = $err;
                let ep = &eps[host];
                if host + 1 < eps.len() && fails_over(&e) {
                    tracing::warn!(what = %dl.what, host = %ep.label(), source = %ep.source, at = dl.got, error = %e, "host failed; resuming from the next one");
                    self.note_failure(ep, &e);
                    host += 1;
                    failures = 0;
                    continue;
                }
                return Err(e);
            }};
        }
        // Nothing left to ask for when the prefix is the whole blob.
        while expected_size != Some(dl.got) {
            let ep = &eps[host];
            self.note_served_by(ep, digest);
            let (resp, skip) = match self.open_rest(&dl, repo, ep, digest, stall).await {
                Ok(Rest::Body { resp, skip }) => (resp, skip),
                Ok(Rest::None) => break,
                Err(e) => next_host_or_fail!(e),
            };
            // A complete response that is shorter than the descriptor says is
            // a truncated blob, not a broken connection: retrying cannot help.
            let resp_len = resp.content_length().map(|l| l.saturating_sub(skip));
            let resp_start = dl.got;
            let outcome = self.receive(&mut dl, resp, skip, stall).await?;
            if outcome.is_err() && dl.tx.is_closed() {
                // Nobody wants the rest (a cancelled fetch): not a registry fault.
                return Err(OciError::ConsumerGone { what: dl.what });
            }
            let short = expected_size.is_some_and(|e| dl.got < e);
            if short && outcome.is_ok() && resp_len == Some(dl.got - resp_start) {
                next_host_or_fail!(OciError::SizeMismatch {
                    what: dl.what.clone(),
                    expected: expected_size.unwrap_or(0),
                    actual: dl.got,
                });
            }
            let reason = match outcome {
                Ok(()) if !short => break,
                Ok(()) => Broken::EndedEarly,
                Err(b) => b,
            };
            failures += 1;
            if failures >= self.retry_for(ep).attempts() {
                tracing::debug!(what = %dl.what, got = dl.got, %reason, failures, "giving up on this host");
                let e = OciError::Interrupted {
                    what: dl.what.clone(),
                    registry: ep.label().to_string(),
                    at: dl.got,
                    total: expected_size,
                    reason: reason.to_string(),
                    tries: failures,
                };
                self.gave_up(ep, &e);
                next_host_or_fail!(e);
            }
            tracing::warn!(what = %dl.what, host = %ep.label(), at = dl.got, %reason, "download interrupted; resuming");
            tokio::time::sleep(self.retry_for(ep).delay(failures - 1)).await;
        }
        let got = dl.verify(digest)?;
        // Verified: whoever served it served it right.
        self.served_by.lock().unwrap().remove(digest);
        tracing::info!(blob = %digest, host = %eps[host].label(), bytes = got - from_offset, "blob served");
        Ok(got)
    }

    /// Remember that mirror `ep` sends bytes of `digest` (see
    /// [`RegistryClient::distrust`]).
    fn note_served_by(&self, ep: &Endpoint, digest: &Digest) {
        if ep.mirror {
            let mut s = self.served_by.lock().unwrap();
            let hosts = s.entry(digest.clone()).or_default();
            if !hosts.contains(&Self::host_key(ep)) {
                hosts.push(Self::host_key(ep));
            }
        }
    }

    /// Ask `ep` for the blob from byte `dl.got` on (with Range past byte 0)
    /// and check that the answer is that rest, or the whole blob (then
    /// `skip` is what the consumer has already).
    async fn open_rest(
        &self,
        dl: &Download<'_>,
        repo: &Repository,
        ep: &Endpoint,
        digest: &Digest,
        stall: Duration,
    ) -> Result<Rest> {
        let what = &dl.what;
        let url = ep.url(&format!("blobs/{digest}"));
        let scopes = [Self::pull_scope(ep)];
        let offset = dl.got;
        // A registry that takes the request but never answers is a stall too.
        let resp = self
            .send_within(what, repo, ep, &scopes, true, Some(stall), &|c| {
                let rb = c.get(url.clone());
                if offset > 0 {
                    rb.header(RANGE, format!("bytes={offset}-"))
                } else {
                    rb
                }
            })
            .await?;
        let status = resp.status();
        let mut skip = 0u64;
        if offset > 0 && status == StatusCode::PARTIAL_CONTENT {
            let start = header_text(resp.headers(), CONTENT_RANGE)
                .and_then(|s| s.strip_prefix("bytes "))
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse::<u64>().ok());
            if start != Some(offset) {
                return Err(OciError::Status {
                    what: what.clone(),
                    registry: ep.label().to_string(),
                    status: 206,
                    body: format!("asked to resume at {offset}, got range starting at {start:?}"),
                });
            }
        } else if offset > 0
            && dl.expected_size.is_none()
            && status == StatusCode::RANGE_NOT_SATISFIABLE
        {
            // Size unknown and the prefix was all of it: the digest decides.
            return Ok(Rest::None);
        } else if status == StatusCode::OK {
            // A server without Range support resends everything: drop what we have.
            skip = offset;
            if offset > 0 {
                tracing::info!(%what, offset, "server ignored Range; skipping already received bytes");
            }
        } else {
            return Err(status_failure(what, ep.label(), resp).await);
        }
        Ok(Rest::Body { resp, skip })
    }

    /// Pass `resp`'s body on to the consumer (its first `skip` bytes
    /// dropped) until it ends, breaks or stalls: `Ok(Err(why))` when it
    /// ended before the blob may have; `Err` when the download must stop
    /// (too many bytes, the consumer gone).
    async fn receive(
        &self,
        dl: &mut Download<'_>,
        resp: Response,
        mut skip: u64,
        stall: Duration,
    ) -> Result<std::result::Result<(), Broken>> {
        // Bytes a stall window must bring for the connection to count as alive.
        let window_min = (self.cfg.min_speed as f64 * stall.as_secs_f64()) as u64;
        let mut body = resp.bytes_stream();
        // Stall detection: each window of `stall` must bring `window_min`
        // bytes (and at least one). reqwest's read timeout alone lets a
        // server trickling a byte now and then hold a download forever.
        let mut window_start = tokio::time::Instant::now();
        let mut window_bytes = 0u64;
        let outcome: std::result::Result<(), Broken> = loop {
            let deadline = window_start + stall;
            let next = tokio::time::timeout_at(deadline, body.next()).await;
            match next {
                Ok(Some(Ok(mut chunk))) => {
                    if skip > 0 {
                        let n = skip.min(chunk.len() as u64) as usize;
                        skip -= n as u64;
                        window_bytes += n as u64;
                        chunk = chunk.slice(n..);
                    }
                    if !chunk.is_empty() {
                        window_bytes += chunk.len() as u64;
                        // Time waiting for a slow consumer is not the registry's.
                        let waited = dl.pass_on(chunk).await?;
                        window_start += waited;
                    }
                }
                Ok(Some(Err(e))) => break Err(Broken::Error(e.to_string())),
                Ok(None) => break Ok(()),
                Err(_elapsed) => {}
            }
            if tokio::time::Instant::now() >= window_start + stall {
                if window_bytes == 0 || window_bytes < window_min {
                    break Err(Broken::Stalled {
                        bytes: window_bytes,
                        secs: stall.as_secs_f64(),
                        min_speed: self.cfg.min_speed,
                    });
                }
                window_start = tokio::time::Instant::now();
                window_bytes = 0;
            }
        };
        // Dropping the body closes the connection (a stalled one included).
        drop(body);
        Ok(outcome)
    }
}

/// What a host answered to a request for the rest of a blob.
enum Rest {
    /// A body to read, whose first `skip` bytes the consumer has already.
    Body { resp: Response, skip: u64 },
    /// Nothing more (the size was unknown and the prefix was all of it).
    None,
}

/// A blob download in progress: the bytes passed on to the consumer so far.
struct Download<'a> {
    what: String,
    expected_size: Option<u64>,
    /// Fed every byte of the blob up to `got`.
    hasher: DigestHasher,
    got: u64,
    tx: mpsc::Sender<Bytes>,
    progress: &'a (dyn Fn(u64) + Send + Sync),
}

impl Download<'_> {
    /// Hash, count and send the next bytes of the blob; how long sending
    /// waited for the consumer.
    async fn pass_on(&mut self, chunk: Bytes) -> Result<Duration> {
        self.got += chunk.len() as u64;
        if let Some(exp) = self.expected_size.filter(|e| self.got > *e) {
            return Err(OciError::SizeMismatch {
                what: self.what.clone(),
                expected: exp,
                actual: self.got,
            });
        }
        self.hasher.update(&chunk);
        (self.progress)(chunk.len() as u64);
        let waited = tokio::time::Instant::now();
        if self.tx.send(chunk).await.is_err() {
            return Err(OciError::ConsumerGone {
                what: self.what.clone(),
            });
        }
        Ok(waited.elapsed())
    }

    /// The whole blob's digest and size checked; its size.
    fn verify(self, digest: &Digest) -> Result<u64> {
        let actual = self.hasher.finish();
        // Verified whatever host served it; the bytes went to the consumer
        // already, so a bad blob is an error here, not a reason to fail over.
        if &actual != digest {
            return Err(OciError::DigestMismatch {
                what: self.what,
                expected: digest.clone(),
                actual,
            });
        }
        if let Some(exp) = self.expected_size {
            if self.got != exp {
                return Err(OciError::SizeMismatch {
                    what: self.what,
                    expected: exp,
                    actual: self.got,
                });
            }
        }
        Ok(self.got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stall_reasons_are_plain_words() {
        let no_data = Broken::Stalled {
            bytes: 0,
            secs: 10.0,
            min_speed: 1024,
        };
        assert_eq!(no_data.to_string(), "no data for 10 s");
        let slow = Broken::Stalled {
            bytes: 3,
            secs: 2.0,
            min_speed: 1024,
        };
        assert_eq!(slow.to_string(), "only 3 B in 2 s, below 1.0 kB/s");
        let e = OciError::Interrupted {
            what: "blob sha256:ab of r/x".into(),
            registry: "127.0.0.1:5000".into(),
            at: 7_700_000,
            total: Some(25_000_000),
            reason: no_data.to_string(),
            tries: 5,
        };
        assert_eq!(
            e.to_string(),
            "registry 127.0.0.1:5000 stopped sending blob sha256:ab of r/x at 7.7 MB of 25.0 MB (no data for 10 s); tried 5 times"
        );
    }

    /// A download of `blob` (expected `size`) whose consumer is `tx`.
    fn download<'a>(
        blob: &[u8],
        size: Option<u64>,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> Download<'a> {
        Download {
            what: "blob b of r/x".into(),
            expected_size: size,
            hasher: Digest::sha256_of(blob).hasher(),
            got: 0,
            tx,
            progress,
        }
    }

    #[tokio::test]
    async fn bytes_passed_on_are_counted_sent_and_verified_whole() {
        let blob = b"hello, lazy world";
        let seen = std::sync::atomic::AtomicU64::new(0);
        let progress = |n| {
            seen.fetch_add(n, std::sync::atomic::Ordering::SeqCst);
        };
        let (tx, mut rx) = mpsc::channel(4);
        let mut dl = download(blob, Some(blob.len() as u64), tx, &progress);
        dl.pass_on(Bytes::from_static(&blob[..5])).await.unwrap();
        dl.pass_on(Bytes::from_static(&blob[5..])).await.unwrap();
        assert_eq!(
            dl.verify(&Digest::sha256_of(blob)).unwrap(),
            blob.len() as u64
        );
        assert_eq!(seen.into_inner(), blob.len() as u64);
        let mut received = Vec::new();
        while let Ok(c) = rx.try_recv() {
            received.extend_from_slice(&c);
        }
        assert_eq!(received, blob);
    }

    #[tokio::test]
    async fn a_blob_with_other_bytes_or_size_is_refused_at_the_end() {
        let (tx, _rx) = mpsc::channel(4);
        let mut dl = download(b"good", None, tx, &|_| {});
        dl.pass_on(Bytes::from_static(b"evil")).await.unwrap();
        let e = dl.verify(&Digest::sha256_of(b"good")).unwrap_err();
        assert!(matches!(e, OciError::DigestMismatch { .. }), "{e}");

        let (tx, _rx) = mpsc::channel(4);
        let mut dl = download(b"abc", Some(4), tx, &|_| {});
        dl.pass_on(Bytes::from_static(b"abc")).await.unwrap();
        let e = dl.verify(&Digest::sha256_of(b"abc")).unwrap_err();
        assert!(
            matches!(
                e,
                OciError::SizeMismatch {
                    expected: 4,
                    actual: 3,
                    ..
                }
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn more_bytes_than_the_descriptor_says_stop_the_download_unsent() {
        let (tx, mut rx) = mpsc::channel(4);
        let mut dl = download(b"abc", Some(3), tx, &|_| {});
        let e = dl.pass_on(Bytes::from_static(b"abcd")).await.unwrap_err();
        assert!(
            matches!(
                e,
                OciError::SizeMismatch {
                    expected: 3,
                    actual: 4,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            rx.try_recv().is_err(),
            "nothing past the size reaches the consumer"
        );
    }

    #[tokio::test]
    async fn a_consumer_gone_stops_the_download() {
        let (tx, rx) = mpsc::channel(4);
        drop(rx);
        let mut dl = download(b"abc", None, tx, &|_| {});
        let e = dl.pass_on(Bytes::from_static(b"a")).await.unwrap_err();
        assert!(matches!(e, OciError::ConsumerGone { .. }), "{e}");
    }
}
