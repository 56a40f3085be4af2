//! The bounded fuzz harness of what a registry sends that lazylayer parses
//! (issue #19): manifests and indexes through the path `resolve` takes
//! (`parse_manifest`, `select_platform`, `descriptor_digest`), image configs
//! and their diff_ids, `WWW-Authenticate` challenges, digests and image
//! references. Inputs start from valid documents and are damaged by
//! replacing JSON values (wrong types, huge numbers, deep nesting, long and
//! non-ASCII strings) and by byte edits. Parsing must return.

use std::str::FromStr;

use lazylayer_oci::auth::parse_challenge;
use lazylayer_oci::manifest::{
    descriptor_digest, parse_manifest, select_platform, ManifestKind, RawManifest, DOCKER_LIST,
    DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST,
};
use lazylayer_oci::{Digest, Platform, Reference};
use lazylayer_testsupport::fuzz::fuzz;
use oci_spec::image::ImageConfiguration;
use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Value};

const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

/// Valid documents of each kind a registry serves.
fn samples() -> Vec<Value> {
    let layer = json!({
        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
        "size": 1234,
        "digest": D,
        "annotations": {
            "dev.lazylayer.index-region.size": "4096",
            "dev.lazylayer.index-region.digest": D
        }
    });
    vec![
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "size": 7, "digest": D},
            "layers": [layer.clone(), layer],
            "annotations": {"dev.lazylayer.boot-layer": D, "dev.lazylayer.version": "4"}
        }),
        json!({
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 7, "digest": D},
            "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 2, "digest": D}]
        }),
        json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {"mediaType": OCI_MANIFEST, "size": 1, "digest": D,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
                {"mediaType": OCI_MANIFEST, "size": 2, "digest": D,
                 "platform": {"os": "linux", "architecture": "amd64"}}
            ]
        }),
        json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/usr/bin"], "Cmd": ["/bin/sh"], "User": "1000:1000",
                       "WorkingDir": "/app", "ExposedPorts": {"80/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": [D, D]},
            "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "x"}]
        }),
    ]
}

/// Values that are not what a field expects.
fn odd_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        select(vec![
            json!(null),
            json!(true),
            json!(-1),
            json!(0),
            json!(u64::MAX),
            json!(1e308),
            json!(-0.5),
            json!(""),
            json!("sha256:"),
            json!("sha256:E3B0"),
            json!("sha512:00"),
            json!("md5:d41d8cd98f00b204e9800998ecf8427e"),
            json!(":"),
            json!("linux/amd64/v8/extra"),
            json!("é😀\u{0}"),
            json!([]),
            json!({}),
            json!([null]),
            json!({"os": "linux"}),
            json!(OCI_INDEX),
            json!(DOCKER_LIST),
            json!(2),
        ]),
        "[ -~]{0,40}".prop_map(Value::String),
        any::<i64>().prop_map(|n| json!(n)),
        (1usize..300).prop_map(|depth| {
            let mut v = json!(0);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }),
        (0usize..5000).prop_map(|n| json!("x".repeat(n))),
    ]
}

/// JSON pointers to every node of `v`.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                pointers(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

#[derive(Debug, Clone)]
enum JsonEdit {
    /// Replace a node with another value.
    Replace(Index, Value),
    /// Remove a node (an object key or an array element).
    Remove(Index),
    /// Put a byte into the serialised text, or cut one out.
    Byte(Index, Option<u8>),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        5 => (any::<Index>(), odd_value()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        2 => any::<Index>().prop_map(JsonEdit::Remove),
        2 => (any::<Index>(), prop::option::of(any::<u8>())).prop_map(|(i, b)| JsonEdit::Byte(i, b)),
    ]
}

