//! `optimize --attach SRC`: the boot layer and the seek indexes of SRC's
//! layers pushed as one artifact whose `subject` is SRC's manifest, so that
//! SRC itself (its tag, manifest and digest unchanged) starts lazily. Found
//! through the referrers API, or on registries without it through the
//! referrers tag schema's tag `sha256-<hex of SRC>` (an OCI index listing
//! every referrer), which this keeps up to date.

use std::collections::BTreeMap;

use lazylayer_index::chunks::ChunkCompression;
use lazylayer_index::{
    ANNOTATION_BOOT_DIFF_ID, ANNOTATION_BOOT_LAYER, ANNOTATION_BOOT_SIZE, ANNOTATION_INDEX,
    ANNOTATION_INDEX_REGION_DIGEST, ANNOTATION_INDEX_REGION_SIZE, ANNOTATION_VERSION,
    BOOT_ARTIFACT_TYPE,
};
use lazylayer_layer::LayerDigests;
use lazylayer_oci::client::BlobSource;
use lazylayer_oci::{Digest, OciError, PushOutcome, Reference, RegistryClient};
use lazylayer_seek::artifact::{
    empty_config, referrers_tag, referrers_tag_index, ArtifactManifest, Descriptor, IndexBlob,
    OCI_INDEX, OCI_MANIFEST,
};

use crate::{BootBlob, BootLayer, OptimizeError, OptimizeOptions, PhaseSink};

/// When the artifact was made: readers take the newest.
pub use lazylayer_oci::manifest::ANNOTATION_CREATED;

/// What `--attach` pushed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct AttachReport {
    /// The artifact manifest's digest.
    pub artifact_digest: String,
    /// The referrers tag now listing it.
    pub referrers_tag: String,
    /// Bytes uploaded (the boot layer, unless the registry had it).
    pub bytes_uploaded: u64,
    /// Encoded bytes of the seek indexes in the artifact.
    pub seek_index_bytes: u64,
}

/// The boot layer as the artifact describes it.
pub struct AttachedBoot<'a> {
    pub blob: &'a BootBlob<'a>,
    pub digests: &'a LayerDigests,
    pub media_type: &'a str,
    pub index_version: u32,
    pub region: (u64, String),
    pub created: &'a str,
}

/// `optimize --attach`'s last step: the seek indexes of SRC's layers (`rec`,
/// its manifest `manifest`) and then the boot layer `boot` (its blob
/// `blob`), as an artifact attached to SRC.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn attach(
    client: &RegistryClient,
    store: &lazylayer_store::Store,
    src: &Reference,
    rec: &lazylayer_store::ImageRecord,
    manifest: &[u8],
    blob: &BootBlob<'_>,
    boot: &BootLayer,
    opts: &OptimizeOptions,
    phase: PhaseSink<'_>,
) -> Result<AttachReport, OptimizeError> {
    phase(&format!("attaching the boot layer to {src}"));
    let seek = if opts.seek_index {
        phase("pushing seek indexes of the source layers");
        crate::seek::push_seek_blobs(client, store, &rec.layers, &src.repository).await?
    } else {
        Vec::new()
    };
    let subject = Descriptor {
        media_type: rec.manifest_media_type.clone(),
        digest: rec.manifest_digest.to_string(),
        size: manifest.len() as u64,
        artifact_type: None,
        data: None,
        annotations: BTreeMap::new(),
    };
    let created = crate::rfc3339_now();
    let attached = AttachedBoot {
        blob,
        digests: &boot.digests,
        media_type: match boot.layout.compression {
            ChunkCompression::Gzip => lazylayer_oci::manifest::OCI_LAYER_GZIP,
            ChunkCompression::Zstd => lazylayer_oci::manifest::OCI_LAYER_ZSTD,
        },
        index_version: lazylayer_index::CHUNKED_FORMAT_VERSION,
        region: boot.region.clone(),
        created: &created,
    };
    let mut rep = push_attached(client, src, subject, &attached, &seek).await?;
    rep.seek_index_bytes = seek.iter().map(|b| b.size).sum();
    Ok(rep)
}

