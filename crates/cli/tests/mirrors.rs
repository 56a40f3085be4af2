//! Registry mirrors end to end: an upstream docker-registry holding the
//! images and a second one in front of it as a pull-through mirror, named in
//! a containerd-style certs.d directory (or in registries.conf). Lazy runs
//! and pulls go to the mirror; when the upstream is gone a warm mirror still
//! serves; when the mirror is gone the upstream does.

mod common;

use std::path::Path;

use common::*;

/// A pull-through mirror of `upstream` (which must be running: the proxy
/// checks it at start).
fn mirror_of(upstream: &Registry) -> Registry {
    Registry::start_with(&format!(
        "proxy:\n  remoteurl: http://{}\n",
        upstream.addr()
    ))
}

/// `<dir>/<upstream>/hosts.toml` naming `mirror` before the upstream.
fn certs_d(upstream: &Registry, mirror: &Registry) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let host_dir = dir.path().join(upstream.addr());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "server = \"http://{}\"\n\n[host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n",
            upstream.addr(),
            mirror.addr()
        ),
    )
    .unwrap();
    dir
}

/// Access-log lines of requests lazylayer itself sent (its user agent);
/// the proxy's own requests to the upstream carry Go's.
fn from_lazylayer(reg: &Registry) -> Vec<String> {
    reg.log()
        .lines()
        .filter(|l| l.contains("\"lazylayer/"))
        .map(str::to_string)
        .collect()
}

/// `lazylayer --hosts-dir DIR --registries-conf CONF ARGS` with a store at `root`.
fn with_hosts(root: &Path, hosts_dir: &Path, conf: &Path, args: &[&str]) -> std::process::Output {
    let mut a = vec![
        "--hosts-dir",
        hosts_dir.to_str().unwrap(),
        "--registries-conf",
        conf.to_str().unwrap(),
    ];
    a.extend_from_slice(args);
    lazylayer(root, &a)
}

/// An upstream registry holding busybox, and the image's reference there.
fn busybox_upstream() -> (Registry, String) {
    let upstream = Registry::start();
    push_images(&upstream, &["busybox"]);
    let src = image_ref(&upstream, "busybox");
    (upstream, src)
}

