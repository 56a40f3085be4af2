//! Boot artifacts: a boot layer attached to an unchanged image through the
//! OCI `subject` field (`optimize --attach`). An image with no boot layer of
//! its own is looked up among its referrers (the referrers API, else the
//! referrers tag schema's `sha256-<hex>` tag); each boot artifact listed,
//! newest first, is fetched by digest and checked: its type, its subject (the
//! image's manifest), its boot layer and index region. The caller then checks
//! the index against the image's layers, and the first that passes is used.
//!
//! Everything here comes from the registry, so everything is checked, and a
//! refusal is a reason (a line for the user), never a failure: the image then
//! starts as a plain one would, by a full pull.

use std::collections::BTreeMap;
use std::sync::Arc;

use lazylayer_fetch::FetchError;
use lazylayer_index::{ANNOTATION_BOOT_DIFF_ID, ANNOTATION_BOOT_SIZE, BOOT_ARTIFACT_TYPE};
use lazylayer_oci::manifest::{RawManifest, ANNOTATION_CREATED, OCI_LAYER_GZIP, OCI_LAYER_ZSTD};
use lazylayer_oci::{Digest, OciError, Reference, RegistryClient};
use lazylayer_seek::artifact::{referrers_tag, ArtifactManifest, ReferrersIndex, OCI_INDEX};
use lazylayer_store::LayerRef;

use crate::annotations::{from_annotations, BootAnnotations};

/// Layer media types a boot layer may have in an artifact.
const BOOT_LAYER_TYPES: [&str; 2] = [OCI_LAYER_GZIP, OCI_LAYER_ZSTD];
/// Boot artifacts tried for one start at most: each costs a round trip or two.
const MAX_TRIED: usize = 4;

/// A boot artifact listed for an image: its manifest digest and when it was
/// made (as its descriptor says; an RFC 3339 time sorts as text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub digest: Digest,
    pub created: String,
    /// Where its boot layer's index region is, as the listing repeats the
    /// artifact's annotations: fetched beside the artifact, used only if
    /// the artifact (fetched by digest) names the same.
    pub hint: Option<Hint>,
}

/// A listed artifact's boot layer and index region, on the listing's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hint {
    pub layer: Digest,
    pub size: u64,
    pub region: (u64, Digest),
}

impl Hint {
    fn of(image: &Reference, a: &BTreeMap<String, String>) -> Option<Hint> {
        let boot = from_annotations(image, |k| a.get(k)).ok()??;
        Some(Hint {
            size: a.get(ANNOTATION_BOOT_SIZE)?.parse().ok()?,
            layer: boot.layer,
            region: boot.region?,
        })
    }

    /// True when the artifact `a` names this boot layer and region.
    pub(crate) fn matches(&self, a: &Attached) -> bool {
        a.layer.digest == self.layer
            && a.layer.size == self.size
            && a.boot.region.as_ref() == Some(&self.region)
    }
}

/// The boot artifacts `subject` (an image manifest's digest in `image`'s
/// repository) has, newest first. Err: why none could be listed (no
/// referrers API and no tag, or an answer that is not an index).
pub async fn list(
    client: &RegistryClient,
    image: &Reference,
    subject: &Digest,
) -> Result<Vec<Listed>, String> {
    // Both at once: a registry with the referrers API answers the first,
    // one without it (404) the tag, and a plain image both with 404, all
    // in one round trip.
    let tag = image.with_tag(&referrers_tag(&subject.to_string()));
    let (api, tagged) = tokio::join!(
        client.get_referrers(&image.repository, subject, BOOT_ARTIFACT_TYPE),
        client.get_manifest(&tag)
    );
    let index = match api.map_err(|e| format!("referrers API: {e}"))? {
        Some(bytes) => serde_json::from_slice::<ReferrersIndex>(&bytes)
            .map_err(|e| format!("the referrers answer is not an index: {e}"))?,
        None => {
            let raw = match tagged {
                Ok(raw) => raw,
                Err(OciError::NotFound { .. }) => return Ok(Vec::new()),
                Err(e) => return Err(format!("referrers tag: {e}")),
            };
            if raw.media_type != OCI_INDEX {
                // An earlier release tagged a seek-index artifact itself.
                return Ok(Vec::new());
            }
            serde_json::from_slice::<ReferrersIndex>(&raw.bytes)
                .map_err(|e| format!("the referrers tag is not an index: {e}"))?
        }
    };
    Ok(newest_first(image, index))
}

