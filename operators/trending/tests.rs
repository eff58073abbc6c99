use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::{Inspect, Probe};

use super::*;
use videocount_events::{Event, Located};

/// One event of a generated stream: event type, video, minute (as minutes from 0).
type Generated = (u8, u8, u32);

/// The lists the rows written so far say: per (event type, window), the newest epoch's rows.
type Lists = BTreeMap<(String, String), (u64, u64, Vec<(String, u64)>)>;

/// Video 11 is a freshness canary: in no list, and its minutes are not "now".
fn event((kind, video, minute): Generated) -> Located<Event> {
    let id = if video == 11 { format!("{CANARY_PREFIX}-{video}") } else { format!("v{video:02}") };
    let event = Event {
        video_id: CompactString::from(id),
        event_type: CompactString::from(["view", "like"][usize::from(kind % 2)]),
        ts_ms: u64::from(minute) * 60_000 + u64::from(video) * 7,
    };
    (event, 0, 0)
}

/// The lists recomputed from every event so far, as the module documents them.
fn brute_force(events: &[Generated], k: usize) -> Lists {
    let mut lists = Lists::new();
    let events: Vec<Generated> = events.iter().filter(|(_, video, _)| *video != 11).copied().collect();
    let events = &events;
    let Some(now) = events.iter().map(|(_, _, m)| m * 60).max() else { return lists };
    let kinds: BTreeSet<&str> = events.iter().map(|(kind, _, _)| ["view", "like"][usize::from(kind % 2)]).collect();
    for kind in kinds {
        for window in WINDOWS {
            let mut counts: BTreeMap<String, u64> = BTreeMap::new();
            for &generated in events {
                let (e, _, _) = event(generated);
                if e.event_type == kind && window.covers(now, e.ts_ms as u32 / 60_000 * 60) {
                    *counts.entry(e.video_id.to_string()).or_insert(0) += 1;
                }
            }
            let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
            ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            ranked.truncate(k);
            let (from, to) = window.range_ms(now);
            lists.insert((kind.to_owned(), window.name.to_owned()), (from, to, ranked));
        }
    }
    lists
}

/// Runs the dataflow epoch by epoch on `workers` workers (the events enter at worker 0), the
/// first epoch at time `first`; after each epoch, the lists its rows say, and all its rows.
fn run_on(
    workers: usize,
    epochs: Vec<Vec<Generated>>,
    k: usize,
    restored: Restored,
    first: u64,
) -> (Vec<Lists>, Vec<(u64, TopRow)>) {
    let rows: Arc<Mutex<Vec<(u64, TopRow)>>> = Arc::default();
    let sink = Arc::clone(&rows);
    let count = epochs.len();
    timely::execute(timely::Config::process(workers), move |worker| {
        let probe = ProbeHandle::new();
        let sink = Arc::clone(&sink);
        let (index, peers) = (worker.index(), worker.peers());
        // Each worker restores its videos' cells, as the job does.
        let mine = Restored {
            now: restored.now,
            cells: restored
                .cells
                .iter()
                .filter(|((_, video, _), _)| route(video) % peers as u64 == index as u64)
                .cloned()
                .collect(),
            lists: restored.lists.clone(),
        };
        let mut input = worker.dataflow::<u64, _, _>(|scope| {
            let (input, events) = scope.new_input::<Located<Event>>();
            trending(crate::count_events::count_epochs(events), k, mine)
                .inspect_core(move |event| {
                    if let Ok((stamp, rows)) = event {
                        let time = *stamp.least().expect("a time");
                        sink.lock().unwrap().extend(rows.iter().map(|row| (time, row.clone())));
                    }
                })
                .probe_with(&probe);
            input
        });
        input.advance_to(first);
        for (epoch, events) in epochs.iter().enumerate() {
            if index == 0 {
                for generated in events {
                    input.send(event(*generated));
                }
            }
            input.advance_to(first + epoch as u64 + 1);
            while probe.less_than(input.time()) {
                worker.step();
            }
        }
    })
    .expect("timely runs");
    let all = rows.lock().unwrap().clone();
    let seen = (0..count as u64)
        .map(|epoch| {
            let upto: Vec<(u64, TopRow)> = all.iter().filter(|(time, _)| *time <= first + epoch).cloned().collect();
            lists_of(&upto)
        })
        .collect();
    (seen, all)
}

