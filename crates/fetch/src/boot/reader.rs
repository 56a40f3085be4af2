//! The reader side of a chunked boot layer: a file's bytes are read from
//! the cache once their chunks are local; a reader asks for the missing
//! ones and waits (bounded) for the state to change. It never fetches.

use std::io;
use std::os::unix::fs::FileExt;
use std::time::Instant;

use lazylayer_fs::RangedContent;

use super::state::{verdict, ChunkState};
use super::BootChunks;

impl BootChunks {
    /// Read `buf.len()` content bytes at `off` if every chunk is local;
    /// `None` (and the missing chunks asked for) otherwise.
    pub(super) fn try_read(&self, off: u64, buf: &mut [u8]) -> Option<io::Result<()>> {
        let range = self.inner.content.chunks_covering(off, buf.len() as u64);
        let verdict = {
            let s = self.inner.state.lock().unwrap();
            let retry = range
                .clone()
                .any(|c| matches!(s.chunks[c as usize], ChunkState::Unreachable(_)));
            // Asked again below, and waited for in `read`.
            (!retry).then(|| verdict(&s, range.clone())).flatten()
        };
        match verdict {
            Some(Ok(())) => Some(self.inner.cache.read_exact_at(buf, off)),
            Some(Err(e)) => Some(Err(e)),
            None => {
                self.demand(range);
                None
            }
        }
    }

    /// The first `len` bytes of the content, waiting (bounded) for them
    /// (the files' digests kept apart from the index open the content).
    pub(crate) fn read_prefix(&self, len: u64) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.read(0, &mut buf)?;
        Ok(buf)
    }

    /// [`BootChunks::read_prefix`] if every chunk is local; else None, and
    /// the missing ones asked for.
    pub(crate) fn try_read_prefix(&self, len: u64) -> Option<io::Result<Vec<u8>>> {
        let mut buf = vec![0u8; len as usize];
        Some(self.try_read(0, &mut buf)?.map(|()| buf))
    }

    /// The parts of content bytes `start..start + len` whose chunks are
    /// present (verified), relative to `start`, in order.
    pub(super) fn present_within(&self, start: u64, len: u64) -> Vec<std::ops::Range<u64>> {
        let content = &self.inner.content;
        let cs = u64::from(content.chunk_size);
        let end = start + len;
        let s = self.inner.state.lock().unwrap();
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        for c in content.chunks_covering(start, len) {
            if s.chunks[c as usize] != ChunkState::Present {
                continue;
            }
            let from = (u64::from(c) * cs).max(start) - start;
            let to = (u64::from(c + 1) * cs).min(end) - start;
            match out.last_mut() {
                Some(last) if last.end == from => last.end = to,
                _ => out.push(from..to),
            }
        }
        out
    }

    /// Read, waiting (at most the read timeout) for the chunks.
    pub(super) fn read(&self, off: u64, buf: &mut [u8]) -> io::Result<()> {
        let inner = &self.inner;
        let range = inner.content.chunks_covering(off, buf.len() as u64);
        self.demand(range.clone());
        let deadline = Instant::now() + inner.read_timeout;
        let mut s = inner.state.lock().unwrap();
        loop {
            if let Some(v) = verdict(&s, range.clone()) {
                drop(s);
                v?;
                return inner.cache.read_exact_at(buf, off);
            }
            // The stream broke meanwhile: ask for the chunks ourselves.
            if !s.streaming
                && range
                    .clone()
                    .any(|c| s.chunks[c as usize] == ChunkState::Absent)
            {
                drop(s);
                self.demand(range.clone());
                s = inner.state.lock().unwrap();
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "waited {:?} for chunks {range:?} of boot layer {} of {}",
                        inner.read_timeout, inner.layer.digest, inner.image
                    ),
                ));
            }
            s = inner.changed.wait_timeout(s, deadline - now).unwrap().0;
        }
    }
}

/// One boot file's bytes: `size` bytes at `start` of the content tar.
pub(super) struct BootFile {
    pub(super) chunks: BootChunks,
    pub(super) start: u64,
    pub(super) size: u64,
}

impl BootFile {
    fn clamp(&self, buf_len: usize, offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf_len as u64) > self.size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "read past the file's end",
            ));
        }
        Ok(())
    }
}

impl RangedContent for BootFile {
    fn try_read_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if let Err(e) = self.clamp(buf.len(), offset) {
            return Some(Err(e));
        }
        if buf.is_empty() {
            return Some(Ok(()));
        }
        self.chunks.try_read(self.start + offset, buf)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.clamp(buf.len(), offset)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.chunks.read(self.start + offset, buf)
    }

    fn local_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.chunks.present_within(self.start, self.size)
    }
}
