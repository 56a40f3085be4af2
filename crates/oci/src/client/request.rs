//! One request to one host: auth challenges answered, transient failures
//! retried, a host that stops answering given up on.

use std::time::Duration;

use reqwest::header::AUTHORIZATION;
use reqwest::{RequestBuilder, Response, StatusCode};

use crate::error::{OciError, Result};
use crate::hosts::Endpoint;
use crate::reference::Repository;

use super::authorizer::{AuthKeys, Authorization};
use super::status::retryable_status;
use super::RegistryClient;

impl RegistryClient {
    /// Send a request built by `build` to `ep`, answering auth challenges
    /// and retrying transient failures. `build` is called once per attempt,
    /// so bodies must be re-creatable. Non-idempotent requests are retried
    /// only when the connection failed before anything was sent. An
    /// idempotent request whose answer does not come within the stall
    /// timeout is a stalled registry too: tried again, then given up.
    pub(super) async fn send(
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
    pub(super) async fn send_within(
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
        let retry = self.retry_for(ep);
        let keys = AuthKeys::new(ep, scopes);
        let mut authed = false;
        let mut attempt = 0;
        loop {
            // A host known to be down (given up on by this request or another
            // meanwhile) costs nothing but this error.
            self.breakers.admit(&host_key, what, &registry)?;
            let cached = self.cached_authorization(&keys, repo, ep);
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
                    Err(_) if retry.allows_another(attempt) => {
                        tracing::warn!(%what, host = %registry, attempt, "no answer for {:.0} s, retrying", limit.as_secs_f64());
                        tokio::time::sleep(retry.delay(attempt)).await;
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
                    if cached.as_deref().is_some_and(Authorization::is_bearer) {
                        // Refused (revoked, expired early, the registry's
                        // key rotated): never sent again, here or by the
                        // next process.
                        tracing::debug!(%what, host = %registry, "bearer token refused, asking for a new one");
                        self.forget_token(&keys, repo, ep);
                    }
                    let auth = self
                        .authenticate(what, repo, ep, &http, scopes, resp.headers())
                        .await?;
                    self.remember_authorization(&keys, repo, ep, auth);
                }
                Ok(resp)
                    if retryable_status(resp.status())
                        && retry.allows_another(attempt)
                        && idempotent =>
                {
                    tracing::warn!(%what, host = %registry, status = %resp.status(), attempt, "registry busy, retrying");
                    tokio::time::sleep(retry.delay(attempt)).await;
                    attempt += 1;
                }
                Ok(resp) => {
                    if resp.status() == StatusCode::UNAUTHORIZED
                        || resp.status() == StatusCode::FORBIDDEN
                    {
                        return Err(self.refused(what, repo, ep, resp.status()));
                    }
                    return Ok(resp);
                }
                Err(e) if retry.allows_another(attempt) && (idempotent || e.is_connect()) => {
                    tracing::warn!(%what, host = %registry, error = %e, attempt, "request failed, retrying");
                    tokio::time::sleep(retry.delay(attempt)).await;
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
}
