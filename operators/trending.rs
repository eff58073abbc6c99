//! Trending: per event type, the top K videos of the last hour and of the last 24 hours of event
//! time, kept up to date incrementally with differential dataflow.
//!
//! ```text
//!  epoch counts ─┬──────────────────────────▶ Window ─▶ counts in window ─▶ top_k ─▶ Top ─▶ rows
//!  (count_epochs)└─ newest minute ─broadcast─┴───────────────────────────────────────┘
//! ```
//!
//! - The input is each epoch's counts per (video, event type, minute) that the count blocks are
//!   made of ([`EventCounts`], on the worker of their video): no second pass over the events.
//! - **"Now" is event time**: the newest minute of any event counted so far (every worker learns
//!   every epoch's newest minute), never the wall clock, so a replay of the same events gives
//!   the same lists. A window of `s` seconds holds the minutes `m` with `now - s < m <= now`.
//! - [`Window`] holds, per worker, the minute counts of its videos for the largest window and
//!   turns each epoch into changes of the per-window counts: an epoch's new counts for minutes
//!   inside a window, and the old counts of minutes that "now" moved out of it. A late event for
//!   a minute still inside a window changes it; one for a minute outside does not.
//! - The counts in a window are a differential collection whose multiplicities are the counts
//!   (`((event type, window), video)` with multiplicity = count); [`top_k`] keeps its top K per
//!   (event type, window) through levels of hash buckets (256, 16, 1), so a change re-ranks
//!   its bucket at each level instead of every video of the window.
//! - [`Top`] applies the top lists' changes and, for every epoch that changed a list or moved
//!   "now", writes the whole list ([`TopRow`]s, `top_videos`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;

use compact_str::CompactString;
use differential_dataflow::AsCollection;
use differential_dataflow::collection::vec::Collection;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::{Broadcast, Map as _};
use timely::dataflow::operators::{Capability, InputCapability};
use timely::progress::frontier::MutableAntichain;
use videocount_clickhouse::rows::TopRow;
use videocount_events::{CANARY_PREFIX, TRENDING_WINDOWS, route};

use crate::count_events::EventCounts;

/// A fast, non-cryptographic hasher: keys come from our own validated events.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A sliding window of event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// As the API and `top_videos.period` name it.
    pub name: &'static str,
    pub seconds: u32,
}

/// The windows kept, smallest first; a key names one by its index.
pub const WINDOWS: [Window; 2] = [
    Window { name: TRENDING_WINDOWS[0].0, seconds: TRENDING_WINDOWS[0].1 },
    Window { name: TRENDING_WINDOWS[1].0, seconds: TRENDING_WINDOWS[1].1 },
];

/// The largest window: older minutes are in none.
const SPAN: u32 = TRENDING_WINDOWS[1].1;

impl Window {
    /// Whether the minute starting at `minute` (seconds) is inside the window when the newest
    /// minute is `now`.
    pub fn covers(self, now: u32, minute: u32) -> bool {
        minute <= now && u64::from(minute) + u64::from(self.seconds) > u64::from(now)
    }

    /// The window as `[from, to)` in epoch milliseconds.
    pub fn range_ms(self, now: u32) -> (u64, u64) {
        let to = (u64::from(now) + 60) * 1000;
        (to.saturating_sub(u64::from(self.seconds) * 1000), to)
    }
}

/// A list: an event type and the index of its window in [`WINDOWS`].
pub type Key = (CompactString, u8);
/// A video as the top K ranks it: its [`route`] hash first (buckets, and cheap comparisons in
/// differential's sorts), then its id.
pub type Video = (u64, CompactString);
/// A video's count in a window, as a differential update: multiplicity = count.
pub type Update = ((Key, Video), u64, isize);
/// An (event type, video, minute).
pub type CellKey = (CompactString, CompactString, u32);
/// A cell and its count.
pub type Cell = (CellKey, u64);

/// What a restarted job knew as of its last committed epoch: the newest minute and the minute
/// counts of the largest window (of this worker's videos).
#[derive(Clone, Debug, Default)]
pub struct Restored {
    pub now: Option<u32>,
    pub cells: Vec<Cell>,
    /// The lists written before (all workers'): each is written again when "now" moves, even
    /// when it stays empty.
    pub lists: Vec<Key>,
}

