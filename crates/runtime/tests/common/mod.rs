//! A tiny real root file system (Debian's busybox-static) and a runc state dir per test.

#![allow(dead_code)] // each test binary uses a different part

use std::path::{Path, PathBuf};

use lazylayer_runtime::{RunSpec, Runc};
use oci_spec::image::{ConfigBuilder, ImageConfiguration, ImageConfigurationBuilder};

const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "sleep", "nc", "httpd", "ls", "pwd", "touch", "env", "true",
];

/// False (with the reason printed) when the test cannot run here.
pub fn have_root(test: &str) -> bool {
    lazylayer_testsupport::require_root(test, "runc, cgroups and mounts")
}

/// A temp dir holding `rootfs/` (busybox, passwd with root and app:1000, groups app:1000
/// and extra:2000 with member app) and `runc/` (runc's state root).
pub struct TestEnv {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub runc: Runc,
}

impl TestEnv {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        make_busybox_rootfs(&rootfs);
        let runc = Runc::new(dir.path().join("runc"));
        TestEnv { dir, rootfs, runc }
    }

    pub fn bundle(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("bundle-{name}"))
    }

    /// Container ids unique per test process, so parallel runs never collide.
    pub fn id(name: &str) -> String {
        format!("lltest-{name}-{}", std::process::id())
    }

    /// Ids runc still holds state for.
    pub fn runc_list(&self) -> Vec<String> {
        let out = std::process::Command::new("runc")
            .arg("--root")
            .arg(&self.runc.root)
            .args(["list", "-q"])
            .output()
            .unwrap();
        assert!(out.status.success(), "runc list: {out:?}");
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

pub fn make_busybox_rootfs(rootfs: &Path) {
    for d in ["bin", "etc", "tmp", "home/app"] {
        std::fs::create_dir_all(rootfs.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", rootfs.join("bin/busybox")).expect("busybox-static installed");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet)).unwrap();
    }
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/home/app:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        rootfs.join("etc/group"),
        "root:x:0:\napp:x:1000:\nextra:x:2000:app\n",
    )
    .unwrap();
}

pub fn image(cmd: &[&str]) -> ImageConfiguration {
    image_with(cmd, |c| c)
}

pub fn image_with(
    cmd: &[&str],
    edit: impl FnOnce(ConfigBuilder) -> ConfigBuilder,
) -> ImageConfiguration {
    let config = edit(
        ConfigBuilder::default()
            .cmd(cmd.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .env(vec!["FROM_IMAGE=yes".to_string()]),
    )
    .build()
    .unwrap();
    ImageConfigurationBuilder::default()
        .config(config)
        .build()
        .unwrap()
}

pub fn spec(env: &TestEnv, name: &str, cmd: &[&str]) -> RunSpec {
    RunSpec::new(TestEnv::id(name), &env.rootfs, image(cmd))
}
