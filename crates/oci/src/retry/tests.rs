use super::*;

/// Draws of the pause after try `attempt`, from a generator seeded with `seed`.
fn draws(policy: &RetryPolicy, attempt: u32, seed: u64, n: usize) -> Vec<Duration> {
    let mut rng = fastrand::Rng::with_seed(seed);
    (0..n)
        .map(|_| policy.delay_with(attempt, &mut rng))
        .collect()
}

#[test]
fn backoff_grows_and_is_bounded() {
    let p = RetryPolicy::default();
    assert!(p.ceiling(1) > p.ceiling(0));
    let mut rng = fastrand::Rng::with_seed(7);
    assert!(p.delay_with(1, &mut rng) >= p.delay_with(0, &mut rng));
    assert!(p.delay(30) <= Duration::from_millis(200 * 64));
}

#[test]
fn the_default_keeps_the_clients_bounds() {
    let p = RetryPolicy::default();
    assert_eq!(p.ceiling(0), Duration::from_millis(200));
    assert_eq!(p.ceiling(3), Duration::from_millis(1600));
    assert_eq!(p.ceiling(6), Duration::from_millis(12_800));
    assert_eq!(p.ceiling(u32::MAX), Duration::from_millis(12_800));
    assert_eq!(p.attempts(), 5);
}

#[test]
fn delays_stay_between_half_and_all_of_their_ceiling() {
    let p = RetryPolicy::new(Duration::from_millis(50), Duration::from_secs(2), 9);
    for attempt in [0, 1, 2, 5, 6, 7, 31, 32, u32::MAX] {
        let ceiling = p.ceiling(attempt);
        assert!(ceiling <= Duration::from_secs(2), "attempt {attempt}");
        for d in draws(&p, attempt, u64::from(attempt) + 1, 200) {
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "attempt {attempt}: {d:?} outside {:?}..={ceiling:?}",
                ceiling / 2
            );
        }
    }
}

#[test]
fn every_pause_is_at_least_any_pause_of_the_try_before_until_the_cap() {
    let p = RetryPolicy::default();
    for attempt in 0..6 {
        assert_eq!(p.ceiling(attempt + 1), p.ceiling(attempt) * 2);
        let longest_before = draws(&p, attempt, 11, 100).into_iter().max().unwrap();
        let shortest_after = draws(&p, attempt + 1, 12, 100).into_iter().min().unwrap();
        assert!(
            shortest_after >= longest_before,
            "attempt {attempt}: {shortest_after:?} < {longest_before:?}"
        );
    }
    // At the cap the pauses stop growing but stay spread out.
    assert_eq!(p.ceiling(7), p.ceiling(6));
}

#[test]
fn draws_differ_and_a_seed_repeats_them() {
    let p = RetryPolicy::default();
    let a = draws(&p, 3, 1, 50);
    let mut distinct = a.clone();
    distinct.sort();
    distinct.dedup();
    assert!(distinct.len() > 40, "jitter spreads the pauses: {a:?}");
    assert_eq!(a, draws(&p, 3, 1, 50), "same seed, same pauses");
    assert_ne!(a, draws(&p, 3, 2, 50), "another seed, other pauses");
}

#[test]
fn the_attempt_budget_counts_the_first_try() {
    let p = RetryPolicy::default().with_attempts(3);
    assert_eq!(p.attempts(), 3);
    assert!(p.allows_another(0));
    assert!(p.allows_another(1));
    assert!(!p.allows_another(2));
    assert!(!p.allows_another(u32::MAX));
    // Zero attempts would send nothing: one try is the least.
    let once = p.with_attempts(0);
    assert_eq!(once.attempts(), 1);
    assert!(!once.allows_another(0));
    assert_eq!(
        RetryPolicy::new(Duration::ZERO, Duration::ZERO, 0).attempts(),
        1
    );
}

#[test]
fn a_cap_below_the_base_is_the_base() {
    let p = RetryPolicy::new(Duration::from_secs(1), Duration::from_millis(10), 2);
    assert_eq!(p.ceiling(0), Duration::from_secs(1));
    assert_eq!(p.ceiling(4), Duration::from_secs(1));
}