fn run(epochs: Vec<Vec<Generated>>, k: usize, restored: Restored, first: u64) -> (Vec<Lists>, Vec<(u64, TopRow)>) {
    run_on(1, epochs, k, restored, first)
}

fn incremental(epochs: Vec<Vec<Generated>>, k: usize, restored: Restored) -> Vec<Lists> {
    run(epochs, k, restored, 0).0
}

fn lists_of(rows: &[(u64, TopRow)]) -> Lists {
    let mut newest: BTreeMap<(String, String), u64> = BTreeMap::new();
    for (epoch, row) in rows {
        let key = (row.event_type.clone(), row.window.clone());
        let at = newest.entry(key).or_insert(*epoch);
        *at = (*at).max(*epoch);
    }
    let mut lists = Lists::new();
    for (epoch, row) in rows {
        let key = (row.event_type.clone(), row.window.clone());
        if newest[&key] != *epoch {
            continue;
        }
        let list = lists.entry(key).or_insert((row.from_ms, row.to_ms, Vec::new()));
        if row.rank > 0 {
            list.2.push((row.video_id.clone(), row.count));
        }
    }
    lists
}

/// What brute force says, without the lists no event ever reached (the dataflow has none).
fn reached(mut lists: Lists, incremental: &Lists) -> Lists {
    lists.retain(|key, list| !list.2.is_empty() || incremental.contains_key(key));
    lists
}

