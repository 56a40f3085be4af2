//! The HTTP clients: one shared, and one per set of TLS settings a host
//! asks for (skip_verify, extra CAs), built once and kept.

use std::path::PathBuf;
use std::time::Duration;

use crate::error::{OciError, Result};
use crate::hosts::Endpoint;

use super::{ClientConfig, RegistryClient};

/// A host's TLS settings: skip_verify, extra CA files.
pub(super) type TlsKey = (bool, Vec<PathBuf>);

/// How long an idle pooled connection to a registry is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

impl RegistryClient {
    pub(super) fn builder(cfg: &ClientConfig) -> reqwest::ClientBuilder {
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

    /// The HTTP client for `ep`: the shared one, or one with the host's own
    /// TLS settings (built on first use and kept).
    pub(super) fn http_for(&self, ep: &Endpoint) -> Result<reqwest::Client> {
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
}
