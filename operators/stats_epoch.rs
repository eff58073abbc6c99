//! `event_stats`' per-epoch states: the partial states one worker folds of an epoch's events
//! ([`EpochPartials`]), and the merge of every worker's partials into minute, hour and day rows
//! by the videos' owner ([`StatsEpoch`]).
//!
//! Each worker folds the events it read into one state per (partition, video, type,
//! aggregate, minute), in offset order, and sends those partial states to the video's owner,
//! which merges them in partition order. Floating-point sums and sketches therefore see the
//! same operations in the same order whenever an epoch is re-run: the written block is
//! byte-identical, and ClickHouse drops the repeat (docs/exactly-once.md).

use std::collections::HashMap;

use compact_str::CompactString;
use serde::{Deserialize, Serialize};
use videocount_aggregates::{AggregateId, DecodeError, Moments, Registry, Sample, State};
use videocount_clickhouse::rows::{Grain, Insert, STATS_CHANGES, StatsRow, stats_block};
use videocount_events::StatsEvent;

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
pub type LocatedInput = videocount_events::Located<StatsInput>;

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
    pub fn into_inserts(self, registry: &Registry, epoch: u64) -> Result<Vec<Insert>, DecodeError> {
        if self.partials.is_empty() {
            return Ok(Vec::new());
        }
        let mut partials = self.partials;
        partials.sort_unstable_by(|a, b| (&a.key, a.partition).cmp(&(&b.key, b.partition)));
        // Sorted: the partials of one key are adjacent, in partition order.
        let mut minutes: Vec<(StatsKey, Merged)> = Vec::new();
        for partial in partials {
            let aggregate = registry.get(partial.key.2);
            let state = aggregate.decode(&partial.state)?;
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
        let mut inserts: Vec<Insert> = [
            (Grain::Minute, minutes),
            (Grain::Hour, hours.into_iter().collect()),
            (Grain::Day, days.into_iter().collect()),
        ]
        .into_iter()
        .map(|(grain, merged)| stats_block(grain, epoch, false, &mut rows(merged)))
        .collect();
        // The query service's changelog: the minute block again, in a table sorted by epoch
        // (docs/reads-from-memory.md). Same columns, so the same bytes.
        let changes = Insert { table: STATS_CHANGES.into(), body: inserts[0].body.clone(), rows: inserts[0].rows };
        inserts.insert(0, changes);
        Ok(inserts)
    }
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
        assert_eq!(one.len(), 4);
        // The changelog first: the minute block again.
        assert_eq!((one[0].table.as_str(), one[1].table.as_str()), ("stats_changes", "stats_minute"));
        assert_eq!((&one[0].body, one[0].rows), (&one[1].body, one[1].rows));
        // 400 events 7 s apart over two videos: minutes per video, three aggregates each.
        assert!(one[1].rows > 3 * 2 * 20);
        assert_eq!(one[2].rows, 3 * 2);
    }
}
