//! Manifests: by tag or digest, verified, resolved through an index to one
//! platform's image; and the referrers API.

use bytes::Bytes;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::StatusCode;

use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::hosts::{Endpoint, Purpose};
use crate::manifest::{
    descriptor_digest, parse_manifest, select_platform, ManifestKind, Platform, RawManifest,
    ResolvedImage, ResolvedManifest, MANIFEST_ACCEPT, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES,
};
use crate::reference::{Reference, Repository};

use super::status::{expect_status, header_text, status_error};
use super::RegistryClient;

impl RegistryClient {
    /// Fetch a manifest or index by tag or digest. Verified against the
    /// reference's digest when pinned, and against `Docker-Content-Digest`.
    /// By tag only hosts that may resolve tags are asked; by digest, every
    /// mirror that may pull.
    pub async fn get_manifest(&self, reference: &Reference) -> Result<RawManifest> {
        let what = format!("manifest of {reference}");
        let repo = &reference.repository;
        let purpose = if reference.digest.is_some() {
            Purpose::Pull
        } else {
            Purpose::Resolve
        };
        self.on_hosts(&what, repo, purpose, |ep| {
            let what = what.clone();
            async move { self.get_manifest_at(&what, reference, &ep).await }
        })
        .await
    }

    pub(super) async fn get_manifest_at(
        &self,
        what: &str,
        reference: &Reference,
        ep: &Endpoint,
    ) -> Result<RawManifest> {
        let what = what.to_string();
        let repo = &reference.repository;
        let url = ep.url(&format!("manifests/{}", reference.manifest_ref()));
        let resp = self
            .send(&what, repo, ep, &[Self::pull_scope(ep)], true, &|c| {
                c.get(url.clone()).header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        let resp = expect_status(&what, ep.label(), resp, |s| s.is_success()).await?;
        let media_type = header_text(resp.headers(), CONTENT_TYPE)
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let claimed: Option<Digest> =
            header_text(resp.headers(), "docker-content-digest").and_then(|s| s.parse().ok());
        let bytes = Self::read_limited(&what, ep.label(), resp, MAX_MANIFEST_BYTES).await?;
        let digest = match &reference.digest {
            Some(d) => {
                d.verify(&what, &bytes)?;
                d.clone()
            }
            None => Digest::sha256_of(&bytes),
        };
        if let Some(c) = claimed.filter(|c| c.algorithm() == digest.algorithm()) {
            if c != digest {
                return Err(OciError::DigestMismatch {
                    what,
                    expected: c,
                    actual: digest,
                });
            }
        }
        tracing::info!(manifest = %reference, digest = %digest, host = %ep.label(), "manifest served");
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Resolve a reference to one image for `platform`: manifest (through an
    /// index if need be) and config, all verified.
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedImage> {
        let m = self.resolve_manifest(reference, platform).await?;
        self.fetch_config(reference, m).await
    }

    /// The image manifest of `reference` for `platform` (through an index if
    /// need be), verified: what [`RegistryClient::resolve`] knows before it
    /// asks for the config, so that a caller can ask for other blobs the
    /// manifest names at the same time.
    pub async fn resolve_manifest(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<ResolvedManifest> {
        let what = reference.to_string();
        let first = self.get_manifest(reference).await?;
        let (index, manifest, parsed) = match parse_manifest(&what, &first)? {
            ManifestKind::Image(m) => (None, first, *m),
            ManifestKind::Index(idx) => {
                let desc = select_platform(&what, &idx, platform)?;
                let d = descriptor_digest(&what, desc)?;
                let m = self.get_manifest(&reference.with_digest(d)).await?;
                match parse_manifest(&what, &m)? {
                    ManifestKind::Image(pm) => (Some(first), m, *pm),
                    ManifestKind::Index(_) => {
                        return Err(OciError::BadManifest {
                            what,
                            reason: "index points to another index".into(),
                        })
                    }
                }
            }
        };
        Ok(ResolvedManifest {
            index,
            manifest,
            parsed,
        })
    }

    /// The config of a resolved manifest, verified: the whole image.
    pub async fn fetch_config(
        &self,
        reference: &Reference,
        m: ResolvedManifest,
    ) -> Result<ResolvedImage> {
        let cfg_digest = descriptor_digest(&reference.to_string(), m.parsed.config())?;
        let config_bytes = self
            .fetch_blob(
                &reference.repository,
                &cfg_digest,
                Some(m.parsed.config().size()),
                MAX_CONFIG_BYTES,
            )
            .await?;
        m.with_config(reference, config_bytes)
    }

    /// The referrers of `subject` of type `artifact_type` (an OCI image
    /// index, its bytes), or `None` when the registry has no referrers API
    /// (404, or any other answer but 200: callers then try the tag schema).
    /// A mirror without the API is passed over: the registry decides.
    pub async fn get_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>> {
        let what = format!("referrers of {subject} in {repo}");
        self.on_hosts(&what, repo, Purpose::Pull, |ep| {
            let what = what.clone();
            async move {
                let mut url = ep.url(&format!("referrers/{subject}"));
                url.query_pairs_mut()
                    .append_pair("artifactType", artifact_type);
                let resp = self
                    .send(&what, repo, &ep, &[Self::pull_scope(&ep)], true, &|c| {
                        c.get(url.clone())
                            .header(ACCEPT, "application/vnd.oci.image.index.v1+json")
                    })
                    .await?;
                if resp.status() != StatusCode::OK {
                    if ep.mirror {
                        let st = resp.status();
                        return Err(status_error(&what, ep.label(), st, String::new()));
                    }
                    tracing::debug!(%what, status = %resp.status(), "no referrers API");
                    return Ok(None);
                }
                Self::read_limited(&what, ep.label(), resp, MAX_MANIFEST_BYTES)
                    .await
                    .map(Some)
            }
        })
        .await
    }
}
