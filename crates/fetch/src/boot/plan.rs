//! The request plan of a start: which Range GETs fetch the start set, given
//! what the link is measured to be. Plain functions, no I/O.
//!
//! A distant registry makes every request cost a round trip, so the start
//! set goes out at once, [`IN_FLIGHT`](super::IN_FLIGHT) requests at a time,
//! and runs of wanted chunks separated by a small gap are fetched as one
//! request, the gap's chunks with them (they are part of the layer, and the
//! prefetch would fetch them anyway). A gap is worth fetching when sending it
//! takes less time than the share of a round trip a request costs on a full
//! pipe: with `n` requests in flight on a link of rate `r` and round trip
//! `t`, one more request costs about `t / n`, its gap `g / r`; hence
//! `g <= r * t / n`, the bandwidth-delay product shared by the requests.

use std::ops::Range;
use std::path::Path;
use std::time::Duration;

/// The file beside a chunk cache that keeps the link's estimate.
const LINK_FILE: &str = "link";

/// Smallest gap always bridged: below it a request's headers and the
/// registry's per-request work cost more than the bytes.
pub(super) const MIN_GAP: u64 = 16 << 10;
/// Largest gap bridged, however long and fast the link.
pub(super) const MAX_GAP: u64 = 4 << 20;
/// The gap when nothing was measured (the index region came from the
/// cache): a link of ~100 Mbit/s with a few milliseconds' round trip.
pub(super) const DEFAULT_GAP: u64 = 64 << 10;

/// What one response told of the link to the registry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkEstimate {
    /// From sending the request to the first byte of the body.
    pub first_byte: Duration,
    /// Body bytes per second after the first byte.
    pub bytes_per_sec: f64,
}

impl LinkEstimate {
    /// From a response of `bytes` whose first byte came `first_byte` after
    /// the request and whose last came `transfer` after that. None when the
    /// transfer was too short to time (a rate from microseconds is noise).
    pub(crate) fn measure(
        bytes: u64,
        first_byte: Duration,
        transfer: Duration,
    ) -> Option<LinkEstimate> {
        (transfer >= Duration::from_millis(1) && bytes >= 16 << 10).then(|| LinkEstimate {
            first_byte,
            bytes_per_sec: bytes as f64 / transfer.as_secs_f64(),
        })
    }

    /// Kept beside a chunk cache (`dir/link`, two numbers) for the starts
    /// that find the index region there.
    pub(crate) fn save(&self, dir: &Path) {
        let text = format!(
            "{} {}\n",
            self.first_byte.as_micros(),
            self.bytes_per_sec as u64
        );
        let _ = lazylayer_sys::durable::write_atomically_unsynced(
            &dir.join(LINK_FILE),
            text.as_bytes(),
        );
    }

    /// What [`LinkEstimate::save`] kept, if it reads as a sane estimate.
    pub(crate) fn load(dir: &Path) -> Option<LinkEstimate> {
        let text = std::fs::read_to_string(dir.join(LINK_FILE)).ok()?;
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().ok());
        let (micros, rate) = (it.next()??, it.next()??);
        (micros <= 60_000_000 && rate > 0).then(|| LinkEstimate {
            first_byte: Duration::from_micros(micros),
            bytes_per_sec: rate as f64,
        })
    }

    /// The gap (compressed bytes) worth fetching rather than opening one
    /// more request, with `in_flight` requests at once (module docs).
    pub(crate) fn gap(&self, in_flight: usize) -> u64 {
        let bdp = self.bytes_per_sec * self.first_byte.as_secs_f64();
        ((bdp / in_flight.max(1) as f64) as u64).clamp(MIN_GAP, MAX_GAP)
    }
}

