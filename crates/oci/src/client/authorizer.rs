//! The token flow: answering a 401 with Basic credentials or a Bearer
//! token from the realm the registry names (challenge parsing and the
//! credential store are in `crate::auth`).

use reqwest::header::{HeaderMap, AUTHORIZATION, WWW_AUTHENTICATE};

use crate::auth::parse_challenge;
use crate::error::{OciError, Result};
use crate::hosts::Endpoint;
use crate::reference::Repository;

use super::RegistryClient;

/// A bearer token response is a small JSON object; refuse anything larger.
const MAX_TOKEN_BYTES: u64 = 1 << 20;

impl RegistryClient {
    /// The token scope for pulls of the repository as `ep` names it.
    pub(super) fn pull_scope(ep: &Endpoint) -> String {
        format!("repository:{}:pull", ep.name)
    }
    pub(super) fn push_scope(ep: &Endpoint) -> String {
        format!("repository:{}:pull,push", ep.name)
    }

    /// Credentials for `ep`: a mirror's own (by its host), else the
    /// registry's (a mirror in front of a private registry may pass them on).
    pub(super) fn credential(
        &self,
        repo: &Repository,
        ep: &Endpoint,
    ) -> Option<crate::auth::Credential> {
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
    pub(super) async fn authenticate(
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
}
