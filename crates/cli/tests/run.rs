//! `lazylayer run` end to end: lazy starts from the boot layer against a real
//! registry, runc, FUSE and overlayfs; on-demand fetches of exactly the layer
//! needed; faults; and cleanup.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lazylayer_run as run;
use common::proxy::CuttingProxy;
use common::*;

/// Optimize `name` from `reg` into `optimized/NAME:boot` (store of its own);
/// returns (src, dst, layer digests of SRC bottom first). Without seek
/// indexes: these tests count whole-layer fetches (one per layer, shared,
/// resumed, cut); ranged reads through seek indexes are tests/seek.rs'.
fn optimized(reg: &Registry, name: &str, cmd: &[&str]) -> (String, String, Vec<String>) {
    let mut extra = vec!["--no-seek-index"];
    extra.extend_from_slice(cmd);
    let (store, src, dst) = optimize_image(reg, name, &extra);
    let (_, layers) = layer_digests(store.path(), &src);
    (src, dst, layers)
}

/// A registry holding the python3 image and its optimized form (traced
/// with the image's own command): (registry, src, dst, SRC's layer digests).
fn python3_optimized() -> (Registry, String, String, Vec<String>) {
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (src, dst, layers) = optimized(&reg, "python3", &[]);
    (reg, src, dst, layers)
}

fn run_cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    c.arg("--root")
        .arg(root)
        .arg("run")
        .args(args)
        .env_remove("RUST_LOG");
    c
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).to_string()
}

/// The number just before `before` in a `run --stats` report.
fn stat_before(err: &str, before: &str) -> u64 {
    let head = err.split(before).next().unwrap_or_default();
    head.trim_end()
        .rsplit([' ', '('])
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before {before:?} in: {err}"))
}

fn assert_nothing_left(root: &Path) {
    assert!(
        mounts_below(root).is_empty(),
        "mounts left: {:?}",
        mounts_below(root)
    );
    let out = Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "runc containers left"
    );
    assert!(
        tree_listing(&root.join("containers")).is_empty(),
        "container dirs left: {:?}",
        tree_listing(&root.join("containers"))
    );
}

#[test]
fn root_lazy_start_fetches_only_the_boot_layer_and_matches_podman() {
    let (reg, src, dst, layers) = python3_optimized();
    let podman = Podman::new();
    podman.ok(&["pull", "-q", "--tls-verify=false", &src]);
    let expected = podman.ok(&["run", "--rm", "--network=none", &src]);
    assert_eq!(expected, "ok\n");

    let root = tempfile::tempdir().unwrap();
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();
    let out = run(root.path(), &["--rm", "--prefetch", "off", &dst]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), expected, "same output as podman run of SRC");
    for (d, b) in layers.iter().zip(before) {
        assert_eq!(
            reg.blob_gets(d),
            b,
            "layer {d} fetched although the boot layer serves the workload"
        );
    }
    assert_nothing_left(root.path());

    // A workload outside the trace: another module. It fetches the layer(s)
    // holding what it reads, not the whole image.
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();
    let out = run(
        root.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            &dst,
            "--",
            "python3",
            "-c",
            "import sqlite3, xml.dom.minidom; print(sqlite3.sqlite_version_info[0])",
        ],
    );
    assert!(out.status.success());
    assert_eq!(stdout(&out), "3\n");
    let fetched: Vec<usize> = layers
        .iter()
        .zip(&before)
        .map(|(d, b)| reg.blob_gets(d) - b)
        .collect();
    assert!(
        fetched.contains(&1),
        "untraced files come from their layer: {fetched:?}"
    );
    assert!(
        fetched.iter().all(|n| *n <= 1),
        "each layer fetched at most once: {fetched:?}"
    );
    assert_eq!(
        fetched[0], 0,
        "the 51 MB base layer is not needed for this and not fetched"
    );
    assert_nothing_left(root.path());

    // Exit codes pass through; a crash of the workload cleans up too.
    let out = run(root.path(), &["--rm", &dst, "--", "sh", "-c", "exit 42"]);
    assert_eq!(out.status.code(), Some(42));
    // PID 1 ignores signals from inside its namespace: crash a child and pass its status on.
    let out = run(
        root.path(),
        &[
            "--rm",
            &dst,
            "--",
            "sh",
            "-c",
            "sh -c 'kill -9 $$'; exit $?",
        ],
    );
    assert_eq!(out.status.code(), Some(137));
    assert_nothing_left(root.path());
}

#[test]
fn root_whiteouts_and_opaque_dirs_behave_as_in_overlayfs() {
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (src, dst, _) = optimized(&reg, "multilayer", &[]);
    let script = "find /data /usr/local /etc/alt /dangling | sort; stat -c '%n %a %u %g %s %h' /data/hl/one /data/hl/two /data/keep/a.txt; cat /data/keep/a.txt /data/opq/new.txt; ls -la /data/opq | wc -l";
    let podman = Podman::new();
    podman.ok(&["pull", "-q", "--tls-verify=false", &src]);
    let expected = podman.ok(&[
        "run",
        "--rm",
        "--network=none",
        &src,
        "/bin/sh",
        "-c",
        script,
    ]);
    assert!(
        expected.contains("/data/opq/new.txt")
            && !expected.contains("old1")
            && !expected.contains("b.txt")
    );
    let root = tempfile::tempdir().unwrap();
    for prefetch in ["off", "on"] {
        let out = run(
            root.path(),
            &[
                "--rm",
                "--prefetch",
                prefetch,
                &dst,
                "--",
                "/bin/sh",
                "-c",
                script,
            ],
        );
        assert!(out.status.success());
        assert_eq!(
            stdout(&out),
            expected,
            "prefetch {prefetch}: lazy root differs from podman's"
        );
    }
    assert_nothing_left(root.path());
}

