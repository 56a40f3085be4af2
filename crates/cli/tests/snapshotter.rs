//! `lazylayer snapshotter` behind the real containerd 1.6 (proxy plugin):
//! pulls, runs, snapshot commands and restarts through `ctr`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `lazylayer snapshotter` as a child process, killed on drop.
struct Snapshotterd {
    root: PathBuf,
    sock: PathBuf,
    child: Option<Child>,
    /// Extra environment of the snapshotter (and so of its holder).
    env: Vec<(String, String)>,
    /// Extra arguments of `lazylayer snapshotter`.
    args: Vec<String>,
}

impl Snapshotterd {
    fn start(root: &Path) -> Snapshotterd {
        Snapshotterd::start_with_env(root, &[])
    }

    fn start_with_env(root: &Path, env: &[(&str, &str)]) -> Snapshotterd {
        Snapshotterd::start_with(root, env, &[])
    }

    /// With `env` in its environment and `args` after `snapshotter`.
    fn start_with(root: &Path, env: &[(&str, &str)], args: &[&str]) -> Snapshotterd {
        let mut s = Snapshotterd {
            root: root.to_path_buf(),
            sock: root.join("snapshotter.sock"),
            child: None,
            env: (env.iter())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            args: args.iter().map(|a| a.to_string()).collect(),
        };
        s.spawn();
        s
    }

    /// A snapshotter (with `env`) that also serves the CRI image service
    /// on `<root>/cri-image.sock`, forwarding to `<root>/containerd.sock`:
    /// a link to the containerd that starts after it ([`Self::link`]).
    fn start_with_image_service(root: &Path, env: &[(&str, &str)]) -> Snapshotterd {
        let proxy = root.join("cri-image.sock").display().to_string();
        let containerd = root.join("containerd.sock").display().to_string();
        Snapshotterd::start_with(
            root,
            env,
            &[
                "--image-service-address",
                &proxy,
                "--containerd-address",
                &containerd,
            ],
        )
    }

    /// Where the image service proxy forwards to: `cd`; returns the
    /// proxy's socket.
    fn link(&self, cd: &Containerd) -> PathBuf {
        std::os::unix::fs::symlink(cd.socket(), self.root.join("containerd.sock")).unwrap();
        self.root.join("cri-image.sock")
    }

    fn log_path(&self) -> PathBuf {
        self.root.join("snapshotter.log")
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(&self.root)
            .arg("snapshotter")
            .arg("--address")
            .arg(&self.sock)
            .args(&self.args)
            .env("RUST_LOG", "lazylayer_containerd=debug,info,fuser=off")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&self.sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "snapshotter did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// SIGKILL: the harshest restart, nothing flushed on the way out.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGTERM and wait: a graceful stop (an upgrade's first half).
    fn stop_gracefully(&mut self) {
        if let Some(mut c) = self.child.take() {
            send_signal(c.id(), rustix::process::Signal::TERM);
            let code = wait_exit(&mut c, Duration::from_secs(30));
            assert_eq!(code, Some(0), "graceful stop: {}", self.log());
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The descriptor holder's PID, if one runs.
    fn holder_pid(&self) -> Option<u32> {
        let p = self.root.join("snapshotter/holder.pid");
        let pid: u32 = std::fs::read_to_string(p).ok()?.trim().parse().ok()?;
        std::path::Path::new(&format!("/proc/{pid}"))
            .exists()
            .then_some(pid)
    }

    fn proxy_toml(&self) -> String {
        format!(
            "[proxy_plugins.lazylayer]\n  type = \"snapshot\"\n  address = \"{}\"\n",
            self.sock.display()
        )
    }

    /// [`Snapshotterd::proxy_toml`] for `stack`, as docs/install.md gives
    /// it. containerd 2.1 pulls through its Transfer Service (ctr's default,
    /// and the CRI's unless `disable_snapshot_annotations = false`), which
    /// unpacks only for a configured (platform, snapshotter) pair
    /// (containerd#11606: "no unpack platforms defined" otherwise; overlayfs
    /// kept for pulls that name no snapshotter), and passes the image's
    /// names to a proxy snapshotter only when it exports
    /// `enable_remote_snapshot_annotations` (without it the CRI pull below
    /// was seen fetching every layer).
    fn proxy_toml_on(&self, stack: Stack) -> String {
        match stack {
            Stack::Bookworm => self.proxy_toml(),
            Stack::Sid => format!(
                "{}  [proxy_plugins.lazylayer.exports]\n    enable_remote_snapshot_annotations = \"true\"\n\
                 [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"lazylayer\"\n\
                 [[plugins.\"io.containerd.transfer.v1.local\".unpack_config]]\n  platform = \"linux/amd64\"\n  snapshotter = \"overlayfs\"\n",
                self.proxy_toml()
            ),
        }
    }
}

impl Drop for Snapshotterd {
    fn drop(&mut self) {
        self.kill();
        unmount_below(&self.root);
        // The holder keeps what the killed snapshotter left; it exits once
        // the mounts are gone, and is stopped here in any case.
        if let Some(pid) = self.holder_pid() {
            send_signal(pid, rustix::process::Signal::KILL);
        }
        if std::thread::panicking() {
            eprintln!("--- snapshotter log ---\n{}", self.log());
        }
    }
}

fn skip_reason() -> Option<&'static str> {
    if !is_root() {
        return Some("needs root (containerd, mounts)");
    }
    for tool in ["containerd", "ctr", "runc"] {
        if Command::new(tool).arg("--version").output().is_err() {
            return Some("containerd, ctr or runc is not installed");
        }
    }
    None
}

/// True (after saying why) when this machine cannot run these tests; under
/// CI that is a failure instead, since a silent skip would pass as green.
fn cannot_run() -> bool {
    skip_reason().is_some_and(lazylayer_testsupport::skip_because)
}

/// `ctr` with retries: after a snapshotter restart containerd's gRPC client
/// reconnects with backoff, and the first calls may fail as unavailable.
fn ctr_retry(cd: &Containerd, args: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = cd.ctr().args(args).output().unwrap();
        if out.status.success() {
            return String::from_utf8(out.stdout).unwrap();
        }
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(
            Instant::now() < deadline,
            "ctr {args:?} kept failing: {err}"
        );
        eprintln!("ctr {args:?} failed, retrying: {err}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Snapshot lines of `ctr snapshots ls` as (key, parent, kind).
fn snapshots_ls(cd: &Containerd) -> Vec<(String, String, String)> {
    cd.ok(&["snapshots", "--snapshotter", "lazylayer", "ls"])
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.as_slice() {
                [k, kind] => (k.to_string(), String::new(), kind.to_string()),
                [k, p, kind] => (k.to_string(), p.to_string(), kind.to_string()),
                _ => panic!("unexpected ctr snapshots ls line {l:?}"),
            }
        })
        .collect()
}

/// Each test named here runs once per stack: `NAME::bookworm` (the
/// host's containerd 1.6) and `NAME::sid` (containerd 2.1, scripts/stack.sh),
/// never both at once: the two containerds share the host's cgroups, where
/// ctr names a container's cgroup by namespace and ID, and one test's IDs
/// are the same on both (and so, across tests, container IDs differ).
macro_rules! on_each_stack {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());
            fn on(stack: lazylayer_testsupport::Stack) {
                let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
                super::$name(stack)
            }
            #[test]
            fn bookworm() {
                on(lazylayer_testsupport::Stack::Bookworm)
            }
            #[test]
            fn sid() {
                on(lazylayer_testsupport::Stack::Sid)
            }
        }
    )*};
}

on_each_stack!(
    plain_image_pull_run_snapshot_commands_and_restart,
    containerd_pull_registers_an_optimized_image_lazily,
    cri_pull_of_an_optimized_image_fetches_no_original_layer,
    snapshotter_restarts_keep_a_running_lazy_container_serving,
    a_new_container_on_an_image_local_whole_gets_the_stores_layers_without_fuse,
    snapshotter_gone_for_good_gives_readers_an_error_after_the_orphan_timeout,
    prefetch_stops_when_the_last_container_of_an_image_ends,
    prefetch_cut_by_a_containers_end_is_resumed_by_the_next_start,
    cri_pod_of_an_optimized_image_starts_lazily,
    cri_pod_of_an_unchanged_image_starts_lazily_from_its_attached_boot_layer,
    cri_pull_secrets_open_their_own_image_lazily,
    cri_pull_through_a_mirror_is_lazy_from_the_mirror,
);

/// False (after saying why) when `stack` cannot run these tests here; under
/// CI that is a failure instead.
fn stack_ready(stack: Stack, test: &str) -> bool {
    !cannot_run() && stack.ready(test)
}

fn plain_image_pull_run_snapshot_commands_and_restart(stack: Stack) {
    if !stack_ready(stack, "plain_image_pull_run_snapshot_commands_and_restart") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let image = image_ref(&reg, "busybox");
    let root = stack.tempdir();
    let mut sn = Snapshotterd::start(root.path());
    let cd = Containerd::start_on(stack, &sn.proxy_toml_on(stack));

    // (a) Pull (Prepare + Commit of each layer) and run (Prepare, Mounts, Remove).
    cd.ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazylayer",
        &image,
    ]);
    let out = cd.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &image,
        "c1",
        "sh",
        "-c",
        // One write of the whole output: ctr (1.6) was seen, once in a CI
        // run, to lose the second of two writes of a container that exits at
        // once ("written" missing, exit code 0).
        "echo written > /tmp/f; printf '%s\\n' 'hello from lazylayer' \"$(cat /tmp/f)\"",
    ]);
    assert_eq!(out.replace('\r', ""), "hello from lazylayer\nwritten\n");
    // The layer was unpacked into a directory of ours, by containerd.
    let meta = std::fs::read_to_string(root.path().join("snapshotter/metadata.json")).unwrap();
    assert!(meta.contains("\"committed\""), "{meta}");

    // (b) ctr snapshots ls / info / prepare / mounts / rm.
    let snaps = snapshots_ls(&cd);
    let (top, _, kind) = snaps
        .iter()
        .find(|(_, _, k)| k == "Committed")
        .cloned()
        .unwrap_or_else(|| panic!("no committed snapshot in {snaps:?}"));
    assert_eq!(kind, "Committed");
    let info = cd.ok(&["snapshots", "--snapshotter", "lazylayer", "info", &top]);
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["Kind"], "Committed", "{info}");
    assert_eq!(info["Name"], top.as_str());

    cd.ok(&[
        "snapshots",
        "--snapshotter",
        "lazylayer",
        "prepare",
        "scratch",
        &top,
    ]);
    let mounts = cd.ok(&[
        "snapshots",
        "--snapshotter",
        "lazylayer",
        "mounts",
        "/mnt",
        "scratch",
    ]);
    assert!(
        mounts.contains("overlay") && mounts.contains("lowerdir="),
        "{mounts}"
    );
    let usage = cd.ok(&[
        "snapshots",
        "--snapshotter",
        "lazylayer",
        "usage",
        "scratch",
    ]);
    assert!(usage.contains("scratch"), "{usage}");
    assert!(snapshots_ls(&cd)
        .iter()
        .any(|(k, p, kind)| k == "scratch" && p == &top && kind == "Active"));
    // A parent with a child cannot go.
    let out = cd
        .ctr()
        .args(["snapshots", "--snapshotter", "lazylayer", "rm", &top])
        .output()
        .unwrap();
    assert!(!out.status.success(), "removing a parent must fail");
    cd.ok(&["snapshots", "--snapshotter", "lazylayer", "rm", "scratch"]);
    assert!(!snapshots_ls(&cd).iter().any(|(k, _, _)| k == "scratch"));

    // (c) A restarted snapshotter keeps its metadata: the image still runs.
    sn.restart();
    let out = ctr_retry(
        &cd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazylayer",
            &image,
            "c2",
            "echo",
            "after restart",
        ],
    );
    assert_eq!(out.replace('\r', ""), "after restart\n");
    let info = ctr_retry(
        &cd,
        &["snapshots", "--snapshotter", "lazylayer", "info", &top],
    );
    assert!(info.contains("Committed"), "{info}");
    drop(cd);
}

