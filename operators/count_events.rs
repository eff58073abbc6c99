//! Counting events of one epoch per (video_id, event_type, minute), with hour and day rollups.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use compact_str::CompactString;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use videocount_clickhouse::rows::{CountRow, Grain, Insert, changes_block, counts_block};
use videocount_events::{Event, Located, route};

/// A fast, non-cryptographic hasher: keys come from our own validated events.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

use crate::flush_epochs::EpochState;

/// Counts of one epoch on one worker, keyed by minute; hours and days are derived at flush.
/// The event times too, for the changelog (`count_changes`).
#[derive(Debug, Default)]
pub struct EventCounts {
    /// (video, event type, minute) -> (count, the cell's number in order of arrival).
    minutes: Map<(CompactString, CompactString, u32), (u64, u32)>,
    /// Every event as its cell's number times 2^16 plus its milliseconds into the minute:
    /// sorted, a cell's times are together and in order.
    times: Vec<u64>,
}

impl EventCounts {
    pub fn add(&mut self, event: Event) {
        let minute = Grain::Minute.bucket(event.ts_ms);
        let into_minute = event.ts_ms - u64::from(minute) * 1000;
        let cells = self.minutes.len() as u32;
        let (count, cell) = self.minutes.entry((event.video_id, event.event_type, minute)).or_insert((0, cells));
        *count += 1;
        self.times.push(u64::from(*cell) << 16 | into_minute);
    }

    pub fn is_empty(&self) -> bool {
        self.minutes.is_empty()
    }

    /// The (video, event type, minute) counts.
    pub fn cells(&self) -> impl Iterator<Item = (&CompactString, &CompactString, u32, u64)> {
        self.minutes.iter().map(|((video, kind, minute), (n, _))| (video, kind, *minute, *n))
    }

    /// The rows of each grain, unsorted.
    pub fn rows(&self) -> [(Grain, Vec<CountRow>); 3] {
        let minutes = self.minutes.iter().map(|((v, k, b), (n, _))| ((v.to_string(), k.to_string(), *b), *n)).collect();
        let [hours, days] = self.rollups();
        [(Grain::Minute, minutes), hours, days]
    }

    /// The hour and day rows, unsorted.
    fn rollups(&self) -> [(Grain, Vec<CountRow>); 2] {
        let mut hours: Map<(CompactString, CompactString, u32), u64> = Map::default();
        let mut days: Map<(CompactString, CompactString, u32), u64> = Map::default();
        for ((video, kind, minute), (n, _)) in &self.minutes {
            let ts_ms = u64::from(*minute) * 1000;
            *hours.entry((video.clone(), kind.clone(), Grain::Hour.bucket(ts_ms))).or_insert(0) += n;
            *days.entry((video.clone(), kind.clone(), Grain::Day.bucket(ts_ms))).or_insert(0) += n;
        }
        let rows = |map: &Map<(CompactString, CompactString, u32), u64>| -> Vec<CountRow> {
            map.iter().map(|((v, k, b), n)| ((v.to_string(), k.to_string(), *b), *n)).collect()
        };
        [(Grain::Hour, rows(&hours)), (Grain::Day, rows(&days))]
    }

    /// The minute rows with the milliseconds into the minute of each of their events, sorted
    /// (the rows unsorted).
    pub fn timed_rows(&self) -> Vec<(CountRow, Vec<u16>)> {
        let mut times = self.times.clone();
        times.sort_unstable();
        // Where each cell's times start among them (cells in order of their number).
        let mut starts = vec![0; self.minutes.len() + 1];
        for (n, cell) in self.minutes.values() {
            starts[*cell as usize + 1] = *n as usize;
        }
        for i in 1..starts.len() {
            starts[i] += starts[i - 1];
        }
        self.minutes
            .iter()
            .map(|((v, k, b), (n, cell))| {
                let cell = *cell as usize;
                let offsets = times[starts[cell]..starts[cell + 1]].iter().map(|t| (t & 0xffff) as u16).collect();
                (((v.to_string(), k.to_string(), *b), *n), offsets)
            })
            .collect()
    }

    /// The epoch's blocks, in the order the query service's in-memory counts rely on: the
    /// minute rows with their event times into `count_changes` first, then one block per grain;
    /// nothing when the epoch counted nothing. The minute rows are made (and sorted) once for
    /// both of their blocks.
    pub fn inserts(&self, epoch: u64) -> Vec<Insert> {
        if self.is_empty() {
            return Vec::new();
        }
        let mut timed = self.timed_rows();
        let changes = changes_block(epoch, &mut timed);
        let mut minutes: Vec<CountRow> = timed.into_iter().map(|(row, _)| row).collect();
        let mut inserts = vec![changes, counts_block(Grain::Minute, epoch, &mut minutes)];
        inserts.extend(self.rollups().into_iter().map(|(grain, mut rows)| counts_block(grain, epoch, &mut rows)));
        inserts
    }
}

impl EpochState<Located> for EventCounts {
    fn absorb(&mut self, (event, _, _): Located) {
        self.add(event);
    }
}

