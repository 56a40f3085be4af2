//! The additional layer store's layout without FUSE or mounts: the
//! directories, `info` and `blob` entries Podman reads, the names of the
//! places a root is mounted, what an image laid out is undone to, and which
//! images are not laid out from the store.

use std::path::Path;
use std::sync::Arc;

use lazylayer_fetch::FetchOptions;
use lazylayer_fs::Held;
use lazylayer_oci::client::ClientConfig;
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_root::MountOptions;
use lazylayer_store::{ImageRecord, LayerRef, Store};

use super::*;

const IMAGE: &str = "127.0.0.1:5000/lazylayer/app:boot";

fn reference(s: &str) -> Reference {
    s.parse().unwrap()
}

fn layer(name: &str, size: u64) -> LayerRef {
    LayerRef {
        digest: Digest::sha256_of(name.as_bytes()),
        diff_id: Digest::sha256_of(format!("diff {name}").as_bytes()),
        size,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    }
}

fn info(dir: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(dir.join("info")).unwrap()).unwrap()
}

fn options(dir: &Path) -> StoreOptions {
    StoreOptions {
        dir: dir.to_path_buf(),
        fetch: FetchOptions::default(),
        mount: MountOptions::default(),
        holder: None,
    }
}

#[test]
fn each_layer_gets_a_diff_dir_an_empty_blob_and_an_info() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join(image_dir_name(IMAGE));
    let layers = [layer("base", 1000), layer("boot", 20)];
    let diffs = layer_dirs(&base, &reference(IMAGE), &layers, "lazylayer-view").unwrap();
    let want: Vec<PathBuf> = layers
        .iter()
        .map(|l| base.join(l.digest.to_string()).join("diff"))
        .collect();
    assert_eq!(diffs, want, "bottom first, one per layer, named by digest");
    for l in &layers {
        let ld = base.join(l.digest.to_string());
        assert_eq!(std::fs::read_dir(ld.join("diff")).unwrap().count(), 0);
        assert_eq!(std::fs::read(ld.join("blob")).unwrap(), b"");
        assert_eq!(info(&ld)["compressed-size"], l.size);
        let mut names: Vec<_> = std::fs::read_dir(&ld)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["blob", "diff", "info"], "no temp file left beside");
    }
}

#[test]
fn the_diff_digest_names_a_view_of_this_image_not_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let l = layer("boot", 20);
    let digest_in = |base: &str, image: &str, view: &str| -> String {
        let base = tmp.path().join(base);
        layer_dirs(&base, &reference(image), std::slice::from_ref(&l), view).unwrap();
        info(&base.join(l.digest.to_string()))["diff-digest"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let lazy = digest_in("a", IMAGE, "lazylayer-view");
    assert_ne!(lazy, l.diff_id.to_string());
    assert!(lazy.parse::<Digest>().is_ok(), "{lazy}");
    // Stable: the next store lays the same image out the same way.
    assert_eq!(digest_in("b", IMAGE, "lazylayer-view"), lazy);
    // A native layout or another image is never mixed up with it.
    assert_ne!(digest_in("c", IMAGE, "lazylayer-native-view"), lazy);
    assert_ne!(
        digest_in("d", "127.0.0.1:5000/other:boot", "lazylayer-view"),
        lazy
    );
}

#[test]
fn a_root_is_mounted_in_one_place_per_layer_store_and_image() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let (one, two) = (tmp.path().join("als-1"), tmp.path().join("als-2"));
    let (a, b) = (reference(IMAGE), reference("127.0.0.1:5000/other:boot"));
    let w = work_dir(&store, &one, &a);
    assert_eq!(w, work_dir(&store, &one, &a), "stable across restarts");
    assert_eq!(w.parent().unwrap(), store.root().join("podman-store"));
    let name = w.file_name().unwrap().to_str().unwrap();
    assert_eq!(name.len(), 16);
    assert!(name.bytes().all(|c| c.is_ascii_hexdigit()), "{name}");
    assert_ne!(w, work_dir(&store, &two, &a));
    assert_ne!(w, work_dir(&store, &one, &b));
}

#[tokio::test]
async fn serving_no_image_makes_the_directory_private_and_lists_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let client = Arc::new(RegistryClient::new(ClientConfig::default()).unwrap());
    let dir = tmp.path().join("als");
    let ls = LayerStore::serve(&store, client, &[], &options(&dir))
        .await
        .unwrap();
    assert_eq!(ls.images().count(), 0);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    ls.stop().await;
    assert!(dir.is_dir());
}

#[test]
fn an_image_not_held_whole_by_the_store_is_not_laid_out_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let dir = tmp.path().join("als");
    let r = reference(IMAGE);
    assert!(lay_out_local(&store, &r, &dir, "t-pin").unwrap().is_none());
    // Recorded, but a layer is not extracted: still not local whole.
    let l = layer("boot", 20);
    let rec = ImageRecord {
        reference: r.to_string(),
        manifest_digest: Digest::sha256_of(b"manifest"),
        manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        index_digest: None,
        config_digest: Digest::sha256_of(b"config"),
        layers: vec![l],
        platform: "linux/amd64".into(),
        pulled_at: 0,
        attached: None,
    };
    store.save_image(&rec).unwrap();
    assert!(lay_out_local(&store, &r, &dir, "t-pin").unwrap().is_none());
    assert!(!dir.join(image_dir_name(IMAGE)).exists());
    assert!(!store.root().join("pins/t-pin.json").exists());
}

