//! A fault-injecting TCP proxy: relays real HTTP between a real client and
//! the real registry, and cuts a connection when told to.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// A TCP proxy in front of the registry that records requests and cuts a
/// connection after `cut_after` response bytes. It relays real HTTP between a
/// real client and the real registry; only the cut is injected.
pub struct CuttingProxy {
    pub port: u16,
    pub requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    pub cuts: Arc<AtomicUsize>,
}

#[derive(Clone, Copy)]
pub enum AfterCut {
    /// Later traffic flows untouched.
    Heal,
    /// The "registry" is gone: every connection, old or new, is closed.
    Die,
}

struct RelayState {
    cut_after: usize,
    cuts: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    after: AfterCut,
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
        let (rq, st, ct) = (requests.clone(), stop.clone(), cuts.clone());
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
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (rq, d2) = (rq.clone(), dead.clone());
                std::thread::spawn(move || relay_requests(c2, s2, rq, d2));
                let state = RelayState {
                    cut_after,
                    cuts: ct.clone(),
                    dead: dead.clone(),
                    after,
                };
                std::thread::spawn(move || relay_responses(server, client, state));
            }
        });
        CuttingProxy {
            port,
            requests,
            stop,
            cuts,
        }
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

fn relay_requests(
    mut from: TcpStream,
    mut to: TcpStream,
    log: Arc<Mutex<Vec<String>>>,
    dead: Arc<AtomicBool>,
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
        log.lock()
            .unwrap()
            .push(String::from_utf8_lossy(&buf[..n]).to_string());
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    close(&from, &to);
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
        let n_ok = n.min(budget - sent);
        if to.write_all(&buf[..n_ok]).is_err() {
            break;
        }
        sent += n_ok;
        if sent >= budget {
            // Decide at the moment of the cut, so connections opened earlier
            // (and pooled by the client) are not all cut too.
            let first = s.cuts.fetch_add(1, Ordering::SeqCst) == 0;
            match s.after {
                AfterCut::Heal if !first => {
                    s.cuts.fetch_sub(1, Ordering::SeqCst);
                    budget = usize::MAX;
                    to.write_all(&buf[n_ok..n]).ok();
                    sent += n - n_ok;
                    continue;
                }
                AfterCut::Die => s.dead.store(true, Ordering::Relaxed),
                AfterCut::Heal => {}
            }
            break;
        }
    }
    close(&from, &to);
}