/// One worker's minute counts of the largest window, and "now". See the module documentation.
#[derive(Debug, Default)]
pub struct WindowCells {
    now: Option<u32>,
    /// minute -> its counts per (event type, video).
    minutes: BTreeMap<u32, MinuteCells>,
    /// An epoch's changes per (event type, video) and window, summed before they leave: a
    /// video counted in many minutes of an epoch (a catch-up's epoch spans hours of event time)
    /// is one update per window, not one per minute, for differential to sort.
    sums: Map<(CompactString, CompactString), [isize; WINDOWS.len()]>,
    /// Epochs advanced so far (numbers the appends of [`MinuteCells`]).
    epochs: u64,
}

/// The counts of one minute per (event type, video), in the order they came: a (event type,
/// video) that several epochs counted in the minute is there once per epoch until the next
/// compaction (appending is what an epoch does most, and costs no hash probe; readers only sum).
#[derive(Debug, Default)]
struct MinuteCells {
    cells: Vec<((CompactString, CompactString), u64)>,
    /// The length after the last compaction.
    compacted: usize,
    /// Epochs that appended since the last compaction, and the last of them.
    epochs: u32,
    last_epoch: u64,
}

impl MinuteCells {
    /// Appends a cell counted in epoch number `epoch` (of this worker's window).
    fn push(&mut self, cell: (CompactString, CompactString), count: u64, epoch: u64) {
        if self.last_epoch != epoch || self.epochs == 0 {
            self.last_epoch = epoch;
            self.epochs += 1;
        }
        self.cells.push((cell, count));
        if self.cells.len() >= (2 * self.compacted).max(1024) {
            self.compact();
        }
    }

    /// One entry per (event type, video), summed.
    fn compact(&mut self) {
        self.cells.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let mut kept: usize = 0;
        for i in 0..self.cells.len() {
            if kept > 0 && self.cells[kept - 1].0 == self.cells[i].0 {
                let count = self.cells[i].1;
                self.cells[kept - 1].1 += count;
            } else {
                self.cells.swap(kept, i);
                kept += 1;
            }
        }
        self.cells.truncate(kept);
        self.compacted = kept;
        self.epochs = 0;
    }
}

impl WindowCells {
    pub fn restored(restored: Restored) -> WindowCells {
        let mut cells = WindowCells { now: restored.now, ..WindowCells::default() };
        for ((event_type, video, minute), count) in restored.cells {
            if cells.now.is_some_and(|now| u64::from(minute) + u64::from(SPAN) > u64::from(now)) {
                cells.minutes.entry(minute).or_default().push((event_type, video), count, 0);
            }
        }
        cells
    }

    /// Everything held, as additions to the windows that cover it (what a restarted job adds
    /// before its first epoch).
    pub fn contributions(&self, out: &mut Vec<((Key, Video), isize)>) {
        let Some(now) = self.now else { return };
        for (&minute, cells) in &self.minutes {
            for ((event_type, video), count) in &cells.cells {
                push_covered(now, minute, event_type, video, *count as isize, out);
            }
        }
    }

