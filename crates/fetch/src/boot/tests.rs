//! Boot chunk scheduling and the chunk cache, against a real chunked boot
//! layer (built with the layer crate's own chunk writer and a real index)
//! served from memory through the `ChunkRemote` seam: no registry, no root.

use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazylayer_index::chunks::{BootContent, ChunkCompression, MIN_CHUNK_SIZE};
use lazylayer_index::{BootIndex, FileKind, IndexEntry, INDEX_FILE_NAME};
use lazylayer_layer::chunked::{
    compress_chunks, compress_piece, file_entry_tar, metadata_entry_tar,
};
use lazylayer_layer::metadata::PART_BYTES;
use lazylayer_layer::{Compression, ExtractOptions, LayerWriter};
use lazylayer_oci::{BodyStream, Digest, OciError};
use lazylayer_store::{BoxFuture, LayerRef, PullOptions, Store};
use sha2::{Digest as _, Sha256};
use tokio::sync::Semaphore;

use super::plan::LinkEstimate;
use super::region::decode_region;
use super::remote::ChunkRemote;
use super::state::{verdict, ChunkState, Claim, State};
use super::{reap_chunk_caches, BootChunks, ChunkedBoot};
use crate::FetchError;

/// The file the test layer holds: entry 1 of its index.
const FILE: u32 = 1;
/// Where its bytes start in the content tar (after its one header block).
const FILE_START: u64 = 512;

pub(crate) fn entry(path: &[u8], kind: FileKind, size: u64) -> IndexEntry {
    IndexEntry {
        in_boot: true,
        ..IndexEntry::plain(path, kind, size)
    }
}

/// A chunked boot layer as optimize writes it: the index region (the
/// index file's tar entries, the index in their headers, one compressed piece), then the content tar in
/// chunks of `MIN_CHUNK_SIZE`.
struct TestLayer {
    blob: Vec<u8>,
    region_len: u64,
    region_digest: Digest,
    layer: LayerRef,
    /// The file's bytes.
    data: Vec<u8>,
    offsets: Vec<u64>,
}

impl TestLayer {
    fn new(file_len: usize, start: Vec<u32>, c: ChunkCompression, seed: u64) -> TestLayer {
        Self::chunked(file_len, start, c, seed, MIN_CHUNK_SIZE)
    }

    /// [`TestLayer::new`] cut into chunks of `chunk_size` bytes.
    fn chunked(
        file_len: usize,
        start: Vec<u32>,
        c: ChunkCompression,
        seed: u64,
        chunk_size: u32,
    ) -> TestLayer {
        let data = lazylayer_testsupport::incompressible(file_len, seed);
        let mut w = LayerWriter::new(Vec::new(), Compression::None);
        w.append_bytes(Path::new("data.bin"), 0o644, 0, &data)
            .unwrap();
        let (_, content_tar) = w.finish_into_inner().unwrap();
        let mut pieces = Vec::new();
        let (chunks, content_len) = compress_chunks(
            &mut &content_tar[..],
            chunk_size,
            c,
            &mut pieces,
            &mut Sha256::new(),
        )
        .unwrap();
        let content = BootContent {
            compression: c,
            chunk_size,
            content_len,
            chunks,
            files: vec![(FILE, FILE_START)],
            start,
        };
        let offsets = content.chunk_offsets();
        let mut index = BootIndex::new(
            vec![format!("sha256:{:064x}", 1)],
            vec![
                entry(b"", FileKind::Dir, 0),
                entry(b"data.bin", FileKind::File, file_len as u64),
            ],
        )
        .unwrap();
        index.boot = Some(content);
        let region_tar =
            metadata_entry_tar(Path::new(INDEX_FILE_NAME), 0o444, 0, &index.encode()).unwrap();
        let region = compress_piece(&region_tar, c).unwrap();
        let region_len = region.len() as u64;
        let region_digest = Digest::sha256_of(&region);
        let mut blob = region;
        blob.extend_from_slice(&pieces);
        let mut diff = Sha256::new();
        diff.update(&region_tar);
        diff.update(&content_tar);
        let diff_id: Digest = format!("sha256:{}", hex::encode(diff.finalize()))
            .parse()
            .unwrap();
        let media_type = match c {
            ChunkCompression::Gzip => "application/vnd.oci.image.layer.v1.tar+gzip",
            ChunkCompression::Zstd => "application/vnd.oci.image.layer.v1.tar+zstd",
        };
        let layer = LayerRef {
            digest: Digest::sha256_of(&blob),
            diff_id,
            size: blob.len() as u64,
            media_type: media_type.into(),
        };
        TestLayer {
            blob,
            region_len,
            region_digest,
            layer,
            data,
            offsets,
        }
    }

    /// 40 KiB of file: eleven gzip chunks.
    fn small(start: Vec<u32>) -> TestLayer {
        TestLayer::new(40 << 10, start, ChunkCompression::Gzip, 7)
    }

    fn chunk_count(&self) -> u32 {
        self.offsets.len() as u32 - 1
    }

    /// The chunks a blob range covers (ranges are cut on chunk bounds).
    fn chunks_of(&self, from: u64, len: u64) -> Range<u32> {
        let at = |off: u64| {
            self.offsets
                .iter()
                .position(|&o| o == off - self.region_len)
                .expect("a range on chunk bounds") as u32
        };
        at(from)..at(from + len)
    }
}

/// How the in-memory registry answers a range.
#[derive(Clone, Copy, PartialEq)]
enum Answer {
    Bytes,
    /// Other bytes than the blob's (one flipped).
    Corrupt,
    /// The host is down (a network error).
    Unreachable,
    /// A 404 (not a network error: tried again).
    NotFound,
}

/// The boot layer's blob served from memory, every range request logged.
struct MemoryRemote {
    blob: Vec<u8>,
    /// Answer the region's request with the whole blob.
    ignores_range: bool,
    answer: Mutex<Answer>,
    /// Requests wait for a permit here once logged (a closed gate holds
    /// them in flight).
    gate: Semaphore,
    /// The chunk ranges asked for, in the order the requests were made
    /// (logged when made, before the first byte's wait and the gate).
    ranges: Mutex<Vec<(u64, u64)>>,
    streams: AtomicUsize,
    /// Each answer (the index region's too) comes this long after its
    /// request: a registry's time to first byte.
    first_byte: Mutex<Duration>,
    /// A chunk range's body comes this many bytes a millisecond (None: at
    /// once), as over a link.
    pace: Mutex<Option<usize>>,
    /// The registry's name, as references name it (None: unnamed).
    registry: OnceLock<String>,
    /// Whether it answers a request for several ranges with them all (as a
    /// `multipart/byteranges` body); each such request's ranges, logged.
    sends_parts: std::sync::atomic::AtomicBool,
    multi: Mutex<Vec<Vec<Range<u64>>>>,
}

