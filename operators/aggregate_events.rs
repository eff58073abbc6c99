//! `event_stats`' operators: per-epoch states of aggregate functions, on a fast and a slow
//! internal stream.
//!
//! ```text
//!  events ─┬─ PreAggregateFast (worker thread) ───────────┬─ partials ─exchange(video)─▶ StatsEpoch ─▶ stats_*
//!          └─ PreAggregateSlow ⇄ sketch thread (per worker)┘
//! ```
//!
//! Each worker folds the events it read into one state per (partition, video, type,
//! aggregate, minute), in offset order, and sends those partial states to the video's owner,
//! which merges them in partition order. Floating-point sums and sketches therefore see the
//! same operations in the same order whenever an epoch is re-run: the written block is
//! byte-identical, and ClickHouse drops the repeat (docs/exactly-once.md).
//!
//! The slow stream (sketches) is folded on a thread of its own per worker, so a slow sketch
//! never holds up the worker thread and the fast stream's results are written as soon as their
//! epoch is complete. An epoch's commit needs both streams: while the slow one is behind, its
//! backlog waits in an embedded database (redb) rather than in memory, once over a budget.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use compact_str::CompactString;
use redb::{Database, Durability, TableDefinition};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use tracing::info;
use videocount_clickhouse::rows::{Grain, Insert, StatsRow, stats_block};
use videocount_events::StatsEvent;

use crate::aggregate::{AggregateId, Moments, Registry, Sample, State};
use crate::flush_epochs::EpochState;

/// A fast, non-cryptographic hasher: keys come from our own validated events.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An event with the aggregates it feeds (a bit per [`AggregateId`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StatsInput {
    pub event: StatsEvent,
    pub aggregates: u32,
}

/// An event with the partition and offset it was read from.
pub type LocatedInput = (StatsInput, u32, u64);

/// (video, event type, aggregate, minute start in seconds).
pub type StatsKey = (CompactString, CompactString, AggregateId, u32);

/// One worker's state of one key from one partition in one epoch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Partial {
    pub key: StatsKey,
    pub partition: u32,
    pub summary: Moments,
    pub state: Vec<u8>,
}

/// The events of an epoch on one worker, folded into one state per (partition, key).
///
/// Events are folded in (partition, offset) order at [`EpochPartials::finish`], not in arrival
/// order: a re-run epoch must repeat every floating-point addition and sketch update in the
/// same order, and arrival order within a partition is not guaranteed across runs (the source
/// may seek back and re-read). Holding an epoch's events costs memory for one epoch only.
pub struct EpochPartials {
    registry: Registry,
    mask: u32,
    events: Vec<LocatedInput>,
}

impl EpochPartials {
    /// Folds only the aggregates in `mask` (one stream's share).
    pub fn new(registry: Registry, mask: u32) -> Self {
        EpochPartials { registry, mask, events: Vec::new() }
    }