/// The labels containerd's unpacker puts on a layer's Prepare when the
/// CRI's snapshot annotations are on: the target chain and the image,
/// manifest and layer it unpacks.
fn cri_layer_labels(
    target: &str,
    image: &str,
    manifest: &str,
    layer: &str,
) -> std::collections::HashMap<String, String> {
    [
        ("containerd.io/snapshot.ref", target),
        ("containerd.io/snapshot/cri.image-ref", image),
        ("containerd.io/snapshot/cri.manifest-digest", manifest),
        ("containerd.io/snapshot/cri.layer-digest", layer),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// The remote path through the snapshotter's own gRPC API, as containerd's
/// metadata layer drives it when the CRI labels are present: every layer of
/// an optimized image is claimed (AlreadyExists, committed, no directory),
/// a container on the top layer gets an overlay on the image's lazy root,
/// and a plain image's layer is an ordinary active snapshot.
#[test]
fn optimized_layers_are_claimed_remotely_and_mounted_lazily() {
    use lazylayer_containerd::proto::snapshots::{self as pb, snapshots_client::SnapshotsClient};
    use std::collections::HashMap;

    if cannot_run() {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (opt_root, src, dst) = optimize_image(&reg, "multilayer", &[]);
    let (manifest, opt_layers) = layer_digests(opt_root.path(), &dst);
    let (plain_manifest, plain_layers) = layer_digests(opt_root.path(), &src);
    assert!(opt_layers.len() >= 3, "{opt_layers:?}");

    // Registry requests from here on are the snapshotter's (optimize pulled SRC).
    let log_start = reg.log().len();
    let gets_since = |digest: &str| {
        reg.log()[log_start..]
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .count()
    };
    let root = tempfile::tempdir().unwrap();
    let sn = Snapshotterd::start(root.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut client = rt.block_on(async {
        SnapshotsClient::new(lazylayer_containerd::grpc::connect(&sn.sock).await.unwrap())
    });
    let labels = cri_layer_labels;
    let prepare = |client: &mut SnapshotsClient<_>, key: &str, parent: &str, labels| {
        rt.block_on(client.prepare(pb::PrepareSnapshotRequest {
            snapshotter: "lazylayer".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        }))
    };

    // Claim every layer, bottom first, as containerd's unpacker would.
    let parent_of = |i: usize| format!("chain-{i}");
    let mut parent = String::new();
    for (i, layer) in opt_layers.iter().enumerate() {
        let target = parent_of(i);
        let err = prepare(
            &mut client,
            &format!("extract-{i}"),
            &parent,
            labels(&target, &dst, &manifest, layer),
        )
        .expect_err("an optimized image's layer must be claimed");
        assert_eq!(
            err.code(),
            lazylayer_containerd::tonic::Code::AlreadyExists,
            "{err:?}"
        );
        let info = rt
            .block_on(client.stat(pb::StatSnapshotRequest {
                snapshotter: "lazylayer".into(),
                key: target.clone(),
            }))
            .unwrap()
            .into_inner()
            .info
            .unwrap();
        assert_eq!(info.kind, pb::Kind::Committed as i32);
        assert_eq!(info.parent, parent);
        assert_eq!(info.labels["containerd.io/snapshot.ref"], target);
        parent = target;
    }
    // Only manifest, config and the boot layer came from the registry (the
    // boot layer by ranges: its index, then its chunks).
    let boot = opt_layers.last().unwrap();
    assert!(gets_since(boot) >= 1);
    for l in &opt_layers[..opt_layers.len() - 1] {
        assert_eq!(gets_since(l), 0, "layer {l} fetched before any container");
    }

    // A snapshot on a layer *below* the boot layer, as when a plain image
    // sharing those layers is unpacked after the optimized one (containerd
    // finds their chain committed): served by the layers' extracted trees in
    // the store, fetched in full then (and not again by the lazy root's prefetch).
    let below = &parent_of(opt_layers.len() - 2);
    let mounts = prepare(&mut client, "below", below, HashMap::new())
        .expect("a snapshot below the boot layer")
        .into_inner()
        .mounts;
    assert_eq!(mounts[0].r#type, "overlay", "{mounts:?}");
    let lowerdir = mounts[0]
        .options
        .iter()
        .find_map(|o| o.strip_prefix("lowerdir="))
        .unwrap();
    let lowers: Vec<&str> = lowerdir.split(':').collect();
    assert_eq!(lowers.len(), opt_layers.len() - 1, "{lowerdir}");
    for (l, digest) in lowers.iter().rev().zip(&opt_layers) {
        assert_eq!(
            Path::new(l),
            stored_layer(root.path(), digest).join("fs"),
            "lowers are the store's layers, top first"
        );
    }
    for l in &opt_layers[..opt_layers.len() - 1] {
        assert_eq!(gets_since(l), 1, "layer {l} fetched once, in full");
    }
    let target = root.path().join("rootfs");
    std::fs::create_dir(&target).unwrap();
    let (out, m) = overlay_chroot(
        &mounts[0].options,
        &target,
        "cat /data/keep/a.txt; ls /data/opq",
    );
    let below_view = out.stdout;
    drop(m);
    rt.block_on(client.remove(pb::RemoveSnapshotRequest {
        snapshotter: "lazylayer".into(),
        key: "below".into(),
    }))
    .unwrap();

    // A container on the top layer: an overlay whose lower is the lazy root.
    let mounts = prepare(&mut client, "ctr", &parent, HashMap::new())
        .unwrap()
        .into_inner()
        .mounts;
    let lazy = root
        .path()
        .join("snapshotter/lazy")
        .join(manifest.strip_prefix("sha256:").unwrap());
    assert_eq!(mounts.len(), 1);
    assert_eq!(mounts[0].r#type, "overlay");
    assert!(
        mounts[0]
            .options
            .contains(&format!("lowerdir={}", lazy.display())),
        "{mounts:?}"
    );
    assert!(mounts_below(&lazy).len() == 1, "the lazy root is mounted");
    // The image's own command reads through the lazy root (files of lower
    // layers arrive on demand) and writes go to the upper dir.
    let (out, m) = overlay_chroot(
        &mounts[0].options,
        &target,
        "cat /data/keep/a.txt; ls /data/opq; echo x > /new",
    );
    assert!(!out.stdout.is_empty());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&below_view),
        "the lazy root shows what the layers below the boot layer hold"
    );
    assert!(target.join("new").exists());
    drop(m);
    rt.block_on(client.remove(pb::RemoveSnapshotRequest {
        snapshotter: "lazylayer".into(),
        key: "ctr".into(),
    }))
    .unwrap();
    assert!(
        mounts_below(&lazy).is_empty(),
        "the lazy root goes with its last user"
    );

    // A plain image's layer is prepared normally (containerd then applies it).
    let mounts = prepare(
        &mut client,
        "plain-extract",
        "",
        labels("plain-0", &src, &plain_manifest, &plain_layers[0]),
    )
    .expect("a plain layer gets an active snapshot")
    .into_inner()
    .mounts;
    assert_eq!(mounts[0].r#type, "bind");
}

/// The optimized python3 in a registry, and a snapshotter and a containerd
/// of `stack` using it (nothing pulled yet).
struct OptimizedOn {
    reg: Registry,
    opt_root: tempfile::TempDir,
    src: String,
    dst: String,
    root: tempfile::TempDir,
    sn: Snapshotterd,
    cd: Containerd,
}

impl OptimizedOn {
    fn python3(stack: Stack) -> OptimizedOn {
        let reg = Registry::start();
        push_images(&reg, &["python3"]);
        let (opt_root, src, dst) = optimize_image(&reg, "python3", &[]);
        let root = stack.tempdir();
        let sn = Snapshotterd::start(root.path());
        let cd = Containerd::start_on(stack, &sn.proxy_toml_on(stack));
        OptimizedOn {
            reg,
            opt_root,
            src,
            dst,
            root,
            sn,
            cd,
        }
    }
}

/// `lazylayer containerd pull` registers an optimized image in containerd
/// through containerd's own API: manifest and config in its content store,
/// every layer claimed by the snapshotter (AlreadyExists, recorded committed
/// under its chain ID), the image record on top. `ctr run` then starts the
/// image's own command from the boot layer; nothing but the manifest, the
/// config and the boot layer came from the registry for the pull, and the
/// manifest and config only once: the snapshotter finds them in the store.
fn containerd_pull_registers_an_optimized_image_lazily(stack: Stack) {
    if !stack_ready(stack, "containerd_pull_registers_an_optimized_image_lazily") {
        return;
    }
    // Bound registry first: locals drop in reverse, containerd first.
    let OptimizedOn {
        reg,
        opt_root,
        src,
        dst,
        root,
        sn,
        cd,
    } = OptimizedOn::python3(stack);
    let (manifest, opt_layers) = layer_digests(opt_root.path(), &dst);
    let (_, src_layers) = layer_digests(opt_root.path(), &src);
    let boot = opt_layers.last().unwrap().clone();
    assert!(!src_layers.contains(&boot));

    // Registry requests from here on: the pull's and the snapshotter's.
    let log_start = reg.log().len();
    let gets_since = |digest: &str| {
        reg.log()[log_start..]
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .count()
    };
    let sock = cd.socket();
    let pull = |image: &str| -> serde_json::Value {
        let args = ["containerd", "pull", "--json", "--address"];
        let out = lazylayer_ok(
            root.path(),
            &[&args[..], &[sock.to_str().unwrap(), image]].concat(),
        );
        serde_json::from_str(&out).unwrap()
    };
    let rep = pull(&dst);
    let chains: Vec<String> = rep["chain_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert_eq!(chains.len(), opt_layers.len(), "{rep}");
    assert_eq!(rep["manifest_digest"], manifest.as_str(), "{rep}");

    // The pull fetched manifest and config (and the snapshotter the boot
    // layer, by ranges): no original layer.
    assert!(gets_since(&boot) >= 1, "the boot layer is fetched");
    for l in &src_layers {
        assert_eq!(gets_since(l), 0, "layer {l} fetched by the pull");
    }
    let config = rep["config_digest"].as_str().unwrap();
    assert!(gets_since(config) >= 1, "the config came from the registry");

    // containerd knows the image and the committed chain.
    let images = cd.ok(&["images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == dst), "{images}");
    let snaps = snapshots_ls(&cd);
    for (i, c) in chains.iter().enumerate() {
        let parent = if i == 0 { "" } else { chains[i - 1].as_str() };
        assert!(
            snaps
                .iter()
                .any(|(k, p, kind)| k == c && p == parent && kind == "Committed"),
            "chain {i} {c} not committed on {parent:?}: {snaps:?}"
        );
    }
    // Nothing was unpacked into a directory of ours.
    let meta = std::fs::read_to_string(root.path().join("snapshotter/metadata.json")).unwrap();
    assert!(!meta.contains("\"active\""), "{meta}");

    // The image's own command, from the lazy root.
    let out = cd.ok(&["run", "--rm", "--snapshotter", "lazylayer", &dst, "t1"]);
    assert_eq!(out.replace('\r', ""), "ok\n");
    // containerd itself fetched nothing (its requests carry its user agent);
    // any layer fetch is the snapshotter's lazy one.
    let log = reg.log()[log_start..].to_string();
    assert!(
        !log.lines().any(|l| l.contains("containerd/")),
        "containerd fetched from the registry:\n{log}"
    );
    // The snapshotter opened the image from the manifest and config the
    // pull kept in the store: the registry served each once (to the pull),
    // and no manifest by digest (on main, the snapshotter's open asked
    // for both again, two round trips before its first boot byte).
    assert_eq!(
        gets_since(config),
        1,
        "the config was fetched again:\n{log}"
    );
    let by_digest: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("/manifests/sha256:"))
        .collect();
    assert!(
        by_digest.is_empty(),
        "the manifest was fetched again: {by_digest:?}"
    );
    let lazy: Vec<(String, usize)> = src_layers
        .iter()
        .map(|l| (l.clone(), gets_since(l)))
        .collect();
    eprintln!("original layers fetched lazily during the run: {lazy:?}");
    assert!(
        sn.log().contains("claimed a layer as remote"),
        "{}",
        sn.log()
    );

    // Pulling again is idempotent (content and snapshots exist, image updated).
    lazylayer_ok(
        root.path(),
        &[
            "containerd",
            "pull",
            "--address",
            sock.to_str().unwrap(),
            &dst,
        ],
    );

    // A multi-platform reference: the image record targets the index, as
    // after containerd's own pull, and containerd finds this platform's
    // manifest (the one registered) through it.
    let multi = dst.replace(":boot", ":multi");
    let index = push_index(&multi, &manifest, &["linux/amd64", "linux/arm64"]);
    let rep = pull(&multi);
    assert_eq!(rep["index_digest"], index.as_str(), "{rep}");
    assert_eq!(rep["manifest_digest"], manifest.as_str(), "{rep}");
    let listed = cd.ok(&["images", "ls"]);
    let line = listed
        .lines()
        .find(|l| l.starts_with(&format!("{multi} ")))
        .unwrap_or_else(|| panic!("{multi} not listed: {listed}"));
    assert!(
        line.contains(&index) && line.contains("index"),
        "the record does not target the index: {line}"
    );
    let out = cd.ok(&["run", "--rm", "--snapshotter", "lazylayer", &multi, "t2"]);
    assert_eq!(out.replace('\r', ""), "ok\n");
    drop(cd);
}

/// Push, as `reference` (a tag), an OCI index that lists the manifest
/// `manifest` (already in the repository) once per platform; its digest.
fn push_index(reference: &str, manifest: &str, platforms: &[&str]) -> String {
    let (repo_url, tag) = {
        let (name, tag) = reference.rsplit_once(':').unwrap();
        let (host, repo) = name.split_once('/').unwrap();
        (
            format!("http://{host}/v2/{repo}/manifests"),
            tag.to_string(),
        )
    };
    let media_type = "application/vnd.oci.image.manifest.v1+json";
    let got = Command::new("curl")
        .args(["-sSf", "-H", &format!("Accept: {media_type}")])
        .arg(format!("{repo_url}/{manifest}"))
        .output()
        .unwrap();
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let manifests: Vec<serde_json::Value> = platforms
        .iter()
        .map(|p| {
            let (os, arch) = p.split_once('/').unwrap();
            serde_json::json!({
                "mediaType": media_type,
                "digest": manifest,
                "size": got.stdout.len(),
                "platform": {"os": os, "architecture": arch},
            })
        })
        .collect();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": manifests,
    }))
    .unwrap();
    let mut put = Command::new("curl")
        .args(["-sSf", "-X", "PUT", "-H"])
        .arg("Content-Type: application/vnd.oci.image.index.v1+json")
        .args(["--data-binary", "@-"])
        .arg(format!("{repo_url}/{tag}"))
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut put.stdin.take().unwrap(), &index).unwrap();
    let out = put.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lazylayer_sys::digest::sha256_digest_of(&index)
}

/// containerd 2.1's `ctr images pull --snapshotter lazylayer`, through its
/// Transfer Service with the configuration of docs/install.md: the proxy
/// plugin's exports hand the snapshotter the image's names, so it claims
/// every layer and containerd fetches manifest and config only; the image
/// then runs from the lazy root. (containerd 1.6's ctr passes no names:
/// there the same pull downloads every layer, docs/containerd.md.)
#[test]
fn ctr_pull_on_containerd_2_is_lazy() {
    let stack = Stack::Sid;
    if !stack_ready(stack, "ctr_pull_on_containerd_2_is_lazy") {
        return;
    }
    // Every field bound (one left to `..` would drop here), registry
    // first: locals drop in reverse, containerd first.
    let OptimizedOn {
        reg,
        opt_root,
        src,
        dst,
        root: _root,
        sn,
        cd,
    } = OptimizedOn::python3(stack);
    let (_, src_layers) = layer_digests(opt_root.path(), &src);
    let log_start = reg.log().len();
    cd.ok(&[
        "images",
        "pull",
        "--plain-http",
        "--snapshotter",
        "lazylayer",
        &dst,
    ]);
    let log = reg.log()[log_start..].to_string();
    for l in &src_layers {
        assert!(
            !log.lines()
                .any(|line| line.contains("containerd/") && line.contains(l.as_str())),
            "containerd fetched the original layer {l}:\n{log}"
        );
    }
    assert!(
        sn.log().contains("claimed a layer as remote"),
        "{}",
        sn.log()
    );
    let out = cd.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &dst,
        "ctr-pull-t1",
    ]);
    assert_eq!(out.replace('\r', ""), "ok\n");
}

/// Mount an overlay with containerd's `options` at `target` and run `script`
/// chrooted in it (it must succeed); the mount goes when the returned guard
/// is dropped.
fn overlay_chroot(options: &[String], target: &Path, script: &str) -> (Output, Mount) {
    let st = Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &options.join(",")])
        .arg(target)
        .status()
        .unwrap();
    assert!(st.success(), "mount {options:?}");
    let m = Mount(target.to_path_buf());
    let out = Command::new("chroot")
        .arg(target)
        .args(["/bin/sh", "-c", script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (out, m)
}

/// containerd config for the Kubernetes path: the CRI plugin unpacks into
/// lazylayer with the image's names on each Prepare (the labels that name
/// image, manifest and layer), and speaks plain HTTP to the loopback
/// registry. On containerd 1.6: snapshot annotations on, a mirror entry. On
/// 2.1: the Transfer Service's pull (the default), the proxy plugin's
/// exports and unpack_config ([`Snapshotterd::proxy_toml_on`]), and a
/// hosts.toml under `config_path` (the CRI's own mirror entries make 2.x
/// pull without the Transfer Service).
fn cri_toml(stack: Stack, sn: &Snapshotterd, reg: &Registry) -> String {
    cri_toml_for(stack, sn, &[reg])
}

/// [`cri_toml`] for several plain-HTTP registries.
fn cri_toml_for(stack: Stack, sn: &Snapshotterd, regs: &[&Registry]) -> String {
    match stack {
        Stack::Bookworm => {
            let mut toml = format!(
                "{}[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lazylayer\"\n  disable_snapshot_annotations = false\n",
                sn.proxy_toml()
            );
            for reg in regs {
                toml += &format!(
                    "[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"{addr}\"]\n  endpoint = [\"http://{addr}\"]\n",
                    addr = reg.addr()
                );
            }
            toml
        }
        Stack::Sid => {
            let certs = sn.root.join("certs.d");
            for reg in regs {
                let host = certs.join(reg.addr());
                std::fs::create_dir_all(&host).unwrap();
                std::fs::write(
                    host.join("hosts.toml"),
                    format!(
                        "server = \"http://{addr}\"\n[host.\"http://{addr}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
                        addr = reg.addr()
                    ),
                )
                .unwrap();
            }
            format!(
                "{}[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"lazylayer\"\n[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"{}\"\n",
                sn.proxy_toml_on(stack),
                certs.display()
            )
        }
    }
}

/// The CRI configuration of `stack` with the registry hosts in `certs`
/// (containerd's hosts.toml layout, `config_path`), as a node with mirrors
/// has it; the snapshotter reads the same directory (`--hosts-dir`).
fn cri_toml_with_hosts(stack: Stack, sn: &Snapshotterd, certs: &Path) -> String {
    let (proxy, images) = match stack {
        Stack::Bookworm => (
            sn.proxy_toml(),
            "[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"lazylayer\"\n  disable_snapshot_annotations = false\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n",
        ),
        Stack::Sid => (
            sn.proxy_toml_on(stack),
            "[plugins.\"io.containerd.cri.v1.images\"]\n  snapshotter = \"lazylayer\"\n[plugins.\"io.containerd.cri.v1.images\".registry]\n",
        ),
    };
    format!("{proxy}{images}  config_path = \"{}\"\n", certs.display())
}

/// Part 10's mirrors behind containerd: a node's hosts.toml names a mirror
/// for the image's registry; containerd resolves and pulls through it, and
/// the snapshotter (reading the same directory) fetches the boot bytes from
/// the mirror too. The registry named in the reference serves no layer to
/// anyone; the image runs.
fn cri_pull_through_a_mirror_is_lazy_from_the_mirror(stack: Stack) {
    if !stack_ready(stack, "cri_pull_through_a_mirror_is_lazy_from_the_mirror") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, opt_layers) = layer_digests(opt_root.path(), &dst);
    let boot = opt_layers.last().unwrap().clone();
    let mirror = Registry::start();
    lazylayer_ok(opt_root.path(), &["pull", &dst]);
    let on_mirror = dst.replace(&reg.addr(), &mirror.addr());
    lazylayer_ok(opt_root.path(), &["push", &dst, &on_mirror]);

    let root = stack.tempdir();
    let certs = root.path().join("certs.d");
    let host = certs.join(reg.addr());
    std::fs::create_dir_all(&host).unwrap();
    std::fs::write(
        host.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n[host.\"http://{m}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            reg.addr(),
            m = mirror.addr()
        ),
    )
    .unwrap();
    let certs_arg = certs.display().to_string();
    let sn = Snapshotterd::start_with(root.path(), &[], &["--hosts-dir", &certs_arg]);
    let cd = Containerd::start_cri_on(stack, &cri_toml_with_hosts(stack, &sn, &certs));
    let (from_reg, from_mirror) = (reg.log().len(), mirror.log().len());
    cri_pull_as(&cd.socket(), &dst, None)
        .unwrap_or_else(|e| panic!("{e:?}\n--- containerd ---\n{}", cd.log()));
    assert!(
        sn.log().contains("claimed a layer as remote"),
        "{}",
        sn.log()
    );
    let repo = "optimized/python3";
    let mirrored_by_us = served_gets(&mirror, from_mirror, repo, "lazylayer/");
    assert!(
        mirrored_by_us
            .iter()
            .any(|g| g.contains(&format!("/blobs/{boot}"))),
        "the snapshotter fetched no boot bytes from the mirror: {mirrored_by_us:?}"
    );
    assert!(
        !served_gets(&mirror, from_mirror, repo, "containerd/").is_empty(),
        "containerd did not resolve through the mirror"
    );
    let blobs_from_registry: Vec<String> = reg.log()[from_reg..]
        .lines()
        .filter(|l| l.contains("/blobs/") && l.contains("\"GET "))
        .map(str::to_string)
        .collect();
    for l in &opt_layers {
        assert!(
            !blobs_from_registry.iter().any(|g| g.contains(l.as_str())),
            "layer {l} came from the registry, not the mirror: {blobs_from_registry:?}"
        );
    }
    let out = cd.ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &dst,
        &format!("mirror-{}", stack.name()),
    ]);
    assert_eq!(out.replace('\r', ""), "ok\n");
}