/// Whether lazylayer itself asked `reg` for the blob `digest`.
fn asked_for(reg: &Registry, digest: &str) -> bool {
    from_lazylayer(reg)
        .iter()
        .any(|l| l.contains(&format!("/blobs/{digest}")))
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "lazylayer failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn root_lazy_runs_and_pulls_go_through_the_mirror_and_fall_back() {
    if !require_root(
        "root_lazy_runs_and_pulls_go_through_the_mirror_and_fall_back",
        "runc and FUSE for lazy runs",
    ) {
        return;
    }
    let mut upstream = Registry::start();
    push_images(&upstream, &["busybox"]);
    let (optimized_store, src, dst) =
        optimize_image(&upstream, "busybox", &["--no-seek-index", "--", "true"]);
    let (_, layers) = layer_digests(optimized_store.path(), &dst);
    let mut mirror = mirror_of(&upstream);
    let hosts = certs_d(&upstream, &mirror);
    let no_conf = hosts.path().join("no-registries.conf");

    // (a) A lazy run: manifest and boot layer come from the mirror; nothing
    // lazylayer sends reaches the upstream (only the proxy's own requests).
    let upstream_before = from_lazylayer(&upstream).len();
    let root = tempfile::tempdir().unwrap();
    let out = with_hosts(
        root.path(),
        hosts.path(),
        &no_conf,
        &["run", "--rm", &dst, "--", "echo", "via-mirror"],
    );
    assert_eq!(ok(&out), "via-mirror\n");
    let seen = from_lazylayer(&mirror);
    assert!(
        seen.iter()
            .any(|l| l.contains("GET /v2/optimized/busybox/manifests/boot")),
        "manifest asked of the mirror: {seen:#?}"
    );
    assert!(
        // Encoded as containerd's Go client encodes it.
        seen.iter()
            .any(|l| l.contains(&format!("ns={}", upstream.addr().replace(':', "%3A")))),
        "mirror requests carry ns=<registry>: {seen:#?}"
    );
    let boot = layers.last().unwrap();
    assert!(
        mirror.blob_gets(boot) > 0,
        "boot layer {boot} read from the mirror"
    );
    assert_eq!(
        from_lazylayer(&upstream).len(),
        upstream_before,
        "no request of lazylayer reached the upstream: {:#?}",
        &from_lazylayer(&upstream)[upstream_before..]
    );

    // (b) Warm the mirror with a whole pull, then stop the upstream: a lazy
    // run with a fresh store still completes from the mirror's cache.
    let warm = tempfile::tempdir().unwrap();
    ok(&with_hosts(
        warm.path(),
        hosts.path(),
        &no_conf,
        &["pull", &dst],
    ));
    upstream.stop();
    let root = tempfile::tempdir().unwrap();
    let out = with_hosts(
        root.path(),
        hosts.path(),
        &no_conf,
        &["run", "--rm", &dst, "--", "echo", "upstream-down"],
    );
    assert_eq!(ok(&out), "upstream-down\n");

    // (c) Mirror gone, upstream back: runs and pulls fall back to the
    // upstream, which now serves lazylayer itself.
    upstream.restart();
    mirror.stop();
    let upstream_before = from_lazylayer(&upstream).len();
    let root = tempfile::tempdir().unwrap();
    let out = with_hosts(
        root.path(),
        hosts.path(),
        &no_conf,
        &["run", "--rm", &dst, "--", "echo", "mirror-down"],
    );
    assert_eq!(ok(&out), "mirror-down\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&mirror.addr()),
        "the warning names the mirror that failed: {stderr}"
    );
    let store = tempfile::tempdir().unwrap();
    let out = with_hosts(store.path(), hosts.path(), &no_conf, &["pull", "-v", &src]);
    ok(&out);
    let (_, src_layers) = layer_digests(store.path(), &src);
    let served: Vec<String> = from_lazylayer(&upstream)[upstream_before..].to_vec();
    for d in &src_layers {
        assert!(
            served
                .iter()
                .any(|l| l.contains("GET /v2/") && l.contains(&format!("/blobs/{d}"))),
            "layer {d} served by the upstream: {served:#?}"
        );
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("blob served") && stderr.contains(&upstream.addr()),
        "pull -v says which host served each blob: {stderr}"
    );

    // (d) The same routing from registries.conf: a pull goes to the mirror.
    mirror.restart();
    let conf = hosts.path().join("registries.conf");
    std::fs::write(
        &conf,
        format!(
            "[[registry]]\nprefix = \"{up}\"\nlocation = \"{up}\"\n\n[[registry.mirror]]\nlocation = \"{mi}\"\n",
            up = upstream.addr(),
            mi = mirror.addr()
        ),
    )
    .unwrap();
    let no_hosts = hosts.path().join("no-certs.d");
    let upstream_before = from_lazylayer(&upstream).len();
    let mirror_before = from_lazylayer(&mirror).len();
    let store = tempfile::tempdir().unwrap();
    let out = with_hosts(store.path(), &no_hosts, &conf, &["pull", "-v", &src]);
    ok(&out);
    let via_mirror = from_lazylayer(&mirror)[mirror_before..].to_vec();
    for d in &src_layers {
        assert!(
            via_mirror
                .iter()
                .any(|l| l.contains(&format!("/blobs/{d}"))),
            "layer {d} pulled through the mirror: {via_mirror:#?}"
        );
    }
    assert_eq!(
        from_lazylayer(&upstream).len(),
        upstream_before,
        "nothing of lazylayer's reached the upstream: {:#?}",
        &from_lazylayer(&upstream)[upstream_before..]
    );

    // (e) The same from lazylayer's own configuration file
    // ([registries.mirrors]), with no hosts.toml and no registries.conf.
    let config = hosts.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[registries]\nhosts_dir = {:?}\nregistries_conf = {:?}\n\
             [registries.mirrors]\n{:?} = [\"http://{}\"]\n",
            no_hosts.to_str().unwrap(),
            no_conf.to_str().unwrap(),
            upstream.addr(),
            mirror.addr()
        ),
    )
    .unwrap();
    let upstream_before = from_lazylayer(&upstream).len();
    let mirror_before = from_lazylayer(&mirror).len();
    let store = tempfile::tempdir().unwrap();
    let out = lazylayer(
        store.path(),
        &["--config", config.to_str().unwrap(), "pull", &src],
    );
    ok(&out);
    let via_mirror = from_lazylayer(&mirror)[mirror_before..].to_vec();
    for d in &src_layers {
        assert!(
            via_mirror
                .iter()
                .any(|l| l.contains(&format!("/blobs/{d}"))),
            "layer {d} pulled through the config file's mirror: {via_mirror:#?}"
        );
    }
    assert_eq!(from_lazylayer(&upstream).len(), upstream_before);
}

