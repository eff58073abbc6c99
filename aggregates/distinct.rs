//! `uniq`: distinct `viewer_id`s, with a HyperLogLog sketch (Apache DataSketches' `hll`):
//! exact while small, about 0.8 % standard error (lg_k = 14) when large.

use datasketches::hll::{HllSketch, HllType, HllUnion};

use crate::{Aggregate, DecodeError, Input, Sample, Speed};

/// See the module documentation.
#[derive(Clone, Copy, Debug)]
pub struct Distinct {
    lg_k: u8,
}

impl Default for Distinct {
    fn default() -> Self {
        Distinct { lg_k: 14 }
    }
}

impl Aggregate for Distinct {
    /// A union is also a sketch that takes values, and merges any sketch in place.
    type State = HllUnion;

    fn name(&self) -> &'static str {
        "uniq"
    }

    fn answers(&self, function: &str) -> Option<Input> {
        (function == "uniq").then_some(Input::Viewer)
    }

    fn speed(&self) -> Speed {
        Speed::Slow
    }

    fn create(&self) -> HllUnion {
        HllUnion::new(self.lg_k).expect("lg_k is in range")
    }

    fn update(&self, state: &mut HllUnion, sample: Sample<'_>) {
        if let Some(viewer) = sample.viewer_id {
            state.update_value(viewer);
        }
    }

    fn merge(&self, into: &mut HllUnion, other: &HllUnion) {
        into.update(&other.to_sketch(HllType::Hll8));
    }

    fn finish(&self, state: &HllUnion, function: &str) -> Option<f64> {
        (function == "uniq").then(|| state.estimate().round())
    }

    fn encode(&self, state: &HllUnion) -> Vec<u8> {
        state.to_sketch(HllType::Hll8).serialize()
    }

    fn decode(&self, bytes: &[u8]) -> Result<HllUnion, DecodeError> {
        let sketch =
            HllSketch::deserialize(bytes).map_err(|e| DecodeError { aggregate: "uniq", detail: e.to_string() })?;
        let mut union = self.create();
        union.update(&sketch);
        Ok(union)
    }

    fn heap_bytes(&self, state: &HllUnion) -> usize {
        std::mem::size_of::<HllUnion>() + state.estimated_size()
    }
}