/// `curl -sSf ARGS` with `body` on stdin; its stdout (it must succeed).
fn curl(args: &[&str], body: &[u8]) -> Vec<u8> {
    let mut c = Command::new("curl")
        .arg("-sSf")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut c.stdin.take().unwrap(), body).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "curl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A pod's sandbox ("pause") image made of the busybox test image whose
/// entrypoint sleeps: its config uploaded anew, its layers mounted from
/// busybox, pushed as `lazylayer/busybox:pause`. The CRI pulls it for every
/// pod (the kubelet's default, registry.k8s.io/pause, is out of reach here).
fn push_pause_image(reg: &Registry) -> String {
    let base = format!("http://{}/v2/lazylayer/busybox", reg.addr());
    let oci = "application/vnd.oci.image.manifest.v1+json";
    let manifest = curl(
        &[
            "-H",
            &format!("Accept: {oci}"),
            &format!("{base}/manifests/latest"),
        ],
        b"",
    );
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let config = curl(&[&format!("{base}/blobs/{config_digest}")], b"");
    let mut config: serde_json::Value = serde_json::from_slice(&config).unwrap();
    config["config"]["Entrypoint"] = serde_json::json!(["/bin/sleep", "1000000"]);
    config["config"]["Cmd"] = serde_json::Value::Null;
    let config = serde_json::to_vec(&config).unwrap();
    let digest = lazylayer_sys::digest::sha256_digest_of(&config);
    let headers = String::from_utf8(curl(
        &[
            "-X",
            "POST",
            "-D",
            "-",
            "-o",
            "/dev/null",
            &format!("{base}/blobs/uploads/"),
        ],
        b"",
    ))
    .unwrap();
    let location = headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location: ")
                .or_else(|| l.strip_prefix("location: "))
        })
        .unwrap()
        .trim()
        .to_string();
    let location = if location.starts_with('/') {
        format!("http://{}{location}", reg.addr())
    } else {
        location
    };
    let sep = if location.contains('?') { '&' } else { '?' };
    curl(
        &[
            "-X",
            "PUT",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            "@-",
            &format!("{location}{sep}digest={digest}"),
        ],
        &config,
    );
    manifest["config"]["digest"] = serde_json::json!(digest);
    manifest["config"]["size"] = serde_json::json!(config.len());
    curl(
        &[
            "-X",
            "PUT",
            "-H",
            &format!("Content-Type: {oci}"),
            "--data-binary",
            "@-",
            &format!("{base}/manifests/pause"),
        ],
        &serde_json::to_vec(&manifest).unwrap(),
    );
    format!("{}/lazylayer/busybox:pause", reg.addr())
}

