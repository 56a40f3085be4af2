//! The remote image table without a registry: which images are opened,
//! known and forgotten, what Prepare's labels claim, and the checks that
//! come before a lazy root is taken over. Every image here is resolved
//! without network: a failed parse, a cell already answered, or the store's
//! record.

use std::collections::BTreeMap;
use std::sync::Arc;

use lazylayer_fs::Held;
use lazylayer_oci::client::ClientConfig;
use lazylayer_oci::{Digest, RegistryClient};
use lazylayer_store::{ImageRecord, LayerRef, Store};
use tokio::sync::OnceCell;

use super::*;

const IMAGE: &str = "127.0.0.1:5000/lazylayer/app:boot";

fn digest_of(s: &str) -> String {
    Digest::sha256_of(s.as_bytes()).to_string()
}

fn images(tmp: &Path) -> Images {
    let store = Store::open(tmp.join("store")).unwrap();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    Images::new(store, Arc::new(client))
}

fn layer(name: &str) -> LayerRef {
    LayerRef {
        digest: Digest::sha256_of(name.as_bytes()),
        diff_id: Digest::sha256_of(format!("diff {name}").as_bytes()),
        size: name.len() as u64,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    }
}

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The labels the CRI plugin puts on a layer's Prepare.
fn claim_labels(
    target: &str,
    manifest_digest: &str,
    layer_digest: &str,
) -> BTreeMap<String, String> {
    labels(&[
        (LABEL_TARGET_REF, target),
        (LABEL_IMAGE_REF, IMAGE),
        (LABEL_MANIFEST_DIGEST, manifest_digest),
        (LABEL_LAYER_DIGEST, layer_digest),
    ])
}

/// Mark the image at `manifest_digest` as opened and found plain (no boot
/// layer), as a finished open leaves it.
fn answered_plain(images: &Images, manifest_digest: &str) {
    images.opened.lock().unwrap().insert(
        manifest_digest.to_string(),
        Arc::new(OnceCell::new_with(Some(None))),
    );
}

#[test]
fn a_claim_needs_every_label_and_none_empty() {
    let (m, l) = (digest_of("manifest"), digest_of("layer"));
    let all = claim_labels("layer-1", &m, &l);
    let c = Claim::from_labels(&all).unwrap();
    assert_eq!(
        (
            &*c.target,
            &*c.image_ref,
            &*c.manifest_digest,
            &*c.layer_digest
        ),
        ("layer-1", IMAGE, &*m, &*l)
    );
    for k in [
        LABEL_TARGET_REF,
        LABEL_IMAGE_REF,
        LABEL_MANIFEST_DIGEST,
        LABEL_LAYER_DIGEST,
    ] {
        let mut missing = all.clone();
        missing.remove(k);
        assert!(
            Claim::from_labels(&missing).is_none(),
            "claimed without {k}"
        );
        let mut empty = all.clone();
        empty.insert(k.to_string(), String::new());
        assert!(
            Claim::from_labels(&empty).is_none(),
            "claimed with {k} empty"
        );
    }
}

#[test]
fn the_image_reference_is_pinned_at_the_manifest_digest() {
    let m = digest_of("manifest");
    let r = image_reference(IMAGE, &m).unwrap();
    assert_eq!(r.digest.as_ref().map(Digest::to_string), Some(m.clone()));
    assert_eq!(r.tag.as_deref(), Some("boot"));
    assert!(r.to_string().ends_with(&format!("@{m}")), "{r}");
}

