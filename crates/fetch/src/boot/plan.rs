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
use std::path::{Path, PathBuf};
use std::time::Duration;

use lazylayer_store::Store;

/// The file beside a chunk cache that keeps the link's estimate.
const LINK_FILE: &str = "link";
/// The store's directory of each registry's last estimate.
const LINKS_DIR: &str = "links";

/// Smallest gap always bridged: below it a request's headers and the
/// registry's per-request work cost more than the bytes.
pub(super) const MIN_GAP: u64 = 16 << 10;
/// Largest gap bridged, however long and fast the link.
pub(super) const MAX_GAP: u64 = 4 << 20;
/// The gap when nothing was measured (the index region came from the
/// cache): a link of ~100 Mbit/s with a few milliseconds' round trip.
pub(super) const DEFAULT_GAP: u64 = 64 << 10;
/// Fewest body bytes a rate is measured from. A shorter response says more
/// about the buffers and token buckets on its way than about the link: the
/// benchmark's 10 Mbit/s link lets 256 KB through at once, and python3's
/// index region (145 KB since the files' digests left it) came in a
/// millisecond, so its "rate" made the start set bridge 64 KB gaps instead
/// of 16 KB ones, and fetch 0.6 MB more before the start (4.3 s instead of
/// 3.8 s).
const RATE_SAMPLE: u64 = 512 << 10;
/// The rate assumed when none was measured: with the round trip, which
/// every response measures, it still sizes the gap.
const ASSUMED_RATE: f64 = 12.5e6;
/// A start-set span joined across measured gaps may always grow to this,
/// whatever its share of the queue ([`joined_span_max`]): a small start
/// set would otherwise join nothing.
const SHARE_FLOOR: u64 = 256 << 10;
/// How many times [`ASSUMED_RATE`] a start set must measure before its
/// later spans are joined by that rate ([`LinkEstimate::gap_measured`]).
const FAST: f64 = 3.0;

/// A first byte later than this says the registry is far (another region,
/// a CDN): the start set then goes out [`IN_FLIGHT_FAR`] requests wide.
/// Nearer, every connection and request costs more CPU than the round trip
/// it saves (a loopback start took 0.25 s with 8, 0.28 s with 32).
pub(crate) const FAR: Duration = Duration::from_millis(40);
/// Requests in flight for a far registry's start set: python3's 27 spans
/// took three sequential rounds with 8 at 80 ms, one with 32.
pub(crate) const IN_FLIGHT_FAR: usize = 32;

/// Connections a start from `registry` opens beside its manifest request:
/// as many as its start set will keep in flight when the last start from
/// that registry measured it far, so that the start set finds them
/// connected (over HTTP/1.1 a handshake is a round trip, over TLS two);
/// else one, for the config and index region that follow the manifest (at
/// no distance each costs more than it saves).
pub fn connections_to_open(store: &Store, registry: &str) -> usize {
    LinkEstimate::load_for_registry(store, registry).map_or(1, |l| match l.in_flight() {
        IN_FLIGHT_FAR => IN_FLIGHT_FAR,
        _ => 1,
    })
}

/// Keeps `registry`'s distance as a command that opens no image measured
/// it (`round_trip`: one request on a connection already open), for the
/// starts that follow from it ([`connections_to_open`]): a snapshotter
/// that finds the manifest and config `lazylayer containerd pull` kept
/// sends the boot layer's request first, and knows no distance before its
/// answer; at 80 ms the start set then went out on 26 new connections, a
/// handshake each.
pub fn note_registry_round_trip(store: &Store, registry: &str, round_trip: Duration) {
    let link = LinkEstimate {
        first_byte: round_trip,
        bytes_per_sec: None,
    };
    link.save_for_registry(store, registry);
}

