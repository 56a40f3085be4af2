//! Seek indexes end to end: `optimize` pushes them beside DST, and a lazy
//! `run` reads a file outside the boot layer with one ranged GET instead of
//! its whole layer; a wrong index costs the whole layer, never wrong bytes.
//! Against Debian's docker-registry 2.8 (no referrers API: the tag schema).

mod common;

use common::lazylayer_run as run;
use common::*;
use lazylayer_oci::client::{BlobSource, ClientConfig};
use lazylayer_oci::{Digest, Reference, RegistryClient};
use lazylayer_seek::artifact::{referrers_tag, ArtifactManifest, HeadRef, IndexBlob, OCI_MANIFEST};
use lazylayer_seek::{head_len, SeekIndex};

/// Outside python3's traced boot set (the image's command prints `ok`):
/// sqlite3 lives in the 17 MB python layer.
const SQLITE: &str = "import sqlite3; print(sqlite3.sqlite_version)";
/// At most this much of any layer may come for it.
const MAX_LAYER_BYTES: u64 = 3_000_000;

/// Bytes the registry sent answering GETs of blob `digest`, from its
/// access log (combined format: `"GET PATH HTTP/1.1" STATUS BYTES ...`),
/// and how many of those answers were 206.
fn blob_bytes(log: &str, digest: &str) -> (u64, usize) {
    let mut bytes = 0;
    let mut partial = 0;
    for l in log
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains(&format!("/blobs/{digest}")))
    {
        let mut after = l.split("HTTP/1.1\" ").nth(1).unwrap_or("").split(' ');
        let status = after.next().unwrap_or("");
        bytes += after
            .next()
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        partial += usize::from(status == "206");
    }
    (bytes, partial)
}

/// The access log written since `from` bytes.
fn log_since(reg: &Registry, from: usize) -> String {
    reg.log()[from..].to_string()
}

