//! Aggregate functions over event values, as an open set.
//!
//! An [`Aggregate`] is one kind of mergeable state (create, update with an event, merge two
//! states, finish to a number, encode and decode) registered in a [`Registry`] under a name.
//! One state can answer several *functions*: the `moments` state answers `count`, `sum`,
//! `min`, `max` and `avg`; one `quantiles` sketch answers every `pNN`; `uniq` answers `uniq`.
//! States, not functions, are what the job stores per (video, event type, minute), so `p50`,
//! `p90` and `p99` of one event type cost one sketch.
//!
//! Adding an aggregate: one file with a type implementing [`Aggregate`] and one line in
//! [`Registry::builtin`].

mod distinct;
mod functions_config;
mod moments;
mod quantiles;

use std::any::Any;
use std::sync::Arc;

pub use distinct::Distinct;
pub use functions_config::{ConfigError, DEFAULT_FUNCTIONS, FunctionsConfig};
pub use moments::{Moments, MomentsAggregate};
pub use quantiles::Quantiles;

/// Which input a function reads from an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Input {
    /// Nothing but the event itself (`count`).
    None,
    /// The event's `value`.
    Value,
    /// The event's `viewer_id`.
    Viewer,
}

/// Which internal stream of `event_stats` maintains an aggregate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Speed {
    /// Exact, a few numbers per state: updated on the worker threads.
    Fast,
    /// Sketches, more work per event and larger states: updated off the worker threads.
    Slow,
}

/// What an aggregate sees of one event.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample<'a> {
    pub value: Option<f64>,
    pub viewer_id: Option<&'a str>,
}

/// A state that could not be decoded.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode a {aggregate} state: {detail}")]
pub struct DecodeError {
    pub aggregate: &'static str,
    pub detail: String,
}

/// One kind of mergeable state. Implementations must be deterministic: the same updates and
/// merges in the same order give byte-identical encodings (exactly-once relies on it).
pub trait Aggregate: Send + Sync + 'static {
    type State: Send + 'static;
    /// The name its states are stored under (the `aggregate` column).
    fn name(&self) -> &'static str;
    /// The input `function` reads, when this aggregate answers `function`.
    fn answers(&self, function: &str) -> Option<Input>;
    fn speed(&self) -> Speed;
    fn create(&self) -> Self::State;
    /// Adds one event. Called only with samples that carry what some answered function reads.
    fn update(&self, state: &mut Self::State, sample: Sample<'_>);
    fn merge(&self, into: &mut Self::State, other: &Self::State);
    /// The value of `function` (one this aggregate answers); `None` when there is no data.
    fn finish(&self, state: &Self::State, function: &str) -> Option<f64>;
    fn encode(&self, state: &Self::State) -> Vec<u8>;
    fn decode(&self, bytes: &[u8]) -> Result<Self::State, DecodeError>;
    /// About the bytes a state takes in memory, its allocations included (a memory budget
    /// counts it; cheap to call).
    fn heap_bytes(&self, state: &Self::State) -> usize;
}

/// A state of any aggregate, as the registry hands it out.
pub type State = Box<dyn Any + Send>;

/// [`Aggregate`] with its state type erased, so that a registry can hold any of them.
pub trait DynAggregate: Send + Sync {
    fn name(&self) -> &'static str;
    fn answers(&self, function: &str) -> Option<Input>;
    fn speed(&self) -> Speed;
    fn create(&self) -> State;
    fn update(&self, state: &mut State, sample: Sample<'_>);
    fn merge(&self, into: &mut State, other: &State);
    fn finish(&self, state: &State, function: &str) -> Option<f64>;
    fn encode(&self, state: &State) -> Vec<u8>;
    fn decode(&self, bytes: &[u8]) -> Result<State, DecodeError>;
    fn heap_bytes(&self, state: &State) -> usize;
}

fn typed<A: Aggregate>(state: &State) -> &A::State {
    state.downcast_ref().expect("a state is only ever used with the aggregate that created it")
}

fn typed_mut<A: Aggregate>(state: &mut State) -> &mut A::State {
    state.downcast_mut().expect("a state is only ever used with the aggregate that created it")
}

impl<A: Aggregate> DynAggregate for A {
    fn name(&self) -> &'static str {
        Aggregate::name(self)
    }
    fn answers(&self, function: &str) -> Option<Input> {
        Aggregate::answers(self, function)
    }
    fn speed(&self) -> Speed {
        Aggregate::speed(self)
    }
    fn create(&self) -> State {
        Box::new(Aggregate::create(self))
    }
    fn update(&self, state: &mut State, sample: Sample<'_>) {
        Aggregate::update(self, typed_mut::<A>(state), sample)
    }
    fn merge(&self, into: &mut State, other: &State) {
        Aggregate::merge(self, typed_mut::<A>(into), typed::<A>(other))
    }
    fn finish(&self, state: &State, function: &str) -> Option<f64> {
        Aggregate::finish(self, typed::<A>(state), function)
    }
    fn encode(&self, state: &State) -> Vec<u8> {
        Aggregate::encode(self, typed::<A>(state))
    }
    fn decode(&self, bytes: &[u8]) -> Result<State, DecodeError> {
        Ok(Box::new(Aggregate::decode(self, bytes)?))
    }
    fn heap_bytes(&self, state: &State) -> usize {
        // The box and its vtable pointer, then the state.
        16 + Aggregate::heap_bytes(self, typed::<A>(state))
    }
}

