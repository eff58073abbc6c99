//! Each built-in function against a plain computation on random values, with states split at
//! random points, encoded, decoded and merged (as the job and the query code do) compared to
//! one pass.

use proptest::prelude::*;
use rand::{Rng, SeedableRng};
use videocount_aggregates::{Registry, Sample, State};

const PERCENTILES: [u8; 7] = [1, 10, 25, 50, 75, 90, 99];

/// One pass over every sample, and the same samples split at `cuts` into parts whose states
/// go through bytes before being merged in order.
fn one_pass_and_merged(registry: &Registry, function: &str, samples: &[Sample<'_>], cuts: &[usize]) -> (State, State) {
    let id = registry.function(function).unwrap().aggregate;
    let aggregate = registry.get(id);
    let mut whole = aggregate.create();
    for s in samples {
        aggregate.update(&mut whole, *s);
    }
    let mut bounds: Vec<usize> = cuts.iter().map(|c| c % (samples.len() + 1)).collect();
    bounds.extend([0, samples.len()]);
    bounds.sort_unstable();
    let mut merged = aggregate.create();
    for pair in bounds.windows(2) {
        let mut part = aggregate.create();
        for s in &samples[pair[0]..pair[1]] {
            aggregate.update(&mut part, *s);
        }
        let decoded = aggregate.decode(&aggregate.encode(&part)).unwrap();
        aggregate.merge(&mut merged, &decoded);
    }
    (whole, merged)
}

fn finish(registry: &Registry, function: &str, state: &State) -> Option<f64> {
    registry.get(registry.function(function).unwrap().aggregate).finish(state, function)
}

fn values() -> impl Strategy<Value = Vec<f64>> {
    // Quarters: sums of these are exact in f64, so "exact" means equal.
    prop_oneof![
        proptest::collection::vec((-4_000i64..400_000).prop_map(|q| q as f64 / 4.0), 0..400),
        proptest::collection::vec((0i64..40).prop_map(|q| q as f64), 1..50),
    ]
}

proptest! {
    #[test]
    fn exact_functions_equal_the_plain_computation(values in values(), cuts in proptest::collection::vec(0usize..500, 0..6)) {
        let registry = Registry::builtin();
        let samples: Vec<Sample<'_>> = values.iter().map(|v| Sample { value: Some(*v), viewer_id: None }).collect();
        let n = values.len();
        let sum: f64 = values.iter().sum();
        let expected = [
            ("count", Some(n as f64)),
            ("sum", (n > 0).then_some(sum)),
            ("min", values.iter().copied().reduce(f64::min)),
            ("max", values.iter().copied().reduce(f64::max)),
            ("avg", (n > 0).then(|| sum / n as f64)),
        ];
        for (function, expected) in expected {
            let (whole, merged) = one_pass_and_merged(&registry, function, &samples, &cuts);
            prop_assert_eq!(finish(&registry, function, &whole), expected, "{} one pass", function);
            prop_assert_eq!(finish(&registry, function, &merged), expected, "{} merged", function);
        }
    }

    #[test]
    fn percentiles_are_within_one_percent(values in values(), cuts in proptest::collection::vec(0usize..500, 0..6)) {
        let registry = Registry::builtin();
        let samples: Vec<Sample<'_>> = values.iter().map(|v| Sample { value: Some(*v), viewer_id: None }).collect();
        let mut sorted = values.clone();
        sorted.sort_by(f64::total_cmp);
        for p in PERCENTILES {
            let function = format!("p{p}");
            let (whole, merged) = one_pass_and_merged(&registry, &function, &samples, &cuts);
            let got = finish(&registry, &function, &whole);
            prop_assert_eq!(got, finish(&registry, &function, &merged), "{} merged differs", function);
            if sorted.is_empty() {
                prop_assert_eq!(got, None);
                continue;
            }
            let truth = sorted[((f64::from(p) / 100.0) * (sorted.len() - 1) as f64) as usize];
            let got = got.unwrap();
            prop_assert!((got - truth).abs() <= 0.01 * truth.abs() + 1e-9, "{}: {} vs {}", function, got, truth);
        }
    }

    #[test]
    fn uniq_counts_distinct_viewers(viewers in proptest::collection::vec(0u32..3000, 0..3000), cuts in proptest::collection::vec(0usize..3000, 0..6)) {
        let registry = Registry::builtin();
        let ids: Vec<String> = viewers.iter().map(|v| format!("viewer-{v}")).collect();
        let samples: Vec<Sample<'_>> = ids.iter().map(|id| Sample { value: None, viewer_id: Some(id) }).collect();
        let truth = viewers.iter().collect::<std::collections::HashSet<_>>().len() as f64;
        let (whole, merged) = one_pass_and_merged(&registry, "uniq", &samples, &cuts);
        for state in [&whole, &merged] {
            let got = finish(&registry, "uniq", state).unwrap();
            prop_assert!((got - truth).abs() <= 0.02 * truth, "uniq {} vs {}", got, truth);
        }
    }
}

#[test]
fn uniq_is_within_two_percent_when_large() {
    let registry = Registry::builtin();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for distinct in [10_000u32, 200_000] {
        let ids: Vec<String> = (0..distinct * 2).map(|_| format!("u{}", rng.random_range(0..distinct))).collect();
        let truth = ids.iter().collect::<std::collections::HashSet<_>>().len() as f64;
        let samples: Vec<Sample<'_>> = ids.iter().map(|id| Sample { value: None, viewer_id: Some(id) }).collect();
        let cuts: Vec<usize> = (0..7).map(|_| rng.random_range(0..ids.len())).collect();
        let (whole, merged) = one_pass_and_merged(&registry, "uniq", &samples, &cuts);
        for state in [&whole, &merged] {
            let got = finish(&registry, "uniq", state).unwrap();
            assert!((got - truth).abs() <= 0.02 * truth, "uniq {got} vs {truth}");
        }
    }
}

#[test]
fn encoding_is_deterministic() {
    // A re-run epoch must produce byte-identical states for ClickHouse to drop the repeat.
    let registry = Registry::builtin();
    let ids: Vec<String> = (0..5000).map(|i| format!("u{}", i * 7919 % 3001)).collect();
    for function in ["count", "p50", "uniq"] {
        let aggregate = registry.get(registry.function(function).unwrap().aggregate);
        let build = || {
            let mut state = aggregate.create();
            for (i, id) in ids.iter().enumerate() {
                aggregate.update(&mut state, Sample { value: Some(i as f64 * 0.37), viewer_id: Some(id) });
            }
            aggregate.encode(&state)
        };
        assert_eq!(build(), build(), "{function}");
    }
}

#[test]
fn corrupt_states_are_errors_not_panics() {
    let registry = Registry::builtin();
    for function in ["count", "p50", "uniq"] {
        let aggregate = registry.get(registry.function(function).unwrap().aggregate);
        assert!(aggregate.decode(b"\xff\xff\xff").is_err(), "{function}");
        assert!(aggregate.decode(b"").is_err() || function == "count", "{function}");
    }
}