fn generated() -> impl Strategy<Value = Vec<Vec<Generated>>> {
    // Minutes over three days, mostly moving forward, some late: windows open and close.
    let epoch = proptest::collection::vec((0u8..2, 0u8..12, 0u32..4320), 0..12);
    proptest::collection::vec(epoch, 1..12).prop_map(|mut epochs| {
        let mut base = 0;
        for events in &mut epochs {
            base += 90;
            for (_, _, minute) in events.iter_mut() {
                *minute = (*minute / 8 + base).saturating_sub(60);
            }
        }
        epochs
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// After every epoch, the lists equal a recomputation from every event so far.
    #[test]
    fn lists_equal_a_recomputation_after_every_epoch(epochs in generated(), k in 1usize..5) {
        let seen = incremental(epochs.clone(), k, Restored::default());
        let mut so_far = Vec::new();
        for (events, lists) in epochs.into_iter().zip(seen) {
            so_far.extend(events);
            prop_assert_eq!(reached(brute_force(&so_far, k), &lists), lists);
        }
    }

    /// A run stopped after `split` epochs and restored from their minute counts, newest minute
    /// and lists leaves the table (the first run's rows and its own) saying what a run that saw
    /// every epoch says, after every epoch.
    #[test]
    fn a_restored_run_leaves_the_lists_of_an_uninterrupted_one(
        epochs in generated(), k in 1usize..5, split in 0usize..12, workers in 1usize..3,
    ) {
        let split = split.min(epochs.len());
        let (whole, _) = run(epochs.clone(), k, Restored::default(), 0);
        let (_, before_rows) = run_on(workers, epochs[..split].to_vec(), k, Restored::default(), 0);
        let before: Vec<Generated> = epochs[..split].iter().flatten().copied().collect();
        let mut cells: BTreeMap<(CompactString, CompactString, u32), u64> = BTreeMap::new();
        for generated in before.iter().filter(|(_, video, _)| *video != 11) {
            let (e, _, _) = event(*generated);
            *cells.entry((e.event_type, e.video_id, videocount_events::minute_start(e.ts_ms))).or_insert(0) += 1;
        }
        let lists: BTreeSet<Key> = before_rows
            .iter()
            .map(|(_, row)| {
                let window = WINDOWS.iter().position(|w| w.name == row.window).expect("a window");
                (CompactString::from(row.event_type.as_str()), window as u8)
            })
            .collect();
        let restored = Restored {
            now: before.iter().filter(|(_, video, _)| *video != 11).map(|(_, _, m)| m * 60).max(),
            cells: cells.into_iter().collect(),
            lists: lists.into_iter().collect(),
        };
        let (_, after_rows) = run_on(workers, epochs[split..].to_vec(), k, restored, split as u64);
        // The table after each epoch of the restarted run: the rows before it and its own.
        for (epoch, expected) in whole.iter().enumerate().skip(split) {
            let mut table: Vec<(u64, TopRow)> = before_rows.clone();
            table.extend(after_rows.iter().filter(|(time, _)| *time <= epoch as u64).cloned());
            prop_assert_eq!(&lists_of(&table), expected, "after epoch {}", epoch);
        }
    }
}

/// The first epoch after a restart holds only a canary's event, on two workers: every worker
/// must add its restored cells in that same epoch (a list written there from one worker's
/// videos alone would be committed).
#[test]
fn a_restart_whose_first_epoch_is_a_canary_keeps_every_workers_videos() {
    let first: Vec<Generated> =
        (0..11).flat_map(|video| (0..=video).map(move |i| (0, video, 100 + u32::from(i)))).collect();
    let epochs = vec![first.clone(), vec![(0, 11, 120)], vec![(0, 3, 121)]];
    let (whole, _) = run_on(2, epochs.clone(), 5, Restored::default(), 0);
    let (_, before_rows) = run_on(2, epochs[..1].to_vec(), 5, Restored::default(), 0);
    let mut cells: BTreeMap<(CompactString, CompactString, u32), u64> = BTreeMap::new();
    for generated in &first {
        let (e, _, _) = event(*generated);
        *cells.entry((e.event_type, e.video_id, videocount_events::minute_start(e.ts_ms))).or_insert(0) += 1;
    }
    let lists: BTreeSet<Key> = before_rows
        .iter()
        .map(|(_, row)| {
            (
                CompactString::from(row.event_type.as_str()),
                WINDOWS.iter().position(|w| w.name == row.window).unwrap() as u8,
            )
        })
        .collect();
    let restored = Restored {
        now: first.iter().map(|(_, _, m)| m * 60).max(),
        cells: cells.into_iter().collect(),
        lists: lists.into_iter().collect(),
    };
    let (_, after_rows) = run_on(2, epochs[1..].to_vec(), 5, restored, 1);
    for (epoch, expected) in whole.iter().enumerate().skip(1) {
        let mut table = before_rows.clone();
        table.extend(after_rows.iter().filter(|(time, _)| *time <= epoch as u64).cloned());
        assert_eq!(&lists_of(&table), expected, "after epoch {epoch}");
    }
}

#[test]
fn windows_hold_the_minutes_after_now_minus_their_length() {
    let hour = WINDOWS[0];
    let now = 100 * 3600;
    assert!(hour.covers(now, now));
    assert!(hour.covers(now, now - 3540));
    assert!(!hour.covers(now, now - 3600));
    assert!(!hour.covers(now, now + 60));
    assert_eq!(hour.range_ms(now), ((now as u64 - 3540) * 1000, (now as u64 + 60) * 1000));
}

#[test]
fn ties_rank_the_smaller_video_first_and_an_empty_list_is_one_row() {
    let key: Key = ("view".into(), 0);
    let mut list: Map<CompactString, isize> = Map::default();
    assert_eq!(list_rows(&key, &list, 3600).len(), 1);
    assert_eq!(list_rows(&key, &list, 3600)[0].rank, 0);
    list.insert("b".into(), 2);
    list.insert("a".into(), 2);
    list.insert("c".into(), 5);
    let rows = list_rows(&key, &list, 3600);
    let order: Vec<(&str, u32)> = rows.iter().map(|r| (r.video_id.as_str(), r.rank)).collect();
    assert_eq!(order, [("c", 1), ("a", 2), ("b", 3)]);
}

/// A minute that many epochs count in: compaction keeps one entry per (event type, video) with
/// the sum, and the length stays within twice the distinct cells.
#[test]
fn a_minute_counted_by_many_epochs_compacts_to_its_sums() {
    let mut minute = MinuteCells::default();
    let mut expected: BTreeMap<(CompactString, CompactString), u64> = BTreeMap::new();
    for epoch in 0..200u64 {
        for video in 0..50u64 {
            let cell =
                (CompactString::from(["view", "like"][(video % 2) as usize]), CompactString::from(format!("v{video}")));
            let count = epoch % 7 + video;
            *expected.entry(cell.clone()).or_insert(0) += count;
            minute.push(cell, count, epoch);
        }
        assert!(minute.cells.len() < 2 * 1024, "epoch {epoch}: {} entries", minute.cells.len());
    }
    minute.compact();
    let compacted: BTreeMap<_, _> = minute.cells.iter().cloned().collect();
    assert_eq!(minute.cells.len(), 50);
    assert_eq!(compacted, expected);
}
