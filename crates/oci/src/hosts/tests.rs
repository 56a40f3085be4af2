use super::*;

fn repo(registry: &str, name: &str) -> Repository {
    Repository {
        registry: registry.into(),
        name: name.into(),
    }
}

/// A certs.d directory with `files` (`host dir`, `hosts.toml` text).
fn certs_d(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (host, text) in files {
        std::fs::create_dir_all(dir.path().join(host)).unwrap();
        std::fs::write(dir.path().join(host).join("hosts.toml"), text).unwrap();
    }
    dir
}

fn conf(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("registries.conf");
    std::fs::write(&p, text).unwrap();
    (dir, p)
}

fn urls(eps: &[Endpoint]) -> Vec<String> {
    eps.iter().map(|e| e.url("x").to_string()).collect()
}

#[test]
fn hosts_toml_mirrors_in_file_order_then_the_server() {
    let d = certs_d(&[(
        "registry.example:5000",
        r#"
server = "https://registry.example:5000"

[host."http://mirror-b:5000"]
  capabilities = ["pull", "resolve"]
  [host."http://mirror-b:5000".header]
    x-token = "abc"

[host."https://mirror-a"]
  capabilities = ["pull"]
  skip_verify = true
  ca = ["ca.pem", "/etc/ssl/other.pem"]

[host."https://mirror-c/custom/api"]
  override_path = true
"#,
    )]);
    let h = Hosts::load(Some(d.path()), None).unwrap();
    let r = repo("registry.example:5000", "team/app");
    let pull = h.endpoints(&r, Purpose::Pull, &[]).unwrap();
    assert_eq!(
        urls(&pull),
        [
            "http://mirror-b:5000/v2/team/app/x?ns=registry.example%3A5000",
            "https://mirror-a/v2/team/app/x?ns=registry.example%3A5000",
            "https://mirror-c/custom/api/team/app/x?ns=registry.example%3A5000",
            "https://registry.example:5000/v2/team/app/x",
        ]
    );
    assert!(pull[..3].iter().all(|e| e.mirror) && !pull[3].mirror);
    assert_eq!(
        pull[0].headers,
        [("x-token".to_string(), "abc".to_string())]
    );
    assert!(pull[1].skip_verify);
    assert_eq!(
        pull[1].ca_files,
        [
            d.path().join("registry.example:5000/ca.pem"),
            PathBuf::from("/etc/ssl/other.pem")
        ]
    );
    // mirror-a may not resolve tags.
    let resolve = h.endpoints(&r, Purpose::Resolve, &[]).unwrap();
    assert_eq!(
        resolve.iter().map(|e| e.host.as_str()).collect::<Vec<_>>(),
        ["mirror-b:5000", "mirror-c", "registry.example:5000"]
    );
    // Pushes never go to mirrors, even one without a capabilities list.
    let push = h.endpoints(&r, Purpose::Push, &[]).unwrap();
    assert_eq!(urls(&push), ["https://registry.example:5000/v2/team/app/x"]);
}

