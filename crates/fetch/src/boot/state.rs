//! Which chunks of a boot layer are local, being fetched, or failed: plain
//! data behind the reader's mutex, never blocking.

use std::io;

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

/// Whether chunks `range` can be read: all present (Ok), one failed (the
/// error: InvalidData for bad bytes, which the file system logs as refused
/// content; HostUnreachable when the registry could not be reached), or not yet.
pub(super) fn verdict(s: &State, range: std::ops::Range<u32>) -> Option<io::Result<()>> {
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
