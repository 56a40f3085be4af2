//! The `lazylayer` binary under test, on top of the shared test support
//! (`lazylayer-testsupport`: the real registry and peers, mount guards, tree
//! snapshots, the fault-injecting proxy).
#![allow(dead_code)]

// The peers, guards and snapshots every crate's tests share.
pub use lazylayer_testsupport::*;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

/// Run the lazylayer binary with a store at `root`.
pub fn lazylayer(root: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .arg("--root")
        .arg(root)
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    eprintln!(
        "$ lazylayer {}\n-- stdout:\n{}-- stderr:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `lazylayer run ARGS` with a store at `root` (stdin closed, as `output`
/// leaves it), its output printed.
pub fn lazylayer_run(root: &Path, args: &[&str]) -> Output {
    let mut a = vec!["run"];
    a.extend_from_slice(args);
    lazylayer(root, &a)
}

pub fn lazylayer_ok(root: &Path, args: &[&str]) -> String {
    let out = lazylayer(root, args);
    assert!(
        out.status.success(),
        "lazylayer {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn lazylayer_json(root: &Path, args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&lazylayer_ok(root, &a)).unwrap()
}

/// Every path under `dir` (relative), for "the store did not change" checks.
/// Optimize `name` from `reg` into `optimized/NAME:boot`, with a store of
/// its own (`extra` appended to the command line, e.g. `--`, CMD...);
/// returns (that store, SRC, DST).
pub fn optimize_image(
    reg: &Registry,
    name: &str,
    extra: &[&str],
) -> (tempfile::TempDir, String, String) {
    let store = tempfile::tempdir().unwrap();
    let src = image_ref(reg, name);
    let dst = format!("{}/optimized/{name}:boot", reg.addr());
    // --json before SRC: `extra` may end in `-- CMD`.
    let mut args = vec!["optimize", "--json", &src, &dst];
    args.extend_from_slice(extra);
    let rep: serde_json::Value = serde_json::from_str(&lazylayer_ok(store.path(), &args)).unwrap();
    assert!(rep["boot_layer_size"].as_u64().unwrap() > 0, "{rep}");
    (store, src, dst)
}

/// An image's manifest digest and layer digests (bottom first), from
/// `lazylayer inspect --json` on the store at `root`.
pub fn layer_digests(root: &Path, image: &str) -> (String, Vec<String>) {
    let v = lazylayer_json(root, &["inspect", image]);
    let layers = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    (v["digest"].as_str().unwrap().to_string(), layers)
}

/// The optimized python3 image in a registry, reached through a relaying
/// proxy (to slow or count its blobs): the registry, the optimizing store,
/// the optimized image's layer digests, the proxy, and the image's
/// reference through the proxy.
pub fn optimized_python3_behind_a_proxy() -> (
    Registry,
    tempfile::TempDir,
    Vec<String>,
    lazylayer_testsupport::proxy::CuttingProxy,
    String,
) {
    let reg = Registry::start();
    push_images(&reg, &["python3"]);
    let (opt_root, _src, dst) = optimize_image(&reg, "python3", &[]);
    let (_, layers) = layer_digests(opt_root.path(), &dst);
    let proxy = lazylayer_testsupport::proxy::CuttingProxy::relay(reg.port);
    let via = dst.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    (reg, opt_root, layers, proxy, via)
}

pub fn tree_listing(dir: &Path) -> Vec<String> {
    let mut v = Vec::new();
    fn walk(base: &Path, d: &Path, v: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                v.push(p.strip_prefix(base).unwrap().display().to_string());
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    walk(base, &p, v);
                }
            }
        }
    }
    walk(dir, dir, &mut v);
    v.sort();
    v
}

/// Whether the store at `root` has recorded an image: every layer of it is
/// local, so a start needs no registry.
pub fn image_recorded(root: &Path) -> bool {
    lazylayer_json(root, &["images"])
        .as_array()
        .is_some_and(|a| !a.is_empty())
}

