//! Which hosts a request tries and in what order: mirrors first, hosts that
//! failed recently after the others, hosts known to be down left out; and
//! what a failure of one host does to the next requests.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::digest::Digest;
use crate::error::{OciError, Result};
use crate::hosts::{Endpoint, Purpose};
use crate::reference::Repository;
use crate::retry::RetryPolicy;

use super::RegistryClient;

/// How long a host that failed is tried after the others.
const FAILED_HOST_PENALTY: Duration = Duration::from_secs(30);
/// Attempts per request on a mirror before moving on to the next host (the
/// upstream registry gets `max_attempts`): a mirror that fails twice is not
/// waited for.
pub(super) const MIRROR_ATTEMPTS: u32 = 2;

/// Whether an error from one host sends the request to the next host: a
/// fault of that host (unreachable, busy, missing content, bad content), not
/// of this process (a consumer gone, a local file).
pub(super) fn fails_over(e: &OciError) -> bool {
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

/// How long a warm-up request may take before it is dropped.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(10);

/// The first answer to a [`RegistryClient::warm_up`]'s requests.
pub struct WarmUp(Arc<tokio::sync::Notify>);

impl WarmUp {
    /// Resolves once one of the warm-ups was answered (an answer that came
    /// before this is awaited counts); never when none was (none sent, or
    /// every one failed).
    pub async fn answered(self) {
        self.0.notified().await
    }
}

/// Whether an error says the host is down (rather than missing one item).
fn host_is_down(e: &OciError) -> bool {
    match e {
        OciError::Http { .. } | OciError::NoAnswer { .. } | OciError::Interrupted { .. } => true,
        OciError::Status { status, .. } => *status >= 500,
        _ => false,
    }
}

impl RegistryClient {
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

    /// The host's API root (`/v2/`): what a probe or a warm-up asks for.
    fn api_root(ep: &Endpoint) -> std::result::Result<url::Url, url::ParseError> {
        url::Url::parse(&format!(
            "{}://{}{}/",
            ep.scheme,
            ep.host,
            ep.path.trim_end_matches('/')
        ))
    }

    /// Open `n` connections to the host that serves `repo` first, in the
    /// background, each with a `GET /v2/` whose answer is thrown away: a
    /// start that is about to send `n` requests at once then finds them
    /// connected (and through TLS) instead of paying a handshake's round
    /// trips first. Over HTTP/2 the requests share one connection. Nothing
    /// happens outside a tokio runtime or without a usable host. The
    /// [`WarmUp`] says when the first of them is answered: how far the
    /// host is, apart from the work any other request costs it.
    pub fn warm_up(&self, repo: &Repository, purpose: Purpose, n: usize) -> WarmUp {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return WarmUp(Default::default());
        };
        let Some(ep) = self
            .endpoints(repo, purpose)
            .ok()
            .and_then(|e| e.into_iter().next())
        else {
            return WarmUp(Default::default());
        };
        let (Ok(http), Ok(root)) = (self.http_for(&ep), Self::api_root(&ep)) else {
            return WarmUp(Default::default());
        };
        let answered = Arc::new(tokio::sync::Notify::new());
        for _ in 0..n {
            let (http, root, answered) = (http.clone(), root.clone(), answered.clone());
            rt.spawn(async move {
                let warm = async {
                    if let Ok(r) = http.get(root).send().await {
                        // Kept as a permit until awaited.
                        answered.notify_one();
                        // Read to the end, so the connection goes back to the pool.
                        let _ = r.bytes().await;
                    }
                };
                let _ = tokio::time::timeout(WARM_UP_TIMEOUT, warm).await;
            });
        }
        WarmUp(answered)
    }

    pub(super) fn host_key(ep: &Endpoint) -> String {
        format!("{}://{}", ep.scheme, ep.host)
    }

    pub(super) fn note_failure(&self, ep: &Endpoint, e: &OciError) {
        if host_is_down(e) {
            self.failed
                .lock()
                .unwrap()
                .insert(Self::host_key(ep), Instant::now() + FAILED_HOST_PENALTY);
        }
    }

    /// `ep` failed with `e` after all its tries: a network failure opens its
    /// breaker (and starts the probe that closes it).
    pub(super) fn gave_up(&self, ep: &Endpoint, e: &OciError) {
        let key = Self::host_key(ep);
        if self.breakers.trip(&key, e) {
            match (self.http_for(ep), Self::api_root(ep)) {
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

    /// The retry policy for one request on `ep`: a mirror gets fewer tries.
    pub(super) fn retry_for(&self, ep: &Endpoint) -> RetryPolicy {
        if ep.mirror {
            self.retry
                .with_attempts(self.retry.attempts().min(MIRROR_ATTEMPTS))
        } else {
            self.retry
        }
    }

    /// Run `at` on each host for `purpose` in turn until one succeeds; a
    /// failure of a host that is not the last is logged (naming it) and the
    /// next is tried; the last host's error is returned.
    pub(super) async fn on_hosts<T, F, Fut>(
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

    /// The upstream registry, the only host pushes go to.
    pub(super) fn push_host(&self, repo: &Repository) -> Result<Endpoint> {
        let eps = self
            .cfg
            .hosts
            .endpoints(repo, Purpose::Push, &self.cfg.insecure_registries)?;
        Ok(eps.into_iter().last().expect("at least one host"))
    }
}
