//! Counting an `event_id` once: the window of event ids one partition remembers.
//!
//! A client keeps an event's id across its retries, and the ingest service keys every message
//! by video, so every copy of an event lands in the same partition, after the first. The rule
//! is a function of the partition's log alone: **an event is a duplicate when a valid event
//! with the same id is at an offset less than `window` before its own** (whether that one was
//! counted or was itself a duplicate: a rule that looked at what was counted would depend on
//! the whole history before the window, and a rebuilt window could not know it). The source
//! applies it in offset order as it parses, so a re-run epoch decides exactly as the first run
//! did, and both jobs of a topic decide alike. A copy of a rejected message is counted (the
//! rejected one was not).
//!
//! After a restart the window is rebuilt by reading the `window` offsets before the first
//! offset the source counts (without counting them): the same messages, so the same state.
//! Only ids take memory: 32 bytes in the queue and about 36 in the map per id (at its load
//! factor), so about 70 MB per million ids in the window; events without an id are counted as
//! before and cost nothing.

use std::collections::{HashMap, VecDeque};

use videocount_events::EventId;

/// The ids of one partition's valid events at offsets in `[next - window, next)`.
#[derive(Debug)]
pub struct DedupWindow {
    window: u64,
    /// `(offset, Kafka timestamp ms, id)` of each event with an id, in offset order.
    seen: VecDeque<(u64, i64, EventId)>,
    /// Each id in `seen`, with the offset of its newest copy.
    /// Hashed again with a seed of this process: ids are the senders' choice, and an unseeded
    /// hash would let one craft ids that all fall in one bucket.
    newest: HashMap<EventId, u64, foldhash::fast::RandomState>,
    /// The first offset fed (the warm-up's start).
    first_offset: Option<u64>,
}

impl DedupWindow {
    /// A window of `window` offsets (at least 1).
    pub fn new(window: u64) -> Self {
        DedupWindow { window: window.max(1), seen: VecDeque::new(), newest: HashMap::default(), first_offset: None }
    }

    /// Whether the valid event with `id` at `offset` is a duplicate (another copy is less than
    /// `window` offsets before it); it is remembered either way. Offsets must increase.
    pub fn is_duplicate(&mut self, offset: u64, message_ms: i64, id: EventId) -> bool {
        self.first_offset.get_or_insert(offset);
        while let Some(&(first, _, old)) = self.seen.front() {
            if first.saturating_add(self.window) > offset {
                break;
            }
            self.seen.pop_front();
            if self.newest.get(&old) == Some(&first) {
                self.newest.remove(&old);
            }
        }
        let duplicate = self.newest.insert(id, offset).is_some();
        self.seen.push_back((offset, message_ms, id));
        duplicate
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// The window's offsets.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// Whether the window spans all of its offsets before `next` (it has seen that many since
    /// it started), so that its reach in time is set by the rate, not by its start.
    pub fn full(&self, next: u64) -> bool {
        self.first_offset.is_some_and(|first| next.saturating_sub(first) >= self.window)
    }

    /// Kafka timestamp (ms) of the oldest id remembered.
    pub fn oldest_ms(&self) -> Option<i64> {
        self.seen.front().map(|(_, ms, _)| *ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn an_id_seen_within_the_window_is_a_duplicate_and_not_after() {
        let mut window = DedupWindow::new(10);
        assert!(!window.is_duplicate(100, 0, 7));
        assert!(window.is_duplicate(105, 0, 7));
        assert!(window.is_duplicate(114, 0, 7), "9 offsets after the copy at 105");
        assert!(!window.is_duplicate(124, 0, 7), "10 after the newest copy: counted again");
        assert!(!window.is_duplicate(125, 0, 8));
        assert_eq!(window.len(), 2, "100, 105 and 114 have left the window");
    }

    /// The window's decisions from `count_from` on, fed the log from `warm_from`.
    fn decisions(log: &[(u64, u128)], window: u64, warm_from: u64, count_from: u64) -> Vec<(u64, bool)> {
        let mut dedup = DedupWindow::new(window);
        let mut out = Vec::new();
        for &(offset, id) in log.iter().filter(|(o, _)| *o >= warm_from) {
            let duplicate = dedup.is_duplicate(offset, 0, id);
            if offset >= count_from {
                out.push((offset, duplicate));
            }
        }
        out
    }

    proptest! {
        /// Fed only the `window` offsets before the resume point (what a restart reads), the
        /// window decides as one that saw the whole log.
        #[test]
        fn a_rebuilt_window_decides_as_the_first_run_did(
            ids in proptest::collection::vec(0u128..40, 1..400),
            gaps in proptest::collection::vec(1u64..4, 400),
            window in 1u64..60,
            cut in 0usize..400,
        ) {
            // Offsets with gaps (control records take offsets too).
            let mut offset = 0;
            let log: Vec<(u64, u128)> = ids.iter().zip(&gaps).map(|(id, gap)| { offset += gap; (offset, *id) }).collect();
            let resume = log[cut % log.len()].0;
            let whole = decisions(&log, window, 0, resume);
            let rebuilt = decisions(&log, window, resume.saturating_sub(window), resume);
            prop_assert_eq!(whole, rebuilt);
        }
    }
}