/// The artifact manifest for SRC's manifest `subject`: the boot layer first,
/// then the seek indexes; the boot layer's annotations on the manifest, as
/// an optimized image's manifest carries them.
pub fn boot_artifact(
    subject: Descriptor,
    boot: &AttachedBoot<'_>,
    seek: &[IndexBlob],
) -> ArtifactManifest {
    let boot_desc = Descriptor {
        media_type: boot.media_type.into(),
        digest: boot.digests.digest.clone(),
        size: boot.digests.size,
        artifact_type: None,
        data: None,
        annotations: BTreeMap::from([
            (
                ANNOTATION_INDEX.to_string(),
                lazylayer_index::INDEX_FILE_NAME.to_string(),
            ),
            (
                ANNOTATION_VERSION.to_string(),
                boot.index_version.to_string(),
            ),
            (
                ANNOTATION_BOOT_DIFF_ID.to_string(),
                boot.digests.diff_id.clone(),
            ),
        ]),
    };
    ArtifactManifest {
        schema_version: 2,
        media_type: OCI_MANIFEST.into(),
        artifact_type: Some(BOOT_ARTIFACT_TYPE.into()),
        config: empty_config(),
        layers: std::iter::once(boot_desc)
            .chain(seek.iter().map(IndexBlob::descriptor))
            .collect(),
        subject: Some(subject),
        annotations: BTreeMap::from([
            (
                ANNOTATION_BOOT_LAYER.to_string(),
                boot.digests.digest.clone(),
            ),
            (
                ANNOTATION_BOOT_SIZE.to_string(),
                boot.digests.size.to_string(),
            ),
            (
                ANNOTATION_INDEX_REGION_SIZE.to_string(),
                boot.region.0.to_string(),
            ),
            (
                ANNOTATION_INDEX_REGION_DIGEST.to_string(),
                boot.region.1.clone(),
            ),
            (ANNOTATION_CREATED.to_string(), boot.created.to_string()),
        ]),
    }
}

/// Push the boot layer and the artifact into SRC's repository (the seek
/// indexes `seek` are pushed already), then list the artifact under the
/// referrers tag. SRC's manifest is never written.
pub async fn push_attached(
    client: &RegistryClient,
    src: &Reference,
    subject: Descriptor,
    boot: &AttachedBoot<'_>,
    seek: &[IndexBlob],
) -> Result<AttachReport, OptimizeError> {
    let repo = &src.repository;
    let mut rep = AttachReport::default();
    if client
        .push_blob(
            repo,
            boot.blob.digest,
            boot.blob.size,
            &BlobSource::File(boot.blob.path.to_path_buf()),
            None,
        )
        .await?
        == PushOutcome::Uploaded
    {
        rep.bytes_uploaded += boot.blob.size;
    }
    crate::seek::push_empty_config(client, repo).await?;
    let subject_digest = subject.digest.clone();
    let artifact = boot_artifact(subject, boot, seek);
    let bytes = artifact.to_bytes();
    let digest = Digest::sha256_of(&bytes);
    let by_digest = Reference {
        repository: repo.clone(),
        tag: None,
        digest: Some(digest.clone()),
    };
    client
        .put_manifest(&by_digest, OCI_MANIFEST, bytes.clone().into())
        .await?;
    // The referrers tag lists every referrer, ours added to what it held:
    // readers on registries without the referrers API find it there, and
    // it keeps the artifact from a registry's garbage collection. (Two
    // optimizers updating it at once may lose one's entry: the registry API
    // has no compare-and-swap on tags; the referrers API has no such race.)
    let tag = referrers_tag(&subject_digest);
    let tagged = src.with_tag(&tag);
    let existing = match client.get_manifest(&tagged).await {
        Ok(m) => Some(m),
        Err(OciError::NotFound { .. }) => None,
        Err(e) => return Err(e.into()),
    };
    let index = referrers_tag_index(
        existing
            .as_ref()
            .map(|m| (&m.bytes[..], m.media_type.as_str())),
        artifact.descriptor(&bytes),
    );
    client
        .put_manifest(&tagged, OCI_INDEX, index.into())
        .await?;
    rep.artifact_digest = digest.to_string();
    rep.referrers_tag = tag;
    Ok(rep)
}