/// The pod the kubelet would start for `image`: RunPodSandbox (host
/// network: no CNI here), CreateContainer of the image's own command,
/// StartContainer, then ContainerStatus until it exits. Returns its exit
/// code and its log (CRI format, under `logs`).
fn cri_pod(cd: &Containerd, image: &str, logs: &Path, name: &str) -> (i32, String) {
    use lazylayer_containerd::proto::cri::{
        runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
        ContainerState, ContainerStatusRequest, CreateContainerRequest, ImageSpec,
        LinuxPodSandboxConfig, LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption,
        PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
        StartContainerRequest, StopPodSandboxRequest,
    };
    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        log_directory: logs.display().to_string(),
        linux: Some(LinuxPodSandboxConfig {
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                }),
            }),
        }),
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fail = |what: &str, e: &dyn std::fmt::Debug| -> ! {
        panic!("CRI {what}: {e:?}\n--- containerd log ---\n{}", cd.log())
    };
    rt.block_on(async {
        let channel = lazylayer_containerd::grpc::connect(&cd.socket())
            .await
            .unwrap();
        let mut rs = RuntimeServiceClient::new(channel);
        let pod = rs
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| fail("RunPodSandbox", &e))
            .into_inner()
            .pod_sandbox_id;
        let id = rs
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "app".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.to_string(),
                        annotations: Default::default(),
                    }),
                    log_path: "app.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox.clone()),
            })
            .await
            .unwrap_or_else(|e| fail("CreateContainer", &e))
            .into_inner()
            .container_id;
        rs.start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .unwrap_or_else(|e| fail("StartContainer", &e));
        let deadline = Instant::now() + Duration::from_secs(60);
        let exit = loop {
            let st = rs
                .container_status(ContainerStatusRequest {
                    container_id: id.clone(),
                    verbose: false,
                })
                .await
                .unwrap_or_else(|e| fail("ContainerStatus", &e))
                .into_inner()
                .status
                .unwrap();
            if st.state == ContainerState::ContainerExited as i32 {
                break st.exit_code;
            }
            assert!(
                Instant::now() < deadline,
                "the pod's container did not exit: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let log = std::fs::read_to_string(logs.join("app.log")).unwrap_or_default();
        rs.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: pod.clone(),
        })
        .await
        .unwrap_or_else(|e| fail("StopPodSandbox", &e));
        rs.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .unwrap_or_else(|e| fail("RemovePodSandbox", &e));
        (exit, log)
    })
}

/// The containerd config lines that make `pause` the pods' sandbox image,
/// and keep the pods' oom_score_adj at or above containerd's own: this
/// machine's kernel refuses a negative one (a write of -998, the sandbox's
/// default, fails with EIO, and runc with "can't get final child's PID
/// from pipe").
fn sandbox_toml(stack: Stack, pause: &str) -> String {
    match stack {
        Stack::Bookworm => format!(
            "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{pause}\"\n  restrict_oom_score_adj = true\n"
        ),
        Stack::Sid => format!(
            "[plugins.\"io.containerd.cri.v1.images\".pinned_images]\n  sandbox = \"{pause}\"\n[plugins.\"io.containerd.cri.v1.runtime\"]\n  restrict_oom_score_adj = true\n"
        ),
    }
}

/// A pod as the kubelet starts it, through containerd's CRI over gRPC:
/// PullImage of the optimized image, then RunPodSandbox, CreateContainer
/// and StartContainer. The container runs the image's own command from the
/// lazy root and exits 0 with its output in the pod's log; containerd itself
/// fetched no layer of the image.
fn cri_pod_of_an_optimized_image_starts_lazily(stack: Stack) {
    if !stack_ready(stack, "cri_pod_of_an_optimized_image_starts_lazily") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3", "busybox"]);
    let pause = push_pause_image(&reg);
    let (opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, opt_layers) = layer_digests(opt_root.path(), &dst);
    lazy_pods(stack, &reg, &pause, std::slice::from_ref(&dst), &opt_layers);
}

/// Pods of `images` on a fresh snapshotter and CRI containerd, as the
/// kubelet starts them (PullImage, then the pod), each printing its
/// image's "ok", containerd fetching none of `layers` and the snapshotter
/// claiming them as remote; the registry's log of it all.
fn lazy_pods(
    stack: Stack,
    reg: &Registry,
    pause: &str,
    images: &[String],
    layers: &[String],
) -> String {
    let root = stack.tempdir();
    let sn = Snapshotterd::start(root.path());
    let toml = cri_toml(stack, &sn, reg) + &sandbox_toml(stack, pause);
    let cd = Containerd::start_cri_on(stack, &toml);
    let log_start = reg.log().len();
    let logs = root.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    for (i, image) in images.iter().enumerate() {
        cri_pull(&cd, image);
        let (code, log) = cri_pod(&cd, image, &logs, &format!("lazy-{i}-{}", stack.name()));
        assert_eq!(code, 0, "the pod's container failed; its log:\n{log}");
        assert!(
            log.lines().any(|l| l.ends_with(" stdout F ok")),
            "the image's own command did not print ok:\n{log}"
        );
    }
    let requests = reg.log()[log_start..].to_string();
    for l in layers {
        assert!(
            !requests
                .lines()
                .any(|r| r.contains("containerd/") && r.contains(&format!("/blobs/{l}"))),
            "containerd fetched layer {l} of {images:?}:\n{requests}"
        );
    }
    assert!(
        sn.log().contains("claimed a layer as remote"),
        "{}",
        sn.log()
    );
    requests
}

/// Part 16: a pod of the unchanged image, by digest and then by tag, with a
/// boot layer attached to it (`optimize --attach`): the snapshotter finds
/// the artifact through the referrers tag, claims the image's top layer as
/// remote and serves its root lazily; containerd fetches none of its layers.
fn cri_pod_of_an_unchanged_image_starts_lazily_from_its_attached_boot_layer(stack: Stack) {
    if !stack_ready(
        stack,
        "cri_pod_of_an_unchanged_image_starts_lazily_from_its_attached_boot_layer",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3", "busybox"]);
    let pause = push_pause_image(&reg);
    let src = image_ref(&reg, "python3");
    let opt_root = stack.tempdir();
    lazylayer_ok(opt_root.path(), &["optimize", "--attach", &src]);
    let (digest, layers) = layer_digests(opt_root.path(), &src);
    let repo = src.rsplit_once(':').unwrap().0;
    let by_digest = format!("{repo}@{digest}");
    let requests = lazy_pods(stack, &reg, &pause, &[by_digest, src.clone()], &layers);
    assert!(
        requests.contains(&format!(
            "/manifests/sha256-{}",
            digest.trim_start_matches("sha256:")
        )),
        "the snapshotter did not look up the referrers tag:\n{requests}"
    );
}

/// `runtime.v1.ImageService/PullImage` on containerd's socket, as the
/// kubelet sends it (no auth, no sandbox config); returns the image ref.
fn cri_pull(cd: &Containerd, image: &str) -> String {
    use lazylayer_containerd::proto::cri::{
        image_service_client::ImageServiceClient, ImageSpec, PullImageRequest,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let res = rt.block_on(async {
        let channel = lazylayer_containerd::grpc::connect(&cd.socket())
            .await
            .unwrap();
        ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    annotations: Default::default(),
                }),
                auth: None,
                sandbox_config: None,
            })
            .await
    });
    match res {
        Ok(r) => r.into_inner().image_ref,
        Err(e) => panic!(
            "CRI PullImage {image}: {e:?}\n--- containerd log ---\n{}",
            cd.log()
        ),
    }
}

/// `PullImage` of `image` on the CRI image service at `socket` (containerd's
/// or the snapshotter's proxy) with `auth` (user, password) as a kubelet
/// sends a pod's pull secret; the image ref, or the refusal.
fn cri_pull_as(
    socket: &Path,
    image: &str,
    auth: Option<(&str, &str)>,
) -> Result<String, lazylayer_containerd::tonic::Status> {
    use lazylayer_containerd::proto::cri::{
        image_service_client::ImageServiceClient, AuthConfig, ImageSpec, PullImageRequest,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = lazylayer_containerd::grpc::connect(socket).await.unwrap();
        ImageServiceClient::new(channel)
            .pull_image(PullImageRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    annotations: Default::default(),
                }),
                auth: auth.map(|(user, password)| AuthConfig {
                    username: user.into(),
                    password: password.into(),
                    ..Default::default()
                }),
                sandbox_config: None,
            })
            .await
            .map(|r| r.into_inner().image_ref)
    })
}

/// `ImageStatus` of `image` at `socket`, as the kubelet asks before it
/// pulls: the image's ID, None if it is not there.
fn cri_image_id(socket: &Path, image: &str) -> Option<String> {
    use lazylayer_containerd::proto::cri::{
        image_service_client::ImageServiceClient, ImageSpec, ImageStatusRequest,
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let channel = lazylayer_containerd::grpc::connect(socket).await.unwrap();
        ImageServiceClient::new(channel)
            .image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.to_string(),
                    annotations: Default::default(),
                }),
                verbose: false,
            })
            .await
            .unwrap()
            .into_inner()
            .image
            .map(|i| i.id)
    })
}

/// Access-log lines of `reg` since `from` for GETs under `/v2/REPO/` by a
/// client whose user agent starts with `agent`, answered 2xx.
fn served_gets(reg: &Registry, from: usize, repo: &str, agent: &str) -> Vec<String> {
    reg.log()[from..]
        .lines()
        .filter(|l| {
            l.contains(&format!("\"GET /v2/{repo}/"))
                && l.contains(&format!("\"{agent}"))
                && l.contains("\" 20")
        })
        .map(str::to_string)
        .collect()
}

