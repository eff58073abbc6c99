//! `event_stats`' operators: per-epoch partial states of aggregate functions, on a fast and a
//! slow internal stream.
//!
//! ```text
//!  events ─┬─ PreAggregateFast (worker thread) ───────────┬─ partials ─exchange(video)─▶ StatsEpoch ─▶ stats_*
//!          └─ PreAggregateSlow ⇄ sketch thread (per worker)┘
//! ```
//!
//! The slow stream (sketches) is folded on a thread of its own per worker, so a slow sketch
//! never holds up the worker thread and the fast stream's results are written as soon as their
//! epoch is complete. An epoch's commit needs both streams: while the slow one is behind, its
//! backlog waits in an embedded database ([`crate::spill`]) rather than in memory, once over a
//! budget. The states themselves and their merge are in [`crate::stats_epoch`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use tracing::info;
use videocount_aggregates::Registry;

use crate::spill::{Spill, SpillError};
use crate::stats_epoch::{EpochPartials, LocatedInput, Partial};

/// Folds a stream of events into partial states per (partition, key) and epoch, for the
/// videos' owners to merge ([`StatsEpoch`]).
pub trait PreAggregate<'scope> {
    /// The fast stream: folds the aggregates of `mask` on the worker thread, and emits an
    /// epoch's partial states once the input frontier has passed it.
    fn pre_aggregate_fast(self, registry: Registry, mask: u32) -> Stream<'scope, u64, Vec<Partial>>;

    /// The slow stream: folds the aggregates of `mask` on a thread of its own per worker.
    ///
    /// The operator hands each batch to the thread in order and keeps the epoch's capability
    /// until the thread returns the epoch's partial states, so the worker thread never waits
    /// for a sketch. While the thread's backlog is over `config.memory_budget`, batches go
    /// through an embedded redb file instead of memory: the fast stream and the source can run
    /// ahead of a stalled slow stream (up to the job's commit lag) without growing the heap.
    fn pre_aggregate_slow(self, registry: Registry, mask: u32, config: SlowStream)
    -> Stream<'scope, u64, Vec<Partial>>;
}

impl<'scope> PreAggregate<'scope> for Stream<'scope, u64, Vec<LocatedInput>> {
    fn pre_aggregate_fast(self, registry: Registry, mask: u32) -> Stream<'scope, u64, Vec<Partial>> {
        pre_aggregate_fast(self, registry, mask)
    }

    fn pre_aggregate_slow(
        self,
        registry: Registry,
        mask: u32,
        config: SlowStream,
    ) -> Stream<'scope, u64, Vec<Partial>> {
        pre_aggregate_slow(self, registry, mask, config)
    }
}

fn pre_aggregate_fast<'scope>(
    events: Stream<'scope, u64, Vec<LocatedInput>>,
    registry: Registry,
    mask: u32,
) -> Stream<'scope, u64, Vec<Partial>> {
    events.unary_frontier::<CapacityContainerBuilder<Vec<Partial>>, _, _, _>(
        Pipeline,
        "PreAggregateFast",
        move |_initial, _info| {
            let mut open: BTreeMap<u64, (Capability<u64>, EpochPartials)> = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each(|stamp, data| {
                    let Some(&time) = stamp.least() else { return };
                    if !data.iter().any(|(input, _, _)| input.aggregates & mask != 0) {
                        return;
                    }
                    let (_, partials) = open.entry(time).or_insert_with(|| {
                        let capability = stamp.retain_least(output.output_index()).expect("stamp has a time");
                        (capability, EpochPartials::new(registry.clone(), mask))
                    });
                    for located in data.drain(..) {
                        partials.absorb(located);
                    }
                });
                while let Some((&epoch, _)) = open.first_key_value() {
                    if frontier.less_equal(&epoch) {
                        break;
                    }
                    let (capability, partials) = open.remove(&epoch).expect("first key exists");
                    let mut finished = partials.finish();
                    output.session(&capability).give_container(&mut finished);
                }
            }
        },
    )
}

/// Settings of the slow stream.
#[derive(Clone, Debug)]
pub struct SlowStream {
    /// Testing aid: the sketch thread sleeps this long before finishing each epoch, so tests
    /// can show that a stalled slow stream does not hold up the fast one.
    pub delay_per_epoch: Duration,
    /// Bytes of backlog a worker's sketch thread may hold in memory; further batches wait in
    /// the spill file until the thread gets to them.
    pub memory_budget: usize,
    /// Directory of the spill files.
    pub spill_dir: PathBuf,
    /// Names the spill files (`<name>-worker<i>.redb`): the job and topic.
    pub name: String,
}

impl Default for SlowStream {
    fn default() -> Self {
        SlowStream {
            delay_per_epoch: Duration::ZERO,
            memory_budget: 256 << 20,
            spill_dir: std::env::temp_dir(),
            name: "videocount".into(),
        }
    }
}

/// A batch for the sketch thread: in memory (with its estimated size), or in the spill file.
enum Batch {
    Inline(Vec<LocatedInput>, usize),
    Spilled(u64),
}

enum ToSketcher {
    Events(u64, Batch),
    Close(u64),
}

/// A rough size of a batch in memory: the events and their strings.
fn batch_bytes(events: &[LocatedInput]) -> usize {
    events.len() * (std::mem::size_of::<LocatedInput>() + 16)
}

