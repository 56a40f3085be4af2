//! Manifest, index and config handling on top of `oci-spec`, plus platform
//! selection. Raw bytes are always kept beside the parsed form: a digest is of
//! the bytes as served, and re-serialising would change them.

use std::fmt;
use std::str::FromStr;

use oci_spec::image::{Descriptor, ImageConfiguration, ImageIndex, ImageManifest};

use crate::digest::Digest;
use crate::error::OciError;
use crate::reference::Reference;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
/// When an image or artifact was made (an RFC 3339 time).
pub const ANNOTATION_CREATED: &str = oci_spec::image::ANNOTATION_CREATED;
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// A layer descriptor's TOC digest as eStargz names it. containers/image
/// (Podman 5.1 and later) asks an additional layer store only for layers
/// whose descriptor carries one TOC digest, this or
/// [`ANNOTATION_ZSTD_CHUNKED_TOC`], and finds it under that digest.
pub const ANNOTATION_STARGZ_TOC: &str = "containerd.io/snapshot/stargz/toc.digest";
/// A layer descriptor's TOC digest as zstd:chunked names it.
pub const ANNOTATION_ZSTD_CHUNKED_TOC: &str = "io.github.containers.zstd-chunked.manifest-checksum";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";

/// What we send in `Accept` for manifests.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// Largest manifest or config we accept: real ones are a few KiB; the limit
/// keeps a hostile registry from making us buffer gigabytes.
pub const MAX_MANIFEST_BYTES: u64 = 8 << 20;
pub const MAX_CONFIG_BYTES: u64 = 64 << 20;

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
}

impl Platform {
    /// The platform of this machine, in Go's GOOS/GOARCH names as images use them.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            "powerpc64" => "ppc64le",
            other => other,
        };
        Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: None,
        }
    }

    fn matches(&self, p: &oci_spec::image::Platform) -> bool {
        p.os().to_string() == self.os
            && p.architecture().to_string() == self.architecture
            && match &self.variant {
                Some(v) => p.variant().as_deref() == Some(v.as_str()),
                None => true,
            }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

impl FromStr for Platform {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: os.to_string(),
                architecture: arch.to_string(),
                variant: Some(v.to_string()),
            }),
            _ => Err(format!(
                "invalid platform {s:?}: expected OS/ARCH[/VARIANT]"
            )),
        }
    }
}

/// A manifest document as fetched: bytes, their digest and media type.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: bytes::Bytes,
    pub media_type: String,
    pub digest: Digest,
}

pub enum ManifestKind {
    Image(Box<ImageManifest>),
    Index(Box<ImageIndex>),
}

