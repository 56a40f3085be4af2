//! What a lazylayer process has done, for a Prometheus scrape: bytes fetched
//! on demand and by prefetch, reads waiting for content and how long they
//! waited, fetch errors by cause, the store's size and evictions, lazy roots
//! mounted.
//!
//! The counters are process-wide (one snapshotter or Podman store serves
//! every image of a node), so the crates that see the events (file system,
//! fetcher, store) record into them directly, with no handle passed down,
//! and the long-lived servers encode them on `GET /metrics`.

use std::sync::LazyLock;
use std::time::Instant;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

struct Metrics {
    fetched_bytes: Family<Labels, Counter>,
    reads_waiting: Gauge,
    read_wait_seconds: Histogram,
    fetch_errors: Family<Labels, Counter>,
    store_bytes: Gauge,
    store_limit_bytes: Gauge,
    evictions: Counter,
    evicted_bytes: Counter,
    mounts: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    fetched_bytes: Family::default(),
    reads_waiting: Gauge::default(),
    // From a file that lands in a millisecond to the bounded wait's end
    // (60 s by default, then EIO).
    read_wait_seconds: Histogram::new([
        0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]),
    fetch_errors: Family::default(),
    store_bytes: Gauge::default(),
    store_limit_bytes: Gauge::default(),
    evictions: Counter::default(),
    evicted_bytes: Counter::default(),
    mounts: Gauge::default(),
});

/// Why a byte was fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// A reader asked for it (its layer, or its range).
    OnDemand,
    /// The background prefetch took it.
    Prefetch,
}

/// `n` bytes arrived from a registry.
pub fn fetched(reason: Reason, n: u64) {
    let r = match reason {
        Reason::OnDemand => "on_demand",
        Reason::Prefetch => "prefetch",
    };
    METRICS
        .fetched_bytes
        .get_or_create(&vec![("reason", r)])
        .inc_by(n);
}

/// One fetch failed; `cause` is one of a few fixed words (see
/// [`FetchErrorCause`]), so that labels stay bounded whatever an error says.
pub fn fetch_error(cause: FetchErrorCause) {
    METRICS
        .fetch_errors
        .get_or_create(&vec![("cause", cause.as_str())])
        .inc();
}

/// The kinds of fetch failure a dashboard tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FetchErrorCause {
    /// Bytes that do not match their digest or size.
    Digest,
    /// Refused, closed or reset connections, TLS failures.
    Connection,
    /// No answer, or a stalled body, past the limits.
    Timeout,
    /// The registry answered with an error status.
    Status,
    /// A layer the archive reader or extraction refused.
    Content,
    /// Local disk (a full disk, permissions).
    Disk,
    Other,
}

impl FetchErrorCause {
    pub fn as_str(self) -> &'static str {
        match self {
            FetchErrorCause::Digest => "digest",
            FetchErrorCause::Connection => "connection",
            FetchErrorCause::Timeout => "timeout",
            FetchErrorCause::Status => "status",
            FetchErrorCause::Content => "content",
            FetchErrorCause::Disk => "disk",
            FetchErrorCause::Other => "other",
        }
    }
}

/// A read waiting for its content: counted in `reads_waiting` while alive,
/// and its wait observed in the histogram when dropped.
pub struct ReadWait {
    since: Instant,
}

impl ReadWait {
    pub fn start() -> ReadWait {
        METRICS.reads_waiting.inc();
        ReadWait {
            since: Instant::now(),
        }
    }
}

impl Drop for ReadWait {
    fn drop(&mut self) {
        METRICS.reads_waiting.dec();
        METRICS
            .read_wait_seconds
            .observe(self.since.elapsed().as_secs_f64());
    }
}

/// A lazy root mounted by this process: counted while alive.
pub struct MountedRoot(());

impl MountedRoot {
    pub fn start() -> MountedRoot {
        METRICS.mounts.inc();
        MountedRoot(())
    }
}

impl Drop for MountedRoot {
    fn drop(&mut self) {
        METRICS.mounts.dec();
    }
}

/// The store's size on disk and its limit (0: none), as last measured.
pub fn store_usage(bytes: u64, limit: Option<u64>) {
    METRICS.store_bytes.set(clamp(bytes));
    METRICS.store_limit_bytes.set(clamp(limit.unwrap_or(0)));
}

/// Content evicted from the store to keep it under its limit.
pub fn evicted(items: u64, bytes: u64) {
    METRICS.evictions.inc_by(items);
    METRICS.evicted_bytes.inc_by(bytes);
}

fn clamp(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Every metric in the Prometheus text exposition format.
pub fn encode_text() -> String {
    let m = &*METRICS;
    let mut reg = Registry::with_prefix("lazylayer");
    reg.register(
        "fetched_bytes",
        "Bytes fetched from registries, by why: a reader asked (on_demand) or the background prefetch",
        m.fetched_bytes.clone(),
    );
    reg.register(
        "reads_waiting",
        "Reads on lazy roots waiting for their content now",
        m.reads_waiting.clone(),
    );
    reg.register(
        "read_wait_seconds",
        "How long reads on lazy roots waited for their content",
        m.read_wait_seconds.clone(),
    );
    reg.register(
        "fetch_errors",
        "Layer and range fetches that failed, by cause",
        m.fetch_errors.clone(),
    );
    reg.register(
        "store_bytes",
        "Size of the store's content on disk",
        m.store_bytes.clone(),
    );
    reg.register(
        "store_limit_bytes",
        "The store's size limit (0: none)",
        m.store_limit_bytes.clone(),
    );
    reg.register(
        "evictions",
        "Images evicted from the store to keep it under its limit",
        m.evictions.clone(),
    );
    reg.register(
        "evicted_bytes",
        "Bytes evicted from the store to keep it under its limit",
        m.evicted_bytes.clone(),
    );
    reg.register(
        "mounts",
        "Lazy roots this process has mounted",
        m.mounts.clone(),
    );
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str, series: &str) -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    #[test]
    fn recorded_events_show_in_the_text_format() {
        fetched(Reason::OnDemand, 1000);
        fetched(Reason::Prefetch, 5);
        fetch_error(FetchErrorCause::Digest);
        let mount = MountedRoot::start();
        {
            let _w = ReadWait::start();
            let t = encode_text();
            assert!(value(&t, "lazylayer_reads_waiting") >= 1.0);
            assert!(value(&t, "lazylayer_mounts") >= 1.0);
        }
        drop(mount);
        store_usage(4096, Some(200_000_000));
        evicted(1, 300);
        let t = encode_text();
        assert!(value(&t, "lazylayer_fetched_bytes_total{reason=\"on_demand\"}") >= 1000.0);
        assert!(value(&t, "lazylayer_fetched_bytes_total{reason=\"prefetch\"}") >= 5.0);
        assert!(value(&t, "lazylayer_fetch_errors_total{cause=\"digest\"}") >= 1.0);
        assert!(value(&t, "lazylayer_read_wait_seconds_count") >= 1.0);
        assert_eq!(value(&t, "lazylayer_store_limit_bytes"), 200_000_000.0);
        assert!(value(&t, "lazylayer_evicted_bytes_total") >= 300.0);
        assert!(
            t.contains("# TYPE lazylayer_read_wait_seconds histogram"),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"), "{t}");
    }
}
