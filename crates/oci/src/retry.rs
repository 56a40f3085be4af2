//! How often and after what pause a failed registry request is tried again:
//! one policy for manifest, config, blob and range reads (and for anyone
//! else fetching from a registry, such as the boot-chunk fetcher).
//!
//! The pause doubles with each attempt up to a cap, and is drawn at random
//! between half and all of that value ("equal jitter"): clients that failed
//! together (a registry restart, a burst of starts) do not come back
//! together, while every pause still grows with the attempt.

use std::time::Duration;

/// Attempts and pauses for retrying a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    base: Duration,
    max: Duration,
    attempts: u32,
}

impl Default for RetryPolicy {
    /// 5 attempts; pauses from 200 ms up to 12.8 s (the bounds the client
    /// has always used).
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(200),
            max: Duration::from_millis(200 * 64),
            attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// A policy pausing at most `base` after the first failure, doubling
    /// up to `max`, and giving up after `attempts` (at least 1).
    pub fn new(base: Duration, max: Duration, attempts: u32) -> RetryPolicy {
        RetryPolicy {
            base,
            max: max.max(base),
            attempts: attempts.max(1),
        }
    }

    /// The same pauses with another attempt budget (at least 1).
    pub fn with_attempts(self, attempts: u32) -> RetryPolicy {
        RetryPolicy {
            attempts: attempts.max(1),
            ..self
        }
    }

    /// How many times a request is sent in all (the first try included).
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Whether a request that failed on try `attempt` (0: the first) may be
    /// sent again.
    pub fn allows_another(&self, attempt: u32) -> bool {
        attempt.saturating_add(1) < self.attempts
    }

    /// The pause after failed try `attempt` (0: the first), with jitter
    /// from the thread's random generator.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_with(attempt, &mut fastrand::Rng::new())
    }

    /// [`RetryPolicy::delay`] drawing from `rng` (seeded in tests).
    pub fn delay_with(&self, attempt: u32, rng: &mut fastrand::Rng) -> Duration {
        let ceiling = self.ceiling(attempt);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(rng.u64(0..=spread))
    }

    /// The longest pause after try `attempt`: `base` doubled `attempt`
    /// times, at most `max`.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        // 2^31 times any base is past any sensible cap; min() keeps the
        // shift defined.
        let factor = 1u32 << attempt.min(31);
        self.base.saturating_mul(factor).min(self.max)
    }
}

#[cfg(test)]
mod tests;