/// A start whose boot chunks an earlier one kept (prefetch off: the boot
/// layer is not stored whole): every byte its traced start reads is local,
/// and without passthrough the files are handed to the page cache at open,
/// not faulted in a page at a time through lazylayer (the start's
/// readahead is one page). Complete boot files opened as copies of their
/// own made python3 156 READs of 4 KiB.
#[test]
fn root_a_start_with_its_boot_chunks_local_reads_them_from_the_page_cache() {
    let (_reg, _src, dst, _layers) = python3_optimized();
    let root = tempfile::tempdir().unwrap();
    let args = [
        "--rm",
        "--stats",
        "--prefetch",
        "off",
        "--passthrough",
        "off",
        &dst,
    ];
    let first = run(root.path(), &args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let again = run(root.path(), &args);
    let err = String::from_utf8_lossy(&again.stderr).to_string();
    assert!(again.status.success(), "{err}");
    assert_eq!(stdout(&again), stdout(&first));
    let (opens, reads, preloaded) = (
        stat_before(&err, "through lazylayer"),
        stat_before(&err, "READs,"),
        stat_before(&err, "bytes preloaded"),
    );
    assert!(
        opens > 0 && preloaded > 0 && reads * 4 < opens,
        "opens {opens}, READs {reads}, preloaded {preloaded}: {err}"
    );
    assert_nothing_left(root.path());
}

#[test]
fn root_concurrent_runs_share_one_fetch_and_later_runs_need_no_network() {
    let (reg, _src, dst, layers) = python3_optimized();
    let root = tempfile::tempdir().unwrap();
    let before: Vec<usize> = layers.iter().map(|d| reg.blob_gets(d)).collect();
    // Prefetch off, and neither container exits before every fetch has
    // ended: a fetch cut short by an exit would show up as an extra
    // (partial) GET and blur what this test counts.
    let cmd = [
        "--rm",
        "--prefetch",
        "off",
        &dst,
        "--",
        "sh",
        "-c",
        "python3 -c \"import sqlite3; print('one')\"; read go",
    ];
    let spawn = || {
        run_cmd(root.path(), &cmd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (spawn(), spawn());
    let mut printed = Vec::new();
    for c in [&mut a, &mut b] {
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(c.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        printed.push(line);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let fetching = || {
        std::fs::read_dir(root.path().join("tmp"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("layer-"))
    };
    while fetching() {
        assert!(Instant::now() < deadline, "a layer fetch did not end");
        std::thread::sleep(Duration::from_millis(50));
    }
    // A run that ended before being told to (its stdin closed) fails the
    // test below with both runs' stderr, not here with a broken pipe.
    let told = [&mut a, &mut b].map(|c| {
        use std::io::Write;
        c.stdin.take().unwrap().write_all(b"go\n").is_ok()
    });
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(
        told == [true, true] && a.status.success() && b.status.success(),
        "told to go: {told:?}; exits: {} {}\nfirst run's stderr:\n{}\nsecond run's stderr:\n{}",
        a.status,
        b.status,
        String::from_utf8_lossy(&a.stderr),
        String::from_utf8_lossy(&b.stderr)
    );
    assert_eq!(printed, ["one\n", "one\n"]);
    for (d, b) in layers.iter().zip(&before) {
        let n = reg.blob_gets(d) - b;
        assert!(n <= 1, "layer {d} fetched {n} times by two concurrent runs");
    }
    // Files of layers already local are read by the kernel straight from
    // the store: on a FUSE root by passthrough, unless it is turned off
    // (then every open comes to lazylayer); on an overlay root (the
    // default) from the store's layer with no open coming to lazylayer but
    // those of files not local yet. The prefetch stays off: the image is
    // not local whole yet.
    let opens = |err: &str| -> (u64, u64) {
        (
            stat_before(err, "opens by passthrough"),
            stat_before(err, "through lazylayer"),
        )
    };
    let sqlite = ["python3", "-c", "import sqlite3; print('one')"];
    let stats_run = |lazy_root: &str, passthrough: &str| {
        let mut args = vec!["--rm", "--stats", "--prefetch", "off"];
        args.extend([
            "--lazy-root",
            lazy_root,
            "--passthrough",
            passthrough,
            &dst,
            "--",
        ]);
        args.extend(sqlite);
        let out = run(root.path(), &args);
        assert_eq!(stdout(&out), "one\n");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let (pt, daemon) = opens(&stats_run("fuse", "on"));
    assert!(pt > 0, "passthrough opens: {pt}, daemon: {daemon}");
    let err = stats_run("fuse", "off");
    let (pt, through_fuse) = opens(&err);
    assert_eq!(pt, 0);
    assert!(through_fuse > 0);
    // What the daemon answered: every open one request at least, and the
    // boot files' local bytes handed to the page cache at their first open.
    let (requests, reads, preloaded) = (
        stat_before(&err, "requests,"),
        stat_before(&err, "READs,"),
        stat_before(&err, "bytes preloaded"),
    );
    assert!(
        requests > through_fuse && reads < requests && preloaded > 0,
        "requests {requests}, READs {reads}, preloaded {preloaded}, opens {through_fuse}"
    );
    let (pt, daemon) = opens(&stats_run("overlay", "off"));
    assert_eq!(pt, 0);
    assert!(
        daemon < through_fuse,
        "an overlay root opens through lazylayer only what is not local: {daemon} of {through_fuse}"
    );

    // Make sure every layer is in the store (prefetch may have been cut by the exit).
    lazylayer_ok(root.path(), &["pull", "-q", &dst]);
    let gets: usize = layers
        .iter()
        .zip(&before)
        .map(|(d, b)| reg.blob_gets(d) - b)
        .sum();
    assert_eq!(
        gets,
        layers.len(),
        "each layer fetched exactly once by the runs and the pull together"
    );

    // Every layer local but the image's record gone (the root a lazily
    // started container keeps for its life): on a FUSE root, once every
    // byte is known local the kernel opens files alone; on an overlay root
    // no open comes to lazylayer at all (the store's layers serve them).
    lazylayer_ok(root.path(), &["rmi", &dst]);
    let script =
        "sleep 1; for i in 1 2 3 4 5 6 7 8; do cat /etc/os-release >/dev/null; done; echo ok";
    let out = run(
        root.path(),
        &[
            "--rm",
            "--stats",
            "--lazy-root",
            "fuse",
            &dst,
            "--",
            "sh",
            "-c",
            script,
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout(&out), "ok\n", "{err}");
    assert!(!err.contains("no FUSE"), "{err}");
    assert!(err.contains("then every open by the kernel alone"), "{err}");
    lazylayer_ok(root.path(), &["rmi", &dst]);
    let out = run(
        root.path(),
        &["--rm", "--stats", &dst, "--", "sh", "-c", script],
    );
    assert_eq!(stdout(&out), "ok\n");
    assert_eq!(
        opens(&String::from_utf8_lossy(&out.stderr)),
        (0, 0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // All local: a run with the registry gone works, on the store's layers
    // under the kernel's overlayfs (no FUSE at all).
    let mut reg = reg;
    reg.stop();
    let out = run(root.path(), &["--rm", "--stats", &dst]);
    assert!(
        out.status.success(),
        "run with every layer local must not need the registry"
    );
    assert_eq!(stdout(&out), "ok\n");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no FUSE"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(root.path());
}

#[test]
fn root_registry_dying_mid_layer_gives_eio_then_a_new_run_succeeds() {
    let (reg, _src, dst, layers) = python3_optimized();
    // Answers at 2 MB/s, so that the registry can die while the 51 MB base
    // layer streams: /usr/bin/perl lives there only, past its first 4.5 MB.
    let proxy = CuttingProxy::relay(reg.port);
    proxy
        .rate
        .store(2_000_000, std::sync::atomic::Ordering::Relaxed);
    let via_proxy = dst.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    let root = tempfile::tempdir().unwrap();
    let started = Instant::now();
    // The reader is python3 (started from the boot layer alone): nothing
    // asks for the base layer before it reads perl. Everything python3 has
    // mapped is read first (its boot chunks fetched, its pages cached), so
    // that the reader itself does not fault on a page the dead registry can
    // no longer send.
    let reader = {
        let (root, via) = (root.path().to_path_buf(), via_proxy.clone());
        std::thread::spawn(move || {
            run(
                &root,
                &[
                    "--rm",
                    "--prefetch",
                    "off",
                    "--fetch-timeout",
                    "30",
                    &via,
                    "--",
                    "python3",
                    "-c",
                    "for p in {l.split()[-1] for l in open('/proc/self/maps') if '/' in l}:\n open(p, 'rb').read()\ntry:\n open('/usr/bin/perl','rb').read(); print('rc=0')\nexcept OSError as e:\n print('rc=1', e)",
                ],
            )
        })
    };
    // The registry dies a second into the base layer's download.
    let base_get = format!("get /v2/optimized/python3/blobs/{}", layers[0]);
    while !proxy.requests_text().contains(&base_get) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "perl never read"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    proxy.die_now();
    let out = reader.join().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(120),
        "a reader must not hang"
    );
    let so = stdout(&out);
    assert!(so.contains("rc=1"), "the reader got an error: {so}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&layers[0]) && err.contains("could not be fetched"),
        "the user is told why: {err}"
    );
    assert_nothing_left(root.path());
    assert!(
        tree_listing(&root.path().join("tmp")).is_empty(),
        "no half layer kept"
    );

    // Registry reachable again: a new run succeeds and reuses the boot layer.
    let boot_gets_before = reg.log().matches("/blobs/").count();
    let out = run(
        root.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            &dst,
            "--",
            "sh",
            "-c",
            "cat /usr/bin/perl | wc -c",
        ],
    );
    assert!(out.status.success());
    assert!(stdout(&out).trim().parse::<u64>().unwrap() > 1_000_000);
    let _ = boot_gets_before;
    assert_nothing_left(root.path());

    // A layer corrupted on the registry is rejected by digest: the layer is
    // discarded, and with --verified-only no byte of it is served (EIO).
    let reg2 = Registry::start();
    push_images(&reg2, &["python3"]);
    let (_s, dst2, layers2) = optimized(&reg2, "python3", &[]);
    let data = reg2.blob_data_path(&layers2[1]);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&data, &bytes).unwrap();
    let root2 = tempfile::tempdir().unwrap();
    let out = run(
        root2.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            "--verified-only",
            &dst2,
            "--",
            "python3",
            "-c",
            "import sqlite3",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&layers2[1]) && err.contains("corrupt"),
        "{err}"
    );
    assert!(!stored_layer(root2.path(), &layers2[1]).exists());
    assert_nothing_left(root2.path());
}

/// A layer whose blob was swapped on the registry for a well-formed one
/// with other content: its files land on disk before the blob's digest can
/// be checked (at its end), yet none is served unless its bytes match the
/// SHA-256 the boot index holds for it. The reader gets an error instead.
#[test]
fn root_tampered_layer_content_is_never_served() {
    use std::io::{Read, Write};
    let (reg, src, dst, layers) = python3_optimized();

    // The topmost layer holding sqlite3/__init__.py (not traced, so not in
    // the boot layer), and that file's content.
    let pulled = tempfile::tempdir().unwrap();
    lazylayer_ok(pulled.path(), &["pull", &src]);
    let module = |layer: &str| -> Option<std::path::PathBuf> {
        let lib = stored_layer(pulled.path(), layer).join("fs/usr/lib");
        std::fs::read_dir(lib).ok()?.flatten().find_map(|e| {
            let p = e.path().join("sqlite3/__init__.py");
            (e.file_name().to_string_lossy().starts_with("python3.") && p.is_file()).then_some(p)
        })
    };
    let (i, file) = layers
        .iter()
        .enumerate()
        .rev()
        .find_map(|(i, l)| module(l).map(|p| (i, p)))
        .expect("a layer with the sqlite3 module");
    // Read with cat: python itself would take the module's cached bytecode.
    let in_image = format!(
        "/{}",
        file.components()
            .skip_while(|c| c.as_os_str() != "fs")
            .skip(1)
            .collect::<std::path::PathBuf>()
            .display()
    );
    let original = std::fs::read(&file).unwrap();
    assert!(original.len() > 40);
    let mut tampered = b"print('TAMPERED')\n".to_vec();
    tampered.resize(original.len() - 1, b'#');
    tampered.push(b'\n');

    // Same tar, one file's bytes changed (tar checksums cover headers only).
    let data = reg.blob_data_path(&layers[i]);
    let mut tar = Vec::new();
    flate2::read::MultiGzDecoder::new(std::fs::File::open(&data).unwrap())
        .read_to_end(&mut tar)
        .unwrap();
    let at: Vec<usize> = tar
        .windows(original.len())
        .enumerate()
        .filter(|(_, w)| *w == original.as_slice())
        .map(|(at, _)| at)
        .collect();
    assert_eq!(at.len(), 1, "the module's bytes occur once in the layer");
    tar[at[0]..at[0] + original.len()].copy_from_slice(&tampered);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(&tar).unwrap();
    std::fs::write(&data, gz.finish().unwrap()).unwrap();

    let root = tempfile::tempdir().unwrap();
    let out = run(
        root.path(),
        &["--rm", "--prefetch", "off", &dst, "--", "cat", &in_image],
    );
    let (so, se) = (
        stdout(&out),
        String::from_utf8_lossy(&out.stderr).to_string(),
    );
    assert!(!so.contains("TAMPERED"), "tampered bytes were served: {so}");
    assert!(so.is_empty(), "{so}");
    assert!(!out.status.success());
    assert!(se.contains(&layers[i]), "the run names the bad layer: {se}");
    assert!(!stored_layer(root.path(), &layers[i]).exists());
    assert_nothing_left(root.path());
}

/// `lazylayer prune` while a lazily started container runs: its image has no
/// record yet (layers still missing), but the boot layer and whatever arrived
/// are pinned by the running `lazylayer run`, so nothing it stands on goes.
/// Once it has exited, the same prune removes them.
#[test]
fn root_prune_spares_what_a_running_lazy_container_uses() {
    use std::io::Write;
    let (_reg, _src, dst, _layers) = python3_optimized();
    let root = tempfile::tempdir().unwrap();
    let mut child = run_cmd(
        root.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            &dst,
            "--",
            "sh",
            "-c",
            "python3 -c 'import json'; read go; python3 -c 'import sqlite3; print(\"after prune\")'",
        ],
    )
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    // FUSE root and the container's overlay.
    wait_mounted(root.path(), 2);
    let layers_dir = root.path().join("layers/sha256");
    let listing = || -> std::collections::BTreeSet<std::ffi::OsString> {
        std::fs::read_dir(&layers_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect()
    };
    let before = listing();
    // The boot layer's chunks read so far live in the chunk cache.
    let chunks = || tree_listing(&lazylayer_store::chunk_caches_root(root.path()));
    assert!(!chunks().is_empty(), "the boot chunks are cached");
    // A layer still streaming in (`sh` is not in the boot layer) makes prune
    // wait, and may land meanwhile: nothing may go, something may come.
    let pruned = lazylayer_json(root.path(), &["prune"]);
    assert_eq!(pruned["layers_removed"], 0, "{pruned}");
    assert!(listing().is_superset(&before));
    assert!(!chunks().is_empty(), "prune left the boot chunks alone");

    // The container goes on, fetching a layer it had not touched.
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "after prune\n");
    // Its pin went with it: nothing records the image, so prune takes it all:
    // each layer it read from, stored or (when the exit cut its download)
    // kept as a partial. (The boot layer, never fetched whole with the
    // prefetch off, left with its chunk cache.)
    let pruned = lazylayer_json(root.path(), &["prune"]);
    let n = |k: &str| pruned[k].as_u64().unwrap();
    assert!(n("layers_removed") + n("partials_removed") >= 1, "{pruned}");
    assert_eq!(std::fs::read_dir(&layers_dir).unwrap().count(), 0);
    assert_nothing_left(root.path());
}

#[test]
fn root_plain_image_falls_back_to_full_pull_and_containers_are_managed() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let root = tempfile::tempdir().unwrap();
    let out = run(root.path(), &["--rm", &image_ref(&reg, "busybox")]);
    assert!(out.status.success());
    assert_eq!(stdout(&out), "hello from busybox\n");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no lazylayer boot layer"));
    assert_nothing_left(root.path());

    // Without --rm: ps, status and rm manage it.
    let (_s, dst, _) = optimized(&reg, "busybox", &[]);
    let out = run(
        root.path(),
        &[
            "--name",
            "keepme",
            &dst,
            "--",
            "/bin/sh",
            "-c",
            "echo hi > /tmp/x; exit 3",
        ],
    );
    assert_eq!(out.status.code(), Some(3));
    let ps = lazylayer_json(root.path(), &["ps"]);
    let c = ps
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "keepme")
        .expect("listed");
    assert_eq!(c["status"], "exited");
    assert_eq!(c["exit_code"], 3);
    assert!(
        mounts_below(root.path()).is_empty(),
        "an exited container keeps no mount"
    );
    assert!(
        root.path().join("containers/keepme/upper/tmp/x").is_file(),
        "its writable layer is kept"
    );
    let st = lazylayer_json(root.path(), &["status", "keepme"]);
    assert_eq!(st["layers"].as_array().unwrap().len(), 1);
    let dup = run(root.path(), &["--name", "keepme", &dst]);
    assert!(
        !dup.status.success() && String::from_utf8_lossy(&dup.stderr).contains("exists already")
    );
    lazylayer_ok(root.path(), &["rm", "keepme"]);
    assert_nothing_left(root.path());
}

#[test]
fn root_ctrl_c_stops_the_container_and_cleans_up() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let (_s, dst, _) = optimized(&reg, "busybox", &[]);
    let root = tempfile::tempdir().unwrap();
    let child = run_cmd(root.path(), &["--rm", &dst, "--", "/bin/sleep", "60"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    interrupt_when_mounted(&child, root.path(), 2);
    let out = child.wait_with_output().unwrap();
    assert_ne!(
        out.status.code(),
        Some(0),
        "interrupted run reports failure"
    );
    assert_nothing_left(root.path());
}

/// Starts `lazylayer run ARGS` with stdin piped and waits (up to 60 s) until
/// the container printed `ready` on stdout; the rest of its output is drained
/// in the background.
fn run_until_ready(root: &Path, args: &[&str], env: &[(&str, &str)]) -> KillOnDrop {
    use std::io::BufRead;
    let mut child = KillOnDrop(
        run_cmd(root, args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("container: {line}");
            let _ = tx.send(line);
        }
    });
    loop {
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(l) if l == "ready" => break,
            Ok(_) => {}
            Err(e) => panic!("the container did not get ready: {e}"),
        }
    }
    child
}

/// A signal to `lazylayer run` reaches the container; run exits with the
/// container's code within `within` and leaves nothing behind (mounts, runc
/// container, container dir, pin). A grace period before the KILL of 2 s
/// comes from the environment (as a service manager would set it).
fn signal_stops_and_cleans_up(
    image: &str,
    sig: rustix::process::Signal,
    cmd: &str,
    want: i32,
    within: Duration,
) {
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    let mut child = run_until_ready(
        root.path(),
        &["--rm", image, "--", "sh", "-c", cmd],
        &[("LAZYLAYER_STOP_TIMEOUT", "2")],
    );
    let t = Instant::now();
    send_signal(child.0.id(), sig);
    let code = wait_exit(&mut child.0, within);
    eprintln!("{sig:?}: exit {code:?} after {:?}", t.elapsed());
    assert_eq!(code, Some(want), "{sig:?} to run of {image}: {cmd}");
    assert_nothing_left(root.path());
    assert!(
        pins_left(root.path()).is_empty(),
        "{:?}",
        pins_left(root.path())
    );
}

/// A container's init that traps `SIG` and exits 3.
fn trapping(sig: &str) -> String {
    format!("trap 'exit 3' {sig}; echo ready; while :; do sleep 0.1; done")
}
/// An init that ignores TERM and HUP (PID 1 does unless it handles them):
/// only the KILL after the grace period stops it.
const SLEEPING: &str = "echo ready; exec sleep 1000";

/// `sig` to `run` of a lazy image whose init traps it (exit 3 passes
/// through), and of a plain and a lazy one whose init ignores it (KILLed
/// after the grace period: 137); each leaves nothing behind.
fn signal_reaches_the_container(sig: rustix::process::Signal, name: &str) {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let (_s, lazy, _) = optimized(&reg, "busybox", &[]);
    let plain = image_ref(&reg, "busybox");
    signal_stops_and_cleans_up(&lazy, sig, &trapping(name), 3, Duration::from_secs(5));
    signal_stops_and_cleans_up(&plain, sig, SLEEPING, 137, Duration::from_secs(8));
    signal_stops_and_cleans_up(&lazy, sig, SLEEPING, 137, Duration::from_secs(8));
}

#[test]
fn root_sigterm_to_run_reaches_the_container_and_cleans_up() {
    signal_reaches_the_container(rustix::process::Signal::TERM, "TERM");
}

#[test]
fn root_sighup_to_run_reaches_the_container_and_cleans_up() {
    signal_reaches_the_container(rustix::process::Signal::HUP, "HUP");
}

/// A TERM while the image is still being fetched (from a "registry" that
/// accepts connections and never answers) ends the run at once: exit 143 and
/// nothing left, not even the container's directory.
#[test]
fn root_sigterm_before_the_container_starts_ends_run_and_cleans_up() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let image = format!("{}/stalls/forever:latest", silent.local_addr().unwrap());
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    let mut child = KillOnDrop(
        run_cmd(root.path(), &["--rm", "--name", "early", &image])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Held open, unanswered, until the test ends.
    let (_conn, _) = silent.accept().unwrap();
    assert!(root.path().join("containers/early").is_dir());
    send_signal(child.0.id(), rustix::process::Signal::TERM);
    assert_eq!(wait_exit(&mut child.0, Duration::from_secs(5)), Some(143));
    assert_nothing_left(root.path());
    assert!(pins_left(root.path()).is_empty());
}

/// `kill -9` of a lazy `run NAME` (with `--rm` if `rm`): the container runs
/// on, its mounts and pin stay.
fn orphan(root: &Path, image: &str, name: &str, rm: bool) {
    let mut args = vec!["--name", name];
    if rm {
        args.push("--rm");
    }
    args.extend([image, "--", "sleep", "1000"]);
    let mut child = KillOnDrop(run_cmd(root, &args).stdin(Stdio::null()).spawn().unwrap());
    // Killed only once the init is `sleep` itself, asleep: a container still
    // reading its binary through FUSE (a boot file served from chunks is read
    // through the daemon) would fail and exit when the FUSE daemon dies.
    let deadline = Instant::now() + Duration::from_secs(30);
    while runc_init_comm(root, name).as_deref() != Some("sleep") || !init_asleep(root, name) {
        assert!(Instant::now() < deadline, "the container did not start");
        assert!(child.0.try_wait().unwrap().is_none(), "run exited");
        std::thread::sleep(Duration::from_millis(20));
    }
    send_signal(child.0.id(), rustix::process::Signal::KILL);
    let _ = child.0.wait();
    // The leftovers the owner's death leaves.
    assert!(
        runc_containers(root).contains(&(name.to_string(), "running".to_string())),
        "{:?}",
        runc_containers(root)
    );
    // The overlay stays under the running container, and the stub tree it
    // stacks (an EROFS image in a file only the mount holds: nothing serves
    // it, so nothing hangs on it). The lazy
    // root, whose server is gone, is force-unmounted by the run's death
    // watch (nothing but that overlay used it, and the overlay holds its
    // own reference): a moment after the run's death.
    let dir = root.join("containers").join(name);
    let deadline = Instant::now() + Duration::from_secs(10);
    while mount_types_below(&dir)
        .iter()
        .any(|t| t.starts_with("fuse"))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(mount_types_below(&dir), ["erofs", "overlay"]);
    assert!(!pins_left(root).is_empty());
}

/// Whether container `name`'s init is blocked in nanosleep/clock_nanosleep.
fn init_asleep(root: &Path, name: &str) -> bool {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args(["state", name])
        .output()
        .unwrap();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return false;
    };
    let Some(pid) = v["pid"].as_u64() else {
        return false;
    };
    let sys = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
    matches!(sys.split(' ').next(), Some("35" | "230"))
}

/// The command name of container `name`'s init, once runc reports it running.
fn runc_init_comm(root: &Path, name: &str) -> Option<String> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args(["state", name])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    if v["status"] != "running" {
        return None;
    }
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", v["pid"].as_u64()?)).ok()?;
    Some(comm.trim().to_string())
}

