//! Podman (Debian's 4.3, unmodified) starting an optimized image lazily
//! through `lazylayer store` (containers-storage's additional layer store).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn root_podman_runs_an_optimized_image_lazily_through_the_layer_store() {
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt, src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, layers) = layer_digests(opt.path(), &src);
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();

    let root = tempfile::tempdir().unwrap();
    let als = tempfile::tempdir().unwrap();
    // Dropped after the store process (declared later): a failing test that
    // kills it outright still leaves no lazy mount behind.
    let _leftovers = (
        StoreLeftovers(root.path().to_path_buf()),
        StoreLeftovers(als.path().to_path_buf()),
    );
    let mut store = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(root.path())
            .args(["store", "--prefetch", "off", "--dir"])
            .arg(als.path())
            .arg(&dst)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while mounts_below(als.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "lazylayer store did not get ready"
        );
        assert!(
            store.0.try_wait().unwrap().is_none(),
            "lazylayer store exited early"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let podman = Podman::new();
    let opt_arg = format!("overlay.additionallayerstore={}:ref", als.path().display());
    let pm = |args: &[&str]| podman.ok_with(&["--storage-opt", &opt_arg], args);
    pm(&["pull", "-q", "--tls-verify=false", &dst]);
    let out = pm(&["run", "--rm", "--network=none", &dst]);
    assert_eq!(
        out, "ok\n",
        "podman ran the image's own command on the lazy root"
    );
    for (d, b) in layers.iter().zip(&before) {
        assert_eq!(
            reg.blob_gets(d),
            *b,
            "layer {d} was downloaded; podman should have used the layer store"
        );
    }
    // A file outside the boot layer still reads (fetched on demand by the store).
    let out = pm(&[
        "run",
        "--rm",
        "--network=none",
        &dst,
        "python3",
        "-c",
        "import sqlite3; print('sql')",
    ]);
    assert_eq!(out, "sql\n");

    // Stopping the store undoes everything it set up.
    let pid = rustix::process::Pid::from_raw(store.0.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    assert!(store.0.wait().unwrap().success());
    assert!(mounts_below(als.path()).is_empty(), "bind mounts left");
    assert!(mounts_below(root.path()).is_empty(), "FUSE mounts left");
    assert!(
        tree_listing(als.path()).is_empty(),
        "layer store entries left: {:?}",
        tree_listing(als.path())
    );
}

/// The store prefetches an image's other layers only once the start has
/// settled, as `run` and the snapshotter do, not when it mounts the image:
/// before any container touches the root there is no activity for the quiet
/// trigger, so the prefetch waits for `PREFETCH_MAX_WAIT` (2 s) after the
/// mount. The registry (behind a recording proxy) sees the first GET of an
/// original layer only then; podman still pulls and runs the image, and the
/// image is recorded in the store once every layer is local.
#[test]
fn root_podman_store_prefetches_only_after_the_start_settles() {
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (opt, src, dst) = optimize_image(&reg, "multilayer", &[]);
    let (_, layers) = layer_digests(opt.path(), &src);
    let proxy = common::proxy::CuttingProxy::relay(reg.port);
    let img = dst.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    let original_gets = || {
        let text = proxy.requests_text();
        layers
            .iter()
            .filter(|d| text.contains(&format!("get /v2/optimized/multilayer/blobs/{d}")))
            .count()
    };

    let root = tempfile::tempdir().unwrap();
    let als = tempfile::tempdir().unwrap();
    // Dropped after the store process (declared later): a failing test that
    // kills it outright still leaves no lazy mount behind.
    let _leftovers = (
        StoreLeftovers(root.path().to_path_buf()),
        StoreLeftovers(als.path().to_path_buf()),
    );
    let mut store = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(root.path())
            .args(["store", "--dir"])
            .arg(als.path())
            .arg(&img)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while mounts_below(als.path()).is_empty() {
        assert!(
            Instant::now() < deadline,
            "lazylayer store did not get ready"
        );
        assert!(
            store.0.try_wait().unwrap().is_none(),
            "lazylayer store exited early"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = Instant::now();
    // Nothing touches the root: the first original-layer GET comes with the
    // max-wait trigger, 2 s after the mount (the mount precedes `ready`).
    while original_gets() == 0 {
        assert!(
            ready.elapsed() < Duration::from_secs(20),
            "no prefetch at all within 20 s: {}",
            proxy.requests_text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let first = ready.elapsed();
    eprintln!("first GET of an original layer {first:?} after the store was ready");
    assert!(
        first >= Duration::from_millis(1500),
        "the store started prefetching {first:?} after it was ready, before its start could settle"
    );

    let podman = Podman::new();
    let opt_arg = format!("overlay.additionallayerstore={}:ref", als.path().display());
    let pm = |args: &[&str]| podman.ok_with(&["--storage-opt", &opt_arg], args);
    pm(&["pull", "-q", "--tls-verify=false", &img]);
    let out = pm(&[
        "run",
        "--rm",
        "--network=none",
        &img,
        "cat",
        "/data/keep/a.txt",
    ]);
    assert!(!out.is_empty(), "podman ran the image on the lazy root");
    // Once every layer has arrived the image is recorded in the store, while
    // the store still serves it (not only when it stops).
    let recorded = || {
        let v = lazylayer_json(root.path(), &["images"]);
        let refs: Vec<String> = (v.as_array().unwrap().iter())
            .map(|i| i["reference"].as_str().unwrap_or_default().to_string())
            .collect();
        refs.iter().any(|r| r.starts_with(&img))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !recorded() {
        assert!(
            Instant::now() < deadline,
            "the image was not recorded once prefetched"
        );
        std::thread::sleep(Duration::from_millis(250));
    }

    send_signal(store.0.id(), rustix::process::Signal::TERM);
    assert_eq!(wait_exit(&mut store.0, Duration::from_secs(30)), Some(0));
    assert!(mounts_below(als.path()).is_empty(), "bind mounts left");
    assert!(mounts_below(root.path()).is_empty(), "FUSE mounts left");
}
