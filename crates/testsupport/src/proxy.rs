//! A fault-injecting TCP proxy: relays real HTTP between a real client and
//! the real registry, and cuts, stalls, trickles or slows a connection when
//! told to.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest a stalled connection is held open.
const STALL_HOLD: Duration = Duration::from_secs(120);

/// Receive buffer of the proxy's connection to the registry: small, so that
/// a slowed answer waits in the registry rather than in the proxy's kernel
/// buffers (megabytes on loopback otherwise). The registry's access log then
/// counts about what the client received, as over a real link whose
/// in-flight bytes are a bandwidth-delay product, when a client cuts a
/// download.
const UPSTREAM_RECV_BUFFER: usize = 64 << 10;

/// A TCP proxy in front of the registry that records requests and cuts a
/// connection after `cut_after` response bytes. It relays real HTTP between a
/// real client and the real registry; only the cut is injected.
pub struct CuttingProxy {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    pub cuts: Arc<AtomicUsize>,
    /// Response bytes relayed to clients, all connections.
    pub relayed: Arc<AtomicUsize>,
    /// Body bytes of answers relayed to clients, by the blob digest asked
    /// for: what a slowed link carried of each blob.
    pub relayed_by_blob: Arc<Mutex<HashMap<String, usize>>>,
    /// Responses are relayed at this many bytes per second; 0: unlimited.
    /// May be changed while the proxy runs.
    pub rate: Arc<AtomicUsize>,
    /// Hide `Range` headers from the registry (renamed on the way), as if
    /// it did not support ranges: it then answers 200 with the whole blob.
    pub strip_range: Arc<AtomicBool>,
    /// Keep only the first range of a request for several (the rest of the
    /// header blanked on the way): a registry, or an object store behind
    /// its redirect, that serves one range of several.
    pub first_range_only: Arc<AtomicBool>,
    /// (blob digest, n): the next n requests for that blob get no answer at
    /// all (the connection stays open and silent, as in [`AfterCut::Stall`]).
    pub hold_answers: Arc<Mutex<(String, usize)>>,
    /// (blob digest, bytes per second): answers to requests for that blob
    /// are relayed at this rate (0: unlimited).
    pub slow_blob: Arc<Mutex<(String, usize)>>,
    /// (blob digest, n): the next n answers to Range requests for that blob
    /// that do not start at byte 0 get one body byte flipped: a registry (or
    /// a cache in front of it) serving wrong bytes.
    pub corrupt_ranges: Arc<Mutex<(String, usize)>>,
    /// (blob digest, n): the next n answers for that blob, whole or ranged,
    /// get their first body byte flipped: a mirror with a bad copy.
    pub corrupt_blob: Arc<Mutex<(String, usize)>>,
    dead: Arc<AtomicBool>,
}

#[derive(Clone, Copy)]
pub enum AfterCut {
    /// Later traffic flows untouched.
    Heal,
    /// The "registry" is gone: every connection, old or new, is closed.
    Die,
    /// The connection stays open but nothing more is relayed (held for up to
    /// 120 s, or until the client closes it), as a stalled registry's;
    /// later connections flow untouched.
    Stall,
    /// Every connection stalls once it has sent `cut_after` bytes: a
    /// registry that keeps stalling.
    StallAlways,
    /// After the cut, one byte every so often on that connection; later
    /// connections flow untouched.
    Trickle(Duration),
}

struct RelayState {
    cut_after: usize,
    cuts: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    after: AfterCut,
    relayed: Arc<AtomicUsize>,
    relayed_by_blob: Arc<Mutex<HashMap<String, usize>>>,
    /// Set by the request side: the blob this connection's answer is of,
    /// and whether that answer's headers are still to come.
    blob: AnswerOf,
    rate: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    /// Set when the client's side of this connection has closed.
    client_gone: Arc<AtomicBool>,
    /// Set by the request side: this connection's answer is held back.
    hold: Arc<AtomicBool>,
    /// Set by the request side: this connection's rate (0: the proxy's).
    conn_rate: Arc<AtomicUsize>,
    /// Set by the request side: flip a byte of this answer's body.
    corrupt: Arc<AtomicBool>,
}

