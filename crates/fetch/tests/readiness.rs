//! The fetcher's correctness core without root, registry or network: real
//! gzip'd tar layers (lazylayer-layer's writer) written to temp files and
//! streamed slowly into the real store pipeline by a [`BlobStream`] that reads
//! them, and can pause at a byte offset or flip a byte.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc as std_mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lazylayer_fetch::{FetchOptions, LayerFetcher, LayerState};
use lazylayer_layer::{Compression, LayerWriter};
use lazylayer_oci::{BlobResume, Digest, OciError};
use lazylayer_store::{BlobStream, BoxFuture, LayerRef, Store};
use sha2::{Digest as _, Sha256};
use tokio::sync::{mpsc, Semaphore};

/// Generous bound for things that must happen "soon" (never a timing assert
/// on the code under test: only a guard against hanging).
const SOON: Duration = Duration::from_secs(30);

fn sha(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// One layer blob served by [`FileSource`].
struct Blob {
    name: usize,
    path: PathBuf,
    /// Stop sending at this offset until `gate` is opened.
    pause_at: Option<u64>,
    gate: Arc<Semaphore>,
    /// Send this byte inverted (the digest check at the end then fails).
    flip_at: Option<u64>,
}

/// Streams layer blobs from files, slowly, like a registry would (resume
/// from an offset, digest checked at the end).
#[derive(Default)]
struct FileSource {
    blobs: HashMap<Digest, Blob>,
    /// "start N" / "end N" (stream of layer N began / sent its last byte).
    log: Mutex<Vec<String>>,
    /// Streams running now (a drop guard counts aborted ones out).
    active: AtomicUsize,
    /// Streams waiting at their pause offset.
    paused: AtomicUsize,
    /// (layer, resume offset) of every stream call.
    resumes: Mutex<Vec<(usize, u64)>>,
}

struct Counted<'a>(&'a AtomicUsize);
impl<'a> Counted<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::SeqCst);
        Counted(n)
    }
}
impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl FileSource {
    fn log(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
    fn release(&self, layer: usize) {
        for b in self.blobs.values().filter(|b| b.name == layer) {
            b.gate.add_permits(1 << 20);
        }
    }
}

const CHUNK: usize = 16 << 10;

impl BlobStream for FileSource {
    fn stream<'a>(
        &'a self,
        digest: &'a Digest,
        expected_size: u64,
        resume: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<u64, OciError>> {
        Box::pin(async move {
            let what = format!("blob {digest}");
            let blob = &self.blobs[digest];
            let _active = Counted::new(&self.active);
            self.log
                .lock()
                .unwrap()
                .push(format!("start {}", blob.name));
            self.resumes
                .lock()
                .unwrap()
                .push((blob.name, resume.offset));
            let mut data = Vec::new();
            std::fs::File::open(&blob.path)
                .unwrap()
                .read_to_end(&mut data)
                .unwrap();
            let (mut hasher, mut got) = (resume.hasher, resume.offset as usize);
            let mut pause = blob.pause_at.map(|p| p as usize).filter(|p| *p >= got);
            while got < data.len() {
                if pause == Some(got) {
                    let _paused = Counted::new(&self.paused);
                    drop(blob.gate.acquire().await.unwrap());
                    pause = None;
                }
                let end = (got + CHUNK)
                    .min(data.len())
                    .min(pause.unwrap_or(usize::MAX));
                let mut chunk = data[got..end].to_vec();
                if let Some(f) = blob.flip_at.map(|f| f as usize) {
                    if (got..end).contains(&f) {
                        chunk[f - got] ^= 0xff;
                    }
                }
                hasher.update(&chunk);
                progress(chunk.len() as u64);
                if tx.send(Bytes::from(chunk)).await.is_err() {
                    return Err(OciError::ConsumerGone { what });
                }
                got = end;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            self.log.lock().unwrap().push(format!("end {}", blob.name));
            if got as u64 != expected_size {
                return Err(OciError::SizeMismatch {
                    what,
                    expected: expected_size,
                    actual: got as u64,
                });
            }
            let actual = hasher.finish();
            if actual != *digest {
                return Err(OciError::DigestMismatch {
                    what,
                    expected: digest.clone(),
                    actual,
                });
            }
            Ok(got as u64)
        })
    }
}

/// A test world: a store, layer blob files, and a runtime for the fetches.
struct World {
    dir: tempfile::TempDir,
    store: Store,
    rt: tokio::runtime::Runtime,
    layers: Vec<(LayerRef, Vec<u8>)>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join("store")).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        World {
            dir,
            store,
            rt,
            layers: Vec::new(),
        }
    }

    /// Add a gzip'd tar layer of regular files, in this order.
    fn layer(&mut self, files: &[(&str, &[u8])]) -> usize {
        let mut w = LayerWriter::new(Vec::new(), Compression::Gzip);
        for (p, data) in files {
            w.append_bytes(Path::new(p), 0o644, 0, data).unwrap();
        }
        let (d, blob) = w.finish_into_inner().unwrap();
        let layer = LayerRef {
            digest: d.digest.parse().unwrap(),
            diff_id: d.diff_id.parse().unwrap(),
            size: d.size,
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        };
        self.layers.push((layer, blob));
        self.layers.len() - 1
    }

    fn blob(&self, i: usize) -> &[u8] {
        &self.layers[i].1
    }

    /// A source serving every layer; `tweak` sets pauses and flips.
    fn source(&self, tweak: impl Fn(usize, &mut Blob)) -> Arc<FileSource> {
        let mut src = FileSource::default();
        for (i, (l, blob)) in self.layers.iter().enumerate() {
            let path = self.dir.path().join(format!("blob-{i}"));
            std::fs::write(&path, blob).unwrap();
            let mut b = Blob {
                name: i,
                path,
                pause_at: None,
                gate: Arc::new(Semaphore::new(0)),
                flip_at: None,
            };
            tweak(i, &mut b);
            src.blobs.insert(l.digest.clone(), b);
        }
        Arc::new(src)
    }

    fn fetcher(&self, src: Arc<FileSource>, opts: FetchOptions) -> LayerFetcher {
        LayerFetcher::new(
            self.store.clone(),
            src,
            self.layers.iter().map(|(l, _)| l.clone()).collect(),
            opts,
            self.rt.handle().clone(),
        )
    }
}