fn lazy_busybox() -> (Registry, String) {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let (_s, lazy, _) = optimized(&reg, "busybox", &[]);
    (reg, lazy)
}

#[test]
fn root_kill_9_of_run_orphan_is_reaped_by_ps() {
    let (_reg, lazy) = lazy_busybox();
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    orphan(root.path(), &lazy, "orphan", true);
    let ps = lazylayer_json(root.path(), &["ps"]);
    assert_eq!(ps, serde_json::json!([]), "an --rm container is removed");
    assert_nothing_left(root.path());
    assert!(pins_left(root.path()).is_empty());
}

#[test]
fn root_kill_9_of_run_orphan_is_reaped_by_prune() {
    let (_reg, lazy) = lazy_busybox();
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    orphan(root.path(), &lazy, "orphan", true);
    lazylayer_ok(root.path(), &["prune"]);
    assert_nothing_left(root.path());
    assert!(pins_left(root.path()).is_empty());
}

#[test]
fn root_kill_9_of_run_orphan_is_reaped_by_the_next_run_and_rm() {
    let (_reg, lazy) = lazy_busybox();
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    orphan(root.path(), &lazy, "orphan", true);
    // No prefetch: a run finishes its image's fetches after its exit
    // (bounded), and the orphans below must start lazily again.
    let out = run(
        root.path(),
        &["--rm", "--prefetch", "off", &lazy, "--", "true"],
    );
    assert!(out.status.success());
    assert_nothing_left(root.path());
    assert!(pins_left(root.path()).is_empty());

    // `rm` of a container whose owner is gone: done, and so are the others.
    orphan(root.path(), &lazy, "orphan1", false);
    orphan(root.path(), &lazy, "orphan2", true);
    lazylayer_ok(root.path(), &["rm", "orphan1"]);
    assert_nothing_left(root.path());
    assert!(pins_left(root.path()).is_empty());
}