#[test]
fn a_bad_reference_or_digest_names_the_image_asked_for() {
    let m = digest_of("manifest");
    for (image_ref, digest) in [(IMAGE, "sha256:nothex"), ("Not A Reference!", &*m)] {
        match image_reference(image_ref, digest) {
            Err(SnapshotError::Image { image, .. }) => {
                assert_eq!(image, format!("{image_ref}@{digest}"))
            }
            other => panic!("{image_ref}@{digest}: {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_failed_open_is_not_remembered_and_the_next_caller_tries_again() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let bad = "sha256:nothex";
    for _ in 0..2 {
        let opened = images.open(IMAGE, bad).await;
        assert!(
            matches!(opened, Err(SnapshotError::Image { .. })),
            "{:?}",
            opened.map(|i| i.is_some())
        );
        let opened = images.opened.lock().unwrap();
        let cell = opened.get(bad).expect("the open's cell");
        assert!(!cell.initialized(), "a failure was kept as an answer");
    }
    assert!(images.known.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_plain_image_is_answered_by_its_open_and_not_claimed() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let m = digest_of("plain image");
    answered_plain(&images, &m);
    assert!(images.open(IMAGE, &m).await.unwrap().is_none());
    // Nothing known about a plain image: the store's layers are not asked for.
    assert!(images.known.lock().unwrap().is_empty());
    let claim = Claim::from_labels(&claim_labels("t", &m, &digest_of("layer"))).unwrap();
    assert!(images.claim(&claim).await.unwrap().is_none());
}

#[test]
fn forgetting_an_image_lets_its_open_go_but_keeps_what_it_found() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let (m, other) = (digest_of("optimized"), digest_of("other"));
    answered_plain(&images, &m);
    answered_plain(&images, &other);
    images.known.lock().unwrap().insert(
        m.clone(),
        KnownImage {
            record_reference: format!("{IMAGE}@{m}"),
            layers: vec![layer("base"), layer("boot")],
        },
    );
    images.forget(&m);
    let opened = images.opened.lock().unwrap();
    assert!(!opened.contains_key(&m), "still open after forget");
    assert!(opened.contains_key(&other), "forget let another image go");
    drop(opened);
    let known = images.known_offline(IMAGE, &m).expect("known after forget");
    assert_eq!(known.record_reference, format!("{IMAGE}@{m}"));
    assert_eq!(known.layers, vec![layer("base"), layer("boot")]);
}

#[test]
fn an_image_never_opened_is_known_offline_from_the_store_record_only() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let (m, unknown) = (digest_of("recorded"), digest_of("unknown"));
    assert!(images.known_offline(IMAGE, &m).is_none());
    let reference = image_reference(IMAGE, &m).unwrap();
    let rec = ImageRecord {
        reference: reference.to_string(),
        manifest_digest: m.parse().unwrap(),
        manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        index_digest: None,
        config_digest: Digest::sha256_of(b"config"),
        layers: vec![layer("base"), layer("boot")],
        platform: "linux/amd64".into(),
        pulled_at: 0,
        attached: None,
    };
    images.store.save_image(&rec).unwrap();
    let known = images.known_offline(IMAGE, &m).expect("the store's record");
    assert_eq!(known.record_reference, rec.reference);
    assert_eq!(known.layers, rec.layers);
    assert!(images.known_offline(IMAGE, &unknown).is_none());
    // A manifest digest that is no digest cannot name a record.
    assert!(images.known_offline(IMAGE, "sha256:nothex").is_none());
}

#[test]
fn what_an_open_found_comes_before_the_store_record() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let m = digest_of("both");
    let reference = image_reference(IMAGE, &m).unwrap();
    images
        .store
        .save_image(&ImageRecord {
            reference: reference.to_string(),
            manifest_digest: m.parse().unwrap(),
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            index_digest: None,
            config_digest: Digest::sha256_of(b"config"),
            layers: vec![layer("recorded")],
            platform: "linux/amd64".into(),
            pulled_at: 0,
            attached: None,
        })
        .unwrap();
    images.known.lock().unwrap().insert(
        m.clone(),
        KnownImage {
            record_reference: "opened".into(),
            layers: vec![layer("opened")],
        },
    );
    let known = images.known_offline(IMAGE, &m).unwrap();
    assert_eq!(known.record_reference, "opened");
    assert_eq!(known.layers, vec![layer("opened")]);
}

#[test]
fn each_image_has_one_root_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let sn = Snapshotter::open(tmp.path(), None).unwrap();
    let (a, b) = (digest_of("a"), digest_of("b"));
    assert!(Arc::ptr_eq(&sn.slot(&a), &sn.slot(&a)));
    assert!(!Arc::ptr_eq(&sn.slot(&a), &sn.slot(&b)));
    assert_eq!(sn.mounts.lock().unwrap().len(), 2);
}

#[test]
fn a_lazy_root_pin_is_named_by_process_and_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let sn = Snapshotter::open(tmp.path(), None).unwrap();
    let m = digest_of("pinned");
    let hex = m.trim_start_matches("sha256:");
    assert_eq!(
        sn.pin_name(&m),
        format!("snapshotter-{}-sha256{hex}", std::process::id())
    );
    // Only letters and digits: a pin name allows no ':'.
    assert!(sn.pin_name("sha256:a/b..c").ends_with("-sha256abc"));
}

#[tokio::test]
async fn claimed_layers_are_pinned_in_the_store() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let pins = tmp.path().join("store/pins");
    let sn = Snapshotter::open(&tmp.path().join("sn"), Some(images)).unwrap();
    let pin = pins.join(format!("snapshotter-{}.json", std::process::id()));
    let pinned = || -> Vec<String> {
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&pin).unwrap()).unwrap();
        serde_json::from_value(v["digests"].clone()).unwrap()
    };
    assert!(pinned().is_empty(), "{:?}", pinned());
    let (m, l) = (digest_of("manifest"), digest_of("layer"));
    sn.snapshots
        .commit_remote(
            "layer-1",
            "",
            BTreeMap::new(),
            RemoteLayer {
                image_ref: IMAGE.into(),
                manifest_digest: m.clone(),
                layer_digest: l.clone(),
                top: true,
            },
        )
        .unwrap();
    sn.repin();
    let mut want = vec![m, l];
    want.sort();
    assert_eq!(pinned(), want);
}

