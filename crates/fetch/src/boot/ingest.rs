//! The worker side of a chunked boot layer: the start list, the prefetch
//! of the rest and readers' demands become coalesced Range GETs (or one
//! stream when the registry ignores Range); every chunk is checked and
//! written to the cache as it arrives, and the whole layer stored once
//! complete.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_layer::chunked::decompress_piece;
use lazylayer_oci::{BodyStream, OciError};
use lazylayer_store::{LocalBlob, NoEvents, NoProgress};
use sha2::{Digest as _, Sha256};

use super::remote::ChunkRemote;
use super::state::ChunkState;
use super::{chunk_retry, BootChunks, REST_REQUEST, START_REQUEST};

impl BootChunks {
    /// Fetch every chunk not yet local, in order, in the background; then
    /// store the whole layer. Idempotent.
    pub fn start_rest(&self) {
        {
            let mut s = self.inner.state.lock().unwrap();
            if s.rest_started || s.streaming {
                return;
            }
            s.rest_started = true;
        }
        if self.inner.background.stopped() {
            self.inner.state.lock().unwrap().rest_started = false;
            return;
        }
        let me = self.clone();
        let t = self.inner.rt.spawn(async move {
            let all: Vec<u32> = (0..me.inner.content.chunks.len() as u32).collect();
            me.fetch_list(&all, REST_REQUEST).await;
        });
        self.track(t);
    }

    /// The chunks the trace read, in blob order: the content is laid out in
    /// first-access order of files, so this is close to the order they are
    /// needed in, and adjacent chunks coalesce into few requests (python3:
    /// 1176 chunks in 109 runs; in first-access order of pages, 754 runs,
    /// which cost a round trip each and made a 100 Mbit/s start
    /// latency-bound). A reader that needs a chunk sooner asks for it itself.
    pub(super) async fn fetch_start(&self) {
        let mut start = self.inner.content.start.clone();
        start.sort_unstable();
        start.dedup();
        self.fetch_list(&start, START_REQUEST).await;
    }

    /// Fetch the chunks of `list` that are absent, in its order, adjacent
    /// ones coalesced into Range GETs of up to `max` bytes, [`IN_FLIGHT`] at
    /// a time.
    pub(super) async fn fetch_list(&self, list: &[u32], max: u64) {
        let mut i = 0;
        while i < list.len() {
            let Ok(permit) = self.inner.slots.clone().acquire_owned().await else {
                return;
            };
            if self.inner.background.stopped() {
                return;
            }
            let taken =
                self.inner
                    .state
                    .lock()
                    .unwrap()
                    .take_run(list, &mut i, &self.inner.offsets, max);
            let Some(run) = taken else {
                continue;
            };
            let me = self.clone();
            let t = self.inner.rt.spawn(async move {
                me.fetch_range(run).await;
                drop(permit);
            });
            self.track(t);
        }
    }

    /// Mark the absent chunks of `range` as fetching and fetch them at once
    /// (a reader waits for them), one Range GET per run.
    pub(super) fn demand(&self, range: std::ops::Range<u32>) {
        let runs = {
            let mut s = self.inner.state.lock().unwrap();
            if s.streaming {
                // They pass by in the stream; a second copy would only compete with it.
                return;
            }
            s.claim_wanted(range)
        };
        for run in runs {
            let me = self.clone();
            self.inner
                .rt
                .spawn(async move { me.fetch_range(run).await });
        }
    }

    /// One Range GET for chunks `run` (adjacent), retried; each chunk checked
    /// and stored as it is cut from the response.
    pub(super) async fn fetch_range(&self, run: std::ops::Range<u32>) {
        let inner = &self.inner;
        let from = inner.region_len + inner.offsets[run.start as usize];
        let len = inner.offsets[run.end as usize] - inner.offsets[run.start as usize];
        let (last_err, network) = match fetch_with_retries(&*inner.remote, from, len, |attempt, e| {
            tracing::debug!(image = %inner.image, chunks = ?run, attempt, error = %e, "boot chunk fetch failed");
        })
        .await
        {
            Ok(bytes) => {
                inner
                    .fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                for c in run.clone() {
                    let a = (inner.offsets[c as usize] - inner.offsets[run.start as usize]) as usize;
                    let b =
                        (inner.offsets[c as usize + 1] - inner.offsets[run.start as usize]) as usize;
                    self.accept(c, &bytes[a..b]);
                }
                return;
            }
            Err(e) => (e.to_string(), e.is_network()),
        };
        let mut s = inner.state.lock().unwrap();
        for c in run.clone() {
            if s.chunks[c as usize] == ChunkState::Fetching {
                let msg = format!(
                    "chunk {c} of boot layer {} of {}: {last_err}",
                    inner.layer.digest, inner.image
                );
                s.chunks[c as usize] = if network {
                    ChunkState::Unreachable(msg)
                } else {
                    ChunkState::Failed(msg)
                };
            }
        }
        drop(s);
        tracing::error!(image = %inner.image, layer = %inner.layer.digest, chunks = ?run, error = %last_err, "boot chunks could not be fetched");
        inner.changed.notify_all();
    }