/// A pod's pull secret, as Kubernetes hands it over: the kubelet's image
/// service endpoint is the snapshotter's CRI proxy, which forwards every
/// call to containerd and keeps the credential of a pull containerd
/// accepted, for that image's repository only. The snapshotter itself has no
/// credential of its own (no auth file). The private registry asks for
/// Basic (htpasswd) on bookworm and for a Bearer token (a token issuer
/// granting per repository) on sid.
///
/// A wrong password: a clear pull error for the pod, and nothing kept.
/// alice's secret for `private/app`: the pod starts lazily (containerd
/// fetches no layer; the snapshotter fetches the boot bytes with alice's
/// credential). bob's image `private/other`, pulled straight on containerd
/// with bob's secret (so the snapshotter never got it): alice's credential
/// is not lent to it, so the snapshotter cannot open it and leaves it to
/// containerd's ordinary download, which runs. The secrets never reach
/// the snapshotter's log.
fn cri_pull_secrets_open_their_own_image_lazily(stack: Stack) {
    if !stack_ready(stack, "cri_pull_secrets_open_their_own_image_lazily") {
        return;
    }
    use lazylayer_testsupport::auth::{htpasswd_config, Grant, TokenIssuer};
    let reg = Registry::start();
    push_images(&reg, &["python3", "busybox"]);
    let pause = push_pause_image(&reg);
    let (opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, opt_layers) = layer_digests(opt_root.path(), &dst);
    let boot = opt_layers.last().unwrap().clone();
    // bob's image: another optimized image (its boot layer is its own, so
    // containerd asks the snapshotter for it).
    let (bb_root, _, bb_dst) = optimize_image(&reg, "busybox", &[]);
    let (_, bb_layers) = layer_digests(bb_root.path(), &bb_dst);
    let bb_boot = bb_layers.last().unwrap().clone();

    let secrets = tempfile::tempdir().unwrap();
    let users = [
        ("alice", "alice-pw-1"),
        ("bob", "bob-pw-2"),
        ("admin", "admin-pw-3"),
    ];
    let (private, _issuer) = match stack {
        Stack::Bookworm => (
            Registry::start_with(&htpasswd_config(secrets.path(), &users)),
            None,
        ),
        Stack::Sid => {
            let issuer = TokenIssuer::start_granting(vec![
                Grant::new("alice", "alice-pw-1", "private/app"),
                Grant::new("bob", "bob-pw-2", "private/other"),
                Grant::new("admin", "admin-pw-3", ""),
            ]);
            (
                Registry::start_with(&issuer.registry_config()),
                Some(issuer),
            )
        }
    };
    let app = format!("{}/private/app:opt", private.addr());
    let other = format!("{}/private/other:opt", private.addr());
    let admin = auth_file(secrets.path(), &private.addr(), "admin", "admin-pw-3");
    push_with_auth(opt_root.path(), &dst, &app, &admin);
    push_with_auth(bb_root.path(), &bb_dst, &other, &admin);

    let root = stack.tempdir();
    let home = root.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let home = home.display().to_string();
    let sn = Snapshotterd::start_with_image_service(root.path(), &[("HOME", &home)]);
    let toml = cri_toml_for(stack, &sn, &[&reg, &private]) + &sandbox_toml(stack, &pause);
    let cd = Containerd::start_cri_on(stack, &toml);
    let proxy = sn.link(&cd);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&proxy).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // The kubelet asks first; the proxy forwards what it does not read.
    assert_eq!(cri_image_id(&proxy, &app), None);

    // A wrong password: containerd refuses the pull, the proxy keeps nothing.
    let refused = cri_pull_as(&proxy, &app, Some(("alice", "wrong-pw")))
        .expect_err("a wrong password pulled");
    let msg = refused.message().to_ascii_lowercase();
    assert!(
        msg.contains("401") || msg.contains("unauthorized") || msg.contains("denied"),
        "not a clear pull error: {refused:?}"
    );
    assert!(
        !sn.log().contains("keeping the pull's credential"),
        "{}",
        sn.log()
    );

    // alice's secret: the pod starts lazily.
    let from = private.log().len();
    let id = cri_pull_as(&proxy, &app, Some(("alice", "alice-pw-1")))
        .unwrap_or_else(|e| panic!("{e:?}\n--- snapshotter ---\n{}", sn.log()));
    assert_eq!(cri_image_id(&proxy, &app).as_deref(), Some(id.as_str()));
    assert!(
        sn.log().contains("keeping the pull's credential"),
        "{}",
        sn.log()
    );
    let logs = root.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let (code, log) = cri_pod(&cd, &app, &logs, &format!("secret-{}", stack.name()));
    assert_eq!(code, 0, "the pod's container failed; its log:\n{log}");
    assert!(log.lines().any(|l| l.ends_with(" stdout F ok")), "{log}");
    let by_containerd = served_gets(&private, from, "private/app", "containerd/");
    for l in &opt_layers {
        assert!(
            !by_containerd
                .iter()
                .any(|g| g.contains(&format!("/blobs/{l}"))),
            "containerd fetched layer {l}: {by_containerd:?}"
        );
    }
    let by_us = served_gets(&private, from, "private/app", "lazylayer/");
    assert!(
        by_us.iter().any(|g| g.contains(&format!("/blobs/{boot}"))),
        "the snapshotter fetched no boot bytes with alice's credential:\n{}",
        &private.log()[from..]
    );

    // bob's image, pulled by containerd with bob's secret, which the
    // snapshotter never saw: it may not use alice's for it.
    let from = private.log().len();
    cri_pull_as(&cd.socket(), &other, Some(("bob", "bob-pw-2")))
        .unwrap_or_else(|e| panic!("{e:?}\n--- containerd ---\n{}", cd.log()));
    assert_eq!(
        served_gets(&private, from, "private/other", "lazylayer/"),
        Vec::<String>::new(),
        "the snapshotter opened bob's image without bob's credential"
    );
    assert!(
        sn.log().contains("cannot resolve the image"),
        "{}",
        sn.log()
    );
    // The registry writes a request's log line once its response is sent:
    // on a busy machine, after containerd has the bytes and has returned.
    let deadline = Instant::now() + Duration::from_secs(10);
    let by_containerd = loop {
        let gets = served_gets(&private, from, "private/other", "containerd/");
        if gets
            .iter()
            .any(|g| g.contains(&format!("/blobs/{bb_boot}")))
            || Instant::now() > deadline
        {
            break gets;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        by_containerd
            .iter()
            .any(|g| g.contains(&format!("/blobs/{bb_boot}"))),
        "containerd did not download bob's image itself: {by_containerd:?}"
    );
    let (code, log) = cri_pod(&cd, &other, &logs, &format!("other-{}", stack.name()));
    assert_eq!(code, 0, "bob's pod failed; its log:\n{log}");
    if stack == Stack::Sid {
        // Per repository grants: alice's secret does not open bob's image.
        let refused = cri_pull_as(&proxy, &other, Some(("alice", "alice-pw-1")));
        assert!(refused.is_err(), "alice's secret opened bob's image");
    }
    for secret in ["alice-pw-1", "bob-pw-2", "wrong-pw"] {
        assert!(
            !sn.log().contains(secret),
            "a secret in the snapshotter's log"
        );
    }
}

/// The kubelet's credential provider plugins as the snapshotter's source
/// (`--image-credential-provider-config`, `--image-credential-provider-bin-dir`,
/// the kubelet's own file and directory): a pull on containerd's own socket
/// (no proxy) of an image of a private registry (htpasswd) is claimed and
/// served lazily with the plugin's credential, the only one the
/// snapshotter has.
#[test]
fn credential_provider_plugin_serves_the_snapshotter() {
    let stack = Stack::Bookworm;
    if !stack_ready(stack, "credential_provider_plugin_serves_the_snapshotter") {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, opt_layers) = layer_digests(opt_root.path(), &dst);
    let boot = opt_layers.last().unwrap().clone();
    let secrets = tempfile::tempdir().unwrap();
    let private = Registry::start_with(&lazylayer_testsupport::auth::htpasswd_config(
        secrets.path(),
        &[("alice", "alice-pw-1")],
    ));
    let app = format!("{}/private/app:opt", private.addr());
    let alice = auth_file(secrets.path(), &private.addr(), "alice", "alice-pw-1");
    push_with_auth(opt_root.path(), &dst, &app, &alice);

    let plugins = tempfile::tempdir().unwrap();
    let addr = private.addr();
    let key = format!("{addr}/private");
    credential_provider_plugin(plugins.path(), "test-login", &key, "alice", "alice-pw-1");
    let config = credential_provider_config(plugins.path(), "test-login", &addr);

    let root = stack.tempdir();
    let home = root.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let (config, bin_dir) = (
        config.display().to_string(),
        plugins.path().display().to_string(),
    );
    let sn = Snapshotterd::start_with(
        root.path(),
        &[("HOME", &home.display().to_string())],
        &[
            "--image-credential-provider-config",
            &config,
            "--image-credential-provider-bin-dir",
            &bin_dir,
        ],
    );
    let cd = Containerd::start_cri_on(stack, &cri_toml_for(stack, &sn, &[&private]));
    let from = private.log().len();
    cri_pull_as(&cd.socket(), &app, Some(("alice", "alice-pw-1")))
        .unwrap_or_else(|e| panic!("{e:?}\n--- snapshotter ---\n{}", sn.log()));
    assert!(
        sn.log().contains("claimed a layer as remote"),
        "{}",
        sn.log()
    );
    let by_us = served_gets(&private, from, "private/app", "lazylayer/");
    assert!(
        by_us.iter().any(|g| g.contains(&format!("/blobs/{boot}"))),
        "the snapshotter fetched no boot bytes: {by_us:?}"
    );
    let requests = std::fs::read_to_string(plugins.path().join("test-login.requests")).unwrap();
    assert!(
        requests.contains(&format!("\"image\":\"{}/private/app\"", private.addr())),
        "{requests}"
    );
    let out = cd.ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &app,
        "provider-t1",
    ]);
    assert_eq!(out.replace('\r', ""), "ok\n");
}

/// The Kubernetes path: containerd 1.6 with its CRI plugin, pulled through
/// `runtime.v1.ImageService/PullImage` exactly as the kubelet does. For an
/// optimized image the snapshotter claims every layer, so containerd fetches
/// manifest and config only (the snapshotter the boot layer); the image then
/// runs from the lazy root. A plain image through the same path is
/// downloaded and unpacked by containerd as usual, and runs.
fn cri_pull_of_an_optimized_image_fetches_no_original_layer(stack: Stack) {
    if !stack_ready(
        stack,
        "cri_pull_of_an_optimized_image_fetches_no_original_layer",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3", "busybox"]);
    let (opt_root, src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, opt_layers) = layer_digests(opt_root.path(), &dst);
    let (_, src_layers) = layer_digests(opt_root.path(), &src);
    let boot = opt_layers.last().unwrap().clone();
    assert!(!src_layers.contains(&boot));
    let busybox = image_ref(&reg, "busybox");
    let (_, busybox_layers) = layer_digests(opt_root.path(), &busybox);

    let root = stack.tempdir();
    let sn = Snapshotterd::start(root.path());
    let cd = Containerd::start_cri_on(stack, &cri_toml(stack, &sn, &reg));

    let log_start = reg.log().len();
    let blob_gets_since = |digest: &str| -> Vec<String> {
        reg.log()[log_start..]
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .map(str::to_string)
            .collect()
    };
    let image_id = cri_pull(&cd, &dst);
    assert!(image_id.starts_with("sha256:"), "{image_id}");
    let log = reg.log()[log_start..].to_string();
    eprintln!("registry requests of the CRI pull:\n{log}");
    // The snapshotter fetched the boot layer (by ranges: its index, then
    // its chunks); containerd fetched no layer at all, and nobody fetched an
    // original layer.
    let boot_gets = blob_gets_since(&boot);
    assert!(!boot_gets.is_empty(), "{boot_gets:?}");
    assert!(
        boot_gets.iter().all(|g| !g.contains("containerd/")),
        "containerd fetched the boot layer: {boot_gets:?}"
    );
    for l in &src_layers {
        assert_eq!(
            blob_gets_since(l),
            Vec::<String>::new(),
            "layer {l} fetched by the CRI pull"
        );
    }
    // Manifest and config came through containerd.
    assert!(
        log.lines()
            .any(|l| l.contains("/manifests/") && l.contains("containerd/")),
        "{log}"
    );
    let config = image_id.as_str();
    assert!(
        blob_gets_since(config)
            .iter()
            .any(|l| l.contains("containerd/")),
        "{log}"
    );
    assert!(
        sn.log().contains("claimed a layer as remote"),
        "{}",
        sn.log()
    );
    let meta = std::fs::read_to_string(root.path().join("snapshotter/metadata.json")).unwrap();
    assert!(!meta.contains("\"active\""), "{meta}");

    // Kubernetes' namespace holds the image; its own command runs lazily.
    let images = cd.ok(&["-n", "k8s.io", "images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == dst), "{images}");
    let out = cd.ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &dst,
        "cri-t1",
    ]);
    assert_eq!(out.replace('\r', ""), "ok\n");

    // A plain image through the same path: containerd downloads and applies
    // its layers into ordinary snapshots of ours.
    let log_start2 = reg.log().len();
    cri_pull(&cd, &busybox);
    let log2 = reg.log()[log_start2..].to_string();
    for l in &busybox_layers {
        assert!(
            log2.lines().any(|x| x.contains(&format!("/blobs/{l}"))
                && x.contains("\"GET /v2/")
                && x.contains("containerd/")),
            "containerd did not fetch layer {l}:\n{log2}"
        );
    }
    let out = cd.ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &busybox,
        "cri-t2",
        "echo",
        "plain via cri",
    ]);
    assert_eq!(out.replace('\r', ""), "plain via cri\n");

    // The original image shares every layer but the boot layer with the
    // optimized one: containerd finds those chains committed (remote) and
    // unpacks nothing; its container stands on them below the boot layer,
    // and the snapshotter serves them whole from its store.
    cri_pull(&cd, &src);
    let out = cd.ok(&[
        "-n",
        "k8s.io",
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &src,
        "t3",
        "python3",
        "-c",
        "import email.parser; print('shared layers')",
    ]);
    assert_eq!(out.replace('\r', ""), "shared layers\n");
    drop(cd);
}

