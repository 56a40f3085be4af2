//! An OCI distribution-spec client: manifests, blobs (streamed, ranged,
//! resumable), pushes (monolithic, chunked, cross-repository mount) and the
//! token/basic auth dance. Plain HTTP is used for loopback hosts and hosts the
//! user names as insecure; TLS (rustls) everywhere else.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::sync::mpsc;

use crate::auth::{parse_challenge, AuthStore};
use crate::digest::{Digest, DigestHasher};
use crate::error::{OciError, Result};
use crate::manifest::{
    descriptor_digest, parse_manifest, select_platform, ManifestKind, Platform, RawManifest,
    ResolvedImage, MANIFEST_ACCEPT, MAX_CONFIG_BYTES, MAX_MANIFEST_BYTES,
};
use crate::reference::{Reference, Repository};

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Hosts (`host` or `host:port`) spoken to over plain HTTP besides loopback.
    pub insecure_registries: Vec<String>,
    pub auth: AuthStore,
    /// Attempts per request (and per blob download, counting resumes).
    pub max_attempts: u32,
    /// Upload blobs larger than this in PATCH chunks of this size; `None`
    /// uploads monolithically (one PUT), which every registry supports.
    pub upload_chunk_size: Option<u64>,
    pub connect_timeout: Duration,
    /// A body that stays silent this long counts as broken (then resumed).
    pub read_timeout: Duration,
    /// A blob download that brings no byte, or less than `min_speed` on
    /// average, for this long is dropped and resumed with Range (then given
    /// up after `max_attempts`).
    pub stall_timeout: Duration,
    /// Bytes per second below which a blob download counts as stalled
    /// (averaged over `stall_timeout`); 0: only silence counts.
    pub min_speed: u64,
    pub user_agent: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            insecure_registries: Vec::new(),
            auth: AuthStore::default(),
            max_attempts: 5,
            upload_chunk_size: None,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            stall_timeout: Duration::from_secs(10),
            min_speed: 1024,
            user_agent: concat!("lazylayer/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

/// A response body as it arrives.
pub type BodyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Bytes>> + Send + 'static>>;

/// Where [`RegistryClient::download_blob_from`] starts: after `offset` bytes
/// the caller holds already, with `hasher` fed exactly those bytes.
pub struct BlobResume {
    pub offset: u64,
    pub hasher: DigestHasher,
}

impl BlobResume {
    /// From byte 0.
    pub fn start(digest: &Digest) -> BlobResume {
        BlobResume {
            offset: 0,
            hasher: digest.hasher(),
        }
    }
}

/// Why one response of a blob download ended before the blob did.
enum Broken {
    Error(String),
    Stalled {
        bytes: u64,
        secs: f64,
        min_speed: u64,
    },
    EndedEarly,
}

impl std::fmt::Display for Broken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Broken::Error(e) => write!(f, "connection broken: {e}"),
            Broken::Stalled { bytes: 0, secs, .. } => write!(f, "no data for {secs:.0} s"),
            Broken::Stalled {
                bytes,
                secs,
                min_speed,
            } => write!(
                f,
                "only {} in {secs:.0} s, below {}/s",
                human_bytes(*bytes),
                human_bytes(*min_speed)
            ),
            Broken::EndedEarly => write!(f, "response ended early"),
        }
    }
}

/// `12.3 MB` style sizes (decimal, as registries and podman report them).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < UNITS.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// What a push of one blob did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushOutcome {
    /// The repository had it already: nothing sent.
    Existed,
    /// Linked from another repository of the same registry: nothing sent.
    Mounted,
    Uploaded,
}

/// Where blob bytes for an upload come from.
#[derive(Debug, Clone)]
pub enum BlobSource {
    Bytes(Bytes),
    File(PathBuf),
}

pub struct RegistryClient {
    http: reqwest::Client,
    cfg: ClientConfig,
    /// Authorization header values by `host` + scope (bearer) or `host` (basic).
    tokens: Mutex<HashMap<String, String>>,
}

fn is_loopback(host: &str) -> bool {
    let h = match host.rsplit_once(':') {
        Some((h, p)) if !p.contains(']') => h,
        _ => host,
    };
    h == "localhost" || h.starts_with("127.") || h == "[::1]"
}

fn status_error(what: &str, registry: &str, status: StatusCode, body: String) -> OciError {
    let code = status.as_u16();
    match status {
        StatusCode::NOT_FOUND => OciError::NotFound {
            what: what.into(),
            registry: registry.into(),
            status: code,
        },
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => OciError::Unauthorized {
            what: what.into(),
            registry: registry.into(),
            status: code,
            hint: String::new(),
        },
        _ => OciError::Status {
            what: what.into(),
            registry: registry.into(),
            status: code,
            body,
        },
    }
}

