//! Test support shared by lazylayer's crates (a dev-dependency only): the
//! real peers a test talks to (Debian's docker-registry, podman, containerd),
//! guards that undo mounts and processes even when a test panics, tree
//! snapshots to compare root file systems, a fault-injecting proxy for
//! what a real registry cannot be made to do, and the bounded fuzz harness.

pub mod auth;
pub mod fuzz;
pub mod proxy;
pub mod stack;
pub mod tree;

pub use stack::Stack;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `multipart/byteranges` body as docker-registry (Go's net/http) frames
/// one: each of `parts` (a range of a blob of `total` bytes, with its
/// bytes) under `boundary`, with no preamble.
pub fn multipart_byteranges(
    boundary: &str,
    parts: &[(std::ops::Range<u64>, &[u8])],
    total: u64,
) -> Vec<u8> {
    let mut b = Vec::new();
    for (i, (r, bytes)) in parts.iter().enumerate() {
        if i > 0 {
            b.extend_from_slice(b"\r\n");
        }
        b.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {}-{}/{total}\r\n\r\n",
                r.start,
                r.end - 1
            )
            .as_bytes(),
        );
        b.extend_from_slice(bytes);
    }
    b.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    b
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// True when the test can run: it needs root (mounts, mknod, runc). Off CI a
/// test without root is skipped with the reason printed; under `CI` it fails,
/// since a skipped test would pass as green.
pub fn require_root(test: &str, why: &str) -> bool {
    is_root() || !skip_because(&format!("{test} needs root ({why})"))
}

/// Skip a test for `reason` (printed), or, under `CI`, fail it: a skipped
/// test would pass as green there. Returns true (skip) off CI.
pub fn skip_because(reason: &str) -> bool {
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must run every test: {reason}"
    );
    eprintln!("skipping: {reason}");
    true
}

/// A running docker-registry (distribution v2) with its storage and access
/// log in a temp dir.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    extra_config: String,
}

impl Registry {
    pub fn start() -> Registry {
        Self::start_with("")
    }

    /// `extra` is YAML appended at top level (e.g. an `auth:` block).
    pub fn start_with(extra: &str) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry {
            dir,
            port: free_port(),
            child: None,
            extra_config: extra.to_string(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let cfg = self.dir.path().join("config.yml");
        std::fs::write(
            &cfg,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{}\n{}\n",
                self.dir.path().join("data").display(),
                self.port,
                self.extra_config
            ),
        )
        .unwrap();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("docker-registry must be installed (scripts/install-deps.sh)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "registry did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Access-log lines of GET requests for this blob digest.
    pub fn blob_gets(&self, digest: &str) -> usize {
        self.log()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
            .count()
    }

    /// The registry's file holding a blob, to corrupt it in fault tests.
    pub fn blob_data_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap();
        self.dir.path().join(format!(
            "data/docker/registry/v2/blobs/sha256/{}/{}/data",
            &hex[..2],
            hex
        ))
    }

    /// The registry process's PID (0 when stopped), to SIGSTOP it.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Build (cached) and push test images to `reg`; returns name → manifest digest.
/// Builds are serialised across test threads and processes with a lock file.
pub fn push_images(reg: &Registry, names: &[&str]) -> std::collections::HashMap<String, String> {
    let cache = std::env::var("LAZYLAYER_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo_root().join(".cache/images"));
    std::fs::create_dir_all(&cache).unwrap();
    let lock = std::fs::File::create(cache.join(".build.lock")).unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let out = Command::new("bash")
        .arg(repo_root().join("images/build.sh"))
        .arg("--cache")
        .arg(&cache)
        .arg("--registry")
        .arg(reg.addr())
        .args(names)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "images/build.sh failed");
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(n, d)| (n.to_string(), d.trim().to_string()))
        })
        .collect()
}

