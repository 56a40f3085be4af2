//! The download → partial file → decompress → extract pipeline's halves: the
//! download appends every byte it receives to the partial file at once
//! ([`write_received`]), and the extractor, on a blocking thread of its own,
//! reads that file as it grows ([`FollowReader`]). The download never waits
//! for the extraction: a run that ends while the extraction is behind keeps
//! every byte it received.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::sync::{Condvar, Mutex};

use bytes::Bytes;
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

/// What the partial file holds, shared by its writer and its reader.
pub struct Received {
    state: Mutex<ReceivedState>,
    changed: Condvar,
}

struct ReceivedState {
    /// Bytes of the blob in the file, the kept prefix included.
    len: u64,
    /// No byte will be added any more (the download ended, however).
    ended: bool,
    /// The fetch was dropped (cancelled): the extraction is of no use.
    cancelled: bool,
    /// The extraction failed: the rest of the download is of no use.
    extraction_failed: bool,
}

impl Received {
    /// A partial file that holds `len` bytes already.
    pub fn new(len: u64) -> Received {
        Received {
            state: Mutex::new(ReceivedState {
                len,
                ended: false,
                cancelled: false,
                extraction_failed: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn update(&self, f: impl FnOnce(&mut ReceivedState)) {
        f(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }

    /// No byte will be added any more.
    pub fn end(&self) {
        self.update(|s| s.ended = true);
    }

    /// The fetch is given up: the extractor stops at its next read.
    pub fn cancel(&self) {
        self.update(|s| s.cancelled = true);
    }

    /// The extractor gave up: the writer stops taking bytes. Not when it
    /// stopped because the fetch was cancelled: the bytes still on their way
    /// to the file (up to a channel's worth) are kept then.
    pub fn extraction_failed(&self) {
        self.update(|s| s.extraction_failed = !s.cancelled);
    }
}

/// Append every chunk received on `rx` to `out` (the partial file, positioned
/// at its end, which holds `received`'s length) as it arrives, whatever the
/// extraction's progress; `kept` hears the file's new length after each.
/// Returns the file's length when the download ends (its sender dropped: done,
/// failed or cancelled), after a `sync_data`; stops early, dropping `rx` (the
/// download then sees its consumer gone), when the extraction failed.
pub fn write_received(
    mut rx: mpsc::Receiver<Bytes>,
    out: &mut File,
    received: &Received,
    kept: &dyn Fn(u64),
) -> io::Result<u64> {
    // This thread alone grows `len`: its count is the file's.
    let mut len = received.state.lock().unwrap().len;
    let written = (|| -> io::Result<()> {
        while let Some(chunk) = rx.blocking_recv() {
            if received.state.lock().unwrap().extraction_failed {
                break;
            }
            // Unbuffered: a process killed next still leaves these bytes in
            // the file (the page cache has them).
            out.write_all(&chunk)?;
            // Counted kept before the reader may see them: the extraction
            // then never reports more than is kept.
            len += chunk.len() as u64;
            kept(len);
            received.update(|s| s.len = len);
        }
        Ok(())
    })();
    // Whatever happened, no more bytes: the reader must not wait for them.
    received.end();
    written?;
    out.sync_data()?;
    Ok(received.state.lock().unwrap().len)
}

/// Reads the partial file from its start as the download appends to it:
/// waits when it has read every byte written so far, EOF once the download
/// has ended and every byte is read, an error once the fetch is cancelled.
pub struct FollowReader<'a> {
    pub file: File,
    pub received: &'a Received,
    /// Bytes read so far (from the file's start).
    pub pos: u64,
}

impl Read for FollowReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut s = self.received.state.lock().unwrap();
        let available = loop {
            if s.cancelled {
                return Err(io::Error::other("layer fetch cancelled"));
            }
            if s.len > self.pos || s.ended {
                break s.len.saturating_sub(self.pos);
            }
            s = self.received.changed.wait(s).unwrap();
        };
        drop(s);
        let want = buf
            .len()
            .min(usize::try_from(available).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

/// Hashes what is read through it (the uncompressed tar → diff_id).
pub struct HashingReader<R> {
    pub inner: R,
    pub hasher: Sha256,
    pub count: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            count: 0,
        }
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The writer keeps every byte even when nobody reads: the extraction
    /// being behind (or never starting) does not hold the download back.
    #[test]
    fn every_received_byte_is_written_without_a_reader() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("partial");
        let mut out = File::create(&path).unwrap();
        let received = Received::new(0);
        let (tx, rx) = mpsc::channel(2);
        let sender = std::thread::spawn(move || {
            for i in 0..100u8 {
                tx.blocking_send(Bytes::from(vec![i; 1000])).unwrap();
            }
        });
        let len = write_received(rx, &mut out, &received, &|_| {}).unwrap();
        sender.join().unwrap();
        assert_eq!(len, 100_000);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(data.len(), 100_000);
        assert_eq!(data[99_999], 99);
    }

    /// `kept` hears of each chunk before the reader may read it, so the
    /// extraction never reports more bytes than are kept (a `status` taken
    /// between the two showed `extracted` > `kept`).
    #[test]
    fn bytes_are_kept_before_the_reader_sees_them() {
        let t = tempfile::tempdir().unwrap();
        let mut out = File::create(t.path().join("partial")).unwrap();
        let received = Received::new(0);
        let (tx, rx) = mpsc::channel(2);
        tx.blocking_send(Bytes::from_static(b"abc")).unwrap();
        tx.blocking_send(Bytes::from_static(b"de")).unwrap();
        drop(tx);
        let heard = Mutex::new(Vec::new());
        let kept = |n: u64| {
            let visible = received.state.lock().unwrap().len;
            heard.lock().unwrap().push((n, visible));
        };
        assert_eq!(write_received(rx, &mut out, &received, &kept).unwrap(), 5);
        assert_eq!(*heard.lock().unwrap(), vec![(3, 0), (5, 3)]);
    }

    /// The reader follows the file as it grows, and stops at a cancel.
    #[test]
    fn the_reader_follows_the_writer_and_stops_when_cancelled() {
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("partial");
        std::fs::write(&path, b"kept").unwrap();
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        let received = Received::new(4);
        let (tx, rx) = mpsc::channel(2);
        std::thread::scope(|scope| {
            let w = scope.spawn(|| write_received(rx, &mut out, &received, &|_| {}));
            tx.blocking_send(Bytes::from_static(b" and more")).unwrap();
            drop(tx);
            let mut r = FollowReader {
                file: File::open(&path).unwrap(),
                received: &received,
                pos: 0,
            };
            let mut all = String::new();
            r.read_to_string(&mut all).unwrap();
            assert_eq!(all, "kept and more");
            assert_eq!(w.join().unwrap().unwrap(), 13);
        });

        // A cancel stops the reader but not the writer: every byte the
        // download received still reaches the file.
        let received = Received::new(4);
        received.cancel();
        received.extraction_failed();
        let (tx, rx) = mpsc::channel(2);
        tx.blocking_send(Bytes::from_static(b"!")).unwrap();
        drop(tx);
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        assert_eq!(write_received(rx, &mut out, &received, &|_| {}).unwrap(), 5);
        let mut r = FollowReader {
            file: File::open(&path).unwrap(),
            received: &received,
            pos: 0,
        };
        assert!(r.read(&mut [0u8; 8]).is_err());
    }
}
