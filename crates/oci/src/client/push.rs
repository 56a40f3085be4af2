//! Pushes: blobs (existence check, cross-repository mount, monolithic or
//! chunked upload) and manifests.

use bytes::Bytes;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION};
use reqwest::{Method, Response, StatusCode};

use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::hosts::Endpoint;
use crate::reference::{Reference, Repository};

use super::status::{expect_status, header_text, status_error, status_failure};
use super::{BlobSource, PushOutcome, RegistryClient};

impl RegistryClient {
    /// Size of a blob if the repository (on the registry itself, where
    /// pushes go) has it.
    pub async fn blob_exists(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let what = format!("blob {digest} of {repo}");
        let ep = self.push_host(repo)?;
        let url = ep.url(&format!("blobs/{digest}"));
        let resp = self
            .send(&what, repo, &ep, &[Self::pull_scope(&ep)], true, &|c| {
                c.head(url.clone())
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(header_text(resp.headers(), CONTENT_LENGTH)
                .and_then(|v| v.parse().ok())
                .or(Some(0))),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(&what, &repo.registry, s, String::new())),
        }
    }

    pub(super) fn resolve_location(
        repo: &Repository,
        ep: &Endpoint,
        what: &str,
        resp: &Response,
    ) -> Result<url::Url> {
        let loc = header_text(resp.headers(), LOCATION).ok_or_else(|| OciError::Status {
            what: what.into(),
            registry: repo.registry.clone(),
            status: resp.status().as_u16(),
            body: "upload session without Location header".into(),
        })?;
        ep.base().join(loc).map_err(|e| OciError::Status {
            what: what.into(),
            registry: repo.registry.clone(),
            status: resp.status().as_u16(),
            body: format!("bad Location {loc:?}: {e}"),
        })
    }

    /// Push a blob unless the repository has it; try a cross-repository mount
    /// from `mount_from` (same registry) before uploading any byte.
    pub async fn push_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: u64,
        source: &BlobSource,
        mount_from: Option<&Repository>,
    ) -> Result<PushOutcome> {
        let what = format!("push of blob {digest} to {repo}");
        if self.blob_exists(repo, digest).await?.is_some() {
            return Ok(PushOutcome::Existed);
        }
        let ep = self.push_host(repo)?;
        let mut scopes = vec![Self::push_scope(&ep)];
        let start_url =
            match mount_from.filter(|f| f.registry == repo.registry && f.name != repo.name) {
                Some(from) => {
                    scopes.push(format!("repository:{}:pull", from.name));
                    let mut u = ep.url("blobs/uploads/");
                    u.query_pairs_mut()
                        .append_pair("mount", &digest.to_string())
                        .append_pair("from", &from.name);
                    u
                }
                None => ep.url("blobs/uploads/"),
            };
        let resp = self
            .send(&what, repo, &ep, &scopes, false, &|c| {
                c.post(start_url.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED => return Ok(PushOutcome::Mounted),
            StatusCode::ACCEPTED => {}
            _ => return Err(status_failure(&what, &repo.registry, resp).await),
        }
        let mut location = Self::resolve_location(repo, &ep, &what, &resp)?;
        let chunk = self.cfg.upload_chunk_size.filter(|c| *c > 0 && size > *c);
        if let Some(chunk) = chunk {
            let mut offset = 0u64;
            while offset < size {
                let n = chunk.min(size - offset);
                let data = read_source(&what, source, offset, n)?;
                let loc = location.clone();
                let resp = self
                    .send(&what, repo, &ep, &scopes, false, &|c| {
                        c.request(Method::PATCH, loc.clone())
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_RANGE, format!("{}-{}", offset, offset + n - 1))
                            .header(CONTENT_LENGTH, n)
                            .body(data.clone())
                    })
                    .await?;
                let resp =
                    expect_status(&what, &repo.registry, resp, |s| s == StatusCode::ACCEPTED)
                        .await?;
                location = Self::resolve_location(repo, &ep, &what, &resp)?;
                offset += n;
            }
            let mut fin = location.clone();
            fin.query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let resp = self
                .send(&what, repo, &ep, &scopes, false, &|c| {
                    c.put(fin.clone()).header(CONTENT_LENGTH, 0)
                })
                .await?;
            return finish_upload(&what, repo, resp).await;
        }
        let mut fin = location;
        fin.query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let src = source.clone();
        let open_err = std::sync::Mutex::new(None);
        let resp = self
            .send(&what, repo, &ep, &scopes, false, &|c| {
                let rb = c
                    .put(fin.clone())
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size);
                match &src {
                    BlobSource::Bytes(b) => rb.body(b.clone()),
                    BlobSource::File(p) => match std::fs::File::open(p) {
                        Ok(f) => rb.body(reqwest::Body::from(tokio::fs::File::from_std(f))),
                        Err(e) => {
                            *open_err.lock().unwrap() = Some(e);
                            rb.body(Bytes::new())
                        }
                    },
                }
            })
            .await;
        if let Some(e) = open_err.lock().unwrap().take() {
            return Err(OciError::Io { what, source: e });
        }
        finish_upload(&what, repo, resp?).await
    }

    /// Upload a manifest under a tag (or its digest) and return its digest.
    pub async fn put_manifest(
        &self,
        reference: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest> {
        let what = format!("push of manifest {reference}");
        let repo = &reference.repository;
        let digest = Digest::sha256_of(&bytes);
        let ep = self.push_host(repo)?;
        let url = ep.url(&format!(
            "manifests/{}",
            reference.tag.clone().unwrap_or_else(|| digest.to_string())
        ));
        let resp = self
            .send(&what, repo, &ep, &[Self::push_scope(&ep)], true, &|c| {
                c.put(url.clone())
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.clone())
            })
            .await?;
        // 201 Created is the usual answer; any success will do.
        expect_status(&what, &repo.registry, resp, |s| s.is_success()).await?;
        Ok(digest)
    }
}

async fn finish_upload(what: &str, repo: &Repository, resp: Response) -> Result<PushOutcome> {
    let done = |s| {
        matches!(
            s,
            StatusCode::CREATED | StatusCode::ACCEPTED | StatusCode::OK
        )
    };
    expect_status(what, &repo.registry, resp, done).await?;
    Ok(PushOutcome::Uploaded)
}

fn read_source(what: &str, src: &BlobSource, offset: u64, len: u64) -> Result<Bytes> {
    match src {
        BlobSource::Bytes(b) => Ok(b.slice(offset as usize..(offset + len) as usize)),
        BlobSource::File(p) => {
            use std::io::{Read, Seek, SeekFrom};
            let io = |e| OciError::Io {
                what: what.to_string(),
                source: e,
            };
            let mut f = std::fs::File::open(p).map_err(io)?;
            f.seek(SeekFrom::Start(offset)).map_err(io)?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact(&mut buf).map_err(io)?;
            Ok(Bytes::from(buf))
        }
    }
}