fn pre_aggregate_slow<'scope>(
    events: Stream<'scope, u64, Vec<LocatedInput>>,
    registry: Registry,
    mask: u32,
    config: SlowStream,
) -> Stream<'scope, u64, Vec<Partial>> {
    let scope = events.scope();
    let worker = scope.worker();
    let index = scope.index();
    events.unary_frontier::<CapacityContainerBuilder<Vec<Partial>>, _, _, _>(
        Pipeline,
        "PreAggregateSlow",
        move |_initial, info| {
            let wake = worker.sync_activator_for(info.address.to_vec());
            let (to_sketcher, inbox) = mpsc::channel::<ToSketcher>();
            let (done, finished) = mpsc::channel::<(u64, Result<Vec<Partial>, SpillError>)>();
            let in_memory = Arc::new(AtomicUsize::new(0));
            let spill = match Spill::open(&config.spill_dir, &config.name, index) {
                Ok(spill) => Arc::new(spill),
                Err(e) => panic!("slow stream of worker {index}: {e}"),
            };
            let (thread_memory, thread_spill, delay) = (Arc::clone(&in_memory), Arc::clone(&spill), config.delay_per_epoch);
            std::thread::Builder::new()
                .name(format!("sketcher-{index}"))
                .spawn(move || {
                    let mut open: BTreeMap<u64, Result<EpochPartials, SpillError>> = BTreeMap::new();
                    // Ends when the operator (the sender) is dropped.
                    while let Ok(message) = inbox.recv() {
                        match message {
                            ToSketcher::Events(epoch, batch) => {
                                let events = match batch {
                                    Batch::Inline(events, bytes) => {
                                        thread_memory.fetch_sub(bytes, Ordering::Relaxed);
                                        Ok(events)
                                    }
                                    Batch::Spilled(seq) => thread_spill.take(seq),
                                };
                                let entry =
                                    open.entry(epoch).or_insert_with(|| Ok(EpochPartials::new(registry.clone(), mask)));
                                match (entry, events) {
                                    (Ok(partials), Ok(events)) => {
                                        for located in events {
                                            partials.absorb(located);
                                        }
                                    }
                                    (entry, Err(e)) => *entry = Err(e),
                                    (Err(_), _) => {}
                                }
                            }
                            ToSketcher::Close(epoch) => {
                                if !delay.is_zero() {
                                    std::thread::sleep(delay);
                                }
                                let partials = open.remove(&epoch).unwrap_or_else(|| Ok(EpochPartials::new(registry.clone(), mask)));
                                if done.send((epoch, partials.map(EpochPartials::finish))).is_err() {
                                    return;
                                }
                                let _ = wake.activate();
                            }
                        }
                    }
                })
                .expect("spawning a sketch thread");
            let mut waiting: BTreeMap<u64, (Capability<u64>, bool)> = BTreeMap::new();
            let mut next_seq = 0u64;
            let mut spilling = false;
            move |(input, frontier), output| {
                input.for_each(|stamp, data| {
                    let Some(&time) = stamp.least() else { return };
                    let wanted: Vec<LocatedInput> =
                        data.drain(..).filter(|(input, _, _)| input.aggregates & mask != 0).collect();
                    if wanted.is_empty() {
                        return;
                    }
                    waiting.entry(time).or_insert_with(|| {
                        (stamp.retain_least(output.output_index()).expect("stamp has a time"), false)
                    });
                    let bytes = batch_bytes(&wanted);
                    let over_budget = in_memory.load(Ordering::Relaxed) + bytes > config.memory_budget;
                    if over_budget != spilling {
                        spilling = over_budget;
                        if spilling {
                            info!(worker = index, path = %spill.path.display(), "slow stream behind: its backlog goes to disk");
                        } else {
                            info!(worker = index, "slow stream backlog back within its memory budget");
                        }
                    }
                    let batch = if over_budget {
                        next_seq += 1;
                        if let Err(e) = spill.put(next_seq, &wanted) {
                            // A full disk must not lose the epoch: stop with the reason.
                            panic!("slow stream of worker {index}: spilling a batch: {e}");
                        }
                        Batch::Spilled(next_seq)
                    } else {
                        in_memory.fetch_add(bytes, Ordering::Relaxed);
                        Batch::Inline(wanted, bytes)
                    };
                    // The thread lives as long as this operator; if it died, the epoch's
                    // capability is never released and the job stops committing instead of
                    // losing the epoch.
                    let _ = to_sketcher.send(ToSketcher::Events(time, batch));
                });
                for (epoch, (_, closed)) in waiting.iter_mut() {
                    if frontier.less_equal(epoch) {
                        break;
                    }
                    if !*closed {
                        *closed = true;
                        let _ = to_sketcher.send(ToSketcher::Close(*epoch));
                    }
                }
                while let Ok((epoch, partials)) = finished.try_recv() {
                    let mut partials = partials.unwrap_or_else(|e| panic!("slow stream of worker {index}: epoch {epoch}: {e}"));
                    if let Some((capability, _)) = waiting.remove(&epoch) {
                        output.session(&capability).give_container(&mut partials);
                    }
                }
            }
        },
    )
}
