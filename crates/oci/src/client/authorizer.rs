//! The token flow: answering a 401 with Basic credentials or a Bearer
//! token from the realm the registry names (challenge parsing and the
//! credential store are in `crate::auth`). Bearer tokens are also kept
//! across processes when the client has a token directory
//! ([`super::token_cache`]).

use std::time::SystemTime;

use reqwest::header::{HeaderMap, AUTHORIZATION, WWW_AUTHENTICATE};

use crate::auth::parse_challenge;
use crate::error::{OciError, Result};
use crate::hosts::Endpoint;
use crate::reference::Repository;

use super::status::header_text;
use super::token_cache::{token_expiry, CredentialId};
use super::RegistryClient;

/// A bearer token response is a small JSON object; refuse anything larger.
const MAX_TOKEN_BYTES: u64 = 1 << 20;

/// An Authorization header value, and for a bearer token when it stops
/// being sent (None: until the registry refuses it).
#[derive(Debug, Clone)]
pub(super) struct Authorization {
    pub(super) header: String,
    pub(super) expires: Option<SystemTime>,
}

impl Authorization {
    fn usable_at(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|e| now < e)
    }

    pub(super) fn is_bearer(header: &str) -> bool {
        header.starts_with("Bearer ")
    }
}

/// Where the Authorization header values for one request are kept. Per
/// host: a mirror answers its own challenges.
pub(super) struct AuthKeys {
    /// Bearer tokens: by host and scopes (then by credential).
    scoped: String,
    /// Basic credentials: by host (then by credential).
    host: String,
    /// `scheme://host`, the endpoint actually spoken to, and the exact
    /// scopes: what tokens kept on disk are filed under.
    endpoint: String,
    scopes: Vec<String>,
}

impl AuthKeys {
    pub(super) fn new(ep: &Endpoint, scopes: &[String]) -> AuthKeys {
        AuthKeys {
            scoped: format!("{} {}", ep.host, scopes.join(" ")),
            host: ep.host.clone(),
            endpoint: RegistryClient::host_key(ep),
            scopes: scopes.to_vec(),
        }
    }
}

impl RegistryClient {
    /// The Authorization header value known for a request, if any: a
    /// valid token for its scopes (from this process, else from the token
    /// directory), else the host's Basic credentials.
    pub(super) fn cached_authorization(
        &self,
        keys: &AuthKeys,
        repo: &Repository,
        ep: &Endpoint,
    ) -> Option<String> {
        let now = SystemTime::now();
        // The credential is worked out only once something is kept for this
        // host or scope (never under the lock): it may run a credential
        // helper, which a registry that asks for nothing must not cost.
        let cred = std::cell::OnceCell::new();
        let cred_id = || {
            cred.get_or_init(|| CredentialId::of(self.credential(repo, ep).as_ref()))
                .clone()
        };
        let kept_for = |key: &str| {
            let t = self.tokens.lock().unwrap();
            t.get(key).is_some_and(|by_cred| !by_cred.is_empty())
        };
        if kept_for(&keys.scoped) {
            let id = cred_id();
            let t = self.tokens.lock().unwrap();
            let token = t.get(&keys.scoped).and_then(|by_cred| by_cred.get(&id));
            if let Some(a) = token.filter(|a| a.usable_at(now)) {
                return Some(a.header.clone());
            }
        }
        if let Some(cache) = &self.token_cache {
            let kept = cache.load(&keys.endpoint, &keys.scopes, now, cred_id);
            if let Some((token, expires)) = kept {
                let header = format!("Bearer {token}");
                let auth = Authorization {
                    header: header.clone(),
                    expires: Some(expires),
                };
                self.keep(&keys.scoped, cred_id(), auth);
                return Some(header);
            }
        }
        if !kept_for(&keys.host) {
            return None;
        }
        let id = cred_id();
        let t = self.tokens.lock().unwrap();
        let basic = t.get(&keys.host).and_then(|by_cred| by_cred.get(&id));
        basic.map(|a| a.header.clone())
    }

    /// Keep `auth` under `key` for the credential `cred` obtained it with.
    fn keep(&self, key: &str, cred: CredentialId, auth: Authorization) {
        let mut t = self.tokens.lock().unwrap();
        t.entry(key.to_string()).or_default().insert(cred, auth);
    }

    /// Keep `auth` (from [`RegistryClient::authenticate`]) for the next
    /// requests: a token for these scopes (in the token directory too, if
    /// any), Basic for the whole host; both only for the credential that
    /// obtained them, so that a repository's own credential (a pod's) never
    /// lends its access to another repository.
    pub(super) fn remember_authorization(
        &self,
        keys: &AuthKeys,
        repo: &Repository,
        ep: &Endpoint,
        auth: Authorization,
    ) {
        let cred = CredentialId::of(self.credential(repo, ep).as_ref());
        if !Authorization::is_bearer(&auth.header) {
            self.keep(&keys.host, cred, auth);
            return;
        }
        if let (Some(cache), Some(expires)) = (&self.token_cache, auth.expires) {
            let token = &auth.header["Bearer ".len()..];
            cache.store(&keys.endpoint, &keys.scopes, &cred, token, expires);
        }
        self.keep(&keys.scoped, cred, auth);
    }

