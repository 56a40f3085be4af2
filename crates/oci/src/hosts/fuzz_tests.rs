//! The bounded fuzz harness of containerd's hosts.toml and containers'
//! registries.conf (issue #19): files assembled from the keys, tables and
//! values both formats know, spiked with hostile values (odd URLs, ports,
//! IPv6, credentials, queries, wrong types, non-ASCII) and then damaged
//! byte-wise. Parsing must return; a file that parses must give endpoints
//! whose URLs build (`Endpoint::url` and `base` expect them to) for every
//! purpose and a handful of repositories.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use lazylayer_testsupport::fuzz::fuzz;
use proptest::prelude::*;
use proptest::sample::select;

use super::*;

/// Hosts, URLs and locations, sane and not.
const PLACES: &[&str] = &[
    "https://mirror-a",
    "http://mirror-b:5000",
    "https://mirror-c/custom/api",
    "mirror.example/hub",
    "127.0.0.1:5001",
    "[::1]:5000",
    "http://[::1]:5000/v2",
    "registry.example:5000",
    "docker.io",
    "quay.io/team",
    "*.corp.example",
    "*.",
    "*",
    "",
    "/",
    "//",
    "http://",
    "https://:5000",
    "ftp://mirror",
    "http://user:secret@mirror",
    "mirror?x=1",
    "mirror#frag",
    "http://mirror:99999",
    "http://mirror:-1",
    "mirror/a/../b",
    "mirror/./b",
    "mirror//b",
    "mirror/a b",
    "mirror/%zz",
    "mïrror.example",
    "http://xn--mrror-gra.example",
    "a:b:c",
    "[::1",
    "]",
    "\\\\",
    "http://0x7f.1/",
    "very-long-host-name-that-goes-on-and-on-and-on-and-on-and-on-and-on-and-on-and-on.example",
];

/// Values of other shapes than the key expects.
const ODD_VALUES: &[&str] = &[
    "true",
    "false",
    "1",
    "-1",
    "1e400",
    "1979-05-27T07:32:00Z",
    "[]",
    "[[]]",
    "[1, \"a\"]",
    "{}",
    "{ a = 1 }",
    "\"\"",
    "'literal'",
    "\"\"\"multi\nline\"\"\"",
    "\"\\u0000\"",
    "\"\\uD800\"",
    "[\"pull\", \"resolve\", \"push\"]",
    "[\"PULL\"]",
    "[\"fly\"]",
    "\"pull\"",
    "\"digest-only\"",
    "\"tag-only\"",
    "\"all\"",
    "\"sometimes\"",
];

fn quoted(s: &str) -> String {
    format!("{s:?}")
}

fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        select(PLACES).prop_map(quoted),
        select(ODD_VALUES).prop_map(str::to_string),
        "[ -~]{0,12}".prop_map(|s| quoted(&s)),
    ]
}

fn hosts_toml_line() -> impl Strategy<Value = String> {
    let key = select(
        &[
            "server",
            "capabilities",
            "skip_verify",
            "override_path",
            "ca",
            "client",
            "dial_timeout",
            "host",
            "header",
            "x-token",
            "bad header",
            "unknown",
        ][..],
    );
    prop_oneof![
        4 => (key, value()).prop_map(|(k, v)| format!("{k:?} = {v}")),
        2 => select(PLACES).prop_map(|p| format!("[host.{}]", quoted(p))),
        1 => select(PLACES).prop_map(|p| format!("[host.{}.header]", quoted(p))),
        1 => select(&["[host]", "[[host]]", "[header]", "[server]", "[host.\"x\".header.y]"][..])
            .prop_map(str::to_string),
    ]
}

fn registries_conf_line() -> impl Strategy<Value = String> {
    let key = select(
        &[
            "prefix",
            "location",
            "insecure",
            "blocked",
            "mirror-by-digest-only",
            "pull-from-mirror",
            "mirror",
            "registry",
            "unqualified-search-registries",
            "short-name-mode",
            "registries",
            "unknown",
        ][..],
    );
    prop_oneof![
        5 => (key, value()).prop_map(|(k, v)| format!("{k} = {v}")),
        2 => Just("[[registry]]".to_string()),
        2 => Just("[[registry.mirror]]".to_string()),
        1 => select(&["[registry]", "[aliases]", "[registries.search]", "[[registry.mirror.x]]"][..])
            .prop_map(str::to_string),
    ]
}

