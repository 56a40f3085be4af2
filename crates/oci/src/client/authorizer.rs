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

/// Where the Authorization header values for one request are kept. Per
/// host: a mirror answers its own challenges.
pub(super) struct AuthKeys {
    /// Bearer tokens: by host and scopes.
    scoped: String,
    /// Basic credentials: by host.
    host: String,
}

impl AuthKeys {
    pub(super) fn new(ep: &Endpoint, scopes: &[String]) -> AuthKeys {
        AuthKeys {
            scoped: format!("{} {}", ep.host, scopes.join(" ")),
            host: ep.host.clone(),
        }
    }
}

impl RegistryClient {
    /// The Authorization header value known for a request, if any.
    pub(super) fn cached_authorization(&self, keys: &AuthKeys) -> Option<String> {
        let t = self.tokens.lock().unwrap();
        t.get(&keys.scoped).or_else(|| t.get(&keys.host)).cloned()
    }

    /// Keep `header` (from [`RegistryClient::authenticate`]) for the next
    /// requests: a token for these scopes, Basic for the whole host.
    pub(super) fn remember_authorization(&self, keys: &AuthKeys, header: String) {
        let key = if header.starts_with("Basic ") {
            keys.host.clone()
        } else {
            keys.scoped.clone()
        };
        self.tokens.lock().unwrap().insert(key, header);
    }

    /// The error for a request refused (401 after authenticating, or 403),
    /// with a hint on the credentials.
    pub(super) fn refused(
        &self,
        what: &str,
        repo: &Repository,
        ep: &Endpoint,
        status: reqwest::StatusCode,
    ) -> OciError {
        let hint = if self.credential(repo, ep).is_none() {
            format!("; no credentials for {} in the auth files", ep.label())
        } else {
            "; the credentials in the auth files were refused".to_string()
        };
        OciError::Unauthorized {
            what: what.into(),
            registry: ep.label().to_string(),
            status: status.as_u16(),
            hint,
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hosts::Purpose;
    use crate::ClientConfig;

    fn endpoint(registry: &str) -> Endpoint {
        let repo = Repository {
            registry: registry.into(),
            name: "team/app".into(),
        };
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        client.endpoints(&repo, Purpose::Pull).unwrap().remove(0)
    }

    #[test]
    fn a_token_serves_its_scopes_on_its_host_only() {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        let push = [RegistryClient::push_scope(&a)];
        client.remember_authorization(&AuthKeys::new(&a, &pull), "Bearer t1".into());
        let cached = |ep: &Endpoint, scopes: &[String]| {
            client.cached_authorization(&AuthKeys::new(ep, scopes))
        };
        assert_eq!(cached(&a, &pull).as_deref(), Some("Bearer t1"));
        assert_eq!(cached(&a, &push), None);
        assert_eq!(cached(&endpoint("b.example"), &pull), None);
    }

    #[test]
    fn basic_credentials_serve_every_scope_of_their_host() {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        let push = [RegistryClient::push_scope(&a)];
        client.remember_authorization(&AuthKeys::new(&a, &pull), "Basic dTpw".into());
        let cached = |ep: &Endpoint, scopes: &[String]| {
            client.cached_authorization(&AuthKeys::new(ep, scopes))
        };
        assert_eq!(cached(&a, &push).as_deref(), Some("Basic dTpw"));
        assert_eq!(cached(&endpoint("b.example"), &push), None);
        // A token for the exact scopes is preferred to the host's Basic.
        client.remember_authorization(&AuthKeys::new(&a, &push), "Bearer t2".into());
        assert_eq!(cached(&a, &push).as_deref(), Some("Bearer t2"));
    }

    #[test]
    fn a_refusal_says_whether_credentials_were_there() {
        let ep = endpoint("a.example");
        let repo = Repository {
            registry: "a.example".into(),
            name: "team/app".into(),
        };
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let e = client.refused("manifest", &repo, &ep, reqwest::StatusCode::FORBIDDEN);
        assert_eq!(
            e.to_string(),
            "manifest: access denied by a.example (403); no credentials for a.example in the auth files"
        );
    }
}
