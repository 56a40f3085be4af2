//! The Prometheus endpoint of a long-lived server (`lazylayer store`), and the
//! prefetch bandwidth limit it makes visible.

mod common;

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `GET /metrics` on `port`: the body.
fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("openmetrics-text"), "{head}");
    body.to_string()
}

/// Scrapes until `done` holds for the text (bounded: the last one).
fn scrape_until(port: u16, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = scrape(port);
        if done(&m) || Instant::now() > deadline {
            return m;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of one series (`name{labels}`), 0 when absent.
fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map_or(0.0, |v| v.parse().unwrap())
}

fn sum_prefix(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// One store serving the optimized python3 image with metrics on, prefetch
/// paced at 1 MB/s: the counters move as a container would make them move.
/// - at start: one mount, the store's size;
/// - while the prefetch runs: its bytes stay near the limit;
/// - a first read of a file at the end of a layer the prefetch is taking
///   slowly completes (a reader is never held to the prefetch's pace: at
///   1 MB/s it would outlast the read timeout), and shows as bytes on demand
///   and as a timed wait;
/// - with the registry gone, a read of a layer not yet here fails, and the
///   failed fetch is counted by cause.
#[test]
fn root_store_metrics_scrape_and_count_what_happens() {
    if !require_root(
        "root_store_metrics_scrape_and_count_what_happens",
        "mounts FUSE",
    ) {
        return;
    }
    let mut reg = Registry::start();
    push_images(&reg, &["python3"]);
    // No seek index: a first read then takes its file's whole layer, the
    // same stream the prefetch paces (with one, it would come by a range
    // request of its own, never paced).
    let (_opt, _src, image) = optimize_image(&reg, "python3", &["--no-seek-index"]);
    let root = tempfile::tempdir().unwrap();
    let als = tempfile::tempdir().unwrap();
    let _leftovers = (
        StoreLeftovers(root.path().to_path_buf()),
        UnmountBelow(als.path().to_path_buf()),
    );
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let out = std::fs::File::create(root.path().join("store.out")).unwrap();
    // The configuration file as a node would have it; the flag sets the
    // prefetch's bandwidth over it.
    let config = root.path().join("config.toml");
    std::fs::write(
        &config,
        "[fetch]\nprefetch_concurrency = 1\nprefetch_bandwidth = \"50MB\"\n",
    )
    .unwrap();
    let root_arg = root.path().display().to_string();
    let als_arg = als.path().display().to_string();
    let mut store = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .args(["--root", &root_arg, "--prefetch-bandwidth", "1MB", "store"])
            .arg("--config")
            .arg(&config)
            .args(["--fetch-timeout", "20", "--metrics-address", &addr])
            .args(["--dir", &als_arg, &image])
            .stdout(out)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let lazy_root = loop {
        let served = std::fs::read_to_string(root.path().join("store.out")).unwrap_or_default();
        let fuse: Vec<String> = mounts_below(root.path());
        if served.contains("serving ") && !fuse.is_empty() {
            break std::path::PathBuf::from(&fuse[0]);
        }
        assert!(Instant::now() < deadline, "the store did not get ready");
        assert!(store.0.try_wait().unwrap().is_none(), "the store exited");
        std::thread::sleep(Duration::from_millis(20));
    };

    let t0 = Instant::now();
    let m = scrape(port);
    assert_eq!(value(&m, "lazylayer_mounts"), 1.0, "{m}");
    assert!(value(&m, "lazylayer_store_bytes") > 0.0, "{m}");
    assert_eq!(value(&m, "lazylayer_reads_waiting"), 0.0, "{m}");

    // The prefetch starts at most 2 s after the mount; at 1 MB/s (plus a
    // short burst and the chunks in flight) it cannot have taken much.
    std::thread::sleep(Duration::from_secs(4));
    let m = scrape(port);
    let secs = t0.elapsed().as_secs_f64();
    let prefetched = value(&m, "lazylayer_fetched_bytes_total{reason=\"prefetch\"}");
    assert!(prefetched > 0.0, "no prefetch after {secs:.1} s:\n{m}");
    assert!(
        prefetched < (secs + 2.0) * 1e6,
        "{prefetched} bytes prefetched in {secs:.1} s at 1 MB/s"
    );

    // This file is near the end of the base layer (51 MB compressed), and
    // the python3 image's workload does not read it (not in the boot
    // layer). At the prefetch's 1 MB/s it would come after the 20 s a read
    // may wait; a reader's layer goes at full speed.
    let templates = std::fs::read(lazy_root.join("var/lib/dpkg/info/tzdata.templates"))
        .expect("a first read of a file at the end of the base layer");
    assert!(templates.starts_with(b"Template: "));
    // The file system answers the read, then counts its wait as over: a
    // scrape right after the read may come in between.
    let m = scrape_until(port, |m| value(m, "lazylayer_reads_waiting") == 0.0);
    assert!(
        value(&m, "lazylayer_fetched_bytes_total{reason=\"on_demand\"}") > 1e6,
        "{m}"
    );
    assert!(value(&m, "lazylayer_read_wait_seconds_count") >= 1.0, "{m}");
    assert_eq!(value(&m, "lazylayer_reads_waiting"), 0.0, "{m}");
    assert_eq!(sum_prefix(&m, "lazylayer_fetch_errors_total"), 0.0, "{m}");

    // The python3 layer (17 MB) is coming at the prefetch's pace, started
    // once the base layer was done (one layer at a time, as the
    // configuration says); this file is at its end.
    reg.stop();
    let late = lazy_root.join("var/lib/dpkg/info/libssl3:amd64.symbols");
    let err = std::fs::read(&late).expect_err("read with the registry gone");
    assert_eq!(err.raw_os_error(), Some(libc_eio()), "{err}");
    let m = scrape(port);
    assert!(
        sum_prefix(&m, "lazylayer_fetch_errors_total") >= 1.0,
        "no fetch error counted:\n{m}"
    );
    assert!(
        value(&m, "lazylayer_fetch_errors_total{cause=\"connection\"}") >= 1.0,
        "{m}"
    );

    // Not /metrics: 404, and the endpoint still answers.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(s, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut r = String::new();
    s.read_to_string(&mut r).unwrap();
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert_eq!(value(&scrape(port), "lazylayer_mounts"), 1.0);

    send_signal(store.0.id(), rustix::process::Signal::TERM);
    assert_eq!(wait_exit(&mut store.0, Duration::from_secs(30)), Some(0));
}

fn libc_eio() -> i32 {
    rustix::io::Errno::IO.raw_os_error()
}