pub fn image_ref(reg: &Registry, name: &str) -> String {
    format!("{}/lazylayer/{name}:latest", reg.addr())
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// A kernel mount that is unmounted when dropped, even when a test panics.
pub struct Mount(pub PathBuf);

impl Mount {
    pub fn overlay_readonly(lowers: &[PathBuf], target: &Path) -> Mount {
        let opts = format!(
            "lowerdir={}",
            lowers
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(":")
        );
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(target)
            .status()
            .unwrap();
        assert!(st.success(), "overlay mount failed");
        Mount(target.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// Podman (Debian's 4.3) with a store of its own in a temp dir, configured as
/// this machine needs (runc, cgroupfs, file events, rlimits within the hard limit).
/// One Podman at a time in a test process: two at once (each with its own
/// root and runroot) were seen to fail `podman run` with "getting exit code
/// of container ... from DB: no such exit code" on this machine's podman 4.3.
static PODMAN_SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub struct Podman {
    pub dir: tempfile::TempDir,
    stack: Stack,
    /// Released after `Drop` has reset this podman's store.
    _serial: std::sync::MutexGuard<'static, ()>,
}

impl Default for Podman {
    fn default() -> Self {
        Self::new()
    }
}

impl Podman {
    pub fn new() -> Podman {
        Podman::on(Stack::Bookworm)
    }

    /// The podman of `stack` (Podman 5.8 for sid), with the same settings.
    pub fn on(stack: Stack) -> Podman {
        // A test that panicked while holding it poisons it; the lock still serialises.
        let serial = PODMAN_SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let dir = stack.tempdir();
        std::fs::write(
            dir.path().join("containers.conf"),
            "[containers]\ndefault_ulimits = [\"nofile=20000:20000\", \"nproc=32768:32768\"]\n[engine]\nruntime = \"runc\"\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n",
        )
        .unwrap();
        Podman {
            dir,
            stack,
            _serial: serial,
        }
    }

    /// Use `toml` as containers-storage's configuration (storage.conf) from
    /// now on, e.g. for its pull options.
    pub fn set_storage_conf(&self, toml: &str) {
        std::fs::write(self.dir.path().join("storage.conf"), toml).unwrap();
    }

    pub fn cmd(&self) -> Command {
        let mut c = self.stack.command("podman");
        let storage_conf = self.dir.path().join("storage.conf");
        if storage_conf.exists() {
            c.env("CONTAINERS_STORAGE_CONF", storage_conf);
        }
        // Podman 5 warns on every command of this host's cgroups v1.
        c.env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .arg("--root")
            .arg(self.dir.path().join("root"))
            .arg("--runroot")
            .arg(self.dir.path().join("runroot"))
            .args(["--storage-driver", "overlay"]);
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        self.ok_with(&[], args)
    }

    /// `podman GLOBAL... ARGS...` (e.g. `--storage-opt` for an additional
    /// layer store), which must succeed; its stdout.
    pub fn ok_with(&self, global: &[&str], args: &[&str]) -> String {
        let out = self.cmd().args(global).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "podman {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Mount an image's root file system (as podman applies its layers); returns the path.
    pub fn image_mount(&self, image: &str) -> PathBuf {
        PathBuf::from(self.ok(&["image", "mount", image]).trim())
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let _ = self
            .cmd()
            .args(["image", "unmount", "--all", "--force"])
            .output();
        let _ = self.cmd().args(["system", "reset", "--force"]).output();
        unmount_below(self.dir.path());
    }
}

/// containerd (the host's 1.6, or the [`Stack`]'s) with its own root, state
/// and socket (CRI disabled unless started with [`Containerd::start_cri`]),
/// stopped on drop.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    child: Child,
    stack: Stack,
}

impl Containerd {
    pub fn start() -> Containerd {
        Self::start_with("")
    }

    /// `extra`: TOML appended to the config (e.g. a proxy snapshotter).
    pub fn start_with(extra: &str) -> Containerd {
        Self::spawn(Stack::Bookworm, extra, false)
    }

    /// [`Containerd::start_with`] on `stack`: `extra` in the config
    /// version of its containerd (2 for 1.6, 3 for 2.x).
    pub fn start_on(stack: Stack, extra: &str) -> Containerd {
        Self::spawn(stack, extra, false)
    }

    /// Like [`Containerd::start_with`], but with the CRI plugin enabled (as
    /// on a Kubernetes node), its CNI directories inside the temp dir (none
    /// needed for image pulls). `extra` may add tables under
    /// `[plugins."io.containerd.grpc.v1.cri"]` (`.containerd`, `.registry...`)
    /// but not that table itself.
    pub fn start_cri(extra: &str) -> Containerd {
        Self::spawn(Stack::Bookworm, extra, true)
    }

    /// [`Containerd::start_cri`] on `stack`.
    pub fn start_cri_on(stack: Stack, extra: &str) -> Containerd {
        Self::spawn(stack, extra, true)
    }

    fn spawn(stack: Stack, extra: &str, cri: bool) -> Containerd {
        let dir = stack.tempdir();
        let d = dir.path();
        let cfg = d.join("config.toml");
        // containerd 1.6 reads version 2; 2.x reads version 3, whose CRI is
        // two plugins (images, runtime). A 2.x given version 2 migrates it,
        // but not every part: an unpack_config of the Transfer Service was
        // lost beside a CRI section.
        let (version, cri_runtime, cri_plugins) = match stack {
            Stack::Bookworm => (2, "io.containerd.grpc.v1.cri", "\"io.containerd.grpc.v1.cri\""),
            Stack::Sid => (
                3,
                "io.containerd.cri.v1.runtime",
                "\"io.containerd.grpc.v1.cri\", \"io.containerd.cri.v1.images\", \"io.containerd.cri.v1.runtime\"",
            ),
        };
        let plugins = if cri {
            format!(
                "[plugins.\"{cri_runtime}\".cni]\n  conf_dir = \"{0}/cni/net.d\"\n  bin_dir = \"{0}/cni/bin\"\n",
                d.display()
            )
        } else {
            format!("disabled_plugins = [{cri_plugins}]\n")
        };
        let (globals, tables) = if cri {
            (String::new(), plugins)
        } else {
            (plugins, String::new())
        };
        std::fs::write(
            &cfg,
            format!(
                "version = {version}\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n{2}[grpc]\n  address = \"{0}/containerd.sock\"\n[ttrpc]\n  address = \"{0}/containerd.sock.ttrpc\"\n[debug]\n  address = \"{0}/debug.sock\"\n{3}{1}\n",
                d.display(),
                extra,
                globals,
                tables
            ),
        )
        .unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let child = stack
            .command("containerd")
            .arg("--config")
            .arg(&cfg)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("containerd must be installed");
        let sock = d.join("containerd.sock");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::os::unix::net::UnixStream::connect(&sock).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start: {}",
                std::fs::read_to_string(d.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Containerd { dir, child, stack }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn ctr(&self) -> Command {
        let mut c = self.stack.command("ctr");
        c.arg("--address").arg(self.socket());
        c
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.ctr().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Tasks first, so shims exit and their mounts go (in every
        // namespace: CRI tests use "k8s.io").
        let namespaces = self
            .ctr()
            .args(["namespaces", "ls", "-q"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
            .unwrap_or_default();
        let mut namespaces: Vec<&str> = namespaces.lines().collect();
        if !namespaces.contains(&"default") {
            namespaces.push("default");
        }
        for ns in namespaces {
            if let Ok(out) = self.ctr().args(["-n", ns, "tasks", "ls", "-q"]).output() {
                for id in String::from_utf8_lossy(&out.stdout).lines() {
                    let _ = self
                        .ctr()
                        .args(["-n", ns, "tasks", "kill", "-s", "KILL", id])
                        .output();
                    let _ = self
                        .ctr()
                        .args(["-n", ns, "tasks", "delete", "-f", id])
                        .output();
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        unmount_below(self.dir.path());
    }
}

/// Unmount everything mounted at or below `dir` (last mounted first).
pub fn unmount_below(dir: &Path) {
    for t in mounts_below(dir).iter().rev() {
        let _ = Command::new("umount").args(["-l", t]).status();
    }
}

/// The kernel stack of every task of process `pid` (needs root): where a
/// process that does not exit is stuck.
pub fn task_stacks(pid: u32) -> String {
    let mut out = String::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let p = t.path();
        let read = |f: &str| std::fs::read_to_string(p.join(f)).unwrap_or_default();
        out += &format!(
            "task {} ({}):\n{}",
            p.display(),
            read("comm").trim(),
            read("stack")
        );
    }
    out
}

/// End the FUSE connections of the mounts at or below `dir`: every request
/// waiting on them fails. A forced unmount (`MNT_FORCE`) aborts a FUSE
/// connection whether or not the mount is busy (it then stays, dead). For
/// a test that finds a server stuck, so that nothing stays stuck after it.
pub fn abort_fuse_below(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    for l in mounts.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        if let (Some(at), Some(fs_type)) = (f.get(1), f.get(2)) {
            if fs_type.starts_with("fuse") && Path::new(at).starts_with(dir) {
                let _ = rustix::mount::unmount(*at, rustix::mount::UnmountFlags::FORCE);
            }
        }
    }
}

/// True when `path` (as given) is a mount point of this mount namespace.
pub fn is_mount_point(path: &Path) -> bool {
    let p = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(&*p))
}

/// Mount points at or below `dir` (whole path components: `/x/a` is not
/// below `/x/ab`), in mount order.
pub fn mounts_below(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(str::to_string))
        .filter(|t| Path::new(t).starts_with(dir))
        .collect()
}

/// The file-system types of the mounts at or below `dir`, in mount order
/// (`fuse.lazylayer`, `overlay`).
pub fn mount_types_below(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let (at, fs_type) = (f.get(1)?, f.get(2)?);
            Path::new(at).starts_with(dir).then(|| fs_type.to_string())
        })
        .collect()
}

/// Runc containers of the store at `root` as (id, status).
pub fn runc_containers(root: &Path) -> Vec<(String, String)> {
    let out = Command::new("runc")
        .arg("--root")
        .arg(root.join("runc"))
        .args(["list", "--format", "json"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let s = |k: &str| c[k].as_str().unwrap_or_default().to_string();
                    (s("id"), s("status"))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Pin files left in the store at `root`.
pub fn pins_left(root: &Path) -> Vec<String> {
    std::fs::read_dir(root.join("pins"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// On drop (even when a test panics): kills the runc containers of the store
/// at `root` and unmounts what is mounted below it, which a killed or
/// misbehaving `lazylayer run` may have left.
pub struct StoreLeftovers(pub PathBuf);

impl Drop for StoreLeftovers {
    fn drop(&mut self) {
        for (id, _) in runc_containers(&self.0) {
            let _ = Command::new("runc")
                .arg("--root")
                .arg(self.0.join("runc"))
                .args(["delete", "--force", &id])
                .output();
        }
        unmount_below(&self.0);
        // A descriptor holder keeps the connections of roots a killed
        // server left; with the mounts gone it exits on its own, and is
        // stopped here in any case.
        for h in ["podman-store/holder.pid", "snapshotter/holder.pid"] {
            let pid = std::fs::read_to_string(self.0.join(h)).ok();
            if let Some(pid) = pid.and_then(|p| p.trim().parse::<i32>().ok()) {
                if let Some(pid) = rustix::process::Pid::from_raw(pid) {
                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                }
            }
        }
    }
}

/// On drop (even when a test panics): unmounts what is mounted below the
/// directory (a directory that is no store: nothing else is touched).
pub struct UnmountBelow(pub PathBuf);

impl Drop for UnmountBelow {
    fn drop(&mut self) {
        unmount_below(&self.0);
    }
}

/// A child process that is killed (SIGKILL, by its PID) and reaped on drop.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Send `sig` to process `pid`.
pub fn send_signal(pid: u32, sig: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(pid as i32).unwrap();
    rustix::process::kill_process(pid, sig).unwrap();
}

/// SIGKILL `child` and reap it. One that has not exited `within` (a thread
/// stuck on a FUSE mount whose server died with it) fails the test with its
/// kernel stacks, after the FUSE connections below `mounts` are ended so
/// that nothing stays stuck.
pub fn kill_9_and_reap(child: &mut Child, mounts: &Path, what: &str, within: Duration) {
    send_signal(child.id(), rustix::process::Signal::KILL);
    let deadline = Instant::now() + within;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let stacks = task_stacks(child.id());
            abort_fuse_below(mounts);
            let _ = child.wait();
            panic!("{what}, it did not exit in {within:?}; stuck in:\n{stacks}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Waits (up to `within`) for `child` to exit; its exit code (None: killed by a signal).
pub fn wait_exit(child: &mut Child, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code();
        }
        assert!(Instant::now() < deadline, "no exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Wait until `n` mounts exist below `root` (the workload is up), then send
/// SIGINT to `child` as a terminal's Ctrl-C would.
/// Where the store at `root` keeps layer `digest` ("sha256:…") extracted
/// (the directory holding `fs/` and `layer.json`).
/// Wait (up to 30 s) until at least `n` mounts exist below `root`.
pub fn wait_mounted(root: &Path, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while mounts_below(root).len() < n {
        assert!(Instant::now() < deadline, "workload did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A kernel overlayfs mount, unmounted on drop (detached if busy), even
/// when a test panics. `lowers` top first; without `upper_work` the mount is
/// read-only.
pub struct Overlay {
    pub target: PathBuf,
}

impl Overlay {
    pub fn mount(
        lowers: &[&Path],
        upper_work: Option<(&Path, &Path)>,
        target: &Path,
    ) -> std::io::Result<Overlay> {
        let lower: Vec<String> = lowers.iter().map(|p| p.display().to_string()).collect();
        let mut data = format!("lowerdir={}", lower.join(":"));
        if let Some((u, w)) = upper_work {
            data.push_str(&format!(
                ",upperdir={},workdir={}",
                u.display(),
                w.display()
            ));
        }
        let data = std::ffi::CString::new(data).unwrap();
        let flags = if upper_work.is_none() {
            rustix::mount::MountFlags::RDONLY
        } else {
            rustix::mount::MountFlags::empty()
        };
        rustix::mount::mount("overlay", target, "overlay", flags, data.as_c_str())?;
        Ok(Overlay {
            target: target.to_path_buf(),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        use rustix::mount::{unmount, UnmountFlags};
        if unmount(&self.target, UnmountFlags::empty()).is_err() {
            let _ = unmount(&self.target, UnmountFlags::DETACH);
        }
    }
}

/// A process's open descriptors (0 when it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// A process's thread count (0 when it is gone).
pub fn thread_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task")).map_or(0, |d| d.count())
}

/// A process's resident memory (VmRSS) in kB (0 when it is gone).
pub fn vm_rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Leak figures of a server restarted again and again under a running
/// container, its lazy roots kept by a descriptor holder.
pub struct RestartFigures {
    mounts0: usize,
    holder: u32,
    holder_fds0: usize,
    holder_rss0: u64,
    rows: Vec<RestartRow>,
}

/// (restart, mounts, holder PID, holder fds, holder kB, server kB, server fds)
type RestartRow = (usize, usize, Option<u32>, usize, u64, u64, usize);

impl RestartFigures {
    /// The baseline: `mounts` the test counts, the holder's PID.
    pub fn new(mounts: usize, holder: u32) -> RestartFigures {
        RestartFigures {
            mounts0: mounts,
            holder,
            holder_fds0: fd_count(holder),
            holder_rss0: vm_rss_kb(holder),
            rows: Vec::new(),
        }
    }

    /// After restart `k`: the mounts counted, the holder's PID now, the
    /// new server's PID.
    pub fn record(&mut self, k: usize, mounts: usize, holder: Option<u32>, server: u32) {
        let h = self.holder;
        self.rows.push((
            k,
            mounts,
            holder,
            fd_count(h),
            vm_rss_kb(h),
            vm_rss_kb(server),
            fd_count(server),
        ));
    }

    /// Print the table; fail on any growth: mounts and holder descriptors
    /// constant, the same holder throughout, its memory within 1 MB, the
    /// servers' descriptors level (each is a new process).
    pub fn check(&self, server: &str) {
        eprintln!(
            "restart mounts holder_pid holder_fds holder_rss_kb {server}_rss_kb {server}_fds"
        );
        for r in &self.rows {
            eprintln!("{} {} {:?} {} {} {} {}", r.0, r.1, r.2, r.3, r.4, r.5, r.6);
        }
        eprintln!(
            "before: mounts {} holder fds {} holder rss {} kB",
            self.mounts0, self.holder_fds0, self.holder_rss0
        );
        for r in &self.rows {
            assert_eq!(r.1, self.mounts0, "mounts after restart {}", r.0);
            assert_eq!(r.2, Some(self.holder), "the same holder keeps the roots");
            assert_eq!(
                r.3, self.holder_fds0,
                "holder descriptors after restart {}",
                r.0
            );
        }
        let (first, last) = (&self.rows[1], self.rows.last().unwrap());
        assert!(
            last.4 < self.holder_rss0 + 1024,
            "holder memory grew: {} -> {} kB",
            self.holder_rss0,
            last.4
        );
        assert!(
            last.6 <= first.6 + 8,
            "{server} fds {} -> {}",
            first.6,
            last.6
        );
    }
}

/// `len` bytes that do not compress (xorshift from `seed`), the same for the
/// same seed: a layer's or chunk's compressed size is then about its
/// content's, and its raw bytes appear in the compressed stream.
pub fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}
