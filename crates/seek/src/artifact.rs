//! The registry vocabulary of seek indexes: the artifact manifest that
//! carries an image's seek indexes, and where it is found.
//!
//! One OCI image manifest per optimized image, `artifactType`
//! [`MEDIA_TYPE`], empty config, one layer per seek index (annotated with the
//! original layer's digest) and `subject` = the optimized image's manifest.
//! It is found through the referrers API or, on registries without it, the
//! referrers tag schema's tag `sha256-<hex>` ([`referrers_tag`]).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

use crate::{ANNOTATION_HEAD_DIGEST, ANNOTATION_HEAD_SIZE, ANNOTATION_LAYER, MEDIA_TYPE};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
/// The empty descriptor's blob, `{}`.
pub const EMPTY_BLOB: &[u8] = b"{}";
pub const EMPTY_DIGEST: &str =
    "sha256:44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a";
/// Largest seek-index blob a reader fetches (a 1 GB layer's index at the
/// default span is a few MB).
pub const MAX_INDEX_BLOB: u64 = 64 << 20;

/// The referrers tag schema's tag for referrers of `digest` (`sha256:HEX`).
pub fn referrers_tag(digest: &str) -> String {
    digest.replacen(':', "-", 1)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ArtifactManifest {
    pub schema_version: u32,
    pub media_type: String,
    #[serde(default)]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    #[serde(default)]
    pub layers: Vec<Descriptor>,
    #[serde(default)]
    pub subject: Option<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// A referrers response (an OCI image index), and what the referrers tag
/// schema's tag holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReferrersIndex {
    #[serde(default = "two")]
    pub schema_version: u32,
    #[serde(default = "oci_index")]
    pub media_type: String,
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
}

fn two() -> u32 {
    2
}

fn oci_index() -> String {
    OCI_INDEX.into()
}

/// The empty config every artifact here names.
pub fn empty_config() -> Descriptor {
    Descriptor {
        media_type: EMPTY_MEDIA_TYPE.into(),
        digest: EMPTY_DIGEST.into(),
        size: EMPTY_BLOB.len() as u64,
        artifact_type: None,
        data: Some("e30=".into()),
        annotations: BTreeMap::new(),
    }
}

/// What the referrers tag of a subject should hold once `added` (an
/// artifact manifest's descriptor) joins the referrers it holds now
/// (`existing`: the tag's manifest and media type, None when untagged).
/// An earlier release tagged its seek-index artifact itself, not an index:
/// that artifact is kept, listed in the new index. A descriptor of the same
/// digest is replaced, so pushing twice lists it once.
pub fn referrers_tag_index(existing: Option<(&[u8], &str)>, added: Descriptor) -> Vec<u8> {
    let mut manifests = match existing {
        Some((bytes, media_type)) if media_type == OCI_INDEX => {
            serde_json::from_slice::<ReferrersIndex>(bytes)
                .map(|i| i.manifests)
                .unwrap_or_default()
        }
        Some((bytes, _)) => serde_json::from_slice::<ArtifactManifest>(bytes)
            .ok()
            .map(|m| m.descriptor(bytes))
            .into_iter()
            .collect(),
        None => Vec::new(),
    };
    manifests.retain(|d| d.digest != added.digest);
    manifests.push(added);
    let index = ReferrersIndex {
        schema_version: 2,
        media_type: OCI_INDEX.into(),
        manifests,
    };
    serde_json::to_vec(&index).expect("plain data serialises")
}

/// One seek index in an artifact: its blob and the layer it indexes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexBlob {
    pub layer: String,
    pub digest: String,
    pub size: u64,
    /// A version 2 index's head: what to fetch first, by range.
    pub head: Option<HeadRef>,
}

/// The head of a seek-index blob: its first `size` bytes, whose SHA-256
/// is `digest` (`sha256:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadRef {
    pub size: u64,
    pub digest: String,
}

