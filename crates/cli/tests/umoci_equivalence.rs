//! The layers lazylayer extracts, stacked by the kernel's overlayfs, give the
//! same root file system as `umoci unpack` (an independent implementation)
//! of the same image: file for file, with types, modes, owners, sizes,
//! contents, link targets, device numbers, xattrs and hardlink groups.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use common::*;
use sha2::{Digest, Sha256};

#[derive(Debug, PartialEq, Eq)]
struct Entry {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: Option<i64>,
    content: Option<String>,
    link: Option<String>,
    rdev: u64,
    xattrs: BTreeMap<String, Vec<u8>>,
}

fn xattrs(p: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut buf = vec![0u8; 65536];
    let n = rustix::fs::llistxattr(p, &mut buf).unwrap_or(0);
    for name in buf[..n].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(name).to_string();
        // overlayfs' own bookkeeping and security labels are not image content.
        if name.starts_with("trusted.overlay.") || name.starts_with("security.") {
            continue;
        }
        let mut v = vec![0u8; 65536];
        let len = rustix::fs::lgetxattr(p, name.as_str(), &mut v).unwrap();
        out.insert(name, v[..len].to_vec());
    }
    out
}

/// path → entry, plus the hardlink groups (sets of paths sharing an inode).
fn snapshot(root: &Path) -> (BTreeMap<String, Entry>, BTreeSet<Vec<String>>) {
    let mut map = BTreeMap::new();
    let mut inodes: HashMap<u64, Vec<String>> = HashMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let p = root.join(&rel);
        let md = std::fs::symlink_metadata(&p).unwrap();
        let ft = md.file_type();
        let kind = if ft.is_dir() {
            "dir"
        } else if ft.is_symlink() {
            "symlink"
        } else if ft.is_file() {
            "file"
        } else if ft.is_char_device() {
            "char"
        } else if ft.is_block_device() {
            "block"
        } else if ft.is_fifo() {
            "fifo"
        } else {
            "other"
        };
        let key = format!("/{}", rel.display());
        if ft.is_file() && md.nlink() > 1 {
            inodes.entry(md.ino()).or_default().push(key.clone());
        }
        map.insert(
            key,
            Entry {
                kind,
                mode: md.mode() & 0o7777,
                uid: md.uid(),
                gid: md.gid(),
                size: if ft.is_file() { md.len() } else { 0 },
                mtime: (!ft.is_dir()).then(|| md.mtime()),
                content: ft.is_file().then(|| hex::encode(Sha256::digest(std::fs::read(&p).unwrap()))),
                link: ft.is_symlink().then(|| std::fs::read_link(&p).unwrap().display().to_string()),
                rdev: md.rdev(),
                xattrs: xattrs(&p),
            },
        );
        if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(rel.join(e.unwrap().file_name()));
            }
        }
    }
    let groups = inodes
        .into_values()
        .map(|mut v| {
            v.sort();
            v
        })
        .collect();
    (map, groups)
}

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
        .map(|l| {
            let hex = l["digest"].as_str().unwrap().strip_prefix("sha256:").unwrap().to_string();
            root.path().join("layers/sha256").join(hex).join("fs")
        })
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
    let differing: Vec<_> = ours
        .keys()
        .chain(theirs.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| k.as_str() != "/" && ours.get(*k) != theirs.get(*k))
        .map(|k| format!("{k}:\n  lazylayer {:?}\n  umoci     {:?}", ours.get(k), theirs.get(k)))
        .collect();
    assert!(differing.is_empty(), "{} paths differ:\n{}", differing.len(), differing.join("\n"));
    assert_eq!(our_links, their_links, "hardlink groups differ");

    // And the image really exercises what we claim it does.
    assert!(ours.contains_key("/data/keep/a.txt"));
    assert!(!ours.contains_key("/data/keep/b.txt"), "whiteout applied");
    assert!(!ours.contains_key("/data/gone"), "directory whiteout applied");
    assert!(ours.contains_key("/data/opq/new.txt") && !ours.contains_key("/data/opq/old1.txt"), "opaque dir applied");
    assert!(!our_links.is_empty(), "image has hardlinks");
    assert!(ours.values().any(|e| e.xattrs.contains_key("user.lazylayer")), "image has an xattr");
    assert!(ours.values().any(|e| e.kind == "char"), "image has a device node");
    assert!(ours.values().any(|e| e.mode & 0o4000 != 0), "image has a setuid file");
}
