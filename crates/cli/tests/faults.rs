//! Bad input gets a clear error and loses nothing: corrupt, truncated and
//! wrongly named blobs, hostile layer tars, registries that cut connections
//! or die, and registries that want a password.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;

use common::auth::TokenIssuer;
use common::proxy::{AfterCut, CuttingProxy};
use common::*;
use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{ClientConfig, Digest, Reference, RegistryClient};

/// The store holds no image, no layer and no leftovers; no partial
/// download either (bad bytes are never resumed from).
fn assert_store_empty(root: &Path) {
    for sub in ["images", "layers/sha256", "tmp"] {
        let l = tree_listing(&root.join(sub));
        assert!(l.is_empty(), "{sub} not empty after a failed pull: {l:?}");
    }
    assert_no_partials(root);
}

fn assert_no_partials(root: &Path) {
    let files: Vec<String> = tree_listing(&root.join("partial"))
        .into_iter()
        .filter(|p| root.join("partial").join(p).is_file())
        .collect();
    assert!(files.is_empty(), "partial downloads left: {files:?}");
}

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

#[test]
fn corrupt_blob_is_rejected_by_digest_and_store_unchanged() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let image = image_ref(&reg, "busybox");
    let probe = tempfile::tempdir().unwrap();
    let v = lazylayer_json(probe.path(), &["inspect", &image]);
    let layer = v["layers"][0]["digest"].as_str().unwrap().to_string();
    // Same size, one byte flipped in the middle: only the digest can tell.
    let data = reg.blob_data_path(&layer);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();

    let root = tempfile::tempdir().unwrap();
    let out = lazylayer(root.path(), &["pull", &image]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(&layer) && (err.contains("corrupt") || err.contains("digest")),
        "error must name the layer and the cause: {err}"
    );
    assert_store_empty(root.path());
}

#[test]
fn truncated_blob_gives_size_error_and_store_unchanged() {
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let image = image_ref(&reg, "multilayer");
    let probe = tempfile::tempdir().unwrap();
    let v = lazylayer_json(probe.path(), &["inspect", &image]);
    let big = v["layers"][1]["digest"].as_str().unwrap().to_string();
    let data = reg.blob_data_path(&big);
    let len = std::fs::metadata(&data).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .unwrap()
        .set_len(len / 2)
        .unwrap();

    let root = tempfile::tempdir().unwrap();
    let out = lazylayer(root.path(), &["pull", &image]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&big), "names the layer: {err}");
    assert!(
        err.contains(&format!("expected {len} bytes")),
        "says what is wrong: {err}"
    );
    // Other layers may have completed (they are valid); the broken one and the image must not.
    assert!(tree_listing(&root.path().join("images")).is_empty());
    assert!(!stored_layer(root.path(), &big).exists());
    assert!(tree_listing(&root.path().join("tmp")).is_empty());
    assert!(
        !root
            .path()
            .join("partial/sha256")
            .join(big.strip_prefix("sha256:").unwrap())
            .exists(),
        "a blob of the wrong size is not kept to resume from"
    );
}

#[test]
fn wrong_digest_reference_is_a_clear_error() {
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let root = tempfile::tempdir().unwrap();
    let bogus = format!(
        "{}/lazylayer/busybox@sha256:{}",
        reg.addr(),
        "ab".repeat(32)
    );
    let out = lazylayer(root.path(), &["pull", &bogus]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("not found"), "{}", stderr(&out));
    let out = lazylayer(
        root.path(),
        &[
            "pull",
            &format!("{}/lazylayer/busybox@sha256:xyz", reg.addr()),
        ],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("invalid digest"), "{}", stderr(&out));
    assert_store_empty(root.path());
}

// ---- hostile layers -------------------------------------------------------

/// One raw ustar header + data, written by hand: tar libraries refuse to
/// write the hostile names we need.
fn tar_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let oct = |h: &mut [u8; 512], off: usize, len: usize, v: u64| {
        let s = format!("{:0width$o}\0", v, width = len - 1);
        h[off..off + len].copy_from_slice(s.as_bytes());
    };
    oct(&mut h, 100, 8, 0o644);
    oct(&mut h, 108, 8, 0);
    oct(&mut h, 116, 8, 0);
    oct(&mut h, 124, 12, data.len() as u64);
    oct(&mut h, 136, 12, 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// Push a one-layer image made of `tar` to `reg` as `lazylayer/NAME:latest`.
fn push_single_layer_image(reg: &Registry, name: &str, tar: Vec<u8>) -> String {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let reference: Reference = image_ref(reg, name).parse().unwrap();
        let diff_id = Digest::sha256_of(&tar);
        let layer = gzip(&tar);
        let layer_digest = Digest::sha256_of(&layer);
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":["{diff_id}"]}}}}"#
        );
        let config_digest = Digest::sha256_of(config.as_bytes());
        let repo = &reference.repository;
        client
            .push_blob(repo, &layer_digest, layer.len() as u64, &BlobSource::Bytes(layer.clone().into()), None)
            .await
            .unwrap();
        client
            .push_blob(repo, &config_digest, config.len() as u64, &BlobSource::Bytes(config.clone().into_bytes().into()), None)
            .await
            .unwrap();
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        );
        client
            .put_manifest(&reference, "application/vnd.oci.image.manifest.v1+json", manifest.into_bytes().into())
            .await
            .unwrap();
        image_ref(reg, name)
    })
}

#[test]
fn hostile_layers_are_refused_and_nothing_escapes() {
    let reg = Registry::start();
    let outside = tempfile::tempdir().unwrap();
    let victim = outside.path().join("victim");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "dotdot",
            {
                let mut t = Vec::new();
                tar_entry(&mut t, "../../../../../../tmp/evil-dotdot", b'0', "", b"x");
                t
            },
            "..",
        ),
        (
            "absolute",
            {
                let mut t = Vec::new();
                tar_entry(&mut t, &victim.display().to_string(), b'0', "", b"x");
                t
            },
            "absolute",
        ),
        (
            "symlink-escape",
            {
                let mut t = Vec::new();
                tar_entry(
                    &mut t,
                    "link",
                    b'2',
                    &outside.path().display().to_string(),
                    b"",
                );
                tar_entry(&mut t, "link/victim", b'0', "", b"x");
                t
            },
            "symlink",
        ),
        (
            "hardlink-escape",
            {
                let mut t = Vec::new();
                tar_entry(&mut t, "h", b'1', "../../../../../../etc/passwd", b"");
                t
            },
            "link",
        ),
        (
            "truncated",
            {
                let mut t = Vec::new();
                tar_entry(&mut t, "big", b'0', "", &[7u8; 4096]);
                t.truncate(512 + 1000);
                t
            },
            "",
        ),
    ];
    for (name, tar, needle) in cases {
        let image = push_single_layer_image(&reg, name, tar);
        let root = tempfile::tempdir().unwrap();
        let out = lazylayer(root.path(), &["pull", &image]);
        assert!(!out.status.success(), "{name}: hostile layer accepted");
        let err = stderr(&out).to_lowercase();
        assert!(
            err.contains("layer sha256:"),
            "{name}: error names the layer: {err}"
        );
        assert!(
            err.contains(needle),
            "{name}: error says why ({needle}): {err}"
        );
        assert_store_empty(root.path());
        assert!(!victim.exists(), "{name}: wrote outside the root");
        assert!(
            !Path::new("/tmp/evil-dotdot").exists(),
            "{name}: wrote outside the root"
        );
    }
}

