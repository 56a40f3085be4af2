//! What a trace puts into the boot layer, over an index of real files.

use std::path::Path;

use lazylayer_fs::{Access, TraceEvent};
use lazylayer_index::{build_index, BootIndex};

use super::select_boot_entries;

/// One layer: `bin/` (sh, a symlink to it), `etc/conf`, `lib/a.so` and
/// its hardlink `lib/b.so`, `usr/share/doc/` (a deep directory).
fn image(root: &Path) -> BootIndex {
    for d in ["bin", "etc", "lib", "usr/share/doc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("bin/sh"), "shell").unwrap();
    std::os::unix::fs::symlink("sh", root.join("bin/bash")).unwrap();
    std::fs::write(root.join("etc/conf"), "key=value").unwrap();
    std::fs::write(root.join("lib/a.so"), "library").unwrap();
    std::fs::hard_link(root.join("lib/a.so"), root.join("lib/b.so")).unwrap();
    std::fs::write(root.join("usr/share/doc/README"), "docs").unwrap();
    build_index(&[("sha256:test".into(), root.to_path_buf())]).unwrap()
}

fn ev(path: &str, access: Access) -> TraceEvent {
    TraceEvent {
        path: path.as_bytes().to_vec(),
        access,
    }
}

fn paths(index: &BootIndex, sel: &[u32]) -> Vec<String> {
    sel.iter()
        .map(|&i| String::from_utf8(index.entries[i as usize].path.clone()).unwrap())
        .collect()
}

fn selected(events: &[TraceEvent]) -> Vec<String> {
    let tmp = tempfile::tempdir().unwrap();
    let index = image(tmp.path());
    paths(&index, &select_boot_entries(&index, events))
}

#[test]
fn an_opened_file_comes_after_every_ancestor_directory() {
    assert_eq!(
        selected(&[ev("usr/share/doc/README", Access::Open)]),
        ["usr", "usr/share", "usr/share/doc", "usr/share/doc/README"]
    );
}

#[test]
fn a_file_only_looked_up_stays_out_but_looked_up_links_and_dirs_go_in() {
    assert_eq!(
        selected(&[ev("etc/conf", Access::Lookup)]),
        Vec::<String>::new()
    );
    assert_eq!(
        selected(&[
            ev("etc/conf", Access::Lookup),
            ev("bin/bash", Access::Lookup),
            ev("usr/share", Access::Readdir),
        ]),
        ["bin", "bin/bash", "usr", "usr/share"]
    );
    // The link's target is its own entry: in only once opened itself.
    assert_eq!(
        selected(&[ev("bin/bash", Access::Readlink), ev("bin/sh", Access::Open)]),
        ["bin", "bin/bash", "bin/sh"]
    );
}

#[test]
fn missing_and_unknown_paths_select_nothing() {
    assert_eq!(
        selected(&[
            ev("etc/nope", Access::Missing),
            ev("etc", Access::Missing),
            ev("not/in/the/image", Access::Open),
        ]),
        Vec::<String>::new()
    );
}

#[test]
fn opening_one_name_of_a_hardlink_group_brings_the_whole_group() {
    let mut got = selected(&[ev("lib/b.so", Access::Open)]);
    assert_eq!(got.remove(0), "lib");
    got.sort();
    assert_eq!(got, ["lib/a.so", "lib/b.so"]);
}

#[test]
fn entries_come_in_first_access_order_and_once() {
    assert_eq!(
        selected(&[
            ev("etc/conf", Access::Open),
            ev("bin/sh", Access::Open),
            ev("etc/conf", Access::Open),
            ev("etc", Access::Readdir),
            ev("bin", Access::Lookup),
        ]),
        ["etc", "etc/conf", "bin", "bin/sh"]
    );
}

#[test]
fn the_root_directory_is_never_an_entry_of_the_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let index = image(tmp.path());
    let sel = select_boot_entries(
        &index,
        &[ev("", Access::Readdir), ev("bin/sh", Access::Open)],
    );
    assert!(!sel.contains(&0), "{sel:?}");
    assert_eq!(paths(&index, &sel), ["bin", "bin/sh"]);
}
