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

    /// The runs of `range` a reader needs fetched, marked fetching: absent
    /// chunks, and those the registry could not be reached for (asked
    /// again); not those present, failed for good, or already on the way.
    pub(super) fn claim_wanted(&mut self, range: Range<u32>) -> Vec<Range<u32>> {
        let wanted = |c: &ChunkState| matches!(c, ChunkState::Absent | ChunkState::Unreachable(_));
        let mut runs = Vec::new();
        let mut c = range.start;
        while c < range.end {
            if !wanted(&self.chunks[c as usize]) {
                c += 1;
                continue;
            }
            let first = c;
            while c < range.end && wanted(&self.chunks[c as usize]) {
                self.chunks[c as usize] = ChunkState::Fetching;
                c += 1;
            }
            runs.push(first..c);
        }
        runs
    }
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
