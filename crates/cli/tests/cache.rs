//! The store as a bounded cache (`--store-size-limit`): a node holding more
//! images than its limit keeps a running container's image intact and
//! evicts the least recently used of the others; `lazylayer df` agrees with
//! `du`.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const LIMIT: u64 = 200_000_000;

/// `du -s -c --block-size=1` of the store's content directories (those that exist).
fn du_total(root: &Path) -> u64 {
    let dirs: Vec<_> = ["blobs", "layers", "files", "partial"]
        .iter()
        .map(|d| root.join(d))
        .filter(|p| p.exists())
        .collect();
    let out = Command::new("du")
        .args(["-s", "-c", "--block-size=1"])
        .args(&dirs)
        .output()
        .unwrap();
    assert!(out.status.success(), "du failed");
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .last()
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("du said {text:?}"))
}

fn df(root: &Path) -> serde_json::Value {
    lazylayer_json(root, &["--store-size-limit", "200MB", "df"])
}

fn recorded(root: &Path) -> Vec<String> {
    let v = lazylayer_json(root, &["images"]);
    (v.as_array().unwrap().iter())
        .map(|i| i["reference"].as_str().unwrap().to_string())
        .collect()
}

/// `lazylayer pull` under the limit; returns its stderr.
fn pull(root: &Path, image: &str) -> String {
    let out = lazylayer(root, &["--store-size-limit", "200MB", "pull", "-q", image]);
    assert!(out.status.success(), "pull {image} failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn layer_present(root: &Path, digest: &str) -> bool {
    stored_layer(root, digest).join("layer.json").is_file()
}

/// Three images over a 200 MB limit (minbase 184 MB on disk, nginx 25 MB
/// more on minbase's layer, busybox 3 MB): a container of minbase runs throughout. Pulls
/// evict the least recently used image no container uses, never the
/// running container's layers, nor a layer a kept image shares; the
/// container reads its files all along; `df` equals `du`.
#[test]
fn root_a_node_over_its_limit_keeps_running_containers_and_evicts_the_rest() {
    if !require_root(
        "root_a_node_over_its_limit_keeps_running_containers_and_evicts_the_rest",
        "runs containers",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["busybox", "minbase", "nginx"]);
    let (busybox, minbase, nginx) = (
        image_ref(&reg, "busybox"),
        image_ref(&reg, "minbase"),
        image_ref(&reg, "nginx"),
    );
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let _leftovers = StoreLeftovers(root.to_path_buf());

    // A long-lived container of minbase (pulled in full by run, pinned).
    let name = "cache-keeper";
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(root)
            .args(["--store-size-limit", "200MB", "run", "--rm", "--name", name])
            .args([minbase.as_str(), "--", "sleep", "1000"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let rootfs = root.join("containers").join(name).join("rootfs");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !rootfs.join("etc/os-release").exists() {
        assert!(Instant::now() < deadline, "the container did not start");
        assert!(child.0.try_wait().unwrap().is_none(), "run exited");
        std::thread::sleep(Duration::from_millis(100));
    }
    let os_release = std::fs::read(rootfs.join("etc/os-release")).unwrap();
    let (_, minbase_layers) = layer_digests(root, &minbase);

    // busybox, then nginx (minbase's layer + 25 MB): 212 MB. busybox, the
    // least recently used image no container uses, goes; nginx, just
    // pulled, stays though the store is still over (the pull uses it).
    pull(root, &busybox);
    let (_, busybox_layers) = layer_digests(root, &busybox);
    let (_, nginx_layers) = layer_digests(root, &nginx);
    std::thread::sleep(Duration::from_millis(50)); // distinct last-used times
    let err = pull(root, &nginx);
    assert!(
        err.contains("Evicted 1"),
        "pull says what it evicted: {err}"
    );
    let refs = recorded(root);
    assert!(!refs.contains(&busybox), "busybox evicted: {refs:?}");
    assert!(refs.contains(&nginx) && refs.contains(&minbase), "{refs:?}");
    assert!(!layer_present(root, &busybox_layers[0]));

    // busybox again: now nginx is the least recently used not in use. Its
    // own layers go; the base layer it shares with the running minbase stays.
    std::thread::sleep(Duration::from_millis(50));
    pull(root, &busybox);
    let refs = recorded(root);
    assert!(!refs.contains(&nginx), "nginx evicted: {refs:?}");
    assert!(
        refs.contains(&busybox) && refs.contains(&minbase),
        "{refs:?}"
    );
    for l in &nginx_layers[1..] {
        assert!(!layer_present(root, l), "nginx's own layer {l} evicted");
    }
    assert_eq!(
        nginx_layers[0], minbase_layers[0],
        "nginx stands on minbase"
    );
    for l in &minbase_layers {
        assert!(layer_present(root, l), "the running image's layer {l} kept");
    }

    // Under the limit, and df agrees with du to the byte.
    let v = df(root);
    let total = v["total"].as_u64().unwrap();
    assert!(
        total <= LIMIT,
        "the store takes {total} bytes, over {LIMIT}"
    );
    assert_eq!(total, du_total(root), "df total against du: {v}");
    assert_eq!(v["limit"].as_u64(), Some(LIMIT));
    let images = v["images"].as_array().unwrap();
    let minbase_row = images.iter().find(|i| i["reference"] == minbase.as_str());
    assert_eq!(minbase_row.unwrap()["in_use"], true, "{v}");
    let busybox_row = images.iter().find(|i| i["reference"] == busybox.as_str());
    assert_eq!(busybox_row.unwrap()["in_use"], false, "{v}");

    // The container still runs and reads its files.
    assert!(child.0.try_wait().unwrap().is_none(), "run exited");
    assert_eq!(
        std::fs::read(rootfs.join("etc/os-release")).unwrap(),
        os_release
    );
    let n = std::fs::read_dir(rootfs.join("usr/bin")).unwrap().count();
    assert!(n > 50, "ls /usr/bin in the container: {n} entries");
    let out = Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args(["exec", name, "cat", "/etc/debian_version"])
        .output()
        .unwrap();
    assert!(
        out.status.success() && !out.stdout.is_empty(),
        "cat in the container: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Once the container is gone, prune --to takes the store further down.
    send_signal(child.0.id(), rustix::process::Signal::TERM);
    wait_exit(&mut child.0, Duration::from_secs(30));
    let rep = lazylayer_json(root, &["prune", "--to", "10MB"]);
    let evicted: Vec<&str> = (rep["images_evicted"].as_array().unwrap().iter())
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(evicted, vec![minbase.as_str()], "{rep}");
    assert!(rep["usage_after"].as_u64().unwrap() <= 10_000_000, "{rep}");
    assert_eq!(df(root)["total"].as_u64().unwrap(), du_total(root));
}

/// Hostile sizes are refused with a clear error naming the option.
#[test]
fn a_bad_size_limit_is_a_clear_error() {
    let root = tempfile::tempdir().unwrap();
    for bad in ["-1GB", "12 parsecs", "99999999999999999999999", "1e9"] {
        let out = lazylayer(root.path(), &["--store-size-limit", bad, "df"]);
        assert!(!out.status.success(), "{bad} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--store-size-limit") && err.contains(bad),
            "{bad}: {err}"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .arg("--root")
        .arg(root.path())
        .arg("df")
        .env("LAZYLAYER_STORE_SIZE_LIMIT", "1.5GiB")
        .arg("--json")
        .output()
        .unwrap();
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["limit"].as_u64(), Some(1_610_612_736));
}