/// Most of an error body that is read: enough for a registry's JSON error,
/// while an endless body (hostile or broken server) cannot fill memory.
const MAX_ERROR_BODY: usize = 16 * 1024;
/// How much of an error body goes into the message.
const SHOWN_ERROR_BODY: usize = 300;
/// Longest time spent reading an error body: one trickling byte by byte
/// must not hold the error back.
const ERROR_BODY_TIME: Duration = Duration::from_secs(5);
/// A bearer token response is a small JSON object; refuse anything larger.
const MAX_TOKEN_BYTES: u64 = 1 << 20;

/// An error body as shown in a message: its first characters, and a note
/// when it was longer or was cut off while reading.
fn shown_body(body: &[u8], cut: bool) -> String {
    let text = String::from_utf8_lossy(body);
    let mut shown: String = text.chars().take(SHOWN_ERROR_BODY).collect();
    if cut {
        shown.push_str(&format!(
            " … (body cut: read only its first {} bytes)",
            body.len()
        ));
    } else if shown.len() < text.len() {
        shown.push_str(&format!(" … ({} bytes in all)", body.len()));
    }
    shown
}

fn retryable_status(s: StatusCode) -> bool {
    matches!(s.as_u16(), 408 | 429 | 500 | 502 | 503 | 504)
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(200u64.saturating_mul(1 << attempt.min(6)))
}

