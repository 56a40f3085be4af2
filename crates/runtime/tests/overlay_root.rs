//! Kernel overlayfs mounts, alone and as a container's root. Needs root.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};

use common::{have_root, make_busybox_rootfs, TestEnv};
use lazylayer_runtime::{write_bundle, OverlayMount, RunSpec, Stdio};

fn mounted(target: &Path) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let target = target.to_str().unwrap();
    // Field 5 is the mount point.
    info.lines().any(|l| l.split(' ').nth(4) == Some(target))
}

#[test]
fn root_container_writes_land_in_upper() {
    if !have_root("root_container_writes_land_in_upper") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lower = dir.path().join("lower");
    make_busybox_rootfs(&lower);
    let (upper, work, merged) = (
        dir.path().join("upper"),
        dir.path().join("work"),
        dir.path().join("merged"),
    );
    for d in [&upper, &work, &merged] {
        std::fs::create_dir(d).unwrap();
    }
    let overlay =
        OverlayMount::mount(std::slice::from_ref(&lower), &upper, &work, &merged).unwrap();
    assert!(mounted(&merged));
    assert_eq!(overlay.target(), merged);

    let runc = lazylayer_runtime::Runc::new(dir.path().join("runc"));
    let mut s = RunSpec::new(
        TestEnv::id("overlay"),
        overlay.target(),
        common::image(&[
            "sh",
            "-c",
            "echo data > /newfile; cat /etc/group >/dev/null; echo ok",
        ]),
    );
    s.readonly_rootfs = false;
    let bundle = dir.path().join("bundle");
    write_bundle(&s, &bundle).unwrap();
    let mut c = runc.start(&s.id, &bundle, Stdio::Piped).unwrap();
    let mut out = String::new();
    c.take_stdout().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(c.wait().unwrap(), 0);
    assert_eq!(out, "ok\n");
    drop(c);

    assert_eq!(
        std::fs::read_to_string(upper.join("newfile")).unwrap(),
        "data\n"
    );
    assert!(!lower.join("newfile").exists(), "lower was written");
    drop(overlay);
    assert!(!mounted(&merged), "overlay still mounted after drop");
    assert!(!merged.join("bin").exists());
}

#[test]
fn root_readonly_overlay_stacks_lowers_top_first() {
    if !have_root("root_readonly_overlay_stacks_lowers_top_first") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let top: PathBuf = dir.path().join("top");
    let bottom: PathBuf = dir.path().join("bottom");
    let target = dir.path().join("view");
    for d in [&top, &bottom, &target] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(top.join("shared"), "top").unwrap();
    std::fs::write(bottom.join("shared"), "bottom").unwrap();
    std::fs::write(bottom.join("only-bottom"), "b").unwrap();

    let view = OverlayMount::readonly(&[top.clone(), bottom.clone()], &target).unwrap();
    assert_eq!(
        std::fs::read_to_string(target.join("shared")).unwrap(),
        "top"
    );
    assert!(target.join("only-bottom").exists());
    let err = std::fs::write(target.join("new"), "x").unwrap_err();
    assert_eq!(
        err.raw_os_error(),
        Some(rustix::io::Errno::ROFS.raw_os_error())
    );
    drop(view);
    assert!(!mounted(&target));

    // A single lower is a read-only bind, still unmounted on drop.
    let view = OverlayMount::readonly(std::slice::from_ref(&bottom), &target).unwrap();
    assert!(target.join("only-bottom").exists());
    assert!(std::fs::write(target.join("new"), "x").is_err());
    drop(view);
    assert!(!mounted(&target));
    assert!(!bottom.join("new").exists());
}

#[test]
fn root_busy_overlay_is_detached_on_drop() {
    if !have_root("root_busy_overlay_is_detached_on_drop") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (a, b, target) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("t"),
    );
    for d in [&a, &b, &target] {
        std::fs::create_dir(d).unwrap();
    }
    std::fs::write(a.join("f"), "x").unwrap();
    let view = OverlayMount::readonly(&[a, b], &target).unwrap();
    // An open file keeps the mount busy: a plain umount gets EBUSY.
    let open = std::fs::File::open(target.join("f")).unwrap();
    drop(view);
    assert!(!mounted(&target));
    drop(open);
}