/// The boot artifacts of a referrers index, newest first (the later digest
/// first among equals, so the order does not depend on the listing's).
fn newest_first(image: &Reference, index: ReferrersIndex) -> Vec<Listed> {
    let mut listed: Vec<Listed> = index
        .manifests
        .into_iter()
        .filter(|d| d.artifact_type.as_deref() == Some(BOOT_ARTIFACT_TYPE))
        .filter_map(|d| {
            Some(Listed {
                digest: d.digest.parse().ok()?,
                created: d
                    .annotations
                    .get(ANNOTATION_CREATED)
                    .cloned()
                    .unwrap_or_default(),
                hint: Hint::of(image, &d.annotations),
            })
        })
        .collect();
    listed.sort_by(|a, b| {
        (b.created.as_str(), b.digest.to_string()).cmp(&(a.created.as_str(), a.digest.to_string()))
    });
    listed.dedup_by(|a, b| a.digest == b.digest);
    listed
}

/// Which listed artifacts a start tries, in order: the one asked for
/// (`pick`, even when unlisted: a registry may list it late), else the
/// newest few.
pub fn to_try(listed: &[Listed], pick: Option<&Digest>) -> Vec<Listed> {
    match pick {
        Some(d) => vec![listed
            .iter()
            .find(|l| &l.digest == d)
            .cloned()
            .unwrap_or_else(|| Listed {
                digest: d.clone(),
                created: String::new(),
                hint: None,
            })],
        None => listed.iter().take(MAX_TRIED).cloned().collect(),
    }
}

/// A boot artifact fetched by digest and checked against its subject.
#[derive(Clone)]
pub(crate) struct Attached {
    pub(crate) raw: RawManifest,
    pub(crate) boot: BootAnnotations,
    pub(crate) layer: LayerRef,
    /// The artifact again, for the seek indexes it lists.
    pub(crate) seek: Arc<ArtifactManifest>,
}

/// Fetch artifact `digest` of `image` (the client checks the bytes against
/// the digest) and check it describes a boot layer for `subject`.
pub(crate) async fn fetch(
    client: &RegistryClient,
    image: &Reference,
    digest: &Digest,
    subject: &Digest,
) -> Result<Attached, String> {
    let by_digest = Reference {
        repository: image.repository.clone(),
        tag: None,
        digest: Some(digest.clone()),
    };
    let raw = client
        .get_manifest(&by_digest)
        .await
        .map_err(|e| e.to_string())?;
    parse(image, raw, subject)
}

/// Fetch and check artifact `digest` as a start would (its index aside):
/// its boot layer's digest and size, or why it is refused.
pub async fn check(
    client: &RegistryClient,
    image: &Reference,
    digest: &Digest,
    subject: &Digest,
) -> Result<(Digest, u64), String> {
    fetch(client, image, digest, subject)
        .await
        .map(|a| (a.layer.digest, a.layer.size))
}