#[test]
fn root_kill_9_of_run_without_rm_keeps_the_container_exited() {
    let (_reg, lazy) = lazy_busybox();
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    orphan(root.path(), &lazy, "kept", false);
    let ps = lazylayer_json(root.path(), &["ps"]);
    assert_eq!(ps[0]["name"], "kept", "{ps}");
    assert_eq!(ps[0]["status"], "exited", "{ps}");
    assert_eq!(ps[0]["exit_code"], serde_json::Value::Null, "{ps}");
    assert_eq!(ps[0]["owner_lost"], true, "{ps}");
    let table = lazylayer_ok(root.path(), &["ps"]);
    assert!(table.contains("exited (owner lost)"), "{table}");
    assert!(
        mounts_below(root.path()).is_empty(),
        "{:?}",
        mounts_below(root.path())
    );
    assert!(runc_containers(root.path()).is_empty());
    assert!(pins_left(root.path()).is_empty());
    assert!(
        root.path().join("containers/kept/upper").is_dir(),
        "the dir is kept"
    );
    lazylayer_ok(root.path(), &["rm", "kept"]);
    assert_nothing_left(root.path());
}

/// Container names that are prefixes of each other: `a`'s removal must not
/// touch `ab`'s mounts.
#[test]
fn root_container_a_going_leaves_container_ab_alone() {
    use std::io::Write;
    let (_reg, lazy) = lazy_busybox();
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    let ab_dir = root.path().join("containers/ab");
    let mut ab = run_until_ready(
        root.path(),
        &[
            "--rm",
            "--name",
            "ab",
            &lazy,
            "--",
            "sh",
            "-c",
            "echo ready; read go; cat /etc/passwd >/dev/null && ls /bin/busybox",
        ],
        &[],
    );
    // The lazy root, its stub tree and the container's overlay. The stub
    // tree (an EROFS image) holds the image's setuid bits and device nodes as metadata: no
    // host user may use them through it.
    assert_eq!(mounts_below(&ab_dir).len(), 3);
    let meta = format!("{}/meta ", ab_dir.display());
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let line = info
        .lines()
        .find(|l| l.contains(&meta) && l.contains(" - erofs "))
        .unwrap_or_else(|| panic!("no stub tree at {meta}: {info}"));
    let flags = line.split(' ').nth(5).unwrap();
    assert!(
        flags.contains("nosuid") && flags.contains("nodev") && flags.starts_with("ro"),
        "{line}"
    );
    // The image is an unnamed file the mount holds: no name on disk.
    let files: Vec<_> = std::fs::read_dir(&ab_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().contains("erofs"))
        .collect();
    assert!(files.is_empty(), "{files:?}");
    // `run` holds the store's layer directories the stub tree's redirects
    // pass (`<hex>/fs`), so a cold cache keeps their dentries as overlayfs
    // keeps its own layers': the layers that arrive after the start too.
    let (held, present) = wait_for_held_layers(root.path(), ab.0.id());
    assert!(
        !held.is_empty() && held.iter().all(|h| present.contains(h)),
        "held {held:?}, in the store {present:?}"
    );
    assert!(
        held.len() + 1 >= present.len(),
        "every layer but the boot layer is held: held {held:?}, in the store {present:?}"
    );
    // `a` exits and is removed with --rm; then another `a`, removed with rm.
    let out = run(root.path(), &["--rm", "--name", "a", &lazy, "--", "true"]);
    assert!(out.status.success());
    assert_eq!(mounts_below(&ab_dir).len(), 3, "a's --rm unmounted ab");
    let out = run(root.path(), &["--name", "a", &lazy, "--", "true"]);
    assert!(out.status.success());
    lazylayer_ok(root.path(), &["rm", "a"]);
    assert_eq!(mounts_below(&ab_dir).len(), 3, "rm a unmounted ab");

    ab.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(wait_exit(&mut ab.0, Duration::from_secs(30)), Some(0));
    assert_nothing_left(root.path());
}

