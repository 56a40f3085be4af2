//! The layers lazylayer extracts, stacked by the kernel's overlayfs, give the
//! same root file system as `umoci unpack` (an independent implementation)
//! of the same image: file for file, with types, modes, owners, sizes,
//! contents, link targets, device numbers, xattrs and hardlink groups.

mod common;

use std::path::PathBuf;

use common::tree::{differences, snapshot};
use common::*;

#[test]
fn root_extracted_layers_match_umoci_unpack() {
    if !is_root() {
        eprintln!("SKIP: needs root for overlayfs, owners and device nodes");
        return;
    }
    let reg = Registry::start();
    let digests = push_images(&reg, &["multilayer"]);
    let root = tempfile::tempdir().unwrap();
    let v = lazylayer_json(root.path(), &["pull", &image_ref(&reg, "multilayer")]);
    assert_eq!(v["manifest_digest"], digests["multilayer"]);

    // overlayfs wants the top layer first.
    let mut lowers: Vec<PathBuf> = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| stored_layer(root.path(), l["digest"].as_str().unwrap()).join("fs"))
        .collect();
    lowers.reverse();
    let work = tempfile::tempdir().unwrap();
    let merged = work.path().join("merged");
    std::fs::create_dir(&merged).unwrap();
    let _mount = Mount::overlay_readonly(&lowers, &merged);

    let cache = std::env::var("LAZYLAYER_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".cache/images"));
    let bundle = work.path().join("bundle");
    let st = std::process::Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", cache.join("multilayer/oci").display()))
        .arg(&bundle)
        .status()
        .unwrap();
    assert!(st.success(), "umoci unpack failed");

    let (ours, our_links) = snapshot(&merged);
    let (theirs, their_links) = snapshot(&bundle.join("rootfs"));
    // The root directory itself is made by each tool, not by the image.
    let differing = differences(&ours, &theirs);
    assert!(
        differing.is_empty(),
        "{} paths differ:\n{}",
        differing.len(),
        differing.join("\n")
    );
    assert_eq!(our_links, their_links, "hardlink groups differ");

    // And the image really exercises what we claim it does.
    assert!(ours.contains_key("/data/keep/a.txt"));
    assert!(!ours.contains_key("/data/keep/b.txt"), "whiteout applied");
    assert!(
        !ours.contains_key("/data/gone"),
        "directory whiteout applied"
    );
    assert!(
        ours.contains_key("/data/opq/new.txt") && !ours.contains_key("/data/opq/old1.txt"),
        "opaque dir applied"
    );
    assert!(!our_links.is_empty(), "image has hardlinks");
    assert!(
        ours.values()
            .any(|e| e.xattrs.contains_key("user.lazylayer")),
        "image has an xattr"
    );
    assert!(
        ours.values().any(|e| e.kind == "char"),
        "image has a device node"
    );
    assert!(
        ours.values().any(|e| e.mode & 0o4000 != 0),
        "image has a setuid file"
    );
}
