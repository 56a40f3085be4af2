//! The HTTP clients: one shared, and one per set of TLS settings a host
//! asks for (skip_verify, extra CAs), built once and kept.
//!
//! The shared client verifies servers against the system's trust store, as
//! reqwest's default does, but reads that store on the first TLS handshake
//! instead of when the client is built: reading it (145 files in
//! /etc/ssl/certs) took 30-60 ms of a cold start, which a registry spoken
//! to over plain HTTP never needs, and which an HTTPS one pays after its
//! TCP handshake rather than before the first request is sent.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};

use crate::error::{OciError, Result};
use crate::hosts::Endpoint;

use super::{ClientConfig, RegistryClient};

/// A host's TLS settings: skip_verify, extra CA files.
pub(super) type TlsKey = (bool, Vec<PathBuf>);

/// How long an idle pooled connection to a registry is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// The platform verifier, built on first use.
#[derive(Debug)]
struct LazyPlatformVerifier {
    provider: Arc<CryptoProvider>,
    inner: OnceLock<Result<rustls_platform_verifier::Verifier, rustls::Error>>,
}

impl LazyPlatformVerifier {
    fn get(&self) -> Result<&rustls_platform_verifier::Verifier, rustls::Error> {
        self.inner
            .get_or_init(|| rustls_platform_verifier::Verifier::new(self.provider.clone()))
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl ServerCertVerifier for LazyPlatformVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.get()?
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.get()?.verify_tls13_signature(message, cert, dss)
    }

    /// What the platform verifier answers, without building it: the
    /// provider's schemes (it verifies with that provider).
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl RegistryClient {
    /// The shared client: the system's trust store, read on first use.
    pub(super) fn shared_client(cfg: &ClientConfig) -> Result<reqwest::Client> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(LazyPlatformVerifier {
            provider: provider.clone(),
            inner: OnceLock::new(),
        });
        let built = |e: rustls::Error| OciError::Config {
            path: String::new(),
            reason: format!("TLS settings: {e}"),
        };
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(built)?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        // As reqwest sets it for its own: HTTP/2 where the registry offers it.
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::builder(cfg)
            .tls_backend_preconfigured(tls)
            .build()
            .map_err(|e| OciError::Http {
                what: "creating HTTP client".into(),
                registry: String::new(),
                source: e,
            })
    }

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
