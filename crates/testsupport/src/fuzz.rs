//! The bounded fuzz harness every decoder of outside input runs under
//! `cargo test` (issue #19): proptest strategies generate structured but
//! corrupted inputs, and a panic in the decoder is a failing case that
//! proptest reports with its (shrunk) input.
//!
//! `LAZYLAYER_FUZZ_CASES` sets the cases per decoder (default
//! [`DEFAULT_CASES`], a share that keeps every harness to seconds in a debug
//! build); `LAZYLAYER_FUZZ_SEED` (a u64) picks the seed, printed on failure
//! so a failing run replays exactly.

use std::time::Instant;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

/// Cases per decoder when `LAZYLAYER_FUZZ_CASES` is unset.
pub const DEFAULT_CASES: u32 = 2000;

/// Seed when `LAZYLAYER_FUZZ_SEED` is unset: fixed, so `cargo test` is
/// deterministic; set another to explore.
pub const DEFAULT_SEED: u64 = 19;

fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}

/// Cases per decoder for this run.
pub fn cases() -> u32 {
    env_number("LAZYLAYER_FUZZ_CASES", u64::from(DEFAULT_CASES))
        .try_into()
        .expect("LAZYLAYER_FUZZ_CASES fits a u32")
}

/// Run `check` on [`cases`] inputs drawn from `inputs`, deterministically
/// for the seed. Fails (naming the decoder, the seed and the input) when a
/// check fails or panics; prints the case count and the time taken.
pub fn fuzz<S: Strategy>(
    decoder: &str,
    inputs: S,
    check: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let seed = env_number("LAZYLAYER_FUZZ_SEED", DEFAULT_SEED);
    let cases = cases();
    let mut seed_bytes = [0u8; 32];
    seed_bytes[..8].copy_from_slice(&seed.to_le_bytes());
    let config = Config {
        cases,
        // Failures are reported with their seed, not stored in files.
        failure_persistence: None,
        // Every case is a new input: rejecting is never how a strategy
        // here filters, so a global reject limit would only hide bugs.
        max_global_rejects: cases,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        TestRng::from_seed(RngAlgorithm::ChaCha, &seed_bytes),
    );
    let started = Instant::now();
    if let Err(e) = runner.run(&inputs, check) {
        panic!("fuzz {decoder}: LAZYLAYER_FUZZ_SEED={seed} LAZYLAYER_FUZZ_CASES={cases}: {e}");
    }
    eprintln!(
        "fuzz {decoder}: {cases} cases in {:.2?} (seed {seed})",
        started.elapsed()
    );
}
