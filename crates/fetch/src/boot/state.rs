//! Which chunks of a boot layer are local, being fetched, or failed: plain
//! data behind the reader's mutex, never blocking.

use std::io;
use std::ops::Range;

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum ChunkState {
    Absent,
    Fetching,
    Present,
    /// Bad bytes (or none to be had): never fetched again.
    Failed(String),
    /// The registry could not be reached: fetched again when a reader asks
    /// (failing at once while the host's breaker is open).
    Unreachable(String),
}

pub(super) struct State {
    pub(super) chunks: Vec<ChunkState>,
    /// The registry ignored Range: the whole blob streams in, in order.
    pub(super) streaming: bool,
    /// The whole blob is verified and in the store as a layer.
    pub(super) stored: bool,
    pub(super) ingesting: bool,
    pub(super) rest_started: bool,
    /// Spans of the start set planned but not yet sent (each waits for a
    /// request slot), in blob order: a reader's request that lands in one
    /// takes the rest of it along ([`State::claim_wanted`]).
    pub(super) queued: Vec<Range<u32>>,
}

impl State {
    /// The next run of `list` from `*i` (advanced past it): `list[*i]`,
    /// `list[*i]+1`, ... while they follow in the list and are absent, up
    /// to `max` compressed bytes (`offsets`: chunk starts, and the end),
    /// marked fetching. None when `list[*i]` is not absent (skipped).
    pub(super) fn take_run(
        &mut self,
        list: &[u32],
        i: &mut usize,
        offsets: &[u64],
        max: u64,
    ) -> Option<Range<u32>> {
        let first = list[*i];
        *i += 1;
        if self.chunks[first as usize] != ChunkState::Absent {
            return None;
        }
        let mut end = first + 1;
        while *i < list.len()
            && list[*i] == end
            && self.chunks[end as usize] == ChunkState::Absent
            && offsets[end as usize + 1] - offsets[first as usize] <= max
        {
            end += 1;
            *i += 1;
        }
        for c in first..end {
            self.chunks[c as usize] = ChunkState::Fetching;
        }
        Some(first..end)
    }

    /// The chunks of `range` a reader needs fetched, claimed for one request
    /// (marked fetching): absent chunks, and those the registry could not be
    /// reached for (asked again); not those present, failed for good, or
    /// already on the way. One span from the first to the last claimed, so a
    /// read window costs one request even when chunks in it are local or on
    /// their way already (a few of them come twice). A window in a queued
    /// start-set span takes the rest of that span too, leaving it the part
    /// before the window: else the span, trimmed only at its ends when its
    /// slot comes, would fetch the reader's chunks a second time.
    pub(super) fn claim_wanted(&mut self, range: Range<u32>) -> Option<Claim> {
        let end = self.take_queued_from(&range);
        self.claim(range.start..end, |c| {
            matches!(c, ChunkState::Absent | ChunkState::Unreachable(_))
        })
    }

    /// Cut the queued spans that `range` lands in back to their part before
    /// it (dropped when none is left); the end of the last of them, or
    /// `range`'s if later.
    fn take_queued_from(&mut self, range: &Range<u32>) -> u32 {
        let mut end = range.end;
        self.queued.retain_mut(|q| {
            if q.end <= range.start || q.start >= range.end {
                return true;
            }
            end = end.max(q.end);
            q.end = range.start;
            q.start < q.end
        });
        end
    }

    /// The compressed bytes of the start set's spans still queued.
    pub(super) fn queued_bytes(&self, offsets: &[u64]) -> u64 {
        super::plan::spans_bytes(&self.queued, offsets)
    }

    /// The next queued start-set span, off the queue, its slot come (None
    /// when readers took all that was left). With `join`, the queued spans
    /// that follow it come along while the compressed bytes between are at
    /// most that, the whole at most `max` (`offsets`: chunk starts, and the
    /// end), and every chunk between is absent: one a reader's request
    /// holds (the tail it cut from a span, a span it took whole) would
    /// otherwise come twice.
    pub(super) fn next_queued(
        &mut self,
        offsets: &[u64],
        join: Option<u64>,
        max: u64,
    ) -> Option<Range<u32>> {
        if self.queued.is_empty() {
            return None;
        }
        let mut span = self.queued.remove(0);
        let Some(gap) = join else {
            return Some(span);
        };
        while let Some(next) = self.queued.first() {
            let between = offsets[next.start as usize] - offsets[span.end as usize];
            let joined = offsets[next.end as usize] - offsets[span.start as usize];
            let free =
                (span.end..next.start).all(|c| self.chunks[c as usize] == ChunkState::Absent);
            if between > gap || joined > max || !free {
                break;
            }
            span.end = next.end;
            self.queued.remove(0);
        }
        Some(span)
    }

    /// Queued spans to ride as parts of the request of one just taken off
    /// the queue's front, when `stride` requests (this one among them)
    /// share what is queued: every `stride`-th, at most `most`, in blob
    /// order. Each request's first part is then among the first spans, its
    /// second among the next `stride`, and so on: the connections, sharing
    /// the link, bring the spans in about the order they are needed (taken
    /// in a row, the first request's later parts came before the next
    /// requests' first ones, and python3 at 100 Mbit/s started later).
    pub(super) fn take_every(&mut self, stride: usize, most: usize) -> Vec<Range<u32>> {
        if stride == 0 {
            return Vec::new();
        }
        // The front span is gone: the `k`-th after it was at `k * stride`.
        let at: Vec<usize> = (1..=most)
            .map(|k| k * stride - 1)
            .take_while(|&i| i < self.queued.len())
            .collect();
        let mut out: Vec<Range<u32>> = at.iter().rev().map(|&i| self.queued.remove(i)).collect();
        out.reverse();
        out
    }

    /// The absent chunks of `span` claimed for one request of the start set
    /// or the prefetch; the span trimmed to them. None when none is absent.
    pub(super) fn claim_span(&mut self, span: Range<u32>) -> Option<Claim> {
        self.claim(span, |c| *c == ChunkState::Absent)
    }

    fn claim(&mut self, range: Range<u32>, wanted: impl Fn(&ChunkState) -> bool) -> Option<Claim> {
        let claimed: Vec<u32> = range
            .filter(|&c| wanted(&self.chunks[c as usize]))
            .collect();
        let (&first, &last) = (claimed.first()?, claimed.last()?);
        for &c in &claimed {
            self.chunks[c as usize] = ChunkState::Fetching;
        }
        Some(Claim {
            span: first..last + 1,
            claimed,
        })
    }
}

/// One request's chunks: the span it asks for, and the chunks it claimed
/// (the others in the span are local or another request's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Claim {
    pub span: Range<u32>,
    pub claimed: Vec<u32>,
}

/// Whether chunks `range` can be read: all present (Ok), one failed (the
/// error: InvalidData for bad bytes, which the file system logs as refused
/// content; HostUnreachable when the registry could not be reached), or not yet.
pub(super) fn verdict(s: &State, range: Range<u32>) -> Option<io::Result<()>> {
    let mut all = true;
    for c in range {
        match &s.chunks[c as usize] {
            ChunkState::Present => {}
            ChunkState::Failed(m) => {
                return Some(Err(io::Error::new(io::ErrorKind::InvalidData, m.clone())))
            }
            ChunkState::Unreachable(m) => {
                return Some(Err(io::Error::new(
                    io::ErrorKind::HostUnreachable,
                    m.clone(),
                )))
            }
            _ => all = false,
        }
    }
    all.then_some(Ok(()))
}
