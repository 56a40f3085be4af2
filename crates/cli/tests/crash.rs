//! `kill -9` at random points of `pull`, `run`, `optimize` and the
//! snapshotter, each followed by `lazylayer check` (clean, or repaired and
//! then clean) and by a correct run whose content is compared with an
//! uninterrupted one's (a hash of every file of the container's root).
//!
//! The points are drawn from a seeded RNG spread over each command's own
//! duration (measured by the uninterrupted run); the seed is printed, and
//! `CRASH_SEED=N` replays it. Only kills that hit a running process count.
//! A `kill -9` keeps the page cache, so these tests prove the store's
//! crash consistency, not its power-loss durability (that is the syncs'
//! job: see `lazylayer_sys::durable` and its tests).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A hash of every regular file of the container's root file system (its
/// own mount only: not /proc, /sys, /dev), for "the same content" checks.
const FINGERPRINT: &str =
    "find / -xdev -type f -exec sha256sum {} + | sort | sha256sum | cut -d' ' -f1";

/// The same of /usr/bin alone: python3's interpreter and tools, a few
/// seconds less per check than its whole tree.
const FINGERPRINT_USR_BIN: &str =
    "find /usr/bin -xdev -type f -exec sha256sum {} + | sort | sha256sum | cut -d' ' -f1";

fn seeded_rng(test: &str) -> fastrand::Rng {
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::UNIX_EPOCH
                .elapsed()
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("{test}: seed {seed} (CRASH_SEED={seed} replays it)");
    fastrand::Rng::with_seed(seed)
}

fn lazylayer_cmd(root: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    c.arg("--root")
        .arg(root)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    c
}