    /// Applies one epoch: its new counts and the newest minute any worker saw in it. Pushes the
    /// changes of the windows' counts.
    pub fn advance(
        &mut self,
        newest: Option<u32>,
        cells: impl IntoIterator<Item = Cell>,
        out: &mut Vec<((Key, Video), isize)>,
    ) {
        let before = self.now;
        let Some(now) = before.max(newest) else { return };
        self.epochs += 1;
        let sums = &mut self.sums;
        // Minutes "now" moved out of a window: their counts leave it.
        if let Some(before) = before.filter(|&b| b < now) {
            for (index, window) in WINDOWS.iter().enumerate() {
                let first_out = before.saturating_sub(window.seconds - 60);
                for (&minute, cells) in self.minutes.range(first_out..) {
                    if window.covers(now, minute) {
                        break;
                    }
                    for (cell, count) in &cells.cells {
                        sums.entry(cell.clone()).or_default()[index] -= *count as isize;
                    }
                }
            }
        }
        let oldest_kept = now.saturating_sub(SPAN - 60);
        let mut minutes = self.minutes.split_off(&oldest_kept);
        for ((event_type, video, minute), count) in cells {
            if minute < oldest_kept {
                continue; // older than every window
            }
            let cell = (event_type, video);
            let sum = sums.entry(cell.clone()).or_default();
            for (index, window) in WINDOWS.iter().enumerate() {
                if window.covers(now, minute) {
                    sum[index] += count as isize;
                }
            }
            minutes.entry(minute).or_default().push(cell, count, self.epochs);
        }
        // Minutes "now" moved past are mostly complete: one entry per cell, no spare capacity.
        if let Some(before) = before.filter(|&b| b < now) {
            for (_, cells) in minutes.range_mut(before..now) {
                // Appended to by several epochs since its last compaction: maybe the same cells.
                if cells.epochs > 1 {
                    cells.compact();
                    cells.cells.shrink_to_fit();
                }
            }
        }
        self.minutes = minutes;
        // A large epoch (a catch-up, a jump of "now") leaves no large table behind to scan.
        let used = sums.len();
        for ((event_type, video), diffs) in sums.drain() {
            let hash = route(&video);
            for (index, diff) in diffs.into_iter().enumerate() {
                if diff != 0 {
                    out.push((((event_type.clone(), index as u8), (hash, video.clone())), diff));
                }
            }
        }
        if sums.capacity() > (8 * used).max(1 << 12) {
            sums.shrink_to(2 * used);
        }
        self.now = Some(now);
    }
}

fn push_covered(
    now: u32,
    minute: u32,
    event_type: &CompactString,
    video: &CompactString,
    diff: isize,
    out: &mut Vec<((Key, Video), isize)>,
) {
    let mut hash = None;
    for (index, window) in WINDOWS.iter().enumerate() {
        if window.covers(now, minute) {
            let hash = *hash.get_or_insert_with(|| route(video));
            out.push((((event_type.clone(), index as u8), (hash, video.clone())), diff));
        }
    }
}

/// The top `k` of each key of a collection whose multiplicities are counts: the same collection
/// restricted to each key's `k` largest counts (ties: the smaller video first). Hierarchical:
/// each level keeps the top `k` of a hash bucket (256, then 16), then of all: a change re-ranks
/// its bucket (at a million videos, about 4,000) and at most 16 k candidates per level above.
pub fn top_k<'scope>(
    counts: Collection<'scope, u64, (Key, Video), isize>,
    k: usize,
) -> Collection<'scope, u64, (Key, Video), isize> {
    // The bucket comes first in the reduce's key: differential's sorts compare it before the
    // event type's string.
    let bucket = |video: &Video, bits: u32| video.0 & ((1u64 << bits) - 1);
    let mut level = counts.map(move |(key, video)| {
        let b = bucket(&video, 8);
        ((b, key), video)
    });
    for (bits, next) in [(8, 4), (4, 0)] {
        level = level.reduce_named(&format!("TopK{bits}"), move |_key, input, output| keep_top(input, k, output)).map(
            move |((_, key), video)| {
                let b = bucket(&video, next);
                ((b, key), video)
            },
        );
    }
    level
        .reduce_named("TopK0", move |_key, input, output| keep_top(input, k, output))
        .map(|((_, key), video)| (key, video))
}

/// The `k` largest counts of a group (ties: the smaller video id), in the reduce's output.
fn keep_top(input: &[(&Video, isize)], k: usize, output: &mut Vec<(Video, isize)>) {
    let mut items: Vec<(isize, &Video)> = input.iter().filter(|(_, n)| *n > 0).map(|(video, n)| (*n, *video)).collect();
    let order = |a: &(isize, &Video), b: &(isize, &Video)| b.0.cmp(&a.0).then_with(|| a.1.1.cmp(&b.1.1));
    if items.len() > k {
        items.select_nth_unstable_by(k, order);
        items.truncate(k);
    }
    output.extend(items.into_iter().map(|(n, video)| (video.clone(), n)));
}