/// Counts each epoch's events on the worker of their video ([`route`]): once the epoch is
/// complete there, its counts come out as one item (none for an epoch without events). Shared
/// (`Rc`) by the count blocks and the trending windows, which both read them.
pub fn count_epochs<'scope>(events: Stream<'scope, u64, Vec<Located>>) -> Stream<'scope, u64, Vec<Rc<EventCounts>>> {
    let pact = Exchange::new(|(event, _, _): &Located| route(&event.video_id));
    events.unary_frontier::<CapacityContainerBuilder<Vec<Rc<EventCounts>>>, _, _, _>(pact, "CountEpochs", |_, _| {
        let mut open: BTreeMap<u64, (Capability<u64>, EventCounts)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|stamp, data| {
                let Some(&epoch) = stamp.least() else { return };
                let (_, counts) = open.entry(epoch).or_insert_with(|| {
                    (stamp.retain_least(output.output_index()).expect("stamp has a time"), EventCounts::default())
                });
                for (event, _, _) in data.drain(..) {
                    counts.add(event);
                }
            });
            while let Some((&epoch, _)) = open.first_key_value() {
                if frontier.less_equal(&epoch) {
                    break;
                }
                let (capability, counts) = open.remove(&epoch).expect("first key exists");
                output.session(&capability).give(Rc::new(counts));
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// The plain computation: count each event into every grain directly from its time.
    fn reference(events: &[Event]) -> [BTreeMap<(String, String, u32), u64>; 3] {
        let mut out: [BTreeMap<(String, String, u32), u64>; 3] = Default::default();
        for event in events {
            for (i, grain) in Grain::ALL.iter().enumerate() {
                let key = (event.video_id.to_string(), event.event_type.to_string(), grain.bucket(event.ts_ms));
                *out[i].entry(key).or_insert(0) += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn counts_equal_a_direct_count_in_every_grain(
            events in proptest::collection::vec(
                ("[ab]{1,2}", prop_oneof![Just("view"), Just("like")], 1_700_000_000_000u64..1_700_300_000_000),
                0..300,
            )
        ) {
            let events: Vec<Event> = events
                .into_iter()
                .map(|(v, k, ts_ms)| Event { video_id: v.as_str().into(), event_type: k.into(), ts_ms })
                .collect();
            let mut counts = EventCounts::default();
            for event in events.clone() {
                counts.add(event);
            }
            let expected = reference(&events);
            for (i, (grain, rows)) in counts.rows().into_iter().enumerate() {
                prop_assert_eq!(grain, Grain::ALL[i]);
                let got: BTreeMap<_, _> = rows.into_iter().collect();
                prop_assert_eq!(&got, &expected[i]);
            }
            // Each minute row's times are its events' milliseconds into the minute, sorted.
            let mut times: BTreeMap<(String, String, u32), Vec<u16>> = BTreeMap::new();
            for event in &events {
                let minute = Grain::Minute.bucket(event.ts_ms);
                let key = (event.video_id.to_string(), event.event_type.to_string(), minute);
                times.entry(key).or_default().push((event.ts_ms - u64::from(minute) * 1000) as u16);
            }
            times.values_mut().for_each(|t| t.sort_unstable());
            let timed: BTreeMap<_, _> = counts.timed_rows().into_iter().map(|((key, n), t)| (key, (n, t))).collect();
            prop_assert_eq!(timed.len(), times.len());
            for (key, (n, got)) in timed {
                prop_assert_eq!(n, got.len() as u64);
                prop_assert_eq!(&got, &times[&key]);
            }
        }
    }

    fn event(video: &str, kind: &str, ts_ms: u64) -> Event {
        Event { video_id: video.into(), event_type: kind.into(), ts_ms }
    }

    #[test]
    fn inserts_are_the_changelog_then_one_block_per_grain_of_the_rows() {
        let mut counts = EventCounts::default();
        for (i, video) in ["b", "a", "c", "a", "b"].into_iter().enumerate() {
            counts.add(event(video, "view", 1_795_737_600_000 + i as u64 * 45_000));
        }
        let inserts = counts.inserts(9);
        let tables: Vec<&str> = inserts.iter().map(|insert| insert.table.as_str()).collect();
        assert_eq!(tables, ["count_changes", "event_counts_minute", "event_counts_hour", "event_counts_day"]);
        let blocks: Vec<Insert> =
            counts.rows().into_iter().map(|(grain, mut rows)| counts_block(grain, 9, &mut rows)).collect();
        for (made, expected) in inserts[1..].iter().zip(&blocks) {
            assert_eq!((&made.table, made.rows, &made.body), (&expected.table, expected.rows, &expected.body));
        }
        assert_eq!(inserts[0].body, changes_block(9, &mut counts.timed_rows()).body);
        assert!(EventCounts::default().inserts(9).is_empty());
    }

    #[test]
    fn rolls_minutes_up_to_hours_and_days() {
        let mut counts = EventCounts::default();
        let day = 1_795_737_600_000; // 2026-11-27T00:00:00Z
        counts.add(event("a", "view", day));
        counts.add(event("a", "view", day + 59_999));
        counts.add(event("a", "view", day + 60_000));
        counts.add(event("a", "view", day + 3_600_000));
        counts.add(event("a", "like", day + 1));
        counts.add(event("a", "view", day - 1));
        let [(_, mut minutes), (_, mut hours), (_, mut days)] = counts.rows();
        minutes.sort();
        hours.sort();
        days.sort();
        let key = |k: &str, b: u64| ("a".to_string(), k.to_string(), b as u32);
        let s = day / 1000;
        assert_eq!(
            minutes,
            vec![
                (key("like", s), 1),
                (key("view", s - 60), 1),
                (key("view", s), 2),
                (key("view", s + 60), 1),
                (key("view", s + 3600), 1)
            ]
        );
        assert_eq!(
            hours,
            vec![(key("like", s), 1), (key("view", s - 3600), 1), (key("view", s), 3), (key("view", s + 3600), 1)]
        );
        let d = s / 86_400;
        assert_eq!(days, vec![(key("like", d), 1), (key("view", d - 1), 1), (key("view", d), 4)]);
    }
}