/// python3 from `reg` optimized into optimized/python3:boot with seek
/// indexes: (report, SRC, DST, SRC's layer digests).
fn optimized_python3(reg: &Registry) -> (serde_json::Value, String, String, Vec<String>) {
    push_images(reg, &["python3"]);
    let store = tempfile::tempdir().unwrap();
    let src = image_ref(reg, "python3");
    let dst = format!("{}/optimized/python3:boot", reg.addr());
    let out = lazylayer_ok(store.path(), &["optimize", "--json", &src, &dst]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    let (_, layers) = layer_digests(store.path(), &src);
    (rep, src, dst, layers)
}

/// What SRC prints for `cmd`, pulled in full into a store of its own.
fn expected_output(src: &str, cmd: &str) -> String {
    let root = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(root.path().to_path_buf());
    let out = run(root.path(), &["--rm", src, "--", "python3", "-c", cmd]);
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn root_untraced_file_is_read_by_range_not_by_layer() {
    if !require_root(
        "root_untraced_file_is_read_by_range_not_by_layer",
        "optimize runs runc; run mounts FUSE",
    ) {
        return;
    }
    let reg = Registry::start();
    let (rep, src, dst, layers) = optimized_python3(&reg);
    let expected = expected_output(&src, SQLITE);
    assert!(expected.starts_with('3'), "{expected}");

    let root = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(root.path().to_path_buf());
    let from = reg.log().len();
    let out = run(
        root.path(),
        &[
            "--rm",
            "--stats",
            "--prefetch",
            "off",
            &dst,
            "--",
            "python3",
            "-c",
            SQLITE,
        ],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    // The run's own count: spans and the seek index it fetched.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let counted: u64 = stderr
        .split(" bytes fetched after start")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no stats line: {stderr}"));
    let log = log_since(&reg, from);
    let fetched: Vec<(u64, usize)> = layers.iter().map(|d| blob_bytes(&log, d)).collect();
    eprintln!("bytes and ranged GETs per SRC layer: {fetched:?}");
    for (d, (bytes, _)) in layers.iter().zip(&fetched) {
        assert!(
            *bytes <= MAX_LAYER_BYTES,
            "{bytes} bytes of layer {d} fetched for a few untraced files"
        );
    }
    assert!(
        fetched.iter().any(|(b, n)| *b > 0 && *n > 0),
        "the untraced files came by range: {fetched:?}"
    );
    let spans: u64 = fetched.iter().map(|(b, _)| b).sum();
    // Everything else the run fetched but the boot layer: the config, the
    // seek index of the layer holding sqlite3, the spans.
    let boot = rep["boot_layer_digest"].as_str().unwrap();
    let all = blob_bytes(&log, "sha256:").0;
    let not_boot = all - blob_bytes(&log, boot).0;
    eprintln!(
        "run: {spans} bytes of spans, {not_boot} bytes in all but the boot layer; its stats line counted {counted}"
    );
    assert!(counted > spans, "spans are counted in the run's stats");
    assert!(
        not_boot <= MAX_LAYER_BYTES,
        "{not_boot} bytes besides the boot layer (spans, seek index), of a 17 MB layer"
    );

    // The files read by range stay in the store until a prune without
    // running containers.
    assert!(!tree_listing(&root.path().join("files")).is_empty());
    let pruned = lazylayer_json(root.path(), &["prune"]);
    assert!(pruned["files_removed"].as_u64().unwrap() >= 3, "{pruned}");

    // What optimize said it pushed, and how run found it on docker-registry
    // 2.8: the referrers API is missing (404), the referrers tag answers.
    let seek_bytes = rep["seek_index_bytes"].as_u64().unwrap_or(0);
    assert!(seek_bytes > 0, "{rep}");
    eprintln!(
        "seek indexes: {seek_bytes} bytes for {} layers",
        layers.len()
    );
    let subject = rep["manifest_digest"].as_str().unwrap();
    let referrers = log
        .lines()
        .find(|l| l.contains(&format!("/referrers/{subject}")))
        .expect("run asked the referrers API first");
    assert!(referrers.contains("\" 404 "), "{referrers}");
    let tag = referrers_tag(subject);
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("/manifests/{tag} ")) && l.contains("\" 200 ")),
        "the artifact was found by its tag {tag}"
    );

    // Of the seek index, the head and the windows the reads needed came,
    // by range: not the whole index.
    let artifact = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let r: Reference = dst.parse().unwrap();
        let raw = client.get_manifest(&r.with_tag(&tag)).await.unwrap();
        ArtifactManifest::parse(&raw.bytes, subject).unwrap()
    });
    let (mut index_bytes, mut index_sizes, mut ranged) = (0, 0, 0);
    for l in &artifact.layers {
        let (bytes, partial) = blob_bytes(&log, &l.digest);
        if bytes > 0 {
            index_bytes += bytes;
            index_sizes += l.size;
            ranged += partial;
        }
    }
    eprintln!(
        "seek indexes: {index_bytes} bytes fetched in {ranged} ranged GETs, of {index_sizes}"
    );
    assert!(index_sizes > 0, "a seek index was read");
    assert!(
        ranged >= 2,
        "the head and a window by range: {ranged} ranged GETs"
    );
    assert!(
        index_bytes * 4 <= index_sizes,
        "{index_bytes} bytes of seek indexes of {index_sizes} fetched"
    );
}

/// Rewrite DST's seek indexes so that every file's offset is one tar block
/// off: well-formed, checksummed, and wrong. Pushed under the referrers tag.
async fn push_wrong_offsets(reg: &Registry, dst: &str, subject: &str) {
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    let dst: Reference = dst.parse().unwrap();
    let tagged = dst.with_tag(&referrers_tag(subject));
    let raw = client.get_manifest(&tagged).await.unwrap();
    let artifact = ArtifactManifest::parse(&raw.bytes, subject).unwrap();
    let mut blobs = Vec::new();
    for l in &artifact.layers {
        let digest: Digest = l.digest.parse().unwrap();
        let bytes = client
            .fetch_blob(&dst.repository, &digest, Some(l.size), 1 << 30)
            .await
            .unwrap();
        let mut idx = SeekIndex::decode(&bytes).unwrap();
        for (_, f) in idx.files.iter_mut() {
            if f.offset + 512 + f.size <= idx.uncompressed_size {
                f.offset += 512;
            }
        }
        let bad = idx.encode();
        let bad_digest = Digest::sha256_of(&bad);
        client
            .push_blob(
                &dst.repository,
                &bad_digest,
                bad.len() as u64,
                &BlobSource::Bytes(bad.clone().into()),
                None,
            )
            .await
            .unwrap();
        let head = head_len(&bad).unwrap();
        blobs.push(IndexBlob {
            layer: l.annotations[lazylayer_seek::ANNOTATION_LAYER].clone(),
            digest: bad_digest.to_string(),
            size: bad.len() as u64,
            // Read by its head, as run reads what optimize pushes.
            head: Some(HeadRef {
                size: head,
                digest: Digest::sha256_of(&bad[..head as usize]).to_string(),
            }),
        });
    }
    let subject_desc = artifact.subject.clone().unwrap();
    let m = ArtifactManifest::new(subject_desc, &blobs).to_bytes();
    client
        .put_manifest(&tagged, OCI_MANIFEST, m.into())
        .await
        .unwrap();
    let _ = reg;
}

