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

/// One fixed-position little-endian integer of a binary encoding.
#[derive(Debug, Clone, Copy)]
pub struct Field {
    pub at: usize,
    /// 1, 2, 4 or 8 bytes.
    pub width: usize,
}

impl Field {
    pub fn new(at: usize, width: usize) -> Field {
        Field { at, width }
    }

    pub fn max(&self) -> u64 {
        u64::MAX >> (64 - 8 * self.width)
    }

    /// The value at this field; `None` where `bytes` is too short.
    pub fn read(&self, bytes: &[u8]) -> Option<u64> {
        let raw = bytes.get(self.at..self.at + self.width)?;
        let mut a = [0u8; 8];
        a[..self.width].copy_from_slice(raw);
        Some(u64::from_le_bytes(a))
    }

    /// Store `v` (cut to the width); nothing where `bytes` is too short.
    pub fn write(&self, bytes: &mut [u8], v: u64) {
        if let Some(raw) = bytes.get_mut(self.at..self.at + self.width) {
            raw.copy_from_slice(&v.to_le_bytes()[..self.width]);
        }
    }
}

/// Values on a decoder's boundaries for `field` of `bytes`: 0, 1, the
/// maximum and its neighbours, the current value's neighbours, lengths near
/// the input's and its body's (without a `trailer`-byte checksum) and, for
/// each of `related` (offsets and lengths the field is added to), the value
/// that makes the sum reach the maximum: where unchecked additions wrap.
pub fn edge_values(bytes: &[u8], field: Field, trailer: usize, related: &[u64]) -> Vec<u64> {
    let max = field.max();
    let orig = field.read(bytes).unwrap_or(0);
    let len = bytes.len() as u64;
    let body = len.saturating_sub(trailer as u64);
    let mut v = vec![
        0,
        1,
        2,
        max,
        max - 1,
        max / 2 + 1,
        orig.wrapping_add(1),
        orig.wrapping_sub(1),
        orig.wrapping_add(32),
        max.wrapping_sub(orig),
        len,
        len + 1,
        body,
        body.saturating_sub(1),
        body.saturating_sub(32),
    ];
    for &r in related {
        v.extend([max.wrapping_sub(r), max.wrapping_sub(r).wrapping_sub(16)]);
    }
    v.iter_mut().for_each(|x| *x &= max);
    v
}

/// The value a fuzz edit writes into a field.
#[derive(Debug, Clone)]
pub enum Value {
    Edge(proptest::sample::Index),
    Random(u64),
}

/// One edit of a valid encoding.
#[derive(Debug, Clone)]
pub enum Edit {
    /// Any field of the list given to [`apply_edits`].
    Field(proptest::sample::Index, Value),
    /// One of its first `hot` fields (a header's, which every section
    /// hangs on): drawn as often as all others together.
    HotField(proptest::sample::Index, Value),
    Byte(proptest::sample::Index, u8),
    Cut(proptest::sample::Index, u8),
    Insert(proptest::sample::Index, Vec<u8>),
}

/// One to four edits, mostly of fields.
pub fn edits() -> impl Strategy<Value = Vec<Edit>> {
    use proptest::prelude::*;
    use proptest::sample::Index;
    let value = prop_oneof![
        3 => any::<Index>().prop_map(Value::Edge),
        1 => any::<u64>().prop_map(Value::Random),
    ];
    let edit = prop_oneof![
        3 => (any::<Index>(), value.clone()).prop_map(|(i, v)| Edit::Field(i, v)),
        2 => (any::<Index>(), value).prop_map(|(i, v)| Edit::HotField(i, v)),
        2 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Edit::Byte(i, b)),
        1 => (any::<Index>(), 1u8..64).prop_map(|(i, n)| Edit::Cut(i, n)),
        1 => (any::<Index>(), proptest::collection::vec(any::<u8>(), 1..40))
            .prop_map(|(i, b)| Edit::Insert(i, b)),
    ];
    proptest::collection::vec(edit, 1..5)
}

/// Where edits may act on an encoding, and what its edge values relate to.
pub struct Layout<'a> {
    /// Fields of the unedited encoding; the first `hot` are the header's.
    pub fields: &'a [Field],
    pub hot: usize,
    /// Leading bytes byte edits, cuts and insertions leave alone (magic and
    /// version, so edits reach the checks behind them).
    pub keep_head: usize,
    /// Trailing checksum bytes, recomputed by the caller afterwards.
    pub trailer: usize,
    /// Offsets and lengths of `bytes` that fields are added to.
    pub related: &'a dyn Fn(&[u8]) -> Vec<u64>,
}

/// Apply `edits` to `bytes` within `layout`.
pub fn apply_edits(bytes: &mut Vec<u8>, layout: &Layout<'_>, edits: &[Edit]) {
    for e in edits {
        let body = bytes.len().saturating_sub(layout.trailer);
        if body <= layout.keep_head {
            return;
        }
        match e {
            Edit::Field(i, v) | Edit::HotField(i, v) => {
                let f = match e {
                    Edit::HotField(..) => *i.get(&layout.fields[..layout.hot]),
                    _ => *i.get(layout.fields),
                };
                let v = match v {
                    Value::Edge(i) => {
                        let related = (layout.related)(bytes);
                        *i.get(&edge_values(bytes, f, layout.trailer, &related))
                    }
                    Value::Random(r) => r & f.max(),
                };
                if f.at + f.width <= body {
                    f.write(bytes, v);
                }
            }
            Edit::Byte(i, v) => bytes[layout.keep_head + i.index(body - layout.keep_head)] = *v,
            Edit::Cut(i, n) => {
                let at = layout.keep_head + i.index(body - layout.keep_head);
                let end = (at + usize::from(*n)).min(body);
                bytes.drain(at..end);
            }
            Edit::Insert(i, new) => {
                let at = layout.keep_head + i.index(body - layout.keep_head + 1);
                bytes.splice(at..at, new.iter().copied());
            }
        }
    }
}