// ---- broken connections ---------------------------------------------------

#[test]
fn download_cut_halfway_resumes_with_range() {
    let reg = Registry::start();
    let digests = push_images(&reg, &["multilayer"]);
    // Cut the first connection that has sent 2 MB: that is inside the 5 MB layer.
    let proxy = CuttingProxy::start(reg.port, 2_000_000, AfterCut::Heal);
    let root = tempfile::tempdir().unwrap();
    let image = format!("127.0.0.1:{}/lazylayer/multilayer:latest", proxy.port);
    let v = lazylayer_json(root.path(), &["pull", &image]);
    assert_eq!(v["manifest_digest"], digests["multilayer"]);
    assert_eq!(
        proxy.cuts.load(Ordering::Relaxed),
        1,
        "the proxy cut a connection"
    );
    let reqs = proxy.requests.lock().unwrap().join("\n").to_lowercase();
    assert!(
        reqs.contains("range: bytes="),
        "resumed with a Range request"
    );
    assert!(
        reg.log().contains("\" 206 "),
        "registry served a partial response"
    );
    // Resumed, not restarted: fetched bytes equal the image size, not more than one extra layer.
    let size: u64 = v["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["size"].as_u64().unwrap())
        .sum();
    assert_eq!(v["bytes_fetched"].as_u64().unwrap(), size);
}

#[test]
fn registry_dying_mid_layer_gives_clear_error_and_store_unchanged() {
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let proxy = CuttingProxy::start(reg.port, 2_000_000, AfterCut::Die);
    let root = tempfile::tempdir().unwrap();
    let image = format!("127.0.0.1:{}/lazylayer/multilayer:latest", proxy.port);
    let out = lazylayer(root.path(), &["pull", &image]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("cannot reach registry") || err.contains("gave up after"),
        "{err}"
    );
    assert!(err.contains("sha256:"), "names the layer: {err}");
    assert!(tree_listing(&root.path().join("images")).is_empty());
    assert!(tree_listing(&root.path().join("tmp")).is_empty());
    assert_eq!(proxy.cuts.load(Ordering::Relaxed), 1);
}

#[test]
fn registry_down_is_a_clear_error() {
    let mut reg = Registry::start();
    push_images(&reg, &["busybox"]);
    reg.stop();
    let root = tempfile::tempdir().unwrap();
    let out = lazylayer(root.path(), &["pull", &image_ref(&reg, "busybox")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("cannot reach registry"), "{err}");
    assert_store_empty(root.path());
    // And after a restart the same pull works.
    reg.restart();
    lazylayer_json(root.path(), &["pull", &image_ref(&reg, "busybox")]);
}

/// An auth file (Docker's format) giving alice:s3cret-pw for `registry`.
fn alice_auth_file(dir: &Path, registry: &str) -> std::path::PathBuf {
    let f = dir.join("auth.json");
    // base64("alice:s3cret-pw")
    std::fs::write(
        &f,
        format!(r#"{{"auths":{{"{registry}":{{"auth":"YWxpY2U6czNjcmV0LXB3"}}}}}}"#),
    )
    .unwrap();
    f
}

/// Run lazylayer with HOME at `home` (so no user auth file leaks in) and
/// `auth` as REGISTRY_AUTH_FILE, or none.
fn lazylayer_authed(
    root: &Path,
    home: &Path,
    auth: Option<&Path>,
    args: &[&str],
) -> std::process::Output {
    authed_cmd(root, home, auth).args(args).output().unwrap()
}

/// The command [`lazylayer_authed`] runs, before its arguments.
fn authed_cmd(root: &Path, home: &Path, auth: Option<&Path>) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    c.arg("--root").arg(root).env("HOME", home);
    match auth {
        Some(a) => c.env("REGISTRY_AUTH_FILE", a),
        None => c.env_remove("REGISTRY_AUTH_FILE"),
    };
    c
}

/// `pull --json image` into a fresh store with `auth`; it must succeed and
/// give `manifest_digest`.
fn pull_fresh_authed(
    home: &Path,
    auth: &Path,
    image: &str,
    manifest_digest: &str,
) -> std::process::Output {
    let fresh = tempfile::tempdir().unwrap();
    let pulled = lazylayer_authed(fresh.path(), home, Some(auth), &["pull", "--json", image]);
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    let v: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(v["manifest_digest"], manifest_digest);
    pulled
}

// ---- auth -----------------------------------------------------------------

#[test]
fn basic_auth_from_auth_file() {
    // Written first: an executable written while other threads fork can be
    // "text file busy" for a moment.
    let helper_dir = credential_helper();
    let open = Registry::start();
    let digests = push_images(&open, &["busybox"]);
    let secrets = tempfile::tempdir().unwrap();
    let locked = Registry::start_with(&common::auth::htpasswd_config(
        secrets.path(),
        &[("alice", "s3cret-pw")],
    ));
    let auth_file = alice_auth_file(secrets.path(), &locked.addr());

    let root = tempfile::tempdir().unwrap();
    lazylayer_json(root.path(), &["pull", &image_ref(&open, "busybox")]);
    let dst = format!("{}/private/busybox:latest", locked.addr());
    let run = |args: &[&str], with_auth: bool| {
        lazylayer_authed(
            root.path(),
            secrets.path(),
            with_auth.then_some(auth_file.as_path()),
            args,
        )
    };
    let denied = run(&["push", &image_ref(&open, "busybox"), &dst], false);
    assert!(!denied.status.success());
    let err = stderr(&denied);
    assert!(
        err.contains("no credentials") || err.contains("asks for a password"),
        "{err}"
    );
    let pushed = run(
        &["push", "--json", &image_ref(&open, "busybox"), &dst],
        true,
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    let pulled = pull_fresh_authed(secrets.path(), &auth_file, &dst, &digests["busybox"]);

    // The same password from a credential helper named by Docker's config.json.
    let docker_cfg = secrets.path().join("docker");
    std::fs::create_dir(&docker_cfg).unwrap();
    std::fs::write(
        docker_cfg.join("config.json"),
        format!(r#"{{"credHelpers":{{"{}":"lltest"}}}}"#, locked.addr()),
    )
    .unwrap();
    let helper_pulled = authed_cmd(tempfile::tempdir().unwrap().path(), secrets.path(), None)
        .args(["pull", "--json", &dst])
        .env("DOCKER_CONFIG", &docker_cfg)
        .env("PATH", path_with(&helper_dir))
        .output()
        .unwrap();
    assert!(helper_pulled.status.success(), "{}", stderr(&helper_pulled));
    let asked = std::fs::read_to_string(helper_dir.path().join("asked")).unwrap();
    assert_eq!(
        asked.trim(),
        locked.addr(),
        "the helper is asked for the registry"
    );
    for o in [&denied, &pushed, &pulled, &helper_pulled] {
        assert!(!stderr(o).contains("s3cret-pw"), "secret printed");
    }
}

/// A `docker-credential-lltest` in a fresh directory: gives alice's password
/// for any server and notes which one it was asked for.
fn credential_helper() -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("docker-credential-lltest");
    let script = format!(
        "#!/bin/sh\nread -r server\necho \"$server\" >> {}/asked\n\
         echo '{{\"ServerURL\":\"'\"$server\"'\",\"Username\":\"alice\",\"Secret\":\"s3cret-pw\"}}'\n",
        dir.path().display()
    );
    std::fs::write(&p, script).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

fn path_with(dir: &tempfile::TempDir) -> std::ffi::OsString {
    let mut paths = vec![dir.path().to_path_buf()];
    paths.extend(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    ));
    std::env::join_paths(paths).unwrap()
}

/// The kubelet's credential provider plugins as a credential source
/// (registries.credential_provider_config and _bin_dir, the kubelet's own
/// file and directory): a plugin whose pattern matches the private
/// registry gives alice's password, and the pull succeeds with nothing
/// else configured; a plugin giving a wrong password, or one whose
/// pattern does not match, leaves the pull refused with a clear error.
#[test]
fn credential_provider_plugins_open_a_private_registry() {
    let open = Registry::start();
    let digests = push_images(&open, &["busybox"]);
    let secrets = tempfile::tempdir().unwrap();
    let locked = Registry::start_with(&common::auth::htpasswd_config(
        secrets.path(),
        &[("alice", "s3cret-pw")],
    ));
    let auth_file = alice_auth_file(secrets.path(), &locked.addr());
    let pusher = tempfile::tempdir().unwrap();
    lazylayer_json(pusher.path(), &["pull", &image_ref(&open, "busybox")]);
    let dst = format!("{}/private/busybox:latest", locked.addr());
    let pushed = lazylayer_authed(
        pusher.path(),
        secrets.path(),
        Some(&auth_file),
        &["push", &image_ref(&open, "busybox"), &dst],
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));

    let plugins = tempfile::tempdir().unwrap();
    let addr = locked.addr();
    credential_provider_plugin(plugins.path(), "good", &addr, "alice", "s3cret-pw");
    credential_provider_plugin(plugins.path(), "wrong", &addr, "alice", "not-it");
    let pull_with = |provider: &str, pattern: &str| {
        let cfg = credential_provider_config(plugins.path(), provider, pattern);
        let toml = plugins.path().join(format!("{provider}.toml"));
        std::fs::write(
            &toml,
            format!(
                "[registries]\ncredential_provider_config = \"{}\"\ncredential_provider_bin_dir = \"{}\"\n",
                cfg.display(),
                plugins.path().display()
            ),
        )
        .unwrap();
        authed_cmd(tempfile::tempdir().unwrap().path(), secrets.path(), None)
            .arg("--config")
            .arg(&toml)
            .args(["pull", "--json", &dst])
            .output()
            .unwrap()
    };
    let pulled = pull_with("good", &locked.addr());
    assert!(pulled.status.success(), "{}", stderr(&pulled));
    let v: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    assert_eq!(v["manifest_digest"], digests["busybox"]);
    let request: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(plugins.path().join("good.requests"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(request["kind"], "CredentialProviderRequest");
    assert_eq!(
        request["image"],
        format!("{}/private/busybox", locked.addr())
    );

    let refused = pull_with("wrong", &locked.addr());
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("were refused"),
        "{}",
        stderr(&refused)
    );
    assert!(!stderr(&refused).contains("not-it"), "a secret in an error");

    let unmatched = pull_with("good", "elsewhere.example");
    assert!(!unmatched.status.success());
    assert!(
        stderr(&unmatched).contains("asks for a password"),
        "{}",
        stderr(&unmatched)
    );
}

/// The Bearer token flow against the real registry configured for token
/// auth ([`TokenIssuer`]).
#[test]
fn bearer_token_auth_against_real_registry() {
    let open = Registry::start();
    let digests = push_images(&open, &["busybox"]);
    let issuer = TokenIssuer::start();
    let locked = Registry::start_with(&issuer.registry_config());
    let secrets = tempfile::tempdir().unwrap();
    let auth_file = alice_auth_file(secrets.path(), &locked.addr());
    let root = tempfile::tempdir().unwrap();
    lazylayer_json(root.path(), &["pull", &image_ref(&open, "busybox")]);
    let dst = format!("{}/private/busybox:latest", locked.addr());
    let with_auth =
        |args: &[&str]| lazylayer_authed(root.path(), secrets.path(), Some(&auth_file), args);
    let pushed = with_auth(&["push", &image_ref(&open, "busybox"), &dst]);
    assert!(pushed.status.success(), "{}", stderr(&pushed));
    assert!(issuer.issued() >= 1, "a token was requested");
    pull_fresh_authed(secrets.path(), &auth_file, &dst, &digests["busybox"]);
    // Without credentials the issuer grants nothing and the registry refuses.
    let anon = lazylayer_authed(
        tempfile::tempdir().unwrap().path(),
        secrets.path(),
        None,
        &["pull", &dst],
    );
    assert!(!anon.status.success());
    assert!(
        stderr(&anon).contains("access denied") || stderr(&anon).contains("401"),
        "{}",
        stderr(&anon)
    );
}

/// Requests the registry answered 401 so far (its access log).
fn unauthorized_answers(reg: &Registry) -> usize {
    reg.log().lines().filter(|l| l.contains("\" 401 ")).count()
}

/// A bearer token outlives the process that obtained it: the next process
/// with the same store sends it with its first request (no 401, no token
/// request) while it is valid, the token file is private, and a token the
/// registry no longer accepts (its signing key rotated) costs one fresh
/// token request, not the pull. Other credentials never get it.
#[test]
fn bearer_tokens_are_reused_by_the_next_process_until_refused() {
    let open = Registry::start();
    let digests = push_images(&open, &["busybox"]);
    let issuer = TokenIssuer::start();
    let mut locked = Registry::start_with(&issuer.registry_config());
    let secrets = tempfile::tempdir().unwrap();
    let auth_file = alice_auth_file(secrets.path(), &locked.addr());
    let dst = format!("{}/private/busybox:latest", locked.addr());
    // Pushed from a store of its own: the pulls below start from none.
    let pusher = tempfile::tempdir().unwrap();
    lazylayer_json(pusher.path(), &["pull", &image_ref(&open, "busybox")]);
    let pushed = lazylayer_authed(
        pusher.path(),
        secrets.path(),
        Some(&auth_file),
        &["push", &image_ref(&open, "busybox"), &dst],
    );
    assert!(pushed.status.success(), "{}", stderr(&pushed));

    let root = tempfile::tempdir().unwrap();
    let pull = |root: &Path| {
        let out = lazylayer_authed(
            root,
            secrets.path(),
            Some(&auth_file),
            &["pull", "--json", &dst],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["manifest_digest"], digests["busybox"]);
    };
    // The image dropped from the store, so that the next pull fetches again.
    let rmi = |root: &Path| {
        let out = lazylayer_authed(root, secrets.path(), Some(&auth_file), &["rmi", &dst]);
        assert!(out.status.success(), "{}", stderr(&out));
    };
    // The first process pays the 401 and the token request.
    let (issued, refused) = (issuer.issued(), unauthorized_answers(&locked));
    pull(root.path());
    assert_eq!(issuer.issued(), issued + 1, "one token for the pull");
    assert!(unauthorized_answers(&locked) > refused);

    // The next process (the image dropped, so it fetches again) sends the
    // kept token at once: no token request, and no request refused.
    rmi(root.path());
    let (issued, refused) = (issuer.issued(), unauthorized_answers(&locked));
    let gets = locked.log().matches("\"GET /v2/private/busybox/").count();
    pull(root.path());
    assert_eq!(
        issuer.issued(),
        issued,
        "no token request by the second process"
    );
    assert_eq!(unauthorized_answers(&locked), refused, "no 401 round trip");
    assert!(
        locked.log().matches("\"GET /v2/private/busybox/").count() > gets,
        "the second pull did ask the registry"
    );

    // Kept private in the store.
    use std::os::unix::fs::MetadataExt;
    let tokens = root.path().join("tokens");
    assert_eq!(std::fs::metadata(&tokens).unwrap().mode() & 0o777, 0o700);
    let files: Vec<_> = std::fs::read_dir(&tokens)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert_eq!(std::fs::metadata(&files[0]).unwrap().mode() & 0o777, 0o600);
    let kept = std::fs::read_to_string(&files[0]).unwrap();
    assert!(!kept.contains("s3cret"), "no secret but the token: {kept}");

    // Another user of the same store (anonymous) is not given alice's token.
    let anon = lazylayer_authed(root.path(), secrets.path(), None, &["inspect", &dst]);
    assert!(
        !anon.status.success(),
        "{}",
        String::from_utf8_lossy(&anon.stdout)
    );

    // The registry's signing key rotates: the kept token is refused, one
    // new token is requested, the pull succeeds and the new token is kept.
    issuer.new_signing_key();
    locked.restart();
    rmi(root.path());
    let issued = issuer.issued();
    pull(root.path());
    assert_eq!(
        issuer.issued(),
        issued + 1,
        "one fresh token after the refusal"
    );
    let renewed = std::fs::read_to_string(&files[0]).unwrap();
    assert_ne!(renewed, kept, "the refused token was replaced");
    let issued = issuer.issued();
    rmi(root.path());
    pull(root.path());
    assert_eq!(issuer.issued(), issued, "the renewed token is reused");
}

// ---- endless bodies -------------------------------------------------------

/// What [`EndlessServer`] answers a manifest request with.
#[derive(Clone, Copy)]
enum Endless {
    /// This status, then a body that never ends.
    Status(u16),
    /// 401 with a Bearer challenge whose realm (this server's /token)
    /// answers 200 with JSON that never ends.
    Token,
}

/// A small real-HTTP server (HTTP/1.1 over TCP, keep-alive) standing in for
/// a broken or hostile registry: a real registry cannot be made to send an
/// endless body. Every endless body is written until the client closes.
struct EndlessServer {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EndlessServer {
    fn start(mode: Endless) -> EndlessServer {
        use std::sync::atomic::AtomicBool;
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                let Ok((conn, _)) = listener.accept() else {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    continue;
                };
                conn.set_nonblocking(false).unwrap();
                let st = st.clone();
                std::thread::spawn(move || Self::serve(conn, port, mode, &st));
            }
        });
        EndlessServer { port, stop }
    }

    fn serve(
        mut conn: std::net::TcpStream,
        port: u16,
        mode: Endless,
        stop: &std::sync::atomic::AtomicBool,
    ) {
        use std::io::Read;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            // One request head (no request here has a body).
            head.clear();
            while !head.ends_with(b"\r\n\r\n") {
                match conn.read(&mut byte) {
                    Ok(1) => head.push(byte[0]),
                    _ => return,
                }
            }
            let req = String::from_utf8_lossy(&head).to_string();
            let path = req.split_whitespace().nth(1).unwrap_or("").to_string();
            let (status, headers, filler): (String, String, &[u8]) = if path == "/v2/" {
                let r = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}";
                if conn.write_all(r.as_bytes()).is_err() {
                    return;
                }
                continue;
            } else if path.starts_with("/token") {
                (
                    "200 OK".into(),
                    "Content-Type: application/json\r\n".into(),
                    b"aaaaaaaaaaaaaaaa",
                )
            } else {
                match mode {
                    Endless::Status(code) => (
                        format!("{code} Oops"),
                        "Content-Type: text/plain\r\n".into(),
                        b"no manifest here; ",
                    ),
                    Endless::Token => {
                        let r = format!(
                            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://127.0.0.1:{port}/token\",service=\"endless\"\r\nContent-Length: 0\r\n\r\n"
                        );
                        if conn.write_all(r.as_bytes()).is_err() {
                            return;
                        }
                        continue;
                    }
                }
            };
            // No Content-Length and close-delimited: the body ends when the server
            // closes, which it never does.
            let mut out = format!("HTTP/1.1 {status}\r\n{headers}Connection: close\r\n\r\n");
            if path.starts_with("/token") {
                out.push_str("{\"token\":\"");
            }
            if conn.write_all(out.as_bytes()).is_err() {
                return;
            }
            let chunk = filler.repeat(65536 / filler.len());
            while !stop.load(Ordering::Relaxed) {
                if conn.write_all(&chunk).is_err() {
                    return;
                }
            }
            return;
        }
    }
}