/// Decide what a manifest document is from its media type (header or body)
/// and parse it. Docker schema 2 and OCI share the same JSON shape.
pub fn parse_manifest(what: &str, raw: &RawManifest) -> Result<ManifestKind, OciError> {
    let bad = |reason: String| OciError::BadManifest {
        what: what.to_string(),
        reason,
    };
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let probe: Probe =
        serde_json::from_slice(&raw.bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    if probe.schema_version != Some(2) {
        return Err(bad(format!(
            "schemaVersion {:?} (only schema 2 / OCI is supported)",
            probe.schema_version
        )));
    }
    let mt = probe
        .media_type
        .clone()
        .unwrap_or_else(|| raw.media_type.clone());
    let is_index =
        mt == OCI_INDEX || mt == DOCKER_LIST || (mt.is_empty() && probe.manifests.is_some());
    if is_index {
        let idx: ImageIndex =
            serde_json::from_slice(&raw.bytes).map_err(|e| bad(format!("image index: {e}")))?;
        Ok(ManifestKind::Index(Box::new(idx)))
    } else if mt == OCI_MANIFEST || mt == DOCKER_MANIFEST || mt.is_empty() || mt.ends_with("+json")
    {
        let m: ImageManifest =
            serde_json::from_slice(&raw.bytes).map_err(|e| bad(format!("image manifest: {e}")))?;
        Ok(ManifestKind::Image(Box::new(m)))
    } else {
        Err(bad(format!("media type {mt:?}")))
    }
}

/// Pick the manifest for `platform` out of an index.
pub fn select_platform<'a>(
    what: &str,
    index: &'a ImageIndex,
    platform: &Platform,
) -> Result<&'a Descriptor, OciError> {
    index
        .manifests()
        .iter()
        .find(|d| d.platform().as_ref().is_some_and(|p| platform.matches(p)))
        .ok_or_else(|| OciError::NoPlatform {
            what: what.to_string(),
            platform: platform.to_string(),
            available: index
                .manifests()
                .iter()
                .filter_map(|d| d.platform().as_ref())
                .map(|p| {
                    let mut s = format!("{}/{}", p.os(), p.architecture());
                    if let Some(v) = p.variant() {
                        s.push('/');
                        s.push_str(v);
                    }
                    s
                })
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Our digest type from an oci-spec descriptor (validated: a descriptor with
/// a digest we cannot verify is refused, not trusted).
pub fn descriptor_digest(what: &str, d: &Descriptor) -> Result<Digest, OciError> {
    d.digest()
        .to_string()
        .parse()
        .map_err(|e: OciError| OciError::BadManifest {
            what: what.to_string(),
            reason: e.to_string(),
        })
}

/// A single-platform image manifest, resolved and verified; its config not
/// fetched yet.
#[derive(Debug, Clone)]
pub struct ResolvedManifest {
    /// When the reference named an index: the index document.
    pub index: Option<RawManifest>,
    pub manifest: RawManifest,
    pub parsed: ImageManifest,
}

impl ResolvedManifest {
    /// An image manifest kept earlier (a store's blob): `bytes` must have
    /// `digest`, and be an image manifest, not an index. Its media type is
    /// the one its body names, else OCI's (a registry's header is gone).
    pub fn from_stored(digest: Digest, bytes: bytes::Bytes) -> Result<ResolvedManifest, OciError> {
        let what = format!("stored manifest {digest}");
        digest.verify(&what, &bytes)?;
        let mut manifest = RawManifest {
            bytes,
            media_type: OCI_MANIFEST.to_string(),
            digest,
        };
        match parse_manifest(&what, &manifest)? {
            ManifestKind::Image(parsed) => {
                if let Some(named) = parsed.media_type() {
                    manifest.media_type = named.to_string();
                }
                Ok(ResolvedManifest {
                    index: None,
                    manifest,
                    parsed: *parsed,
                })
            }
            ManifestKind::Index(_) => Err(OciError::BadManifest {
                what,
                reason: "an index, where an image manifest was expected".into(),
            }),
        }
    }

    /// The image with its config, `config_bytes` (checked against the
    /// manifest's config digest here, whoever fetched or kept them).
    pub fn with_config(
        self,
        reference: &Reference,
        config_bytes: bytes::Bytes,
    ) -> Result<ResolvedImage, OciError> {
        let what = reference.to_string();
        descriptor_digest(&what, self.parsed.config())?
            .verify(&format!("config of {what}"), &config_bytes)?;
        let config = serde_json::from_slice(&config_bytes).map_err(|e| OciError::BadManifest {
            what: format!("config of {what}"),
            reason: e.to_string(),
        })?;
        Ok(ResolvedImage {
            reference: reference.with_digest(self.manifest.digest.clone()),
            index: self.index,
            manifest: self.manifest,
            parsed: self.parsed,
            config_bytes,
            config,
        })
    }
}

/// A single-platform image, resolved: manifest and config fetched and verified.
#[derive(Debug, Clone)]
pub struct ResolvedImage {
    pub reference: Reference,
    /// When the reference named an index: the index document.
    pub index: Option<RawManifest>,
    pub manifest: RawManifest,
    pub parsed: ImageManifest,
    pub config_bytes: bytes::Bytes,
    pub config: ImageConfiguration,
}

impl ResolvedImage {
    pub fn layers(&self) -> &[Descriptor] {
        self.parsed.layers()
    }
    /// Uncompressed layer digests from the config, in layer order.
    pub fn diff_ids(&self) -> Result<Vec<Digest>, OciError> {
        self.config
            .rootfs()
            .diff_ids()
            .iter()
            .map(|s| s.parse())
            .collect()
    }
    pub fn config_digest(&self) -> Result<Digest, OciError> {
        descriptor_digest(&self.reference.to_string(), self.parsed.config())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(json: &str, mt: &str) -> RawManifest {
        RawManifest {
            bytes: bytes::Bytes::from(json.to_string()),
            media_type: mt.into(),
            digest: Digest::sha256_of(json.as_bytes()),
        }
    }

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_docker_schema2_and_oci() {
        let docker = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"{DOCKER_CONFIG}","size":1,"digest":"{D}"}},"layers":[{{"mediaType":"application/vnd.docker.image.rootfs.diff.tar.gzip","size":2,"digest":"{D}"}}]}}"#
        );
        match parse_manifest("t", &raw(&docker, "")).unwrap() {
            ManifestKind::Image(m) => assert_eq!(m.layers().len(), 1),
            _ => panic!("docker manifest taken for an index"),
        }
        let oci = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","size":1,"digest":"{D}"}},"layers":[]}}"#
        );
        assert!(matches!(
            parse_manifest("t", &raw(&oci, OCI_MANIFEST)).unwrap(),
            ManifestKind::Image(_)
        ));
        assert!(parse_manifest("t", &raw(r#"{"schemaVersion":1}"#, "")).is_err());
        assert!(parse_manifest("t", &raw("not json", "")).is_err());
    }

    /// A kept manifest is trusted only with the digest it is asked by, as
    /// an image manifest (not an index), its media type from its body; its
    /// config only with the manifest's config digest.
    #[test]
    fn a_stored_manifest_and_config_verify_before_use() {
        let config =
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let cd = Digest::sha256_of(config.as_bytes());
        let manifest = |mt: &str| {
            format!(
                r#"{{"schemaVersion":2,{mt}"config":{{"mediaType":"{OCI_CONFIG}","size":{},"digest":"{cd}"}},"layers":[]}}"#,
                config.len()
            )
        };
        let stored = |json: &str| {
            let d = Digest::sha256_of(json.as_bytes());
            ResolvedManifest::from_stored(d, bytes::Bytes::from(json.to_string()))
        };
        let docker = manifest(&format!(r#""mediaType":"{DOCKER_MANIFEST}","#));
        assert_eq!(
            stored(&docker).unwrap().manifest.media_type,
            DOCKER_MANIFEST
        );
        let m = stored(&manifest("")).unwrap();
        assert_eq!(m.manifest.media_type, OCI_MANIFEST);

        let r: Reference = "example.com/a/b:t".parse().unwrap();
        let img = m.clone().with_config(&r, config.into()).unwrap();
        assert_eq!(img.reference.digest.as_ref(), Some(&m.manifest.digest));
        assert_eq!(img.config.os().to_string(), "linux");
        let other = config.replace("amd64", "arm64");
        let e = m.with_config(&r, other.into()).unwrap_err();
        assert!(e.to_string().contains("config of"), "{e}");

        // Bytes that are not what the digest names, and an index.
        let wrong = Digest::sha256_of(b"other");
        let e = ResolvedManifest::from_stored(wrong, manifest("").into()).unwrap_err();
        assert!(e.to_string().contains("stored manifest"), "{e}");
        let idx = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(stored(&idx).is_err());
    }

    #[test]
    fn selects_platform_from_index() {
        let idx = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[
              {{"mediaType":"{OCI_MANIFEST}","size":1,"digest":"{D}","platform":{{"os":"linux","architecture":"arm64","variant":"v8"}}}},
              {{"mediaType":"{OCI_MANIFEST}","size":2,"digest":"{D}","platform":{{"os":"linux","architecture":"amd64"}}}}]}}"#
        );
        let ManifestKind::Index(i) = parse_manifest("t", &raw(&idx, "")).unwrap() else {
            panic!("index not recognised")
        };
        let amd = "linux/amd64".parse().unwrap();
        assert_eq!(select_platform("t", &i, &amd).unwrap().size(), 2);
        let arm = "linux/arm64/v8".parse().unwrap();
        assert_eq!(select_platform("t", &i, &arm).unwrap().size(), 1);
        let err = select_platform("t", &i, &"linux/s390x".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("linux/arm64/v8"), "{err}");
    }

    #[test]
    fn platform_parse() {
        assert!("linux".parse::<Platform>().is_err());
        assert_eq!(
            "linux/arm/v7"
                .parse::<Platform>()
                .unwrap()
                .variant
                .as_deref(),
            Some("v7")
        );
    }
}