#[tokio::test]
async fn a_prepare_whose_image_cannot_be_resolved_is_a_plain_snapshot() {
    let tmp = tempfile::tempdir().unwrap();
    let images = images(tmp.path());
    let plain = digest_of("plain");
    answered_plain(&images, &plain);
    let sn = Arc::new(Snapshotter::open(&tmp.path().join("sn"), Some(images)).unwrap());
    let layer_digest = digest_of("layer");
    // A manifest digest that cannot be resolved, then an image without a
    // boot layer: containerd unpacks the layer itself either way.
    for (key, m) in [("k1", "sha256:nothex"), ("k2", &*plain)] {
        let target = format!("target-{key}");
        let mounts = sn
            .prepare(key, "", claim_labels(&target, m, &layer_digest))
            .await
            .unwrap();
        assert_eq!(mounts[0].fstype, "bind");
        assert!(sn.snapshots.exists(key));
        assert!(!sn.snapshots.exists(&target), "{target} claimed");
    }
    assert!(sn.snapshots.remote_digests().is_empty());
}

#[tokio::test]
async fn a_prepare_of_an_existing_target_answers_already_exists() {
    let tmp = tempfile::tempdir().unwrap();
    let sn = Arc::new(Snapshotter::open(&tmp.path().join("sn"), Some(images(tmp.path()))).unwrap());
    sn.snapshots
        .create(Kind::Active, "a", "", BTreeMap::new())
        .unwrap();
    sn.snapshots
        .commit("layer-1", "a", BTreeMap::new())
        .unwrap();
    let l = claim_labels("layer-1", &digest_of("m"), &digest_of("l"));
    match sn.prepare("k", "", l).await {
        Err(SnapshotError::AlreadyExists(t)) => assert_eq!(t, "layer-1"),
        other => panic!("{other:?}"),
    }
    assert!(!sn.snapshots.exists("k"));
}

#[tokio::test]
async fn a_kept_root_is_taken_over_only_if_it_is_this_snapshotters_and_mounted() {
    let tmp = tempfile::tempdir().unwrap();
    let sn = Snapshotter::open(&tmp.path().join("sn"), Some(images(tmp.path()))).unwrap();
    let m = digest_of("kept");
    let dir = sn.snapshots.lazy_dir(&m);
    std::fs::create_dir_all(&dir).unwrap();
    let ours = dir.display().to_string();
    let held = |name: &str, kind: &str, target: &str| Held {
        name: name.into(),
        meta: serde_json::json!({
            "kind": kind, "target": target, "image_ref": IMAGE, "manifest_digest": m,
        }),
        fds: Vec::new(),
    };
    let cases = [
        (held(&ours, "podman-store", &ours), "kept by a podman-store"),
        (
            held("/elsewhere", HELD_KIND, "/elsewhere"),
            "not this snapshotter's mount",
        ),
        (
            held("/elsewhere", HELD_KIND, &ours),
            "not this snapshotter's mount",
        ),
        // Ours, but a plain directory: the root died with its process.
        (held(&ours, HELD_KIND, &ours), "no longer mounted"),
    ];
    let mut mounts = HashMap::new();
    for (h, why) in cases {
        let e = sn.take_over(&mut mounts, h).await.unwrap_err().to_string();
        assert!(e.contains(why), "{e:?}, not {why:?}");
    }
    let garbled = Held {
        name: ours.clone(),
        meta: serde_json::json!({ "kind": HELD_KIND }),
        fds: Vec::new(),
    };
    assert!(sn.take_over(&mut mounts, garbled).await.is_err());
    assert!(mounts.is_empty());
    // Without a holder nothing is taken over, and nothing is pinned.
    assert_eq!(sn.recover().await, 0);
    assert!(sn.mounts.lock().unwrap().is_empty());
}

#[tokio::test]
async fn a_panic_in_blocking_work_fails_that_call_only() {
    let e = blocking::<()>(|| panic!("injected in a test"))
        .await
        .unwrap_err();
    match e {
        SnapshotError::Internal(m) => assert_eq!(m, "panicked: injected in a test"),
        other => panic!("{other:?}"),
    }
    assert_eq!(blocking(|| Ok(7)).await.unwrap(), 7);
}
