//! The worker side of a chunked boot layer: the start list, the prefetch
//! of the rest and readers' demands become coalesced Range GETs (or one
//! stream when the registry ignores Range); every chunk is checked and
//! written to the cache as it arrives, and the whole layer stored once
//! complete.

use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::StreamExt;
use lazylayer_layer::chunked::decompress_piece;
use lazylayer_oci::{BodyStream, OciError, RangeParts};
use lazylayer_store::{LocalBlob, NoEvents, NoProgress};
use lazylayer_sys::range_lock;
use sha2::{Digest as _, Sha256};

use super::plan::{
    self, budgeted_spans, joined_span_max, LinkEstimate, DEFAULT_GAP, IN_FLIGHT_FAR,
};
use super::state::{ChunkState, Claim};
use super::{chunk_retry, BootChunks, REST_REQUEST, START_REQUEST};

/// Bytes of chunks the start did not read that a start-set request may
/// carry, as a share of those it did (see [`budgeted_spans`]): python3's
/// 3.7 MB start became 4.6 MB, 27 requests.
const BRIDGED_SHARE: f64 = 0.25;
/// The share when the link's rate is a fast one an earlier start set
/// measured (kept for the registry): a rate to trust, whose gaps are worth
/// their bytes. Through a relay 20 ms away on the loopback, python3 with
/// the rate kept but a quarter's share still bridged only 20 KB gaps, 38
/// spans, and started no sooner (0.29-0.31 s); within the wanted bytes,
/// 4-5 spans, 0.26 s.
const BRIDGED_SHARE_KEPT_RATE: f64 = 1.0;
/// ... or this many, if more: a small start's share is a few round trips'
/// worth of requests (a static busybox: 15 requests within its share, 4
/// with this, as many as before the budget).
const BRIDGED_AT_LEAST: u64 = 512 << 10;
/// Most start-set spans one request asks for (as parts of one response).
const MAX_PARTS: usize = 16;