/// Check artifact `raw` (already fetched by its digest) against `subject`.
pub(crate) fn parse(
    image: &Reference,
    raw: RawManifest,
    subject: &Digest,
) -> Result<Attached, String> {
    let m: ArtifactManifest =
        serde_json::from_slice(&raw.bytes).map_err(|e| format!("not a manifest: {e}"))?;
    if m.artifact_type.as_deref() != Some(BOOT_ARTIFACT_TYPE) {
        return Err(format!(
            "its type is {:?}, not {BOOT_ARTIFACT_TYPE}",
            m.artifact_type
        ));
    }
    match &m.subject {
        Some(s) if s.digest == subject.to_string() => {}
        Some(s) => return Err(format!("it is attached to {}, not to {subject}", s.digest)),
        None => return Err("it has no subject".into()),
    }
    let fail = |e: FetchError| match e {
        FetchError::BadImage { reason, .. } => reason,
        e => e.to_string(),
    };
    let boot = from_annotations(image, |k| m.annotations.get(k))
        .map_err(fail)?
        .ok_or("it names no boot layer")?;
    if boot.region.is_none() {
        return Err("it gives no index region".into());
    }
    let desc = m
        .layers
        .iter()
        .find(|d| d.digest == boot.layer.to_string())
        .ok_or_else(|| format!("it does not list its boot layer {}", boot.layer))?;
    if !BOOT_LAYER_TYPES.contains(&desc.media_type.as_str()) {
        return Err(format!("its boot layer's type is {}", desc.media_type));
    }
    let diff_id: Digest = desc
        .annotations
        .get(ANNOTATION_BOOT_DIFF_ID)
        .ok_or("its boot layer has no diff_id")?
        .parse()
        .map_err(|e: OciError| format!("its boot layer's diff_id: {e}"))?;
    let layer = LayerRef {
        digest: boot.layer.clone(),
        diff_id,
        size: desc.size,
        media_type: desc.media_type.clone(),
    };
    Ok(Attached {
        raw,
        boot,
        layer,
        seek: Arc::new(m),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use lazylayer_index::{
        ANNOTATION_BOOT_LAYER, ANNOTATION_INDEX_REGION_DIGEST, ANNOTATION_INDEX_REGION_SIZE,
    };
    use lazylayer_seek::artifact::{empty_config, Descriptor, OCI_MANIFEST};
    use std::collections::BTreeMap;

    fn digest(n: u8) -> Digest {
        format!("sha256:{}", format!("{n:02x}").repeat(32))
            .parse()
            .unwrap()
    }

    fn image() -> Reference {
        "registry.test/app:1".parse().unwrap()
    }

    fn descriptor(d: &Digest, annotations: &[(&str, String)]) -> Descriptor {
        Descriptor {
            media_type: OCI_MANIFEST.into(),
            digest: d.to_string(),
            size: 100,
            artifact_type: None,
            data: None,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        }
    }

    /// A well-formed boot artifact for subject 1, boot layer 2.
    fn artifact() -> ArtifactManifest {
        let mut boot = descriptor(
            &digest(2),
            &[(ANNOTATION_BOOT_DIFF_ID, digest(3).to_string())],
        );
        boot.media_type = OCI_LAYER_GZIP.into();
        ArtifactManifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.into(),
            artifact_type: Some(BOOT_ARTIFACT_TYPE.into()),
            config: empty_config(),
            layers: vec![boot],
            subject: Some(descriptor(&digest(1), &[])),
            annotations: BTreeMap::from([
                (ANNOTATION_BOOT_LAYER.into(), digest(2).to_string()),
                (ANNOTATION_INDEX_REGION_SIZE.into(), "4096".into()),
                (ANNOTATION_INDEX_REGION_DIGEST.into(), digest(4).to_string()),
            ]),
        }
    }

    fn raw(m: &ArtifactManifest) -> RawManifest {
        let bytes = m.to_bytes();
        RawManifest {
            digest: Digest::sha256_of(&bytes),
            bytes: bytes.into(),
            media_type: OCI_MANIFEST.into(),
        }
    }

    #[test]
    fn a_boot_artifact_gives_its_layer_and_region() {
        let a = parse(&image(), raw(&artifact()), &digest(1)).unwrap();
        assert_eq!(a.layer.digest, digest(2));
        assert_eq!(a.layer.diff_id, digest(3));
        assert_eq!(a.layer.size, 100);
        assert_eq!(a.boot.region, Some((4096, digest(4))));
    }

    #[test]
    fn an_artifact_that_is_not_a_boot_layer_for_this_image_is_refused() {
        type Edit = Box<dyn Fn(&mut ArtifactManifest)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "attached to",
                Box::new(|m| m.subject = Some(descriptor(&digest(9), &[]))),
            ),
            ("no subject", Box::new(|m| m.subject = None)),
            (
                "its type",
                Box::new(|m| m.artifact_type = Some("application/x".into())),
            ),
            (
                "names no boot layer",
                Box::new(|m| {
                    m.annotations.remove(ANNOTATION_BOOT_LAYER);
                }),
            ),
            (
                "no index region",
                Box::new(|m| {
                    m.annotations.remove(ANNOTATION_INDEX_REGION_SIZE);
                    m.annotations.remove(ANNOTATION_INDEX_REGION_DIGEST);
                }),
            ),
            (
                "only half",
                Box::new(|m| {
                    m.annotations.remove(ANNOTATION_INDEX_REGION_DIGEST);
                }),
            ),
            (
                "does not list",
                Box::new(|m| m.layers[0].digest = digest(7).to_string()),
            ),
            (
                "type is",
                Box::new(|m| m.layers[0].media_type = "application/x".into()),
            ),
            ("no diff_id", Box::new(|m| m.layers[0].annotations.clear())),
            (
                "diff_id",
                Box::new(|m| {
                    m.layers[0]
                        .annotations
                        .insert(ANNOTATION_BOOT_DIFF_ID.into(), "sha256:zz".into());
                }),
            ),
        ];
        for (want, edit) in cases {
            let mut m = artifact();
            edit(&mut m);
            let err = parse(&image(), raw(&m), &digest(1)).err().unwrap();
            assert!(err.contains(want), "{want}: {err}");
        }
        let not_json = RawManifest {
            digest: digest(5),
            bytes: b"{\"layers\": 7".to_vec().into(),
            media_type: OCI_MANIFEST.into(),
        };
        assert!(parse(&image(), not_json, &digest(1)).is_err());
    }

    #[test]
    fn a_listing_hint_is_taken_only_whole_and_used_only_when_the_artifact_agrees() {
        let m = artifact();
        let mut ann = m.annotations.clone();
        assert_eq!(Hint::of(&image(), &ann), None, "no size: no hint");
        ann.insert(ANNOTATION_BOOT_SIZE.into(), "100".into());
        let hint = Hint::of(&image(), &ann).unwrap();
        assert_eq!(hint.region, (4096, digest(4)));
        let a = parse(&image(), raw(&m), &digest(1)).unwrap();
        assert!(hint.matches(&a));
        for (k, v) in [
            (ANNOTATION_BOOT_SIZE, "99".to_string()),
            (ANNOTATION_INDEX_REGION_SIZE, "4095".to_string()),
            (ANNOTATION_BOOT_LAYER, digest(7).to_string()),
        ] {
            let mut other = ann.clone();
            other.insert(k.into(), v);
            let h = Hint::of(&image(), &other).unwrap();
            assert!(!h.matches(&a), "{k}");
        }
        ann.insert(ANNOTATION_BOOT_SIZE.into(), "lots".into());
        assert_eq!(Hint::of(&image(), &ann), None);
    }

    #[test]
    fn listed_newest_first_other_types_left_out_and_a_pick_wins() {
        let boot = |d: u8, created: &str| {
            let mut x = descriptor(&digest(d), &[(ANNOTATION_CREATED, created.to_string())]);
            x.artifact_type = Some(BOOT_ARTIFACT_TYPE.into());
            x
        };
        let mut seek = descriptor(&digest(9), &[]);
        seek.artifact_type = Some(lazylayer_seek::MEDIA_TYPE.into());
        let mut bad = boot(8, "2026-12-09T00:00:00Z");
        bad.digest = "sha256:nope".into();
        let index = ReferrersIndex {
            schema_version: 2,
            media_type: OCI_INDEX.into(),
            manifests: vec![
                boot(1, "2026-12-01T00:00:00Z"),
                seek,
                boot(2, "2026-12-03T00:00:00Z"),
                bad,
                boot(3, "2026-12-02T00:00:00Z"),
                boot(1, "2026-12-01T00:00:00Z"),
            ],
        };
        let listed = newest_first(&image(), index);
        let order: Vec<Digest> = listed.iter().map(|l| l.digest.clone()).collect();
        assert_eq!(order, [digest(2), digest(3), digest(1)]);
        let digests = |l: Vec<Listed>| l.into_iter().map(|l| l.digest).collect::<Vec<_>>();
        assert_eq!(digests(to_try(&listed, None)), order);
        assert_eq!(digests(to_try(&listed, Some(&digest(5)))), [digest(5)]);
        assert_eq!(to_try(&listed, Some(&digest(3))), [listed[1].clone()]);
    }
}
