//! An OCI distribution-spec client: manifests, blobs (streamed, ranged,
//! resumable), pushes (monolithic, chunked, cross-repository mount) and the
//! token/basic auth dance. Plain HTTP is used for loopback hosts and hosts the
//! user names as insecure; TLS (rustls) everywhere else.
//!
//! One file per concept: `tls` (the HTTP clients per TLS settings),
//! `failover` (which hosts, in what order, what a failure does to them),
//! `request` (one request to one host: auth, retries), `authorizer` (the
//! 401 answer and the token flow), `token_cache` (bearer tokens kept on
//! disk for the next process), `status` (reading answers and their
//! errors), `resolver` (manifests), `blob` (whole blobs), `range` and
//! `resuming_body` (byte ranges), `multirange` (several in one response), `push`. The retry policy is
//! [`crate::retry`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::auth::AuthStore;
use crate::breaker::Breakers;
use crate::digest::{Digest, DigestHasher};
use crate::error::Result;
use crate::hosts::Hosts;
use crate::retry::RetryPolicy;

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
    /// A directory where bearer tokens are kept until they expire, so that
    /// the next process sends one with its first request (no 401 round
    /// trip); None: tokens live in this process only.
    pub token_cache: Option<PathBuf>,
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
            token_cache: None,
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
    /// Authorization header values by `host` + scope (bearer) or `host`
    /// (basic), then by the credential that obtained them.
    tokens: Arc<Mutex<HashMap<String, HashMap<CredentialId, Authorization>>>>,
    /// Bearer tokens kept across processes (`token_cache` of the config).
    token_cache: Option<Arc<TokenCache>>,
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
    /// Tries and pauses per request (`max_attempts` of the config).
    retry: RetryPolicy,
    /// Hosts that do not send several ranges in one response.
    no_multirange: multirange::NoMultirange,
}

impl RegistryClient {
    pub fn new(cfg: ClientConfig) -> Result<Self> {
        // reqwest is built without a default crypto provider so that the
        // slow-to-build aws-lc is not pulled in; ring is installed here.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = Self::shared_client(&cfg)?;
        let retry = RetryPolicy::default().with_attempts(cfg.max_attempts);
        let token_cache = cfg
            .token_cache
            .clone()
            .map(|dir| Arc::new(TokenCache::new(dir)));
        Ok(RegistryClient {
            http,
            cfg: Arc::new(cfg),
            tokens: Arc::new(Mutex::new(HashMap::new())),
            token_cache,
            tls_clients: Arc::new(Mutex::new(HashMap::new())),
            failed: Arc::new(Mutex::new(HashMap::new())),
            served_by: Arc::new(Mutex::new(HashMap::new())),
            breakers: Breakers::default(),
            retry,
            no_multirange: Default::default(),
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.cfg
    }
}

mod authorizer;
mod blob;
mod failover;
mod multirange;
mod push;
mod range;
mod request;
mod resolver;
mod resuming_body;
mod status;
mod tls;
mod token_cache;

pub use failover::WarmUp;
pub use multirange::RangeParts;

use authorizer::Authorization;
use tls::TlsKey;
use token_cache::{CredentialId, TokenCache};

#[cfg(test)]
mod tests;