/// Start `cmd` (its store at `root`) and SIGKILL it `after` its start; true
/// when it was still running then (a kill), false when it had ended on its
/// own. A killed process that does not exit fails the test with its kernel
/// stacks, its mounts' connections ended (CI once hung 90 minutes here: a
/// killed run waited on its own mount).
fn kill_after(mut cmd: Command, root: &Path, after: Duration) -> bool {
    let mut child = KillOnDrop(cmd.spawn().unwrap());
    let deadline = Instant::now() + after;
    while Instant::now() < deadline {
        if child.0.try_wait().unwrap().is_some() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    kill_9_and_reap(
        &mut child.0,
        root,
        &format!("killed after {after:?}"),
        EXIT_WAIT,
    );
    true
}

/// How long a killed process may take to exit (its exit closes mounts).
const EXIT_WAIT: Duration = Duration::from_secs(60);

/// A random point in the first 110% of `d` (the tail: a kill as it ends).
fn random_point(rng: &mut fastrand::Rng, d: Duration) -> Duration {
    d.mul_f64(rng.f64() * 1.1)
}

/// `lazylayer check` after a crash: clean, or repaired by `check --repair`
/// and clean after that. Returns what it was.
fn check_clean_or_repaired(root: &Path) -> &'static str {
    let out = lazylayer(root, &["check"]);
    match out.status.code() {
        Some(0) => {
            assert!(out.stdout.is_empty(), "a clean check lists no problem");
            "clean"
        }
        Some(1) => {
            let fixed = lazylayer(root, &["check", "--repair"]);
            assert_eq!(fixed.status.code(), Some(0), "check --repair repairs all");
            let again = lazylayer(root, &["check"]);
            assert_eq!(again.status.code(), Some(0), "clean after the repair");
            assert!(again.stdout.is_empty());
            "repaired"
        }
        c => panic!(
            "lazylayer check failed ({c:?}): {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The fingerprint of `image` run with the store at `root`, timed.
fn run_fingerprint(root: &Path, image: &str) -> (String, Duration) {
    run_fingerprint_of(root, image, FINGERPRINT)
}

fn run_fingerprint_of(root: &Path, image: &str, fingerprint: &str) -> (String, Duration) {
    let t = Instant::now();
    let out = lazylayer(root, &["run", "--rm", image, "--", "sh", "-c", fingerprint]);
    let took = t.elapsed();
    assert!(
        out.status.success(),
        "run of {image}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fp = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(fp.len(), 64, "a sha256: {fp:?}");
    (fp, took)
}

/// Nothing of a killed `run` survives the next command: no container,
/// no mount, no container directory.
fn assert_no_container_left(root: &Path) {
    assert!(mounts_below(root).is_empty(), "{:?}", mounts_below(root));
    assert!(
        runc_containers(root).is_empty(),
        "{:?}",
        runc_containers(root)
    );
    let left = std::fs::read_dir(root.join("containers"))
        .map(|rd| rd.count())
        .unwrap_or(0);
    assert_eq!(left, 0, "container directories left");
}

/// Tally of one test's kills.
#[derive(Default)]
struct Tally {
    kills: usize,
    missed: usize,
    repaired: usize,
    leftover_mounts: usize,
    leftover_containers: usize,
}

impl Tally {
    fn record(&mut self, outcome: &str) {
        self.kills += 1;
        if outcome == "repaired" {
            self.repaired += 1;
        }
    }

    fn report(&self, test: &str, started: Instant) {
        eprintln!(
            "{test}: {} kills ({} repaired, the rest clean), {} runs ended before their kill, \
             {} mounts and {} containers left, {:.1?}",
            self.kills,
            self.repaired,
            self.missed,
            self.leftover_mounts,
            self.leftover_containers,
            started.elapsed()
        );
    }
}

#[test]
fn root_kill_9_of_pull_then_check_and_a_correct_pull() {
    if !require_root("kill_9_of_pull", "run checks the pulled content with runc") {
        return;
    }
    let started = Instant::now();
    let mut rng = seeded_rng("kill_9_of_pull");
    let reg = Registry::start();
    push_images(&reg, &["busybox", "multilayer", "python3"]);
    let mut tally = Tally::default();
    for (name, kills, fingerprint) in [
        ("busybox", 8, FINGERPRINT),
        ("multilayer", 12, FINGERPRINT),
        ("python3", 3, FINGERPRINT_USR_BIN),
    ] {
        let image = image_ref(&reg, name);
        // The uninterrupted pull: its duration and the content it gives.
        let reference = tempfile::tempdir().unwrap();
        let _guard = StoreLeftovers(reference.path().to_path_buf());
        let t = Instant::now();
        lazylayer_ok(reference.path(), &["pull", &image]);
        let pull_time = t.elapsed();
        let (want, _) = run_fingerprint_of(reference.path(), &image, fingerprint);
        eprintln!("{name}: a pull takes {pull_time:?}");
        let mut done = 0;
        while done < kills {
            let root = tempfile::tempdir().unwrap();
            let _guard = StoreLeftovers(root.path().to_path_buf());
            let at = random_point(&mut rng, pull_time);
            if !kill_after(
                lazylayer_cmd(root.path(), &["pull", &image]),
                root.path(),
                at,
            ) {
                tally.missed += 1;
                assert!(tally.missed < 40, "the pulls end before the kills");
                continue;
            }
            let outcome = check_clean_or_repaired(root.path());
            eprintln!("{name}: pull killed after {at:?}: store {outcome}");
            lazylayer_ok(root.path(), &["pull", &image]);
            assert_eq!(check_clean_or_repaired(root.path()), "clean");
            let (got, _) = run_fingerprint_of(root.path(), &image, fingerprint);
            assert_eq!(got, want, "{name}: content after a pull killed at {at:?}");
            tally.record(outcome);
            done += 1;
        }
    }
    tally.report("kill_9_of_pull", started);
}

#[test]
fn root_kill_9_of_run_then_check_and_a_correct_run() {
    if !require_root("kill_9_of_run", "runc, FUSE and overlay mounts") {
        return;
    }
    let started = Instant::now();
    let mut rng = seeded_rng("kill_9_of_run");
    let reg = Registry::start();
    push_images(&reg, &["busybox", "multilayer"]);
    let mut tally = Tally::default();
    for (name, kills) in [("busybox", 7), ("multilayer", 7)] {
        let (_optimizer, _src, lazy) = optimize_image(&reg, name, &[]);
        let reference = tempfile::tempdir().unwrap();
        let _guard = StoreLeftovers(reference.path().to_path_buf());
        // A lazy start in an empty store fetches while it runs: the kills
        // land in the boot fetch, the mounts, the container and the fetches.
        let (want, run_time) = run_fingerprint(reference.path(), &lazy);
        eprintln!("{name}: a lazy run takes {run_time:?}");
        let mut done = 0;
        while done < kills {
            let root = tempfile::tempdir().unwrap();
            let _guard = StoreLeftovers(root.path().to_path_buf());
            let at = random_point(&mut rng, run_time);
            let cmd = lazylayer_cmd(
                root.path(),
                &["run", "--rm", &lazy, "--", "sh", "-c", FINGERPRINT],
            );
            if !kill_after(cmd, root.path(), at) {
                tally.missed += 1;
                assert!(tally.missed < 40, "the runs end before the kills");
                continue;
            }
            let outcome = check_clean_or_repaired(root.path());
            eprintln!("{name}: run killed after {at:?}: store {outcome}");
            // `check` reaped the killed run's container and mounts.
            assert_no_container_left(root.path());
            let (got, _) = run_fingerprint(root.path(), &lazy);
            assert_eq!(got, want, "{name}: content after a run killed at {at:?}");
            assert_eq!(check_clean_or_repaired(root.path()), "clean");
            assert_no_container_left(root.path());
            tally.record(outcome);
            done += 1;
        }
    }
    tally.report("kill_9_of_run", started);
}

#[test]
fn root_kill_9_of_optimize_then_check_and_a_correct_optimize() {
    if !require_root("kill_9_of_optimize", "the traced run: runc, FUSE") {
        return;
    }
    let started = Instant::now();
    let mut rng = seeded_rng("kill_9_of_optimize");
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let src = image_ref(&reg, "busybox");
    let dst = format!("{}/optimized/busybox:crash", reg.addr());
    let optimize = |root: &Path| lazylayer_cmd(root, &["optimize", &src, &dst]);
    let reference = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(reference.path().to_path_buf());
    let t = Instant::now();
    assert!(optimize(reference.path()).status().unwrap().success());
    let optimize_time = t.elapsed();
    let runs = tempfile::tempdir().unwrap();
    let _runs_guard = StoreLeftovers(runs.path().to_path_buf());
    let (want, _) = run_fingerprint(runs.path(), &dst);
    eprintln!("an optimize takes {optimize_time:?}");
    let mut tally = Tally::default();
    while tally.kills < 10 {
        let root = tempfile::tempdir().unwrap();
        let _guard = StoreLeftovers(root.path().to_path_buf());
        let at = random_point(&mut rng, optimize_time);
        if !kill_after(optimize(root.path()), root.path(), at) {
            tally.missed += 1;
            assert!(tally.missed < 40, "the optimizes end before the kills");
            continue;
        }
        let outcome = check_clean_or_repaired(root.path());
        eprintln!("optimize killed after {at:?}: store {outcome}");
        // Known leftovers (not store damage, and reaped by nothing yet,
        // unlike a killed run's): the traced workload's mounts below work/
        // (FUSE + overlay) and its container, the read-only view the boot
        // layer is built from below tmp/. Counted; the guard removes them.
        let left = mounts_below(root.path());
        tally.leftover_mounts += left.len();
        tally.leftover_containers += runc_containers(root.path()).len();
        let (work, tmp) = (root.path().join("work"), root.path().join("tmp"));
        let elsewhere: Vec<_> = (left.iter())
            .filter(|m| !Path::new(m).starts_with(&work) && !Path::new(m).starts_with(&tmp))
            .collect();
        assert!(elsewhere.is_empty(), "{elsewhere:?}");
        let out = optimize(root.path())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "optimize after a kill at {at:?}");
        assert_eq!(check_clean_or_repaired(root.path()), "clean");
        // What was pushed runs with the same content, from a fresh store.
        let fresh = tempfile::tempdir().unwrap();
        let _fresh_guard = StoreLeftovers(fresh.path().to_path_buf());
        let (got, _) = run_fingerprint(fresh.path(), &dst);
        assert_eq!(got, want, "the image optimized after a kill at {at:?}");
        tally.record(outcome);
    }
    tally.report("kill_9_of_optimize", started);
}

/// `lazylayer snapshotter` as a child process of its store at `root`.
struct Snapshotterd {
    root: std::path::PathBuf,
    child: Option<KillOnDrop>,
}

impl Snapshotterd {
    fn start(root: &Path) -> Snapshotterd {
        let mut s = Snapshotterd {
            root: root.to_path_buf(),
            child: None,
        };
        s.spawn();
        s
    }

    fn sock(&self) -> std::path::PathBuf {
        self.root.join("snapshotter.sock")
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(self.sock());
        let sock = self.sock();
        let child = lazylayer_cmd(&self.root, &["snapshotter", "--address"])
            .arg(&sock)
            .spawn()
            .unwrap();
        self.child = Some(KillOnDrop(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(Instant::now() < deadline, "the snapshotter did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_9_and_reap(&mut c.0, &self.root, "the snapshotter killed", EXIT_WAIT);
        }
    }
}

impl Drop for Snapshotterd {
    fn drop(&mut self) {
        self.kill_9();
        let _ = StoreLeftovers(self.root.clone());
    }
}

/// `lazylayer containerd pull` of `image`, then a `ctr run` of it printing
/// its fingerprint (None when either failed: the snapshotter was killed).
fn containerd_pull_and_run(root: &Path, cd: &Containerd, image: &str, id: &str) -> Option<String> {
    let sock = cd.socket();
    let pulled = lazylayer_cmd(
        root,
        &[
            "containerd",
            "pull",
            "--address",
            sock.to_str().unwrap(),
            image,
        ],
    )
    .status()
    .ok()?;
    if !pulled.success() {
        return None;
    }
    let out = cd
        .ctr()
        .args(["run", "--rm", "--snapshotter", "lazylayer", image, id])
        .args(["sh", "-c", FINGERPRINT])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status.success().then(|| {
        String::from_utf8_lossy(&out.stdout)
            .replace('\r', "")
            .trim()
            .to_string()
    })
}

#[test]
fn root_kill_9_of_the_snapshotter_then_check_and_a_correct_run() {
    if !require_root("kill_9_of_the_snapshotter", "containerd, FUSE and mounts") {
        return;
    }
    for tool in ["containerd", "ctr"] {
        if Command::new(tool).arg("--version").output().is_err()
            && skip_because(&format!("{tool} is not installed"))
        {
            return;
        }
    }
    let started = Instant::now();
    let mut rng = seeded_rng("kill_9_of_the_snapshotter");
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let (_optimizer, _src, lazy) = optimize_image(&reg, "busybox", &[]);
    let with_snapshotter = |root: &Path| {
        let sn = Snapshotterd::start(root);
        let toml = format!(
            "[proxy_plugins.lazylayer]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            sn.sock().display()
        );
        (sn, Containerd::start_with(&toml))
    };
    // The uninterrupted pull and run: its duration and its content.
    let reference = tempfile::tempdir().unwrap();
    let (want, took) = {
        let (_sn, cd) = with_snapshotter(reference.path());
        let t = Instant::now();
        let fp = containerd_pull_and_run(reference.path(), &cd, &lazy, "reference");
        (fp.expect("an uninterrupted pull and run"), t.elapsed())
    };
    eprintln!("a lazy containerd pull and run takes {took:?}");
    let mut tally = Tally::default();
    let mut i = 0;
    while tally.kills < 4 {
        i += 1;
        assert!(i <= 16, "the pulls and runs end before the kills");
        let root = tempfile::tempdir().unwrap();
        let (mut sn, cd) = with_snapshotter(root.path());
        let at = random_point(&mut rng, took);
        let killed = {
            let (root, lazy, cd) = (root.path(), lazy.as_str(), &cd);
            std::thread::scope(|s| {
                let h = s.spawn(move || containerd_pull_and_run(root, cd, lazy, &format!("k{i}")));
                std::thread::sleep(at);
                let killed = !h.is_finished();
                sn.kill_9();
                // Restarted at once: a lazy root the holder kept waits for it.
                sn.spawn();
                let _ = h.join();
                killed
            })
        };
        if !killed {
            tally.missed += 1;
        }
        let outcome = check_clean_or_repaired(root.path());
        eprintln!("snapshotter killed after {at:?}: store {outcome}");
        let got = (0..10)
            .find_map(|k| {
                containerd_pull_and_run(root.path(), &cd, &lazy, &format!("c{i}-{k}")).or_else(
                    || {
                        // containerd reconnects to a restarted plugin with backoff.
                        std::thread::sleep(Duration::from_millis(500));
                        None
                    },
                )
            })
            .expect("a pull and run after the restart");
        assert_eq!(got, want, "content after a snapshotter killed at {at:?}");
        assert_eq!(check_clean_or_repaired(root.path()), "clean");
        if killed {
            tally.record(outcome);
        }
    }
    tally.report("kill_9_of_the_snapshotter", started);
}

/// What a power loss could leave before the store synced anything (a kill
/// cannot: the page cache survives it): a file of an extracted layer empty
/// under a complete-looking layer, a blob cut short, an image record empty.
/// `check` names each, `--repair` removes them, the next pull fetches them
/// again and the container sees the image's true content.
#[test]
fn root_power_loss_damage_is_found_repaired_and_fetched_again() {
    if !require_root("power_loss_damage", "run checks the content with runc") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer", "busybox"]);
    let (image, other) = (image_ref(&reg, "multilayer"), image_ref(&reg, "busybox"));
    let root = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(root.path().to_path_buf());
    let r = root.path();
    lazylayer_ok(r, &["pull", &image]);
    lazylayer_ok(r, &["pull", &other]);
    let (want, _) = run_fingerprint(r, &image);
    assert_eq!(check_clean_or_repaired(r), "clean");

    let (_, layers) = layer_digests(r, &image);
    // The busybox file of the base layer, emptied.
    let sh = stored_layer(r, &layers[0]).join("fs/bin/busybox");
    std::fs::write(&sh, b"").unwrap();
    // The top layer's blob, cut in half.
    let top = r
        .join("blobs/sha256")
        .join(layers[4].strip_prefix("sha256:").unwrap());
    let bytes = std::fs::read(&top).unwrap();
    std::fs::write(&top, &bytes[..bytes.len() / 2]).unwrap();
    // busybox's image record, empty.
    let records: Vec<_> = std::fs::read_dir(r.join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let busybox_record = records
        .iter()
        .find(|p| std::fs::read_to_string(p).unwrap().contains("/busybox:"))
        .unwrap();
    std::fs::write(busybox_record, b"").unwrap();

    let found = lazylayer(r, &["check"]);
    assert_eq!(found.status.code(), Some(1));
    let listed = String::from_utf8(found.stdout).unwrap();
    for (path, what) in [
        (stored_layer(r, &layers[0]), "its files hold"),
        (top.clone(), "hashes to"),
        (busybox_record.clone(), "does not parse"),
    ] {
        assert!(
            listed
                .lines()
                .any(|l| l.starts_with(&format!("{}: ", path.display())) && l.contains(what)),
            "{} ({what}) not in:\n{listed}",
            path.display()
        );
    }
    let json = lazylayer(r, &["check", "--json"]);
    let rep: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert!(rep["problems"].as_array().unwrap().len() >= 4, "{rep}");

    assert_eq!(check_clean_or_repaired(r), "repaired");
    assert!(!sh.exists() && !top.exists(), "the damaged content is gone");
    let pulled = lazylayer_json(r, &["pull", &image]);
    assert!(pulled["layers_fetched"].as_u64().unwrap() >= 2, "{pulled}");
    lazylayer_ok(r, &["pull", &other]);
    assert_eq!(check_clean_or_repaired(r), "clean");
    let (got, _) = run_fingerprint(r, &image);
    assert_eq!(got, want, "the repaired store serves the image's content");
}