impl Drop for EndlessServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Kills the child when dropped (a failed assertion included).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A process's peak resident memory (VmHWM) in kB, if it still runs.
fn peak_rss_kb(pid: u32) -> Option<u64> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Run `lazylayer pull image` against a fresh store, sampling its memory;
/// fails the test as soon as it passes `limit_mb` or runs past 90 s.
/// Returns (success, stderr, peak kB).
fn pull_memory_bounded(image: &str, limit_mb: u64) -> (bool, String, u64) {
    let root = tempfile::tempdir().unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"))
        .arg("--root")
        .arg(root.path())
        .args(["pull", image])
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    let t0 = std::time::Instant::now();
    let mut peak = 0;
    let status = loop {
        if let Some(kb) = peak_rss_kb(pid) {
            peak = peak.max(kb);
        }
        assert!(
            peak < limit_mb * 1024,
            "pull of {image} reached {} MB of memory",
            peak / 1024
        );
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(90),
            "pull of {image} still running after 90 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    eprintln!(
        "pull {image}: {status}, peak {} kB, {:.1} s\n{err}",
        peak,
        t0.elapsed().as_secs_f64()
    );
    (status.success(), err, peak)
}

#[test]
fn endless_error_bodies_are_cut_and_memory_stays_bounded() {
    for code in [500u16, 404] {
        let server = EndlessServer::start(Endless::Status(code));
        let image = format!("127.0.0.1:{}/x:y", server.port);
        let (ok, err, _peak) = pull_memory_bounded(&image, 100);
        assert!(!ok, "a {code} must fail the pull");
        assert!(err.contains(&code.to_string()), "names the status: {err}");
        assert!(err.contains("manifest of"), "names what was asked: {err}");
        assert!(err.len() < 4000, "the body is not dumped: {err}");
        if code == 500 {
            assert!(err.contains("body cut"), "says the body was cut: {err}");
        }
    }
}

