//! `lazylayer optimize` end to end: a real registry, runc, FUSE and overlayfs;
//! the optimized image checked with runtimes that know nothing of lazylayer
//! (podman and containerd), and the boot layer proven complete.

mod common;

use std::path::Path;

use common::tree::{differences, snapshot};
use common::*;

const INDEX_FILE: &str = ".wh..wh.lazylayer.index.v1";

/// The workload the multilayer image is optimized with: it reads a file of
/// a hardlink group (so the whole group goes into the boot layer), one an
/// upper layer changed, and lists an opaque directory. It prints
/// "a: kept\nnew.txt\n".
const MULTILAYER_WORKLOAD: [&str; 4] = [
    "--",
    "/bin/sh",
    "-c",
    "cat /data/hl/one /data/keep/a.txt; ls /data/opq",
];

fn optimize(root: &Path, src: &str, dst: &str, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["optimize", "--json", "--verify"];
    args.extend_from_slice(extra);
    let (opts, cmd): (Vec<&str>, Vec<&str>) = match args.iter().position(|a| *a == "--") {
        Some(i) => (args[..i].to_vec(), args[i..].to_vec()),
        None => (args.clone(), vec![]),
    };
    let mut all = opts;
    all.push(src);
    all.push(dst);
    all.extend(cmd);
    lazylayer_json_raw(root, &all)
}

fn lazylayer_json_raw(root: &Path, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&lazylayer_ok(root, args)).unwrap()
}