/// Where the kernel will not mount the stub tree's EROFS image (here a
/// store on tmpfs: file-backed EROFS reads a disk file system's page cache),
/// the stubs are a tmpfs tree instead, and the container runs the same.
#[test]
fn root_stub_tree_is_a_tmpfs_where_its_image_cannot_be_mounted() {
    use std::io::Write;
    let (_reg, lazy) = lazy_busybox();
    let dir = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(dir.path().to_path_buf());
    rustix::mount::mount(
        "lazylayer-test-store",
        dir.path(),
        "tmpfs",
        rustix::mount::MountFlags::empty(),
        c"mode=0700",
    )
    .unwrap();
    let root = dir.path().join("store");
    let _leftovers = StoreLeftovers(root.clone());
    let mut c = run_until_ready(
        &root,
        &[
            "--rm",
            "--name",
            "t",
            &lazy,
            "--",
            "sh",
            "-c",
            "echo ready; read go; test -x /bin/busybox && ls /bin/ | grep -qx sh",
        ],
        &[],
    );
    let types = mount_types_below(&root.join("containers/t"));
    assert!(
        types.iter().any(|t| t == "tmpfs") && !types.iter().any(|t| t == "erofs"),
        "{types:?}"
    );
    c.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
    assert_eq!(wait_exit(&mut c.0, Duration::from_secs(30)), Some(0));
    assert_nothing_left(&root);
}