/// A damaged sample, serialised, and the media type its response claims.
fn document() -> impl Strategy<Value = (Vec<u8>, String)> {
    let media_type = select(vec![
        "",
        OCI_MANIFEST,
        OCI_INDEX,
        DOCKER_MANIFEST,
        DOCKER_LIST,
        "application/json",
        "text/html",
    ]);
    (
        select(samples()),
        prop::collection::vec(json_edit(), 0..5),
        media_type,
    )
        .prop_map(|(mut doc, edits, mt)| {
            let mut text_edits = Vec::new();
            for e in edits {
                let mut ptrs = Vec::new();
                pointers(&doc, String::new(), &mut ptrs);
                match e {
                    JsonEdit::Replace(i, v) => {
                        let p = i.get(&ptrs).clone();
                        match doc.pointer_mut(&p) {
                            Some(node) => *node = v,
                            None => doc = v,
                        }
                    }
                    JsonEdit::Remove(i) => {
                        let p = i.get(&ptrs).clone();
                        if let Some((parent, last)) = p.rsplit_once('/') {
                            match doc.pointer_mut(parent) {
                                Some(Value::Object(m)) => {
                                    m.remove(&last.replace("~1", "/").replace("~0", "~"));
                                }
                                Some(Value::Array(a)) => {
                                    if let Ok(n) = last.parse::<usize>() {
                                        a.remove(n);
                                    }
                                }
                                _ => {}
                            }
                        }
                    }
                    JsonEdit::Byte(i, b) => text_edits.push((i, b)),
                }
            }
            let mut bytes = serde_json::to_vec(&doc).unwrap();
            for (i, b) in text_edits {
                let at = i.index(bytes.len() + 1);
                match b {
                    Some(b) => bytes.insert(at, b),
                    None if at < bytes.len() => {
                        bytes.remove(at);
                    }
                    None => {}
                }
            }
            (bytes, mt.to_string())
        })
}

/// The manifest path `RegistryClient::resolve` and the pull take, and the
/// config's.
#[test]
fn fuzz_manifest_and_config_parsing() {
    let platforms: Vec<Platform> = ["linux/amd64", "linux/arm64/v8", "linux/s390x"]
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    fuzz(
        "manifest, index and config",
        document(),
        |(bytes, media_type)| {
            let raw = RawManifest {
                digest: Digest::sha256_of(&bytes),
                bytes: bytes.clone().into(),
                media_type,
            };
            match parse_manifest("fuzz", &raw) {
                Ok(ManifestKind::Image(m)) => {
                    let _ = descriptor_digest("fuzz", m.config());
                    for l in m.layers() {
                        let _ = (descriptor_digest("fuzz", l), l.size(), l.annotations());
                    }
                }
                Ok(ManifestKind::Index(idx)) => {
                    for p in &platforms {
                        if let Ok(d) = select_platform("fuzz", &idx, p) {
                            let _ = descriptor_digest("fuzz", d);
                        }
                    }
                }
                Err(e) => prop_assert!(!e.to_string().is_empty()),
            }
            if let Ok(config) = serde_json::from_slice::<ImageConfiguration>(&bytes) {
                for d in config.rootfs().diff_ids() {
                    let _ = Digest::from_str(d);
                }
                let _ = (config.config(), config.history());
            }
            Ok(())
        },
    );
}

/// `WWW-Authenticate` values: the tokens challenges are made of, in any
/// order, with quotes, escapes and multi-byte characters anywhere.
#[test]
fn fuzz_www_authenticate() {
    let token = select(vec![
        "Bearer",
        "Basic",
        " ",
        "  ",
        ",",
        "=",
        "\"",
        "\\",
        "\\\"",
        "realm",
        "service",
        "scope",
        "https://auth.example/token",
        "repository:a/b:pull,push",
        "é",
        "😀",
        "\u{7f}",
        "\t",
    ]);
    let header = prop_oneof![
        3 => prop::collection::vec(token, 0..16).prop_map(|t| t.concat()),
        1 => any::<String>(),
    ];
    fuzz("WWW-Authenticate", header, |h| {
        if let Some(c) = parse_challenge(&h) {
            prop_assert!(!c.scheme.is_empty());
            prop_assert_eq!(c.scheme.to_ascii_lowercase(), c.scheme.clone());
        }
        Ok(())
    });
}

/// Digests and references as manifests, annotations and users give them.
#[test]
fn fuzz_digests_and_references() {
    let piece = select(vec![
        "sha256:",
        "sha512:",
        D,
        "e3b0",
        ":",
        "@",
        "/",
        "localhost:5000",
        "docker.io",
        "library",
        "busybox",
        "latest",
        "[::1]:5000",
        "..",
        "A",
        "_",
        "-",
        "é",
    ]);
    let text = prop_oneof![
        3 => prop::collection::vec(piece, 0..8).prop_map(|t| t.concat()),
        1 => any::<String>(),
    ];
    fuzz("digest and reference", text, |s| {
        if let Ok(d) = Digest::from_str(&s) {
            prop_assert_eq!(d.to_string(), s.clone());
        }
        if let Ok(r) = Reference::from_str(&s) {
            let again = Reference::from_str(&r.to_string());
            prop_assert!(again.is_ok(), "{} does not parse back", r);
        }
        Ok(())
    });
}