/// `lazylayer snapshotter` (with `env`) on a fresh root, a containerd using
/// it, and `image` registered in containerd lazily (`lazylayer containerd
/// pull`). Bound in this order, they drop in reverse: containerd first.
fn snapshotter_with_image(
    stack: Stack,
    image: &str,
    env: &[(&str, &str)],
) -> (tempfile::TempDir, Snapshotterd, Containerd) {
    let root = stack.tempdir();
    let sn = Snapshotterd::start_with_env(root.path(), env);
    let cd = Containerd::start_on(stack, &sn.proxy_toml_on(stack));
    let sock = cd.socket();
    lazylayer_ok(
        root.path(),
        &[
            "containerd",
            "pull",
            "--address",
            sock.to_str().unwrap(),
            image,
        ],
    );
    (root, sn, cd)
}

/// The PID of the container's task, from `ctr tasks ls` (None: not running).
fn task_pid(cd: &Containerd, id: &str) -> Option<String> {
    let tasks = ctr_retry(cd, &["tasks", "ls"]);
    tasks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.first() == Some(&id) && f.get(2) == Some(&"RUNNING")).then(|| f[1].to_string())
    })
}

/// A running container of a lazy image keeps its file system while the
/// snapshotter is killed (SIGKILL) and restarted, or upgraded (SIGTERM,
/// then a new one): the FUSE connection of its root is kept by the
/// descriptor holder, and the new snapshotter takes it over. A read that
/// waits for a layer still streaming when the snapshotter dies completes
/// with the right bytes; every later first read and listing works; the
/// task is never stopped. Then 20 restarts more, alternating the two, with
/// the mounts, the holder's descriptors and memory checked for leaks.
fn snapshotter_restarts_keep_a_running_lazy_container_serving(stack: Stack) {
    if !stack_ready(
        stack,
        "snapshotter_restarts_keep_a_running_lazy_container_serving",
    ) {
        return;
    }
    let (_reg, opt_root, layers, proxy, via) = optimized_python3_behind_a_proxy();
    // The base layer (and its ranges) at 1 MB/s: it is still streaming
    // when the snapshotter goes.
    *proxy.slow_blob.lock().unwrap() = (layers[0].clone(), 1_000_000);
    let base_fs = stored_layer(opt_root.path(), &layers[0]).join("fs");
    let files = files_to_read(&base_fs);
    assert!(files.len() > 30, "{} files", files.len());

    let (root, mut sn, cd) = snapshotter_with_image(stack, &via, &[]);
    cd.ok(&[
        "run",
        "-d",
        "--snapshotter",
        "lazylayer",
        &via,
        "long",
        "sleep",
        "1000",
    ]);
    let pid0 = task_pid(&cd, "long").expect("the task runs");
    let rootfs = cd
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task/default/long/rootfs");
    let expect = |f: &str| std::fs::read(base_fs.join(f)).unwrap();
    let read_in_thread = |f: &str| {
        let p = rootfs.join(f);
        std::thread::spawn(move || (std::time::Instant::now(), std::fs::read(p)))
    };
    let check_alive = |when: &str| {
        assert_eq!(
            task_pid(&cd, "long").as_deref(),
            Some(pid0.as_str()),
            "the task after {when}"
        );
        let n = std::fs::read_dir(rootfs.join("usr/lib")).unwrap().count();
        assert!(n > 10, "ls /usr/lib after {when}: {n} entries");
    };

    // (a) SIGKILL while a first read of perl waits for the base layer.
    let perl = read_in_thread("usr/bin/perl");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !perl.is_finished(),
        "the read must still be waiting for the layer"
    );
    sn.restart();
    let (_, got) = perl.join().unwrap();
    assert!(
        got.expect("read across the crash") == expect("usr/bin/perl"),
        "perl's bytes"
    );
    assert!(sn.log().contains("took over a lazy root"), "{}", sn.log());
    check_alive("a SIGKILL");

    // (b) An upgrade: SIGTERM (the root is in use: left mounted), a new one.
    let f = &files[0];
    let r = read_in_thread(f);
    std::thread::sleep(Duration::from_millis(200));
    sn.stop_gracefully();
    sn.spawn();
    let (_, got) = r.join().unwrap();
    assert!(
        got.expect("read across the upgrade") == expect(f),
        "{f}'s bytes"
    );
    check_alive("an upgrade");

    // (c) 20 more, alternating; a new file read after each.
    let holder_pid = sn.holder_pid().expect("a holder runs");
    let count_mounts = || mounts_below(root.path()).len() + mounts_below(cd.dir.path()).len();
    let mut figures = lazylayer_testsupport::RestartFigures::new(count_mounts(), holder_pid);
    for k in 0..20 {
        if k % 2 == 0 {
            sn.restart();
        } else {
            sn.stop_gracefully();
            sn.spawn();
        }
        let f = &files[1 + k];
        let (_, got) = read_in_thread(f).join().unwrap();
        assert!(
            got.unwrap_or_else(|e| panic!("{f} after restart {k}: {e}")) == expect(f),
            "{f}"
        );
        check_alive(&format!("restart {k}"));
        figures.record(k, count_mounts(), sn.holder_pid(), sn.pid());
    }
    figures.check("snapshotter");

    // (d) Once every byte is local the kernel opens the root's files alone
    // (no OPEN reaches a server any more): a new server reads them by inode.
    *proxy.slow_blob.lock().unwrap() = (String::new(), 0);
    let t0 = std::time::Instant::now();
    while !sn
        .log()
        .contains("the kernel opens the lazy root's files alone")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the image never became local: {}",
            sn.log()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    for (k, f) in files[21..25].iter().enumerate() {
        if k % 2 == 0 {
            sn.restart();
        } else {
            sn.stop_gracefully();
            sn.spawn();
        }
        let (_, got) = read_in_thread(f).join().unwrap();
        assert!(
            got.unwrap_or_else(|e| panic!("{f} after a restart with kernel opens: {e}"))
                == expect(f),
            "{f}"
        );
        check_alive("a restart with kernel opens");
    }

    cd.ok(&["tasks", "kill", "-s", "KILL", "long"]);
    drop(cd);
}

/// After the image became local whole, a new container's snapshot stands on
/// the store's extracted layers (under the index mask), no lazy mount; its
/// root equals the lazy one and shows no index file.
fn a_new_container_on_an_image_local_whole_gets_the_stores_layers_without_fuse(stack: Stack) {
    if !stack_ready(
        stack,
        "a_new_container_on_an_image_local_whole_gets_the_stores_layers_without_fuse",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (_opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (root, sn, cd) = snapshotter_with_image(stack, &dst, &[]);
    let script = "find / -xdev \\( -path /proc -o -path /sys -o -path /dev \\) -prune -o -printf '%p %y %m %U %G\\n' | sort; \
                  find / -xdev -type f -printf '%p %s\\n' | sort | md5sum; \
                  cat /app/* /usr/bin/* | md5sum; \
                  ls -a / | grep -c lazylayer; true";
    let fuse_mounts = || {
        mounts_below(root.path())
            .into_iter()
            .filter(|m| m.contains("/snapshotter/lazy/"))
            .count()
    };

    // A container while the image is still remote: the lazy root.
    let lazy = cd.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &dst,
        "whole-t1",
        "sh",
        "-c",
        script,
    ]);
    assert!(sn.log().contains("lazy root mounted"), "{}", sn.log());
    let lazy_mounts = sn.log().matches("lazy root mounted").count();

    // Every layer into the snapshotter's store (what its prefetch ends in).
    lazylayer_ok(root.path(), &["pull", "-q", &dst]);
    // ctr 1.6 needs "--" before a command with flags; ctr 2.x passes it
    // on as the command.
    let dashes: &[&str] = match stack {
        Stack::Bookworm => &["--"],
        Stack::Sid => &[],
    };
    let create = [
        &[
            "containers",
            "create",
            "--snapshotter",
            "lazylayer",
            &dst,
            "whole-t2",
        ],
        dashes,
        &["sh", "-c", script],
    ];
    cd.ok(&create.concat());
    let mounts = cd.ok(&[
        "snapshots",
        "--snapshotter",
        "lazylayer",
        "mounts",
        "/mnt",
        "whole-t2",
    ]);
    let store_layers = root.path().join("layers/sha256").display().to_string();
    let mask = root.path().join("masks").display().to_string();
    assert!(
        mounts.contains(&store_layers) && mounts.contains(&mask),
        "the snapshot stacks the store's layers under the index mask: {mounts}"
    );
    assert!(!mounts.contains("/snapshotter/lazy/"), "{mounts}");
    assert_eq!(fuse_mounts(), 0, "{:?}", mounts_below(root.path()));
    let native = cd.ok(&["task", "start", "whole-t2"]);
    assert_eq!(
        sn.log().matches("lazy root mounted").count(),
        lazy_mounts,
        "a lazy root was mounted for the local image: {}",
        sn.log()
    );
    assert_eq!(native.replace('\r', ""), lazy.replace('\r', ""));
    assert!(native.replace('\r', "").ends_with("\n0\n"), "{native}");
    cd.ok(&["containers", "rm", "whole-t2"]);
    drop(cd);
}