fn opts(read_timeout: Duration) -> FetchOptions {
    FetchOptions {
        read_timeout,
        ..FetchOptions::default()
    }
}

fn read_all(mut f: std::fs::File) -> Vec<u8> {
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

/// Poll `cond` until true, panicking after [`SOON`].
fn eventually(what: &str, cond: impl Fn() -> bool) {
    let t = Instant::now();
    while !cond() {
        assert!(t.elapsed() < SOON, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Open in a thread; the result arrives on the channel.
fn open_async(
    f: &LayerFetcher,
    i: usize,
    path: &str,
    expected: Option<[u8; 32]>,
) -> std_mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = std_mpsc::channel();
    let (f, path) = (f.clone(), path.to_string());
    std::thread::spawn(move || {
        let r = f
            .open_file(i, path.as_bytes(), expected.as_ref())
            .map(read_all);
        let _ = tx.send(r);
    });
    rx
}

/// Where `needle` (raw bytes of a stored deflate block) sits in `blob`.
fn find(blob: &[u8], needle: &[u8]) -> usize {
    blob.windows(needle.len())
        .position(|w| w == needle)
        .expect("the noise is stored raw in the gzip stream")
}

/// (a) A file is served as soon as its entry lands, while the rest of the
/// layer is still on its way (the stream is held mid-blob: it cannot have
/// finished, so without per-file readiness the open would time out).
#[test]
fn a_file_is_served_while_its_layer_still_streams() {
    let mut w = World::new();
    let big = lazylayer_testsupport::incompressible(1 << 20, 1);
    let l = w.layer(&[("hello.txt", b"hello"), ("big.bin", &big)]);
    let half = w.blob(l).len() as u64 / 2;
    let src = w.source(|_, b| b.pause_at = Some(half));
    let f = w.fetcher(src.clone(), opts(SOON));

    let got = f.open_file(l, b"hello.txt", Some(&sha(b"hello"))).unwrap();
    assert_eq!(read_all(got), b"hello");
    assert_eq!(src.log(), ["start 0"], "the stream had not finished");
    assert_eq!(f.status()[l].state, LayerState::Fetching);
    // Not without waiting (the file system then waits off its workers).
    assert!(f.try_open_file(l, b"hello.txt").is_none());

    src.release(l);
    f.wait_all(SOON).unwrap();
    let got = f.try_open_file(l, b"hello.txt").expect("stored").unwrap();
    assert_eq!(read_all(got), b"hello");
    let got = f.open_file(l, b"big.bin", Some(&sha(&big))).unwrap();
    assert!(read_all(got) == big);
}

/// `--verified-only` (serve_unverified off): even a landed file that
/// matches the index waits for the layer's digest check.
#[test]
fn verified_only_waits_for_the_whole_layer() {
    let mut w = World::new();
    let big = lazylayer_testsupport::incompressible(1 << 20, 7);
    let l = w.layer(&[("hello.txt", b"hello"), ("marker", b"m"), ("big.bin", &big)]);
    let half = w.blob(l).len() as u64 / 2;
    let src = w.source(|_, b| b.pause_at = Some(half));
    let f = w.fetcher(
        src.clone(),
        FetchOptions {
            serve_unverified: false,
            ..opts(SOON)
        },
    );
    let reader = open_async(&f, l, "hello.txt", Some(sha(b"hello")));
    // "marker" (after hello.txt) is in the extraction directory: hello.txt
    // has landed.
    let tmp = w.dir.path().join("store/tmp");
    eventually("the entries have landed", || {
        std::fs::read_dir(&tmp)
            .into_iter()
            .flatten()
            .flatten()
            .any(|e| e.path().join("fs/marker").exists())
    });
    match reader.recv_timeout(Duration::from_millis(500)) {
        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        Ok(r) => panic!("served before the layer was verified: {r:?}"),
        Err(e) => panic!("{e}"),
    }
    src.release(l);
    assert_eq!(reader.recv_timeout(SOON).unwrap().unwrap(), b"hello");
    assert_eq!(f.status()[l].state, LayerState::Done);
}

/// (b) A landed file whose bytes differ from the index's SHA-256 (here: a
/// later entry of the same path replaces it) is not served early: the
/// reader waits for the verified layer and gets the final content.
#[test]
fn a_file_not_matching_the_index_waits_for_the_verified_layer() {
    let mut w = World::new();
    let big = lazylayer_testsupport::incompressible(1 << 20, 2);
    let l = w.layer(&[
        ("app.conf", b"old"),
        ("marker", b"m"),
        ("big.bin", &big),
        ("app.conf", b"new"),
    ]);
    let half = w.blob(l).len() as u64 / 2;
    let src = w.source(|_, b| b.pause_at = Some(half));
    let f = w.fetcher(src.clone(), opts(SOON));

    // "marker" comes after the first app.conf: that one has landed too.
    f.open_file(l, b"marker", None).unwrap();
    let reader = open_async(&f, l, "app.conf", Some(sha(b"new")));
    match reader.recv_timeout(Duration::from_millis(500)) {
        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        Ok(r) => panic!("served before the layer was verified: {r:?}"),
        Err(e) => panic!("{e}"),
    }
    src.release(l);
    let got = reader.recv_timeout(SOON).unwrap().unwrap();
    assert_eq!(got, b"new");
    assert_eq!(f.status()[l].state, LayerState::Done);
}

/// (b) A file corrupted in transit lands with bytes the index does not
/// know: it is not served, and when the layer fails its digest the reader
/// gets an error.
#[test]
fn a_corrupted_file_is_never_served() {
    let mut w = World::new();
    let payload = lazylayer_testsupport::incompressible(64 << 10, 3);
    let big = lazylayer_testsupport::incompressible(1 << 20, 4);
    let l = w.layer(&[("lib.so", &payload), ("marker", b"m"), ("big.bin", &big)]);
    let flip = find(w.blob(l), &payload[32 << 10..(32 << 10) + 64]) as u64 + 8;
    let half = w.blob(l).len() as u64 / 2;
    assert!(flip < half);
    let src = w.source(|_, b| {
        b.pause_at = Some(half);
        b.flip_at = Some(flip);
    });
    let f = w.fetcher(src.clone(), opts(SOON));

    f.open_file(l, b"marker", None).unwrap();
    let reader = open_async(&f, l, "lib.so", Some(sha(&payload)));
    match reader.recv_timeout(Duration::from_millis(500)) {
        Err(std_mpsc::RecvTimeoutError::Timeout) => {}
        Ok(r) => panic!(
            "served before the layer was verified: {:?}",
            r.map(|v| v == payload)
        ),
        Err(e) => panic!("{e}"),
    }
    src.release(l);
    let r = reader.recv_timeout(SOON).unwrap();
    assert!(r.is_err(), "a corrupted layer's file was served");
    assert!(matches!(f.status()[l].state, LayerState::Failed(_)));
}

/// (c) A source that stops sending gives the reader an error after the
/// read timeout instead of hanging.
#[test]
fn a_stalled_source_gives_readers_an_error() {
    let mut w = World::new();
    let big = lazylayer_testsupport::incompressible(1 << 20, 5);
    let l = w.layer(&[("big.bin", &big), ("late.txt", b"late")]);
    let half = w.blob(l).len() as u64 / 2;
    let src = w.source(|_, b| b.pause_at = Some(half));
    let f = w.fetcher(src.clone(), opts(Duration::from_millis(300)));

    let r = open_async(&f, l, "late.txt", None)
        .recv_timeout(SOON)
        .expect("the reader hung");
    let e = r.unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    f.cancel();
}

/// (d) `cancel()` fails waiting readers at once (their bound is far away),
/// stops every task, releases the layer (lock, extractor) and keeps what
/// was received: a later fetch resumes from it.
#[test]
fn cancel_fails_readers_at_once_and_leaves_nothing_running() {
    let mut w = World::new();
    let big = lazylayer_testsupport::incompressible(1 << 20, 6);
    let l = w.layer(&[("big.bin", &big), ("late.txt", b"late")]);
    let half = w.blob(l).len() as u64 / 2;
    let src = w.source(|_, b| b.pause_at = Some(half));
    let f = w.fetcher(src.clone(), opts(Duration::from_secs(3600)));
    f.start_prefetch();

    let reader = open_async(&f, l, "late.txt", None);
    eventually("the source is paused", || {
        src.paused.load(Ordering::SeqCst) == 1
    });
    f.cancel();
    let r = reader.recv_timeout(SOON).expect("the reader still waits");
    assert!(r.is_err());
    eventually("no task runs", || {
        f.tasks_running() == 0 && src.active.load(Ordering::SeqCst) == 0
    });

    // Nothing holds the layer: a new fetcher gets it, resuming after the
    // bytes the cut fetch received.
    let src2 = w.source(|_, _| {});
    let f2 = w.fetcher(src2.clone(), opts(SOON));
    let got = f2.open_file(l, b"late.txt", None).unwrap();
    assert_eq!(read_all(got), b"late");
    f2.wait_all(SOON).unwrap();
    let resumed = src2.resumes.lock().unwrap()[0];
    assert!(resumed.1 > 0, "started over: {resumed:?}");
}

/// (e) The prefetch takes layers bottom first, one at a time with
/// concurrency 1, and a reader's request starts at once, ahead of the
/// queued layers.
#[test]
fn prefetch_is_ordered_bounded_and_readers_jump_the_queue() {
    let mut w = World::new();
    for i in 0..4 {
        let big = lazylayer_testsupport::incompressible(256 << 10, 10 + i);
        w.layer(&[("big.bin", &big)]);
    }
    let half0 = w.blob(0).len() as u64 / 2;
    let src = w.source(|i, b| {
        if i == 0 {
            b.pause_at = Some(half0)
        }
    });
    let f = w.fetcher(
        src.clone(),
        FetchOptions {
            prefetch_concurrency: 1,
            ..opts(SOON)
        },
    );
    f.start_prefetch();
    eventually("layer 0 is paused", || {
        src.paused.load(Ordering::SeqCst) == 1
    });
    // Layer 0 holds the only prefetch slot; a reader asks for layer 3.
    f.request(3, true);
    eventually("layer 3 is done", || {
        f.status()[3].state == LayerState::Done
    });
    assert_eq!(src.log(), ["start 0", "start 3", "end 3"]);

    src.release(0);
    f.wait_all(SOON).unwrap();
    let log = src.log();
    let at = |e: &str| log.iter().position(|x| x == e).unwrap();
    assert!(at("end 0") < at("start 1"), "{log:?}");
    assert!(at("end 1") < at("start 2"), "{log:?}");
    assert_eq!(log.len(), 8, "{log:?}");
}

/// A source with a bug: streaming `digest` panics; other blobs stream
/// from `inner`.
struct PanicsOn {
    inner: Arc<FileSource>,
    digest: Digest,
}

impl BlobStream for PanicsOn {
    fn stream<'a>(
        &'a self,
        digest: &'a Digest,
        expected_size: u64,
        resume: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &'a (dyn Fn(u64) + Send + Sync),
    ) -> BoxFuture<'a, Result<u64, OciError>> {
        if *digest == self.digest {
            panic!("injected fault streaming {digest}");
        }
        self.inner
            .stream(digest, expected_size, resume, tx, progress)
    }
}

/// A fetch task that panics fails its layer: readers of it get an error at
/// once (not after their far-away timeout), naming an internal error; the
/// other layers are served.
#[test]
fn a_panicking_fetch_fails_its_layer_alone() {
    let mut w = World::new();
    let bad = w.layer(&[("bad.txt", b"bad")]);
    let good = w.layer(&[("good.txt", b"good")]);
    let src = PanicsOn {
        inner: w.source(|_, _| {}),
        digest: w.layers[bad].0.digest.clone(),
    };
    let f = LayerFetcher::new(
        w.store.clone(),
        Arc::new(src),
        w.layers.iter().map(|(l, _)| l.clone()).collect(),
        opts(Duration::from_secs(3600)),
        w.rt.handle().clone(),
    );
    let e = open_async(&f, bad, "bad.txt", None)
        .recv_timeout(SOON)
        .expect("the reader of the panicked layer hung")
        .unwrap_err();
    assert!(e.to_string().contains("internal error"), "{e}");
    assert!(e.to_string().contains("injected fault"), "{e}");
    assert!(matches!(f.status()[bad].state, LayerState::Failed(_)));
    let good = open_async(&f, good, "good.txt", None)
        .recv_timeout(SOON)
        .expect("the reader of another layer hung");
    assert_eq!(good.unwrap(), b"good");
    f.cancel();
}
