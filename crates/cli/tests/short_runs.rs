//! Issue #25: short-lived containers on one store. Each run ends before the
//! image's base layer could have downloaded; every byte a run received is
//! kept, so the image completes within a few runs, no byte of it is sent
//! twice, and from then on a run asks the registry for no blob at all.

mod common;

use std::sync::atomic::Ordering;

use common::*;

/// Bytes the registry sent for blob `digest`, over every GET of it in its
/// access log (combined format: `"GET /v2/…/blobs/DIGEST HTTP/1.1" 206 BYTES`).
fn blob_bytes_sent(log: &str, digest: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest} ")))
        .map(|l| {
            let after = l.split("HTTP/1.1\" ").nth(1).unwrap_or("");
            let mut fields = after.split_whitespace();
            let _status = fields.next();
            fields
                .next()
                .and_then(|b| b.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

/// Whether the store at `root` records the image (every layer local).
#[test]
fn short_runs_keep_every_byte_and_complete_the_image() {
    let (reg, opt_root, layers, proxy, via) = optimized_python3_behind_a_proxy();
    let sizes: Vec<u64> = lazylayer_json(
        opt_root.path(),
        &[
            "inspect",
            &via.replace(&format!("127.0.0.1:{}", proxy.port), &reg.addr()),
        ],
    )["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    // Per connection: the base layer alone takes about 6.4 s, longer than
    // a run (about 1.5 s) and the time it gets to finish after the exit
    // (after the prefetch's start) together.
    proxy.rate.store(8_000_000, Ordering::SeqCst);
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    let log_start = reg.log().len();
    let mut complete_after = None;
    for n in 1..=5 {
        let t = std::time::Instant::now();
        // The first container is kept (no --rm): `status` reads it after.
        let name = format!("short{n}");
        let args: &[&str] = if n == 1 {
            &["--name", &name, "--stats", &via]
        } else {
            &["--rm", "--stats", &via]
        };
        let out = lazylayer_run(root.path(), args);
        eprintln!("run {n}: {:?}", t.elapsed());
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
        let stats = String::from_utf8_lossy(&out.stderr);
        if n == 1 {
            assert!(
                !image_recorded(root.path()),
                "the first run was not cut: it fetched the whole image"
            );
            assert!(
                stats.contains(" kept of "),
                "--stats shows per-layer progress: {stats}"
            );
            // `status` too: the base layer half kept, no more extracted.
            let st = lazylayer_json(root.path(), &["status", &name]);
            let base = st["layers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["digest"] == layers[0].as_str())
                .unwrap_or_else(|| panic!("no base layer in {st}"))
                .clone();
            let kept = base["kept"].as_u64().unwrap();
            let extracted = base["extracted"].as_u64().unwrap();
            assert!(kept > 0 && kept < sizes[0], "{base}");
            assert!(extracted <= kept, "{base}");
            let table = lazylayer_ok(root.path(), &["status", &name]);
            assert!(
                table.contains("KEPT") && table.contains("EXTRACTED"),
                "{table}"
            );
            lazylayer_ok(root.path(), &["rm", &name]);
        }
        if image_recorded(root.path()) {
            complete_after = Some(n);
            break;
        }
    }
    let log = reg.log()[log_start..].to_string();
    // The slowed link (the proxy) is the witness of what was carried: the
    // registry's access log counts what it wrote into its socket, megabytes
    // of which a cut leaves unsent on loopback (reported, not asserted).
    for (d, size) in layers.iter().zip(&sizes) {
        let carried = proxy.relayed_for(d) as u64;
        let logged = blob_bytes_sent(&log, d);
        eprintln!(
            "{d}: {size} bytes; carried {carried} ({:.3}x), registry log {logged} ({:.3}x)",
            carried as f64 / *size as f64,
            logged as f64 / *size as f64
        );
    }
    let complete_after = complete_after.expect("the image was never recorded complete");
    assert!(
        complete_after <= 3,
        "complete only after {complete_after} runs"
    );
    for (d, size) in layers.iter().zip(&sizes) {
        let carried = proxy.relayed_for(d) as u64;
        assert!(carried >= *size, "blob {d} was never carried whole");
        assert!(
            carried as f64 <= *size as f64 * 1.05,
            "blob {d} ({size} bytes) was carried {carried} bytes over the runs:\n{}",
            proxy.requests_text()
        );
    }

    // Complete: the next run asks for no blob.
    let before = proxy.requests_text().len();
    let out = lazylayer_run(root.path(), &["--rm", "--stats", &via]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok\n");
    let after = proxy.requests_text()[before..].to_string();
    assert!(
        !after.contains("/blobs/"),
        "a run of a complete image asked for blobs:\n{after}"
    );
}