#[test]
fn endless_token_response_is_refused_and_memory_stays_bounded() {
    let server = EndlessServer::start(Endless::Token);
    let image = format!("127.0.0.1:{}/x:y", server.port);
    let (ok, err, _peak) = pull_memory_bounded(&image, 100);
    assert!(!ok);
    assert!(
        err.contains("token response") && err.contains("refused"),
        "says the token response was too large: {err}"
    );
    assert!(err.len() < 4000, "the body is not dumped: {err}");
}

// ---- stalls ---------------------------------------------------------------

/// Run `cmd`, killing it if it runs longer than `limit`. Returns its output
/// and how long it ran, or panics naming `what` when it had to be killed.
fn output_within(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
    what: &str,
) -> (std::process::Output, std::time::Duration) {
    cmd.env_remove("RUST_LOG");
    output_within_env(cmd, limit, what)
}

/// [`output_within`] with the environment as `cmd` has it (RUST_LOG too).
fn output_within_env(
    mut cmd: std::process::Command,
    limit: std::time::Duration,
    what: &str,
) -> (std::process::Output, std::time::Duration) {
    use std::process::Stdio;
    let t0 = std::time::Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    // Drain both pipes on threads: a full pipe must not stall the child.
    let mut out_pipe = child.0.stdout.take().unwrap();
    let mut err_pipe = child.0.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut out_pipe, &mut v).ok();
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut err_pipe, &mut v).ok();
        v
    });
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            t0.elapsed() < limit,
            "{what}: still running after {limit:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let took = t0.elapsed();
    let out = std::process::Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    };
    eprintln!(
        "{what}: {status} after {:.1} s\n-- stderr:\n{}",
        took.as_secs_f64(),
        stderr(&out)
    );
    (out, took)
}