/// The last regular file of at least `min` bytes in the gzip layer blob
/// `digest` of the store at `root`, in the blob's own order: a lazy read of
/// it waits for the most of a layer streamed in order, and for its own range
/// of at least `min` bytes.
pub fn last_big_file_of_layer(root: &Path, digest: &str, min: u64) -> String {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    let blob = std::fs::File::open(root.join("blobs/sha256").join(hex)).unwrap();
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    let mut last = None;
    for e in tar.entries().unwrap() {
        let e = e.unwrap();
        if e.header().entry_type().is_file() && e.size() >= min {
            let p = e.path().unwrap().to_string_lossy().into_owned();
            last = Some(p.trim_start_matches("./").to_string());
        }
    }
    last.expect("a file that big in the layer")
}

pub fn stored_layer(root: &Path, digest: &str) -> PathBuf {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    root.join("layers/sha256").join(hex)
}

pub fn interrupt_when_mounted(child: &Child, root: &Path, n: usize) {
    wait_mounted(root, n);
    std::thread::sleep(Duration::from_millis(300));
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
}

/// Regular files of `layer_fs` under usr/ between 64 KiB and 4 MiB, by
/// path: files to read for the first time, one per restart.
pub fn files_to_read(layer_fs: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for p in tree_listing(&layer_fs.join("usr")) {
        let full = layer_fs.join("usr").join(&p);
        if let Ok(m) = std::fs::symlink_metadata(&full) {
            if m.is_file() && (64 << 10..4 << 20).contains(&m.len()) {
                out.push(format!("usr/{p}"));
            }
        }
    }
    out
}

/// An auth.json in `dir` holding `user`'s `password` for `registry`
/// (named `<user>.json`).
pub fn auth_file(dir: &Path, registry: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine;
    let f = dir.join(format!("{user}.json"));
    // `auth`, the base64 of user:password: the form Docker and Podman both
    // read (containers/image ignores `username`/`password` fields).
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let entry = serde_json::json!({"auths": {registry: {"auth": auth}}});
    std::fs::write(&f, entry.to_string()).unwrap();
    f
}

/// `image` pulled into the store at `root` and pushed from there to
/// `target` with the credentials of `auth` (a private registry's).
pub fn push_with_auth(root: &Path, image: &str, target: &str, auth: &Path) {
    lazylayer_ok(root, &["pull", image]);
    let out = Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .arg("--root")
        .arg(root)
        .args(["push", image, target])
        .env("REGISTRY_AUTH_FILE", auth)
        .output()
        .unwrap();
    assert!(out.status.success(), "push {target}: {out:?}");
}

/// A kubelet credential provider plugin `<dir>/<name>`: it appends each
/// request to `<dir>/<name>.requests` (one per line) and answers `user`'s
/// `password` for the image pattern `key` (cache key type `Image`, cached
/// for an hour).
pub fn credential_provider_plugin(dir: &Path, name: &str, key: &str, user: &str, password: &str) {
    use std::os::unix::fs::PermissionsExt;
    let answer = serde_json::json!({
        "kind": "CredentialProviderResponse",
        "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
        "cacheKeyType": "Image",
        "cacheDuration": "1h",
        "auth": {key: {"username": user, "password": password}},
    });
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(
        &tmp,
        format!(
            "#!/bin/sh\ncat >> {log}\necho >> {log}\nprintf '%s' '{answer}'\n",
            log = dir.join(format!("{name}.requests")).display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    // Renamed into place: an executable still open for writing while
    // another thread forks is "text file busy".
    std::fs::rename(&tmp, dir.join(name)).unwrap();
}

/// The kubelet's CredentialProviderConfig for the plugin `name`, matching
/// images against `pattern`; written as `<dir>/<name>.yaml`.
pub fn credential_provider_config(dir: &Path, name: &str, pattern: &str) -> PathBuf {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n  - name: {name}\n    matchImages:\n      - \"{pattern}\"\n    defaultCacheDuration: \"12h\"\n    apiVersion: credentialprovider.kubelet.k8s.io/v1\n"
        ),
    )
    .unwrap();
    cfg
}