#[test]
fn root_wrong_seek_index_costs_the_layer_not_the_bytes() {
    if !require_root(
        "root_wrong_seek_index_costs_the_layer_not_the_bytes",
        "optimize runs runc; run mounts FUSE",
    ) {
        return;
    }
    let reg = Registry::start();
    let (rep, src, dst, layers) = optimized_python3(&reg);
    let subject = rep["manifest_digest"].as_str().unwrap().to_string();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(push_wrong_offsets(&reg, &dst, &subject));
    let expected = expected_output(&src, SQLITE);

    let root = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(root.path().to_path_buf());
    let from = reg.log().len();
    let out = run(
        root.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            &dst,
            "--",
            "python3",
            "-c",
            SQLITE,
        ],
    );
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "never wrong bytes"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("differ from the boot index"),
        "the mismatch is said: {stderr}"
    );
    // Fell back to the whole layer holding sqlite3.
    let log = log_since(&reg, from);
    let biggest = layers.iter().map(|d| blob_bytes(&log, d).0).max().unwrap();
    assert!(biggest > 10_000_000, "the whole layer came: {biggest}");
    // Nothing of the wrong spans was kept.
    assert!(tree_listing(&root.path().join("files")).is_empty());
}

#[test]
fn root_seek_artifact_is_found_by_tag_and_optional() {
    if !require_root(
        "root_seek_artifact_is_found_by_tag_and_optional",
        "optimize runs runc",
    ) {
        return;
    }
    let reg = Registry::start();
    push_images(&reg, &["busybox"]);
    let store = tempfile::tempdir().unwrap();
    let src = image_ref(&reg, "busybox");
    let dst = format!("{}/optimized/busybox:boot", reg.addr());
    let out = lazylayer_ok(
        store.path(),
        &["optimize", "--json", "--no-seek-index", &src, &dst],
    );
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rep["seek_index_bytes"], 0, "{rep}");
    assert!(rep["seek_manifest_digest"].is_null(), "{rep}");
    let subject = rep["manifest_digest"].as_str().unwrap();
    let tag = referrers_tag(subject);
    assert!(!reg.log().contains(&format!("/manifests/{tag}")));

    // And with them: the artifact is there under its tag, subject DST.
    let dst2 = format!("{}/optimized/busybox:seek", reg.addr());
    let out = lazylayer_ok(store.path(), &["optimize", "--json", &src, &dst2]);
    let rep: serde_json::Value = serde_json::from_str(&out).unwrap();
    let subject = rep["manifest_digest"].as_str().unwrap().to_string();
    let artifact = rep["seek_manifest_digest"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let r: Reference = dst2.parse().unwrap();
        let raw = client
            .get_manifest(&r.with_tag(&referrers_tag(&subject)))
            .await
            .unwrap();
        assert_eq!(raw.digest.to_string(), artifact);
        let a = ArtifactManifest::parse(&raw.bytes, &subject).unwrap();
        assert!(!a.layers.is_empty());
        assert!(
            client
                .get_referrers(
                    &r.repository,
                    &subject.parse().unwrap(),
                    lazylayer_seek::MEDIA_TYPE
                )
                .await
                .unwrap()
                .is_none(),
            "docker-registry 2.8 has no referrers API"
        );
    });
}

