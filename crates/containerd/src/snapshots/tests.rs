use super::*;

fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
    kv.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn remote(layer: &str, top: bool) -> RemoteLayer {
    RemoteLayer {
        image_ref: "reg/img:boot".into(),
        manifest_digest: "sha256:abcd".into(),
        layer_digest: layer.into(),
        top,
    }
}

fn lowerdir(m: &Mount) -> String {
    m.options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap()
        .to_string()
}

#[test]
fn prepare_commit_chain_gives_overlay_and_binds() {
    let t = tempfile::tempdir().unwrap();
    let s = Snapshots::open(t.path()).unwrap();
    let m = s.create(Kind::Active, "a1", "", BTreeMap::new()).unwrap();
    assert_eq!(m[0].fstype, "bind");
    assert_eq!(m[0].options, vec!["rw", "rbind"]);
    let l1 = PathBuf::from(&m[0].source);
    assert!(l1.is_dir());
    s.commit("l1", "a1", labels(&[("x", "y")])).unwrap();
    assert!(matches!(s.stat("a1"), Err(SnapshotError::NotFound(_))));
    let i = s.stat("l1").unwrap();
    assert_eq!(i.kind, Kind::Committed);
    assert_eq!(i.labels, labels(&[("x", "y")]));

    // A view on one parent: a read-only bind of it.
    let v = s.create(Kind::View, "v", "l1", BTreeMap::new()).unwrap();
    assert_eq!(v[0].fstype, "bind");
    assert_eq!(v[0].source, l1.display().to_string());
    assert_eq!(v[0].options, vec!["ro", "rbind"]);

    s.create(Kind::Active, "a2", "l1", BTreeMap::new()).unwrap();
    s.commit("l2", "a2", BTreeMap::new()).unwrap();
    let c = s.create(Kind::Active, "c", "l2", BTreeMap::new()).unwrap();
    assert_eq!(c[0].fstype, "overlay");
    let l2 = s.snapshot_dir(s.lock().snapshots["l2"].id).join("fs");
    assert_eq!(
        lowerdir(&c[0]),
        format!("{}:{}", l2.display(), l1.display())
    );
    assert!(c[0].options.iter().any(|o| o.starts_with("upperdir=")));
    assert!(c[0].options.iter().any(|o| o.starts_with("workdir=")));
    assert_eq!(s.mounts("c").unwrap(), c);

    // A view on two parents: an overlay without upper.
    let v2 = s.create(Kind::View, "v2", "l2", BTreeMap::new()).unwrap();
    assert_eq!(v2[0].fstype, "overlay");
    assert_eq!(v2[0].options, vec![format!("lowerdir={}", lowerdir(&c[0]))]);
}