impl RegistryClient {
    pub fn new(cfg: ClientConfig) -> Result<Self> {
        // reqwest is built without a default crypto provider so that the
        // slow-to-build aws-lc is not pulled in; ring is installed here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .connect_timeout(cfg.connect_timeout)
            // A longer stall timeout must not be pre-empted by the per-read one.
            .read_timeout(cfg.read_timeout.max(cfg.stall_timeout))
            .build()
            .map_err(|e| OciError::Http {
                what: "creating HTTP client".into(),
                registry: String::new(),
                source: e,
            })?;
        Ok(RegistryClient {
            http,
            cfg,
            tokens: Mutex::new(HashMap::new()),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    fn scheme(&self, repo: &Repository) -> &'static str {
        if is_loopback(&repo.registry)
            || self
                .cfg
                .insecure_registries
                .iter()
                .any(|h| h == &repo.registry)
        {
            "http"
        } else {
            "https"
        }
    }

    fn url(&self, repo: &Repository, tail: &str) -> String {
        format!(
            "{}://{}/v2/{}/{}",
            self.scheme(repo),
            repo.api_host(),
            repo.name,
            tail
        )
    }

    fn pull_scope(repo: &Repository) -> String {
        format!("repository:{}:pull", repo.name)
    }
    fn push_scope(repo: &Repository) -> String {
        format!("repository:{}:pull,push", repo.name)
    }

    /// Send a request built by `build`, answering auth challenges and retrying
    /// transient failures. `build` is called once per attempt, so bodies must
    /// be re-creatable. Non-idempotent requests are retried only when the
    /// connection failed before anything was sent.
    async fn send(
        &self,
        what: &str,
        repo: &Repository,
        scopes: &[String],
        idempotent: bool,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        self.send_within(what, repo, scopes, idempotent, None, build)
            .await
    }

    /// [`RegistryClient::send`], where each attempt's response (its status
    /// and headers) must come within `answer_timeout`, else the attempt
    /// counts as failed (idempotent requests only).
    async fn send_within(
        &self,
        what: &str,
        repo: &Repository,
        scopes: &[String],
        idempotent: bool,
        answer_timeout: Option<Duration>,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        let registry = repo.registry.clone();
        let scope_key = format!("{} {}", repo.api_host(), scopes.join(" "));
        let basic_key = repo.api_host().to_string();
        let mut authed = false;
        let mut attempt = 0;
        loop {
            let cached = {
                let t = self.tokens.lock().unwrap();
                t.get(&scope_key).or_else(|| t.get(&basic_key)).cloned()
            };
            let mut rb = build(&self.http);
            if let Some(h) = &cached {
                rb = rb.header(AUTHORIZATION, h);
            }
            let sent = match answer_timeout.filter(|_| idempotent) {
                None => rb.send().await,
                Some(limit) => match tokio::time::timeout(limit, rb.send()).await {
                    Ok(r) => r,
                    Err(_) if attempt + 1 < self.cfg.max_attempts => {
                        tracing::warn!(%what, attempt, "no answer for {:.0} s, retrying", limit.as_secs_f64());
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    Err(_) => {
                        return Err(OciError::NoAnswer {
                            what: what.into(),
                            registry,
                            secs: limit.as_secs_f64(),
                            tries: attempt + 1,
                        })
                    }
                },
            };
            match sent {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authed => {
                    authed = true;
                    let header = self
                        .authenticate(what, repo, scopes, resp.headers())
                        .await?;
                    let key = if header.starts_with("Basic ") {
                        basic_key.clone()
                    } else {
                        scope_key.clone()
                    };
                    self.tokens.lock().unwrap().insert(key, header);
                }
                Ok(resp)
                    if retryable_status(resp.status())
                        && attempt + 1 < self.cfg.max_attempts
                        && idempotent =>
                {
                    tracing::warn!(%what, status = %resp.status(), attempt, "registry busy, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Ok(resp) => {
                    if resp.status() == StatusCode::UNAUTHORIZED
                        || resp.status() == StatusCode::FORBIDDEN
                    {
                        let hint = if self.cfg.auth.get(&repo.registry).is_none() {
                            format!("; no credentials for {} in the auth files", repo.registry)
                        } else {
                            "; the credentials in the auth files were refused".to_string()
                        };
                        return Err(OciError::Unauthorized {
                            what: what.into(),
                            registry,
                            status: resp.status().as_u16(),
                            hint,
                        });
                    }
                    return Ok(resp);
                }
                Err(e) if attempt + 1 < self.cfg.max_attempts && (idempotent || e.is_connect()) => {
                    tracing::warn!(%what, error = %e, attempt, "request failed, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    return Err(OciError::Http {
                        what: what.into(),
                        registry,
                        source: e,
                    })
                }
            }
        }
    }

    /// Answer a 401: Basic from the auth files, or a Bearer token from the
    /// realm the registry names (with Basic credentials when we have them).
    async fn authenticate(
        &self,
        what: &str,
        repo: &Repository,
        scopes: &[String],
        headers: &HeaderMap,
    ) -> Result<String> {
        let auth_err = |reason: String| OciError::Auth {
            what: what.to_string(),
            reason,
        };
        let raw = headers
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| auth_err("401 without a WWW-Authenticate challenge".into()))?;
        let ch = parse_challenge(raw)
            .ok_or_else(|| auth_err(format!("unparseable challenge {raw:?}")))?;
        let cred = self.cfg.auth.get(&repo.registry);
        match ch.scheme.as_str() {
            "basic" => cred.map(|c| c.basic_header()).ok_or_else(|| {
                auth_err(format!(
                    "{} asks for a password and the auth files have none for it",
                    repo.registry
                ))
            }),
            "bearer" => {
                let realm = ch
                    .params
                    .get("realm")
                    .ok_or_else(|| auth_err("bearer challenge without realm".into()))?;
                let mut url = url::Url::parse(realm)
                    .map_err(|e| auth_err(format!("bad realm {realm:?}: {e}")))?;
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = ch.params.get("service") {
                        q.append_pair("service", s);
                    }
                    for s in scopes {
                        q.append_pair("scope", s);
                    }
                }
                tracing::debug!(realm = %realm, scopes = ?scopes, "fetching bearer token");
                let mut rb = self.http.get(url);
                if let Some(c) = cred {
                    rb = rb.header(AUTHORIZATION, c.basic_header());
                }
                let resp = rb.send().await.map_err(|e| OciError::Http {
                    what: format!("{what}: token request"),
                    registry: repo.registry.clone(),
                    source: e,
                })?;
                if !resp.status().is_success() {
                    return Err(auth_err(format!("token server answered {}", resp.status())));
                }
                #[derive(serde::Deserialize)]
                struct Token {
                    token: Option<String>,
                    access_token: Option<String>,
                }
                // Bounded: a token server streaming JSON forever must not fill memory.
                let body = Self::read_limited(
                    &format!("{what}: token response from {realm}"),
                    &repo.registry,
                    resp,
                    MAX_TOKEN_BYTES,
                )
                .await?;
                let t: Token = serde_json::from_slice(&body)
                    .map_err(|e| auth_err(format!("token response: {e}")))?;
                let tok = t
                    .token
                    .or(t.access_token)
                    .ok_or_else(|| auth_err("token response without a token".into()))?;
                Ok(format!("Bearer {tok}"))
            }
            other => Err(auth_err(format!("unsupported auth scheme {other:?}"))),
        }
    }

    async fn read_limited(what: &str, registry: &str, resp: Response, limit: u64) -> Result<Bytes> {
        if let Some(len) = resp.content_length() {
            if len > limit {
                return Err(OciError::TooLarge {
                    what: what.into(),
                    size: len,
                    limit,
                });
            }
        }
        let mut out = Vec::new();
        let mut s = resp.bytes_stream();
        while let Some(c) = s.next().await {
            let c = c.map_err(|e| OciError::Http {
                what: what.into(),
                registry: registry.into(),
                source: e,
            })?;
            if out.len() as u64 + c.len() as u64 > limit {
                return Err(OciError::TooLarge {
                    what: what.into(),
                    size: out.len() as u64 + c.len() as u64,
                    limit,
                });
            }
            out.extend_from_slice(&c);
        }
        Ok(Bytes::from(out))
    }

    /// The start of an error response's body for the message, read with a
    /// size and time limit; says so when the body was cut.
    async fn body_text(resp: Response) -> String {
        let mut out = Vec::new();
        let mut cut = false;
        let deadline = tokio::time::Instant::now() + ERROR_BODY_TIME;
        let mut s = resp.bytes_stream();
        loop {
            match tokio::time::timeout_at(deadline, s.next()).await {
                Ok(Some(Ok(c))) => {
                    let room = MAX_ERROR_BODY - out.len();
                    if c.len() >= room {
                        // At the limit: whatever follows is not read.
                        out.extend_from_slice(&c[..room]);
                        cut = true;
                        break;
                    }
                    out.extend_from_slice(&c);
                }
                Ok(Some(Err(_))) | Ok(None) => break,
                Err(_) => {
                    cut = true;
                    break;
                }
            }
        }
        // Dropping the stream closes the connection: the rest is never read.
        drop(s);
        shown_body(&out, cut)
    }

    /// Fetch a manifest or index by tag or digest. Verified against the
    /// reference's digest when pinned, and against `Docker-Content-Digest`.
    pub async fn get_manifest(&self, reference: &Reference) -> Result<RawManifest> {
        let what = format!("manifest of {reference}");
        let repo = &reference.repository;
        let url = self.url(repo, &format!("manifests/{}", reference.manifest_ref()));
        let resp = self
            .send(&what, repo, &[Self::pull_scope(repo)], true, &|c| {
                c.get(&url).header(ACCEPT, MANIFEST_ACCEPT)
            })
            .await?;
        if !resp.status().is_success() {
            let st = resp.status();
            return Err(status_error(
                &what,
                &repo.registry,
                st,
                Self::body_text(resp).await,
            ));
        }
        let media_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let claimed: Option<Digest> = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.parse().ok());
        let bytes = Self::read_limited(&what, &repo.registry, resp, MAX_MANIFEST_BYTES).await?;
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
        let cfg_digest = descriptor_digest(&what, parsed.config())?;
        let config_bytes = self
            .fetch_blob(
                &reference.repository,
                &cfg_digest,
                Some(parsed.config().size()),
                MAX_CONFIG_BYTES,
            )
            .await?;
        let config = serde_json::from_slice(&config_bytes).map_err(|e| OciError::BadManifest {
            what: format!("config of {what}"),
            reason: e.to_string(),
        })?;
        let reference = reference.with_digest(manifest.digest.clone());
        Ok(ResolvedImage {
            reference,
            index,
            manifest,
            parsed,
            config_bytes,
            config,
        })
    }