#[test]
fn malformed_hosts_toml_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let host_dir = dir.path().join("127.0.0.1:5999");
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        "server = \n[host.\"http://x\"\n",
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = with_hosts(
        root.path(),
        dir.path(),
        &dir.path().join("none.conf"),
        &["pull", "127.0.0.1:5999/x/y:latest"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&host_dir.join("hosts.toml").display().to_string())
            && stderr.contains("not valid TOML"),
        "{stderr}"
    );
}

#[test]
fn blocked_registry_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("registries.conf");
    std::fs::write(
        &conf,
        "[[registry]]\nprefix = \"127.0.0.1:5998/secret\"\nblocked = true\n",
    )
    .unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = with_hosts(
        root.path(),
        &dir.path().join("none"),
        &conf,
        &["pull", "127.0.0.1:5998/secret/img:latest"],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("blocked") && stderr.contains(&conf.display().to_string()),
        "{stderr}"
    );
}

/// A mirror that dies in the middle of a layer: the download resumes with
/// Range on the upstream (the bytes so far are kept) and the blob's digest
/// is still checked over the whole.
#[test]
fn a_mirror_dying_mid_blob_resumes_on_the_upstream() {
    let (upstream, src) = busybox_upstream();
    // The "mirror" relays the upstream itself and dies after 400 kB: in the
    // middle of busybox's 1 MB layer.
    let mirror = proxy::CuttingProxy::start(upstream.port, 400_000, proxy::AfterCut::Die);
    let dir = tempfile::tempdir().unwrap();
    let host_dir = dir.path().join(upstream.addr());
    std::fs::create_dir_all(&host_dir).unwrap();
    std::fs::write(
        host_dir.join("hosts.toml"),
        format!(
            "[host.\"http://127.0.0.1:{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n",
            mirror.port
        ),
    )
    .unwrap();
    let store = tempfile::tempdir().unwrap();
    let out = with_hosts(
        store.path(),
        dir.path(),
        &dir.path().join("none.conf"),
        &["pull", "-v", &src],
    );
    ok(&out);
    let (_, layers) = layer_digests(store.path(), &src);
    let layer = &layers[0];
    assert!(
        mirror.requests_text().contains(&format!("/blobs/{layer}")),
        "the layer was asked of the mirror first"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    let resumed = stderr
        .lines()
        .find(|l| l.contains("resuming from the next one") && l.contains(layer.as_str()))
        .unwrap_or_else(|| panic!("no resume on the next host: {stderr}"));
    let at: u64 = resumed
        .split(" at=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no offset in {resumed}"));
    assert!(at > 0, "resumed after the bytes the mirror sent: {resumed}");
    assert!(
        asked_for(&upstream, layer),
        "the rest came from the upstream"
    );
}