/// While a start's manifest is on its way: when neither it nor a warm-up
/// beside it was answered after this wait, the registry is far, and
/// [`IN_FLIGHT_FAR`] connections in all are opened (each with a warm-up
/// request) for the start set. The first start from a registry knows
/// nothing of its distance before that answer, yet a connection opened
/// after it is not connected when the start set goes out (one round trip
/// after the index region), and each of its spans would pay a handshake
/// first: at 80 ms, python3's last spans came two round trips after the
/// plan instead of one. A request on a new connection takes two round
/// trips (handshake, request), so the wait is twice [`FAR`]. A nearer
/// registry gets nothing more: at 20 ms the start set's 8 opened at 15 ms
/// saved no time, their warm-ups costing the registry as much CPU as the
/// handshakes (python3 0.50 against 0.48 s at 100 Mbit/s).
pub const CONNECTIONS_WHILE_WAITING: (Duration, usize) = (
    Duration::from_millis(2 * FAR.as_millis() as u64),
    IN_FLIGHT_FAR,
);

/// `<store>/links/<SHA-256 of the registry's name>`: a registry's name is
/// outside input, its hash a safe file name.
fn registry_link_file(store: &Store, registry: &str) -> PathBuf {
    use sha2::Digest as _;
    let hex = format!("{:x}", sha2::Sha256::digest(registry.as_bytes()));
    store.root().join(LINKS_DIR).join(hex)
}

/// How long a registry noted as sending one range per response
/// ([`note_one_range`]) is not asked for several: it may change.
const ONE_RANGE_KEPT: Duration = Duration::from_secs(24 * 3600);

/// `<store>/links/<SHA-256 of the registry's name>.one-range`.
fn one_range_file(store: &Store, registry: &str) -> PathBuf {
    registry_link_file(store, registry).with_extension("one-range")
}

/// Whether a start from `registry` in the last [`ONE_RANGE_KEPT`] found it
/// sending one range of several asked in one request (or the whole blob).
pub(crate) fn one_range_noted(store: &Store, registry: &str) -> bool {
    std::fs::metadata(one_range_file(store, registry))
        .and_then(|m| m.modified())
        .is_ok_and(|t| t.elapsed().is_ok_and(|age| age < ONE_RANGE_KEPT))
}

/// Keep, for the next processes, that `registry` sends one range per
/// response: each asked it for several at first, and paid for that a
/// request it could not use and a connection closed (its answer unread),
/// for every start from an object store behind a redirect.
pub(crate) fn note_one_range(store: &Store, registry: &str) {
    write_in_links(&one_range_file(store, registry), b"");
}

/// Write `bytes` to `path` in the store's links directory (made, private,
/// if missing). A lost note costs one start's planning, not its
/// correctness: not worth an fsync.
fn write_in_links(path: &Path, bytes: &[u8]) {
    if let Some(dir) = path.parent() {
        if lazylayer_store::create_private_dir(dir).is_ok() {
            let _ = lazylayer_sys::durable::write_atomically_unsynced(path, bytes);
        }
    }
}

/// What one response told of the link to the registry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct LinkEstimate {
    /// From sending the request to the first byte of the body.
    pub first_byte: Duration,
    /// Body bytes per second after the first byte; None when the body came
    /// too fast to time.
    pub bytes_per_sec: Option<f64>,
}

impl LinkEstimate {
    /// From a response of `bytes` whose first byte came `first_byte` after
    /// the request and whose last came `transfer` after that; no rate when
    /// the transfer was too short to time (a rate from microseconds is
    /// noise) or too small to pass a burst ([`RATE_SAMPLE`]).
    pub(crate) fn measure(bytes: u64, first_byte: Duration, transfer: Duration) -> LinkEstimate {
        LinkEstimate {
            first_byte,
            bytes_per_sec: LinkEstimate::measured_rate(bytes, transfer),
        }
    }

    /// Kept beside a chunk cache (`dir/link`, two numbers) for the starts
    /// that find the index region there.
    pub(crate) fn save(&self, dir: &Path) {
        self.save_as(&dir.join(LINK_FILE));
    }

    /// What [`LinkEstimate::save`] kept, if it reads as a sane estimate.
    pub(crate) fn load(dir: &Path) -> Option<LinkEstimate> {
        LinkEstimate::load_from(&dir.join(LINK_FILE))
    }