impl MemoryRemote {
    fn new(l: &TestLayer) -> Arc<MemoryRemote> {
        Self::build(l, false, Semaphore::MAX_PERMITS)
    }

    /// Range requests wait until `open_gate`.
    fn gated(l: &TestLayer) -> Arc<MemoryRemote> {
        Self::build(l, false, 0)
    }

    fn build(l: &TestLayer, ignores_range: bool, permits: usize) -> Arc<MemoryRemote> {
        Arc::new(MemoryRemote {
            blob: l.blob.clone(),
            ignores_range,
            answer: Mutex::new(Answer::Bytes),
            gate: Semaphore::new(permits),
            ranges: Mutex::new(Vec::new()),
            streams: AtomicUsize::new(0),
            first_byte: Mutex::new(Duration::ZERO),
            pace: Mutex::new(None),
            registry: OnceLock::new(),
            sends_parts: Default::default(),
            multi: Mutex::new(Vec::new()),
        })
    }

    /// Named `registry`: what it measures of the link is kept for it.
    fn named(self: Arc<Self>, registry: &str) -> Arc<Self> {
        self.registry.set(registry.to_owned()).unwrap();
        self
    }

    /// Answers requests for several ranges (see `sends_parts`).
    fn sending_parts(self: Arc<Self>) -> Arc<Self> {
        self.sends_parts.store(true, Ordering::SeqCst);
        self
    }

    fn first_byte_after(self: Arc<Self>, d: Duration) -> Arc<Self> {
        *self.first_byte.lock().unwrap() = d;
        self
    }

    fn paced(self: Arc<Self>, bytes_per_ms: usize) -> Arc<Self> {
        *self.pace.lock().unwrap() = Some(bytes_per_ms);
        self
    }

    fn answering(self: Arc<Self>, a: Answer) -> Arc<Self> {
        *self.answer.lock().unwrap() = a;
        self
    }

    fn open_gate(&self) {
        self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
    }

    fn ranges(&self) -> Vec<(u64, u64)> {
        self.ranges.lock().unwrap().clone()
    }

    fn error(&self, a: Answer) -> OciError {
        match a {
            Answer::Unreachable => OciError::Unreachable {
                what: "a boot chunk".into(),
                registry: "memory".into(),
                down_for: Duration::from_secs(1),
                cause: "connection refused".into(),
                retry_in: Duration::from_secs(1),
            },
            _ => OciError::Status {
                what: "a boot chunk".into(),
                registry: "memory".into(),
                status: 404,
                body: String::new(),
            },
        }
    }
}

impl ChunkRemote for MemoryRemote {
    /// The index region is the request from byte 0 (it heads the blob; a
    /// chunk never starts there): counted in `streams`, whole blob when the
    /// registry ignores Range. Every other request is a chunk range: logged
    /// in `ranges`, held at the gate, answered as `answer` says.
    fn range_stream(
        &self,
        from: u64,
        len: u64,
    ) -> BoxFuture<'_, Result<(bool, BodyStream), OciError>> {
        if from != 0 {
            self.ranges.lock().unwrap().push((from, len));
        }
        Box::pin(async move {
            let wait = *self.first_byte.lock().unwrap();
            tokio::time::sleep(wait).await;
            let (ranged, bytes) = if from == 0 {
                self.streams.fetch_add(1, Ordering::SeqCst);
                if self.ignores_range {
                    (false, self.blob.clone())
                } else {
                    (true, self.blob[..len as usize].to_vec())
                }
            } else {
                let _permit = self.gate.acquire().await.unwrap();
                let answer = *self.answer.lock().unwrap();
                match answer {
                    Answer::Bytes | Answer::Corrupt => {
                        let mut b = self.blob[from as usize..(from + len) as usize].to_vec();
                        if answer == Answer::Corrupt {
                            b[0] ^= 0xff;
                        }
                        (true, b)
                    }
                    a => return Err(self.error(a)),
                }
            };
            // In pieces, as a response body comes.
            let pieces: Vec<Result<Bytes, OciError>> = bytes
                .chunks(1000)
                .map(|p| Ok(Bytes::copy_from_slice(p)))
                .collect();
            let body: BodyStream = match *self.pace.lock().unwrap() {
                None => Box::pin(futures_util::stream::iter(pieces)),
                Some(per_ms) => {
                    use futures_util::StreamExt as _;
                    // A piece is 1000 bytes.
                    let every = (per_ms / 1000).max(1);
                    Box::pin(futures_util::stream::iter(pieces).enumerate().then(
                        move |(i, p)| async move {
                            if i > 0 && i % every == 0 {
                                tokio::time::sleep(Duration::from_millis(1)).await;
                            }
                            p
                        },
                    ))
                }
            };
            Ok((ranged, body))
        })
    }

    fn registry(&self) -> Option<&str> {
        self.registry.get().map(String::as_str)
    }

    fn may_send_parts(&self) -> bool {
        self.sends_parts.load(Ordering::SeqCst)
    }

    /// Logged in `multi`, held at the gate, then every range asked, framed
    /// as docker-registry (Go's net/http) frames them.
    fn ranges<'a>(
        &'a self,
        ranges: &'a [Range<u64>],
    ) -> BoxFuture<'a, Result<Option<lazylayer_oci::RangeParts>, OciError>> {
        self.multi.lock().unwrap().push(ranges.to_vec());
        Box::pin(async move {
            let _permit = self.gate.acquire().await.unwrap();
            let parts: Vec<(Range<u64>, &[u8])> = ranges
                .iter()
                .map(|r| (r.clone(), &self.blob[r.start as usize..r.end as usize]))
                .collect();
            let b = lazylayer_testsupport::multipart_byteranges(
                "b0und",
                &parts,
                self.blob.len() as u64,
            );
            let body: BodyStream = Box::pin(futures_util::stream::iter([Ok(Bytes::from(b))]));
            lazylayer_oci::RangeParts::new(
                "boot chunks".into(),
                "memory".into(),
                "multipart/byteranges; boundary=b0und",
                body,
                ranges,
            )
            .map(Some)
        })
    }
}