fn assert_clean(root: &Path) {
    assert!(
        mounts_below(root).is_empty(),
        "mounts left: {:?}",
        mounts_below(root)
    );
    let out = std::process::Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args(["list", "-q"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "containers left"
    );
    let work = root.join("work");
    assert!(
        tree_listing(&work).is_empty(),
        "work dirs left: {:?}",
        tree_listing(&work)
    );
}

/// Podman 5.8 (the sid stack) without lazylayer's store: SRC and DST give
/// the very same root file system with partial pulls off (the default) and
/// on, although each DST layer descriptor now names a TOC digest
/// (`containerd.io/snapshot/stargz/toc.digest`, for Podman 5 to ask the
/// store): with partial pulls on, Podman does not take a layer that is not
/// eStargz for one and pulls it whole. DST runs, and its index file never
/// appears.
#[test]
fn root_optimized_image_is_identical_under_podman5_partial_pulls_off_and_on() {
    let stack = Stack::Sid;
    if !stack.ready("root_optimized_image_is_identical_under_podman5_partial_pulls_off_and_on") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let root = tempfile::tempdir().unwrap();
    let src = image_ref(&reg, "multilayer");
    let dst = format!("{}/optimized/multilayer:boot", reg.addr());
    optimize(root.path(), &src, &dst, &MULTILAYER_WORKLOAD);
    for partial in ["false", "true"] {
        let podman = Podman::on(stack);
        podman.set_storage_conf(&format!(
            "[storage]\ndriver = \"overlay\"\n[storage.options.pull_options]\nenable_partial_images = \"{partial}\"\n"
        ));
        podman.ok(&["pull", "-q", "--tls-verify=false", &src]);
        podman.ok(&["pull", "-q", "--tls-verify=false", &dst]);
        let mount = |image: &str| podman.image_mount(image);
        let (a, a_links) = snapshot(&mount(&src));
        let (b, b_links) = snapshot(&mount(&dst));
        let diff = differences(&a, &b);
        assert!(
            diff.is_empty(),
            "partial pulls {partial}: {} paths differ:\n{}",
            diff.len(),
            diff.join("\n")
        );
        assert_eq!(
            a_links, b_links,
            "partial pulls {partial}: hardlink groups differ"
        );
        assert!(!b.contains_key(&format!("/{INDEX_FILE}")));
        let out = podman.ok(&["run", "--rm", "--network=none", &dst]);
        assert_eq!(
            out, "a: kept\nnew.txt\n",
            "partial pulls {partial}: podman run of DST"
        );
    }
}

lazylayer_testsupport::on_each_podman!(root_plain_podman_saves_and_pushes_an_optimized_image);

/// Podman without lazylayer saves and pushes an optimized image it pulled:
/// containers-storage rebuilds each layer from the tar headers it kept plus
/// the files it extracted, so the boot index, which no runtime extracts,
/// must have no content of its own (it rides in its entry's headers). The
/// saved archive, loaded into another Podman, and the pushed image, pulled
/// by it, give SRC's very root file system; lazylayer runs the pushed image.
fn root_plain_podman_saves_and_pushes_an_optimized_image(stack: Stack) {
    if !stack.ready("root_plain_podman_saves_and_pushes_an_optimized_image") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer", "python3"]);
    let root = tempfile::tempdir().unwrap();
    let cases = [
        (
            "multilayer",
            MULTILAYER_WORKLOAD.to_vec(),
            "a: kept\nnew.txt\n",
        ),
        // An index of 0.95 MB: two parts, `NAME` and `NAME.1`.
        ("python3", vec![], "ok\n"),
    ];
    for (name, script, expected) in cases {
        let src = image_ref(&reg, name);
        let dst = format!("{}/optimized/{name}:boot", reg.addr());
        optimize(root.path(), &src, &dst, &script);
        let pushed = format!("{}/pushed/{name}:boot", reg.addr());
        let saved = stack.tempdir();
        let archive = saved.path().join("dst.tar");
        let archive = archive.to_str().unwrap();
        let (want, want_links) = {
            let podman = Podman::on(stack);
            podman.ok(&["pull", "-q", "--tls-verify=false", &src]);
            podman.ok(&["pull", "-q", "--tls-verify=false", &dst]);
            let want = snapshot(&podman.image_mount(&src));
            podman.ok(&["save", "--format", "oci-archive", "-o", archive, &dst]);
            podman.ok(&["push", "--tls-verify=false", &dst, &pushed]);
            want
        };
        let podman = Podman::on(stack);
        let loaded = podman.ok(&["load", "-q", "-i", archive]);
        let loaded = loaded
            .lines()
            .find_map(|l| l.split_once(": ").map(|(_, name)| name.trim().to_string()))
            .unwrap_or_else(|| panic!("podman load said: {loaded}"));
        podman.ok(&["pull", "-q", "--tls-verify=false", &pushed]);
        for image in [&loaded, &pushed] {
            let (got, got_links) = snapshot(&podman.image_mount(image));
            let diff = differences(&want, &got);
            assert!(
                diff.is_empty(),
                "{image}: {} paths differ from SRC:\n{}",
                diff.len(),
                diff.join("\n")
            );
            assert_eq!(want_links, got_links, "{image}: hardlink groups differ");
            assert!(!got.keys().any(|p| p.starts_with("/.wh.")), "{image}");
        }
        let out = podman.ok(&["run", "--rm", "--network=none", &pushed]);
        assert_eq!(out, expected, "podman run of the pushed {name}");
        let run = lazylayer(root.path(), &["run", "--rm", "--net", "none", &pushed]);
        assert!(
            run.status.success(),
            "lazylayer run of the pushed {name}: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&run.stdout), expected);
    }
}

/// SRC and DST give the very same root file system under podman and
/// containerd, DST runs there unchanged, and the index file never appears.
#[test]
fn root_optimized_image_is_identical_under_podman_and_containerd() {
    let reg = Registry::start();
    push_images(&reg, &["multilayer", "python3"]);
    let root = tempfile::tempdir().unwrap();
    let podman = Podman::new();
    let ctrd = Containerd::start();
    let cases = [
        ("multilayer", MULTILAYER_WORKLOAD.to_vec()),
        ("python3", vec![]),
    ];
    for (name, extra) in cases {
        let src = image_ref(&reg, name);
        let dst = format!("{}/optimized/{name}:boot", reg.addr());
        let rep = optimize(root.path(), &src, &dst, &extra);
        assert!(rep["boot_layer_size"].as_u64().unwrap() > 0);
        assert_eq!(rep["verify_missing"].as_array().map(|a| a.len()), Some(0));
        assert_eq!(
            rep["push"]["layers_uploaded"], 0,
            "SRC layers are mounted, not re-uploaded: {rep}"
        );
        assert_clean(root.path());

        // podman: same tree, index invisible, runs.
        podman.ok(&["pull", "-q", "--tls-verify=false", &src]);
        podman.ok(&["pull", "-q", "--tls-verify=false", &dst]);
        let (a, a_links) = snapshot(&podman.image_mount(&src));
        let (b, b_links) = snapshot(&podman.image_mount(&dst));
        let diff = differences(&a, &b);
        assert!(
            diff.is_empty(),
            "{name} under podman: {} paths differ:\n{}",
            diff.len(),
            diff.join("\n")
        );
        assert_eq!(
            a_links, b_links,
            "{name}: hardlink groups differ under podman"
        );
        assert!(
            !b.contains_key(&format!("/{INDEX_FILE}")),
            "index file visible under podman"
        );
        let out = podman.ok(&["run", "--rm", "--network=none", &dst]);
        let expected = if name == "python3" {
            "ok\n"
        } else {
            "a: kept\nnew.txt\n"
        };
        assert_eq!(out, expected, "{name}: podman run of DST");

        // containerd: same tree, index invisible, runs.
        ctrd.ok(&["images", "pull", "--plain-http", &src]);
        ctrd.ok(&["images", "pull", "--plain-http", &dst]);
        let mnt = tempfile::tempdir().unwrap();
        let (ma, mb) = (mnt.path().join("a"), mnt.path().join("b"));
        std::fs::create_dir(&ma).unwrap();
        std::fs::create_dir(&mb).unwrap();
        ctrd.ok(&["images", "mount", &src, ma.to_str().unwrap()]);
        ctrd.ok(&["images", "mount", &dst, mb.to_str().unwrap()]);
        let (ca, ca_links) = snapshot(&ma);
        let (cb, cb_links) = snapshot(&mb);
        ctrd.ok(&["images", "unmount", ma.to_str().unwrap()]);
        ctrd.ok(&["images", "unmount", mb.to_str().unwrap()]);
        let diff = differences(&ca, &cb);
        assert!(
            diff.is_empty(),
            "{name} under containerd: {} paths differ:\n{}",
            diff.len(),
            diff.join("\n")
        );
        assert_eq!(ca_links, cb_links);
        assert!(
            !cb.contains_key(&format!("/{INDEX_FILE}")),
            "index file visible under containerd"
        );
        // And podman and containerd agree with each other.
        assert!(
            differences(&a, &ca).is_empty(),
            "podman and containerd disagree on {name}"
        );
        let out = ctrd.ok(&["run", "--rm", "--net-host", &dst, &format!("t-{name}")]);
        assert_eq!(
            out.replace("\r\n", "\n"),
            expected,
            "{name}: ctr run of DST"
        );
    }
}

/// The boot layer alone (plus its index) serves every path the workload
/// touches: `--verify` re-runs it with content served only from the boot
/// layer. And the check can fail: a boot layer built from an empty trace is
/// rejected, and nothing is pushed.
#[test]
fn root_boot_layer_alone_serves_the_workload() {
    let reg = Registry::start();
    push_images(&reg, &["busybox", "python3"]);
    let root = tempfile::tempdir().unwrap();
    for name in ["busybox", "python3"] {
        let src = image_ref(&reg, name);
        let dst = format!("{}/optimized/{name}:boot", reg.addr());
        let trace = root.path().join(format!("{name}.trace.json"));
        let rep = optimize(
            root.path(),
            &src,
            &dst,
            &["--trace-out", trace.to_str().unwrap()],
        );
        assert_eq!(rep["verify_missing"], serde_json::json!([]));
        let share = rep["boot_share"].as_f64().unwrap();
        eprintln!(
            "{name}: boot layer {} of {} bytes ({:.1}%)",
            rep["boot_layer_size"],
            rep["image_size"],
            share * 100.0
        );
        if name == "python3" {
            assert!(
                share < 0.25,
                "python3 boot layer should be a small share: {share}"
            );
        }
        let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
        assert!(t["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["access"] == "open"));
        assert_clean(root.path());
    }
    // The trace records python's module search, including misses.
    let t: serde_json::Value =
        serde_json::from_slice(&std::fs::read(root.path().join("python3.trace.json")).unwrap())
            .unwrap();
    let evs = t["events"].as_array().unwrap();
    assert!(evs.iter().any(|e| e["access"] == "open"
        && e["path"].as_str().unwrap().ends_with("json/__init__.py")
        || e["path"]
            .as_str()
            .unwrap()
            .contains("json/__pycache__/__init__")));
    assert!(
        evs.iter().any(|e| e["access"] == "missing"),
        "lookups of absent paths are traced"
    );

    // Negative control: an empty trace gives an incomplete boot layer.
    let empty = root.path().join("empty.json");
    std::fs::write(&empty, r#"{"version":1,"events":[]}"#).unwrap();
    let bad = format!("{}/optimized/python3:bad", reg.addr());
    let out = lazylayer(
        root.path(),
        &[
            "optimize",
            "--verify",
            "--trace-in",
            empty.to_str().unwrap(),
            &image_ref(&reg, "python3"),
            &bad,
        ],
    );
    assert!(
        !out.status.success(),
        "verification must catch an incomplete boot layer"
    );
    let probe = lazylayer(root.path(), &["inspect", &bad]);
    assert!(
        !probe.status.success(),
        "nothing pushed for a failed optimize"
    );
    assert_clean(root.path());
}

#[test]
fn root_failing_workloads_give_clear_errors_and_leave_nothing() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let root = tempfile::tempdir().unwrap();
    let src = image_ref(&reg, "busybox");
    let dst = format!("{}/optimized/busybox:x", reg.addr());
    let run = |args: &[&str]| {
        let mut a = vec!["optimize"];
        a.extend_from_slice(args);
        lazylayer(root.path(), &a)
    };

    let out = run(&[&src, &dst, "--", "/bin/sh", "-c", "exit 3"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exited with code 3"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean(root.path());

    let out = run(&[
        "--wait",
        "port:9999",
        "--timeout",
        "2",
        &src,
        &dst,
        "--",
        "/bin/sleep",
        "30",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("did not become ready"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean(root.path());

    let out = run(&[&format!("{}/lazylayer/missing:latest", reg.addr()), &dst]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not found"));
    assert_clean(root.path());
    assert!(
        !lazylayer(root.path(), &["inspect", &dst]).status.success(),
        "no manifest pushed"
    );

    // The readiness conditions that succeed: a log line and a port.
    let rep = lazylayer_json_raw(
        root.path(),
        &[
            "optimize",
            "--json",
            "--wait",
            "log:READY",
            "--timeout",
            "20",
            &src,
            &dst,
            "--",
            "/bin/sh",
            "-c",
            "echo READY; sleep 30",
        ],
    );
    assert!(rep["workload_exit_code"].is_null());
    assert_clean(root.path());
    let rep = lazylayer_json_raw(
        root.path(),
        &[
            "optimize",
            "--json",
            "--wait",
            "port:8080",
            "--timeout",
            "20",
            &src,
            &dst,
            "--",
            "/bin/busybox",
            "nc",
            "-l",
            "-p",
            "8080",
        ],
    );
    assert!(rep["workload_exit_code"].is_null());
    assert_clean(root.path());
    assert!(lazylayer(root.path(), &["inspect", &dst]).status.success());
}

#[test]
fn root_ctrl_c_during_optimize_stops_and_cleans_up() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let root = tempfile::tempdir().unwrap();
    let src = image_ref(&reg, "busybox");
    let dst = format!("{}/optimized/busybox:int", reg.addr());
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .arg("--root")
        .arg(root.path())
        .args(["optimize", &src, &dst, "--", "/bin/sleep", "60"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    interrupt_when_mounted(&child, root.path(), 2);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_clean(root.path());
    assert!(
        !lazylayer(root.path(), &["inspect", &dst]).status.success(),
        "nothing pushed"
    );
}

/// `--wait http:PORT/PATH` counts the workload ready once it has answered a
/// request, so what serving a request reads is traced too.
#[test]
fn root_http_readiness_traces_the_first_request() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let root = tempfile::tempdir().unwrap();
    let src = image_ref(&reg, "busybox");
    let dst = format!("{}/optimized/busybox:http", reg.addr());
    let trace = root.path().join("t.json");
    let rep = lazylayer_json_raw(
        root.path(),
        &[
            "optimize",
            "--json",
            "--wait",
            "http:8080/group",
            "--timeout",
            "20",
            "--trace-out",
            trace.to_str().unwrap(),
            &src,
            &dst,
            "--",
            "/bin/busybox",
            "httpd",
            "-f",
            "-p",
            "8080",
            "-h",
            "/etc",
        ],
    );
    assert!(rep["workload_exit_code"].is_null());
    let t: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert!(
        t["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["path"] == "etc/group" && e["access"] == "open"),
        "the file served for the readiness request was traced"
    );
    assert_clean(root.path());
}