    /// Kept for `registry` (as a reference names it) in the store, for the
    /// next start from it, of any image: it opens its connections while
    /// the manifest is on its way when the registry is far
    /// ([`connections_to_open`]), and plans its start set with the rate
    /// kept ([`LinkEstimate::with_rate_of`]). Without a rate of its own,
    /// the rate kept stays: a small response cannot time the link.
    pub(crate) fn save_for_registry(&self, store: &Store, registry: &str) {
        // A rate of its own wins: the file is read only to fill a missing one.
        let known = self
            .bytes_per_sec
            .is_none()
            .then(|| LinkEstimate::load_for_registry(store, registry))
            .flatten();
        self.with_rate_of(known).write_for_registry(store, registry);
    }

    /// [`LinkEstimate::save_for_registry`] for a caller that has read what
    /// was kept and merged it ([`LinkEstimate::with_rate_of`]): written as is.
    pub(crate) fn write_for_registry(&self, store: &Store, registry: &str) {
        write_in_links(&registry_link_file(store, registry), self.text().as_bytes());
    }

    /// This estimate, with `known`'s rate when it has none of its own: the
    /// rate a start set measured (its responses large enough to time the
    /// link, [`LinkEstimate::measured_rate`]) plans the next start from
    /// that registry, whose index region is too small to time it. Planned
    /// at the rate assumed instead, a start set on a fast link went out as
    /// many small requests, each costing the registry more work than its
    /// bytes (python3 at 1 Gbit/s and 20 ms: 28-64 requests in 6-9 rounds;
    /// planned at the rate kept, 9-29 in 5-8).
    pub(crate) fn with_rate_of(self, known: Option<LinkEstimate>) -> LinkEstimate {
        LinkEstimate {
            bytes_per_sec: self.bytes_per_sec.or(known.and_then(|k| k.bytes_per_sec)),
            ..self
        }
    }

    /// The rate `bytes` that came in `transfer` (since the first of them)
    /// show, when they are enough to time a link ([`RATE_SAMPLE`]): the
    /// start set's own, kept for the registry at its end.
    pub(crate) fn measured_rate(bytes: u64, transfer: Duration) -> Option<f64> {
        (bytes >= RATE_SAMPLE && transfer >= Duration::from_millis(1))
            .then(|| bytes as f64 / transfer.as_secs_f64())
    }

    /// What [`LinkEstimate::save_for_registry`] kept for `registry`.
    pub(crate) fn load_for_registry(store: &Store, registry: &str) -> Option<LinkEstimate> {
        LinkEstimate::load_from(&registry_link_file(store, registry))
    }

    fn save_as(&self, path: &Path) {
        // Not synced, as in [`write_in_links`].
        let _ = lazylayer_sys::durable::write_atomically_unsynced(path, self.text().as_bytes());
    }

    /// As kept on disk: the first byte's microseconds, the rate (0: none).
    fn text(&self) -> String {
        format!(
            "{} {}\n",
            self.first_byte.as_micros(),
            self.bytes_per_sec.unwrap_or(0.0) as u64
        )
    }

