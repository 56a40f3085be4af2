//! What a hostile image must not do to the host (docs/security.md): a boot
//! index that disguises device nodes and FIFOs as regular files, and a host
//! user reaching for the store's setuid binaries and device nodes. Needs
//! root, the real registry and runc.

mod common;

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use lazylayer_index::{BootIndex, FileKind, INDEX_FILE_NAME};
use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{ClientConfig, Digest, Reference, RegistryClient};

fn require_root() {
    assert!(
        is_root(),
        "these tests need root (runc, FUSE, mknod); run them as root"
    );
}

/// Paths of the hostile boot layer, all called 4096-byte regular files by its index.
const DISGUISED: [&str; 3] = ["evil/disk", "evil/zero", "evil/fifo"];

/// Push `optimized/busybox:hostile`: the optimized busybox image whose boot layer
/// also holds the host's root block device node, /dev/zero's char device
/// node and a FIFO under `evil/`, with index entries that call each of them
/// a regular file of the boot layer. Returns its reference.
fn push_hostile_image(reg: &Registry) -> String {
    push_images(reg, &["busybox"]);
    let (_store, _src, dst) = optimize_image(reg, "busybox", &[]);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = RegistryClient::new(ClientConfig::default()).unwrap();
    let dst: Reference = dst.parse().unwrap();
    let repo = dst.repository.clone();
    rt.block_on(async {
        let raw = client.get_manifest(&dst).await.unwrap();
        let mut manifest: serde_json::Value = serde_json::from_slice(&raw.bytes).unwrap();
        let cfg_digest: Digest = manifest["config"]["digest"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let cfg = client
            .fetch_blob(&repo, &cfg_digest, None, 1 << 20)
            .await
            .unwrap();
        let mut config: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        let boot = manifest["layers"]
            .as_array()
            .unwrap()
            .last()
            .unwrap()
            .clone();
        let boot_digest: Digest = boot["digest"].as_str().unwrap().parse().unwrap();
        let gz = client
            .fetch_blob(&repo, &boot_digest, None, 256 << 20)
            .await
            .unwrap();
        let mut tar_bytes = Vec::new();
        lazylayer_layer::decoder(&gz[..], lazylayer_layer::Compression::sniff(&gz))
            .unwrap()
            .read_to_end(&mut tar_bytes)
            .unwrap();

        let (tar, index) = hostile_boot_tar(&tar_bytes);
        let layer = gzip(&tar);
        let (layer_digest, diff_id) = (Digest::sha256_of(&layer), Digest::sha256_of(&tar));
        client
            .push_blob(
                &repo,
                &layer_digest,
                layer.len() as u64,
                &BlobSource::Bytes(layer.clone().into()),
                None,
            )
            .await
            .unwrap();
        let ids = config["rootfs"]["diff_ids"].as_array_mut().unwrap();
        *ids.last_mut().unwrap() = diff_id.to_string().into();
        let cfg = serde_json::to_vec(&config).unwrap();
        let cfg_digest = Digest::sha256_of(&cfg);
        client
            .push_blob(
                &repo,
                &cfg_digest,
                cfg.len() as u64,
                &BlobSource::Bytes(cfg.clone().into()),
                None,
            )
            .await
            .unwrap();
        manifest["config"]["digest"] = cfg_digest.to_string().into();
        manifest["config"]["size"] = cfg.len().into();
        let last = manifest["layers"]
            .as_array_mut()
            .unwrap()
            .last_mut()
            .unwrap();
        last["digest"] = layer_digest.to_string().into();
        last["size"] = layer.len().into();
        // An unchunked gzip boot layer, index last (as earlier releases
        // wrote them): read whole before the start, then served from disk.
        last["mediaType"] = "application/vnd.oci.image.layer.v1.tar+gzip".into();
        if let Some(a) = manifest["annotations"].as_object_mut() {
            a.remove(lazylayer_index::ANNOTATION_INDEX_REGION_SIZE);
            a.remove(lazylayer_index::ANNOTATION_INDEX_REGION_DIGEST);
        }
        manifest["annotations"][lazylayer_index::ANNOTATION_BOOT_LAYER] =
            layer_digest.to_string().into();
        // Same repository: the base layers are there already.
        let hostile: Reference = format!("{}/optimized/busybox:hostile", reg.addr())
            .parse()
            .unwrap();
        client
            .put_manifest(
                &hostile,
                &raw.media_type,
                serde_json::to_vec(&manifest).unwrap().into(),
            )
            .await
            .unwrap();
        assert!(index.lookup(b"evil/fifo").is_some());
        hostile.to_string()
    })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The boot tar's entries but its index, then the disguised nodes, then a
/// new index claiming them as regular files held by the boot layer (as
/// content: the form lazylayer read before the headers, still read).
fn hostile_boot_tar(tar_bytes: &[u8]) -> (Vec<u8>, BootIndex) {
    let mut ar = tar::Archive::new(tar_bytes);
    let mut kept = Vec::new();
    let mut index_bytes = Vec::new();
    // Each entry's bytes run from the previous entry's end (so extension
    // headers before it come along) to the end of its padded data.
    let mut prev_end = 0usize;
    for e in ar.entries().unwrap() {
        let mut e = e.unwrap();
        let (from, to) = (
            prev_end,
            (e.raw_file_position() + e.size().div_ceil(512) * 512) as usize,
        );
        prev_end = to;
        // The index's parts (`NAME`, `NAME.1`, …) carry it in their headers.
        if e.path_bytes().starts_with(INDEX_FILE_NAME.as_bytes()) {
            let part = lazylayer_layer::metadata::entry_data(&mut e)
                .unwrap()
                .unwrap();
            index_bytes.extend_from_slice(&part);
            continue;
        }
        kept.extend_from_slice(&tar_bytes[from..to]);
    }
    let index = BootIndex::decode(&index_bytes).expect("the boot layer has an index");
    let mut b = tar::Builder::new(kept);
    let mut dir = tar::Header::new_ustar();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    b.append_data(&mut dir, "evil", &[][..]).unwrap();
    let host_disk = std::fs::metadata("/").unwrap().dev();
    let nodes = [
        (
            tar::EntryType::Block,
            rustix::fs::major(host_disk),
            rustix::fs::minor(host_disk),
        ),
        (tar::EntryType::Char, 1, 5),
        (tar::EntryType::Fifo, 0, 0),
    ];
    for (path, (kind, major, minor)) in DISGUISED.iter().zip(nodes) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        b.append_data(&mut h, path, &[][..]).unwrap();
    }
    let (layers, mut entries) = (index.layers.clone(), index.entries.clone());
    let mut evil = entries[0].clone();
    (evil.path, evil.parent, evil.in_boot, evil.xattrs) = (b"evil".to_vec(), 0, true, Vec::new());
    entries.push(evil);
    let evil_idx = entries.len() as u32 - 1;
    for path in DISGUISED {
        let mut f = entries[evil_idx as usize].clone();
        (f.path, f.parent, f.kind, f.mode, f.size) = (
            path.as_bytes().to_vec(),
            evil_idx,
            FileKind::File,
            0o644,
            4096,
        );
        entries.push(f);
    }
    let index = BootIndex::new(layers, entries).unwrap();
    let bytes = index.encode();
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_size(bytes.len() as u64);
    b.append_data(&mut h, INDEX_FILE_NAME, &bytes[..]).unwrap();
    (b.into_inner().unwrap(), index)
}

/// The container gets an error for every disguised node, the host's disk
/// bytes never reach it, and `run` ends (the FIFO used to hang the reader
/// in the kernel for good, beyond kill -9).
#[test]
fn root_hostile_index_disguising_devices_and_fifos_gives_the_container_eio() {
    require_root();
    let reg = Registry::start();
    let image = push_hostile_image(&reg);
    let store = tempfile::tempdir().unwrap();
    let _leftovers = StoreLeftovers(store.path().to_path_buf());
    for path in DISGUISED {
        let t0 = Instant::now();
        let target = format!("/{path}");
        let out = lazylayer(
            store.path(),
            &[
                "run",
                "--rm",
                "--fetch-timeout",
                "20",
                // Every run lazy, as this tests the index's lies: a prefetch
                // (which `run` lets finish after the exit) would make the image
                // local, and a local image runs on its true layers, no index.
                "--prefetch",
                "off",
                &image,
                "--",
                "head",
                "-c",
                "16",
                &target,
            ],
        );
        let elapsed = t0.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{path}: the container read it: {out:?}"
        );
        assert!(
            out.stdout.is_empty(),
            "{path}: bytes reached the container: {:?}",
            out.stdout
        );
        assert!(
            stderr.contains("I/O error") || stderr.contains("Input/output error"),
            "{path}: {stderr}"
        );
        assert!(
            elapsed < Duration::from_secs(60),
            "{path}: run took {elapsed:?}"
        );
    }
    // An honest file of the same image is still served.
    let out = lazylayer_ok(
        store.path(),
        &["run", "--rm", &image, "--", "cat", "/etc/passwd"],
    );
    assert!(out.contains("root:"), "{out}");
    assert!(mounts_below(store.path()).is_empty());
}