    /// Drop the token kept for a request's scopes, here and on disk: the
    /// registry refused it (revoked, signing key rotated).
    pub(super) fn forget_token(&self, keys: &AuthKeys, repo: &Repository, ep: &Endpoint) {
        let cred = CredentialId::of(self.credential(repo, ep).as_ref());
        if let Some(by_cred) = self.tokens.lock().unwrap().get_mut(&keys.scoped) {
            by_cred.remove(&cred);
        }
        if let Some(cache) = &self.token_cache {
            cache.forget(&keys.endpoint, &keys.scopes, &cred);
        }
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
            "; the credentials for it were refused".to_string()
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
                .or_else(|| self.cfg.auth.get_for(repo))
        } else {
            self.cfg.auth.get_for(repo)
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
    ) -> Result<Authorization> {
        let auth_err = |reason: String| OciError::Auth {
            what: what.to_string(),
            reason,
        };
        let raw = header_text(headers, WWW_AUTHENTICATE)
            .ok_or_else(|| auth_err("401 without a WWW-Authenticate challenge".into()))?;
        let ch = parse_challenge(raw)
            .ok_or_else(|| auth_err(format!("unparseable challenge {raw:?}")))?;
        let cred = self.credential(repo, ep);
        match ch.scheme.as_str() {
            "basic" => cred
                .map(|c| Authorization {
                    header: c.basic_header(),
                    expires: None,
                })
                .ok_or_else(|| {
                    auth_err(format!(
                        "{} asks for a password and none is known for it (auth files, credential helpers, provider plugins)",
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
                    // Values, not numbers and strings: a field of another
                    // type must not cost the token, only its lifetime.
                    expires_in: Option<serde_json::Value>,
                    issued_at: Option<serde_json::Value>,
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
                let expires_in = t.expires_in.as_ref().and_then(|v| {
                    v.as_u64()
                        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                });
                let issued_at = t.issued_at.as_ref().and_then(|v| v.as_str());
                Ok(Authorization {
                    header: format!("Bearer {tok}"),
                    expires: token_expiry(SystemTime::now(), expires_in, issued_at),
                })
            }
            other => Err(auth_err(format!("unsupported auth scheme {other:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::hosts::Purpose;
    use crate::ClientConfig;

    fn repo(registry: &str) -> Repository {
        Repository {
            registry: registry.into(),
            name: "team/app".into(),
        }
    }

    fn endpoint(registry: &str) -> Endpoint {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        client
            .endpoints(&repo(registry), Purpose::Pull)
            .unwrap()
            .remove(0)
    }

    fn lasting(header: &str) -> Authorization {
        Authorization {
            header: header.into(),
            expires: None,
        }
    }

    /// What `client` would send to `ep` for `scopes`.
    fn cached(client: &RegistryClient, ep: &Endpoint, scopes: &[String]) -> Option<String> {
        client.cached_authorization(&AuthKeys::new(ep, scopes), &repo(&ep.registry), ep)
    }

    fn remember(client: &RegistryClient, ep: &Endpoint, scopes: &[String], auth: Authorization) {
        client.remember_authorization(&AuthKeys::new(ep, scopes), &repo(&ep.registry), ep, auth);
    }

    /// A credential helper (`credsStore`) runs only once something is kept
    /// for the host: a registry that asks for no credential costs no
    /// helper run before its first request.
    #[test]
    fn no_credential_helper_runs_while_nothing_is_kept_for_the_host() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let helper = d.path().join("docker-credential-rec");
        std::fs::write(
            &helper,
            format!(
                "#!/bin/sh\nread -r server\necho \"$server\" >> {}/asked\necho credentials not found >&2\nexit 1\n",
                d.path().display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = d.path().join("config.json");
        std::fs::write(&file, r#"{"credsStore":"rec"}"#).unwrap();
        let mut auth = crate::auth::AuthStore::load(&[file]);
        auth.helper_dir = Some(d.path().to_path_buf());
        let client = RegistryClient::new(ClientConfig {
            auth,
            ..ClientConfig::default()
        })
        .unwrap();
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        assert_eq!(cached(&client, &a, &pull), None);
        assert!(
            !d.path().join("asked").exists(),
            "the helper ran for nothing"
        );
        // Kept under the (absent) credential, and found under it.
        remember(&client, &a, &pull, lasting("Bearer t1"));
        assert_eq!(cached(&client, &a, &pull).as_deref(), Some("Bearer t1"));
    }

    /// A credential handed over for one repository (a pod's) is used for
    /// it, and what it obtained (Basic for the host, a token) is never sent
    /// for another repository of the same registry, which gets the files'
    /// credential or none.
    #[test]
    fn a_repository_credential_lends_nothing_to_its_neighbours() {
        let keychain = std::sync::Arc::new(crate::Keychain::default());
        let mut auth = crate::auth::AuthStore::default();
        auth.keychain = Some(keychain.clone());
        let client = RegistryClient::new(ClientConfig {
            auth,
            ..ClientConfig::default()
        })
        .unwrap();
        let mine = repo("reg.example");
        let theirs = Repository {
            registry: "reg.example".into(),
            name: "team/other".into(),
        };
        let ep_of = |r: &Repository| client.endpoints(r, Purpose::Pull).unwrap().remove(0);
        let (ep_mine, ep_theirs) = (ep_of(&mine), ep_of(&theirs));
        let alice = crate::auth::Credential {
            username: "alice".into(),
            password: "pw".into(),
        };
        keychain.put(&mine, alice.clone());
        assert_eq!(client.credential(&mine, &ep_mine), Some(alice.clone()));
        assert_eq!(client.credential(&theirs, &ep_theirs), None);

        let keys = |ep: &Endpoint| AuthKeys::new(ep, &[RegistryClient::pull_scope(ep)]);
        client.remember_authorization(
            &keys(&ep_mine),
            &mine,
            &ep_mine,
            lasting(&alice.basic_header()),
        );
        assert_eq!(
            client.cached_authorization(&keys(&ep_mine), &mine, &ep_mine),
            Some(alice.basic_header())
        );
        assert_eq!(
            client.cached_authorization(&keys(&ep_theirs), &theirs, &ep_theirs),
            None,
            "alice's Basic header went to another repository"
        );
        // Nor a token alice's credential obtained, should the scopes match.
        let scopes = [RegistryClient::pull_scope(&ep_mine)];
        client.remember_authorization(
            &AuthKeys::new(&ep_mine, &scopes),
            &mine,
            &ep_mine,
            lasting("Bearer alices"),
        );
        assert_eq!(
            client.cached_authorization(&AuthKeys::new(&ep_theirs, &scopes), &theirs, &ep_theirs),
            None
        );
    }

    #[test]
    fn a_token_serves_its_scopes_on_its_host_only() {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        let push = [RegistryClient::push_scope(&a)];
        remember(&client, &a, &pull, lasting("Bearer t1"));
        assert_eq!(cached(&client, &a, &pull).as_deref(), Some("Bearer t1"));
        assert_eq!(cached(&client, &a, &push), None);
        assert_eq!(cached(&client, &endpoint("b.example"), &pull), None);
    }

    #[test]
    fn basic_credentials_serve_every_scope_of_their_host() {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        let push = [RegistryClient::push_scope(&a)];
        remember(&client, &a, &pull, lasting("Basic dTpw"));
        assert_eq!(cached(&client, &a, &push).as_deref(), Some("Basic dTpw"));
        assert_eq!(cached(&client, &endpoint("b.example"), &push), None);
        // A token for the exact scopes is preferred to the host's Basic.
        remember(&client, &a, &push, lasting("Bearer t2"));
        assert_eq!(cached(&client, &a, &push).as_deref(), Some("Bearer t2"));
    }

    #[test]
    fn an_expired_token_is_not_sent() {
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        let past = SystemTime::now() - Duration::from_secs(1);
        remember(
            &client,
            &a,
            &pull,
            Authorization {
                header: "Bearer old".into(),
                expires: Some(past),
            },
        );
        assert_eq!(cached(&client, &a, &pull), None);
    }

    /// A token one client obtained is sent by the next client on the same
    /// directory (the next process), until the registry refuses it; Basic
    /// credentials are never written there.
    #[test]
    fn tokens_outlive_the_client_through_the_token_directory() {
        let d = tempfile::tempdir().unwrap();
        let cfg = ClientConfig {
            token_cache: Some(d.path().join("tokens")),
            ..ClientConfig::default()
        };
        let a = endpoint("a.example");
        let pull = [RegistryClient::pull_scope(&a)];
        let first = RegistryClient::new(cfg.clone()).unwrap();
        let soon = SystemTime::now() + Duration::from_secs(60);
        let granted = Authorization {
            header: "Bearer kept".into(),
            expires: Some(soon),
        };
        remember(&first, &a, &pull, granted);
        remember(&first, &a, &pull, lasting("Basic dTpw"));
        let second = RegistryClient::new(cfg.clone()).unwrap();
        assert_eq!(cached(&second, &a, &pull).as_deref(), Some("Bearer kept"));
        let text = std::fs::read_dir(d.path().join("tokens"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect::<String>();
        assert!(!text.contains("dTpw"), "{text}");
        second.forget_token(&AuthKeys::new(&a, &pull), &repo("a.example"), &a);
        assert_eq!(cached(&second, &a, &pull), None);
        let third = RegistryClient::new(cfg).unwrap();
        assert_eq!(cached(&third, &a, &pull), None);
    }

    #[test]
    fn a_refusal_says_whether_credentials_were_there() {
        let ep = endpoint("a.example");
        let client = RegistryClient::new(ClientConfig::default()).unwrap();
        let e = client.refused(
            "manifest",
            &repo("a.example"),
            &ep,
            reqwest::StatusCode::FORBIDDEN,
        );
        assert_eq!(
            e.to_string(),
            "manifest: access denied by a.example (403); no credentials for a.example in the auth files"
        );
    }
}