/// The store's layer directories (`layers/sha256/<hex>/fs`) that process
/// `pid` holds open, and those in the store, once the first covers all but
/// one of the second (the boot layer, extracted or not), or after 30 s.
fn wait_for_held_layers(root: &Path, pid: u32) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let layers = root.join("layers/sha256");
    let t0 = std::time::Instant::now();
    loop {
        let mut present: Vec<PathBuf> = std::fs::read_dir(&layers)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().join("fs"))
                    .filter(|p| p.is_dir())
                    .collect()
            })
            .unwrap_or_default();
        present.sort();
        let mut held: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .filter(|l| l.starts_with(&layers))
            .collect();
        held.sort();
        held.dedup();
        if (!held.is_empty() && held.len() + 1 >= present.len())
            || t0.elapsed() > Duration::from_secs(30)
        {
            return (held, present);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The mounts of this mount namespace whose mount point is below `dir`:
/// (mount point, file-system type, super options).
fn mounts_below_with_type(dir: &Path) -> Vec<(String, String, String)> {
    let prefix = format!("{}/", dir.display());
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            let (target, fstype, opts) = (f[4], f[sep + 1], f.get(sep + 3).copied()?);
            target
                .starts_with(&prefix)
                .then(|| (target.to_string(), fstype.to_string(), opts.to_string()))
        })
        .collect()
}

