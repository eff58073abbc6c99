//! `quantiles`: every percentile `p1` .. `p99` from one DDSketch (the `sketches-ddsketch`
//! crate) with 1 % relative accuracy.

use sketches_ddsketch::{Config, DDSketch};

use crate::{Aggregate, DecodeError, Input, Sample, Speed};

/// The relative accuracy of every percentile.
pub const RELATIVE_ACCURACY: f64 = 0.01;

/// See the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct Quantiles {
    config: Config,
}

impl Default for Quantiles {
    fn default() -> Self {
        // 4096 bins cover values from 1e-9 to 1e27 at 1 % before the lowest bins collapse.
        Quantiles { config: Config::new(RELATIVE_ACCURACY, 4096, 1e-9) }
    }
}

/// The percentile a function name asks for: `p1` .. `p99`, without leading zeros.
pub fn percentile(function: &str) -> Option<u8> {
    let digits = function.strip_prefix('p')?;
    if digits.is_empty() || digits.len() > 2 || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok().filter(|p| (1..=99).contains(p))
}

impl Aggregate for Quantiles {
    type State = DDSketch;

    fn name(&self) -> &'static str {
        "quantiles"
    }

    fn answers(&self, function: &str) -> Option<Input> {
        percentile(function).map(|_| Input::Value)
    }

    fn speed(&self) -> Speed {
        Speed::Slow
    }

    fn create(&self) -> DDSketch {
        DDSketch::new(self.config)
    }

    fn update(&self, state: &mut DDSketch, sample: Sample<'_>) {
        if let Some(v) = sample.value {
            state.add(v);
        }
    }

    fn merge(&self, into: &mut DDSketch, other: &DDSketch) {
        into.merge(other).expect("sketches of one registry share their config");
    }

    fn finish(&self, state: &DDSketch, function: &str) -> Option<f64> {
        let p = percentile(function)?;
        state.quantile(f64::from(p) / 100.0).ok().flatten()
    }

    fn encode(&self, state: &DDSketch) -> Vec<u8> {
        postcard::to_allocvec(state).expect("a sketch always encodes")
    }

    fn decode(&self, bytes: &[u8]) -> Result<DDSketch, DecodeError> {
        let sketch: DDSketch =
            postcard::from_bytes(bytes).map_err(|e| DecodeError { aggregate: "quantiles", detail: e.to_string() })?;
        // A state written under another configuration would merge wrongly: refuse it.
        let mut probe = self.create();
        probe
            .merge(&sketch)
            .map_err(|_| DecodeError { aggregate: "quantiles", detail: "written with another configuration".into() })?;
        Ok(sketch)
    }

    fn heap_bytes(&self, state: &DDSketch) -> usize {
        // The stores' u64 bins, grown in chunks of 128: counted at twice their length, for the
        // capacity that growing leaves.
        std::mem::size_of::<DDSketch>() + state.length() * 16
    }
}