/// Where a request's bytes come from: a response body, or one part of a
/// multipart one.
enum Body<'a> {
    Stream(&'a mut BodyStream),
    Part(&'a mut RangeParts),
}

impl Body<'_> {
    async fn next(&mut self) -> Option<Result<Bytes, OciError>> {
        match self {
            Body::Stream(s) => s.next().await,
            Body::Part(p) => p.next_bytes().await,
        }
    }
}

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

    /// The chunks the trace read, at once: the content is laid out in
    /// first-access order of files, so blob order is close to the order they
    /// are needed in; runs of them are joined across small gaps (`plan`) and
    /// the spans go out [`IN_FLIGHT`](super::IN_FLIGHT) at a time, each chunk
    /// served as soon as it is in. (Runs alone, three at a time, cost python3
    /// 109 requests in ~36 sequential round trips: 3.9 s at 80 ms.) A reader
    /// that needs a chunk sooner asks for it itself, and for the rest of its
    /// span if that is still queued.
    pub(super) async fn fetch_start(&self) {
        let link = self.inner.link;
        let gap = link.map_or(DEFAULT_GAP, |l| l.gap(l.in_flight()));
        let (spans, gap) = budgeted_spans(
            &self.inner.content.start,
            &self.inner.offsets,
            gap,
            START_REQUEST,
            if self.inner.rate_kept {
                BRIDGED_SHARE_KEPT_RATE
            } else {
                BRIDGED_SHARE
            },
            BRIDGED_AT_LEAST,
        );
        tracing::debug!(image = %self.inner.image, spans = spans.len(), gap, ?link, "boot start set planned");
        self.inner.state.lock().unwrap().queued = spans;
        let before = self.inner.fetched.load(Ordering::Relaxed);
        // Each request holds a sender: all are done when the receiver
        // hears none left.
        let (sent, mut all_done) = tokio::sync::mpsc::channel::<()>(1);
        // A far registry's start set is 32 requests wide: see `parts` below.
        let far = self.inner.in_flight >= IN_FLIGHT_FAR;
        loop {
            let Ok(permit) = self.inner.slots.clone().acquire_owned().await else {
                return;
            };
            if self.inner.background.stopped() {
                return;
            }
            // The spans that went out measured the link (their bytes timed
            // from the first that came): on a fast one the rest join across
            // wider gaps, each request saved being worth more than the
            // bytes bridged (the registry's work per request is its largest
            // cost on such a link), each within its share of what is queued.
            let measured = link.and_then(|l| {
                let got = self.inner.fetched.load(Ordering::Relaxed) - before;
                l.gap_measured(got, self.inner.first_in.get()?.elapsed())
            });
            let wider = measured.filter(|&g| g > gap);
            // On a link known fast (measured so, by these spans or the last
            // start's), the queued spans ride as parts of fewer requests.
            // Not before: where bytes are the cost, a part late in a
            // response cannot be taken by a reader that needs it sooner (a
            // queued span can): with 16 parts from the first wave, python3
            // at 100 Mbit/s and 20 ms started 0.03-0.05 s later, with 2
            // parts 0.05 s. From a far registry, whatever its rate, the
            // spans beyond the requests in flight ride too: a second wave
            // would wait a round trip (python3 at 80 ms: 4 rounds instead
            // of 5, 67 requests instead of 71; its time the same in the
            // benchmark, whose registry paced the first wave's answers with
            // the CPU it shares with the start).
            let fast = measured.is_some() || self.inner.rate_kept;
            let parts =
                if (fast || far) && !self.inner.one_range && self.inner.remote.may_send_parts() {
                    MAX_PARTS
                } else {
                    1
                };
            let next = {
                let mut s = self.inner.state.lock().unwrap();
                let o = &self.inner.offsets;
                let max = joined_span_max(s.queued_bytes(o), self.inner.in_flight);
                s.next_queued(o, wider, max).map(|span| {
                    let mut claims: Vec<Claim> = s.claim_span(span).into_iter().collect();
                    if parts > 1 {
                        // The requests still to go out share the queue,
                        // each taking a part of every stride of it.
                        let stride = self.inner.slots.available_permits() + 1;
                        for span in s.take_every(stride, parts - 1) {
                            claims.extend(s.claim_span(span));
                        }
                    }
                    claims
                })
            };
            let Some(claims) = next else {
                // The slot goes back at once (the prefetch's requests take
                // them): held while the last requests finished, first
                // contacts made more requests and started later.
                drop((permit, sent));
                while all_done.recv().await.is_some() {}
                self.note_start_rate(before);
                self.note_one_range();
                return;
            };
            if claims.is_empty() {
                continue;
            }
            let (me, sent) = (self.clone(), sent.clone());
            let t = self.inner.rt.spawn(async move {
                me.fetch_claims(claims).await;
                drop((permit, sent));
            });
            self.track(t);
            // Let the span just spawned make its request before the next
            // is handed out (tokio runs the task spawned last first): the
            // first spans are those needed first, and only a few
            // connections may be open yet.
            tokio::task::yield_now().await;
        }
    }

    /// Keep for the next start that this registry sent one range of several
    /// asked for in one request, when this start set found it so.
    fn note_one_range(&self) {
        let inner = &self.inner;
        if let (false, false, Some(registry)) = (
            inner.one_range,
            inner.remote.may_send_parts(),
            inner.remote.registry(),
        ) {
            plan::note_one_range(&inner.store, registry);
        }
    }

    /// Keep the rate the start set's responses measured (`before`: the
    /// bytes fetched when it was planned) for its registry, for the next
    /// start from it ([`LinkEstimate::with_rate_of`]); nothing when too few
    /// came to time the link, or the start set was stopped.
    fn note_start_rate(&self, before: u64) {
        let inner = &self.inner;
        if inner.background.stopped() {
            return;
        }
        let (Some(link), Some(registry), Some(first)) =
            (inner.link, inner.remote.registry(), inner.first_in.get())
        else {
            return;
        };
        let got = inner.fetched.load(Ordering::Relaxed) - before;
        if let Some(rate) = LinkEstimate::measured_rate(got, first.elapsed()) {
            let measured = LinkEstimate {
                bytes_per_sec: Some(rate),
                ..link
            };
            measured.save_for_registry(&inner.store, registry);
        }
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
                me.fetch_claim(Claim {
                    claimed: run.clone().collect(),
                    span: run,
                })
                .await;
                drop(permit);
            });
            self.track(t);
        }
    }

    /// Claim the chunks of `range` a reader needs and fetch them at once, in
    /// one Range GET (a reader waits for them).
    pub(super) fn demand(&self, range: std::ops::Range<u32>) {
        let claim = {
            let mut s = self.inner.state.lock().unwrap();
            if s.streaming {
                // They pass by in the stream; a second copy would only compete with it.
                return;
            }
            s.claim_wanted(range)
        };
        if let Some(claim) = claim {
            let me = self.clone();
            self.inner
                .rt
                .spawn(async move { me.fetch_claim(claim).await });
        }
    }

    /// One Range GET for `claim`'s span, each chunk checked and stored the
    /// moment its last byte is in; tried again from the first chunk still
    /// missing, as [`chunk_retry`] allows. Chunks of the span that are local
    /// by then are skipped; on failure, only the chunks this request claimed
    /// are marked (the others are another request's).
    pub(super) async fn fetch_claim(&self, claim: Claim) {
        if let Some(mine) = self.share_with_peers(claim) {
            let from = mine.span.start;
            self.fetch_mine(mine, from).await;
        }
    }

    /// Claims of the start set in one request, each span a part of a
    /// multipart byte-range response when the registry sends them so: its
    /// work per request is its largest cost on a fast link. What that
    /// response did not bring (it cannot, or broke) is asked for span by
    /// span, as [`BootChunks::fetch_claim`] does.
    pub(super) async fn fetch_claims(&self, claims: Vec<Claim>) {
        let mine: Vec<Claim> = claims
            .into_iter()
            .filter_map(|c| self.share_with_peers(c))
            .collect();
        let mut next: Vec<u32> = mine.iter().map(|c| c.span.start).collect();
        if mine.len() > 1 {
            if let Err(e) = self.stream_parts(&mine, &mut next).await {
                tracing::debug!(image = %self.inner.image, parts = mine.len(), error = %e, "a multi-range request failed; its spans go one by one");
                if !e.is_network() {
                    // A misframed answer (a proxy that mangles them, say)
                    // would cost every later request the same.
                    self.inner.remote.stop_asking_for_parts();
                }
            }
        }
        // At once: when the registry turned the parts down, each is a
        // request of its own now, as it would have been.
        let left = mine
            .into_iter()
            .zip(next)
            .map(|(claim, from)| self.fetch_mine(claim, from));
        futures_util::future::join_all(left).await;
    }

    /// The chunks of `claims`' spans by one request for all of them, as
    /// parts of one response; `next[i]` follows the first chunk of claim
    /// `i` not yet in. Nothing when the registry does not send parts.
    async fn stream_parts(&self, claims: &[Claim], next: &mut [u32]) -> Result<(), OciError> {
        let inner = &self.inner;
        let at = |c: u32| inner.region_len + inner.offsets[c as usize];
        let ranges: Vec<_> = claims
            .iter()
            .map(|c| at(c.span.start)..at(c.span.end))
            .collect();
        let Some(mut parts) = inner.remote.ranges(&ranges).await? else {
            return Ok(());
        };
        while let Some(r) = parts.next_part().await? {
            let i = ranges
                .iter()
                .position(|x| *x == r)
                .expect("a part is one of the ranges asked");
            let span = claims[i].span.clone();
            self.take_chunks(&mut Body::Part(&mut parts), span, &mut next[i], 0)
                .await?;
        }
        Ok(())
    }

    /// Chunks of `claim` (locked by this process) from `from` on, by Range
    /// GETs tried again as [`chunk_retry`] allows; failures marked on the
    /// chunks claimed.
    async fn fetch_mine(&self, claim: Claim, from: u32) {
        let inner = &self.inner;
        let Claim { span, claimed } = claim;
        if from >= span.end {
            self.release(&claimed);
            return;
        }
        let policy = chunk_retry();
        let mut next = from;
        let mut attempt = 0;
        let (last_err, network) = loop {
            match self.stream_span(next..span.end, &mut next).await {
                Ok(()) => {
                    self.release(&claimed);
                    return;
                }
                Err(e) => {
                    tracing::debug!(image = %inner.image, chunks = ?(next..span.end), attempt, error = %e, "boot chunk fetch failed");
                    if e.is_network() || !policy.allows_another(attempt) {
                        break (e.to_string(), e.is_network());
                    }
                    tokio::time::sleep(policy.delay(attempt)).await;
                    attempt += 1;
                }
            }
        };
        self.release(&claimed);
        let mut s = inner.state.lock().unwrap();
        for &c in claimed.iter().filter(|&&c| c >= next) {
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
        tracing::error!(image = %inner.image, layer = %inner.layer.digest, chunks = ?(next..span.end), error = %last_err, "boot chunks could not be fetched");
        inner.changed.notify_all();
    }

    /// Chunks `span` by one Range GET, each accepted as it completes;
    /// `*next` follows the first chunk not yet in.
    async fn stream_span(
        &self,
        span: std::ops::Range<u32>,
        next: &mut u32,
    ) -> Result<(), OciError> {
        let inner = &self.inner;
        let base = inner.offsets[span.start as usize];
        let len = inner.offsets[span.end as usize] - base;
        let from = inner.region_len + base;
        let (ranged, mut body) = inner.remote.range_stream(from, len).await?;
        // A registry that ignored Range sends the blob from its start.
        let skip = if ranged { 0 } else { from };
        self.take_chunks(&mut Body::Stream(&mut body), span, next, skip)
            .await
    }

    /// The chunks of `span` from `body`, which holds them from `*next`'s
    /// start after `skip` bytes, each accepted as its last byte comes;
    /// `*next` follows the first chunk not yet in.
    async fn take_chunks(
        &self,
        body: &mut Body<'_>,
        span: std::ops::Range<u32>,
        next: &mut u32,
        mut skip: u64,
    ) -> Result<(), OciError> {
        let inner = &self.inner;
        let base = inner.offsets[*next as usize];
        let len = inner.offsets[span.end as usize] - base;
        let mut buf: Vec<u8> = Vec::new();
        let mut at = base;
        while *next < span.end {
            let end = inner.offsets[*next as usize + 1];
            while at + (buf.len() as u64) < end {
                match body.next().await {
                    Some(Ok(b)) => {
                        inner.first_in.get_or_init(Instant::now);
                        inner.fetched.fetch_add(b.len() as u64, Ordering::Relaxed);
                        let cut = skip.min(b.len() as u64);
                        skip -= cut;
                        buf.extend_from_slice(&b[cut as usize..]);
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(OciError::SizeMismatch {
                            what: format!(
                                "chunks {span:?} of boot layer {} of {}",
                                inner.layer.digest, inner.image
                            ),
                            expected: len,
                            actual: at + buf.len() as u64 - base,
                        })
                    }
                }
            }
            let cut = (end - at) as usize;
            let present = inner.state.lock().unwrap().chunks[*next as usize] == ChunkState::Present;
            if !present {
                self.accept(*next, &buf[..cut]);
            }
            // Its mark is written: a peer waiting for it may take it now.
            self.release(&[*next]);
            buf.drain(..cut);
            at = end;
            *next += 1;
        }
        Ok(())
    }

    /// Other processes starting the same image share the chunk cache: a
    /// chunk is fetched by the one holding its lock (a byte of `present`,
    /// see `lazylayer_sys::range_lock`). Of `claim`, the chunks this process
    /// could lock and that no peer has finished are left to fetch (the
    /// returned claim); those a peer finished are taken from the cache; those
    /// a peer is fetching are waited for on a thread of their own, and
    /// fetched here only if the peer let go without them (it failed, or
    /// died: the kernel drops a dead process's locks).
    fn share_with_peers(&self, claim: Claim) -> Option<Claim> {
        let present = &self.inner.present;
        let mut mine = Vec::new();
        let mut theirs = Vec::new();
        for c in claim.claimed {
            match range_lock::try_lock_range(present, u64::from(c), 1) {
                Ok(true) if self.adopt(c) => self.release(&[c]),
                Ok(false) => theirs.push(c),
                // Locked, or locks unavailable here: fetched by us.
                _ => mine.push(c),
            }
        }
        if !theirs.is_empty() {
            tracing::debug!(image = %self.inner.image, chunks = theirs.len(), "boot chunks on their way in another process");
            let me = self.clone();
            self.inner.rt.spawn(async move {
                let left = {
                    let me = me.clone();
                    tokio::task::spawn_blocking(move || me.wait_for_peers(theirs)).await
                };
                if let Ok(left) = left {
                    if let (Some(&first), Some(&last)) = (left.first(), left.last()) {
                        me.fetch_claim_locked(Claim {
                            span: first..last + 1,
                            claimed: left,
                        })
                        .await;
                    }
                }
            });
        }
        let (&first, &last) = (mine.first()?, mine.last()?);
        Some(Claim {
            span: first..last + 1,
            claimed: mine,
        })
    }

    /// Blocking: wait for each chunk's lock (its peer is done with it);
    /// the chunks the peer did not leave in the cache (locked by us now).
    fn wait_for_peers(&self, chunks: Vec<u32>) -> Vec<u32> {
        let mut left = Vec::new();
        for c in chunks {
            if range_lock::lock_range(&self.inner.present, u64::from(c), 1).is_ok() && self.adopt(c)
            {
                self.release(&[c]);
            } else {
                left.push(c);
            }
        }
        left
    }

    /// [`BootChunks::fetch_claim`] for chunks whose locks are ours already
    /// (taking an OFD lock again is granted at once): boxed, since the two
    /// call each other through a spawned task.
    fn fetch_claim_locked(&self, claim: Claim) -> futures_util::future::BoxFuture<'static, ()> {
        let me = self.clone();
        Box::pin(async move { me.fetch_claim(claim).await })
    }

    /// Chunk `c` from the cache if a peer wrote it there (its mark is set and
    /// its bytes match the index): accepted as if fetched. False otherwise.
    fn adopt(&self, c: u32) -> bool {
        let inner = &self.inner;
        let mut mark = [0u8];
        if inner
            .present
            .read_exact_at(&mut mark, u64::from(c))
            .is_err()
            || mark[0] != 1
        {
            return false;
        }
        let at = inner.offsets[c as usize];
        let mut bytes = vec![0u8; (inner.offsets[c as usize + 1] - at) as usize];
        if inner
            .blob
            .read_exact_at(&mut bytes, inner.region_len + at)
            .is_err()
            || Sha256::digest(&bytes).as_slice() != inner.content.chunks[c as usize].sha256
        {
            return false;
        }
        self.accept(c, &bytes);
        true
    }

    /// Let peers have `chunks` (a lock not held is no error).
    fn release(&self, chunks: &[u32]) {
        for &c in chunks {
            let _ = range_lock::unlock_range(&self.inner.present, u64::from(c), 1);
        }
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