fn lazylayer_cmd(root: &Path) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_lazylayer"));
    c.arg("--root").arg(root);
    c
}

/// multilayer's big layer (5 MiB of random data): (digest, size).
fn big_layer(reg: &Registry, image: &str) -> (String, u64) {
    let _ = reg;
    let probe = tempfile::tempdir().unwrap();
    let v = lazylayer_json(probe.path(), &["inspect", image]);
    let l = &v["layers"][1];
    (
        l["digest"].as_str().unwrap().to_string(),
        l["size"].as_u64().unwrap(),
    )
}

#[test]
fn stalled_download_is_dropped_and_resumed_within_seconds() {
    let reg = Registry::start();
    let digests = push_images(&reg, &["multilayer"]);
    let (big, size) = big_layer(&reg, &image_ref(&reg, "multilayer"));
    // After 2 MB (inside the big layer) the connection goes silent but stays
    // open for 120 s; the next connection flows.
    let proxy = CuttingProxy::start(reg.port, 2_000_000, AfterCut::Stall);
    let root = tempfile::tempdir().unwrap();
    let image = format!("127.0.0.1:{}/lazylayer/multilayer:latest", proxy.port);
    let mut cmd = lazylayer_cmd(root.path());
    // The environment variable, not the flag: the same test run against a
    // build without the setting shows the old behaviour instead of a usage error.
    cmd.env("LAZYLAYER_STALL_TIMEOUT", "2")
        .args(["pull", "--json", &image]);
    let (out, took) = output_within(cmd, std::time::Duration::from_secs(100), "pull");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifest_digest"], digests["multilayer"]);
    assert_eq!(
        proxy.cuts.load(Ordering::Relaxed),
        1,
        "one connection stalled"
    );
    let starts = proxy.range_starts(&big);
    assert!(
        starts.iter().any(|n| *n > 0 && *n < size),
        "resumed with Range: bytes=N-: {starts:?}"
    );
    // reqwest's per-read timeout alone (30 s) would have taken far longer.
    assert!(
        took < std::time::Duration::from_secs(20),
        "stall detected and resumed in {took:?}"
    );
    assert!(
        !stderr(&out).contains("status 0") && !stderr(&out).contains("answered 0"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn trickling_and_dead_registries_are_detected() {
    let reg = Registry::start();
    let digests = push_images(&reg, &["multilayer"]);
    let (big, size) = big_layer(&reg, &image_ref(&reg, "multilayer"));

    // A byte a second after 2 MB: every read is "in time", but far below
    // the minimum speed (1 KiB/s over the stall window).
    let proxy = CuttingProxy::start(
        reg.port,
        2_000_000,
        AfterCut::Trickle(std::time::Duration::from_secs(1)),
    );
    let root = tempfile::tempdir().unwrap();
    let image = format!("127.0.0.1:{}/lazylayer/multilayer:latest", proxy.port);
    let mut cmd = lazylayer_cmd(root.path());
    cmd.env("LAZYLAYER_STALL_TIMEOUT", "2")
        .args(["pull", "--json", &image]);
    let (out, took) = output_within(cmd, std::time::Duration::from_secs(60), "trickled pull");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifest_digest"], digests["multilayer"]);
    let starts = proxy.range_starts(&big);
    assert!(
        starts.iter().any(|n| *n > 0 && *n < size),
        "resumed with Range: {starts:?}"
    );
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");
    drop(proxy);

    // Every connection stalls after 600 kB: the pull gives up after the
    // bounded tries, saying so in plain words.
    let proxy = CuttingProxy::start(reg.port, 600_000, AfterCut::StallAlways);
    let root = tempfile::tempdir().unwrap();
    let image = format!("127.0.0.1:{}/lazylayer/multilayer:latest", proxy.port);
    let mut cmd = lazylayer_cmd(root.path());
    cmd.args(["--stall-timeout", "2", "pull", &image]);
    let (out, took) = output_within(cmd, std::time::Duration::from_secs(90), "stalled pull");
    assert!(!out.status.success());
    let err = stderr(&out);
    let want = format!(
        "registry 127.0.0.1:{} stopped sending blob sha256:",
        proxy.port
    );
    assert!(err.contains(&want), "plain message: {err}");
    assert!(err.contains("(no data for 2 s); tried 5 times"), "{err}");
    assert!(
        err.contains(" of 5.2 MB") || err.contains(" MB of "),
        "{err}"
    );
    assert!(
        !err.contains("status 0") && !err.contains("answered 0"),
        "{err}"
    );
    assert!(
        took < std::time::Duration::from_secs(45),
        "gave up after {took:?}"
    );
    assert!(tree_listing(&root.path().join("images")).is_empty());
    assert!(tree_listing(&root.path().join("tmp")).is_empty());
}

/// A registry that takes the request for a blob and never answers (no
/// status, no headers) is a stall too: retried within the stall timeout, and
/// given up after the bounded tries in plain words.
#[test]
fn registry_not_answering_a_blob_request_is_a_stall() {
    let reg = Registry::start();
    let digests = push_images(&reg, &["multilayer"]);
    let (big, _) = big_layer(&reg, &image_ref(&reg, "multilayer"));
    let proxy = CuttingProxy::relay(reg.port);
    let image = format!("127.0.0.1:{}/lazylayer/multilayer:latest", proxy.port);

    // The first request for the layer gets no answer; the second does.
    *proxy.hold_answers.lock().unwrap() = (big.clone(), 1);
    let root = tempfile::tempdir().unwrap();
    let mut cmd = lazylayer_cmd(root.path());
    cmd.env("LAZYLAYER_STALL_TIMEOUT", "2")
        .args(["pull", "--json", &image]);
    let (out, took) = output_within(cmd, std::time::Duration::from_secs(60), "pull");
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["manifest_digest"], digests["multilayer"]);
    assert!(took < std::time::Duration::from_secs(20), "took {took:?}");

    // Never an answer: the pull ends after the bounded tries.
    *proxy.hold_answers.lock().unwrap() = (big.clone(), usize::MAX);
    let root = tempfile::tempdir().unwrap();
    let mut cmd = lazylayer_cmd(root.path());
    cmd.env("LAZYLAYER_STALL_TIMEOUT", "2")
        .args(["pull", &image]);
    let (out, took) = output_within(cmd, std::time::Duration::from_secs(60), "pull");
    assert!(!out.status.success());
    let err = stderr(&out);
    let want = format!(
        "registry 127.0.0.1:{} did not answer the request for blob {big}",
        proxy.port
    );
    assert!(err.contains(&want), "{err}");
    assert!(err.contains("within 2 s; tried 5 times"), "{err}");
    assert!(took < std::time::Duration::from_secs(30), "took {took:?}");
}

// ---- resuming cut layers from their partial download ---------------------

/// A one-layer image `lazylayer/NAME` whose layer is one file of `mb` MB of
/// random data: (reference, layer digest, layer size).
fn random_layer_image(reg: &Registry, name: &str, mb: usize) -> (String, String, u64) {
    let mut tar = Vec::new();
    tar_entry(
        &mut tar,
        "random.bin",
        b'0',
        "",
        &lazylayer_testsupport::incompressible(mb * 1_000_000, name.len() as u64 + 7),
    );
    tar.extend_from_slice(&[0u8; 1024]);
    let layer = gzip(&tar);
    let digest = Digest::sha256_of(&layer).to_string();
    let image = push_single_layer_image(reg, name, tar);
    (image, digest, layer.len() as u64)
}

/// The store holds `digest`'s blob, verified, and nothing half done.
fn assert_layer_complete(root: &Path, digest: &str) {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let blob = std::fs::read(root.join("blobs/sha256").join(hex)).unwrap();
    assert_eq!(
        Digest::sha256_of(&blob).to_string(),
        digest,
        "stored blob verifies"
    );
    assert!(stored_layer(root, digest).exists());
    assert!(tree_listing(&root.join("tmp")).is_empty(), "tmp/ empty");
    assert_no_partials(root);
}

fn partial_file(root: &Path, digest: &str) -> std::path::PathBuf {
    root.join("partial/sha256")
        .join(digest.strip_prefix("sha256:").unwrap())
}

#[test]
fn layer_cut_by_dying_registry_resumes_from_its_partial() {
    let reg = Registry::start();
    let (image, layer, size) = random_layer_image(&reg, "random6", 6);
    // The registry dies after ~30 % of the layer.
    let cut = CuttingProxy::start(reg.port, (size * 3 / 10) as usize, AfterCut::Die);
    let root = tempfile::tempdir().unwrap();
    let via = |p: &CuttingProxy| image.replace(&reg.addr(), &format!("127.0.0.1:{}", p.port));
    let out = lazylayer(root.path(), &["pull", &via(&cut)]);
    assert!(!out.status.success());
    let kept = std::fs::metadata(partial_file(root.path(), &layer))
        .map(|m| m.len())
        .unwrap_or(0);
    eprintln!("partial after the cut: {kept} of {size}");
    drop(cut);

    // A healthy path: only the rest of the layer travels.
    let healthy = CuttingProxy::relay(reg.port);
    let v = lazylayer_json(root.path(), &["pull", &via(&healthy)]);
    let starts = healthy.range_starts(&layer);
    assert_eq!(starts.len(), 1, "one ranged GET of the layer: {starts:?}");
    assert!(
        starts[0] >= size / 4 && starts[0] == kept,
        "resumed at the partial's end ({kept}), at least 25 % of {size}: {starts:?}"
    );
    let relayed = healthy.relayed.load(Ordering::Relaxed) as u64;
    let fetched = v["bytes_fetched"].as_u64().unwrap();
    eprintln!("second pull: {relayed} bytes relayed, {fetched} counted as fetched, layer {size}");
    assert!(
        relayed < size * 8 / 10,
        "{relayed} bytes sent for a {size}-byte layer"
    );
    assert_eq!(fetched, size - kept, "only network bytes count as fetched");
    assert_layer_complete(root.path(), &layer);
}

/// A registry without Range support answers the resume with the whole blob
/// (200): the kept prefix is skipped in the response and the layer completes.
#[test]
fn partial_resume_works_when_registry_ignores_range() {
    let reg = Registry::start();
    let (image, layer, size) = random_layer_image(&reg, "random5", 5);
    let cut = CuttingProxy::start(reg.port, (size / 2) as usize, AfterCut::Die);
    let root = tempfile::tempdir().unwrap();
    let via = |p: &CuttingProxy| image.replace(&reg.addr(), &format!("127.0.0.1:{}", p.port));
    assert!(!lazylayer(root.path(), &["pull", &via(&cut)])
        .status
        .success());
    let kept = std::fs::metadata(partial_file(root.path(), &layer))
        .unwrap()
        .len();
    assert!(kept > 0);
    drop(cut);
    let no_range = CuttingProxy::relay(reg.port);
    no_range.strip_range.store(true, Ordering::Relaxed);
    let v = lazylayer_json(root.path(), &["pull", &via(&no_range)]);
    assert_eq!(
        no_range.range_starts(&layer),
        vec![kept],
        "asked for the rest"
    );
    assert!(
        reg.log()
            .contains(&format!("/blobs/{layer} HTTP/1.1\" 200 ")),
        "the registry answered the whole blob"
    );
    // Skipped bytes are not counted as fetched: they were had already.
    assert_eq!(v["bytes_fetched"].as_u64().unwrap(), size - kept);
    assert_layer_complete(root.path(), &layer);
}

#[test]
fn layer_cut_by_killed_process_is_resumed_by_the_next() {
    let reg = Registry::start();
    let (image, layer, size) = random_layer_image(&reg, "random8", 8);
    let proxy = CuttingProxy::relay(reg.port);
    proxy.rate.store(1_000_000, Ordering::Relaxed);
    let image = image.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    let root = tempfile::tempdir().unwrap();
    let child = lazylayer_cmd(root.path())
        .args(["pull", "--quiet", &image])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let partial = partial_file(root.path(), &layer);
    let t0 = std::time::Instant::now();
    let seen = loop {
        let n = std::fs::metadata(&partial).map(|m| m.len()).unwrap_or(0);
        if n >= size * 3 / 10 {
            break n;
        }
        assert!(
            child.0.try_wait().unwrap().is_none(),
            "the pull ended before 30 % of the layer was on disk ({n} of {size})"
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no partial download grows at {}: {n} of {size}",
            partial.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    child.0.kill().unwrap(); // SIGKILL: no clean-up of any kind
    child.0.wait().unwrap();
    let kept = std::fs::metadata(&partial).unwrap().len();
    eprintln!("killed at {seen} bytes on disk ({kept} after exit) of {size}");
    proxy.rate.store(0, Ordering::Relaxed);
    proxy.requests.lock().unwrap().clear();

    let v = lazylayer_json(root.path(), &["pull", &image]);
    let starts = proxy.range_starts(&layer);
    assert_eq!(starts, vec![kept], "the new process resumed at the prefix");
    assert!(kept >= seen && kept < size);
    assert_eq!(v["bytes_fetched"].as_u64().unwrap(), size - kept);
    assert_layer_complete(root.path(), &layer);
}

// ---- a container leaving while its prefetch runs ---------------------------

/// The container exits while the background prefetch still downloads over a
/// slow link: that is not an error. The fetches are cancelled before the
/// process ends (said at debug level only), the user's terminal shows no
/// warning or error, and the received prefix is resumed by the next run.
#[test]
fn prefetch_cut_by_container_exit_is_quiet_and_resumed() {
    if !is_root() {
        assert!(std::env::var("CI").is_err(), "CI runs as root");
        eprintln!("skipped: needs root (runc, FUSE)");
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (_optimized_in, _src, dst) = optimize_image(&reg, "multilayer", &[]);
    // The optimized image shares SRC's layers (digests included).
    let (big, big_size) = big_layer(&reg, &image_ref(&reg, "multilayer"));
    let proxy = CuttingProxy::relay(reg.port);
    let image = dst.replace(&reg.addr(), &format!("127.0.0.1:{}", proxy.port));
    let root = tempfile::tempdir().unwrap();
    // The big layer at 300 kB/s (17 s), so its prefetch (started at the
    // latest 2 s after the mount) is still running when the container exits.
    *proxy.slow_blob.lock().unwrap() = (big.clone(), 300_000);
    let mut cmd = lazylayer_cmd(root.path());
    cmd.args(["run", "--rm", &image, "--", "sh", "-c", "sleep 3; echo bye"])
        // Warnings as a user sees them, plus the fetcher's debug lines.
        .env("RUST_LOG", "warn,fuser=off,lazylayer_fetch=debug");
    let (out, _) = output_within_env(cmd, std::time::Duration::from_secs(120), "run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "bye");
    let err = stderr(&out);
    for bad in [" WARN ", " ERROR ", "download broken", "error decoding"] {
        assert!(!err.contains(bad), "{bad:?} on the user's stderr: {err}");
    }
    assert!(
        err.lines()
            .any(|l| l.contains("layer fetches cancelled") && !l.contains("running=0")),
        "the running prefetch was cancelled when the image was let go: {err}"
    );
    // What the cut prefetch received is kept, and the next run resumes it.
    let kept = std::fs::metadata(partial_file(root.path(), &big))
        .map(|m| m.len())
        .unwrap_or(0);
    let layer = big;
    assert!(kept > 0 && kept < big_size, "{kept} of {big_size}");
    *proxy.slow_blob.lock().unwrap() = (String::new(), 0);
    proxy.requests.lock().unwrap().clear();
    let mut cmd = lazylayer_cmd(root.path());
    cmd.args(["run", "--rm", &image, "--", "sh", "-c", "sleep 3; echo bye"]);
    let (out, _) = output_within(cmd, std::time::Duration::from_secs(120), "second run");
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        proxy.range_starts(&layer),
        vec![kept],
        "the next run resumed the partial"
    );
}

// ---- a registry that goes down while a lazily started container runs ------

/// The pid of `reg`'s docker-registry process (found by its config file), to
/// stop and continue it as a stalled host would be: connections are still
/// accepted by the kernel, and nothing answers.
fn registry_pid(reg: &Registry) -> u32 {
    let config = reg.dir.path().join("config.yml");
    let config = config.to_string_lossy();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&*config))
        })
        .expect("the registry's process")
}

/// SIGCONTs a stopped registry on drop, so that a failing test leaves no
/// stopped process behind (the registry's own drop then kills it).
struct Continue(u32);

impl Drop for Continue {
    fn drop(&mut self) {
        send_signal(self.0, rustix::process::Signal::CONT);
    }
}

/// Prints a file (a command's stderr) on drop, even when a test panics.
struct ShowOnDrop(std::path::PathBuf);

impl Drop for ShowOnDrop {
    fn drop(&mut self) {
        let text = std::fs::read_to_string(&self.0).unwrap_or_default();
        eprintln!("-- {}:\n{text}", self.0.display());
    }
}

/// The registry stalls (SIGSTOP: it accepts connections and never answers)
/// while a lazily started container runs. The first read that needs it (A,
/// an untraced file of a lower layer, small in a big one: read by range) fails with EIO once the client has
/// given up on the host (its tries bounded by the stall timeout); the next
/// one (B, boot-layer bytes the trace did not read) fails within seconds, not
/// after another full wait: the host's breaker is open. The messages say it
/// was the network and name the host, the image and the layer. Once the
/// registry runs again, the breaker's re-probe closes it and the same reads
/// succeed, in the same container, without a restart.
#[test]
fn stalled_registry_fails_reads_fast_and_recovers_by_itself() {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    if !require_root(
        "stalled_registry_fails_reads_fast_and_recovers_by_itself",
        "runc, FUSE",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    // The trace opens random.bin and reads none of it: the file is in the
    // boot layer, but none of its chunks is in the start list.
    let (_optimized_in, _src, dst) = optimize_image(
        &reg,
        "multilayer",
        &[
            "--",
            "sh",
            "-c",
            "true </data/random.bin; cat /data/keep/a.txt",
        ],
    );
    let probe = tempfile::tempdir().unwrap();
    let (_, layers) = layer_digests(probe.path(), &dst);
    // The boot layer is last.
    let (boot, lower) = layers.split_last().unwrap();
    let root = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(root.path().to_path_buf());
    let fetch_timeout = Duration::from_secs(20);
    let script = "cat /bin/busybox >/dev/null; echo ready; read go; \
        echo A; cat /data/modes/0644.txt && echo A-ok || echo A-eio; \
        echo B; tail -c 100000 /data/random.bin | wc -c; \
        read go; \
        echo C; cat /data/modes/0644.txt; tail -c 100000 /data/random.bin | wc -c; echo C-done";
    let err_file = root.path().join("run.stderr");
    // Shown after the run is killed (dropped after it), when the test fails.
    let _show = ShowOnDrop(err_file.clone());
    let mut child = KillOnDrop(
        lazylayer_cmd(root.path())
            .args(["--stall-timeout", "2", "run", "--rm", "--prefetch", "off"])
            .args(["--fetch-timeout", &fetch_timeout.as_secs().to_string()])
            .args([&dst, "--", "sh", "-c", script])
            .env("RUST_LOG", "warn,fuser=off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&err_file).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut stdin = child.0.stdin.take().unwrap();
    let out = child.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("container: {line}");
            let _ = tx.send((line, Instant::now()));
        }
    });
    // The next line the container prints, within `limit`.
    let next = |limit: Duration, what: &str| -> (String, Instant) {
        rx.recv_timeout(limit)
            .unwrap_or_else(|e| panic!("{what}: no line from the container within {limit:?}: {e}"))
    };
    let (l, _) = next(Duration::from_secs(60), "start");
    assert_eq!(l, "ready");

    let pid = registry_pid(&reg);
    send_signal(pid, rustix::process::Signal::STOP);
    let cont = Continue(pid);
    stdin.write_all(b"go\n").unwrap();
    let (l, a_start) = next(Duration::from_secs(10), "A");
    assert_eq!(l, "A");
    // Bounded: the client's tries (stall timeout 2 s) or the fetch timeout,
    // whichever ends first, and some slack for a loaded machine.
    let (a, a_end) = next(fetch_timeout + Duration::from_secs(15), "A's read");
    eprintln!("A: {a} after {:?}", a_end - a_start);
    assert_eq!(a, "A-eio", "A needs the stalled registry");
    let (l, b_start) = next(Duration::from_secs(10), "B");
    assert_eq!(l, "B");
    let (b, b_end) = next(fetch_timeout, "B's read");
    let b_took = b_end - b_start;
    eprintln!("B: {b} after {b_took:?}");
    // busybox tail exits 0 after a read error: the count tells.
    assert_eq!(b, "0", "B needs the stalled registry");
    assert!(
        b_took < fetch_timeout / 2,
        "B failed fast, the host known down: {b_took:?}"
    );

    // The registry is back: the breaker's probe finds it, and the same reads
    // succeed in the same container.
    drop(cont);
    std::thread::sleep(Duration::from_secs(6));
    stdin.write_all(b"go\n").unwrap();
    let (l, _) = next(Duration::from_secs(10), "C");
    assert_eq!(l, "C");
    let (l, _) = next(fetch_timeout, "C's first read");
    assert_eq!(l, "mode 0644", "A's file after the registry came back");
    let (l, _) = next(fetch_timeout, "C's second read");
    assert_eq!(l, "100000", "B's bytes after the registry came back");
    let (l, _) = next(Duration::from_secs(10), "C-done");
    assert_eq!(l, "C-done");
    drop(stdin);
    let code = wait_exit(&mut child.0, Duration::from_secs(30));
    let err = std::fs::read_to_string(&err_file).unwrap();
    assert_eq!(code, Some(0), "{err}");

    // What the user read: a network failure, naming the host, the image and
    // the layer; never bad content.
    assert!(
        !err.contains("refused content"),
        "a stalled registry is not bad content: {err}"
    );
    let host = reg.addr();
    let unreachable: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(&format!("registry {host} unreachable")))
        .collect();
    assert!(!unreachable.is_empty(), "says the host is down: {err}");
    // The file system's line for each failed read (its path, the error).
    let read_error = |path: &str| -> String {
        err.lines()
            .find(|l| l.contains(&format!("path={path} ")))
            .unwrap_or_else(|| panic!("no message for {path}: {err}"))
            .to_string()
    };
    let a = read_error("data/modes/0644.txt");
    let b = read_error("data/random.bin");
    for (line, layers) in [(&a, lower), (&b, std::slice::from_ref(boot))] {
        assert!(line.contains("network failure"), "{line}");
        assert!(line.contains(&dst), "names the image: {line}");
        assert!(
            layers.iter().any(|l| line.contains(l.as_str())),
            "names the layer: {line}"
        );
    }
    // A's file came back by range (the seek index, looked up again once the
    // registry answered), not with its whole layer: a lookup that failed
    // for want of the network is not held against the image.
    let a_layer = lower.iter().find(|l| a.contains(l.as_str())).unwrap();
    assert!(
        !stored_layer(root.path(), a_layer).exists(),
        "A's layer {a_layer} was fetched whole after the registry came back"
    );
}
