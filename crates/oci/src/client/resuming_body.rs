//! A ranged body that resumes on the next host when it breaks.

use bytes::Bytes;
use futures_util::StreamExt;

use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::hosts::Endpoint;
use crate::reference::Repository;

use super::{BodyStream, RegistryClient};

/// The body of a ranged blob GET that, when it breaks before its end,
/// resumes with Range on the next host (mirror → registry).
pub(super) struct ResumingBody {
    pub(super) client: RegistryClient,
    pub(super) what: String,
    pub(super) repo: Repository,
    pub(super) digest: Digest,
    pub(super) eps: Vec<Endpoint>,
    pub(super) host: usize,
    /// Blob offset of the next byte handed out.
    pub(super) pos: u64,
    /// One past the last byte wanted, when known.
    pub(super) end: Option<u64>,
    /// Bytes of the current response to drop before `pos` (a host that
    /// answered a resume with the whole blob).
    pub(super) skip: u64,
    pub(super) body: Option<RawBody>,
}

type RawBody =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send + 'static>>;

impl ResumingBody {
    pub(super) fn into_stream(self) -> BodyStream {
        Box::pin(futures_util::stream::unfold(self, |mut st| async move {
            loop {
                let body = st.body.as_mut()?;
                let broken = match body.next().await {
                    Some(Ok(mut c)) => {
                        if st.skip > 0 {
                            let n = st.skip.min(c.len() as u64) as usize;
                            st.skip -= n as u64;
                            c = c.slice(n..);
                        }
                        if let Some(end) = st.end {
                            // Never more than was asked for, whatever a host sends.
                            let room = end.saturating_sub(st.pos) as usize;
                            if c.len() > room {
                                c = c.slice(..room);
                            }
                        }
                        if c.is_empty() {
                            if st.end.is_some_and(|e| st.pos >= e) {
                                return None;
                            }
                            continue;
                        }
                        st.pos += c.len() as u64;
                        return Some((Ok(c), st));
                    }
                    Some(Err(e)) => OciError::Http {
                        what: st.what.clone(),
                        registry: st.eps[st.host].label().to_string(),
                        source: e,
                    },
                    None if st.end.is_none_or(|e| st.pos >= e) => return None,
                    None => OciError::Interrupted {
                        what: st.what.clone(),
                        registry: st.eps[st.host].label().to_string(),
                        at: st.pos,
                        total: st.end,
                        reason: "response ended early".into(),
                        tries: 1,
                    },
                };
                st.body = None;
                if let Err(e) = st.resume(broken).await {
                    // An early end on the last host ends the stream, as it did
                    // before mirrors: the caller sees the bytes are short.
                    if matches!(e, OciError::Interrupted { .. }) {
                        return None;
                    }
                    return Some((Err(e), st));
                }
            }
        }))
    }

    /// Open the rest (`pos..end`) on the hosts after the current one; the
    /// error that broke the current one when none can.
    pub(super) async fn resume(&mut self, broken: OciError) -> Result<()> {
        let mut err = broken;
        while self.host + 1 < self.eps.len() {
            let ep = &self.eps[self.host];
            tracing::warn!(what = %self.what, host = %ep.label(), at = self.pos, error = %err, "host failed mid-download; resuming from the next one");
            self.client.note_failure(ep, &err);
            self.host += 1;
            let ep = &self.eps[self.host];
            let to = self.end.and_then(|e| e.checked_sub(1));
            match self
                .client
                .open_range_at(&self.what, &self.repo, ep, &self.digest, self.pos, to)
                .await
            {
                Ok((ranged, _, resp)) => {
                    self.skip = if ranged { 0 } else { self.pos };
                    self.body = Some(Box::pin(resp.bytes_stream()));
                    return Ok(());
                }
                Err(e) => err = e,
            }
        }
        Err(err)
    }
}