/// The store and every lazy root are off limits to host users: the store is
/// 0700 root (containerd, podman and Docker since CVE-2021-41091 do the
/// same), so an image's setuid-root binaries and 0666 device nodes there are
/// out of reach; a lazy root is mounted nosuid,nodev besides.
#[test]
fn root_host_users_cannot_reach_the_stores_setuid_binaries_or_devices() {
    require_root();
    let reg = Registry::start();
    push_images(&reg, &["multilayer"]);
    let (_opt_store, _src, dst) = optimize_image(&reg, "multilayer", &[]);
    let store = tempfile::tempdir().unwrap();
    // World-traversable up to the store root: only the store's own bits count.
    std::fs::set_permissions(
        store.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let root = store.path().join("store");
    let _leftovers = StoreLeftovers(root.clone());
    lazylayer_ok(&root, &["pull", &image_ref(&reg, "multilayer")]);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&root), 0o700, "store root");

    // Extracted layers hold the image's setuid file and its 0666 char device.
    let find = |name: &str| -> std::path::PathBuf {
        let layers = root.join("layers/sha256");
        std::fs::read_dir(&layers)
            .unwrap()
            .map(|e| e.unwrap().path().join("fs").join(name))
            .find(|p| p.symlink_metadata().is_ok())
            .unwrap_or_else(|| panic!("no layer holds {name}"))
    };
    let setuid = find("data/modes/setuid");
    let null = find("data/special/null");
    assert_eq!(mode(&setuid), 0o4755);
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .args(args)
            .output()
            .expect("setpriv (util-linux) must be installed")
    };
    let out = as_nobody(&["head", "-c", "0", null.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a host user opened the image's device: {out:?}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{out:?}"
    );
    let out = as_nobody(&[setuid.to_str().unwrap()]);
    assert!(
        !out.status.success(),
        "a host user ran the image's setuid file: {out:?}"
    );

    // A running lazy container: its lazy root, lowers and rootfs are below
    // the private store; the FUSE mount itself is nosuid,nodev.
    let mut child = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_lazylayer"))
            .arg("--root")
            .arg(&root)
            .args(["run", "--rm", "--name", "held", &dst, "--", "sleep", "30"])
            .spawn()
            .unwrap(),
    );
    wait_mounted(&root, 2);
    let cdir = root.join("containers/held");
    assert_eq!(mode(&cdir), 0o700, "container dir");
    assert_eq!(mode(&root.join("containers")), 0o700, "containers dir");
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let lower = cdir.join("lower");
    let fuse = info
        .lines()
        .find(|l| l.split(' ').nth(4) == lower.to_str())
        .unwrap_or_else(|| panic!("no lazy root at {}", lower.display()));
    let opts: Vec<&str> = fuse.split(' ').nth(5).unwrap().split(',').collect();
    assert!(
        opts.contains(&"nosuid") && opts.contains(&"nodev"),
        "{fuse}"
    );
    for p in [
        lower.join("data/special/null"),
        cdir.join("rootfs/data/special/null"),
    ] {
        let out = as_nobody(&["head", "-c", "0", p.to_str().unwrap()]);
        assert!(!out.status.success(), "{}: {out:?}", p.display());
    }
    send_signal(child.0.id(), rustix::process::Signal::TERM);
    assert!(wait_exit(&mut child.0, Duration::from_secs(30)).is_some());
    assert!(mounts_below(&root).is_empty());
}