/// The whole trending dataflow on each epoch's counts ([`count_epochs`]: already on the
/// worker of their video): the rows of `top_videos` each epoch writes. `restored`: this worker's
/// share of what the last committed epoch left (its videos by [`route`]), added in the first
/// epoch that has events.
///
/// [`count_epochs`]: crate::count_events::count_epochs
pub fn trending<'scope>(
    counts: Stream<'scope, u64, Vec<Rc<EventCounts>>>,
    k: usize,
    restored: Restored,
) -> Stream<'scope, u64, Vec<TopRow>> {
    // Every worker with counts in an epoch says so, with its newest minute if it has one (not
    // when it counted only canaries): every worker then sees every epoch that has counts, and
    // the same first one, where the restored cells enter.
    let newest = counts.clone().map(|counts| counted_cells(&counts).map(|(_, _, minute, _)| minute).max()).broadcast();
    let (restored_now, restored_lists) = (restored.now, restored.lists.clone());
    let windows = window(counts, newest.clone(), restored);
    let top = top_k(windows, k);
    rows(top.inner, newest, restored_now, restored_lists)
}

/// The worker of a list in [`rows`].
fn list_worker(key: &Key) -> u64 {
    route(&key.0).wrapping_add(u64::from(key.1))
}

/// The cells an epoch's counts give the windows: all but the freshness canaries' videos.
fn counted_cells(counts: &EventCounts) -> impl Iterator<Item = (&CompactString, &CompactString, u32, u64)> {
    counts.cells().filter(|(video, _, _, _)| !video.starts_with(CANARY_PREFIX))
}

/// An epoch not yet complete: its capability, what arrived, the newest minute.
type Pending<D> = (Capability<u64>, Vec<D>, Option<u32>);
/// The epochs not yet complete.
type Open<D> = BTreeMap<u64, Pending<D>>;

/// Notes an epoch's newest minutes (from the broadcast) in `open`.
fn note_newest<D>(open: &mut Open<D>, stamp: &InputCapability<u64>, data: &[Option<u32>], port: usize) {
    let Some(&epoch) = stamp.least() else { return };
    let entry =
        open.entry(epoch).or_insert_with(|| (stamp.retain_least(port).expect("stamp has a time"), Vec::new(), None));
    entry.2 = entry.2.max(data.iter().flatten().copied().max());
}

/// The oldest open epoch, once neither input can reach it any more.
fn next_complete<D>(
    open: &mut Open<D>,
    data: &MutableAntichain<u64>,
    newest: &MutableAntichain<u64>,
) -> Option<(u64, Pending<D>)> {
    let (&epoch, _) = open.first_key_value()?;
    if data.less_equal(&epoch) || newest.less_equal(&epoch) {
        return None;
    }
    open.remove_entry(&epoch)
}

/// The counts of each window as a collection (see [`WindowCells`]).
fn window<'scope>(
    counts: Stream<'scope, u64, Vec<Rc<EventCounts>>>,
    newest: Stream<'scope, u64, Vec<Option<u32>>>,
    restored: Restored,
) -> Collection<'scope, u64, (Key, Video), isize> {
    counts
        .binary_frontier::<_, CapacityContainerBuilder<Vec<Update>>, _, _, _, _>(
            newest,
            Pipeline,
            Pipeline,
            "TrendingWindow",
            move |_, _| {
                let mut state = WindowCells::restored(restored);
                let mut started = false;
                let mut open: Open<Rc<EventCounts>> = BTreeMap::new();
                let mut changes = Vec::new();
                move |(counts, counts_frontier), (newest, newest_frontier), output| {
                    counts.for_each(|stamp, data| {
                        let Some(&epoch) = stamp.least() else { return };
                        let entry = open.entry(epoch).or_insert_with(|| {
                            (stamp.retain_least(output.output_index()).expect("stamp has a time"), Vec::new(), None)
                        });
                        entry.1.append(data);
                    });
                    let port = output.output_index();
                    newest.for_each(|stamp, data| note_newest(&mut open, &stamp, data, port));
                    while let Some((epoch, (capability, counts, newest))) =
                        next_complete(&mut open, counts_frontier, newest_frontier)
                    {
                        if !started {
                            started = true;
                            state.contributions(&mut changes);
                        }
                        let cells = counts.iter().flat_map(|counts| counted_cells(counts)).map(
                            |(video, event_type, minute, count)| ((event_type.clone(), video.clone(), minute), count),
                        );
                        state.advance(newest, cells, &mut changes);
                        let mut session = output.session(&capability);
                        for (data, diff) in changes.drain(..) {
                            session.give((data, epoch, diff));
                        }
                    }
                }
            },
        )
        .as_collection()
}