    /// The whole blob as one stream (the registry ignored Range): cut it
    /// into chunks as it passes.
    pub(super) async fn stream_all(&self, mut pending: Bytes, mut body: BodyStream) {
        let inner = &self.inner;
        let mut buf: Vec<u8> = Vec::new();
        for c in 0..inner.content.chunks.len() as u32 {
            let need = (inner.offsets[c as usize + 1] - inner.offsets[c as usize]) as usize;
            while buf.len() < need {
                if !pending.is_empty() {
                    buf.extend_from_slice(&pending);
                    pending = Bytes::new();
                    continue;
                }
                match body.next().await {
                    Some(Ok(b)) => {
                        inner.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                        buf.extend_from_slice(&b);
                    }
                    other => {
                        let why = match other {
                            Some(Err(e)) => e.to_string(),
                            _ => "the response ended early".into(),
                        };
                        tracing::warn!(image = %inner.image, chunk = c, error = %why, "the boot layer stream broke; fetching the rest by ranges");
                        inner.state.lock().unwrap().streaming = false;
                        inner.changed.notify_all();
                        // Readers waiting now ask for their chunks themselves.
                        self.start_rest();
                        return;
                    }
                }
            }
            let rest = buf.split_off(need);
            let present = inner.state.lock().unwrap().chunks[c as usize] == ChunkState::Present;
            if !present {
                self.accept(c, &buf);
            }
            buf = rest;
        }
        inner.state.lock().unwrap().streaming = false;
        inner.changed.notify_all();
    }

    /// Check chunk `c`'s compressed bytes, decompress them into the cache,
    /// keep them for the blob, and wake its readers.
    pub(super) fn accept(&self, c: u32, compressed: &[u8]) {
        let inner = &self.inner;
        let meta = &inner.content.chunks[c as usize];
        let result = if Sha256::digest(compressed).as_slice() != meta.sha256 {
            Err(format!(
                "chunk {c} of boot layer {} of {} does not match its digest in the index: the registry sent other bytes",
                inner.layer.digest, inner.image
            ))
        } else {
            decompress_piece(
                compressed,
                inner.content.compression,
                inner.content.chunk_len(c) as usize,
            )
            .map_err(|e| {
                format!(
                    "chunk {c} of boot layer {} of {}: {e}",
                    inner.layer.digest, inner.image
                )
            })
            .and_then(|data| {
                inner
                    .cache
                    .write_all_at(&data, u64::from(c) * u64::from(inner.content.chunk_size))
                    .and_then(|_| {
                        inner
                            .blob
                            .write_all_at(compressed, inner.region_len + inner.offsets[c as usize])
                    })
                    .and_then(|_| inner.present.write_all_at(&[1], u64::from(c)))
                    .map_err(|e| format!("writing boot chunk {c} in {}: {e}", inner.dir.display()))
            })
        };
        let mut s = inner.state.lock().unwrap();
        let complete = match result {
            Ok(()) => {
                s.chunks[c as usize] = ChunkState::Present;
                let done = s.chunks.iter().all(|x| *x == ChunkState::Present);
                let go = done && !s.ingesting && !s.stored;
                if go {
                    s.ingesting = true;
                }
                go
            }
            Err(msg) => {
                tracing::error!(image = %inner.image, error = %msg, "boot chunk refused");
                s.chunks[c as usize] = ChunkState::Failed(msg);
                false
            }
        };
        drop(s);
        inner.changed.notify_all();
        if complete {
            let me = self.clone();
            inner.rt.spawn(async move { me.ingest().await });
        }
    }

    /// Every chunk is local: store the assembled blob as a layer (verified
    /// against its digest on the way), so the next start is offline.
    pub(super) async fn ingest(&self) {
        let inner = &self.inner;
        let src = LocalBlob {
            path: inner.dir.join("blob"),
        };
        let r = inner
            .store
            .ensure_layer(
                &src,
                &inner.layer,
                &inner.pull,
                Arc::new(NoProgress),
                Arc::new(NoEvents),
            )
            .await;
        let mut s = inner.state.lock().unwrap();
        s.ingesting = false;
        match r {
            Ok(_) => {
                s.stored = true;
                tracing::info!(image = %inner.image, "boot layer complete and stored");
            }
            Err(e) => {
                tracing::warn!(image = %inner.image, error = %e, "storing the assembled boot layer");
            }
        }
        drop(s);
        inner.changed.notify_all();
    }
}

/// One range from `remote`, tried as [`chunk_retry`] allows with a growing pause
/// (`failed` hears of each failure). A network error ends it at once: the
/// client gave up on the host already, and another try here would only fail
/// the same way.
async fn fetch_with_retries(
    remote: &dyn ChunkRemote,
    from: u64,
    len: u64,
    mut failed: impl FnMut(u32, &OciError),
) -> Result<Bytes, OciError> {
    let policy = chunk_retry();
    let mut attempt = 0;
    loop {
        match remote.range(from, len).await {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                failed(attempt, &e);
                if e.is_network() || !policy.allows_another(attempt) {
                    return Err(e);
                }
                tokio::time::sleep(policy.delay(attempt)).await;
                attempt += 1;
            }
        }
    }
}
