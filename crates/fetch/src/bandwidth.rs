//! A bandwidth limit for the background prefetch. On a node, prefetching
//! every image at full speed competes with other traffic (and with the
//! registry's rate limits); a reader that waits on a file must never be held
//! back by it, so only bytes nobody waits for are paced.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazylayer_oci::{BlobResume, Digest, OciError};
use lazylayer_store::{BlobStream, BoxFuture};
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::mpsc;

/// A rate shared by every fetch that takes from it (virtual-clock pacing:
/// each chunk moves a "next free" instant on by its transfer time at the
/// rate, and its sender sleeps until then).
#[derive(Debug)]
pub struct Bandwidth {
    bytes_per_sec: u64,
    next: Mutex<Instant>,
}

/// Unused time that may be spent at once: a short burst after a pause,
/// not a second of full speed.
const BURST: Duration = Duration::from_millis(100);

impl Bandwidth {
    pub fn new(bytes_per_sec: u64) -> Arc<Bandwidth> {
        Arc::new(Bandwidth {
            bytes_per_sec: bytes_per_sec.max(1),
            next: Mutex::new(Instant::now()),
        })
    }

    /// The process's one limit: every image's prefetch shares it (the
    /// first rate asked for wins; a process has one configuration).
    pub fn shared(bytes_per_sec: u64) -> Arc<Bandwidth> {
        static SHARED: OnceLock<Arc<Bandwidth>> = OnceLock::new();
        SHARED.get_or_init(|| Bandwidth::new(bytes_per_sec)).clone()
    }

    pub fn bytes_per_sec(&self) -> u64 {
        self.bytes_per_sec
    }

    /// How long to wait before sending `n` more bytes.
    pub fn reserve(&self, n: u64) -> Duration {
        let now = Instant::now();
        let cost = Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        let mut next = self.next.lock().unwrap();
        let start = (*next).max(now.checked_sub(BURST).unwrap_or(now));
        *next = start + cost;
        next.saturating_duration_since(now + BURST)
    }
}

/// A layer source whose bytes are paced by `limit` until `urgent` is set (a
/// reader asked for this layer: from then on it goes at full speed).
pub(crate) struct Throttled {
    pub inner: Arc<dyn BlobStream>,
    pub limit: Arc<Bandwidth>,
    pub urgent: Arc<AtomicBool>,
}

impl BlobStream for Throttled {
    fn stream<'a>(
        &'a self,
        digest: &'a Digest,
        expected_size: u64,
        resume: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<u64, OciError>> {
        Box::pin(async move {
            // A short queue: while chunks wait here, the download behind it
            // stops reading, and TCP slows the registry down.
            let (mid_tx, mut mid_rx) = mpsc::channel::<Bytes>(2);
            let download = self
                .inner
                .stream(digest, expected_size, resume, mid_tx, progress);
            let forward = async move {
                while let Some(chunk) = mid_rx.recv().await {
                    if !self.urgent.load(Ordering::Relaxed) {
                        let wait = self.limit.reserve(chunk.len() as u64);
                        if !wait.is_zero() {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    if tx.send(chunk).await.is_err() {
                        // The consumer went: dropping `mid_rx` tells the download.
                        break;
                    }
                }
            };
            let (r, ()) = tokio::join!(download, forward);
            r
        })
    }

    fn distrust(&self, digest: &Digest) -> bool {
        self.inner.distrust(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pacing is arithmetic on a virtual clock: what matters is the
    /// wait asked for, not how long a loaded machine takes to sleep it.
    #[test]
    fn waits_add_up_to_the_rate_beyond_a_short_burst() {
        let b = Bandwidth::new(1_000_000);
        // 100 ms of burst at 1 MB/s: the first 100 kB go at once.
        assert_eq!(b.reserve(100_000), Duration::ZERO);
        // The next megabyte is a second behind.
        let w = b.reserve(1_000_000);
        assert!(
            w >= Duration::from_millis(950) && w <= Duration::from_millis(1050),
            "{w:?}"
        );
        // And the one after that two.
        let w = b.reserve(1_000_000);
        assert!(w >= Duration::from_millis(1950), "{w:?}");
    }
}