async fn open(
    store: &Store,
    l: &TestLayer,
    remote: Arc<MemoryRemote>,
    read_timeout: Duration,
) -> Result<BootChunks, FetchError> {
    let (index, chunks) = BootChunks::open_with(
        store,
        ChunkedBoot {
            image: "registry.test/boot:1",
            layer: &l.layer,
            region_len: l.region_len,
            region_digest: &l.region_digest,
            read_timeout,
            pull: PullOptions {
                // Owners as the tar says need root; these tests do not.
                extract: ExtractOptions {
                    chown: false,
                    ..ExtractOptions::default()
                },
                ..PullOptions::default()
            },
        },
        remote,
    )
    .await?;
    assert_eq!(index.entries[FILE as usize].size, l.data.len() as u64);
    Ok(chunks)
}

const LONG: Duration = Duration::from_secs(60);

/// `len` bytes of the file at `offset`, read as the file system reads it
/// (blocking, off the runtime's threads).
async fn read(chunks: &BootChunks, size: u64, offset: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = chunks.file(FILE, size).unwrap();
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len];
        file.read_at(&mut buf, offset).map(|()| buf)
    })
    .await
    .unwrap()
}

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ok() {
        assert!(Instant::now() < deadline, "still not {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn states(chunks: &BootChunks) -> Vec<ChunkState> {
    chunks.inner.state.lock().unwrap().chunks.clone()
}

fn all_present(chunks: &BootChunks) -> bool {
    states(chunks).iter().all(|c| *c == ChunkState::Present)
}

fn store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join("store")).unwrap();
    (dir, store)
}

fn state(chunks: Vec<ChunkState>) -> State {
    State {
        chunks,
        streaming: false,
        stored: false,
        ingesting: false,
        rest_started: false,
        queued: Vec::new(),
    }
}

use ChunkState::{Absent, Failed, Fetching, Present, Unreachable};

#[test]
fn a_run_coalesces_adjacent_absent_chunks_up_to_the_request_size() {
    // Chunks of 100 bytes each.
    let offsets: Vec<u64> = (0..=8).map(|c| c * 100).collect();
    let mut s = state(vec![Absent; 8]);
    let list = [1, 2, 3, 4, 6, 7];
    let mut i = 0;
    // 300 bytes at most: 1..4, then 4 alone (5 is not in the list), then 6..8.
    assert_eq!(s.take_run(&list, &mut i, &offsets, 300), Some(1..4));
    assert_eq!(i, 3);
    assert_eq!(s.take_run(&list, &mut i, &offsets, 300), Some(4..5));
    assert_eq!(s.take_run(&list, &mut i, &offsets, 300), Some(6..8));
    assert_eq!(i, list.len());
    for c in [1, 2, 3, 4, 6, 7] {
        assert_eq!(s.chunks[c], Fetching, "chunk {c}");
    }
    assert_eq!(s.chunks[0], Absent);
    assert_eq!(s.chunks[5], Absent);
}

#[test]
fn a_waves_requests_take_their_parts_a_stride_apart() {
    // 20 spans of one chunk each, every other chunk; 4 requests share them.
    let offsets: Vec<u64> = (0..=40).map(|c| c * 100).collect();
    let mut s = state(vec![Absent; 40]);
    s.queued = (0..20).map(|k| 2 * k..2 * k + 1).collect();
    let mut requests = Vec::new();
    for left in (1..=4).rev() {
        let first = s.next_queued(&offsets, None, 1 << 20).unwrap();
        let mut parts = vec![first];
        parts.extend(s.take_every(left, 16));
        requests.push(parts.iter().map(|r| r.start / 2).collect::<Vec<_>>());
    }
    // Span k rides as part k / 4 of a request: the four connections bring
    // spans 0-3 first, then 4-7, ...
    assert_eq!(
        requests,
        vec![
            vec![0, 4, 8, 12, 16],
            vec![1, 5, 9, 13, 17],
            vec![2, 6, 10, 14, 18],
            vec![3, 7, 11, 15, 19],
        ]
    );
    assert!(s.queued.is_empty());
    // At most `most` parts besides the first; the rest stays queued.
    s.queued = (0..20).map(|k| 2 * k..2 * k + 1).collect();
    s.queued.remove(0);
    assert_eq!(s.take_every(2, 3), vec![4..5, 8..9, 12..13]);
    assert_eq!(s.queued.len(), 16);
    assert!(s.take_every(0, 3).is_empty());
}

#[test]
fn a_run_stops_at_a_chunk_already_local_or_on_its_way() {
    let offsets: Vec<u64> = (0..=6).map(|c| c * 100).collect();
    let mut s = state(vec![Absent, Present, Absent, Fetching, Absent, Absent]);
    let list = [0, 1, 2, 3, 4, 5];
    let mut i = 0;
    assert_eq!(s.take_run(&list, &mut i, &offsets, 1 << 20), Some(0..1));
    // Present: skipped, nothing marked.
    assert_eq!(s.take_run(&list, &mut i, &offsets, 1 << 20), None);
    assert_eq!(s.chunks[1], Present);
    assert_eq!(s.take_run(&list, &mut i, &offsets, 1 << 20), Some(2..3));
    // Fetching already: not asked twice.
    assert_eq!(s.take_run(&list, &mut i, &offsets, 1 << 20), None);
    assert_eq!(s.take_run(&list, &mut i, &offsets, 1 << 20), Some(4..6));
}

#[test]
fn a_reader_claims_absent_and_unreachable_chunks_not_failed_or_fetching_ones() {
    let mut s = state(vec![
        Absent,
        Unreachable("down".into()),
        Fetching,
        Absent,
        Failed("bad bytes".into()),
        Absent,
        Present,
        Absent,
    ]);
    // One request from the first wanted chunk to the last: a read window
    // costs one round trip; the fetching one in it is not claimed.
    assert_eq!(
        s.claim_wanted(0..7),
        Some(Claim {
            span: 0..6,
            claimed: vec![0, 1, 3, 5]
        })
    );
    assert_eq!(
        s.chunks,
        vec![
            Fetching,
            Fetching,
            Fetching,
            Fetching,
            Failed("bad bytes".into()),
            Fetching,
            Present,
            Absent
        ]
    );
    // Asked again: everything wanted is on its way already.
    assert_eq!(s.claim_wanted(0..7), None);
}

