//! `moments`: the exact functions `count`, `sum`, `min`, `max` and `avg` from one small state.

use serde::{Deserialize, Serialize};

use crate::{Aggregate, DecodeError, Input, Sample, Speed};

/// Count of events, and count, sum, min and max of their values.
///
/// `min` is `+inf` and `max` is `-inf` while there is no value: the identities of min and max,
/// so that plain SQL `min(min)` and `max(max)` over stored rows are right.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub count: u64,
    pub value_count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl Default for Moments {
    fn default() -> Self {
        Moments { count: 0, value_count: 0, sum: 0.0, min: f64::INFINITY, max: f64::NEG_INFINITY }
    }
}

impl Moments {
    pub fn add(&mut self, value: Option<f64>) {
        self.count += 1;
        if let Some(v) = value {
            self.value_count += 1;
            self.sum += v;
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
    }

    pub fn merge(&mut self, other: &Moments) {
        self.count += other.count;
        self.value_count += other.value_count;
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
    }

    /// `count`, `sum`, `min`, `max` or `avg`.
    pub fn function(&self, name: &str) -> Option<f64> {
        let has_values = self.value_count > 0;
        match name {
            "count" => Some(self.count as f64),
            "sum" => has_values.then_some(self.sum),
            "min" => has_values.then_some(self.min),
            "max" => has_values.then_some(self.max),
            "avg" => has_values.then(|| self.sum / self.value_count as f64),
            _ => None,
        }
    }
}

/// The [`Aggregate`] over [`Moments`].
#[derive(Clone, Copy, Debug, Default)]
pub struct MomentsAggregate;

impl Aggregate for MomentsAggregate {
    type State = Moments;

    fn name(&self) -> &'static str {
        "moments"
    }

    fn answers(&self, function: &str) -> Option<Input> {
        match function {
            "count" => Some(Input::None),
            "sum" | "min" | "max" | "avg" => Some(Input::Value),
            _ => None,
        }
    }

    fn speed(&self) -> Speed {
        Speed::Fast
    }

    fn create(&self) -> Moments {
        Moments::default()
    }

    fn update(&self, state: &mut Moments, sample: Sample<'_>) {
        state.add(sample.value);
    }

    fn merge(&self, into: &mut Moments, other: &Moments) {
        into.merge(other);
    }

    fn finish(&self, state: &Moments, function: &str) -> Option<f64> {
        state.function(function)
    }

    fn encode(&self, state: &Moments) -> Vec<u8> {
        postcard::to_allocvec(state).expect("plain numbers always encode")
    }

    fn decode(&self, bytes: &[u8]) -> Result<Moments, DecodeError> {
        postcard::from_bytes(bytes).map_err(|e| DecodeError { aggregate: "moments", detail: e.to_string() })
    }

    fn heap_bytes(&self, _state: &Moments) -> usize {
        std::mem::size_of::<Moments>()
    }
}