/// The spans of chunks that fetch `list` (chunk numbers, any order, with
/// repeats): runs of consecutive chunks, neighbouring runs joined when the
/// compressed bytes between them are at most `gap` and the joined span at
/// most `max` bytes (a single chunk larger than `max` is its own span).
/// `offsets` are the chunk starts and the end. In blob order.
pub(super) fn start_spans(list: &[u32], offsets: &[u64], gap: u64, max: u64) -> Vec<Range<u32>> {
    let mut sorted: Vec<u32> = list
        .iter()
        .copied()
        .filter(|&c| (c as usize) + 1 < offsets.len())
        .collect();
    sorted.sort_unstable();
    sorted.dedup();
    let bytes = |r: &Range<u32>| offsets[r.end as usize] - offsets[r.start as usize];
    let mut spans: Vec<Range<u32>> = Vec::new();
    for c in sorted {
        if let Some(last) = spans.last_mut() {
            let between = offsets[c as usize] - offsets[last.end as usize];
            let joined = last.start..c + 1;
            if between <= gap && bytes(&joined) <= max {
                *last = joined;
                continue;
            }
        }
        spans.push(c..c + 1);
    }
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of 100 compressed bytes each.
    fn offsets(n: u64) -> Vec<u64> {
        (0..=n).map(|c| c * 100).collect()
    }

    #[test]
    fn adjacent_chunks_make_one_span_and_gaps_up_to_the_threshold_are_bridged() {
        let o = offsets(20);
        // Gap of one chunk (100 bytes) between 3 and 5, of three between 6 and 10.
        let list = [10, 3, 2, 5, 6, 3];
        assert_eq!(start_spans(&list, &o, 0, 1 << 20), vec![2..4, 5..7, 10..11]);
        assert_eq!(start_spans(&list, &o, 100, 1 << 20), vec![2..7, 10..11]);
        assert_eq!(start_spans(&list, &o, 300, 1 << 20), vec![2..11]);
    }

    #[test]
    fn a_span_stops_at_the_request_size_but_a_big_chunk_stands_alone() {
        let o = offsets(10);
        assert_eq!(
            start_spans(&[0, 1, 2, 3, 4], &o, 1 << 20, 300),
            vec![0..3, 3..5]
        );
        // A request size below one chunk: one chunk a span, never none.
        assert_eq!(start_spans(&[0, 1], &o, 1 << 20, 50), vec![0..1, 1..2]);
        // Chunk numbers past the table are not asked for.
        assert_eq!(start_spans(&[9, 10, 11], &o, 0, 1 << 20), vec![9..10]);
        assert!(start_spans(&[], &o, 0, 1 << 20).is_empty());
    }

    #[test]
    fn the_gap_is_the_bandwidth_delay_product_shared_by_the_requests_in_flight() {
        // 100 Mbit/s, 80 ms: a BDP of 1 MB, 125 kB a request with 8 in flight.
        let far = LinkEstimate {
            first_byte: Duration::from_millis(80),
            bytes_per_sec: 12.5e6,
        };
        assert_eq!(far.gap(8), 125_000);
        // The same rate next door: the floor.
        let near = LinkEstimate {
            first_byte: Duration::from_micros(300),
            ..far
        };
        assert_eq!(near.gap(8), MIN_GAP);
        // 10 Gbit/s and 100 ms: capped.
        let huge = LinkEstimate {
            first_byte: Duration::from_millis(100),
            bytes_per_sec: 1.25e9,
        };
        assert_eq!(huge.gap(8), MAX_GAP);
    }

    #[test]
    fn an_estimate_kept_beside_the_cache_reads_back_and_junk_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LinkEstimate::load(dir.path()).is_none());
        let e = LinkEstimate {
            first_byte: Duration::from_micros(20_500),
            bytes_per_sec: 12_500_000.0,
        };
        e.save(dir.path());
        assert_eq!(LinkEstimate::load(dir.path()), Some(e));
        for junk in ["", "12", "x 5", "5 0", "99999999999 5", "-1 5"] {
            std::fs::write(dir.path().join(LINK_FILE), junk).unwrap();
            assert!(LinkEstimate::load(dir.path()).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn a_transfer_too_short_or_too_small_measures_nothing() {
        let ms = Duration::from_millis;
        assert!(LinkEstimate::measure(1 << 20, ms(20), Duration::from_micros(200)).is_none());
        assert!(LinkEstimate::measure(1000, ms(20), ms(5)).is_none());
        let e = LinkEstimate::measure(1_000_000, ms(20), ms(80)).unwrap();
        assert_eq!(e.first_byte, ms(20));
        assert!((e.bytes_per_sec - 12.5e6).abs() < 1.0);
    }
}