#[test]
fn a_reader_window_takes_the_rest_of_the_queued_spans_it_lands_in() {
    let mut s = state(vec![Absent; 30]);
    s.queued = vec![2..6, 10..14, 20..24];
    // A window across the ends of two spans: to the second one's end.
    let claim = s.claim_wanted(4..11).unwrap();
    assert_eq!(claim.span, 4..14);
    assert_eq!(claim.claimed, (4..14).collect::<Vec<_>>());
    // The first keeps its part before the window; the second is gone.
    assert_eq!(s.queued, vec![2..4, 20..24]);
    // The start set's next slot gets what the reader left of the first.
    let offsets: Vec<u64> = (0..=30).map(|c| c * 4096).collect();
    assert_eq!(s.next_queued(&offsets, None, u64::MAX), Some(2..4));
    // A window outside every span takes no span along.
    assert_eq!(s.claim_wanted(26..28).unwrap().span, 26..28);
    assert_eq!(s.queued, vec![20..24]);
    // One at a span's start takes it whole.
    assert_eq!(s.claim_wanted(20..21).unwrap().span, 20..24);
    assert!(s.queued.is_empty());
}

#[test]
fn the_next_queued_span_joins_those_after_it_across_gaps_no_reader_holds() {
    let offsets: Vec<u64> = (0..=40).map(|c| c * 4096).collect();
    let mut s = state(vec![Absent; 40]);
    s.queued = vec![0..2, 4..6, 8..10, 20..22, 23..25, 27..29];
    // Gaps of two chunks (8 KiB) bridged, not the one of ten after 8..10.
    assert_eq!(
        s.next_queued(&offsets, Some(8 << 10), u64::MAX),
        Some(0..10)
    );
    assert_eq!(s.queued, vec![20..22, 23..25, 27..29]);
    // A chunk between held by a reader's request stops the joining there.
    s.chunks[26] = Fetching;
    assert_eq!(
        s.next_queued(&offsets, Some(8 << 10), u64::MAX),
        Some(20..25)
    );
    // Nor past a request's size; without a gap, the span alone; and
    // nothing once the queue is empty.
    s.queued = vec![30..32, 33..35, 36..38];
    assert_eq!(
        s.next_queued(&offsets, Some(8 << 10), 16 << 10),
        Some(30..32)
    );
    assert_eq!(s.next_queued(&offsets, None, u64::MAX), Some(33..35));
    assert_eq!(s.next_queued(&offsets, None, u64::MAX), Some(36..38));
    assert_eq!(s.next_queued(&offsets, None, u64::MAX), None);
}

#[test]
fn a_start_span_claims_only_absent_chunks_trimmed_to_them() {
    let mut s = state(vec![
        Present,
        Absent,
        Fetching,
        Absent,
        Unreachable("down".into()),
        Present,
    ]);
    assert_eq!(
        s.claim_span(0..6),
        Some(Claim {
            span: 1..4,
            claimed: vec![1, 3]
        })
    );
    assert_eq!(s.chunks[1], Fetching);
    assert_eq!(s.chunks[3], Fetching);
    // Unreachable chunks wait for a reader to ask again.
    assert_eq!(s.chunks[4], Unreachable("down".into()));
    assert_eq!(s.claim_span(0..6), None);
}

#[test]
fn the_verdict_waits_for_missing_chunks_and_names_the_failure() {
    let s = state(vec![
        Present,
        Fetching,
        Failed("refused".into()),
        Unreachable("down".into()),
    ]);
    assert!(matches!(verdict(&s, 0..1), Some(Ok(()))));
    assert!(verdict(&s, 0..2).is_none());
    let e = verdict(&s, 0..3).unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(e.to_string(), "refused");
    let e = verdict(&s, 3..4).unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::HostUnreachable);
}

