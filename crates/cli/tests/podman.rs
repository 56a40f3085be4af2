//! Podman (Debian's 4.3, unmodified) starting an optimized image lazily
//! through `lazylayer store` (containers-storage's additional layer store).

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `lazylayer store` serving `image` to podman from a store and a layer
/// store dir of its own, ready (its lazy root mounted) when returned. Fields
/// drop in order: the process is killed before its mounts are cleared, so a
/// failing test leaves nothing mounted.
struct ServedStore {
    process: KillOnDrop,
    _leftovers: (StoreLeftovers, UnmountBelow),
    root: tempfile::TempDir,
    als: tempfile::TempDir,
    /// When the lazy root appeared.
    ready: Instant,
}

impl ServedStore {
    fn start(image: &str, extra: &[&str]) -> ServedStore {
        ServedStore::start_in(tempfile::tempdir().unwrap(), image, extra)
    }

    /// [`ServedStore::start`] with a lazylayer store made beforehand.
    fn start_in(root: tempfile::TempDir, image: &str, extra: &[&str]) -> ServedStore {
        let als = tempfile::tempdir().unwrap();
        let leftovers = (
            StoreLeftovers(root.path().to_path_buf()),
            UnmountBelow(als.path().to_path_buf()),
        );
        let mut process = KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_lazylayer"))
                .arg("--root")
                .arg(root.path())
                .arg("store")
                .args(extra)
                .arg("--dir")
                .arg(als.path())
                .arg(image)
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
                process.0.try_wait().unwrap().is_none(),
                "lazylayer store exited early"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        ServedStore {
            process,
            _leftovers: leftovers,
            root,
            als,
            ready: Instant::now(),
        }
    }

    /// `podman ARGS` with this layer store, which must succeed; its stdout.
    fn podman(&self, podman: &Podman, args: &[&str]) -> String {
        let opt = format!(
            "overlay.additionallayerstore={}:ref",
            self.als.path().display()
        );
        podman.ok_with(&["--storage-opt", &opt], args)
    }

    /// SIGTERM: the store exits 0 and leaves no mount behind.
    fn stop(mut self) -> tempfile::TempDir {
        send_signal(self.process.0.id(), rustix::process::Signal::TERM);
        assert_eq!(
            wait_exit(&mut self.process.0, Duration::from_secs(30)),
            Some(0)
        );
        assert!(mounts_below(self.als.path()).is_empty(), "bind mounts left");
        assert!(
            mounts_below(self.root.path()).is_empty(),
            "FUSE mounts left"
        );
        self.als
    }
}

#[test]
fn root_podman_runs_an_optimized_image_lazily_through_the_layer_store() {
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt, src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, layers) = layer_digests(opt.path(), &src);
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();

    let store = ServedStore::start(&dst, &["--prefetch", "off"]);
    let podman = Podman::new();
    let pm = |args: &[&str]| store.podman(&podman, args);
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
    let als = store.stop();
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

    let store = ServedStore::start(&img, &[]);
    let ready = store.ready;
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
    let pm = |args: &[&str]| store.podman(&podman, args);
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
        let v = lazylayer_json(store.root.path(), &["images"]);
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

    store.stop();
}

/// FUSE mounts at or below `dir` (mount points).
fn fuse_mounts_below(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f[2].starts_with("fuse") && std::path::Path::new(f[1]).starts_with(dir))
                .then(|| f[1].to_string())
        })
        .collect()
}

/// An optimized image the lazylayer store holds whole is laid out from the
/// store's extracted layers: no FUSE mount, Podman stacks them itself, the
/// root lists and reads the same as the lazy one and has no index file.
#[test]
fn root_podman_runs_an_image_local_whole_on_the_stores_layers_without_fuse() {
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (_opt, _src, dst) = optimize_image(&reg, "python3", &[]);
    // The image's files (podman's own /proc, /sys, /dev, /run and the
    // per-container /etc files left out): type, mode, owner, file sizes,
    // the bytes of /app and /usr/bin, and whether the index shows.
    let skip = "\\( -path /proc -o -path /sys -o -path /dev -o -path /run -o -path /etc/hosts \
                -o -path /etc/hostname -o -path /etc/resolv.conf \\) -prune -o";
    let script = format!(
        "find / -xdev {skip} -printf '%p %y %m %U %G\\n' | sort; \
         find / -xdev {skip} -type f -printf '%p %s\\n' | sort | md5sum; \
         cat /app/* /usr/bin/* | md5sum; ls -a / | grep -c lazylayer; true"
    );
    let podman = Podman::new();
    let run = |store: &ServedStore| {
        store.podman(&podman, &["pull", "-q", "--tls-verify=false", &dst]);
        let out = store.podman(
            &podman,
            &["run", "--rm", "--network=none", &dst, "sh", "-c", &script],
        );
        // Podman's record of these layers goes with this store's layout.
        store.podman(&podman, &["rmi", "-a", "-f"]);
        out
    };

    let lazy_store = ServedStore::start(&dst, &["--prefetch", "off"]);
    assert!(!fuse_mounts_below(lazy_store.root.path()).is_empty());
    let lazy = run(&lazy_store);
    lazy_store.stop();

    let root = tempfile::tempdir().unwrap();
    lazylayer_ok(root.path(), &["pull", "-q", &dst]);
    let store = ServedStore::start_in(root, &dst, &[]);
    assert_eq!(
        fuse_mounts_below(store.root.path()),
        Vec::<String>::new(),
        "no FUSE for an image local whole"
    );
    // One mount per layer's diff: the store's layers (the boot one under the
    // index mask), nothing mounted as the whole image.
    let (_, layers) = layer_digests(store.root.path(), &dst);
    assert_eq!(mounts_below(store.als.path()).len(), layers.len());
    let native = run(&store);
    assert_eq!(native, lazy, "the native root differs from the lazy one");
    assert!(native.ends_with("\n0\n"), "the index file shows: {native}");
    store.stop();
}