/// A mirror with a bad copy of a layer (its first byte flipped: the
/// unpacker refuses it): the layer is fetched once more, from the upstream
/// (the mirror is asked last for a while), and the pull completes with the
/// right bytes. Mirrors named in the configuration file.
#[test]
fn a_mirror_serving_a_bad_layer_is_passed_over_for_the_upstream() {
    let (upstream, src) = busybox_upstream();
    let probe = tempfile::tempdir().unwrap();
    let (_, layers) = layer_digests(probe.path(), &src);
    let layer = layers[0].clone();
    let mirror = proxy::CuttingProxy::relay(upstream.port);
    *mirror.corrupt_blob.lock().unwrap() = (layer.clone(), 1);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[registries]\nhosts_dir = {:?}\nregistries_conf = {:?}\n\
             [registries.mirrors]\n{:?} = [\"http://127.0.0.1:{}\"]\n",
            dir.path().join("no-certs.d").to_str().unwrap(),
            dir.path().join("no.conf").to_str().unwrap(),
            upstream.addr(),
            mirror.port
        ),
    )
    .unwrap();
    let store = tempfile::tempdir().unwrap();
    let out = lazylayer(
        store.path(),
        &["--config", config.to_str().unwrap(), "pull", "-v", &src],
    );
    ok(&out);
    assert!(
        mirror.requests_text().contains(&format!("/blobs/{layer}")),
        "the layer was asked of the mirror first"
    );
    assert_eq!(
        mirror.corrupt_blob.lock().unwrap().1,
        0,
        "the mirror sent its bad copy"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad layer bytes from a mirror"), "{stderr}");
    assert!(
        asked_for(&upstream, &layer),
        "the layer came again from the upstream"
    );
    // What the store keeps is the layer itself.
    let hex = layer.strip_prefix("sha256:").unwrap();
    let blob = std::fs::read(store.path().join("blobs/sha256").join(hex)).unwrap();
    use sha2::Digest as _;
    assert_eq!(hex::encode(sha2::Sha256::digest(&blob)), hex);
}

/// A registry spoken to over TLS (named `https://` in hosts.toml): its
/// certificate is checked against the system's trust store (read on the
/// first handshake, not when the client is built) and refused when it is
/// self-signed, and accepted with its CA given in hosts.toml (`ca`).
#[test]
fn a_tls_registry_is_verified_against_the_system_store_unless_its_ca_is_given() {
    // A CA, and the registry's certificate signed by it.
    let keys = tempfile::tempdir().unwrap();
    let k = |name: &str| keys.path().join(name);
    std::fs::write(
        k("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    let openssl = |args: &[&str]| {
        let st = std::process::Command::new("openssl")
            .args(args)
            .current_dir(keys.path())
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "openssl {args:?}");
    };
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ]
        .into_iter()
        .chain([
            "-subj",
            "/CN=lazylayer-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ])
        .collect::<Vec<_>>(),
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
        ]
        .into_iter()
        .chain(["-keyout", "key.pem", "-out", "leaf.csr"])
        .collect::<Vec<_>>(),
    );
    openssl(
        &[
            "x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        ]
        .into_iter()
        .chain([
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
            "-out",
            "cert.pem",
        ])
        .collect::<Vec<_>>(),
    );
    let (key, cert) = (k("key.pem"), k("cert.pem"));
    let reg = Registry::start_with(&format!(
        "  tls:\n    certificate: {}\n    key: {}\n",
        cert.display(),
        key.display()
    ));
    push_images(&reg, &["busybox"]);
    let image = image_ref(&reg, "busybox");
    let hosts_toml = |ca: &str| {
        let dir = tempfile::tempdir().unwrap();
        let host_dir = dir.path().join(reg.addr());
        std::fs::create_dir_all(&host_dir).unwrap();
        std::fs::write(
            host_dir.join("hosts.toml"),
            format!("server = \"https://{}\"\n{ca}", reg.addr()),
        )
        .unwrap();
        dir
    };
    let root = tempfile::tempdir().unwrap();

    let system_only = hosts_toml("");
    let out = with_hosts(
        root.path(),
        system_only.path(),
        &system_only.path().join("no-registries.conf"),
        &["inspect", &image],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a self-signed registry was trusted");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "says why: {stderr}"
    );

    let with_ca = hosts_toml(&format!("ca = {:?}\n", k("ca.pem").display().to_string()));
    let out = with_hosts(
        root.path(),
        with_ca.path(),
        &with_ca.path().join("no-registries.conf"),
        &["inspect", &image],
    );
    assert!(ok(&out).contains("sha256:"), "inspect through TLS");
}