/// The position of an aggregate in its registry: small, and the same in every worker.
pub type AggregateId = u8;

/// A function name resolved against a registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub name: String,
    pub aggregate: AggregateId,
    pub input: Input,
}

/// The aggregates a job knows, in a fixed order.
#[derive(Clone)]
pub struct Registry {
    aggregates: Vec<Arc<dyn DynAggregate>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.aggregates.iter().map(|a| a.name())).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry { aggregates: Vec::new() }
    }

    /// The built-in aggregates. The order is part of the job's identity: append only.
    pub fn builtin() -> Self {
        let mut registry = Registry::new();
        registry.register(MomentsAggregate);
        registry.register(Quantiles::default());
        registry.register(Distinct::default());
        registry
    }

    /// Adds an aggregate. Panics on a duplicate name or more than 32 aggregates: both are
    /// programming errors.
    pub fn register(&mut self, aggregate: impl Aggregate) -> AggregateId {
        assert!(self.aggregates.len() < 32, "at most 32 aggregates");
        let name = Aggregate::name(&aggregate);
        assert!(self.by_name(name).is_none(), "aggregate {name} registered twice");
        self.aggregates.push(Arc::new(aggregate));
        (self.aggregates.len() - 1) as AggregateId
    }

    pub fn get(&self, id: AggregateId) -> &dyn DynAggregate {
        self.aggregates[id as usize].as_ref()
    }

    pub fn by_name(&self, name: &str) -> Option<AggregateId> {
        self.aggregates.iter().position(|a| a.name() == name).map(|i| i as AggregateId)
    }

    pub fn len(&self) -> usize {
        self.aggregates.len()
    }

    pub fn is_empty(&self) -> bool {
        self.aggregates.is_empty()
    }

    /// Resolves a function name (`count`, `p99`, `uniq`, ...).
    pub fn function(&self, name: &str) -> Option<Function> {
        self.aggregates.iter().enumerate().find_map(|(i, a)| {
            a.answers(name).map(|input| Function { name: name.to_owned(), aggregate: i as AggregateId, input })
        })
    }

    /// A bit per aggregate of the given speed.
    pub fn mask(&self, speed: Speed) -> u32 {
        self.aggregates.iter().enumerate().filter(|(_, a)| a.speed() == speed).fold(0, |m, (i, _)| m | (1 << i))
    }
}

impl Default for Registry {
    fn default() -> Self {
        Registry::builtin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_functions_resolve() {
        let registry = Registry::builtin();
        for name in ["count", "sum", "min", "max", "avg", "p1", "p50", "p99", "uniq"] {
            assert!(registry.function(name).is_some(), "{name}");
        }
        for name in ["p0", "p100", "p5x", "median", "", "P50", "p050"] {
            assert!(registry.function(name).is_none(), "{name}");
        }
        assert_eq!(registry.function("count").unwrap().input, Input::None);
        assert_eq!(registry.function("p90").unwrap().input, Input::Value);
        assert_eq!(registry.function("uniq").unwrap().input, Input::Viewer);
        let fast = registry.mask(Speed::Fast);
        let slow = registry.mask(Speed::Slow);
        assert_eq!(fast & slow, 0);
        assert_eq!((fast | slow).count_ones() as usize, registry.len());
        assert!(fast & (1 << registry.function("avg").unwrap().aggregate) != 0);
    }

    #[test]
    #[should_panic(expected = "registered twice")]
    fn duplicate_names_are_refused() {
        let mut registry = Registry::builtin();
        registry.register(MomentsAggregate);
    }
}
