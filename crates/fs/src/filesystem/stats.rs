//! Counters of the file system's activity, shared with its owner.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Counters of how opens were served, shared with the caller (see
/// [`LazyFs::stats`]) so tests and benchmarks can tell passthrough from
/// daemon reads.
#[derive(Debug, Default)]
pub struct FsStats {
    /// Requests of the kinds a starting program makes (lookups, attributes,
    /// opens, reads, directory listings): a measure of activity.
    pub(super) requests: AtomicU64,
    pub(super) passthrough_opens: AtomicU64,
    pub(super) daemon_opens: AtomicU64,
    pub(super) read_requests: AtomicU64,
    /// Bytes handed to the kernel's page cache at open (never READ here).
    pub(super) preloaded_bytes: AtomicU64,
    /// Opens and reads waiting for content (running or queued).
    pub(super) waiting: AtomicU64,
    /// Waiting requests answered EIO because the pool's queue was full.
    pub(super) refused_waits: AtomicU64,
    /// The kernel was told to open files alone (cached opens).
    pub(super) kernel_opens: AtomicBool,
}

impl FsStats {
    /// Lookups, getattrs, opens, reads, listings, flushes and xattr
    /// requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }
    /// Opens the kernel serves from the backing file directly.
    pub fn passthrough_opens(&self) -> u64 {
        self.passthrough_opens.load(Ordering::Relaxed)
    }
    /// Opens whose reads come to this daemon.
    pub fn daemon_opens(&self) -> u64 {
        self.daemon_opens.load(Ordering::Relaxed)
    }
    /// READ requests this daemon answered.
    pub fn read_requests(&self) -> u64 {
        self.read_requests.load(Ordering::Relaxed)
    }
    /// Bytes of ranged content handed to the page cache when opened.
    pub fn preloaded_bytes(&self) -> u64 {
        self.preloaded_bytes.load(Ordering::Relaxed)
    }
    /// Opens and reads waiting for their content now.
    pub fn waiting(&self) -> u64 {
        self.waiting.load(Ordering::Relaxed)
    }
    /// Whether the kernel opens files alone now (cached opens): opens are
    /// then no longer counted here.
    pub fn kernel_opens(&self) -> bool {
        self.kernel_opens.load(Ordering::Relaxed)
    }
    /// Waiting requests refused (EIO) past the pool's bound.
    pub fn refused_waits(&self) -> u64 {
        self.refused_waits.load(Ordering::Relaxed)
    }
}

/// Counts one waiting request while alive (here and in the process's
/// metrics, which also time it).
pub(super) struct Waiting(
    Arc<FsStats>,
    #[allow(dead_code)] lazylayer_metrics::ReadWait,
);

impl Waiting {
    pub(super) fn new(stats: &Arc<FsStats>) -> Waiting {
        stats.waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(stats.clone(), lazylayer_metrics::ReadWait::start())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}