impl ArtifactManifest {
    /// The artifact for `subject` holding `indexes`.
    pub fn new(subject: Descriptor, indexes: &[IndexBlob]) -> ArtifactManifest {
        ArtifactManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.into(),
            artifact_type: Some(MEDIA_TYPE.into()),
            config: empty_config(),
            layers: indexes.iter().map(IndexBlob::descriptor).collect(),
            subject: Some(subject),
            annotations: BTreeMap::new(),
        }
    }

    /// This manifest's descriptor, for a referrers index: its type and
    /// annotations ride along, as the referrers API lists them.
    pub fn descriptor(&self, bytes: &[u8]) -> Descriptor {
        Descriptor {
            media_type: self.media_type.clone(),
            digest: format!("sha256:{:x}", <sha2::Sha256 as sha2::Digest>::digest(bytes)),
            size: bytes.len() as u64,
            artifact_type: self.artifact_type.clone(),
            data: None,
            annotations: self.annotations.clone(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serialises")
    }

    /// Parse an artifact fetched for the image `subject` (manifest digest):
    /// refused unless it is a seek-index artifact whose subject is that image.
    pub fn parse(bytes: &[u8], subject: &str) -> Result<ArtifactManifest, String> {
        let m: ArtifactManifest =
            serde_json::from_slice(bytes).map_err(|e| format!("not a manifest: {e}"))?;
        if m.artifact_type.as_deref() != Some(MEDIA_TYPE) {
            return Err(format!(
                "artifact type {:?}, not {MEDIA_TYPE}",
                m.artifact_type
            ));
        }
        match &m.subject {
            Some(s) if s.digest == subject => Ok(m),
            Some(s) => Err(format!("its subject is {}, not {subject}", s.digest)),
            None => Err("it has no subject".into()),
        }
    }

    /// The seek index of `layer` (a layer digest), if the artifact has one.
    /// A head announced by malformed annotations is left out (the blob is
    /// then fetched whole, and checked against its digest).
    pub fn index_for(&self, layer: &str) -> Option<IndexBlob> {
        self.layers
            .iter()
            .find(|d| {
                d.media_type == MEDIA_TYPE
                    && d.annotations.get(ANNOTATION_LAYER).map(String::as_str) == Some(layer)
            })
            .map(|d| IndexBlob {
                layer: layer.to_string(),
                digest: d.digest.clone(),
                size: d.size,
                head: head_of(d),
            })
    }
}

impl IndexBlob {
    /// The seek index's descriptor in an artifact.
    pub fn descriptor(&self) -> Descriptor {
        Descriptor {
            media_type: MEDIA_TYPE.into(),
            digest: self.digest.clone(),
            size: self.size,
            artifact_type: None,
            data: None,
            annotations: [(ANNOTATION_LAYER.to_string(), self.layer.clone())]
                .into_iter()
                .chain(self.head.iter().flat_map(|h| {
                    [
                        (ANNOTATION_HEAD_SIZE.to_string(), h.size.to_string()),
                        (ANNOTATION_HEAD_DIGEST.to_string(), h.digest.clone()),
                    ]
                }))
                .collect(),
        }
    }
}

fn head_of(d: &Descriptor) -> Option<HeadRef> {
    let size: u64 = d.annotations.get(ANNOTATION_HEAD_SIZE)?.parse().ok()?;
    let digest = d.annotations.get(ANNOTATION_HEAD_DIGEST)?;
    let hex = digest.strip_prefix("sha256:")?;
    let well_formed = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    (well_formed && size > 0 && size <= d.size).then(|| HeadRef {
        size,
        digest: digest.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_digest_is_that_of_the_empty_object() {
        use sha2::Digest as _;
        let d = format!("sha256:{:x}", sha2::Sha256::digest(EMPTY_BLOB));
        assert_eq!(d, EMPTY_DIGEST);
    }

    /// An image manifest's descriptor (digest sha256:aa).
    fn subject() -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: "sha256:aa".into(),
            size: 10,
            artifact_type: None,
            data: None,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn the_referrers_tag_lists_each_artifact_once_and_keeps_an_old_tagged_one() {
        let subject = subject();
        let seek = ArtifactManifest::new(subject.clone(), &[]);
        let seek_bytes = seek.to_bytes();
        let mut boot = seek.clone();
        boot.artifact_type = Some("application/x-boot".into());
        boot.annotations.insert("k".into(), "v".into());
        let boot_bytes = boot.to_bytes();
        let added = boot.descriptor(&boot_bytes);
        // Untagged: an index of the one artifact.
        let first = referrers_tag_index(None, added.clone());
        let idx: ReferrersIndex = serde_json::from_slice(&first).unwrap();
        assert_eq!(idx.media_type, OCI_INDEX);
        assert_eq!(idx.manifests, std::slice::from_ref(&added));
        assert_eq!(idx.manifests[0].annotations["k"], "v");
        // Added again: still once.
        let again = referrers_tag_index(Some((&first, OCI_INDEX)), added.clone());
        let idx: ReferrersIndex = serde_json::from_slice(&again).unwrap();
        assert_eq!(idx.manifests.len(), 1);
        // An earlier release's tag, the seek artifact itself: kept, listed.
        let merged = referrers_tag_index(Some((&seek_bytes, OCI_MANIFEST)), added.clone());
        let idx: ReferrersIndex = serde_json::from_slice(&merged).unwrap();
        assert_eq!(idx.manifests.len(), 2);
        assert_eq!(idx.manifests[0], seek.descriptor(&seek_bytes));
        assert_eq!(idx.manifests[0].artifact_type.as_deref(), Some(MEDIA_TYPE));
        assert_eq!(idx.manifests[1], added);
    }

    #[test]
    fn artifact_round_trip_and_subject_check() {
        let subject = subject();
        let head = HeadRef {
            size: 3,
            digest: format!("sha256:{}", "ab".repeat(32)),
        };
        let blob = IndexBlob {
            layer: "sha256:11".into(),
            digest: "sha256:22".into(),
            size: 5,
            head: Some(head.clone()),
        };
        let m = ArtifactManifest::new(subject, std::slice::from_ref(&blob));
        let bytes = m.to_bytes();
        let back = ArtifactManifest::parse(&bytes, "sha256:aa").unwrap();
        assert_eq!(back.index_for("sha256:11"), Some(blob.clone()));
        // A head that is not one is left out: the blob is fetched whole.
        for (key, value) in [
            (ANNOTATION_HEAD_SIZE, "6"),
            (ANNOTATION_HEAD_SIZE, "0"),
            (ANNOTATION_HEAD_SIZE, "-1"),
            (ANNOTATION_HEAD_DIGEST, "sha256:ab"),
            (ANNOTATION_HEAD_DIGEST, "md5:00"),
        ] {
            let mut m = back.clone();
            m.layers[0].annotations.insert(key.into(), value.into());
            let got = m.index_for("sha256:11").unwrap();
            assert_eq!(got.head, None, "{key}={value}");
        }
        let old = IndexBlob { head: None, ..blob };
        let m = ArtifactManifest::new(m.subject.clone().unwrap(), std::slice::from_ref(&old));
        assert_eq!(m.index_for("sha256:11"), Some(old));
        assert_eq!(back.index_for("sha256:33"), None);
        assert!(ArtifactManifest::parse(&bytes, "sha256:bb").is_err());
        assert_eq!(referrers_tag("sha256:abc"), "sha256-abc");
    }
}