    pub fn absorb(&mut self, located: LocatedInput) {
        if located.0.aggregates & self.mask != 0 {
            self.events.push(located);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// Folds the events in (partition, offset) order and encodes the partial states, for the
    /// exchange to the videos' owners.
    pub fn finish(self) -> Vec<Partial> {
        let EpochPartials { registry, mask, mut events } = self;
        events.sort_unstable_by_key(|(_, partition, offset)| (*partition, *offset));
        let mut states: Map<(u32, StatsKey), (Moments, State)> = Map::default();
        for (input, partition, _) in &events {
            let mut wanted = input.aggregates & mask;
            let event = &input.event;
            let sample = Sample { value: event.value, viewer_id: event.viewer_id.as_deref() };
            let minute = Grain::Minute.bucket(event.event.ts_ms);
            while wanted != 0 {
                let id = wanted.trailing_zeros() as AggregateId;
                wanted &= wanted - 1;
                let aggregate = registry.get(id);
                let key = (event.event.video_id.clone(), event.event.event_type.clone(), id, minute);
                let (summary, state) =
                    states.entry((*partition, key)).or_insert_with(|| (Moments::default(), aggregate.create()));
                summary.add(event.value);
                aggregate.update(state, sample);
            }
        }
        states
            .into_iter()
            .map(|((partition, key), (summary, state))| {
                let encoded = registry.get(key.2).encode(&state);
                Partial { key, partition, summary, state: encoded }
            })
            .collect()
    }
}

/// What the owner of some videos gathers of one epoch: partial states from every worker.
#[derive(Debug, Default)]
pub struct StatsEpoch {
    partials: Vec<Partial>,
}

impl EpochState<Partial> for StatsEpoch {
    fn absorb(&mut self, item: Partial) {
        self.partials.push(item);
    }
}

/// A state being merged, with its summary.
struct Merged {
    summary: Moments,
    state: State,
}

impl StatsEpoch {
    /// Merges the partials in a fixed order (key, then partition) into minute states, rolls
    /// those up to hours and days in minute order, and encodes one block per grain.
    pub fn into_inserts(self, registry: &Registry, epoch: u64) -> Result<Vec<Insert>, String> {
        if self.partials.is_empty() {
            return Ok(Vec::new());
        }
        let mut partials = self.partials;
        partials.sort_unstable_by(|a, b| (&a.key, a.partition).cmp(&(&b.key, b.partition)));
        // Sorted: the partials of one key are adjacent, in partition order.
        let mut minutes: Vec<(StatsKey, Merged)> = Vec::new();
        for partial in partials {
            let aggregate = registry.get(partial.key.2);
            let state = aggregate.decode(&partial.state).map_err(|e| e.to_string())?;
            match minutes.last_mut() {
                Some((key, merged)) if *key == partial.key => {
                    merged.summary.merge(&partial.summary);
                    aggregate.merge(&mut merged.state, &state);
                }
                _ => minutes.push((partial.key, Merged { summary: partial.summary, state })),
            }
        }
        // Minutes are visited in key order, so each hour and day merges its minutes in the
        // same order on every run, whatever the map's iteration order.
        let mut hours: Map<StatsKey, Merged> = Map::default();
        let mut days: Map<StatsKey, Merged> = Map::default();
        for (key, minute) in &minutes {
            let ts_ms = u64::from(key.3) * 1000;
            for (rollup, grain) in [(&mut hours, Grain::Hour), (&mut days, Grain::Day)] {
                let aggregate = registry.get(key.2);
                let bucket_key = (key.0.clone(), key.1.clone(), key.2, grain.bucket(ts_ms));
                let merged = rollup
                    .entry(bucket_key)
                    .or_insert_with(|| Merged { summary: Moments::default(), state: aggregate.create() });
                merged.summary.merge(&minute.summary);
                aggregate.merge(&mut merged.state, &minute.state);
            }
        }
        let rows = |merged: Vec<(StatsKey, Merged)>| -> Vec<StatsRow> {
            merged
                .into_iter()
                .map(|((video_id, event_type, id, bucket), Merged { summary, state })| {
                    let aggregate = registry.get(id);
                    StatsRow {
                        video_id: video_id.into_string(),
                        event_type: event_type.into_string(),
                        aggregate: aggregate.name().to_owned(),
                        bucket,
                        count: summary.count,
                        value_count: summary.value_count,
                        sum: summary.sum,
                        min: summary.min,
                        max: summary.max,
                        state: aggregate.encode(&state),
                    }
                })
                .collect()
        };
        Ok([
            (Grain::Minute, minutes),
            (Grain::Hour, hours.into_iter().collect()),
            (Grain::Day, days.into_iter().collect()),
        ]
        .into_iter()
        .map(|(grain, merged)| stats_block(grain, epoch, false, &mut rows(merged)))
        .collect())
    }
}

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

/// The slow stream's batches that wait on disk, by sequence number. The file is scratch: after
/// a crash the uncommitted epochs are read again from Kafka, so it is removed at start.
const SPILLED: TableDefinition<u64, &[u8]> = TableDefinition::new("slow_stream_backlog");

/// A batch for the sketch thread: in memory (with its estimated size), or in the spill file.
enum Batch {
    Inline(Vec<LocatedInput>, usize),
    Spilled(u64),
}

enum ToSketcher {
    Events(u64, Batch),
    Close(u64),
}

/// A worker's spill file; removed when dropped.
struct Spill {
    path: PathBuf,
    db: Database,
}

impl Spill {
    fn open(config: &SlowStream, worker: usize) -> Result<Spill, String> {
        let path = config.spill_dir.join(format!("{}-worker{worker}.redb", config.name));
        // Scratch only: whatever an earlier run left is re-read from Kafka.
        let _ = std::fs::remove_file(&path);
        let db = Database::builder()
            .set_cache_size(16 << 20)
            .create(&path)
            .map_err(|e| format!("creating the spill file {}: {e}", path.display()))?;
        Ok(Spill { path, db })
    }

    fn put(&self, seq: u64, events: &[LocatedInput]) -> Result<(), String> {
        let bytes = postcard::to_allocvec(events).map_err(|e| e.to_string())?;
        let mut tx = self.db.begin_write().map_err(|e| e.to_string())?;
        // Scratch data: no fsync.
        tx.set_durability(Durability::None).map_err(|e| e.to_string())?;
        tx.open_table(SPILLED).map_err(|e| e.to_string())?.insert(seq, bytes.as_slice()).map_err(|e| e.to_string())?;
        tx.commit().map_err(|e| e.to_string())
    }

    fn take(&self, seq: u64) -> Result<Vec<LocatedInput>, String> {
        let mut tx = self.db.begin_write().map_err(|e| e.to_string())?;
        tx.set_durability(Durability::None).map_err(|e| e.to_string())?;
        let events = {
            let mut table = tx.open_table(SPILLED).map_err(|e| e.to_string())?;
            let bytes = table.remove(seq).map_err(|e| e.to_string())?.ok_or_else(|| format!("batch {seq} missing"))?;
            postcard::from_bytes(bytes.value()).map_err(|e| e.to_string())?
        };
        tx.commit().map_err(|e| e.to_string())?;
        Ok(events)
    }
}

impl Drop for Spill {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
            let (done, finished) = mpsc::channel::<(u64, Result<Vec<Partial>, String>)>();
            let in_memory = Arc::new(AtomicUsize::new(0));
            let spill = match Spill::open(&config, index) {
                Ok(spill) => Arc::new(spill),
                Err(e) => panic!("slow stream of worker {index}: {e}"),
            };
            let (thread_memory, thread_spill, delay) = (Arc::clone(&in_memory), Arc::clone(&spill), config.delay_per_epoch);
            std::thread::Builder::new()
                .name(format!("sketcher-{index}"))
                .spawn(move || {
                    let mut open: BTreeMap<u64, Result<EpochPartials, String>> = BTreeMap::new();
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

#[cfg(test)]
mod tests {
    use super::*;
    use videocount_events::Event;

    fn input(registry: &Registry, video: &str, ts_ms: u64, value: f64, viewer: &str) -> StatsInput {
        let bits = ["count", "p50", "uniq"].iter().fold(0, |m, f| m | (1 << registry.function(f).unwrap().aggregate));
        StatsInput {
            event: StatsEvent {
                event: Event { video_id: video.into(), event_type: "watch_time".into(), ts_ms },
                value: Some(value),
                viewer_id: Some(viewer.into()),
                function: None,
            },
            aggregates: bits,
        }
    }

    /// Three partitions' events, folded by two "workers", merged by the owner in either
    /// arrival order, and with events arriving in any order: the blocks are byte-identical.
    #[test]
    fn blocks_do_not_depend_on_arrival_order() {
        let registry = Registry::builtin();
        let all = u32::MAX;
        let day = 1_795_737_600_000u64;
        let events: Vec<(StatsInput, u32)> = (0..400u64)
            .map(|i| {
                (
                    input(
                        &registry,
                        ["a", "b"][(i % 2) as usize],
                        day + i * 7_000,
                        (i % 37) as f64 * 0.1,
                        &format!("u{}", i % 50),
                    ),
                    (i % 3) as u32,
                )
            })
            .collect();
        let fold = |partitions: &[u32], reversed: bool| {
            let mut partials = EpochPartials::new(registry.clone(), all);
            // Arrival order within a partition must not matter: feed each run reversed.
            let mut mine: Vec<LocatedInput> = events
                .iter()
                .enumerate()
                .filter(|(_, (_, p))| partitions.contains(p))
                .map(|(offset, (input, p))| (input.clone(), *p, offset as u64))
                .collect();
            if reversed {
                mine.reverse();
            }
            for located in mine {
                partials.absorb(located);
            }
            partials.finish()
        };
        let (left, right) = (fold(&[0, 2], false), fold(&[1], false));
        let blocks = |first: &[Partial], second: &[Partial]| {
            let mut epoch = StatsEpoch::default();
            for p in first.iter().chain(second).rev() {
                epoch.absorb(p.clone());
            }
            epoch.into_inserts(&registry, 9).unwrap()
        };
        let one = blocks(&left, &right);
        assert_eq!(one, blocks(&right, &left));
        // Events arriving in another order within their partitions: the same blocks.
        assert_eq!(one, blocks(&fold(&[0, 2], true), &fold(&[1], true)));
        assert_eq!(one.len(), 3);
        assert_eq!(one[0].table, "stats_minute");
        // 400 events 7 s apart over two videos: minutes per video, three aggregates each.
        assert!(one[0].rows > 3 * 2 * 20);
        assert_eq!(one[1].rows, 3 * 2);
    }
}