impl CuttingProxy {
    pub fn start(upstream: u16, cut_after: usize, after: AfterCut) -> CuttingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let cuts = Arc::new(AtomicUsize::new(0));
        let dead = Arc::new(AtomicBool::new(false));
        let dead_handle = dead.clone();
        let relayed = Arc::new(AtomicUsize::new(0));
        let rate = Arc::new(AtomicUsize::new(0));
        let (rq, st, ct) = (requests.clone(), stop.clone(), cuts.clone());
        let (rl, rt) = (relayed.clone(), rate.clone());
        let relayed_by_blob = Arc::new(Mutex::new(HashMap::new()));
        let rb = relayed_by_blob.clone();
        let strip_range = Arc::new(AtomicBool::new(false));
        let first_range_only = Arc::new(AtomicBool::new(false));
        let sr = (strip_range.clone(), first_range_only.clone());
        let hold_answers = Arc::new(Mutex::new((String::new(), 0)));
        let ha = hold_answers.clone();
        let slow_blob = Arc::new(Mutex::new((String::new(), 0)));
        let sb = slow_blob.clone();
        let corrupt_ranges = Arc::new(Mutex::new((String::new(), 0)));
        let cr_all = corrupt_ranges.clone();
        let corrupt_blob = Arc::new(Mutex::new((String::new(), 0)));
        let cb_all = corrupt_blob.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                if dead.load(Ordering::Relaxed) {
                    drop(client);
                    continue;
                }
                client.set_nonblocking(false).unwrap();
                let server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
                let _ = socket2::SockRef::from(&server).set_recv_buffer_size(UPSTREAM_RECV_BUFFER);
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (rq, d2, sr, ha) = (rq.clone(), dead.clone(), sr.clone(), ha.clone());
                let client_gone = Arc::new(AtomicBool::new(false));
                let hold = Arc::new(AtomicBool::new(false));
                let conn_rate = Arc::new(AtomicUsize::new(0));
                let corrupt = Arc::new(AtomicBool::new(false));
                let blob = Arc::new(Mutex::new((String::new(), false)));
                let b2 = blob.clone();
                let (cg, h2, cr, sb) = (
                    client_gone.clone(),
                    hold.clone(),
                    conn_rate.clone(),
                    sb.clone(),
                );
                let (cra, cba, co) = (cr_all.clone(), cb_all.clone(), corrupt.clone());
                std::thread::spawn(move || {
                    relay_requests(c2, s2, (rq, b2), d2, sr, (ha, h2), (sb, cr), (cra, cba, co));
                    cg.store(true, Ordering::SeqCst);
                });
                let state = RelayState {
                    cut_after,
                    cuts: ct.clone(),
                    dead: dead.clone(),
                    after,
                    relayed: rl.clone(),
                    relayed_by_blob: rb.clone(),
                    blob,
                    rate: rt.clone(),
                    stop: st.clone(),
                    client_gone,
                    hold,
                    conn_rate,
                    corrupt,
                };
                std::thread::spawn(move || relay_responses(server, client, state));
            }
        });
        CuttingProxy {
            port,
            requests,
            stop,
            cuts,
            relayed,
            relayed_by_blob,
            rate,
            strip_range,
            first_range_only,
            hold_answers,
            slow_blob,
            corrupt_ranges,
            corrupt_blob,
            dead: dead_handle,
        }
    }

    /// The "registry" dies now: open connections are closed at their next
    /// read, new ones refused.
    pub fn die_now(&self) {
        self.dead.store(true, Ordering::SeqCst);
    }

    /// A proxy that relays everything (no cut), for counting and slowing.
    pub fn relay(upstream: u16) -> CuttingProxy {
        Self::start(upstream, usize::MAX, AfterCut::Heal)
    }

    /// The requests seen so far, lower-cased, one after the other.
    pub fn requests_text(&self) -> String {
        self.requests.lock().unwrap().join("\n").to_lowercase()
    }

    /// Body bytes relayed for blob `digest` so far.
    pub fn relayed_for(&self, digest: &str) -> usize {
        self.relayed_by_blob
            .lock()
            .unwrap()
            .get(digest)
            .copied()
            .unwrap_or(0)
    }

    /// The `N` of every `Range: bytes=N-` header the proxy relayed for
    /// blob `digest`.
    pub fn range_starts(&self, digest: &str) -> Vec<u64> {
        let mut out = Vec::new();
        for r in self.requests.lock().unwrap().iter() {
            let r = r.to_lowercase();
            if !r.contains(&format!("/blobs/{digest}")) {
                continue;
            }
            for l in r.lines() {
                if let Some(v) = l.trim().strip_prefix("range: bytes=") {
                    if let Some(n) = v.split('-').next().and_then(|n| n.parse().ok()) {
                        out.push(n);
                    }
                }
            }
        }
        out
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn close(a: &TcpStream, b: &TcpStream) {
    let _ = a.shutdown(Shutdown::Both);
    let _ = b.shutdown(Shutdown::Both);
}

/// (blob digest, whether its answer's headers are still to come): what a
/// connection's next answer is of.
type AnswerOf = Arc<Mutex<(String, bool)>>;

/// (blob digest, how many more answers): a fault armed for one blob.
type BlobFault = Arc<Mutex<(String, usize)>>;

#[allow(clippy::too_many_arguments)]
fn relay_requests(
    mut from: TcpStream,
    mut to: TcpStream,
    (log, blob): (Arc<Mutex<Vec<String>>>, AnswerOf),
    dead: Arc<AtomicBool>,
    (strip_range, first_range_only): (Arc<AtomicBool>, Arc<AtomicBool>),
    (hold_answers, hold): (Arc<Mutex<(String, usize)>>, Arc<AtomicBool>),
    (slow_blob, conn_rate): (Arc<Mutex<(String, usize)>>, Arc<AtomicUsize>),
    (corrupt_ranges, corrupt_blob, corrupt): (BlobFault, BlobFault, Arc<AtomicBool>),
) {
    let mut buf = vec![0u8; 16384];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if dead.load(Ordering::Relaxed) {
            break;
        }
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        {
            let mut h = hold_answers.lock().unwrap();
            if h.1 > 0 && !h.0.is_empty() && text.contains(&format!("/blobs/{}", h.0)) {
                h.1 -= 1;
                hold.store(true, Ordering::SeqCst);
            }
        }
        {
            let sb = slow_blob.lock().unwrap();
            if !sb.0.is_empty() && text.contains(&format!("/blobs/{}", sb.0)) {
                conn_rate.store(sb.1, Ordering::Relaxed);
            }
        }
        {
            let mut c = corrupt_ranges.lock().unwrap();
            let lower = text.to_lowercase();
            if c.1 > 0
                && !c.0.is_empty()
                && lower.contains(&format!("/blobs/{}", c.0))
                && lower.contains("\r\nrange: bytes=")
                && !lower.contains("\r\nrange: bytes=0-")
            {
                c.1 -= 1;
                corrupt.store(true, Ordering::SeqCst);
            }
        }
        {
            let mut c = corrupt_blob.lock().unwrap();
            if c.1 > 0 && !c.0.is_empty() && text.contains(&format!("/blobs/{}", c.0)) {
                c.1 -= 1;
                corrupt.store(true, Ordering::SeqCst);
            }
        }
        // Requests on one connection follow each other (no pipelining):
        // what comes back next is this blob's.
        if text.contains(" HTTP/1.1\r\n") {
            let digest = text
                .lines()
                .next()
                .and_then(|l| l.split("/blobs/").nth(1))
                .and_then(|rest| rest.split([' ', '?']).next())
                .unwrap_or("");
            *blob.lock().unwrap() = (digest.to_string(), true);
        }
        log.lock().unwrap().push(text);
        if strip_range.load(Ordering::Relaxed) {
            // Same length, so nothing else in the request moves.
            for i in 0..n.saturating_sub(7) {
                if buf[i..i + 8].eq_ignore_ascii_case(b"\r\nrange:") {
                    buf[i + 2..i + 7].copy_from_slice(b"x-rng");
                }
            }
        }
        if first_range_only.load(Ordering::Relaxed) {
            blank_later_ranges(&mut buf[..n]);
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    close(&from, &to);
}

/// Blank a `Range` header's ranges after its first (same length, so nothing
/// else in the request moves; the registry trims the spaces).
fn blank_later_ranges(req: &mut [u8]) {
    let lower = req.to_ascii_lowercase();
    let Some(at) = lower.windows(15).position(|w| w == b"\r\nrange: bytes=") else {
        return;
    };
    let line_end = lower[at + 2..]
        .windows(2)
        .position(|w| w == b"\r\n")
        .map_or(req.len(), |i| at + 2 + i);
    if let Some(comma) = req[at..line_end].iter().position(|&c| c == b',') {
        req[at + comma..line_end].fill(b' ');
    }
}

impl RelayState {
    /// Whether a held (stalled, trickling) connection should be let go.
    fn over(&self, since: Instant) -> bool {
        self.stop.load(Ordering::Relaxed)
            || self.client_gone.load(Ordering::SeqCst)
            || since.elapsed() > STALL_HOLD
    }

    /// How many bytes at the start of `data` are an answer's headers (all
    /// of them while its header block has not ended), and the blob the
    /// answer is of (empty: not a blob).
    fn headers_in(&self, data: &[u8]) -> (usize, String) {
        let mut b = self.blob.lock().unwrap();
        if !b.1 {
            return (0, b.0.clone());
        }
        match data.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(h) => {
                b.1 = false;
                (h + 4, b.0.clone())
            }
            None => (data.len(), b.0.clone()),
        }
    }

    /// Write to the client at the configured rate.
    fn send(&self, to: &mut TcpStream, data: &[u8]) -> bool {
        let (mut headers, blob) = self.headers_in(data);
        for part in data.chunks(4096) {
            if to.write_all(part).is_err() {
                return false;
            }
            self.relayed.fetch_add(part.len(), Ordering::Relaxed);
            let body = part.len().saturating_sub(headers);
            headers = headers.saturating_sub(part.len());
            if !blob.is_empty() && body > 0 {
                *self
                    .relayed_by_blob
                    .lock()
                    .unwrap()
                    .entry(blob.clone())
                    .or_default() += body;
            }
            let rate = match self.conn_rate.load(Ordering::Relaxed) {
                0 => self.rate.load(Ordering::Relaxed),
                r => r,
            };
            if rate > 0 {
                std::thread::sleep(Duration::from_secs_f64(part.len() as f64 / rate as f64));
            }
        }
        true
    }
}

fn relay_responses(mut from: TcpStream, mut to: TcpStream, s: RelayState) {
    let mut buf = vec![0u8; 16384];
    let mut sent = 0usize;
    let mut budget = s.cut_after;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if s.dead.load(Ordering::Relaxed) {
            break;
        }
        if s.corrupt.load(Ordering::SeqCst) {
            // The first body byte after the headers, once per answer.
            if let Some(h) = buf[..n].windows(4).position(|w| w == b"\r\n\r\n") {
                if h + 4 < n {
                    buf[h + 4] ^= 0x55;
                    s.corrupt.store(false, Ordering::SeqCst);
                }
            }
        }
        if s.hold.load(Ordering::SeqCst) {
            // No answer at all, and no error either.
            let since = Instant::now();
            while !s.over(since) {
                std::thread::sleep(Duration::from_millis(50));
            }
            break;
        }
        let n_ok = n.min(budget - sent);
        if !s.send(&mut to, &buf[..n_ok]) {
            break;
        }
        sent += n_ok;
        if sent >= budget {
            // Decide at the moment of the cut, so connections opened earlier
            // (and pooled by the client) are not all cut too.
            let first = s.cuts.fetch_add(1, Ordering::SeqCst) == 0;
            match s.after {
                AfterCut::Heal | AfterCut::Stall | AfterCut::Trickle(_) if !first => {
                    s.cuts.fetch_sub(1, Ordering::SeqCst);
                    budget = usize::MAX;
                    s.send(&mut to, &buf[n_ok..n]);
                    sent += n - n_ok;
                    continue;
                }
                AfterCut::Die => s.dead.store(true, Ordering::Relaxed),
                AfterCut::Heal => {}
                AfterCut::Stall | AfterCut::StallAlways => {
                    // Silent but open: the client sees no error, only no data.
                    let since = Instant::now();
                    while !s.over(since) {
                        std::thread::sleep(Duration::from_millis(50));
                    }
                }
                AfterCut::Trickle(every) => {
                    let since = Instant::now();
                    let mut pending = buf[n_ok..n].to_vec();
                    let mut one = [0u8; 1];
                    while !s.over(since) {
                        if pending.is_empty() {
                            match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(m) => pending.extend_from_slice(&buf[..m]),
                            }
                        }
                        one[0] = pending.remove(0);
                        if !s.send(&mut to, &one) {
                            break;
                        }
                        std::thread::sleep(every);
                    }
                }
            }
            break;
        }
    }
    close(&from, &to);
}