#[test]
fn default_dir_and_port_spelling_and_upstream_rules() {
    let d = certs_d(&[
        ("_default", "[host.\"http://cache.local:5000\"]\n"),
        ("other.example_8443_", "[host.\"https://m.example\"]\n"),
    ]);
    let h = Hosts::load(Some(d.path()), None).unwrap();
    let eps = h
        .endpoints(&repo("docker.io", "library/busybox"), Purpose::Resolve, &[])
        .unwrap();
    assert_eq!(
        urls(&eps),
        [
            "http://cache.local:5000/v2/library/busybox/x?ns=docker.io",
            "https://registry-1.docker.io/v2/library/busybox/x",
        ]
    );
    // containerd's host_port_ directory name.
    let eps = h
        .endpoints(&repo("other.example:8443", "a"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(eps[0].host, "m.example");
    assert_eq!(eps.len(), 2);
    // Upstream: loopback and named insecure hosts are plain HTTP.
    let eps = h
        .endpoints(&repo("127.0.0.1:5000", "a"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(
        eps.last().unwrap().url("x").as_str(),
        "http://127.0.0.1:5000/v2/a/x"
    );
    let eps = h
        .endpoints(&repo("lan:5000", "a"), Purpose::Pull, &["lan:5000".into()])
        .unwrap();
    assert_eq!(eps.last().unwrap().scheme, "http");
}

#[test]
fn no_files_no_mirrors() {
    let d = tempfile::tempdir().unwrap();
    let h = Hosts::load(
        Some(&d.path().join("missing")),
        Some(&d.path().join("missing.conf")),
    )
    .unwrap();
    assert!(h.is_empty());
    let eps = h
        .endpoints(&repo("quay.io", "a/b"), Purpose::Resolve, &[])
        .unwrap();
    assert_eq!(urls(&eps), ["https://quay.io/v2/a/b/x"]);
}

#[test]
fn added_mirrors_come_first() {
    let mut h = Hosts::default();
    h.add_mirror("docker.io", "http://10.0.0.1:5000").unwrap();
    h.add_mirror("docker.io", "mirror.gcr.io").unwrap();
    let eps = h
        .endpoints(&repo("docker.io", "library/x"), Purpose::Resolve, &[])
        .unwrap();
    assert_eq!(
        eps.iter().map(|e| e.host.as_str()).collect::<Vec<_>>(),
        ["10.0.0.1:5000", "mirror.gcr.io", "registry-1.docker.io"]
    );
    assert_eq!(eps[1].scheme, "https");
    assert!(h.add_mirror("docker.io", "ftp://x").is_err());
}

#[test]
fn registries_conf_mirrors_prefixes_and_pull_from_mirror() {
    let (_d, p) = conf(
        r#"
unqualified-search-registries = ["docker.io"]

[[registry]]
prefix = "docker.io"
location = "docker.io"

[[registry.mirror]]
location = "mirror.example/hub"
pull-from-mirror = "digest-only"

[[registry.mirror]]
location = "127.0.0.1:5001"

[[registry]]
prefix = "quay.io/team"
location = "quay.io/team"
insecure = true

[[registry.mirror]]
location = "team-cache.lan"
insecure = true

[[registry]]
prefix = "*.corp.example"

[[registry.mirror]]
location = "corp-mirror:5000"
"#,
    );
    let h = Hosts::load(None, Some(&p)).unwrap();
    let hub = repo("docker.io", "library/busybox");
    // digest-only: not asked for tags.
    assert_eq!(
        urls(&h.endpoints(&hub, Purpose::Resolve, &[]).unwrap()),
        [
            "http://127.0.0.1:5001/v2/library/busybox/x?ns=docker.io",
            "https://registry-1.docker.io/v2/library/busybox/x",
        ]
    );
    // The mirror's location path prefixes the repository.
    assert_eq!(
        urls(&h.endpoints(&hub, Purpose::Pull, &[]).unwrap())[0],
        "https://mirror.example/v2/hub/library/busybox/x?ns=docker.io"
    );
    // Prefix with a path: only that namespace; insecure = TLS unverified, then HTTP.
    let team = h
        .endpoints(&repo("quay.io", "team/app"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(
        team.iter()
            .map(|e| format!("{}://{} {}", e.scheme, e.host, e.skip_verify))
            .collect::<Vec<_>>(),
        [
            "https://team-cache.lan true",
            "http://team-cache.lan false",
            "https://quay.io true",
            "http://quay.io false",
        ]
    );
    let other = h
        .endpoints(&repo("quay.io", "teamx/app"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(urls(&other), ["https://quay.io/v2/teamx/app/x"]);
    // Wildcard prefix.
    let corp = h
        .endpoints(&repo("reg.corp.example", "a"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(corp[0].host, "corp-mirror:5000");
    assert!(h
        .endpoints(&repo("corp.example", "a"), Purpose::Pull, &[])
        .unwrap()
        .iter()
        .all(|e| !e.mirror));
}

#[test]
fn longest_prefix_wins_and_location_rewrites() {
    let (_d, p) = conf(
        r#"
[[registry]]
prefix = "example.com"
[[registry.mirror]]
location = "broad-mirror"

[[registry]]
prefix = "example.com/foo"
location = "internal.example/bar"
[[registry.mirror]]
location = "narrow-mirror/cache"
"#,
    );
    let h = Hosts::load(None, Some(&p)).unwrap();
    let eps = h
        .endpoints(&repo("example.com", "foo/app"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(
        urls(&eps),
        [
            "https://narrow-mirror/v2/cache/app/x?ns=example.com",
            "https://internal.example/v2/bar/app/x",
        ]
    );
    let eps = h
        .endpoints(&repo("example.com", "baz"), Purpose::Pull, &[])
        .unwrap();
    assert_eq!(eps[0].host, "broad-mirror");
}

#[test]
fn blocked_registries_are_refused_naming_the_file() {
    let (_d, p) = conf("[[registry]]\nprefix = \"evil.example\"\nblocked = true\n");
    let h = Hosts::load(None, Some(&p)).unwrap();
    let e = h
        .endpoints(&repo("evil.example", "x"), Purpose::Pull, &[])
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("blocked") && e.contains(&p.display().to_string()),
        "{e}"
    );
    assert!(h
        .endpoints(&repo("good.example", "x"), Purpose::Pull, &[])
        .is_ok());
}

#[test]
fn malformed_files_are_errors_naming_them() {
    let d = certs_d(&[("r.example", "server = \n[host.\"http://x\"\n")]);
    let e = Hosts::load(Some(d.path()), None).unwrap_err().to_string();
    let file = d.path().join("r.example/hosts.toml").display().to_string();
    assert!(e.contains(&file) && e.contains("not valid TOML"), "{e}");
    assert!(e.contains("line"), "says where: {e}");

    let (_d, p) = conf("[[registry]\nprefix=");
    let e = Hosts::load(None, Some(&p)).unwrap_err().to_string();
    assert!(e.contains(&p.display().to_string()), "{e}");

    // Wrong types.
    for bad in [
        "server = 5\n",
        "[host.\"http://m\"]\ncapabilities = \"pull\"\nskip_verify = \"yes\"\n",
        "[host.\"http://m\"]\ncapabilities = [\"pull\", \"fly\"]\n",
        "[host.\"http://m\"]\n[host.\"http://m\".header]\n\"bad name\" = \"v\"\n",
        "[host.\"http://m\"]\n[host.\"http://m\".header]\nx = \"a\\nb\"\n",
        "host = 3\n",
    ] {
        let d = certs_d(&[("r.example", bad)]);
        let e = Hosts::load(Some(d.path()), None)
            .err()
            .unwrap_or_else(|| panic!("accepted {bad:?}"))
            .to_string();
        assert!(e.contains("hosts.toml"), "{bad:?}: {e}");
    }
    for bad in [
        "[[registry]]\nprefix = 3\n",
        "[[registry]]\nblocked = true\n",
        "[[registry]]\nprefix = \"a.example\"\n[[registry.mirror]]\ninsecure = true\n",
        "[[registry]]\nprefix = \"a.example\"\n[[registry.mirror]]\nlocation = \"m\"\npull-from-mirror = \"sometimes\"\n",
        "[[registry]]\nprefix = \"a.example\"\n[[registry]]\nprefix = \"a.example\"\n",
        "[[registry]]\nprefix = \"*.a.example\"\nlocation = \"b.example\"\n",
        "registry = \"a\"\n",
    ] {
        let (_d, p) = conf(bad);
        let e = Hosts::load(None, Some(&p))
            .err()
            .unwrap_or_else(|| panic!("accepted {bad:?}"))
            .to_string();
        assert!(e.contains(&p.display().to_string()), "{bad:?}: {e}");
    }
}

#[test]
fn hostile_mirror_urls_are_refused() {
    for bad in [
        "[host.\"http://user:secret@m:5000\"]\n",
        "[host.\"file:///etc/passwd\"]\n",
        "[host.\"ftp://m\"]\n",
        "[host.\"http://m/?q=1\"]\n",
        "[host.\"http://\"]\n",
        "server = \"unix:///run/x.sock\"\n",
    ] {
        let d = certs_d(&[("r.example", bad)]);
        let e = Hosts::load(Some(d.path()), None)
            .err()
            .unwrap_or_else(|| panic!("accepted {bad:?}"))
            .to_string();
        assert!(e.contains("hosts.toml"), "{bad:?}: {e}");
        assert!(!e.contains("secret"), "a password is never echoed: {e}");
    }
    for bad in [
        "[[registry]]\nprefix = \"a.example\"\n[[registry.mirror]]\nlocation = \"https://m\"\n",
        "[[registry]]\nprefix = \"a.example\"\n[[registry.mirror]]\nlocation = \"u:secret@m\"\n",
        "[[registry]]\nprefix = \"a.example\"\n[[registry.mirror]]\nlocation = \"m/../x\"\n",
    ] {
        let (_d, p) = conf(bad);
        let e = Hosts::load(None, Some(&p))
            .err()
            .unwrap_or_else(|| panic!("accepted {bad:?}"))
            .to_string();
        assert!(!e.contains("secret"), "a password is never echoed: {e}");
    }
    let mut h = Hosts::default();
    let e = h
        .add_mirror("docker.io", "https://u:pw-secret@m")
        .unwrap_err()
        .to_string();
    assert!(!e.contains("pw-secret") && e.contains("credentials"), "{e}");
}

#[test]
fn unknown_keys_are_ignored_not_fatal() {
    let d = certs_d(&[(
        "r.example",
        "server = \"https://r.example\"\nfuture_key = 1\n[host.\"http://m\"]\ncapabilities = [\"pull\"]\nsomething = true\n",
    )]);
    let h = Hosts::load(Some(d.path()), None).unwrap();
    assert_eq!(
        h.endpoints(&repo("r.example", "a"), Purpose::Pull, &[])
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn the_machines_podman_style_files_load() {
    // What Debian's podman ships: comments, search registries, aliases.
    let (_d, p) = conf(
        "# comment\nunqualified-search-registries = [\"docker.io\"]\nshort-name-mode = \"enforcing\"\n[aliases]\n\"busybox\" = \"docker.io/library/busybox\"\n",
    );
    let h = Hosts::load(None, Some(&p)).unwrap();
    assert!(h.is_empty());
}

/// `registry = [{ ... }]` is the same TOML value as `[[registry]]` tables,
/// and containers/image reads both; anything else in the list is refused.
#[test]
fn registries_conf_inline_tables_are_registry_tables() {
    let (_d, p) = conf(
        r#"registry = [{ prefix = "docker.io", location = "docker.io", mirror = [{ location = "m.example" }] }]"#,
    );
    let h = Hosts::load(None, Some(&p)).unwrap();
    let eps = h
        .endpoints(&repo("docker.io", "library/x"), Purpose::Pull, &[])
        .unwrap();
    let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
    assert_eq!(hosts.first(), Some(&"m.example"), "{hosts:?}");
    assert_eq!(hosts.len(), 2, "{hosts:?}");

    for text in [
        "registry = [1]",
        "registry = \"docker.io\"",
        "[[registry]]\nmirror = [2]",
    ] {
        let (_d, p) = conf(text);
        let e = Hosts::load(None, Some(&p)).unwrap_err().to_string();
        assert!(e.contains("[[registry"), "{text}: {e}");
    }
}