#[test]
fn a_plain_image_held_whole_is_not_laid_out_locally() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let r = reference(IMAGE);
    let l = layer("plain", 20);
    let fs = store.layer_fs_path(&l.digest);
    std::fs::create_dir_all(&fs).unwrap();
    std::fs::write(fs.parent().unwrap().join("layer.json"), b"{}").unwrap();
    let config = Digest::sha256_of(b"{}");
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config.to_string(), "size": 2,
        },
        "layers": [{ "mediaType": l.media_type, "digest": l.digest.to_string(), "size": l.size }],
    })
    .to_string();
    let manifest_digest = Digest::sha256_of(manifest.as_bytes());
    let blob = store.blob_path(&manifest_digest);
    std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
    std::fs::write(&blob, &manifest).unwrap();
    store
        .save_image(&ImageRecord {
            reference: r.to_string(),
            manifest_digest,
            manifest_media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            index_digest: None,
            config_digest: config,
            layers: vec![l],
            platform: "linux/amd64".into(),
            pulled_at: 0,
            attached: None,
        })
        .unwrap();
    assert!(
        lazylayer_root::local_image(&store, &r).is_some(),
        "held whole"
    );
    let dir = tmp.path().join("als");
    // No boot layer: served lazily (which then refuses it), not from the store.
    assert!(lay_out_local(&store, &r, &dir, "t-pin").unwrap().is_none());
    assert!(!dir.join(image_dir_name(IMAGE)).exists());
}

#[test]
fn a_served_image_is_removed_when_dropped_and_kept_when_left() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let r = reference(IMAGE);
    let served = |name: &str, pin: &str| {
        let base = tmp.path().join(name);
        layer_dirs(&base, &r, &[layer("boot", 20)], "lazylayer-view").unwrap();
        Served {
            base,
            mounted: Vec::new(),
            reference: r.clone(),
            layers: 1,
            root: None,
            _pin: Some(store.pin_guard(pin, &[Digest::sha256_of(b"boot")]).unwrap()),
            holder: None,
        }
    };
    let pin = |name: &str| store.root().join("pins").join(format!("{name}.json"));
    let dropped = served("dropped", "t-dropped");
    assert!(pin("t-dropped").is_file());
    drop(dropped);
    assert!(!tmp.path().join("dropped").exists(), "layout left behind");
    assert!(!pin("t-dropped").exists(), "pin left behind");
    served("left", "t-left").leave();
    assert!(
        tmp.path().join("left").is_dir(),
        "a layout left was removed"
    );
}

#[test]
fn clearing_an_earlier_layout_removes_it_and_leaves_a_plain_target() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join(image_dir_name(IMAGE));
    layer_dirs(
        &base,
        &reference(IMAGE),
        &[layer("boot", 20)],
        "lazylayer-view",
    )
    .unwrap();
    let target = tmp.path().join("work/root");
    std::fs::create_dir_all(&target).unwrap();
    clear_layout(&base, &target, None);
    assert!(!base.exists());
    assert!(target.is_dir());
    // Nothing left: a second clear has nothing to do.
    clear_layout(&base, &target, None);
    // No overlay stands on a layout that is not there, nor on a fresh one.
    assert!(!in_use(&base));
    std::fs::create_dir_all(&base).unwrap();
    assert!(!in_use(&base));
}

#[tokio::test]
async fn a_kept_root_is_taken_over_only_for_the_same_image_and_while_mounted() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let client = Arc::new(RegistryClient::new(ClientConfig::default()).unwrap());
    let opts = options(&tmp.path().join("als"));
    let r = reference(IMAGE);
    let (base, target) = (tmp.path().join("base"), tmp.path().join("root"));
    std::fs::create_dir_all(&target).unwrap();
    let held = |kind: &str, image: &str| Held {
        name: target.display().to_string(),
        meta: serde_json::json!({
            "kind": kind, "target": target.display().to_string(),
            "image_ref": image, "base": base.display().to_string(),
        }),
        fds: Vec::new(),
    };
    let cases = [
        (
            held("containerd-snapshotter", IMAGE),
            "kept for containerd-snapshotter",
        ),
        (
            held(HELD_KIND, "127.0.0.1:5000/other:boot"),
            "kept for podman-store",
        ),
        // The same image, but a plain directory: the root died with its process.
        (held(HELD_KIND, &r.to_string()), "no longer mounted"),
    ];
    for (h, why) in cases {
        let e = take_over(
            &store,
            client.clone(),
            &r,
            &opts,
            "t-pin",
            &base,
            &target,
            h,
        )
        .await
        .err()
        .expect("taken over");
        let (TakeOver::Failed(e) | TakeOver::Unauthorized(e)) = e;
        assert!(e.contains(why), "{e:?}, not {why:?}");
    }
}