    fn load_from(path: &Path) -> Option<LinkEstimate> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().ok());
        let (micros, rate) = (it.next()??, it.next()??);
        (micros <= 60_000_000).then(|| LinkEstimate {
            first_byte: Duration::from_micros(micros),
            bytes_per_sec: (rate > 0).then_some(rate as f64),
        })
    }

    /// The gap (compressed bytes) worth fetching rather than opening one
    /// more request, with `in_flight` requests at once (module docs); the
    /// rate [`ASSUMED_RATE`] when none was measured.
    pub(crate) fn gap(&self, in_flight: usize) -> u64 {
        let rate = self.bytes_per_sec.unwrap_or(ASSUMED_RATE);
        let bdp = rate * self.first_byte.as_secs_f64();
        ((bdp / in_flight.max(1) as f64) as u64).clamp(MIN_GAP, MAX_GAP)
    }

    /// The gap for the rest of a start set whose responses brought `bytes`
    /// in `transfer` since the first of their bytes came: the rate the start
    /// set itself measured (the index region is too small to time, so the
    /// plan assumed one), with this estimate's round trip. Timed from the
    /// first request instead, the round trip counted as transfer:
    /// 20 ms away, a 1 Gbit/s link read as 15 MB/s and nginx's start set
    /// went out 8 small spans at a time in 5 rounds. None until
    /// [`RATE_SAMPLE`] bytes are in, and for a rate below [`FAST`] times
    /// [`ASSUMED_RATE`]: a burst through a token bucket reads as a faster
    /// link than it is (256 kB at once, then 100 Mbit/s, reads as
    /// 200 Mbit/s at 512 kB; timed from the first request, it did at twice
    /// the assumed rate), and at 100 Mbit/s and 20 ms wider gaps cost
    /// python3 0.35 MB more and 0.03 s.
    pub(crate) fn gap_measured(&self, bytes: u64, transfer: Duration) -> Option<u64> {
        let rate = LinkEstimate::measured_rate(bytes, transfer)?;
        let measured = LinkEstimate {
            bytes_per_sec: Some(rate),
            ..*self
        };
        fast(rate).then(|| measured.gap(measured.in_flight()))
    }

    /// Range GETs to keep in flight at start (see [`FAR`]).
    pub(crate) fn in_flight(&self) -> usize {
        if self.first_byte >= FAR {
            IN_FLIGHT_FAR
        } else {
            super::IN_FLIGHT
        }
    }
}

