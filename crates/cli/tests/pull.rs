//! End-to-end: pull, push, inspect, images, prune against a real registry.

mod common;

use common::*;

#[test]
fn push_then_pull_roundtrips_with_identical_digests() {
    let reg = Registry::start();
    let digests = push_images(&reg, &["busybox", "multilayer"]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();

    for name in ["busybox", "multilayer"] {
        let v = lazylayer_json(r, &["pull", &image_ref(&reg, name)]);
        assert_eq!(
            v["manifest_digest"], digests[name],
            "{name}: pulled digest differs from the built one"
        );
    }
    // busybox's only layer is multilayer's base: the second pull must not fetch it again.
    let bb = lazylayer_json(r, &["images"]);
    assert_eq!(bb.as_array().unwrap().len(), 2);

    // Push to another repository of the same registry: layers are mounted, not uploaded.
    let dst = format!("{}/copies/multilayer:v1", reg.addr());
    let p = lazylayer_json(r, &["push", &image_ref(&reg, "multilayer"), &dst]);
    assert_eq!(p["digest"], digests["multilayer"]);
    assert_eq!(
        p["bytes_uploaded"], 0,
        "cross-repository mount should avoid uploads: {p}"
    );
    assert!(p["mounted"].as_u64().unwrap() >= 4, "{p}");

    // Push to a second registry in chunks: everything uploaded, same digest.
    let reg2 = Registry::start();
    let dst2 = format!("{}/elsewhere/multilayer:v2", reg2.addr());
    let p = lazylayer_json(
        r,
        &[
            "push",
            "--chunk-size",
            "1000000",
            &image_ref(&reg, "multilayer"),
            &dst2,
        ],
    );
    assert_eq!(p["digest"], digests["multilayer"]);
    assert!(p["uploaded"].as_u64().unwrap() >= 5, "{p}");
    assert!(
        reg2.log()
            .contains("\"PATCH /v2/elsewhere/multilayer/blobs/uploads/"),
        "chunked upload used PATCH"
    );

    // Pull it back from the second registry into a fresh store.
    let root2 = tempfile::tempdir().unwrap();
    let v = lazylayer_json(root2.path(), &["pull", &dst2]);
    assert_eq!(v["manifest_digest"], digests["multilayer"]);
    assert_eq!(v["layers_fetched"], 5);

    // inspect from the registry agrees with the store.
    let i = lazylayer_json(r, &["inspect", &dst2]);
    assert_eq!(i["digest"], digests["multilayer"]);
    assert_eq!(i["layers"].as_array().unwrap().len(), 5);
    assert_eq!(i["config"]["cmd"][0], "/bin/sh");
}

#[test]
fn shared_layers_are_fetched_once_and_second_pull_fetches_nothing() {
    let reg = Registry::start();
    push_images(&reg, &["busybox", "multilayer"]);
    let root = tempfile::tempdir().unwrap();
    let a = lazylayer_json(root.path(), &["pull", &image_ref(&reg, "busybox")]);
    let base = a["layers"][0]["digest"].as_str().unwrap().to_string();
    let b = lazylayer_json(root.path(), &["pull", &image_ref(&reg, "multilayer")]);
    assert_eq!(b["layers"][0]["digest"], base.as_str());
    assert_eq!(b["layers_cached"], 1, "the shared base layer is reused");
    assert_eq!(
        reg.blob_gets(&base),
        1,
        "base layer fetched once for two images"
    );
    let again = lazylayer_json(root.path(), &["pull", &image_ref(&reg, "multilayer")]);
    assert_eq!(again["bytes_fetched"], 0);
    assert_eq!(again["layers_fetched"], 0);
}

#[test]
fn concurrent_pulls_share_one_fetch_per_layer() {
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let root = tempfile::tempdir().unwrap();
    let image = image_ref(&reg, "multilayer");
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(root.path())
            .args(["pull", "--json", &image])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (c1, c2) = (spawn(), spawn());
    let (o1, o2) = (
        c1.wait_with_output().unwrap(),
        c2.wait_with_output().unwrap(),
    );
    assert!(
        o1.status.success(),
        "{}",
        String::from_utf8_lossy(&o1.stderr)
    );
    assert!(
        o2.status.success(),
        "{}",
        String::from_utf8_lossy(&o2.stderr)
    );
    let v1: serde_json::Value = serde_json::from_slice(&o1.stdout).unwrap();
    let v2: serde_json::Value = serde_json::from_slice(&o2.stdout).unwrap();
    assert_eq!(v1["manifest_digest"], v2["manifest_digest"]);
    for l in v1["layers"].as_array().unwrap() {
        let d = l["digest"].as_str().unwrap();
        assert_eq!(reg.blob_gets(d), 1, "layer {d} fetched more than once");
    }
    let fetched = v1["layers_fetched"].as_u64().unwrap() + v2["layers_fetched"].as_u64().unwrap();
    assert_eq!(
        fetched, 5,
        "each layer fetched by exactly one of the two processes"
    );
}

#[test]
fn prune_removes_only_unreferenced_content() {
    let reg = Registry::start();
    push_images(&reg, &["busybox", "multilayer"]);
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let bb = lazylayer_json(r, &["pull", &image_ref(&reg, "busybox")]);
    let ml = lazylayer_json(r, &["pull", &image_ref(&reg, "multilayer")]);
    let nothing = lazylayer_json(r, &["prune"]);
    assert_eq!(nothing["blobs_removed"], 0);
    assert_eq!(nothing["layers_removed"], 0);

    lazylayer_ok(r, &["rmi", &image_ref(&reg, "multilayer")]);
    let rep = lazylayer_json(r, &["prune"]);
    assert_eq!(
        rep["layers_removed"], 4,
        "multilayer's own 4 layers go, the shared base stays: {rep}"
    );
    let base = bb["layers"][0]["digest"].as_str().unwrap();
    assert!(stored_layer(r, base).join("fs/bin/busybox").is_file());
    let top = ml["layers"][4]["digest"]
        .as_str()
        .unwrap()
        .strip_prefix("sha256:")
        .unwrap()
        .to_string();
    assert!(!stored_layer(r, &top).exists());
    assert!(!r.join("blobs/sha256").join(&top).exists());

    // busybox still pulls from the store alone.
    let again = lazylayer_json(r, &["pull", &image_ref(&reg, "busybox")]);
    assert_eq!(again["bytes_fetched"], 0);
}

#[test]
fn images_and_inspect_text_output() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let root = tempfile::tempdir().unwrap();
    let out = lazylayer_ok(root.path(), &["pull", "-q", &image_ref(&reg, "busybox")]);
    assert!(out.starts_with("Pulled "), "{out}");
    let list = lazylayer_ok(root.path(), &["images"]);
    assert!(list.contains("lazylayer/busybox:latest"), "{list}");
    let insp = lazylayer_ok(root.path(), &["inspect", &image_ref(&reg, "busybox")]);
    assert!(insp.contains("Layers:     1"), "{insp}");
    let missing = lazylayer(
        root.path(),
        &["pull", &format!("{}/lazylayer/nope:latest", reg.addr())],
    );
    assert!(!missing.status.success());
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        err.contains("lazylayer/nope") && err.contains("not found"),
        "{err}"
    );
}
