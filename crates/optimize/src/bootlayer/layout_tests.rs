//! The boot layer's content beside the round trip in `tests`: which
//! entries it holds and as what, what is fetched first, reproducibility.

use std::io::Read;
use std::path::Path;

use lazylayer_fs::TraceRead;
use lazylayer_index::build_index;
use lazylayer_index::chunks::ChunkCompression;
use lazylayer_index::{BootIndex, DIGESTS_FILE_NAME, INDEX_FILE_NAME};

use super::{write_boot_layer, BootLayout};

const LAYOUT: BootLayout = BootLayout {
    chunk_size: 4096,
    compression: ChunkCompression::Gzip,
};

/// A root with a directory, two files, a symlink and a file left lazy.
fn root(dir: &Path) -> BootIndex {
    std::fs::create_dir_all(dir.join("app/data")).unwrap();
    std::fs::write(dir.join("app/main"), vec![7u8; 10_000]).unwrap();
    std::fs::write(dir.join("app/data/small"), "small").unwrap();
    std::os::unix::fs::symlink("main", dir.join("app/run")).unwrap();
    std::fs::write(dir.join("app/lazy"), "not at start").unwrap();
    build_index(&[("sha256:test".into(), dir.to_path_buf())]).unwrap()
}

fn at(index: &BootIndex, p: &str) -> u32 {
    index.lookup(p.as_bytes()).unwrap()
}

fn select(index: &BootIndex, paths: &[&str]) -> Vec<u32> {
    paths.iter().map(|p| at(index, p)).collect()
}

fn read(p: &str, offset: u64, len: u64) -> TraceRead {
    TraceRead {
        path: p.as_bytes().to_vec(),
        offset,
        len,
    }
}

/// (path, type, link name) of each tar entry of the blob, in order.
fn tar_entries(blob: &[u8]) -> Vec<(String, tar::EntryType, Option<String>)> {
    let mut tar = Vec::new();
    lazylayer_layer::decoder(blob, ChunkCompression::Gzip.into())
        .unwrap()
        .read_to_end(&mut tar)
        .unwrap();
    let mut a = tar::Archive::new(&tar[..]);
    a.entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e
                .link_name()
                .unwrap()
                .map(|l| l.to_string_lossy().into_owned());
            (
                e.path()
                    .unwrap()
                    .to_string_lossy()
                    .trim_end_matches('/')
                    .to_string(),
                e.header().entry_type(),
                link,
            )
        })
        .collect()
}

#[test]
fn the_layer_holds_the_index_then_the_selection_each_as_itself() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("root");
    let mut index = root(&src);
    let sel = select(
        &index,
        &["app", "app/run", "app/main", "app/data", "app/data/small"],
    );
    let out = tmp.path().join("boot");
    write_boot_layer(&mut index, &sel, &[], &src, &out, LAYOUT).unwrap();
    let entries = tar_entries(&std::fs::read(&out).unwrap());
    let got: Vec<(&str, tar::EntryType, Option<&str>)> = entries
        .iter()
        .map(|(p, t, l)| (p.as_str(), *t, l.as_deref()))
        .collect();
    assert_eq!(
        got,
        [
            (INDEX_FILE_NAME, tar::EntryType::Regular, None),
            // The untraced files' digests, apart from the index.
            (DIGESTS_FILE_NAME, tar::EntryType::Regular, None),
            ("app", tar::EntryType::Directory, None),
            ("app/run", tar::EntryType::Symlink, Some("main")),
            ("app/main", tar::EntryType::Regular, None),
            ("app/data", tar::EntryType::Directory, None),
            ("app/data/small", tar::EntryType::Regular, None),
        ]
    );
}

#[test]
fn only_the_selection_is_marked_in_boot_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("root");
    let mut index = root(&src);
    // Left from an earlier layout: cleared unless selected again.
    for e in index.entries.iter_mut() {
        e.in_boot = true;
    }
    let lazy_digest = index.entries[at(&index, "app/lazy") as usize].digest;
    assert!(lazy_digest.is_some());
    let sel = select(&index, &["app", "app/main", "app/data", "app/data/small"]);
    let out = tmp.path().join("boot");
    let layer = write_boot_layer(&mut index, &sel, &[], &src, &out, LAYOUT).unwrap();
    let in_boot: Vec<u32> = (0..index.entries.len() as u32)
        .filter(|&i| index.entries[i as usize].in_boot)
        .collect();
    let mut want = sel.clone();
    want.sort();
    assert_eq!(in_boot, want);
    // The untraced file's digest is kept, apart from the index.
    let lazy = at(&index, "app/lazy");
    assert_eq!(index.entries[lazy as usize].digest, None);
    assert!(index.external.as_ref().unwrap().holds(lazy));
    assert_eq!(layer.entries, 4);
    assert_eq!(layer.file_bytes, 10_000 + 5);
    assert_eq!(layer.digests.size, std::fs::metadata(&out).unwrap().len());
    // Work files beside the output are gone.
    let mut left: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["boot", "root"]);
}

#[test]
fn reads_of_lazy_files_past_their_end_or_of_unknown_paths_fetch_nothing_first() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("root");
    let mut index = root(&src);
    let sel = select(&index, &["app", "app/main"]);
    let reads = [
        read("app/lazy", 0, 12),
        read("app/main", 10_000, 100),
        read("app/gone", 0, 10),
    ];
    let out = tmp.path().join("boot");
    let layer = write_boot_layer(&mut index, &sel, &reads, &src, &out, LAYOUT).unwrap();
    assert!(index.boot.as_ref().unwrap().start.is_empty());
    assert_eq!(layer.start_chunks, 0);
    // Only the index region is fetched before the start.
    assert_eq!(layer.start_bytes, layer.region.0);
    assert!(layer.chunks >= 3, "{} chunks", layer.chunks);
}

#[test]
fn a_read_near_a_file_end_is_clipped_to_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("root");
    let mut index = root(&src);
    let sel = select(&index, &["app", "app/main", "app/data", "app/data/small"]);
    // The last 10 bytes of main, asked as 1 MB: only the chunk(s) holding them.
    let out = tmp.path().join("boot");
    let reads = [read("app/main", 9_990, 1 << 20)];
    write_boot_layer(&mut index, &sel, &reads, &src, &out, LAYOUT).unwrap();
    let boot = index.boot.as_ref().unwrap();
    let off = boot.file_offset(at(&index, "app/main")).unwrap();
    let want: Vec<u32> = boot.chunks_covering(off + 9_990, 10).collect();
    assert_eq!(boot.start, want);
    assert!(!want.is_empty() && want.len() < boot.chunks.len());
}

#[test]
fn the_same_trace_writes_the_same_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("root");
    let index = root(&src);
    let sel = select(&index, &["app", "app/main", "app/run"]);
    let reads = [read("app/main", 0, 100)];
    let mut digests = Vec::new();
    for name in ["one", "two"] {
        let mut index = index.clone();
        let out = tmp.path().join(name);
        let layer = write_boot_layer(&mut index, &sel, &reads, &src, &out, LAYOUT).unwrap();
        digests.push((layer.digests.digest, layer.digests.diff_id, layer.region));
    }
    assert_eq!(digests[0], digests[1]);
    // Another order is another layer.
    let mut index = index.clone();
    let other = select(&index, &["app", "app/run", "app/main"]);
    let out = tmp.path().join("three");
    let layer = write_boot_layer(&mut index, &other, &reads, &src, &out, LAYOUT).unwrap();
    assert_ne!(layer.digests.diff_id, digests[0].1);
}