/// Applies the top lists' changes; for each epoch, the rows of the lists it changed (all of
/// this worker's lists when "now" moved).
fn rows<'scope>(
    top: Stream<'scope, u64, Vec<Update>>,
    newest: Stream<'scope, u64, Vec<Option<u32>>>,
    restored_now: Option<u32>,
    restored_lists: Vec<Key>,
) -> Stream<'scope, u64, Vec<TopRow>> {
    let (index, peers) = (top.scope().index() as u64, top.scope().peers() as u64);
    top.binary_frontier::<_, CapacityContainerBuilder<Vec<TopRow>>, _, _, _, _>(
        newest,
        Exchange::new(|((key, _), _, _): &Update| list_worker(key)),
        Pipeline,
        "TrendingTop",
        move |_, _| {
            let mut now = restored_now;
            // This worker's lists, the ones written before included.
            let mut lists: BTreeMap<Key, Map<CompactString, isize>> = restored_lists
                .into_iter()
                .filter(|key| list_worker(key) % peers == index)
                .map(|key| (key, Map::default()))
                .collect();
            let mut open: Open<((Key, Video), isize)> = BTreeMap::new();
            move |(top, top_frontier), (newest, newest_frontier), output| {
                top.for_each(|stamp, data| {
                    for (data, time, diff) in data.drain(..) {
                        let entry = open
                            .entry(time)
                            .or_insert_with(|| (stamp.delayed(&time, output.output_index()), Vec::new(), None));
                        entry.1.push((data, diff));
                    }
                });
                let port = output.output_index();
                newest.for_each(|stamp, data| note_newest(&mut open, &stamp, data, port));
                while let Some((_, (capability, changes, newest))) =
                    next_complete(&mut open, top_frontier, newest_frontier)
                {
                    let mut changed = BTreeSet::new();
                    for ((key, (_, video)), diff) in changes {
                        let list = lists.entry(key.clone()).or_default();
                        let count = list.entry(video.clone()).or_insert(0);
                        *count += diff;
                        if *count == 0 {
                            list.remove(&video);
                        }
                        changed.insert(key);
                    }
                    let moved = newest.is_some_and(|n| now.is_none_or(|before| n > before));
                    now = now.max(newest);
                    let Some(now) = now else { continue };
                    let keys: Vec<Key> =
                        if moved { lists.keys().cloned().collect() } else { changed.into_iter().collect() };
                    let mut session = output.session(&capability);
                    for key in keys {
                        let list = &lists[&key];
                        session.give_iterator(list_rows(&key, list, now).into_iter());
                    }
                }
            }
        },
    )
}

/// The rows of one list as of `now`: ranked by count, then video id; an empty list is one row
/// of rank 0.
fn list_rows(key: &Key, list: &Map<CompactString, isize>, now: u32) -> Vec<TopRow> {
    let window = WINDOWS[usize::from(key.1)];
    let (from_ms, to_ms) = window.range_ms(now);
    let mut items: Vec<(&CompactString, isize)> = list.iter().map(|(video, n)| (video, *n)).collect();
    items.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let row = |rank: u32, video_id: String, count: u64| TopRow {
        event_type: key.0.to_string(),
        window: window.name.to_owned(),
        from_ms,
        to_ms,
        rank,
        video_id,
        count,
    };
    if items.is_empty() {
        return vec![row(0, String::new(), 0)];
    }
    items.into_iter().enumerate().map(|(i, (video, n))| row(i as u32 + 1, video.to_string(), n.max(0) as u64)).collect()
}

#[cfg(test)]
mod tests;