/// Whether a rate a start set measured is one to plan by: [`FAST`] times
/// [`ASSUMED_RATE`] or more. Below, a token bucket's burst may be most of
/// it, and the plan at the rate assumed is as good.
pub(crate) fn fast(rate: f64) -> bool {
    rate >= FAST * ASSUMED_RATE
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

/// The compressed bytes `spans` of chunks cover (`offsets` as for
/// [`start_spans`]).
pub(super) fn spans_bytes(spans: &[Range<u32>], offsets: &[u64]) -> u64 {
    spans
        .iter()
        .map(|r| offsets[r.end as usize] - offsets[r.start as usize])
        .sum()
}

/// The most a start-set span joined across measured gaps may hold, with
/// `queued` bytes of spans waiting and `in_flight` requests: its share of
/// them, so that every connection keeps carrying bytes, at least
/// [`SHARE_FLOOR`], at most [`super::START_REQUEST`]. Joined up to the
/// latter, pydev's start set went out as 17 requests where 26 had, and it
/// started later (0.46 against 0.40 s at 1 Gbit/s and 20 ms), its bytes
/// queued behind each other on a few connections.
pub(super) fn joined_span_max(queued: u64, in_flight: usize) -> u64 {
    (queued / in_flight.max(1) as u64).clamp(SHARE_FLOOR, super::START_REQUEST)
}

/// [`start_spans`] with the largest gap up to `gap` whose bridged bytes
/// stay within `share` of the wanted chunks' own, or `at_least` bytes if
/// that is more (never below [`MIN_GAP`]). A rate measured on one small response is not to be
/// trusted: the index region (a few hundred kB) fits in a token bucket's
/// burst and the socket buffers, and showed 54 MB/s on a 100 Mbit/s link.
/// The gap that rate asked for fetched 7.2 MB for python3's 3.7 MB start.
pub(super) fn budgeted_spans(
    list: &[u32],
    offsets: &[u64],
    gap: u64,
    max: u64,
    share: f64,
    at_least: u64,
) -> (Vec<Range<u32>>, u64) {
    let wanted = spans_bytes(&start_spans(list, offsets, 0, max), offsets);
    let budget = wanted + ((wanted as f64 * share) as u64).max(at_least);
    let mut g = gap;
    loop {
        let spans = start_spans(list, offsets, g, max);
        if g <= MIN_GAP || spans_bytes(&spans, offsets) <= budget {
            return (spans, g);
        }
        g = (g / 2).max(MIN_GAP);
    }
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
    fn an_overestimated_rate_bridges_no_more_than_the_budget_allows() {
        // 8 KiB chunks; the start read every fourth (24 KiB gaps) and then a
        // run of ten after a 336 KiB gap.
        let o: Vec<u64> = (0..=200u64).map(|c| c * 8192).collect();
        let mut list: Vec<u32> = (0..40).step_by(4).collect();
        list.extend(79..89);
        let wanted = 20 * 8192;
        // The index region's 54 MB/s at 52 ms (a 100 Mbit/s link behind a
        // burst): a gap of 351 kB, which would fetch chunks 0..89 whole.
        let inflated = LinkEstimate {
            first_byte: Duration::from_millis(52),
            bytes_per_sec: Some(54e6),
        };
        let gap = inflated.gap(8);
        assert!(gap > 42 * 8192);
        assert_eq!(start_spans(&list, &o, gap, 8 << 20), vec![0..89]);
        let (spans, used) = budgeted_spans(&list, &o, gap, 8 << 20, 0.25, 0);
        let bytes: u64 = spans
            .iter()
            .map(|r| o[r.end as usize] - o[r.start as usize])
            .sum();
        assert!(bytes <= wanted + wanted / 4, "{bytes} bytes for {wanted}");
        assert!(used >= MIN_GAP && used < gap);
        // The budget never goes below the floor gap: 24 KiB gaps are past
        // it, so every wanted run is a span of its own.
        assert_eq!(spans.len(), 11);
        // A generous budget keeps the measured gap.
        let (spans, used) = budgeted_spans(&list, &o, gap, 8 << 20, 10.0, 0);
        assert_eq!((spans.len(), spans[0].clone(), used), (1, 0..89, gap));
        // A small start may always bridge `at_least`: with 512 KiB, half the
        // measured gap joins the stepped chunks (216 KiB between them) but
        // not the run beyond the 336 KiB gap.
        let (spans, used) = budgeted_spans(&list, &o, gap, 8 << 20, 0.25, 512 << 10);
        assert_eq!((spans, used), (vec![0..37, 79..89], gap / 2));
    }

    #[test]
    fn a_far_registry_gets_more_requests_in_flight() {
        let at = |ms| LinkEstimate {
            first_byte: Duration::from_millis(ms),
            bytes_per_sec: None,
        };
        assert_eq!(at(15).in_flight(), super::super::IN_FLIGHT);
        assert_eq!(at(39).in_flight(), super::super::IN_FLIGHT);
        assert_eq!(at(40).in_flight(), IN_FLIGHT_FAR);
        assert_eq!(at(170).in_flight(), IN_FLIGHT_FAR);
    }

    #[test]
    fn the_gap_is_the_bandwidth_delay_product_shared_by_the_requests_in_flight() {
        // 100 Mbit/s, 80 ms: a BDP of 1 MB, 125 kB a request with 8 in flight.
        let far = LinkEstimate {
            first_byte: Duration::from_millis(80),
            bytes_per_sec: Some(12.5e6),
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
            bytes_per_sec: Some(1.25e9),
        };
        assert_eq!(huge.gap(8), MAX_GAP);
        // No rate (the body came at once, or was too small to tell a link
        // from a burst): 100 Mbit/s assumed, the round trip measured.
        let untimed = LinkEstimate {
            bytes_per_sec: None,
            ..far
        };
        assert_eq!(untimed.gap(8), 125_000);
        assert_eq!(untimed.gap(32), 31_250);
        let untimed_near = LinkEstimate {
            bytes_per_sec: None,
            ..near
        };
        assert_eq!(untimed_near.gap(8), MIN_GAP);
    }

    #[test]
    fn the_start_sets_own_bytes_measure_the_rate_its_later_spans_are_joined_by() {
        // A registry a few milliseconds away under load (the benchmark's
        // unshaped loopback measured 7 ms to the first byte).
        let near = LinkEstimate {
            first_byte: Duration::from_millis(7),
            bytes_per_sec: None,
        };
        let ms = Duration::from_millis;
        // Not enough bytes yet to tell a link from a burst.
        assert_eq!(near.gap_measured(RATE_SAMPLE - 1, ms(50)), None);
        // Nor time: the bytes came with the first.
        assert_eq!(near.gap_measured(1_000_000, ms(0)), None);
        // 1 MB in 8 ms (1 Gbit/s): 125 MB/s x 7 ms over 8 requests.
        assert_eq!(near.gap_measured(1_000_000, ms(8)), Some(109_375));
        // 1 MB in 80 ms (100 Mbit/s), or in 38 ms (a burst on it), or in
        // 30 ms (a 270 Mbit/s link, too near a burst's rate to tell): the
        // plan's assumed rate stands.
        assert_eq!(near.gap_measured(1_000_000, ms(80)), None);
        assert_eq!(near.gap_measured(1_000_000, ms(38)), None);
        assert_eq!(near.gap_measured(1_000_000, ms(30)), None);
        // 1 MB in 16 ms: 500 Mbit/s.
        assert_eq!(near.gap_measured(1_000_000, ms(16)), Some(54_687));
        // Far: 32 requests share the round trip (1 Gbit/s, 160 ms: 20 MB).
        let far = LinkEstimate {
            first_byte: ms(160),
            bytes_per_sec: None,
        };
        assert_eq!(far.gap_measured(1_000_000, ms(8)), Some(625_000));
        // 100 Mbit/s behind a token bucket: 256 kB at once, then 256 kB in
        // 21 ms; too slow for wider gaps.
        assert_eq!(far.gap_measured(512 << 10, ms(21)), None);
    }

    #[test]
    fn a_joined_span_holds_its_share_of_the_queue() {
        // 4 MB queued over 8 requests: 500 kB each.
        assert_eq!(joined_span_max(4_000_000, 8), 500_000);
        // A small queue still joins up to the floor; a large one stops at a
        // request's size.
        assert_eq!(joined_span_max(100_000, 8), SHARE_FLOOR);
        assert_eq!(joined_span_max(100 << 20, 8), super::super::START_REQUEST);
        assert_eq!(joined_span_max(4_000_000, 0), super::super::START_REQUEST);
    }

    #[test]
    fn a_registry_measured_far_gets_the_start_sets_connections_opened_early() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        // Nothing known: one, for the config and region after the manifest.
        assert_eq!(connections_to_open(&store, "far.example:5000"), 1);
        let at = |ms| LinkEstimate {
            first_byte: Duration::from_millis(ms),
            bytes_per_sec: Some(12.5e6),
        };
        at(80).save_for_registry(&store, "far.example:5000");
        at(1).save_for_registry(&store, "near.example");
        assert_eq!(
            connections_to_open(&store, "far.example:5000"),
            IN_FLIGHT_FAR
        );
        assert_eq!(connections_to_open(&store, "near.example"), 1);
        assert_eq!(connections_to_open(&store, "other.example"), 1);
        // The last measure wins: the registry moved nearer.
        at(2).save_for_registry(&store, "far.example:5000");
        assert_eq!(connections_to_open(&store, "far.example:5000"), 1);
        // Kept privately, under a name that is no path of the registry's.
        let links = dir.path().join(LINKS_DIR);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&links).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        assert_eq!(std::fs::read_dir(&links).unwrap().count(), 2);
        connections_to_open(&store, "../../etc");
        at(80).save_for_registry(&store, "../x");
        assert_eq!(std::fs::read_dir(&links).unwrap().count(), 3);
    }

    /// The round trip `lazylayer containerd pull` noted (its config's)
    /// sets how many connections the snapshotter's start that follows
    /// opens at once.
    #[test]
    fn a_round_trip_noted_by_a_pull_sets_the_next_starts_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        note_registry_round_trip(&store, "far.example", Duration::from_millis(85));
        note_registry_round_trip(&store, "near.example", Duration::from_millis(3));
        assert_eq!(connections_to_open(&store, "far.example"), IN_FLIGHT_FAR);
        assert_eq!(connections_to_open(&store, "near.example"), 1);
        // A start's own measure, later, replaces it.
        let near =
            LinkEstimate::measure(1 << 20, Duration::from_millis(2), Duration::from_millis(5));
        near.save_for_registry(&store, "far.example");
        assert_eq!(connections_to_open(&store, "far.example"), 1);
    }

    #[test]
    fn an_estimate_kept_beside_the_cache_reads_back_and_junk_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        assert!(LinkEstimate::load(dir.path()).is_none());
        let e = LinkEstimate {
            first_byte: Duration::from_micros(20_500),
            bytes_per_sec: Some(12_500_000.0),
        };
        e.save(dir.path());
        assert_eq!(LinkEstimate::load(dir.path()), Some(e));
        let untimed = LinkEstimate {
            bytes_per_sec: None,
            ..e
        };
        untimed.save(dir.path());
        assert_eq!(LinkEstimate::load(dir.path()), Some(untimed));
        for junk in ["", "12", "x 5", "99999999999 5", "-1 5"] {
            std::fs::write(dir.path().join(LINK_FILE), junk).unwrap();
            assert!(LinkEstimate::load(dir.path()).is_none(), "{junk:?}");
        }
    }

    #[test]
    fn a_transfer_too_short_or_too_small_measures_no_rate_but_its_first_byte() {
        let ms = Duration::from_millis;
        let fast = LinkEstimate::measure(1 << 20, ms(20), Duration::from_micros(200));
        assert_eq!((fast.first_byte, fast.bytes_per_sec), (ms(20), None));
        assert_eq!(
            LinkEstimate::measure(1000, ms(20), ms(5)).bytes_per_sec,
            None
        );
        // python3's index region through a token bucket's burst: no rate.
        assert_eq!(
            LinkEstimate::measure(145_286, ms(2), ms(3)).bytes_per_sec,
            None
        );
        let e = LinkEstimate::measure(1_000_000, ms(20), ms(80));
        assert_eq!(e.first_byte, ms(20));
        assert!((e.bytes_per_sec.unwrap() - 12.5e6).abs() < 1.0);
    }

    #[test]
    fn a_registrys_kept_rate_outlives_an_untimed_estimate_and_fills_one() {
        let ms = Duration::from_millis;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let r = "registry.example";
        let timed = LinkEstimate {
            first_byte: ms(20),
            bytes_per_sec: Some(100e6),
        };
        timed.save_for_registry(&store, r);
        // The next start's region timed only its first byte: kept as such,
        // the rate kept beside it.
        let untimed = LinkEstimate {
            first_byte: ms(25),
            bytes_per_sec: None,
        };
        untimed.save_for_registry(&store, r);
        let kept = LinkEstimate::load_for_registry(&store, r).unwrap();
        assert_eq!((kept.first_byte, kept.bytes_per_sec), (ms(25), Some(100e6)));
        // A rate of its own stays; none takes the one known.
        assert_eq!(timed.with_rate_of(Some(untimed)), timed);
        assert_eq!(untimed.with_rate_of(Some(timed)).bytes_per_sec, Some(100e6));
        assert_eq!(untimed.with_rate_of(None), untimed);
        // The gap that rate asks for, against the rate assumed.
        assert!(untimed.with_rate_of(Some(timed)).gap(8) > 4 * untimed.gap(8));
        // What a start set measured counts from RATE_SAMPLE bytes and a millisecond.
        assert_eq!(LinkEstimate::measured_rate(RATE_SAMPLE - 1, ms(10)), None);
        assert_eq!(
            LinkEstimate::measured_rate(1 << 20, Duration::from_micros(999)),
            None
        );
        let rate = LinkEstimate::measured_rate(1 << 20, ms(10)).unwrap();
        assert!((rate - 104_857_600.0).abs() < 1.0, "{rate}");
    }
}
