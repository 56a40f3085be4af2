//! A layer's seek index is built from the store's blob, and only from the
//! blob the manifest names.

use std::path::Path;

use lazylayer_layer::{Compression, LayerWriter};
use lazylayer_oci::Digest;
use lazylayer_seek::SeekIndex;
use lazylayer_store::{LayerRef, Store};

use super::build_one;
use crate::OptimizeError;

/// A real single-member tar.gz of `files`, stored in `store` under its digest.
fn stored_layer(store: &Store, dir: &Path, files: &[(&str, &[u8])]) -> (LayerRef, Vec<u8>) {
    for (p, data) in files {
        std::fs::write(dir.join(p), data).unwrap();
    }
    let mut w = LayerWriter::new(Vec::new(), Compression::Gzip);
    for (p, _) in files {
        w.append_path(dir, Path::new(p)).unwrap();
    }
    let (d, blob) = w.finish_into_inner().unwrap();
    let l = LayerRef {
        digest: d.digest.parse().unwrap(),
        diff_id: d.diff_id.parse().unwrap(),
        size: d.size,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
    };
    assert_eq!(blob.len() as u64, l.size);
    let path = store.blob_path(&l.digest);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, &blob).unwrap();
    (l, blob)
}

#[tokio::test]
async fn a_gzip_layer_gets_the_index_of_its_stored_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let (l, blob) = stored_layer(&store, tmp.path(), &[("a", b"alpha"), ("big", &big)]);
    let idx = SeekIndex::decode(&build_one(&store, &l).await.unwrap()).unwrap();
    assert_eq!(Digest::from_sha256_bytes(idx.layer_digest), l.digest);
    assert_eq!(idx.compressed_size, blob.len() as u64);
    let names: Vec<&[u8]> = idx.files.iter().map(|(p, _)| p.as_slice()).collect();
    assert_eq!(names, [&b"a"[..], b"big"]);
    assert_eq!(idx.file(b"big").unwrap().size, big.len() as u64);
}

#[tokio::test]
async fn a_stored_blob_of_another_size_than_the_manifest_says_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let (mut l, _) = stored_layer(&store, tmp.path(), &[("a", b"alpha")]);
    l.size += 1;
    match build_one(&store, &l).await {
        Err(OptimizeError::BadImage(m)) => assert!(m.contains("the manifest says"), "{m}"),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
}

#[tokio::test]
async fn a_stored_blob_changed_since_it_was_verified_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(tmp.path().join("store")).unwrap();
    let (l, mut blob) = stored_layer(&store, tmp.path(), &[("a", b"alpha")]);
    // Same length and a valid gzip still (the header's MTIME, which no
    // checksum covers), but not the bytes the digest names.
    blob[4] ^= 0xff;
    std::fs::write(store.blob_path(&l.digest), blob).unwrap();
    match build_one(&store, &l).await {
        Err(OptimizeError::BadImage(m)) => assert!(m.contains("does not match"), "{m}"),
        other => panic!("{:?}", other.map(|b| b.len())),
    }
    // A missing blob is an I/O error naming it.
    let tmp2 = tempfile::tempdir().unwrap();
    let empty = Store::open(tmp2.path()).unwrap();
    assert!(matches!(
        build_one(&empty, &l).await,
        Err(OptimizeError::Io { .. })
    ));
}
