use super::*;

use std::time::Duration;

use crate::digest::Digest;
use crate::error::OciError;
use crate::hosts::{is_loopback, Hosts};
use crate::reference::Reference;

#[test]
fn loopback_detection() {
    assert!(is_loopback("127.0.0.1:5000"));
    assert!(is_loopback("localhost"));
    assert!(is_loopback("[::1]:80"));
    assert!(!is_loopback("registry.example:5000"));
    assert!(!is_loopback("128.0.0.1"));
}

/// A host that takes connections and never answers (as a SIGSTOPped
/// registry does): given up after its tries, then failed at once
/// without being asked; once it answers again (any status), the probe
/// closes its breaker and requests reach it. The assertions are on
/// which error comes, not on times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_stops_answering_fails_fast_then_is_probed_back() {
    // Connections land in the backlog; nobody reads them yet.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = RegistryClient::new(ClientConfig {
        stall_timeout: Duration::from_millis(200),
        max_attempts: 2,
        ..ClientConfig::default()
    })
    .unwrap();
    let r: Reference = format!("127.0.0.1:{port}/x/y:latest").parse().unwrap();
    let e = client.get_manifest(&r).await.unwrap_err();
    assert!(matches!(e, OciError::NoAnswer { tries: 2, .. }), "{e}");
    let e = client.get_manifest(&r).await.unwrap_err();
    assert!(matches!(e, OciError::Unreachable { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("registry 127.0.0.1:{port} unreachable for "))
            && msg.contains("(network failure: no answer within "),
        "{msg}"
    );

    // The host answers again: every request gets a 404.
    answer_404(listener);
    let mut unreachable = 0;
    loop {
        match client.get_manifest(&r).await {
            Err(OciError::Unreachable { .. }) => unreachable += 1,
            Err(OciError::NotFound { .. }) => break,
            other => panic!("{:?}", other.map(|m| m.digest)),
        }
        assert!(unreachable < 300, "the probe never closed the breaker");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A new listener whose every request gets a 404; its port.
fn answering_404() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    answer_404(listener);
    port
}

/// Answer every request on `listener` with a 404, from now on.
fn answer_404(listener: std::net::TcpListener) {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while matches!(c.read(&mut buf), Ok(n) if n > 0) {
                    let answer = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                    if c.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A mirror that stops answering is given up on once; after that its
/// open breaker leaves it out: requests go straight to the registry,
/// and the mirror is not connected to again (until its probe).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mirror_known_down_is_passed_over_without_a_connection() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mirror = silent.local_addr().unwrap().port();
    let upstream = answering_404();
    let registry = format!("127.0.0.1:{upstream}");
    let mut hosts = Hosts::default();
    hosts
        .add_mirror(&registry, &format!("http://127.0.0.1:{mirror}"))
        .unwrap();
    let client = RegistryClient::new(ClientConfig {
        stall_timeout: Duration::from_millis(200),
        hosts,
        ..ClientConfig::default()
    })
    .unwrap();
    let repo = format!("{registry}/x/y:latest")
        .parse::<Reference>()
        .unwrap()
        .repository;
    let digest = Digest::sha256_of(b"nothing");
    // Connections the mirror's backlog holds (accepted here, unread).
    silent.set_nonblocking(true).unwrap();
    let drain = || std::iter::from_fn(|| silent.accept().ok()).count();

    let e = client.fetch_blob(&repo, &digest, None, 1024).await;
    assert!(matches!(e, Err(OciError::NotFound { .. })), "{e:?}");
    assert!(drain() > 0, "the mirror was asked first");
    let e = client.fetch_blob(&repo, &digest, None, 1024).await;
    assert!(matches!(e, Err(OciError::NotFound { .. })), "{e:?}");
    assert_eq!(drain(), 0, "the mirror known down was not asked again");
}

/// A new listener answering every request with a 503; its port and how
/// many requests it got.
fn answering_503() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let asked = std::sync::Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            let count = count.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    // Requests, not reads: one read may hold more than one.
                    let text = String::from_utf8_lossy(&buf[..n]);
                    for _ in text.matches("HTTP/1.1\r\n") {
                        count.fetch_add(1, Ordering::SeqCst);
                        let answer =
                            "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n";
                        if c.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (port, asked)
}

/// A registry that stays busy is asked exactly as often as the retry
/// policy allows (`max_attempts`, the first try included), then its
/// status is the error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_registry_is_asked_as_often_as_the_policy_allows() {
    use std::sync::atomic::Ordering;
    for max_attempts in [1, 3] {
        let (port, asked) = answering_503();
        let client = RegistryClient::new(ClientConfig {
            max_attempts,
            ..ClientConfig::default()
        })
        .unwrap();
        let r: Reference = format!("127.0.0.1:{port}/x/y:latest").parse().unwrap();
        let e = client.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, OciError::Status { status: 503, .. }), "{e}");
        assert_eq!(asked.load(Ordering::SeqCst), max_attempts as usize);
    }
}