/// Lines, then up to three byte-level damages (a character put in, a run
/// cut out).
fn file_text(line: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
    let damage = (
        any::<prop::sample::Index>(),
        prop::option::of(select(
            &["\"", "[", "]", "=", "\n", "\\", "é", "\0", "#"][..],
        )),
    );
    (
        prop::collection::vec(line, 0..14),
        prop::collection::vec(damage, 0..3),
    )
        .prop_map(|(lines, damages)| {
            let mut text = lines.join("\n");
            for (at, put) in damages {
                let mut chars: Vec<char> = text.chars().collect();
                let i = at.index(chars.len() + 1);
                match put {
                    Some(s) => {
                        chars.splice(i..i, s.chars());
                    }
                    None => {
                        chars.drain(i..(i + 3).min(chars.len()));
                    }
                }
                text = chars.into_iter().collect();
            }
            text
        })
}

/// Every purpose for a few repositories, each endpoint's URLs built.
fn check_endpoints(hosts: &Hosts) -> std::result::Result<(), TestCaseError> {
    for (registry, name) in [
        ("docker.io", "library/busybox"),
        ("registry.example:5000", "team/app"),
        ("quay.io", "team/app"),
        ("sub.corp.example", "a/b"),
        ("[::1]:5000", "x"),
        ("mirror-a", "x/y/z"),
    ] {
        let repo = Repository {
            registry: registry.into(),
            name: name.into(),
        };
        for purpose in [Purpose::Resolve, Purpose::Pull, Purpose::Push] {
            for ep in hosts.endpoints(&repo, purpose, &[]).unwrap_or_default() {
                let u = ep.url("manifests/latest");
                prop_assert!(u.host_str().is_some(), "{u}");
                let _ = (ep.base(), ep.label());
            }
        }
    }
    Ok(())
}

#[test]
fn fuzz_hosts_toml() {
    let file = Path::new("/etc/containerd/certs.d/registry.example:5000/hosts.toml");
    let parsed_files = AtomicUsize::new(0);
    fuzz("hosts.toml", file_text(hosts_toml_line()), |text| {
        let Ok(parsed) = parse_hosts_toml(file, Path::new("/etc/containerd/certs.d/x"), &text)
        else {
            return Ok(());
        };
        parsed_files.fetch_add(1, Ordering::Relaxed);
        let mut certs_d = HashMap::new();
        for name in ["registry.example:5000", "docker.io", "_default"] {
            certs_d.insert(name.to_string(), parsed.clone());
        }
        check_endpoints(&Hosts {
            certs_d,
            ..Hosts::default()
        })
    });
    eprintln!("hosts.toml: {} files parsed", parsed_files.into_inner());
}

#[test]
fn fuzz_registries_conf() {
    let file = Path::new("/etc/containers/registries.conf");
    let parsed_files = AtomicUsize::new(0);
    fuzz(
        "registries.conf",
        file_text(registries_conf_line()),
        |text| {
            let Ok(registries) = parse_registries_conf(file, &text) else {
                return Ok(());
            };
            parsed_files.fetch_add(1, Ordering::Relaxed);
            check_endpoints(&Hosts {
                registries,
                ..Hosts::default()
            })
        },
    );
    eprintln!(
        "registries.conf: {} files parsed",
        parsed_files.into_inner()
    );
}

/// Nesting deeper than any file needs is an error, not a stack overflow
/// (the TOML parser bounds its recursion).
#[test]
fn deeply_nested_values_are_refused() {
    let file = Path::new("hosts.toml");
    for (open, close) in [("[", "]"), ("{a=", "}")] {
        let text = format!(
            "server = {}1{}",
            open.repeat(100_000),
            close.repeat(100_000)
        );
        assert!(parse_hosts_toml(file, Path::new("."), &text).is_err());
        assert!(parse_registries_conf(file, &text).is_err());
    }
}
