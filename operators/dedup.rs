//! Counting an `event_id` once: the event ids one partition remembers.
//!
//! A client keeps an event's id across its retries, and the ingest service keys every message
//! by video, so every copy of an event lands in the same partition, after the first. The rule
//! is a function of the partition's log alone. Offsets are cut into *chunks* of `window`
//! offsets (chunk `offset / window`): **an event is a duplicate when a valid event with the same
//! id came before it in its own chunk or in the chunk before.** So a copy less than `window`
//! offsets after an earlier one is always a duplicate, and one `2 x window` or more after it
//! never is. The rule looks at the messages before it, not at what was counted (whether an
//! earlier copy was itself a duplicate would depend on the whole history before the chunks, and
//! no rebuilt window could know it). The source applies it in offset order as it parses, so a
//! re-run epoch decides exactly as the first run did, and both jobs of a topic decide alike. A
//! copy of a rejected message is counted (the rejected one was not).
//!
//! After a restart the window is rebuilt by reading from the start of the chunk before the one
//! holding the first offset the source counts (without counting): the same messages, so the
//! same state. Only ids take memory: one table holds each id of the current and the previous
//! chunk with the chunk it last came in, 24 bytes and the table's overhead each (about 25-55 MB
//! per million ids remembered, up to `2 x window` per partition); events without an id are
//! counted as before and cost nothing. An event is one probe of the table; when a chunk ends,
//! the ids of the chunk before it leave, and the table keeps its size, so a busy partition
//! allocates nothing once it is grown.

use std::collections::HashMap;

use videocount_events::EventId;

/// The ids of one partition's valid events in the current chunk and the one before.
#[derive(Debug)]
pub struct DedupWindow {
    window: u64,
    /// The current chunk's number, once an event was fed.
    chunk: Option<u64>,
    /// Each id with the chunk it last came in (its low 32 bits): only the current and the
    /// previous chunk are ever in it. Hashed again with a seed of this process: ids are the
    /// senders' choice, and an unseeded hash would let one craft ids that all fall in one bucket.
    ids: HashMap<(u64, u64), u32, foldhash::fast::RandomState>,
    /// Kafka timestamps (ms) of the first events fed in the current and the previous chunk.
    current_first_ms: Option<i64>,
    previous_first_ms: Option<i64>,
    /// Chunks entered at their start (not the one the warm-up began in): once two were, the
    /// previous one is complete and its time span says how far back `window` offsets reach.
    chunks_entered: u64,
}

impl DedupWindow {
    /// Chunks of `window` offsets (at least 1).
    pub fn new(window: u64) -> Self {
        DedupWindow {
            window: window.max(1),
            chunk: None,
            ids: HashMap::default(),
            current_first_ms: None,
            previous_first_ms: None,
            chunks_entered: 0,
        }
    }

    /// Where a window that counts from `start` must start reading: the start of the chunk
    /// before `start`'s.
    pub fn warm_up_from(&self, start: u64) -> u64 {
        (start / self.window).saturating_sub(1) * self.window
    }

    /// Whether the valid event with `id` at `offset` is a duplicate (the same id came before
    /// it in its chunk or the one before); it is remembered either way. Offsets must increase.
    pub fn is_duplicate(&mut self, offset: u64, message_ms: i64, id: EventId) -> bool {
        let chunk = offset / self.window;
        match self.chunk {
            Some(current) if current == chunk => {}
            Some(current) => {
                if chunk == current + 1 {
                    // The ids of the chunk before the new previous one can match nothing now.
                    let previous = current as u32;
                    self.ids.retain(|_, seen| *seen == previous);
                    self.previous_first_ms = self.current_first_ms.take();
                } else {
                    // A gap of a whole chunk or more: nothing before it counts any more.
                    self.ids.clear();
                    self.previous_first_ms = None;
                    self.current_first_ms = None;
                }
                self.chunks_entered += 1;
                self.chunk = Some(chunk);
            }
            None => self.chunk = Some(chunk),
        }
        self.current_first_ms.get_or_insert(message_ms);
        // Every id in the table came in this chunk or the one before.
        self.ids.insert(((id >> 64) as u64, id as u64), chunk as u32).is_some()
    }

    /// Ids remembered.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The chunk length in offsets.
    pub fn window(&self) -> u64 {
        self.window
    }

    /// How long the last complete chunk took (ms of Kafka time): how far back `window` offsets
    /// reach at the partition's rate. `None` until a chunk was read whole.
    pub fn chunk_ms(&self) -> Option<i64> {
        if self.chunks_entered < 2 {
            return None;
        }
        Some(self.current_first_ms? - self.previous_first_ms?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_copy_within_the_window_is_a_duplicate_and_one_two_windows_later_is_not() {
        let mut window = DedupWindow::new(10);
        assert!(!window.is_duplicate(100, 0, 7));
        assert!(window.is_duplicate(105, 0, 7), "same chunk");
        assert!(window.is_duplicate(114, 0, 7), "the next chunk");
        assert!(!window.is_duplicate(134, 0, 7), "two chunks after the last copy: counted again");
        assert!(!window.is_duplicate(135, 0, 8));
        assert!(window.is_duplicate(141, 0, 8), "the chunk after");
        assert!(!window.is_duplicate(160, 0, 8), "a whole chunk skipped");
        assert_eq!(window.warm_up_from(105), 90);
        assert_eq!(window.warm_up_from(5), 0);
    }

    #[test]
    fn the_reach_is_the_time_a_whole_chunk_took() {
        let mut window = DedupWindow::new(10);
        window.is_duplicate(5, 1_000, 1);
        window.is_duplicate(12, 2_000, 2);
        assert_eq!(window.chunk_ms(), None, "the first chunk began mid-way");
        window.is_duplicate(20, 7_000, 3);
        assert_eq!(window.chunk_ms(), Some(5_000));
        assert_eq!(window.len(), 2);
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
        /// The window decides as the rule says, looked up by brute force over the log.
        #[test]
        fn the_window_follows_the_rule(
            ids in proptest::collection::vec(0u128..30, 1..400),
            gaps in proptest::collection::vec(1u64..25, 400),
            window in 1u64..40,
        ) {
            // Ids with both halves in use; offsets far enough for chunk numbers to pass 2^32
            // with the smallest windows.
            let mut offset = (1u64 << 32) * window.min(2) - 200;
            let spread = |id: u128| id.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835) ^ (id << 100);
            let log: Vec<(u64, u128)> =
                ids.iter().zip(&gaps).map(|(id, gap)| { offset += gap; (offset, spread(*id)) }).collect();
            let decided = decisions(&log, window, 0, 0);
            for (i, &(offset, id)) in log.iter().enumerate() {
                let chunk = offset / window;
                let expected = log[..i].iter().any(|&(o, other)| other == id && o / window + 1 >= chunk);
                prop_assert_eq!(decided[i], (offset, expected), "offset {}", offset);
            }
        }

        /// Fed only from the start of the chunk before the resume point's (what a restart
        /// reads), the window decides as one that saw the whole log.
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
            let rebuilt = decisions(&log, window, DedupWindow::new(window).warm_up_from(resume), resume);
            prop_assert_eq!(whole, rebuilt);
        }
    }
}