    /// Fetch a small blob into memory, verified (for configs and the like).
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: Option<u64>,
        limit: u64,
    ) -> Result<Bytes> {
        let what = format!("blob {digest} of {repo}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self
            .send(&what, repo, &[Self::pull_scope(repo)], true, &|c| {
                c.get(&url)
            })
            .await?;
        if !resp.status().is_success() {
            let st = resp.status();
            return Err(status_error(
                &what,
                &repo.registry,
                st,
                Self::body_text(resp).await,
            ));
        }
        let bytes = Self::read_limited(
            &what,
            &repo.registry,
            resp,
            limit.min(size.unwrap_or(u64::MAX)),
        )
        .await?;
        if let Some(s) = size {
            if bytes.len() as u64 != s {
                return Err(OciError::SizeMismatch {
                    what,
                    expected: s,
                    actual: bytes.len() as u64,
                });
            }
        }
        digest.verify(&what, &bytes)?;
        Ok(bytes)
    }

    /// Stream a blob into `tx`, resuming with `Range` after a broken or
    /// stalled connection (or skipping what we have when the server ignores
    /// Range), and verify its digest and size at the end. The consumer must
    /// not trust the bytes until this returns `Ok`. `progress` is told each
    /// chunk's length.
    pub async fn download_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        expected_size: Option<u64>,
        tx: mpsc::Sender<Bytes>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        let from = BlobResume::start(digest);
        self.download_blob_from(repo, digest, expected_size, from, tx, progress)
            .await
    }

    /// [`RegistryClient::download_blob`] after a prefix the caller already
    /// holds (`from.offset` bytes, already fed to `from.hasher`): only the
    /// rest is requested and sent to `tx`, and counted in `progress`; the
    /// digest and size checks at the end cover the whole blob.
    pub async fn download_blob_from(
        &self,
        repo: &Repository,
        digest: &Digest,
        expected_size: Option<u64>,
        from: BlobResume,
        tx: mpsc::Sender<Bytes>,
        progress: &(dyn Fn(u64) + Send + Sync),
    ) -> Result<u64> {
        let what = format!("blob {digest} of {repo}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let scopes = [Self::pull_scope(repo)];
        let mut hasher = from.hasher;
        let mut got: u64 = from.offset;
        if let Some(exp) = expected_size.filter(|e| got > *e) {
            return Err(OciError::SizeMismatch {
                what,
                expected: exp,
                actual: got,
            });
        }
        let stall = self.cfg.stall_timeout.max(Duration::from_millis(100));
        // Bytes a stall window must bring for the connection to count as alive.
        let window_min = (self.cfg.min_speed as f64 * stall.as_secs_f64()) as u64;
        let mut failures = 0u32;
        // Nothing left to ask for when the prefix is the whole blob.
        while expected_size != Some(got) {
            let offset = got;
            // A registry that takes the request but never answers is a stall too.
            let resp = self
                .send_within(&what, repo, &scopes, true, Some(stall), &|c| {
                    let rb = c.get(&url);
                    if offset > 0 {
                        rb.header(RANGE, format!("bytes={offset}-"))
                    } else {
                        rb
                    }
                })
                .await?;
            let status = resp.status();
            let mut skip = 0u64;
            if offset > 0 && status == StatusCode::PARTIAL_CONTENT {
                let start = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.strip_prefix("bytes "))
                    .and_then(|s| s.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if start != Some(offset) {
                    return Err(OciError::Status {
                        what,
                        registry: repo.registry.clone(),
                        status: 206,
                        body: format!(
                            "asked to resume at {offset}, got range starting at {start:?}"
                        ),
                    });
                }
            } else if offset > 0
                && expected_size.is_none()
                && status == StatusCode::RANGE_NOT_SATISFIABLE
            {
                // Size unknown and the prefix was all of it: the digest decides.
                break;
            } else if status == StatusCode::OK {
                // A server without Range support resends everything: drop what we have.
                skip = offset;
                if offset > 0 {
                    tracing::info!(%what, offset, "server ignored Range; skipping already received bytes");
                }
            } else {
                return Err(status_error(
                    &what,
                    &repo.registry,
                    status,
                    Self::body_text(resp).await,
                ));
            }
            // A complete response that is shorter than the descriptor says is
            // a truncated blob, not a broken connection: retrying cannot help.
            let resp_len = resp.content_length().map(|l| l.saturating_sub(skip));
            let resp_start = got;
            let mut body = resp.bytes_stream();
            // Stall detection: each window of `stall` must bring `window_min`
            // bytes (and at least one). reqwest's read timeout alone lets a
            // server trickling a byte now and then hold a download forever.
            let mut window_start = tokio::time::Instant::now();
            let mut window_bytes = 0u64;
            let outcome: std::result::Result<(), Broken> = loop {
                let deadline = window_start + stall;
                let next = tokio::time::timeout_at(deadline, body.next()).await;
                match next {
                    Ok(Some(Ok(mut chunk))) => {
                        if skip > 0 {
                            let n = skip.min(chunk.len() as u64) as usize;
                            skip -= n as u64;
                            window_bytes += n as u64;
                            chunk = chunk.slice(n..);
                        }
                        if !chunk.is_empty() {
                            got += chunk.len() as u64;
                            window_bytes += chunk.len() as u64;
                            if let Some(exp) = expected_size.filter(|e| got > *e) {
                                return Err(OciError::SizeMismatch {
                                    what,
                                    expected: exp,
                                    actual: got,
                                });
                            }
                            hasher.update(&chunk);
                            progress(chunk.len() as u64);
                            // Time waiting for a slow consumer is not the registry's.
                            let waited = tokio::time::Instant::now();
                            if tx.send(chunk).await.is_err() {
                                return Err(OciError::ConsumerGone { what });
                            }
                            window_start += waited.elapsed();
                        }
                    }
                    Ok(Some(Err(e))) => break Err(Broken::Error(e.to_string())),
                    Ok(None) => break Ok(()),
                    Err(_elapsed) => {}
                }
                if tokio::time::Instant::now() >= window_start + stall {
                    if window_bytes == 0 || window_bytes < window_min {
                        break Err(Broken::Stalled {
                            bytes: window_bytes,
                            secs: stall.as_secs_f64(),
                            min_speed: self.cfg.min_speed,
                        });
                    }
                    window_start = tokio::time::Instant::now();
                    window_bytes = 0;
                }
            };
            // Dropping the body closes the connection (a stalled one included).
            drop(body);
            if outcome.is_err() && tx.is_closed() {
                // Nobody wants the rest (a cancelled fetch): not a registry fault.
                return Err(OciError::ConsumerGone { what });
            }
            let short = expected_size.is_some_and(|e| got < e);
            if short && outcome.is_ok() && resp_len == Some(got - resp_start) {
                return Err(OciError::SizeMismatch {
                    what,
                    expected: expected_size.unwrap_or(0),
                    actual: got,
                });
            }
            let reason = match outcome {
                Ok(()) if !short => break,
                Ok(()) => Broken::EndedEarly,
                Err(b) => b,
            };
            failures += 1;
            if failures >= self.cfg.max_attempts {
                tracing::debug!(%what, got, %reason, failures, "giving up");
                return Err(OciError::Interrupted {
                    what,
                    registry: repo.registry.clone(),
                    at: got,
                    total: expected_size,
                    reason: reason.to_string(),
                    tries: failures,
                });
            }
            tracing::warn!(%what, at = got, %reason, "download interrupted; resuming");
            tokio::time::sleep(backoff(failures - 1)).await;
        }
        let actual = hasher.finish();
        if &actual != digest {
            return Err(OciError::DigestMismatch {
                what,
                expected: digest.clone(),
                actual,
            });
        }
        if let Some(exp) = expected_size {
            if got != exp {
                return Err(OciError::SizeMismatch {
                    what,
                    expected: exp,
                    actual: got,
                });
            }
        }
        Ok(got)
    }

    /// Read `len` bytes of a blob from `start`. Uses HTTP Range; when the
    /// server answers 200 instead of 206 the prefix is read and discarded.
    /// A range cannot be digest-verified on its own: callers check what it holds.
    pub async fn get_blob_range(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Bytes> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = self.url(repo, &format!("blobs/{digest}"));
        let end = start + len - 1;
        let resp = self
            .send(&what, repo, &[Self::pull_scope(repo)], true, &|c| {
                c.get(&url).header(RANGE, format!("bytes={start}-{end}"))
            })
            .await?;
        let status = resp.status();
        let skip = match status {
            StatusCode::PARTIAL_CONTENT => 0,
            StatusCode::OK => start,
            _ => {
                return Err(status_error(
                    &what,
                    &repo.registry,
                    status,
                    Self::body_text(resp).await,
                ))
            }
        };
        let mut out = Vec::with_capacity(len as usize);
        let mut seen = 0u64;
        let mut body = resp.bytes_stream();
        while let Some(c) = body.next().await {
            let c = c.map_err(|e| OciError::Http {
                what: what.clone(),
                registry: repo.registry.clone(),
                source: e,
            })?;
            let c_start = seen;
            seen += c.len() as u64;
            if seen <= skip {
                continue;
            }
            let from = skip.saturating_sub(c_start) as usize;
            let want = (len as usize) - out.len();
            let take = (c.len() - from).min(want);
            out.extend_from_slice(&c[from..from + take]);
            if out.len() as u64 == len {
                break;
            }
        }
        if (out.len() as u64) < len {
            return Err(OciError::SizeMismatch {
                what,
                expected: len,
                actual: out.len() as u64,
            });
        }
        Ok(Bytes::from(out))
    }

    /// GET bytes `[start, start + len)` of a blob with HTTP Range and hand
    /// back the body as it streams. `true`: the server sent that range (206
    /// with a matching Content-Range); `false`: it ignored Range and sends
    /// the whole blob from byte 0 (200), which the caller may use as a
    /// stream of everything. Nothing is verified here: callers check what the
    /// bytes hold.
    pub async fn blob_range_stream(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<(bool, BodyStream)> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let end = start + len.max(1) - 1;
        let resp = self
            .send(&what, repo, &[Self::pull_scope(repo)], true, &|c| {
                c.get(&url).header(RANGE, format!("bytes={start}-{end}"))
            })
            .await?;
        let status = resp.status();
        let ranged = match status {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                if !cr.starts_with(&format!("bytes {start}-")) {
                    return Err(OciError::Status {
                        what,
                        registry: repo.registry.clone(),
                        status: 206,
                        body: format!("Content-Range {cr:?} is not the range asked for"),
                    });
                }
                true
            }
            StatusCode::OK => false,
            _ => {
                return Err(status_error(
                    &what,
                    &repo.registry,
                    status,
                    Self::body_text(resp).await,
                ))
            }
        };
        let registry = repo.registry.clone();
        let body = resp.bytes_stream().map(move |c| {
            c.map_err(|e| OciError::Http {
                what: what.clone(),
                registry: registry.clone(),
                source: e,
            })
        });
        Ok((ranged, Box::pin(body)))
    }

    /// `len` bytes of a blob from `start` for callers that want the range or
    /// nothing: `None` when the registry ignores Range (answers 200), whose
    /// body is then not read. The bytes are not verified here.
    pub async fn get_blob_range_only(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<Option<Bytes>> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        if len == 0 {
            return Ok(Some(Bytes::new()));
        }
        let (ranged, mut body) = self.blob_range_stream(repo, digest, start, len).await?;
        if !ranged {
            // Dropped unread: the connection closes, the blob is not sent.
            return Ok(None);
        }
        let mut out = Vec::new();
        while let Some(c) = body.next().await {
            let c = c?;
            if out.len() as u64 + c.len() as u64 > len {
                return Err(OciError::TooLarge {
                    what,
                    size: out.len() as u64 + c.len() as u64,
                    limit: len,
                });
            }
            out.extend_from_slice(&c);
        }
        if out.len() as u64 != len {
            return Err(OciError::SizeMismatch {
                what,
                expected: len,
                actual: out.len() as u64,
            });
        }
        Ok(Some(Bytes::from(out)))
    }

    /// The referrers of `subject` of type `artifact_type` (an OCI image
    /// index, its bytes), or `None` when the registry has no referrers API
    /// (404, or any other answer but 200: callers then try the tag schema).
    pub async fn get_referrers(
        &self,
        repo: &Repository,
        subject: &Digest,
        artifact_type: &str,
    ) -> Result<Option<Bytes>> {
        let what = format!("referrers of {subject} in {repo}");
        let mut url =
            url::Url::parse(&self.url(repo, &format!("referrers/{subject}"))).expect("valid URL");
        url.query_pairs_mut()
            .append_pair("artifactType", artifact_type);
        let resp = self
            .send(&what, repo, &[Self::pull_scope(repo)], true, &|c| {
                c.get(url.clone())
                    .header(ACCEPT, "application/vnd.oci.image.index.v1+json")
            })
            .await?;
        if resp.status() != StatusCode::OK {
            tracing::debug!(%what, status = %resp.status(), "no referrers API");
            return Ok(None);
        }
        Self::read_limited(&what, &repo.registry, resp, MAX_MANIFEST_BYTES)
            .await
            .map(Some)
    }

    /// Size of a blob if the repository has it.
    pub async fn blob_exists(&self, repo: &Repository, digest: &Digest) -> Result<Option<u64>> {
        let what = format!("blob {digest} of {repo}");
        let url = self.url(repo, &format!("blobs/{digest}"));
        let resp = self
            .send(&what, repo, &[Self::pull_scope(repo)], true, &|c| {
                c.head(&url)
            })
            .await?;
        match resp.status() {
            s if s.is_success() => Ok(resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok())
                .or(Some(0))),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error(&what, &repo.registry, s, String::new())),
        }
    }

    fn resolve_location(&self, repo: &Repository, what: &str, resp: &Response) -> Result<url::Url> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| OciError::Status {
                what: what.into(),
                registry: repo.registry.clone(),
                status: resp.status().as_u16(),
                body: "upload session without Location header".into(),
            })?;
        let base = url::Url::parse(&format!("{}://{}/", self.scheme(repo), repo.api_host()))
            .expect("valid base URL");
        base.join(loc).map_err(|e| OciError::Status {
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
        let mut scopes = vec![Self::push_scope(repo)];
        let start_url = match mount_from
            .filter(|f| f.registry == repo.registry && f.name != repo.name)
        {
            Some(from) => {
                scopes.push(Self::pull_scope(from));
                let mut u = url::Url::parse(&self.url(repo, "blobs/uploads/")).expect("valid URL");
                u.query_pairs_mut()
                    .append_pair("mount", &digest.to_string())
                    .append_pair("from", &from.name);
                u
            }
            None => url::Url::parse(&self.url(repo, "blobs/uploads/")).expect("valid URL"),
        };
        let resp = self
            .send(&what, repo, &scopes, false, &|c| {
                c.post(start_url.clone()).header(CONTENT_LENGTH, 0)
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED => return Ok(PushOutcome::Mounted),
            StatusCode::ACCEPTED => {}
            s => {
                return Err(status_error(
                    &what,
                    &repo.registry,
                    s,
                    Self::body_text(resp).await,
                ))
            }
        }
        let mut location = self.resolve_location(repo, &what, &resp)?;
        let chunk = self.cfg.upload_chunk_size.filter(|c| *c > 0 && size > *c);
        if let Some(chunk) = chunk {
            let mut offset = 0u64;
            while offset < size {
                let n = chunk.min(size - offset);
                let data = read_source(&what, source, offset, n)?;
                let loc = location.clone();
                let resp = self
                    .send(&what, repo, &scopes, false, &|c| {
                        c.request(Method::PATCH, loc.clone())
                            .header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_RANGE, format!("{}-{}", offset, offset + n - 1))
                            .header(CONTENT_LENGTH, n)
                            .body(data.clone())
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    let s = resp.status();
                    return Err(status_error(
                        &what,
                        &repo.registry,
                        s,
                        Self::body_text(resp).await,
                    ));
                }
                location = self.resolve_location(repo, &what, &resp)?;
                offset += n;
            }
            let mut fin = location.clone();
            fin.query_pairs_mut()
                .append_pair("digest", &digest.to_string());
            let resp = self
                .send(&what, repo, &scopes, false, &|c| {
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
            .send(&what, repo, &scopes, false, &|c| {
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
        let url = self.url(
            repo,
            &format!(
                "manifests/{}",
                reference.tag.clone().unwrap_or_else(|| digest.to_string())
            ),
        );
        let resp = self
            .send(&what, repo, &[Self::push_scope(repo)], true, &|c| {
                c.put(&url)
                    .header(CONTENT_TYPE, media_type)
                    .body(bytes.clone())
            })
            .await?;
        if resp.status() != StatusCode::CREATED && !resp.status().is_success() {
            let s = resp.status();
            return Err(status_error(
                &what,
                &repo.registry,
                s,
                Self::body_text(resp).await,
            ));
        }
        Ok(digest)
    }
}

async fn finish_upload(what: &str, repo: &Repository, resp: Response) -> Result<PushOutcome> {
    if resp.status() == StatusCode::CREATED
        || resp.status() == StatusCode::ACCEPTED
        || resp.status() == StatusCode::OK
    {
        Ok(PushOutcome::Uploaded)
    } else {
        let s = resp.status();
        Err(status_error(
            what,
            &repo.registry,
            s,
            RegistryClient::body_text(resp).await,
        ))
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        assert!(is_loopback("127.0.0.1:5000"));
        assert!(is_loopback("localhost"));
        assert!(is_loopback("[::1]:80"));
        assert!(!is_loopback("registry.example:5000"));
        assert!(!is_loopback("128.0.0.1"));
    }

    #[test]
    fn error_bodies_are_shortened_and_cuts_said() {
        assert_eq!(shown_body(b"oops", false), "oops");
        let long = vec![b'x'; 1000];
        let s = shown_body(&long, false);
        assert!(s.starts_with(&"x".repeat(SHOWN_ERROR_BODY)));
        assert!(s.ends_with("(1000 bytes in all)"), "{s}");
        let s = shown_body(&long, true);
        assert!(
            s.ends_with("(body cut: read only its first 1000 bytes)"),
            "{s}"
        );
    }

    #[test]
    fn stall_reasons_are_plain_words() {
        let no_data = Broken::Stalled {
            bytes: 0,
            secs: 10.0,
            min_speed: 1024,
        };
        assert_eq!(no_data.to_string(), "no data for 10 s");
        let slow = Broken::Stalled {
            bytes: 3,
            secs: 2.0,
            min_speed: 1024,
        };
        assert_eq!(slow.to_string(), "only 3 B in 2 s, below 1.0 kB/s");
        let e = OciError::Interrupted {
            what: "blob sha256:ab of r/x".into(),
            registry: "127.0.0.1:5000".into(),
            at: 7_700_000,
            total: Some(25_000_000),
            reason: no_data.to_string(),
            tries: 5,
        };
        assert_eq!(
            e.to_string(),
            "registry 127.0.0.1:5000 stopped sending blob sha256:ab of r/x at 7.7 MB of 25.0 MB (no data for 10 s); tried 5 times"
        );
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) > backoff(0));
        assert!(backoff(30) <= Duration::from_millis(200 * 64));
    }
}