#[test]
fn root_registry_ignoring_range_costs_the_layer_not_the_bytes() {
    if !require_root(
        "root_registry_ignoring_range_costs_the_layer_not_the_bytes",
        "optimize runs runc; run mounts FUSE",
    ) {
        return;
    }
    let reg = Registry::start();
    let (rep, src, _dst, layers) = optimized_python3(&reg);
    let expected = expected_output(&src, SQLITE);
    // The registry as seen through a proxy that hides Range headers from
    // it: it answers 200 with the whole blob.
    let proxy = common::proxy::CuttingProxy::relay(reg.port);
    proxy
        .strip_range
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let via = format!("127.0.0.1:{}/optimized/python3:boot", proxy.port);

    let root = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(root.path().to_path_buf());
    let out = run(
        root.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            &via,
            "--",
            "python3",
            "-c",
            SQLITE,
        ],
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    // Spans stopped at the first 200, the seek index head's ranged GET;
    // the layer came whole, once (maybe cut by the container's exit: its
    // end is not waited for).
    let sqlite_layer = &layers[1];
    let requests: Vec<String> = proxy
        .requests
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.to_lowercase())
        .filter(|r| r.starts_with("get ") && r.contains("/blobs/"))
        .collect();
    // Ranged GETs of blobs other than the image's layers: seek indexes.
    let boot = rep["boot_layer_digest"].as_str().unwrap();
    let ranged: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains("\r\nrange: bytes="))
        .filter(|r| !r.contains(boot) && !layers.iter().any(|d| r.contains(d.as_str())))
        .collect();
    let gets: Vec<&String> = requests
        .iter()
        .filter(|r| r.contains(&format!("/blobs/{sqlite_layer}")))
        .collect();
    assert_eq!(ranged.len(), 1, "one ignored range: {ranged:?}");
    assert_eq!(gets.len(), 1, "then the whole layer");
    assert!(!gets[0].contains("\r\nrange:"), "{}", gets[0]);
    assert!(tree_listing(&root.path().join("files")).is_empty());
}

/// A workload that reads much of a layer outside the boot set (every file
/// of python's standard library): once its spans would pass half the layer,
/// the layer comes whole, once, instead of a ranged GET a file. What the
/// layer cost in all stays under 1.5 times its size.
#[test]
fn root_spans_past_half_a_layer_fetch_it_whole() {
    if !require_root(
        "root_spans_past_half_a_layer_fetch_it_whole",
        "optimize runs runc; run mounts FUSE",
    ) {
        return;
    }
    let reg = Registry::start();
    let (_rep, _src, dst, layers) = optimized_python3(&reg);
    let root = tempfile::tempdir().unwrap();
    let _guard = StoreLeftovers(root.path().to_path_buf());
    let from = reg.log().len();
    let out = run(
        root.path(),
        &[
            "--rm",
            "--prefetch",
            "off",
            &dst,
            "--",
            "sh",
            "-c",
            "find /usr/lib/python3.11 -type f -exec cat {} + | wc -c",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = log_since(&reg, from);
    // The layer holding the standard library: the one most bytes came of.
    let sizes: Vec<(u64, usize, u64)> = layers
        .iter()
        .map(|d| {
            let (bytes, ranged) = blob_bytes(&log, d);
            let size = std::fs::metadata(reg.blob_data_path(d)).unwrap().len();
            (bytes, ranged, size)
        })
        .collect();
    eprintln!("per SRC layer (bytes fetched, ranged GETs, size): {sizes:?}");
    let &(bytes, ranged, size) = sizes.iter().max_by_key(|s| s.0).unwrap();
    let whole = log
        .lines()
        .filter(|l| l.contains("\"GET /v2/") && l.contains("\" 200 "))
        .filter(|l| layers.iter().any(|d| l.contains(&format!("/blobs/{d}"))))
        .count();
    assert_eq!(whole, 1, "one layer came whole, once");
    assert!(ranged > 0, "spans came first");
    assert!(
        bytes * 2 <= size * 3,
        "{bytes} bytes fetched of a {size}-byte layer"
    );
}