#[test]
fn root_a_fully_local_optimized_image_runs_on_the_stores_layers_without_fuse() {
    let (_reg, _src, dst, _layers) = python3_optimized();
    let root = tempfile::tempdir().unwrap();
    let _unmount = UnmountBelow(root.path().to_path_buf());
    // Everything but /proc, /sys, /dev (the runtime's, not the image's):
    // type, mode and owner of every path, size of every file, and the
    // bytes of /app and /usr/bin. Then it waits, so the test can look at
    // the mounts while it runs.
    let script = "find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -printf '%p %y %m %U %G\\n' | sort; \
                  find / -xdev -type f -printf '%p %s\\n' | sort | md5sum; \
                  cat /app/* /usr/bin/* | md5sum; \
                  ls -a / | grep -c lazylayer; \
                  echo END; read go";
    let listing = |lazy: bool| -> (String, Vec<(String, String, String)>) {
        let mut child = KillOnDrop(
            run_cmd(
                root.path(),
                &["--rm", "--stats", &dst, "--", "sh", "-c", script],
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
        );
        let mut out = String::new();
        let mut reader = std::io::BufReader::new(child.0.stdout.take().unwrap());
        loop {
            let mut line = String::new();
            let n = std::io::BufRead::read_line(&mut reader, &mut line).unwrap();
            assert!(n > 0, "the container ended before END: {out}");
            if line == "END\n" {
                break;
            }
            out.push_str(&line);
        }
        // The container is running: these are its mounts.
        let mounts = mounts_below_with_type(root.path());
        {
            use std::io::Write;
            child.0.stdin.take().unwrap().write_all(b"go\n").unwrap();
        }
        let status = child.0.wait().unwrap();
        let mut err = String::new();
        std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut err).unwrap();
        assert!(status.success(), "{err}");
        assert_eq!(
            err.contains("no FUSE"),
            !lazy,
            "--stats says how the root was served: {err}"
        );
        (out, mounts)
    };

    // First start: lazy, the FUSE root under the container's overlay.
    let (lazy, mounts) = listing(true);
    assert!(
        mounts.iter().any(|(_, t, _)| t.starts_with("fuse")),
        "a lazy start mounts FUSE: {mounts:?}"
    );
    // Make the image local whole (the prefetch may have been cut by the exit).
    lazylayer_ok(root.path(), &["pull", "-q", &dst]);

    let (native, mounts) = listing(false);
    assert!(
        !mounts.iter().any(|(_, t, _)| t.starts_with("fuse")),
        "no FUSE for an image local whole: {mounts:?}"
    );
    let store_layers = root.path().join("layers/sha256");
    let overlay = mounts
        .iter()
        .find(|(_, t, _)| t == "overlay")
        .unwrap_or_else(|| panic!("no container overlay: {mounts:?}"));
    assert!(
        overlay.2.contains(&store_layers.display().to_string())
            && overlay
                .2
                .contains(&root.path().join("masks").display().to_string()),
        "the overlay stacks the store's layers under the index mask: {overlay:?}"
    );
    assert_eq!(native, lazy, "the native root differs from the lazy one");
    assert!(
        native.ends_with("0\n"),
        "the index file is visible in the container: {native}"
    );
    // The store's boot layer does hold the index file: the mask hides it.
    let (_, layers) = layer_digests(root.path(), &dst);
    let boot = stored_layer(root.path(), layers.last().unwrap());
    assert!(boot.join("fs/.wh..wh.lazylayer.index.v1").is_file());
    assert!(!native.contains(".wh..wh.lazylayer.index.v1"));
    // And the untraced files' digests file (index format 5): the mask
    // hides it too (`grep -c lazylayer` above counts it).
    assert!(boot.join("fs/.wh..wh.lazylayer.digests.v1").is_file());
    assert_nothing_left(root.path());
}
