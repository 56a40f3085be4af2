//! Full listings of root file systems, to compare two of them file for file.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: &'static str,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub mtime: Option<i64>,
    pub content: Option<String>,
    pub link: Option<String>,
    pub rdev: u64,
    pub xattrs: BTreeMap<String, Vec<u8>>,
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
pub fn snapshot(root: &Path) -> (BTreeMap<String, Entry>, BTreeSet<Vec<String>>) {
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
                content: ft
                    .is_file()
                    .then(|| hex::encode(Sha256::digest(std::fs::read(&p).unwrap()))),
                link: ft
                    .is_symlink()
                    .then(|| std::fs::read_link(&p).unwrap().display().to_string()),
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

/// Paths whose entries differ between two snapshots (the root dir itself excluded).
pub fn differences(a: &BTreeMap<String, Entry>, b: &BTreeMap<String, Entry>) -> Vec<String> {
    a.keys()
        .chain(b.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| k.as_str() != "/" && a.get(*k) != b.get(*k))
        .map(|k| format!("{k}:\n  left  {:?}\n  right {:?}", a.get(k), b.get(k)))
        .collect()
}
