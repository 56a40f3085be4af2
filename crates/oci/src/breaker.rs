//! Per-host circuit breakers. Once the client has given up on a host for a
//! network reason (refused or broken connections, no answer, a stalled
//! download, after all its tries), the host's breaker opens: requests to it
//! fail at once, naming the host, how long it has been down and why, instead
//! of each costing a reader another full round of tries. Mirrors are passed
//! over for the next host meanwhile. A probe (`GET` of the API root, every
//! [`PROBE_INTERVAL`]) is the one request let through while it is open
//! (half-open); any HTTP answer closes the breaker, and so does any answer
//! to a request that was already on its way.
//!
//! Error statuses and bad bytes (404, 5xx, digest mismatches) never open a
//! breaker: the host answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::OciError;

/// How often an open breaker's host is probed.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a probe waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What is known of a host that is down.
#[derive(Debug, Clone)]
struct Open {
    since: Instant,
    /// Why the last try (a request, or a probe) failed.
    cause: String,
    next_probe: Instant,
}

/// The breakers of every host a client speaks to, by host key
/// (`scheme://host[:port]`). Shared by the client's clones.
#[derive(Debug, Clone, Default)]
pub(crate) struct Breakers {
    open: Arc<Mutex<HashMap<String, Open>>>,
}

/// Whether `e`, the error a host gave after all its tries, says the host
/// cannot be reached (rather than that it answered badly).
pub(crate) fn trips(e: &OciError) -> bool {
    matches!(
        e,
        OciError::Http { .. } | OciError::NoAnswer { .. } | OciError::Interrupted { .. }
    )
}

impl Breakers {
    /// Ok when requests may go to `host`; else the error to give at once.
    pub fn admit(&self, host: &str, what: &str, registry: &str) -> Result<(), OciError> {
        let open = self.open.lock().unwrap();
        let Some(o) = open.get(host) else {
            return Ok(());
        };
        let now = Instant::now();
        Err(OciError::Unreachable {
            what: what.to_string(),
            registry: registry.to_string(),
            down_for: now.saturating_duration_since(o.since),
            cause: o.cause.clone(),
            retry_in: o.next_probe.saturating_duration_since(now),
        })
    }

    pub fn is_open(&self, host: &str) -> bool {
        self.open.lock().unwrap().contains_key(host)
    }

    /// `host` failed with `e` after its tries: open its breaker if `e` is a
    /// network failure. True when it was closed before (the caller starts
    /// the probe).
    pub fn trip(&self, host: &str, e: &OciError) -> bool {
        if !trips(e) {
            return false;
        }
        let cause = short_cause(e);
        let mut open = self.open.lock().unwrap();
        if let Some(o) = open.get_mut(host) {
            o.cause = cause;
            return false;
        }
        tracing::warn!(%host, error = %e, "registry host unreachable: failing its requests at once until a probe finds it back");
        let now = Instant::now();
        open.insert(
            host.to_string(),
            Open {
                since: now,
                cause,
                next_probe: now + PROBE_INTERVAL,
            },
        );
        true
    }

    /// `host` answered (a request or a probe): its breaker closes.
    pub fn close(&self, host: &str) {
        if let Some(o) = self.open.lock().unwrap().remove(host) {
            tracing::warn!(%host, down_for = ?o.since.elapsed(), "registry host answers again");
        }
    }

    fn probe_failed(&self, host: &str, cause: String) {
        if let Some(o) = self.open.lock().unwrap().get_mut(host) {
            o.cause = cause;
            o.next_probe = Instant::now() + PROBE_INTERVAL;
        }
    }

    /// Probe `root` (the host's API root) every [`PROBE_INTERVAL`] until it
    /// answers or the breaker closes otherwise; on the current tokio runtime.
    /// Ends on its own when every client sharing these breakers is gone.
    pub fn start_probe(&self, host: &str, http: reqwest::Client, root: url::Url) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            // No runtime to probe from: the next request after the interval
            // finds the breaker as it is; close it by hand then.
            self.open.lock().unwrap().remove(host);
            return;
        };
        let weak: Weak<Mutex<HashMap<String, Open>>> = Arc::downgrade(&self.open);
        let host = host.to_string();
        rt.spawn(async move {
            loop {
                tokio::time::sleep(PROBE_INTERVAL).await;
                let Some(open) = weak.upgrade() else { return };
                let breakers = Breakers { open };
                if !breakers.is_open(&host) {
                    return;
                }
                match tokio::time::timeout(PROBE_TIMEOUT, http.get(root.clone()).send()).await {
                    Ok(Ok(resp)) => {
                        tracing::debug!(%host, status = %resp.status(), "probe answered");
                        breakers.close(&host);
                        return;
                    }
                    Ok(Err(e)) => breakers
                        .probe_failed(&host, lazylayer_sys::error::error_chain_without_repeats(&e)),
                    Err(_) => breakers.probe_failed(
                        &host,
                        format!("no answer to a probe within {} s", PROBE_TIMEOUT.as_secs()),
                    ),
                }
            }
        });
    }
}

/// The part of a host's error that says why it is down (without the item
/// it was fetching, which the next error names itself).
fn short_cause(e: &OciError) -> String {
    match e {
        OciError::Http { source, .. } => lazylayer_sys::error::error_chain_without_repeats(source),
        OciError::NoAnswer { secs, tries, .. } => {
            format!("no answer within {secs:.0} s, {tries} tries")
        }
        OciError::Interrupted { reason, tries, .. } => {
            format!("download broken ({reason}), {tries} tries")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_answer() -> OciError {
        OciError::NoAnswer {
            what: "blob sha256:ab of r/x".into(),
            registry: "127.0.0.1:5000".into(),
            secs: 2.0,
            tries: 5,
        }
    }

    #[test]
    fn network_failures_open_and_answers_close() {
        let b = Breakers::default();
        let host = "http://127.0.0.1:5000";
        assert!(b.admit(host, "x", "127.0.0.1:5000").is_ok());
        assert!(b.trip(host, &no_answer()), "opened");
        assert!(!b.trip(host, &no_answer()), "already open");
        let e = b
            .admit(host, "blob sha256:cd of r/x", "127.0.0.1:5000")
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("blob sha256:cd of r/x: registry 127.0.0.1:5000 unreachable for 0 s (network failure: no answer within 2 s, 5 tries); next probe in "),
            "{msg}"
        );
        assert!(
            b.admit("http://127.0.0.1:5001", "x", "y").is_ok(),
            "per host"
        );
        b.close(host);
        assert!(b.admit(host, "x", "y").is_ok());
    }

    #[test]
    fn answers_that_are_errors_do_not_open() {
        let b = Breakers::default();
        let host = "http://127.0.0.1:5000";
        for e in [
            OciError::NotFound {
                what: "x".into(),
                registry: "r".into(),
                status: 404,
            },
            OciError::Status {
                what: "x".into(),
                registry: "r".into(),
                status: 503,
                body: String::new(),
            },
            OciError::DigestMismatch {
                what: "x".into(),
                expected: crate::Digest::sha256_of(b"a"),
                actual: crate::Digest::sha256_of(b"b"),
            },
        ] {
            assert!(!b.trip(host, &e), "{e}");
            assert!(b.admit(host, "x", "y").is_ok(), "{e}");
        }
    }
}