/// A busy mirror gets the mirror's budget of tries (fewer than the
/// registry's), then the request moves on to the registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_mirror_gets_fewer_tries_than_the_registry() {
    use std::sync::atomic::Ordering;
    let (mirror, asked) = answering_503();
    let upstream = answering_404();
    let registry = format!("127.0.0.1:{upstream}");
    let mut hosts = Hosts::default();
    hosts
        .add_mirror(&registry, &format!("http://127.0.0.1:{mirror}"))
        .unwrap();
    let client = RegistryClient::new(ClientConfig {
        max_attempts: 5,
        hosts,
        ..ClientConfig::default()
    })
    .unwrap();
    let repo = format!("{registry}/x/y:latest")
        .parse::<Reference>()
        .unwrap()
        .repository;
    let e = client
        .fetch_blob(&repo, &Digest::sha256_of(b"nothing"), None, 1024)
        .await;
    assert!(matches!(e, Err(OciError::NotFound { .. })), "{e:?}");
    assert_eq!(
        asked.load(Ordering::SeqCst),
        super::failover::MIRROR_ATTEMPTS as usize
    );
}

/// A listener answering every request 404 (kept alive), counting the
/// connections it accepted and the request lines it read.
fn counting_404() -> (
    u16,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (a, l) = (accepted.clone(), lines.clone());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { return };
            a.fetch_add(1, Ordering::SeqCst);
            let l = l.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 8192];
                while let Ok(n @ 1..) = c.read(&mut buf) {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    // One request per read: the client waits for each answer.
                    l.lock()
                        .unwrap()
                        .push(text.lines().next().unwrap_or("").to_string());
                    let answer = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                    if c.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, accepted, lines)
}

/// `warm_up(n)` opens n connections with a `GET /v2/` each, and the next
/// n requests at once go out on them: no connection is opened for them
/// (a start's requests then pay no handshake).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warmed_up_connections_carry_the_next_requests() {
    use std::sync::atomic::Ordering;
    let (port, accepted, lines) = counting_404();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    let r: Reference = format!("127.0.0.1:{port}/x/y:latest").parse().unwrap();
    client.warm_up(&r.repository, crate::hosts::Purpose::Pull, 3);
    let t0 = std::time::Instant::now();
    while lines.lock().unwrap().len() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "no warm-up came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Their answers are read and the connections back in the pool.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert!(
        lines
            .lock()
            .unwrap()
            .iter()
            .all(|l| l == "GET /v2/ HTTP/1.1"),
        "{:?}",
        lines.lock().unwrap()
    );
    let (a, b, c) = tokio::join!(
        client.get_manifest(&r),
        client.get_manifest(&r),
        client.get_manifest(&r)
    );
    for e in [a, b, c] {
        assert!(
            matches!(e, Err(OciError::NotFound { .. })),
            "{:?}",
            e.map(|m| m.digest)
        );
    }
    assert_eq!(lines.lock().unwrap().len(), 6);
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "a request opened a connection of its own"
    );
}