/// The spans a remote was asked for, in blob order.
fn spans_asked(l: &TestLayer, remote: &MemoryRemote) -> Vec<Range<u32>> {
    let mut runs: Vec<Range<u32>> = remote
        .ranges()
        .iter()
        .map(|&(from, len)| l.chunks_of(from, len))
        .collect();
    runs.sort_by_key(|r| r.start);
    runs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_start_set_goes_out_as_one_request_across_a_small_gap() {
    let l = TestLayer::small(vec![6, 3, 2]);
    let remote = MemoryRemote::new(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    wait_until("start list done", || chunks.start_list_done()).await;
    // Chunks 4 and 5 (8 KiB) cost less than one more request: fetched too.
    assert_eq!(spans_asked(&l, &remote), vec![2..7]);
    let s = states(&chunks);
    assert_eq!(s.len(), l.chunk_count() as usize);
    for (c, got) in s.iter().enumerate() {
        let want = if (2..7).contains(&c) { Present } else { Absent };
        assert_eq!(*got, want, "chunk {c}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_runs_far_apart_are_separate_requests_sent_at_once() {
    // 400 KiB of file: ~100 chunks of 4 KiB; a gap of ~90 chunks (360 KiB)
    // is more than the default gap.
    let l = TestLayer::new(400 << 10, vec![95, 1, 2, 96], ChunkCompression::Gzip, 9);
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    // Both requests are in flight before either is answered.
    wait_until("both requests sent", || remote.ranges().len() == 2).await;
    assert_eq!(spans_asked(&l, &remote), vec![1..3, 95..97]);
    remote.open_gate();
    wait_until("start list done", || chunks.start_list_done()).await;
    assert_eq!(states(&chunks)[50], Absent);
}

/// From a far registry (its first byte 40 ms or more after the request)
/// the start set keeps 32 requests in flight; spans beyond them ride as
/// parts of those requests, all asked before any is answered, instead of
/// waiting for a request to end (a second wave, one more round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_registrys_start_set_is_asked_whole_before_any_answer() {
    // 48 single chunks, each 12 chunks (~48 KiB) from the next: more than
    // the gap a far link bridges, and more than its byte budget joins.
    let start: Vec<u32> = (0..48).map(|i| 1 + 12 * i).collect();
    let l = TestLayer::new(2400 << 10, start.clone(), ChunkCompression::Gzip, 13);
    assert!(l.chunk_count() > *start.last().unwrap());
    let remote = MemoryRemote::gated(&l)
        .sending_parts()
        .first_byte_after(Duration::from_millis(50));
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let asked = || {
        let mut spans = spans_asked(&l, &remote);
        for request in remote.multi.lock().unwrap().iter() {
            spans.extend(
                request
                    .iter()
                    .map(|r| l.chunks_of(r.start, r.end - r.start)),
            );
        }
        spans
    };
    let requests = || remote.ranges().len() + remote.multi.lock().unwrap().len();
    // The gate holds every answer: a span not asked by now waits for one.
    wait_until("32 requests sent", || {
        requests() == super::plan::IN_FLIGHT_FAR
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(requests(), super::plan::IN_FLIGHT_FAR);
    let covered: usize = start
        .iter()
        .filter(|&&c| asked().iter().any(|s| s.contains(&c)))
        .count();
    assert_eq!(covered, start.len(), "asked: {:?}", asked());
    remote.open_gate();
    wait_until("start list done", || chunks.start_list_done()).await;
    for c in start {
        assert_eq!(states(&chunks)[c as usize], Present, "chunk {c}");
    }
}

/// The start set's spans are requested in blob order (the order its files
/// were first read in): the first have the few connections open when the
/// plan is made (at 80 ms, a span without one waits a handshake's round
/// trip more). tokio runs the task spawned last first, and one worker runs
/// the spawns here: every span spawned before any ran made the last span
/// the first request.
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn the_start_sets_spans_are_requested_in_blob_order() {
    // ~100 chunks of 4 KiB; six runs 15 chunks (~60 KiB) apart, more than
    // the gap bridged.
    let l = TestLayer::new(
        400 << 10,
        vec![82, 2, 18, 34, 50, 66],
        ChunkCompression::Gzip,
        11,
    );
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    wait_until("all six requested", || remote.ranges().len() == 6).await;
    let made: Vec<u32> = remote
        .ranges()
        .iter()
        .map(|&(from, _)| l.chunks_of(from, 0).start)
        .collect();
    assert_eq!(made, vec![2, 18, 34, 50, 66, 82]);
    remote.open_gate();
    wait_until("start list done", || chunks.start_list_done()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_in_a_span_still_queued_takes_its_rest_and_no_chunk_comes_twice() {
    // Ten runs of four chunks, 36 chunks (144 KiB) apart: ten spans, two
    // more than go out at once. ~2 MiB of file: 513 chunks of 4 KiB.
    let start: Vec<u32> = (0..10).flat_map(|r| 40 * r..40 * r + 4).collect();
    let l = TestLayer::new(2 << 20, start, ChunkCompression::Gzip, 11);
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    wait_until("eight spans in flight", || remote.ranges().len() == 8).await;
    // The last span (chunks 360..364) waits for a slot; a reader needs
    // chunk 362 now.
    let at = 362 * 4096 - FILE_START + 100;
    let size = l.data.len() as u64;
    let reader = tokio::spawn({
        let chunks = chunks.clone();
        async move { read(&chunks, size, at, 100).await }
    });
    wait_until("the reader's request", || remote.ranges().len() == 9).await;
    // It asks for its chunk and the rest of the span after it.
    assert_eq!(spans_asked(&l, &remote).last(), Some(&(362..364)));
    remote.open_gate();
    let got = reader.await.unwrap().unwrap();
    assert_eq!(got, l.data[at as usize..at as usize + 100]);
    wait_until("start list done", || chunks.start_list_done()).await;
    assert!(chunks
        .inner
        .content
        .start
        .iter()
        .all(|&c| states(&chunks)[c as usize] == Present));
    // The span, when its slot came, asked only for what was left of it.
    let asked = spans_asked(&l, &remote);
    assert_eq!(asked.len(), 11, "{asked:?}");
    assert!(asked.contains(&(360..362)), "{asked:?}");
    for c in 0..l.chunk_count() {
        let times = asked.iter().filter(|r| r.contains(&c)).count();
        assert!(times <= 1, "chunk {c} asked {times} times: {asked:?}");
    }
}

/// The spans a start set of `runs` runs of `run` chunks, `stride` apart,
/// went out as from `remote`, once every chunk of it is in; the first eight
/// checked to have gone out as planned (before the link was timed), each
/// chunk asked for once.
async fn start_set_joined(
    l: &TestLayer,
    remote: Arc<MemoryRemote>,
    (runs, run, stride): (u32, u32, u32),
) -> Vec<Range<u32>> {
    let (_d, store) = store();
    let chunks = open(&store, l, remote.clone(), LONG).await.unwrap();
    wait_until("start list done", || chunks.start_list_done()).await;
    let asked = spans_asked(l, &remote);
    assert_eq!(
        asked[..8],
        (0..8)
            .map(|r| stride * r..stride * r + run)
            .collect::<Vec<_>>()[..]
    );
    assert!(
        asked.len() < runs as usize,
        "{} requests: {asked:?}",
        asked.len()
    );
    assert!(asked.iter().any(|r| r.len() > stride as usize), "{asked:?}");
    let states = states(&chunks);
    for &c in &chunks.inner.content.start {
        assert_eq!(states[c as usize], Present, "chunk {c}");
    }
    for c in 0..l.chunk_count() {
        let times = asked.iter().filter(|r| r.contains(&c)).count();
        assert!(times <= 1, "chunk {c} asked {times} times: {asked:?}");
    }
    asked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_measured_fast_by_the_first_spans_joins_the_rest_across_wider_gaps() {
    // Thirty runs of 16 chunks (64 KiB) 24 KiB apart: past the gap planned
    // before any rate was known (16 KiB, from a 10 ms first byte and an
    // assumed 100 Mbit/s), thirty spans. The first eight come in at memory
    // speed: a rate whose bandwidth-delay product bridges 24 KiB many times.
    // Those sent before 512 KiB were in go as planned (a rate needs them);
    // the rest join across their gaps, each within its share of what was
    // queued (here the 256 KiB floor: three runs).
    let start: Vec<u32> = (0..30).flat_map(|r| 22 * r..22 * r + 16).collect();
    let l = TestLayer::new(3 << 20, start, ChunkCompression::Gzip, 13);
    let remote = MemoryRemote::new(&l).first_byte_after(Duration::from_millis(10));
    let asked = start_set_joined(&l, remote, (30, 16, 22)).await;
    assert!(asked.iter().all(|r| r.len() <= 3 * 22), "{asked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_set_times_its_link_from_its_first_byte_not_its_first_request() {
    // Twenty runs of 9 chunks (72 KiB) 64 KiB apart, 25 ms to each first
    // byte (well under FAR: a loaded machine's scheduling must not make the
    // registry read as far), then 40 MB/s a response (320 MB/s for eight):
    // the plan (an assumed 100 Mbit/s over 8 requests, 39 kB) bridges none.
    // The first eight bring 576 KiB 25 ms after they went out but ~2 ms
    // after their first byte: timed from the requests that read as 21 MB/s,
    // and all twenty went out alone, 8 at a time.
    let start: Vec<u32> = (0..20).flat_map(|r| 17 * r..17 * r + 9).collect();
    let l = TestLayer::chunked(3 << 20, start, ChunkCompression::Zstd, 17, 8 << 10);
    let remote = MemoryRemote::new(&l)
        .first_byte_after(Duration::from_millis(25))
        .paced(40_000);
    start_set_joined(&l, remote, (20, 9, 17)).await;
}

/// A start set times its link and keeps the rate for its registry; the
/// next start from that registry (of another image) plans with it, its
/// index region too small to time the link: its first requests already
/// join runs across the gaps that rate makes worth their bytes, where a
/// plan at the rate assumed sent eight, one run each, and the rest as the
/// slots and readers came (python3 at 1 Gbit/s and 20 ms: 28-64 requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_start_from_a_registry_plans_at_the_rate_its_last_start_set_timed() {
    // Thirty runs of 16 chunks (64 KiB) 24 KiB apart, 10 ms to each first
    // byte: at the assumed 100 Mbit/s over 8 requests (16 KiB), thirty spans.
    let start: Vec<u32> = (0..30).flat_map(|r| 22 * r..22 * r + 16).collect();
    let (_d, store) = store();
    let registry = "registry.test";
    let first = TestLayer::new(3 << 20, start.clone(), ChunkCompression::Gzip, 13);
    let remote = MemoryRemote::new(&first)
        .named(registry)
        .first_byte_after(Duration::from_millis(10))
        .paced(40_000);
    let chunks = open(&store, &first, remote, LONG).await.unwrap();
    wait_until("start list done", || chunks.start_list_done()).await;
    let rate = || LinkEstimate::load_for_registry(&store, registry).and_then(|l| l.bytes_per_sec);
    wait_until("the rate kept", || rate().is_some()).await;
    assert!(rate().unwrap() > 40e6, "{:?}", rate());

    // Another image from that registry, its requests held: those made at
    // once are few, and join runs.
    let next = TestLayer::new(3 << 20, start, ChunkCompression::Gzip, 14);
    let remote = MemoryRemote::gated(&next)
        .named(registry)
        .first_byte_after(Duration::from_millis(10));
    let chunks = open(&store, &next, remote.clone(), LONG).await.unwrap();
    wait_until("the first request", || !remote.ranges().is_empty()).await;
    // The plan's requests all go out at once (up to eight): time for them.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let asked = spans_asked(&next, &remote);
    assert!(asked.len() <= 3, "{} requests: {asked:?}", asked.len());
    assert!(asked.iter().all(|r| r.len() > 22), "{asked:?}");
    remote.open_gate();
    wait_until("start list done", || chunks.start_list_done()).await;
    let states = states(&chunks);
    assert!(chunks
        .inner
        .content
        .start
        .iter()
        .all(|&c| states[c as usize] == Present));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_gets_its_bytes_fetching_only_the_chunks_that_hold_them() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::new(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let size = l.data.len() as u64;
    // Bytes 10000..18200 of the file: content 10512..18712, chunks 2..5.
    let got = read(&chunks, size, 10_000, 8_200).await.unwrap();
    assert_eq!(got, l.data[10_000..18_200]);
    let runs: Vec<Range<u32>> = remote
        .ranges()
        .iter()
        .map(|&(from, len)| l.chunks_of(from, len))
        .collect();
    assert_eq!(runs, vec![2..5]);
    // The index region, then those chunks' compressed bytes.
    assert_eq!(
        chunks.bytes_fetched(),
        l.region_len + l.offsets[5] - l.offsets[2]
    );
    // Reading past the file's end is refused, fetching nothing.
    let e = read(&chunks, size, size - 10, 20).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(remote.ranges().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_in_flight_is_fetched_once_for_two_readers() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let size = l.data.len() as u64;
    let first = tokio::spawn({
        let chunks = chunks.clone();
        async move { read(&chunks, size, 5_000, 100).await }
    });
    wait_until("the first reader's request", || remote.ranges().len() == 1).await;
    assert_eq!(states(&chunks)[1], Fetching);
    let second = tokio::spawn({
        let chunks = chunks.clone();
        async move { read(&chunks, size, 5_050, 100).await }
    });
    // The second reader is waiting on the same chunk (its read asks for
    // nothing new while the chunk is on its way).
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!second.is_finished());
    remote.open_gate();
    assert_eq!(first.await.unwrap().unwrap(), l.data[5_000..5_100]);
    assert_eq!(second.await.unwrap().unwrap(), l.data[5_050..5_150]);
    assert_eq!(remote.ranges().len(), 1, "{:?}", remote.ranges());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_chunks_serve_reads_without_a_fetch() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::new(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    chunks.start_rest();
    wait_until("every chunk local", || all_present(&chunks)).await;
    let asked = remote.ranges().len();
    // The rest comes in requests of up to 4 MiB: this layer in one.
    assert_eq!(asked, 1);
    let got = read(&chunks, l.data.len() as u64, 0, l.data.len())
        .await
        .unwrap();
    assert_eq!(got, l.data);
    assert_eq!(remote.ranges().len(), asked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_serves_a_reopen_without_the_network() {
    let l = TestLayer::small(Vec::new());
    let (_d, store) = store();
    {
        let chunks = open(&store, &l, MemoryRemote::new(&l), LONG).await.unwrap();
        chunks.start_rest();
        wait_until("every chunk local", || all_present(&chunks)).await;
        wait_until("stored", || chunks.stored()).await;
    }
    // A registry that is down for everything: the region and the chunks
    // come from the cache.
    let down = MemoryRemote::new(&l).answering(Answer::Unreachable);
    let chunks = open(&store, &l, down.clone(), LONG).await.unwrap();
    assert_eq!(down.streams.load(Ordering::SeqCst), 0);
    assert!(all_present(&chunks));
    let got = read(&chunks, l.data.len() as u64, 0, l.data.len())
        .await
        .unwrap();
    assert_eq!(got, l.data);
    assert!(down.ranges().is_empty());
    assert_eq!(chunks.bytes_fetched(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_cached_chunk_is_fetched_again_the_others_kept() {
    let l = TestLayer::small(Vec::new());
    let (_d, store) = store();
    {
        let chunks = open(&store, &l, MemoryRemote::new(&l), LONG).await.unwrap();
        chunks.start_rest();
        wait_until("every chunk local", || all_present(&chunks)).await;
    }
    // One byte of chunk 3's kept compressed bytes changed on disk.
    let blob = lazylayer_store::chunk_cache_dir(store.root(), &l.layer.digest).join("blob");
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[(l.region_len + l.offsets[3] + 10) as usize] ^= 0x55;
    std::fs::write(&blob, &bytes).unwrap();
    let remote = MemoryRemote::new(&l);
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let s = states(&chunks);
    assert_eq!(s.len(), l.chunk_count() as usize);
    for (c, got) in s.iter().enumerate() {
        assert_eq!(*got, if c == 3 { Absent } else { Present }, "chunk {c}");
    }
    let got = read(&chunks, l.data.len() as u64, 0, l.data.len())
        .await
        .unwrap();
    assert_eq!(got, l.data);
    let runs: Vec<Range<u32>> = remote
        .ranges()
        .iter()
        .map(|&(from, len)| l.chunks_of(from, len))
        .collect();
    assert_eq!(runs, vec![3..4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaping_removes_stored_caches_not_in_use_and_keeps_the_rest() {
    let (d, store) = store();
    let root = d.path().join("store");
    // One layer fetched whole (stored), one with a single chunk in.
    let whole = TestLayer::small(Vec::new());
    let part = TestLayer::new(20 << 10, vec![0], ChunkCompression::Zstd, 11);
    let whole_dir = lazylayer_store::chunk_cache_dir(&root, &whole.layer.digest);
    let part_dir = lazylayer_store::chunk_cache_dir(&root, &part.layer.digest);
    {
        let chunks = open(&store, &whole, MemoryRemote::new(&whole), LONG)
            .await
            .unwrap();
        chunks.start_rest();
        wait_until("stored", || chunks.stored()).await;
        let partial = open(&store, &part, MemoryRemote::new(&part), LONG)
            .await
            .unwrap();
        wait_until("start list done", || partial.start_list_done()).await;
        drop(partial);
        // In use: kept, even by a prune.
        assert_eq!(reap_chunk_caches(&root, true), 1);
        assert!(whole_dir.is_dir());
        assert!(!part_dir.exists());
        let partial = open(&store, &part, MemoryRemote::new(&part), LONG)
            .await
            .unwrap();
        wait_until("start list done", || partial.start_list_done()).await;
    }
    // Stored whole: removed (once its last task has let go of it); not
    // stored: kept for the next start...
    let mut removed = 0;
    wait_until("the stored layer's cache reaped", || {
        removed += reap_chunk_caches(&root, false);
        !whole_dir.exists()
    })
    .await;
    assert_eq!(removed, 1);
    assert!(part_dir.join("blob").is_file());
    // ...unless everything goes.
    assert_eq!(reap_chunk_caches(&root, true), 1);
    assert!(!part_dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_registry_wakes_the_reader_with_an_error_and_is_asked_again() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::new(&l).answering(Answer::Unreachable);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let size = l.data.len() as u64;
    let e = read(&chunks, size, 0, 100).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::HostUnreachable, "{e}");
    // A network error is not tried again by the fetch itself...
    assert_eq!(remote.ranges().len(), 1);
    // ...nor does it fail the image: the next read asks again.
    assert!(!chunks.failed());
    *remote.answer.lock().unwrap() = Answer::Bytes;
    assert_eq!(read(&chunks, size, 0, 100).await.unwrap(), l.data[..100]);
    assert_eq!(remote.ranges().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunk_with_other_bytes_is_refused_for_good() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::new(&l).answering(Answer::Corrupt);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let size = l.data.len() as u64;
    let e = read(&chunks, size, 0, 100).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    assert!(e.to_string().contains("does not match its digest"), "{e}");
    assert!(chunks.failed());
    // Never fetched again, and nothing of it in the cache.
    let e = read(&chunks, size, 0, 100).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    assert_eq!(remote.ranges().len(), 1);
    let present = lazylayer_store::chunk_cache_dir(store.root(), &l.layer.digest).join("present");
    assert_eq!(std::fs::read(present).unwrap()[0], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_request_is_tried_three_times_then_fails_the_chunk() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::new(&l).answering(Answer::NotFound);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let e = read(&chunks, l.data.len() as u64, 0, 100)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    let asked = remote.ranges();
    assert_eq!(asked.len(), 3, "{asked:?}");
    assert!(asked.iter().all(|r| *r == asked[0]));
    assert!(chunks.failed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_the_background_puts_its_chunks_back_and_resuming_fetches_them() {
    let l = TestLayer::small((0..11).collect());
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    wait_until("a start list request", || !remote.ranges().is_empty()).await;
    chunks.stop_background();
    assert!(states(&chunks).iter().all(|c| *c == Absent));
    // Stopped: the prefetch of the rest does not start either.
    chunks.start_rest();
    assert!(!chunks.inner.state.lock().unwrap().rest_started);
    let before = remote.ranges().len();
    remote.open_gate();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(remote.ranges().len(), before);
    assert!(states(&chunks).iter().all(|c| *c == Absent));
    chunks.resume_background();
    wait_until("start list done", || chunks.start_list_done()).await;
    assert!(all_present(&chunks));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_other_than_the_manifest_names_is_refused() {
    let l = TestLayer::small(Vec::new());
    let other = TestLayer::new(40 << 10, Vec::new(), ChunkCompression::Gzip, 99);
    let (_d, store) = store();
    let mut wrong = TestLayer::small(Vec::new());
    wrong.region_digest = other.region_digest.clone();
    let err = open(&store, &wrong, MemoryRemote::new(&l), LONG)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, FetchError::BadImage { reason, .. } if reason.contains("refusing it")),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registry_ignoring_range_streams_every_chunk_once() {
    let l = TestLayer::small(vec![4]);
    let remote = MemoryRemote::build(&l, true, Semaphore::MAX_PERMITS);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let got = read(&chunks, l.data.len() as u64, 30_000, 1_000)
        .await
        .unwrap();
    assert_eq!(got, l.data[30_000..31_000]);
    wait_until("every chunk local", || all_present(&chunks)).await;
    wait_until("stored", || chunks.stored()).await;
    assert_eq!(remote.streams.load(Ordering::SeqCst), 1);
    assert!(remote.ranges().is_empty());
    assert_eq!(chunks.bytes_fetched(), l.blob.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_whose_chunk_never_comes_times_out() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), Duration::from_millis(200))
        .await
        .unwrap();
    let e = read(&chunks, l.data.len() as u64, 0, 100)
        .await
        .unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
    remote.open_gate();
}

/// Two opens of one boot layer on one store stand for two processes: each
/// has its own open files, so their chunk locks conflict as processes' do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_starts_sharing_the_cache_fetch_each_chunk_once() {
    let l = TestLayer::small(vec![2, 3, 6]);
    let remote = MemoryRemote::gated(&l);
    let (_d, store) = store();
    let a = open(&store, &l, remote.clone(), LONG).await.unwrap();
    wait_until("the first start's request", || remote.ranges().len() == 1).await;
    let b = open(&store, &l, remote.clone(), LONG).await.unwrap();
    // The second start's set is on its way for the first: it waits.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(remote.ranges().len(), 1, "{:?}", remote.ranges());
    remote.open_gate();
    wait_until("the first start's set", || a.start_list_done()).await;
    wait_until("the second start's set", || b.start_list_done()).await;
    assert_eq!(remote.ranges().len(), 1, "{:?}", remote.ranges());
    assert_eq!(states(&b)[6], Present);
    // And its bytes are the file's.
    let size = l.data.len() as u64;
    let got = read(&b, size, 7_000, 1_000).await.unwrap();
    assert_eq!(got, l.data[7_000..8_000]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_a_peer_failed_to_fetch_are_fetched_by_the_one_waiting() {
    let l = TestLayer::small(vec![2, 3]);
    let failing = MemoryRemote::gated(&l);
    let working = MemoryRemote::new(&l);
    let (_d, store) = store();
    let a = open(&store, &l, failing.clone(), LONG).await.unwrap();
    wait_until("the first start's request", || failing.ranges().len() == 1).await;
    let b = open(&store, &l, working.clone(), LONG).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(working.ranges().is_empty(), "{:?}", working.ranges());
    // The first start's registry goes away: it lets go, the second fetches.
    let failing = failing.answering(Answer::Unreachable);
    failing.open_gate();
    wait_until("the second start's set", || b.start_list_done()).await;
    assert_eq!(states(&b)[2], Present);
    assert_eq!(states(&b)[3], Present);
    assert_eq!(spans_asked(&l, &working), vec![2..4]);
    assert!(matches!(states(&a)[2], Unreachable(_)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_whose_chunks_are_all_local_opens_whole_and_not_before() {
    let l = TestLayer::small(Vec::new());
    let remote = MemoryRemote::new(&l);
    let (_d, store) = store();
    let chunks = open(&store, &l, remote.clone(), LONG).await.unwrap();
    let size = l.data.len() as u64;
    assert!(!chunks.file_complete(FILE, size));
    assert!(chunks.whole_file(FILE, size).is_none());
    // Read it all by ranges: then every chunk is local.
    assert_eq!(read(&chunks, size, 0, size as usize).await.unwrap(), l.data);
    assert!(chunks.file_complete(FILE, size));
    let mut got = Vec::new();
    use std::io::Read as _;
    chunks
        .whole_file(FILE, size)
        .unwrap()
        .unwrap()
        .read_to_end(&mut got)
        .unwrap();
    assert_eq!(got, l.data);
    // Copied once: a second open is the same file, no fetch either.
    let fetched = remote.ranges().len();
    let f = chunks.whole_file(FILE, size).unwrap().unwrap();
    assert_eq!(f.metadata().unwrap().len(), size);
    assert_eq!(remote.ranges().len(), fetched);
    // Kept in a private directory of this open's.
    use std::os::unix::fs::PermissionsExt;
    let dirs: Vec<_> = std::fs::read_dir(&chunks.inner.dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("files."))
        .collect();
    assert_eq!(dirs.len(), 1);
    assert_eq!(
        dirs[0].metadata().unwrap().permissions().mode() & 0o777,
        0o700
    );
    drop(f);
    drop(chunks);
}

/// An index whose encoding spans several header parts.
fn big_index() -> BootIndex {
    let mut entries = vec![entry(b"", FileKind::Dir, 0)];
    entries.extend((1..12_000).map(|i| {
        let name = format!("f{i:06}-{}", "x".repeat(90));
        entry(name.as_bytes(), FileKind::File, i)
    }));
    let index = BootIndex::new(vec![format!("sha256:{:064x}", 1)], entries).unwrap();
    let len = index.encode().len();
    assert!(len > PART_BYTES, "{len} bytes");
    index
}

fn region(tar: &[u8]) -> Vec<u8> {
    compress_piece(tar, ChunkCompression::Gzip).unwrap()
}

/// The index in its entries' headers, over several entries, decodes;
/// so does a region made before (the index as one entry's content).
/// A region with the index twice, in both forms, or with another entry
/// is refused.
#[test]
fn regions_hold_the_index_in_headers_or_older_ones_as_content() {
    let index = big_index();
    let bytes = index.encode();
    let name = Path::new(INDEX_FILE_NAME);
    let headers = metadata_entry_tar(name, 0o444, 0, &bytes).unwrap();
    let content = file_entry_tar(name, 0o444, 0, &bytes).unwrap();
    let gz = ChunkCompression::Gzip;
    assert_eq!(decode_region("i", &region(&headers), gz).unwrap(), index);
    assert_eq!(decode_region("i", &region(&content), gz).unwrap(), index);

    let twice = [&content[..], &content[..]].concat();
    let both = [&headers[..], &content[..]].concat();
    let other = file_entry_tar(Path::new("etc/passwd"), 0o644, 0, b"root").unwrap();
    let other = [&headers[..], &other[..]].concat();
    for (what, tar) in [
        ("twice", twice),
        ("both forms", both),
        ("another entry", other),
    ] {
        let err = decode_region("i", &region(&tar), gz)
            .unwrap_err()
            .to_string();
        assert!(err.contains("index region"), "{what}: {err}");
    }
    // A stray escape in the headers' value: refused, not guessed at.
    let mut stray = metadata_entry_tar(name, 0o444, 0, b"ab").unwrap();
    let at = stray.windows(3).position(|w| w == b"=ab").unwrap();
    stray[at + 1] = b'%';
    let err = decode_region("i", &region(&stray), gz)
        .unwrap_err()
        .to_string();
    assert!(err.contains("stray"), "{err}");
    let err = decode_region("i", &region(&[0u8; 1024]), gz)
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no entry"), "{err}");
}

/// A region whose request opened its connection (the start's first, its
/// manifest kept in the store) came a handshake's round trip late: its
/// first byte counts half for the link's estimate, so a registry 25 ms
/// away does not read as far (40 ms) and send the start set 32 wide with
/// narrow gaps. On an open connection the first byte counts whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_region_that_opened_its_connection_counts_half_its_first_byte() {
    let l = TestLayer::small(Vec::new());
    for (opens_connection, far) in [(true, false), (false, true)] {
        let remote = MemoryRemote::new(&l).first_byte_after(Duration::from_millis(50));
        let (_d, store) = store();
        let region = BootChunks::region_with(
            &store,
            "registry.test/boot:1",
            &l.layer.digest,
            l.layer.size,
            (l.region_len, &l.region_digest),
            opens_connection,
            remote,
        )
        .await
        .unwrap();
        let link = region.head.link.unwrap();
        assert_eq!(link.in_flight() != super::IN_FLIGHT, far, "{link:?}");
        // Kept as such (to the microsecond) for the next start.
        let kept = super::plan::LinkEstimate::load(&region.dir).unwrap();
        assert_eq!(kept.first_byte.as_micros(), link.first_byte.as_micros());
    }
}
