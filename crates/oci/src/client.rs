//! An OCI distribution-spec client: manifests, blobs (streamed, ranged,
//! resumable), pushes (monolithic, chunked, cross-repository mount) and the
//! token/basic auth dance. Plain HTTP is used for loopback hosts and hosts the
//! user names as insecure; TLS (rustls) everywhere else.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{
    HeaderMap, ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, LOCATION, RANGE,
    WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tokio::sync::mpsc;

use crate::auth::{parse_challenge, AuthStore};
use crate::breaker::Breakers;
use crate::digest::{Digest, DigestHasher};
use crate::error::{OciError, Result};
use crate::hosts::{Endpoint, Hosts, Purpose};
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
    /// Mirrors and per-host settings (containerd's hosts.toml, containers'
    /// registries.conf); none by default.
    pub hosts: Hosts,
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
            hosts: Hosts::default(),
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

/// An error and its sources on one line: reqwest's own text ("error sending
/// request for url ...") does not say what failed.
pub(crate) fn error_text(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(cause) = src {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        src = cause.source();
    }
    out
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

/// A client for one or more registries. Cheap to clone: clones share the
/// HTTP connections, tokens and what is known about hosts that failed.
#[derive(Clone)]
pub struct RegistryClient {
    http: reqwest::Client,
    cfg: Arc<ClientConfig>,
    /// Authorization header values by `host` + scope (bearer) or `host` (basic).
    tokens: Arc<Mutex<HashMap<String, String>>>,
    /// HTTP clients for hosts with TLS settings of their own (skip_verify,
    /// extra CAs), built once.
    tls_clients: Arc<Mutex<HashMap<TlsKey, reqwest::Client>>>,
    /// Hosts (`scheme://host`) that failed recently, until when: tried after
    /// the others for a while, so a dead mirror does not cost every read a
    /// connect timeout.
    failed: Arc<Mutex<HashMap<String, Instant>>>,
    /// Per blob: the mirrors (host keys) that sent bytes of its download in
    /// progress or last failed, so that bad bytes found after the fact (by
    /// the digest, or by the unpacker) can be laid at their door
    /// ([`RegistryClient::distrust`]). Forgotten once a download verifies.
    served_by: Arc<Mutex<HashMap<Digest, Vec<String>>>>,
    /// Hosts given up on for network reasons: asked no more until a probe
    /// finds them back (shared by clones, so by every image of a process).
    breakers: Breakers,
}

/// A host's TLS settings: skip_verify, extra CA files.
type TlsKey = (bool, Vec<PathBuf>);

/// How long a host that failed is tried after the others.
const FAILED_HOST_PENALTY: Duration = Duration::from_secs(30);
/// Attempts per request on a mirror before moving on to the next host (the
/// upstream registry gets `max_attempts`): a mirror that fails twice is not
/// waited for.
const MIRROR_ATTEMPTS: u32 = 2;

/// How long an idle pooled connection to a registry is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether an error from one host sends the request to the next host: a
/// fault of that host (unreachable, busy, missing content, bad content), not
/// of this process (a consumer gone, a local file).
fn fails_over(e: &OciError) -> bool {
    !matches!(
        e,
        OciError::ConsumerGone { .. }
            | OciError::Io { .. }
            | OciError::Config { .. }
            | OciError::Blocked { .. }
            | OciError::NoHost { .. }
            | OciError::InvalidReference { .. }
            | OciError::InvalidDigest { .. }
    )
}

/// Whether an error says the host is down (rather than missing one item).
fn host_is_down(e: &OciError) -> bool {
    match e {
        OciError::Http { .. } | OciError::NoAnswer { .. } | OciError::Interrupted { .. } => true,
        OciError::Status { status, .. } => *status >= 500,
        _ => false,
    }
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
        let http = Self::builder(&cfg).build().map_err(|e| OciError::Http {
            what: "creating HTTP client".into(),
            registry: String::new(),
            source: e,
        })?;
        Ok(RegistryClient {
            http,
            cfg: Arc::new(cfg),
            tokens: Arc::new(Mutex::new(HashMap::new())),
            tls_clients: Arc::new(Mutex::new(HashMap::new())),
            failed: Arc::new(Mutex::new(HashMap::new())),
            served_by: Arc::new(Mutex::new(HashMap::new())),
            breakers: Breakers::default(),
        })
    }

    fn builder(cfg: &ClientConfig) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .user_agent(cfg.user_agent.clone())
            .connect_timeout(cfg.connect_timeout)
            // A longer stall timeout must not be pre-empted by the per-read one.
            .read_timeout(cfg.read_timeout.max(cfg.stall_timeout))
            // A server serving many images from many registries keeps a burst's
            // connections (and their descriptors) only briefly once idle; a start
            // reuses them, a new one later costs one round trip.
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }

    /// The HTTP client for `ep`: the shared one, or one with the host's own
    /// TLS settings (built on first use and kept).
    fn http_for(&self, ep: &Endpoint) -> Result<reqwest::Client> {
        if !ep.skip_verify && ep.ca_files.is_empty() {
            return Ok(self.http.clone());
        }
        let key = (ep.skip_verify, ep.ca_files.clone());
        if let Some(c) = self.tls_clients.lock().unwrap().get(&key) {
            return Ok(c.clone());
        }
        let mut b = Self::builder(&self.cfg);
        if ep.skip_verify {
            b = b.tls_danger_accept_invalid_certs(true);
        }
        let mut certs = Vec::new();
        for f in &ep.ca_files {
            let pem = std::fs::read(f).map_err(|e| OciError::Config {
                path: f.display().to_string(),
                reason: format!(
                    "cannot read the CA certificate of {} ({}): {e}",
                    ep.host, ep.source
                ),
            })?;
            certs.extend(reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                OciError::Config {
                    path: f.display().to_string(),
                    reason: format!("not a PEM certificate bundle: {e}"),
                }
            })?);
        }
        if !certs.is_empty() {
            b = b.tls_certs_merge(certs);
        }
        let c = b.build().map_err(|e| OciError::Http {
            what: format!("creating the HTTP client for {} ({})", ep.host, ep.source),
            registry: ep.host.clone(),
            source: e,
        })?;
        self.tls_clients.lock().unwrap().insert(key, c.clone());
        Ok(c)
    }

    /// The hosts to try for `purpose` on `repo`, mirrors first, those that
    /// failed recently after the others; hosts known to be down (breaker
    /// open) left out while another remains.
    pub fn endpoints(&self, repo: &Repository, purpose: Purpose) -> Result<Vec<Endpoint>> {
        let mut eps = self
            .cfg
            .hosts
            .endpoints(repo, purpose, &self.cfg.insecure_registries)?;
        if eps.len() > 1 {
            let up: Vec<Endpoint> = eps
                .iter()
                .filter(|e| !self.breakers.is_open(&Self::host_key(e)))
                .cloned()
                .collect();
            // All down: asked anyway, so the caller gets their errors.
            if !up.is_empty() {
                eps = up;
            }
        }
        if eps.len() > 1 {
            let now = Instant::now();
            let mut failed = self.failed.lock().unwrap();
            failed.retain(|_, until| *until > now);
            if !failed.is_empty() {
                // Stable: configured order within each group.
                eps.sort_by_key(|e| failed.contains_key(&Self::host_key(e)));
            }
        }
        Ok(eps)
    }

    fn host_key(ep: &Endpoint) -> String {
        format!("{}://{}", ep.scheme, ep.host)
    }

    fn note_failure(&self, ep: &Endpoint, e: &OciError) {
        if host_is_down(e) {
            self.failed
                .lock()
                .unwrap()
                .insert(Self::host_key(ep), Instant::now() + FAILED_HOST_PENALTY);
        }
    }

    /// `ep` failed with `e` after all its tries: a network failure opens its
    /// breaker (and starts the probe that closes it).
    fn gave_up(&self, ep: &Endpoint, e: &OciError) {
        let key = Self::host_key(ep);
        if self.breakers.trip(&key, e) {
            let root = format!(
                "{}://{}{}/",
                ep.scheme,
                ep.host,
                ep.path.trim_end_matches('/')
            );
            match (self.http_for(ep), url::Url::parse(&root)) {
                (Ok(http), Ok(root)) => self.breakers.start_probe(&key, http, root),
                // Never probed: do not keep it closed to requests either.
                _ => self.breakers.close(&key),
            }
        }
    }

    /// `digest`'s last download brought bytes that are not the blob (its
    /// digest, or the layer they make, is wrong): the mirrors that sent them
    /// are asked after the others for a while. True when there was such a
    /// mirror, so that fetching again goes elsewhere; false when only the
    /// registry itself served it.
    pub fn distrust(&self, digest: &Digest) -> bool {
        let Some(hosts) = self.served_by.lock().unwrap().remove(digest) else {
            return false;
        };
        let until = Instant::now() + FAILED_HOST_PENALTY;
        let mut failed = self.failed.lock().unwrap();
        for h in &hosts {
            tracing::warn!(blob = %digest, host = %h, "a mirror served bytes that are not this blob; asking the other hosts first");
            failed.insert(h.clone(), until);
        }
        !hosts.is_empty()
    }

    /// Attempts per request on `ep`.
    fn attempts(&self, ep: &Endpoint) -> u32 {
        if ep.mirror {
            self.cfg.max_attempts.min(MIRROR_ATTEMPTS)
        } else {
            self.cfg.max_attempts
        }
    }

    /// Run `at` on each host for `purpose` in turn until one succeeds; a
    /// failure of a host that is not the last is logged (naming it) and the
    /// next is tried; the last host's error is returned.
    async fn on_hosts<T, F, Fut>(
        &self,
        what: &str,
        repo: &Repository,
        purpose: Purpose,
        mut at: F,
    ) -> Result<T>
    where
        F: FnMut(Endpoint) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let eps = self.endpoints(repo, purpose)?;
        let n = eps.len();
        for (i, ep) in eps.into_iter().enumerate() {
            match at(ep.clone()).await {
                Ok(v) => {
                    if ep.mirror {
                        tracing::debug!(%what, host = %ep.host, "served by mirror");
                    }
                    return Ok(v);
                }
                Err(e) if i + 1 < n && fails_over(&e) => {
                    tracing::warn!(%what, host = %ep.label(), source = %ep.source, error = %e, "host failed; trying the next one");
                    self.note_failure(&ep, &e);
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("Hosts::endpoints returns at least one host")
    }

    /// The token scope for pulls of the repository as `ep` names it.
    fn pull_scope(ep: &Endpoint) -> String {
        format!("repository:{}:pull", ep.name)
    }
    fn push_scope(ep: &Endpoint) -> String {
        format!("repository:{}:pull,push", ep.name)
    }

    /// The upstream registry, the only host pushes go to.
    fn push_host(&self, repo: &Repository) -> Result<Endpoint> {
        let eps = self
            .cfg
            .hosts
            .endpoints(repo, Purpose::Push, &self.cfg.insecure_registries)?;
        Ok(eps.into_iter().last().expect("at least one host"))
    }

    /// Send a request built by `build` to `ep`, answering auth challenges
    /// and retrying transient failures. `build` is called once per attempt,
    /// so bodies must be re-creatable. Non-idempotent requests are retried
    /// only when the connection failed before anything was sent. An
    /// idempotent request whose answer does not come within the stall
    /// timeout is a stalled registry too: tried again, then given up.
    async fn send(
        &self,
        what: &str,
        repo: &Repository,
        ep: &Endpoint,
        scopes: &[String],
        idempotent: bool,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        let answer_timeout = self.cfg.stall_timeout.max(Duration::from_millis(100));
        self.send_within(
            what,
            repo,
            ep,
            scopes,
            idempotent,
            Some(answer_timeout),
            build,
        )
        .await
    }

    /// [`RegistryClient::send`], where each attempt's response (its status
    /// and headers) must come within `answer_timeout`, else the attempt
    /// counts as failed (idempotent requests only).
    #[allow(clippy::too_many_arguments)]
    async fn send_within(
        &self,
        what: &str,
        repo: &Repository,
        ep: &Endpoint,
        scopes: &[String],
        idempotent: bool,
        answer_timeout: Option<Duration>,
        build: &(dyn Fn(&reqwest::Client) -> RequestBuilder + Sync),
    ) -> Result<Response> {
        let registry = ep.label().to_string();
        let host_key = Self::host_key(ep);
        let http = self.http_for(ep)?;
        let max_attempts = self.attempts(ep);
        // Tokens are per host: a mirror answers its own challenges.
        let scope_key = format!("{} {}", ep.host, scopes.join(" "));
        let basic_key = ep.host.clone();
        let mut authed = false;
        let mut attempt = 0;
        loop {
            // A host known to be down (given up on by this request or another
            // meanwhile) costs nothing but this error.
            self.breakers.admit(&host_key, what, &registry)?;
            let cached = {
                let t = self.tokens.lock().unwrap();
                t.get(&scope_key).or_else(|| t.get(&basic_key)).cloned()
            };
            let mut rb = build(&http);
            for (k, v) in &ep.headers {
                rb = rb.header(k.as_str(), v.as_str());
            }
            if let Some(h) = &cached {
                rb = rb.header(AUTHORIZATION, h);
            }
            let sent = match answer_timeout.filter(|_| idempotent) {
                None => rb.send().await,
                Some(limit) => match tokio::time::timeout(limit, rb.send()).await {
                    Ok(r) => r,
                    Err(_) if attempt + 1 < max_attempts => {
                        tracing::warn!(%what, host = %registry, attempt, "no answer for {:.0} s, retrying", limit.as_secs_f64());
                        tokio::time::sleep(backoff(attempt)).await;
                        attempt += 1;
                        continue;
                    }
                    Err(_) => {
                        let e = OciError::NoAnswer {
                            what: what.into(),
                            registry,
                            secs: limit.as_secs_f64(),
                            tries: attempt + 1,
                        };
                        self.gave_up(ep, &e);
                        return Err(e);
                    }
                },
            };
            if sent.is_ok() {
                // It answers (whatever the status): not down.
                self.breakers.close(&host_key);
            }
            match sent {
                Ok(resp) if resp.status() == StatusCode::UNAUTHORIZED && !authed => {
                    authed = true;
                    let header = self
                        .authenticate(what, repo, ep, &http, scopes, resp.headers())
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
                        && attempt + 1 < max_attempts
                        && idempotent =>
                {
                    tracing::warn!(%what, host = %registry, status = %resp.status(), attempt, "registry busy, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Ok(resp) => {
                    if resp.status() == StatusCode::UNAUTHORIZED
                        || resp.status() == StatusCode::FORBIDDEN
                    {
                        let hint = if self.credential(repo, ep).is_none() {
                            format!("; no credentials for {} in the auth files", ep.label())
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
                Err(e) if attempt + 1 < max_attempts && (idempotent || e.is_connect()) => {
                    tracing::warn!(%what, host = %registry, error = %e, attempt, "request failed, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => {
                    let e = OciError::Http {
                        what: what.into(),
                        registry,
                        source: e,
                    };
                    self.gave_up(ep, &e);
                    return Err(e);
                }
            }
        }
    }

    /// Credentials for `ep`: a mirror's own (by its host), else the
    /// registry's (a mirror in front of a private registry may pass them on).
    fn credential(&self, repo: &Repository, ep: &Endpoint) -> Option<crate::auth::Credential> {
        if ep.mirror {
            self.cfg
                .auth
                .get(&ep.host)
                .or_else(|| self.cfg.auth.get(&repo.registry))
        } else {
            self.cfg.auth.get(&repo.registry)
        }
    }

    /// Answer a 401: Basic from the auth files, or a Bearer token from the
    /// realm the registry names (with Basic credentials when we have them).
    async fn authenticate(
        &self,
        what: &str,
        repo: &Repository,
        ep: &Endpoint,
        http: &reqwest::Client,
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
        let cred = self.credential(repo, ep);
        match ch.scheme.as_str() {
            "basic" => cred.map(|c| c.basic_header()).ok_or_else(|| {
                auth_err(format!(
                    "{} asks for a password and the auth files have none for it",
                    ep.label()
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
                let mut rb = http.get(url);
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

    async fn get_manifest_at(
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
        if !resp.status().is_success() {
            let st = resp.status();
            return Err(status_error(
                &what,
                ep.label(),
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

    /// Fetch a small blob into memory, verified (for configs and the like);
    /// a host that sends other bytes than the digest names is passed over.
    pub async fn fetch_blob(
        &self,
        repo: &Repository,
        digest: &Digest,
        size: Option<u64>,
        limit: u64,
    ) -> Result<Bytes> {
        let what = format!("blob {digest} of {repo}");
        self.on_hosts(&what, repo, Purpose::Pull, |ep| {
            let what = what.clone();
            async move {
                let url = ep.url(&format!("blobs/{digest}"));
                let resp = self
                    .send(&what, repo, &ep, &[Self::pull_scope(&ep)], true, &|c| {
                        c.get(url.clone())
                    })
                    .await?;
                if !resp.status().is_success() {
                    let st = resp.status();
                    return Err(status_error(
                        &what,
                        ep.label(),
                        st,
                        Self::body_text(resp).await,
                    ));
                }
                let bytes = Self::read_limited(
                    &what,
                    ep.label(),
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
                tracing::info!(blob = %digest, host = %ep.label(), bytes = bytes.len(), "blob served");
                Ok(bytes)
            }
        })
        .await
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
    /// digest and size checks at the end cover the whole blob. When a host
    /// fails (unreachable, missing the blob, or broken mid-download after
    /// its attempts) the download resumes with Range from the next host.
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
        let eps = self.endpoints(repo, Purpose::Pull)?;
        let mut host = 0usize;
        let mut hasher = from.hasher;
        let mut got: u64 = from.offset;
        let from_offset = from.offset;
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
        // On a fault of the current host: on to the next one (the bytes so
        // far are kept; the next host is asked for the rest), or, on the
        // last host, the error.
        macro_rules! next_host_or_fail {
            ($err:expr) => {{
                let e = $err;
                let ep = &eps[host];
                if host + 1 < eps.len() && fails_over(&e) {
                    tracing::warn!(%what, host = %ep.label(), source = %ep.source, at = got, error = %e, "host failed; resuming from the next one");
                    self.note_failure(ep, &e);
                    host += 1;
                    failures = 0;
                    continue;
                }
                return Err(e);
            }};
        }
        // Nothing left to ask for when the prefix is the whole blob.
        while expected_size != Some(got) {
            let ep = &eps[host];
            if ep.mirror {
                let mut s = self.served_by.lock().unwrap();
                let hosts = s.entry(digest.clone()).or_default();
                if !hosts.contains(&Self::host_key(ep)) {
                    hosts.push(Self::host_key(ep));
                }
            }
            let url = ep.url(&format!("blobs/{digest}"));
            let scopes = [Self::pull_scope(ep)];
            let offset = got;
            // A registry that takes the request but never answers is a stall too.
            let sent = self
                .send_within(&what, repo, ep, &scopes, true, Some(stall), &|c| {
                    let rb = c.get(url.clone());
                    if offset > 0 {
                        rb.header(RANGE, format!("bytes={offset}-"))
                    } else {
                        rb
                    }
                })
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => next_host_or_fail!(e),
            };
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
                    next_host_or_fail!(OciError::Status {
                        what: what.clone(),
                        registry: ep.label().to_string(),
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
                let e = status_error(&what, ep.label(), status, Self::body_text(resp).await);
                next_host_or_fail!(e);
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
                next_host_or_fail!(OciError::SizeMismatch {
                    what: what.clone(),
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
            if failures >= self.attempts(ep) {
                tracing::debug!(%what, got, %reason, failures, "giving up on this host");
                let e = OciError::Interrupted {
                    what: what.clone(),
                    registry: ep.label().to_string(),
                    at: got,
                    total: expected_size,
                    reason: reason.to_string(),
                    tries: failures,
                };
                self.gave_up(ep, &e);
                next_host_or_fail!(e);
            }
            tracing::warn!(%what, host = %ep.label(), at = got, %reason, "download interrupted; resuming");
            tokio::time::sleep(backoff(failures - 1)).await;
        }
        let actual = hasher.finish();
        // Verified whatever host served it; the bytes went to the consumer
        // already, so a bad blob is an error here, not a reason to fail over.
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
        // Verified: whoever served it served it right.
        self.served_by.lock().unwrap().remove(digest);
        tracing::info!(blob = %digest, host = %eps[host].label(), bytes = got - from_offset, "blob served");
        Ok(got)
    }

    /// Read `len` bytes of a blob from `start`. Uses HTTP Range; when the
    /// server answers 200 instead of 206 the prefix is read and discarded
    /// (docker-registry as a pull-through mirror does so for a blob it has
    /// not cached yet). A broken response resumes on the next host.
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
        let (ranged, mut body) = self.blob_range_stream(repo, digest, start, len).await?;
        let skip = if ranged { 0 } else { start };
        let mut out = Vec::with_capacity(len as usize);
        let mut seen = 0u64;
        while let Some(c) = body.next().await {
            let c = c?;
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

    /// One GET of a blob from byte `from` (to `to`, inclusive, or the end)
    /// on `ep`: `(true, end)` for a 206 of exactly that start (`end`: one
    /// past its last byte), `(false, length)` for a 200 (the whole blob).
    async fn open_range_at(
        &self,
        what: &str,
        repo: &Repository,
        ep: &Endpoint,
        digest: &Digest,
        from: u64,
        to: Option<u64>,
    ) -> Result<(bool, Option<u64>, Response)> {
        let url = ep.url(&format!("blobs/{digest}"));
        let range = match to {
            Some(to) => format!("bytes={from}-{to}"),
            None => format!("bytes={from}-"),
        };
        let resp = self
            .send(what, repo, ep, &[Self::pull_scope(ep)], true, &|c| {
                c.get(url.clone()).header(RANGE, range.clone())
            })
            .await?;
        match resp.status() {
            StatusCode::PARTIAL_CONTENT => {
                let cr = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string();
                let bounds = cr
                    .strip_prefix("bytes ")
                    .and_then(|r| r.split('/').next())
                    .and_then(|r| r.split_once('-'))
                    .and_then(|(a, b)| Some((a.parse::<u64>().ok()?, b.parse::<u64>().ok()?)));
                match bounds {
                    // `b < u64::MAX`: one past it must not overflow (issue #19).
                    Some((a, b)) if a == from && b >= a && b < u64::MAX => {
                        Ok((true, Some(b + 1), resp))
                    }
                    _ => Err(OciError::Status {
                        what: what.into(),
                        registry: ep.label().into(),
                        status: 206,
                        body: format!("Content-Range {cr:?} is not the range asked for ({range})"),
                    }),
                }
            }
            StatusCode::OK => {
                let len = resp.content_length();
                Ok((false, len, resp))
            }
            st => Err(status_error(
                what,
                ep.label(),
                st,
                Self::body_text(resp).await,
            )),
        }
    }

    /// GET bytes `[start, start + len)` of a blob with HTTP Range and hand
    /// back the body as it streams. `true`: the server sent that range (206
    /// with a matching Content-Range); `false`: it ignored Range and sends
    /// the whole blob from byte 0 (200), which the caller may use as a
    /// stream of everything. A response that breaks is resumed with Range
    /// on the next host, if any. Nothing is verified here: callers check
    /// what the bytes hold.
    pub async fn blob_range_stream(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
    ) -> Result<(bool, BodyStream)> {
        self.blob_range_stream_inner(repo, digest, start, len, false)
            .await
            .map(|(r, b)| (r, b.expect("a body unless range_only")))
    }

    /// With `range_only`, a mirror that answers 200 is passed over (its
    /// body unread) for the next host, and a 200 from the last host gives `None`.
    async fn blob_range_stream_inner(
        &self,
        repo: &Repository,
        digest: &Digest,
        start: u64,
        len: u64,
        range_only: bool,
    ) -> Result<(bool, Option<BodyStream>)> {
        let what = format!("bytes {start}+{len} of blob {digest} of {repo}");
        let eps = self.endpoints(repo, Purpose::Pull)?;
        let to = start + len.max(1) - 1;
        let mut host = 0;
        loop {
            let ep = &eps[host];
            let last = host + 1 == eps.len();
            let opened = self
                .open_range_at(&what, repo, ep, digest, start, Some(to))
                .await;
            let e = match opened {
                Ok((false, _, _)) if range_only && last => return Ok((false, None)),
                Ok((false, _, resp)) if range_only => {
                    drop(resp);
                    OciError::Status {
                        what: what.clone(),
                        registry: ep.label().into(),
                        status: 200,
                        body: "the whole blob instead of the range asked for (a mirror that has not cached it yet)".into(),
                    }
                }
                Ok((ranged, end, resp)) => {
                    tracing::debug!(%what, host = %ep.label(), ranged, "range served");
                    let state = ResumingBody {
                        client: self.clone(),
                        what,
                        repo: repo.clone(),
                        digest: digest.clone(),
                        eps,
                        host,
                        pos: if ranged { start } else { 0 },
                        end,
                        skip: 0,
                        body: Some(Box::pin(resp.bytes_stream())),
                    };
                    return Ok((ranged, Some(state.into_stream())));
                }
                Err(e) => e,
            };
            if last || !fails_over(&e) {
                return Err(e);
            }
            tracing::warn!(%what, host = %ep.label(), source = %ep.source, error = %e, "host failed; trying the next one");
            self.note_failure(ep, &e);
            host += 1;
        }
    }

    /// `len` bytes of a blob from `start` for callers that want the range or
    /// nothing: `None` when the registry ignores Range (answers 200), whose
    /// body is then not read. A mirror answering 200 (docker-registry's
    /// proxy does for a blob it has not cached) is passed over for the next
    /// host. The bytes are not verified here.
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
        let (_, body) = self
            .blob_range_stream_inner(repo, digest, start, len, true)
            .await?;
        // Dropped unread: the connection closes, the blob is not sent.
        let Some(mut body) = body else {
            return Ok(None);
        };
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

    fn resolve_location(
        repo: &Repository,
        ep: &Endpoint,
        what: &str,
        resp: &Response,
    ) -> Result<url::Url> {
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
            s => {
                return Err(status_error(
                    &what,
                    &repo.registry,
                    s,
                    Self::body_text(resp).await,
                ))
            }
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
                if resp.status() != StatusCode::ACCEPTED {
                    let s = resp.status();
                    return Err(status_error(
                        &what,
                        &repo.registry,
                        s,
                        Self::body_text(resp).await,
                    ));
                }
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

/// The body of a ranged blob GET that, when it breaks before its end,
/// resumes with Range on the next host (mirror → registry).
struct ResumingBody {
    client: RegistryClient,
    what: String,
    repo: Repository,
    digest: Digest,
    eps: Vec<Endpoint>,
    host: usize,
    /// Blob offset of the next byte handed out.
    pos: u64,
    /// One past the last byte wanted, when known.
    end: Option<u64>,
    /// Bytes of the current response to drop before `pos` (a host that
    /// answered a resume with the whole blob).
    skip: u64,
    body: Option<RawBody>,
}

type RawBody =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<Bytes>> + Send + 'static>>;

impl ResumingBody {
    fn into_stream(self) -> BodyStream {
        Box::pin(futures_util::stream::unfold(self, |mut st| async move {
            loop {
                let body = st.body.as_mut()?;
                let broken = match body.next().await {
                    Some(Ok(mut c)) => {
                        if st.skip > 0 {
                            let n = st.skip.min(c.len() as u64) as usize;
                            st.skip -= n as u64;
                            c = c.slice(n..);
                        }
                        if let Some(end) = st.end {
                            // Never more than was asked for, whatever a host sends.
                            let room = end.saturating_sub(st.pos) as usize;
                            if c.len() > room {
                                c = c.slice(..room);
                            }
                        }
                        if c.is_empty() {
                            if st.end.is_some_and(|e| st.pos >= e) {
                                return None;
                            }
                            continue;
                        }
                        st.pos += c.len() as u64;
                        return Some((Ok(c), st));
                    }
                    Some(Err(e)) => OciError::Http {
                        what: st.what.clone(),
                        registry: st.eps[st.host].label().to_string(),
                        source: e,
                    },
                    None if st.end.is_none_or(|e| st.pos >= e) => return None,
                    None => OciError::Interrupted {
                        what: st.what.clone(),
                        registry: st.eps[st.host].label().to_string(),
                        at: st.pos,
                        total: st.end,
                        reason: "response ended early".into(),
                        tries: 1,
                    },
                };
                st.body = None;
                if let Err(e) = st.resume(broken).await {
                    // An early end on the last host ends the stream, as it did
                    // before mirrors: the caller sees the bytes are short.
                    if matches!(e, OciError::Interrupted { .. }) {
                        return None;
                    }
                    return Some((Err(e), st));
                }
            }
        }))
    }

    /// Open the rest (`pos..end`) on the hosts after the current one; the
    /// error that broke the current one when none can.
    async fn resume(&mut self, broken: OciError) -> Result<()> {
        let mut err = broken;
        while self.host + 1 < self.eps.len() {
            let ep = &self.eps[self.host];
            tracing::warn!(what = %self.what, host = %ep.label(), at = self.pos, error = %err, "host failed mid-download; resuming from the next one");
            self.client.note_failure(ep, &err);
            self.host += 1;
            let ep = &self.eps[self.host];
            let to = self.end.and_then(|e| e.checked_sub(1));
            match self
                .client
                .open_range_at(&self.what, &self.repo, ep, &self.digest, self.pos, to)
                .await
            {
                Ok((ranged, _, resp)) => {
                    self.skip = if ranged { 0 } else { self.pos };
                    self.body = Some(Box::pin(resp.bytes_stream()));
                    return Ok(());
                }
                Err(e) => err = e,
            }
        }
        Err(err)
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

    use crate::hosts::is_loopback;

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

    /// A host that takes connections and never answers (as a SIGSTOPped
    /// registry does): given up after its tries, then failed at once
    /// without being asked; once it answers again (any status), the probe
    /// closes its breaker and requests reach it. The assertions are on
    /// which error comes, not on times.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_host_that_stops_answering_fails_fast_then_is_probed_back() {
        // Connections land in the backlog; nobody reads them yet.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = RegistryClient::new(ClientConfig {
            stall_timeout: Duration::from_millis(200),
            max_attempts: 2,
            ..ClientConfig::default()
        })
        .unwrap();
        let r: Reference = format!("127.0.0.1:{port}/x/y:latest").parse().unwrap();
        let e = client.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, OciError::NoAnswer { tries: 2, .. }), "{e}");
        let e = client.get_manifest(&r).await.unwrap_err();
        assert!(matches!(e, OciError::Unreachable { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains(&format!("registry 127.0.0.1:{port} unreachable for "))
                && msg.contains("(network failure: no answer within "),
            "{msg}"
        );

        // The host answers again: every request gets a 404.
        answer_404(listener);
        let mut unreachable = 0;
        loop {
            match client.get_manifest(&r).await {
                Err(OciError::Unreachable { .. }) => unreachable += 1,
                Err(OciError::NotFound { .. }) => break,
                other => panic!("{:?}", other.map(|m| m.digest)),
            }
            assert!(unreachable < 300, "the probe never closed the breaker");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A new listener whose every request gets a 404; its port.
    fn answering_404() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        answer_404(listener);
        port
    }

    /// Answer every request on `listener` with a 404, from now on.
    fn answer_404(listener: std::net::TcpListener) {
        use std::io::{Read, Write};
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut c) = conn else { return };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while matches!(c.read(&mut buf), Ok(n) if n > 0) {
                        let answer = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n";
                        if c.write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// A mirror that stops answering is given up on once; after that its
    /// open breaker leaves it out: requests go straight to the registry,
    /// and the mirror is not connected to again (until its probe).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_mirror_known_down_is_passed_over_without_a_connection() {
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mirror = silent.local_addr().unwrap().port();
        let upstream = answering_404();
        let registry = format!("127.0.0.1:{upstream}");
        let mut hosts = Hosts::default();
        hosts
            .add_mirror(&registry, &format!("http://127.0.0.1:{mirror}"))
            .unwrap();
        let client = RegistryClient::new(ClientConfig {
            stall_timeout: Duration::from_millis(200),
            hosts,
            ..ClientConfig::default()
        })
        .unwrap();
        let repo = format!("{registry}/x/y:latest")
            .parse::<Reference>()
            .unwrap()
            .repository;
        let digest = Digest::sha256_of(b"nothing");
        // Connections the mirror's backlog holds (accepted here, unread).
        silent.set_nonblocking(true).unwrap();
        let drain = || std::iter::from_fn(|| silent.accept().ok()).count();

        let e = client.fetch_blob(&repo, &digest, None, 1024).await;
        assert!(matches!(e, Err(OciError::NotFound { .. })), "{e:?}");
        assert!(drain() > 0, "the mirror was asked first");
        let e = client.fetch_blob(&repo, &digest, None, 1024).await;
        assert!(matches!(e, Err(OciError::NotFound { .. })), "{e:?}");
        assert_eq!(drain(), 0, "the mirror known down was not asked again");
    }

    #[test]
    fn backoff_grows_and_is_bounded() {
        assert!(backoff(1) > backoff(0));
        assert!(backoff(30) <= Duration::from_millis(200 * 64));
    }
}