#[test]
fn errors_have_the_right_kinds() {
    let t = tempfile::tempdir().unwrap();
    let s = Snapshots::open(t.path()).unwrap();
    s.create(Kind::Active, "a", "", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.create(Kind::Active, "a", "", BTreeMap::new()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.create(Kind::Active, "b", "nope", BTreeMap::new()),
        Err(SnapshotError::NotFound(_))
    ));
    // An active snapshot cannot be a parent.
    assert!(matches!(
        s.create(Kind::Active, "b", "a", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    assert!(matches!(
        s.create(Kind::Active, "", "", BTreeMap::new()),
        Err(SnapshotError::InvalidArgument(_))
    ));
    s.create(Kind::View, "v", "", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.commit("c", "v", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    s.commit("c", "a", BTreeMap::new()).unwrap();
    assert!(matches!(
        s.mounts("c"),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    s.create(Kind::Active, "child", "c", BTreeMap::new())
        .unwrap();
    assert!(matches!(
        s.commit("c", "child", BTreeMap::new()),
        Err(SnapshotError::AlreadyExists(_))
    ));
    // Remove refuses a parent, then works once the child is gone.
    assert!(matches!(
        s.remove("c"),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    s.remove("child").unwrap();
    s.remove("c").unwrap();
    assert!(matches!(s.remove("c"), Err(SnapshotError::NotFound(_))));
    assert!(matches!(
        s.update(
            &Info {
                name: "v".into(),
                parent: None,
                kind: Kind::View,
                created: Time::now(),
                updated: Time::now(),
                labels: BTreeMap::new()
            },
            &["parent".into()]
        ),
        Err(SnapshotError::InvalidArgument(_))
    ));
}

#[test]
fn metadata_survives_reopen_and_remove_deletes_dirs() {
    let t = tempfile::tempdir().unwrap();
    let fs_dir;
    {
        let s = Snapshots::open(t.path()).unwrap();
        let m = s
            .create(Kind::Active, "a", "", labels(&[("k", "v")]))
            .unwrap();
        fs_dir = PathBuf::from(&m[0].source);
        std::fs::write(fs_dir.join("file"), b"hello").unwrap();
        s.commit("l", "a", labels(&[("k", "v")])).unwrap();
        s.commit_remote(
            "r",
            "l",
            labels(&[(LABEL_TARGET_REF, "r")]),
            remote("sha256:top", true),
        )
        .unwrap();
    }
    let s = Snapshots::open(t.path()).unwrap();
    let mut names: Vec<_> = s.list().into_iter().map(|i| i.name).collect();
    names.sort();
    assert_eq!(names, vec!["l", "r"]);
    assert_eq!(s.stat("r").unwrap().parent.as_deref(), Some("l"));
    assert!(s.usage("l").unwrap().size > 0);
    assert_eq!(s.usage("r").unwrap(), Usage::default());
    // New ids never reuse old ones.
    s.create(Kind::Active, "x", "", BTreeMap::new()).unwrap();
    assert_eq!(s.lock().snapshots["x"].id, 3);
    s.remove("r").unwrap();
    s.remove("l").unwrap();
    assert!(!fs_dir.exists());
}

#[test]
fn remote_chain_mounts_the_lazy_root() {
    let t = tempfile::tempdir().unwrap();
    let s = Snapshots::open(t.path()).unwrap();
    s.commit_remote("c1", "", BTreeMap::new(), remote("sha256:l1", false))
        .unwrap();
    s.commit_remote("c2", "c1", BTreeMap::new(), remote("sha256:boot", true))
        .unwrap();
    assert_eq!(s.remote_top_of("c2").unwrap().layer_digest, "sha256:boot");
    assert_eq!(s.remote_top_of("c1"), None);
    assert_eq!(s.lazy_users("sha256:abcd"), 0);

    let m = s
        .create(Kind::Active, "ctr", "c2", BTreeMap::new())
        .unwrap();
    assert_eq!(m[0].fstype, "overlay");
    let lazy = s.lazy_dir("sha256:abcd");
    assert_eq!(lazy, t.path().join("lazy/abcd"));
    assert_eq!(lowerdir(&m[0]), lazy.display().to_string());
    let v = s.create(Kind::View, "view", "c2", BTreeMap::new()).unwrap();
    assert_eq!(v[0].fstype, "bind");
    assert_eq!(v[0].source, lazy.display().to_string());
    assert_eq!(s.lazy_users("sha256:abcd"), 2);
    assert_eq!(s.lazy_images_in_use().len(), 1);
    assert_eq!(
        s.remote_top_under("ctr").unwrap().layer_digest,
        "sha256:boot"
    );

    // A snapshot on a lower remote layer has nothing to mount.
    assert!(matches!(
        s.create(Kind::Active, "bad", "c1", BTreeMap::new()),
        Err(SnapshotError::FailedPrecondition { .. })
    ));
    assert!(!s.exists("bad"));

    // Removing reports the image the snapshot used, for unmounting.
    assert_eq!(
        s.remove("ctr").unwrap().unwrap().manifest_digest,
        "sha256:abcd"
    );
    s.remove("view").unwrap();
    assert_eq!(s.lazy_users("sha256:abcd"), 0);
    assert_eq!(s.remove("c2").unwrap(), None);
    s.remove("c1").unwrap();
}

#[test]
fn a_snapshot_made_on_a_local_image_keeps_its_store_lowers() {
    let t = tempfile::tempdir().unwrap();
    let s = Snapshots::open(t.path()).unwrap();
    s.commit_remote("c1", "", BTreeMap::new(), remote("sha256:l1", false))
        .unwrap();
    s.commit_remote("c2", "c1", BTreeMap::new(), remote("sha256:boot", true))
        .unwrap();
    let lazy_ctr = s
        .create(Kind::Active, "lazy", "c2", BTreeMap::new())
        .unwrap();
    let store_dirs = vec![PathBuf::from("/store/mask"), PathBuf::from("/store/boot")];
    let m = s
        .create_on_local_image(Kind::Active, "native", "c2", BTreeMap::new(), store_dirs)
        .unwrap();
    assert_eq!(lowerdir(&m[0]), "/store/mask:/store/boot");
    // The lazy one keeps its mount; only it needs the lazy root.
    assert_eq!(
        lowerdir(&lazy_ctr[0]),
        s.lazy_dir("sha256:abcd").display().to_string()
    );
    assert_eq!(s.lazy_users("sha256:abcd"), 1);
    assert_eq!(s.remote_top_under("native"), None);
    // The same mounts after a restart (metadata reread).
    drop(s);
    let s = Snapshots::open(t.path()).unwrap();
    assert_eq!(s.mounts("native").unwrap(), m);
    s.remove("lazy").unwrap();
    assert_eq!(s.lazy_users("sha256:abcd"), 0);
    assert_eq!(s.lazy_images_in_use(), Vec::new());
}

#[test]
fn update_labels_by_mask_and_cleanup_orphans() {
    let t = tempfile::tempdir().unwrap();
    let s = Snapshots::open(t.path()).unwrap();
    s.create(Kind::Active, "a", "", labels(&[("a", "1"), ("b", "2")]))
        .unwrap();
    let mut i = s.stat("a").unwrap();
    i.labels = labels(&[("b", "3"), ("c", "4")]);
    let out = s
        .update(&i, &["labels.b".into(), "labels.a".into()])
        .unwrap();
    assert_eq!(out.labels, labels(&[("b", "3")]));
    let out = s.update(&i, &[]).unwrap();
    assert_eq!(out.labels, labels(&[("b", "3"), ("c", "4")]));
    assert_eq!(s.stat("a").unwrap().labels, out.labels);

    std::fs::create_dir_all(t.path().join("snapshots/999/fs")).unwrap();
    assert_eq!(s.cleanup().unwrap(), 1);
    assert!(!t.path().join("snapshots/999").exists());
    assert!(t.path().join("snapshots/1/fs").exists());
}
