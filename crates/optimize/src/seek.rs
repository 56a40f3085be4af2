//! After DST is pushed: a seek index for each of SRC's gzip layers, pushed
//! as one artifact whose subject is DST, so that `run` can read an untraced
//! file with one ranged GET instead of fetching its whole layer.

use std::io::BufReader;

use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{Digest, PushOutcome, Reference, RegistryClient, Repository};
use lazylayer_seek::artifact::{
    referrers_tag, ArtifactManifest, Descriptor, HeadRef, IndexBlob, EMPTY_BLOB, OCI_MANIFEST,
};
use lazylayer_seek::{head_len, SeekIndex, DEFAULT_SPAN};
use lazylayer_store::{LayerRef, Store};

use crate::OptimizeError;

/// Layer media types a seek index can describe (single-member gzip tars).
const GZIP_LAYERS: [&str; 2] = [
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SeekReport {
    /// Digest of the artifact manifest (also tagged `sha256-<hex of DST>`).
    pub manifest_digest: String,
    /// Encoded seek-index bytes, all layers.
    pub index_bytes: u64,
    /// Layers indexed (gzip ones).
    pub layers: usize,
}

/// Build and push the seek indexes of `layers` (SRC's, all in `store`) as
/// an artifact referring to DST's manifest (`dst_manifest`, `media_type`).
pub async fn push_seek_indexes(
    client: &RegistryClient,
    store: &Store,
    layers: &[LayerRef],
    dst: &Reference,
    dst_manifest: &[u8],
    media_type: &str,
) -> Result<SeekReport, OptimizeError> {
    let blobs = push_seek_blobs(client, store, layers, &dst.repository).await?;
    let mut rep = SeekReport {
        index_bytes: blobs.iter().map(|b| b.size).sum(),
        layers: blobs.len(),
        ..SeekReport::default()
    };
    if blobs.is_empty() {
        return Ok(rep);
    }
    push_empty_config(client, &dst.repository).await?;
    let subject_digest = Digest::sha256_of(dst_manifest);
    let subject = Descriptor {
        media_type: media_type.into(),
        digest: subject_digest.to_string(),
        size: dst_manifest.len() as u64,
        artifact_type: None,
        data: None,
        annotations: Default::default(),
    };
    let manifest: bytes::Bytes = ArtifactManifest::new(subject, &blobs).to_bytes().into();
    let by_digest = Reference {
        repository: dst.repository.clone(),
        tag: None,
        digest: Some(Digest::sha256_of(&manifest)),
    };
    let d = client
        .put_manifest(&by_digest, OCI_MANIFEST, manifest.clone())
        .await?;
    // The referrers tag: how readers find it on registries without the
    // referrers API (Debian's docker-registry 2.8), and what keeps its blobs
    // from a registry's garbage collection (an untagged manifest is fair game).
    let tagged = dst.with_tag(&referrers_tag(&subject_digest.to_string()));
    client.put_manifest(&tagged, OCI_MANIFEST, manifest).await?;
    rep.manifest_digest = d.to_string();
    Ok(rep)
}

/// Build and push the seek index of each of `layers` a seek index can
/// describe (gzip ones) into `repo`: what an artifact then lists.
pub(crate) async fn push_seek_blobs(
    client: &RegistryClient,
    store: &Store,
    layers: &[LayerRef],
    repo: &Repository,
) -> Result<Vec<IndexBlob>, OptimizeError> {
    let mut blobs = Vec::new();
    for l in layers
        .iter()
        .filter(|l| GZIP_LAYERS.contains(&l.media_type.as_str()))
    {
        let encoded = build_one(store, l).await?;
        let digest = Digest::sha256_of(&encoded);
        let size = encoded.len() as u64;
        // Announced in the artifact: readers fetch the head alone, by range.
        let head = head_len(&encoded).map(|n| HeadRef {
            size: n,
            digest: Digest::sha256_of(&encoded[..n as usize]).to_string(),
        });
        tracing::info!(layer = %l.digest, bytes = size, "seek index built");
        client
            .push_blob(
                repo,
                &digest,
                size,
                &BlobSource::Bytes(encoded.into()),
                None,
            )
            .await?;
        blobs.push(IndexBlob {
            layer: l.digest.to_string(),
            digest: digest.to_string(),
            size,
            head,
        });
    }
    Ok(blobs)
}

/// The empty config blob an artifact names, pushed once per repository.
pub(crate) async fn push_empty_config(
    client: &RegistryClient,
    repo: &Repository,
) -> Result<(), OptimizeError> {
    let empty = Digest::sha256_of(EMPTY_BLOB);
    let outcome = client
        .push_blob(
            repo,
            &empty,
            EMPTY_BLOB.len() as u64,
            &BlobSource::Bytes(EMPTY_BLOB.into()),
            None,
        )
        .await?;
    if outcome == PushOutcome::Uploaded {
        tracing::debug!("pushed the empty config blob");
    }
    Ok(())
}

/// One layer's encoded seek index, built from the stored blob.
async fn build_one(store: &Store, l: &LayerRef) -> Result<Vec<u8>, OptimizeError> {
    let path = store.blob_path(&l.digest);
    let meta = std::fs::metadata(&path)
        .map_err(|e| OptimizeError::io(&format!("layer blob {}", l.digest), &path, e))?;
    if meta.len() != l.size {
        return Err(OptimizeError::BadImage(format!(
            "stored blob of layer {} has {} bytes, the manifest says {}",
            l.digest,
            meta.len(),
            l.size
        )));
    }
    let layer = l.clone();
    tokio::task::spawn_blocking(move || {
        let f = std::fs::File::open(&path)
            .map_err(|e| OptimizeError::io("opening layer blob", &path, e))?;
        let idx = SeekIndex::build(BufReader::with_capacity(1 << 20, f), DEFAULT_SPAN).map_err(
            |source| OptimizeError::Seek {
                layer: layer.digest.to_string(),
                source,
            },
        )?;
        // The store's blob is verified when written; a change since would
        // make an index of other bytes than the registry serves.
        if Digest::from_sha256_bytes(idx.layer_digest) != layer.digest {
            return Err(OptimizeError::BadImage(format!(
                "stored blob of layer {} does not match its digest",
                layer.digest
            )));
        }
        Ok(idx.encode())
    })
    .await
    .map_err(|e| OptimizeError::BadImage(format!("seek index worker: {e}")))?
}

#[cfg(test)]
mod tests;