/// A snapshotter that dies for good (no new one comes): its holder keeps the
/// lazy root for the orphan timeout only (3 s here, 60 s by default), then
/// lets the connection go. A reader that was waiting gets an error after that
/// bounded wait instead of hanging; a later snapshotter detaches the dead
/// mount and serves new containers.
fn snapshotter_gone_for_good_gives_readers_an_error_after_the_orphan_timeout(stack: Stack) {
    if !stack_ready(
        stack,
        "snapshotter_gone_for_good_gives_readers_an_error_after_the_orphan_timeout",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (_opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_root, mut sn, cd) =
        snapshotter_with_image(stack, &dst, &[("LAZYLAYER_ORPHAN_TIMEOUT", "3")]);
    cd.ok(&[
        "run",
        "-d",
        "--snapshotter",
        "lazylayer",
        &dst,
        "orphan",
        "sleep",
        "1000",
    ]);
    let rootfs = cd
        .dir
        .path()
        .join("state/io.containerd.runtime.v2.task/default/orphan/rootfs");
    assert!(std::fs::read(rootfs.join("etc/debian_version")).is_ok());
    let holder = sn.holder_pid().expect("a holder runs");

    sn.kill();
    let t0 = Instant::now();
    let read = std::fs::read(rootfs.join("usr/lib/os-release"));
    let waited = t0.elapsed();
    eprintln!("read with no snapshotter: {read:?} after {waited:?}");
    let err = read.expect_err("no server: the read must fail, not hang");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(e) if e == rustix::io::Errno::NOTCONN.raw_os_error()
                || e == rustix::io::Errno::CONNABORTED.raw_os_error()
        ),
        "{err}"
    );
    assert!(
        waited >= Duration::from_secs(2) && waited < Duration::from_secs(30),
        "the read waited {waited:?}: the orphan timeout is 3 s"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while Path::new(&format!("/proc/{holder}")).exists() {
        assert!(
            Instant::now() < deadline,
            "the orphaned holder did not exit"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // A new snapshotter detaches the dead mount and serves a new container.
    sn.spawn();
    let out = ctr_retry(
        &cd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazylayer",
            &dst,
            "orphan-t2",
        ],
    );
    assert_eq!(out.replace('\r', ""), "ok\n");
    // The old container lost its root with the connection (its process may
    // have died of it already): kill it if it still runs.
    let _ = cd
        .ctr()
        .args(["tasks", "kill", "-s", "KILL", "orphan"])
        .output();
    drop(cd);
}

/// When the last container of a lazily started image ends (its snapshot
/// removed, so the snapshotter lets the lazy root go), the image's
/// background prefetch stops: the original layers' fetches and the boot
/// layer's chunks alike. The registry (behind a proxy at 3 MB/s, so the
/// prefetch is far from done when the container exits) then sees no new
/// request for the image's blobs and its relayed bytes stop growing, and
/// the store does not end up with the whole image.
fn prefetch_stops_when_the_last_container_of_an_image_ends(stack: Stack) {
    if !stack_ready(
        stack,
        "prefetch_stops_when_the_last_container_of_an_image_ends",
    ) {
        return;
    }
    let (_reg, _opt_root, layers, proxy, via) = optimized_python3_behind_a_proxy();
    let (root, sn, cd) = snapshotter_with_image(stack, &via, &[]);
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    proxy
        .rate
        .store(3_000_000, std::sync::atomic::Ordering::SeqCst);
    let blob_gets = || {
        let text = proxy.requests_text();
        layers
            .iter()
            .map(|d| text.matches(&format!("/blobs/{d}")).count())
            .sum::<usize>()
    };

    let out = cd.ok(&["run", "--rm", "--snapshotter", "lazylayer", &via, "once"]);
    assert_eq!(out.replace('\r', ""), "ok\n");
    // ctr run --rm removed the snapshot: the root goes (logged once dropped).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !sn.log().contains("lazy root unmounted") {
        assert!(
            Instant::now() < deadline,
            "the lazy root was not let go: {}",
            sn.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let gets_at_release = blob_gets();
    // Connections cut by the cancel close within a moment; then nothing
    // more flows. (Bounded wait for "3 s without a relayed byte".)
    let deadline = Instant::now() + Duration::from_secs(60);
    let relayed = || proxy.relayed.load(std::sync::atomic::Ordering::SeqCst);
    loop {
        let before = relayed();
        std::thread::sleep(Duration::from_secs(3));
        if relayed() == before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the registry kept sending after the last container ended ({} bytes relayed)",
            relayed()
        );
    }
    assert_eq!(
        blob_gets(),
        gets_at_release,
        "blob requests after the last container ended:\n{}",
        proxy.requests_text()
    );
    // Far from all of it arrived: the prefetch did not run to its end.
    let whole = layers
        .iter()
        .all(|d| stored_layer(root.path(), d).join("layer.json").is_file());
    assert!(!whole, "every layer was fetched after the last user went");
    let recorded = lazylayer_json(root.path(), &["images"]);
    assert_eq!(
        recorded,
        serde_json::json!([]),
        "the image was not completed"
    );
}

/// One `ctr run --rm` of a load test: which image, how long until it
/// returned, and what it returned.
struct LoadRun {
    image: String,
    id: String,
    elapsed: Duration,
    out: Output,
}

/// Start `per_image` containers of each image at once (`ctr run --rm`, the
/// image's own command) and wait for every one, at most `bound`.
fn start_at_once(cd: &Containerd, images: &[&str], per_image: usize, tag: &str) -> Vec<LoadRun> {
    let bound = Duration::from_secs(180);
    let t0 = Instant::now();
    let mut children = Vec::new();
    for (n, image) in images.iter().enumerate() {
        for k in 0..per_image {
            let id = format!("{tag}-{n}-{k}");
            let child = cd
                .ctr()
                .args(["run", "--rm", "--snapshotter", "lazylayer", image, &id])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            children.push((image.to_string(), id, KillOnDrop(child)));
        }
    }
    // Each child is waited for on a thread of its own, so every elapsed
    // time is its own and not the order of the waits.
    let waiters: Vec<_> = children
        .into_iter()
        .map(|(image, id, mut child)| {
            std::thread::spawn(move || {
                let deadline = t0 + bound;
                loop {
                    if let Some(_status) = child.0.try_wait().unwrap() {
                        let elapsed = t0.elapsed();
                        let out = take_output(&mut child.0);
                        return Some(LoadRun {
                            image,
                            id,
                            elapsed,
                            out,
                        });
                    }
                    if Instant::now() > deadline {
                        eprintln!("{id} ({image}) still running after {bound:?}");
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        })
        .collect();
    let runs: Vec<Option<LoadRun>> = waiters.into_iter().map(|w| w.join().unwrap()).collect();
    assert!(
        runs.iter().all(Option::is_some),
        "containers hung for {bound:?} (killed)"
    );
    runs.into_iter().flatten().collect()
}

/// The output of an exited child whose stdout and stderr were piped.
fn take_output(child: &mut Child) -> Output {
    use std::io::Read;
    let status = child.wait().unwrap();
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_end(&mut stdout).unwrap();
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_end(&mut stderr).unwrap();
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// When the last of `image`'s containers returned (the time to start and
/// run them all), and that each succeeded.
fn makespan_of(runs: &[LoadRun], image: &str) -> Duration {
    let mine: Vec<&LoadRun> = runs.iter().filter(|r| r.image == image).collect();
    assert!(!mine.is_empty(), "no container of {image}");
    for r in &mine {
        assert!(
            r.out.status.success(),
            "{} ({image}) failed: {}",
            r.id,
            String::from_utf8_lossy(&r.out.stderr)
        );
    }
    mine.iter().map(|r| r.elapsed).max().unwrap()
}

/// Where each of a process's descriptors points.
fn fd_targets(pid: u32) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    dir.flatten()
        .map(|e| {
            std::fs::read_link(e.path()).map_or_else(|e| e.to_string(), |t| t.display().to_string())
        })
        .collect()
}

/// Threads, descriptors and resident kB of a process.
fn process_figures(pid: u32) -> (usize, usize, u64) {
    (thread_count(pid), fd_count(pid), vm_rss_kb(pid))
}

/// A node under load: one snapshotter and containerd start 30 containers
/// of 3 optimized images from 2 registries at once, while the second
/// registry is stalled (SIGSTOP) for the first 20 s. Each phase follows a
/// snapshotter restart (prefetch off), so every image is opened from its
/// registry again, as on a node that just came up. The healthy registry's
/// images start within 1.5x of their time alone (the same 20 containers
/// with no stalled image beside them); the stalled image's containers start
/// once the registry resumes, or fail with an error naming the image; the
/// snapshotter's threads, descriptors and memory come back to their idle
/// level, and nothing stays mounted.
#[test]
fn load_thirty_containers_from_two_registries_one_stalled() {
    if cannot_run() {
        return;
    }
    const PER_IMAGE: usize = 10;
    const STALL: Duration = Duration::from_secs(20);
    let healthy = Registry::start();
    let slow = Registry::start();
    push_images(&healthy, &["busybox", "multilayer"]);
    push_images(&slow, &["minbase"]);
    let (_o1, _, busybox) = optimize_image(&healthy, "busybox", &[]);
    let (_o2, _, multilayer) = optimize_image(&healthy, "multilayer", &[]);
    let (o3, _, minbase) = optimize_image(&slow, "minbase", &[]);
    // Where the snapshotter keeps what the stalled image's starts fetched of
    // its boot layer: a second round must find it empty, or its containers
    // start from it without the registry.
    let minbase_boot = layer_digests(o3.path(), &minbase).1.pop().unwrap();

    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    let cfg_dir = tempfile::tempdir().unwrap();
    let cfg = cfg_dir.path().join("config.toml");
    // No prefetch: no image becomes local, so each phase opens all of them
    // from their registries.
    std::fs::write(&cfg, "[fetch]\nprefetch = false\n").unwrap();
    let mut sn =
        Snapshotterd::start_with_env(root.path(), &[("LAZYLAYER_CONFIG", cfg.to_str().unwrap())]);
    let cd = Containerd::start_with(&sn.proxy_toml());
    let sock = cd.socket();
    for image in [&busybox, &multilayer, &minbase] {
        lazylayer_ok(
            root.path(),
            &[
                "containerd",
                "pull",
                "--address",
                sock.to_str().unwrap(),
                image,
            ],
        );
    }
    let wait_unmounted = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !mounts_below(root.path()).is_empty() {
            assert!(
                Instant::now() < deadline,
                "still mounted {what}: {:?}",
                mounts_below(root.path())
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let mut round = 0;
    let idle = loop {
        round += 1;
        // Alone: the healthy registry's 20 containers.
        sn.restart();
        ctr_retry(&cd, &["snapshots", "--snapshotter", "lazylayer", "ls"]);
        let alone = start_at_once(
            &cd,
            &[&busybox, &multilayer],
            PER_IMAGE,
            &format!("alone{round}"),
        );
        let alone_spans = [
            makespan_of(&alone, &busybox),
            makespan_of(&alone, &multilayer),
        ];
        wait_unmounted("after the healthy containers alone");

        // Loaded: all 30, the second registry stopped for the first 20 s.
        let cache = lazylayer_store::chunk_cache_dir(root.path(), &minbase_boot.parse().unwrap());
        match std::fs::remove_dir_all(&cache) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                panic!("removing {}: {e}", cache.display())
            }
            _ => {}
        }
        sn.restart();
        ctr_retry(&cd, &["snapshots", "--snapshotter", "lazylayer", "ls"]);
        std::thread::sleep(Duration::from_secs(1));
        let idle = process_figures(sn.pid());
        let slow_pid = slow.pid();
        send_signal(slow_pid, rustix::process::Signal::STOP);
        let resumer = std::thread::spawn(move || {
            std::thread::sleep(STALL);
            send_signal(slow_pid, rustix::process::Signal::CONT);
        });
        let loaded = start_at_once(
            &cd,
            &[&busybox, &multilayer, &minbase],
            PER_IMAGE,
            &format!("load{round}"),
        );
        let resumed_after = STALL.saturating_sub(Duration::from_secs(1));
        resumer.join().unwrap();
        let loaded_spans = [
            makespan_of(&loaded, &busybox),
            makespan_of(&loaded, &multilayer),
        ];

        // The stalled image: started after the registry came back, or a clear
        // error naming it; never a hang (start_at_once bounds the wait).
        let mut started = 0;
        for r in loaded.iter().filter(|r| r.image == minbase) {
            if r.out.status.success() {
                assert!(
                    r.elapsed >= resumed_after,
                    "{} of the stalled image returned after {:?}, before its registry resumed",
                    r.id,
                    r.elapsed
                );
                started += 1;
            } else {
                let err = String::from_utf8_lossy(&r.out.stderr);
                assert!(
                    err.contains("minbase") || err.contains(&slow.addr()),
                    "{}: an error that does not name the image or its registry: {err}",
                    r.id
                );
            }
        }
        eprintln!(
            "load: healthy images alone {alone_spans:?}, beside a stalled registry {loaded_spans:?}; \
             stalled image: {started}/{PER_IMAGE} started after the registry resumed"
        );
        wait_unmounted("after the load");
        let within = (alone_spans.iter().zip(&loaded_spans))
            .all(|(a, l)| l.as_secs_f64() <= 1.5 * a.as_secs_f64());
        if within {
            break idle;
        }
        // A stall holds healthy images up by its whole 20 s; a noisy machine by a
        // second or so: one more pair of phases tells the two apart.
        assert!(
            round < 2,
            "a healthy image took {loaded_spans:?} beside a stalled registry, {alone_spans:?} alone"
        );
    };

    // Back to idle: threads, descriptors, memory; nothing mounted.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (threads0, fds0, rss0) = idle;
    loop {
        let (threads, fds, rss) = process_figures(sn.pid());
        let settled = threads <= threads0 + 2 && fds <= fds0 + 2 && rss <= rss0 + 16 * 1024;
        if settled || Instant::now() > deadline {
            eprintln!(
                "snapshotter idle: {threads0} threads, {fds0} fds, {rss0} kB; \
                 after the load: {threads} threads, {fds} fds, {rss} kB"
            );
            assert!(
                settled,
                "the snapshotter did not come back to its idle level; its descriptors: {:?}",
                fd_targets(sn.pid())
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    drop(cd);
}

/// A registry that stalls (accepts, never answers) for one image holds up
/// only that image: while image A's open hangs, the layers of image B, on a
/// healthy registry, are claimed; two Prepares of one image at once share one
/// open (its manifest is fetched once); and A's Prepare, once its bounded
/// retries are spent, gets a plain snapshot (containerd then downloads the
/// layer itself).
#[test]
fn a_stalled_registry_holds_up_only_its_own_image() {
    use lazylayer_containerd::proto::snapshots::{self as pb, snapshots_client::SnapshotsClient};
    use lazylayer_testsupport::proxy::{AfterCut, CuttingProxy};

    if cannot_run() {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (opt_root, src, dst) = optimize_image(&reg, "multilayer", &[]);
    let (manifest_b, layers_b) = layer_digests(opt_root.path(), &dst);
    let (manifest_a, layers_a) = layer_digests(opt_root.path(), &src);
    // Image A is reached through a proxy that accepts and never answers.
    let stalled = CuttingProxy::start(reg.port, 0, AfterCut::StallAlways);
    let image_a = src.replace(&reg.addr(), &format!("127.0.0.1:{}", stalled.port));
    let log_start = reg.log().len();

    let root = tempfile::tempdir().unwrap();
    // Short stalls keep A's bounded retries (5 tries) short.
    let sn = Snapshotterd::start_with_env(root.path(), &[("LAZYLAYER_STALL_TIMEOUT", "2")]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(async {
        SnapshotsClient::new(lazylayer_containerd::grpc::connect(&sn.sock).await.unwrap())
    });
    let request =
        |key: &str, target: &str, parent: &str, image: &str, manifest: &str, layer: &str| {
            pb::PrepareSnapshotRequest {
                snapshotter: "lazylayer".into(),
                key: key.into(),
                parent: parent.into(),
                labels: cri_layer_labels(target, image, manifest, layer),
            }
        };

    rt.block_on(async {
        let stalled_prepare = tokio::spawn({
            let mut c = client.clone();
            let r = request("a-extract", "a-0", "", &image_a, &manifest_a, &layers_a[0]);
            async move { c.prepare(r).await }
        });
        let t = Instant::now();
        while stalled.requests.lock().unwrap().is_empty() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "A's open never reached the registry"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // A's open hangs now. B's first layer, twice at once, then the rest.
        let t = Instant::now();
        let (mut c1, mut c2) = (client.clone(), client.clone());
        let (r1, r2) = tokio::join!(
            c1.prepare(request(
                "b-extract-0",
                "b-0",
                "",
                &dst,
                &manifest_b,
                &layers_b[0]
            )),
            c2.prepare(request(
                "b-twin-0",
                "b-twin",
                "",
                &dst,
                &manifest_b,
                &layers_b[0]
            )),
        );
        for r in [r1, r2] {
            let err = r.expect_err("B's layer must be claimed");
            assert_eq!(
                err.code(),
                lazylayer_containerd::tonic::Code::AlreadyExists,
                "{err:?}"
            );
        }
        let mut parent = "b-0".to_string();
        for (i, layer) in layers_b.iter().enumerate().skip(1) {
            let target = format!("b-{i}");
            let r = request(
                &format!("b-extract-{i}"),
                &target,
                &parent,
                &dst,
                &manifest_b,
                layer,
            );
            let err = c1.prepare(r).await.expect_err("B's layer must be claimed");
            assert_eq!(
                err.code(),
                lazylayer_containerd::tonic::Code::AlreadyExists,
                "{err:?}"
            );
            parent = target;
        }
        eprintln!(
            "B's {} layers claimed in {:?} while A's open hung",
            layers_b.len(),
            t.elapsed()
        );
        assert!(
            !stalled_prepare.is_finished(),
            "A's Prepare ended before B's layers were claimed: B waited behind A's stalled open"
        );
        let manifest_gets = reg.log()[log_start..]
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/manifests/{manifest_b}")))
            .count();
        assert_eq!(manifest_gets, 1, "two Prepares of B at once share one open");

        // A gives up after its bounded retries (sooner once its registry is
        // gone: each try then fails at once): a plain snapshot, so that
        // containerd can still download the layer itself.
        stalled.die_now();
        let t = Instant::now();
        let a = tokio::time::timeout(Duration::from_secs(120), stalled_prepare)
            .await
            .expect("A's Prepare never ended")
            .unwrap()
            .expect("A's Prepare falls back to a plain snapshot")
            .into_inner();
        eprintln!("A's Prepare ended {:?} after B was done", t.elapsed());
        assert_eq!(a.mounts[0].r#type, "bind", "{:?}", a.mounts);
    });
    assert!(
        sn.log()
            .contains("cannot resolve the image; preparing a plain snapshot"),
        "{}",
        sn.log()
    );
}

/// Where each whole-blob request for `digest` started (0 without a Range,
/// N for `Range: bytes=N-`), in order; ranges with an end (files read by
/// range) left out.
fn open_range_starts(proxy: &lazylayer_testsupport::proxy::CuttingProxy, digest: &str) -> Vec<u64> {
    let requests = proxy.requests.lock().unwrap().clone();
    requests
        .iter()
        .map(|r| r.to_lowercase())
        .filter(|r| r.starts_with("get ") && r.contains(&format!("/blobs/{digest} ")))
        .filter_map(|r| {
            match r
                .lines()
                .find_map(|l| l.trim().strip_prefix("range: bytes=").map(str::to_string))
            {
                None => Some(0),
                Some(v) if v.ends_with('-') => v.trim_end_matches('-').parse().ok(),
                Some(_) => None,
            }
        })
        .collect()
}

/// Issue #25 for the snapshotter: each container's end lets the image's
/// lazy root go mid-prefetch (the prefetch stops then), and what it had
/// received stays: the next start resumes after it. Short containers one
/// after the other get every blob across (the proxy, slowed, is the
/// witness: no request asks again for a byte the store kept); a longer one
/// then completes the image from what is local, and a start after that
/// asks for no blob.
fn prefetch_cut_by_a_containers_end_is_resumed_by_the_next_start(stack: Stack) {
    if !stack_ready(
        stack,
        "prefetch_cut_by_a_containers_end_is_resumed_by_the_next_start",
    ) {
        return;
    }
    let (reg, opt_root, layers, proxy, via) = optimized_python3_behind_a_proxy();
    let direct = via.replace(&format!("127.0.0.1:{}", proxy.port), &reg.addr());
    let sizes: Vec<u64> = lazylayer_json(opt_root.path(), &["inspect", &direct])["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .collect();
    let (root, sn, cd) = snapshotter_with_image(stack, &via, &[]);
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    proxy
        .rate
        .store(8_000_000, std::sync::atomic::Ordering::SeqCst);
    // Every blob below the boot layer is kept whole (a stored layer, or a
    // complete partial download).
    let received = |d: &str, size: u64| {
        stored_layer(root.path(), d).join("layer.json").is_file()
            || std::fs::metadata(
                root.path()
                    .join("partial/sha256")
                    .join(d.strip_prefix("sha256:").unwrap()),
            )
            .is_ok_and(|m| m.len() == size)
    };
    let lower = layers.len() - 1;
    let all_received = || {
        layers[..lower]
            .iter()
            .zip(&sizes)
            .all(|(d, s)| received(d, *s))
    };
    let released = || sn.log().matches("lazy root unmounted").count();
    // Before a start, what the store kept of each blob and how many
    // whole-blob requests came so far; after it, its own requests for a blob
    // must not ask for a byte kept: the first starts at or past what was
    // kept, or from 0 when that was too short to resume (under 64 KiB,
    // store/src/pull.rs MIN_PARTIAL: a container ending just after its
    // prefetch asked leaves that), the next ones each further on.
    let partial_len = |d: &str| {
        std::fs::metadata(
            root.path()
                .join("partial/sha256")
                .join(d.strip_prefix("sha256:").unwrap()),
        )
        .map_or(0, |m| m.len())
    };
    let before_start = || -> Vec<(u64, usize)> {
        layers
            .iter()
            .map(|d| (partial_len(d), open_range_starts(&proxy, d).len()))
            .collect()
    };
    let check_start = |before: &[(u64, usize)], start: &str| {
        for (d, &(kept, n)) in layers.iter().zip(before) {
            let resumes = open_range_starts(&proxy, d);
            let own = &resumes[n..];
            let Some(&first) = own.first() else { continue };
            assert!(
                first >= kept || (first == 0 && kept < 64 << 10),
                "{start}: blob {d} asked for from {first} with {kept} bytes kept (every request: {resumes:?})"
            );
            assert!(
                own.windows(2).all(|w| w[0] < w[1]),
                "{start}: blob {d} asked for from {own:?}"
            );
        }
    };
    let mut starts = 0;
    while !all_received() {
        starts += 1;
        assert!(starts <= 12, "not every blob received after 12 starts");
        let before = before_start();
        let out = cd.ok(&[
            "run",
            "--rm",
            "--snapshotter",
            "lazylayer",
            &via,
            &format!("short{starts}"),
            "python3",
            "-c",
            // Long enough for the prefetch to start (from the boot layer
            // alone: `time` is built in), far shorter than the download.
            "import time; time.sleep(1.5); print('ok')",
        ]);
        assert_eq!(out.replace('\r', ""), "ok\n");
        let deadline = Instant::now() + Duration::from_secs(30);
        while released() < starts {
            assert!(Instant::now() < deadline, "the lazy root was not let go");
            std::thread::sleep(Duration::from_millis(50));
        }
        check_start(&before, &format!("short start {starts}"));
    }
    assert!(starts > 1, "the first container outlived the prefetch");
    let base = &layers[0];
    assert!(
        proxy.range_starts(base).iter().any(|&s| s > 0),
        "the base layer was never resumed:\n{}",
        proxy.requests_text()
    );

    // Long enough for the extraction of what is local: the image completes.
    let before = before_start();
    let out = cd.ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "lazylayer",
        &via,
        "long",
        "sh",
        "-c",
        "sleep 15; echo long",
    ]);
    assert_eq!(out.replace('\r', ""), "long\n");
    let recorded = lazylayer_json(root.path(), &["images"]);
    assert!(
        recorded.as_array().is_some_and(|a| !a.is_empty()),
        "the image was not completed: {recorded}"
    );
    check_start(&before, "the long start");
    // Each start checked above: no byte the store kept was asked for again.
    // (What a cut leaves in the client's TCP receive buffer was carried but
    // never received: the proxy's count is reported, not bounded, here.)
    // CI runs saw a container end just after its start asked for a 51 MB
    // blob, and a cut 2 KB layer: each asked again from 0 at the next start,
    // as the store does below 64 KiB.
    for (d, size) in layers.iter().zip(&sizes) {
        let resumes = open_range_starts(&proxy, d);
        let carried = proxy.relayed_for(d) as u64;
        eprintln!(
            "{d}: {size} bytes, carried {carried} ({:.3}x) in {} requests over {starts} short starts and a long one",
            carried as f64 / *size as f64,
            resumes.len()
        );
    }
    let before = proxy.requests_text().len();
    let out = cd.ok(&["run", "--rm", "--snapshotter", "lazylayer", &via, "after"]);
    assert_eq!(out.replace('\r', ""), "ok\n");
    let after = proxy.requests_text()[before..].to_string();
    assert!(
        !after.contains("/blobs/"),
        "a start of a complete image asked for blobs:\n{after}"
    );
}
