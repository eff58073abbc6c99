//! Offset bookkeeping of one partition for the Kafka source: which epoch each message belongs
//! to (a pending epoch re-run over exactly its recorded range, or the live one), and the range a
//! live epoch covers when it closes.

use std::collections::VecDeque;

use videocount_clickhouse::checkpoints::Range;

/// Offset bookkeeping of one partition: which epoch each message belongs to.
#[derive(Debug)]
pub struct PartitionCursor {
    partition: u32,
    /// Offset of the next message to read (last read + 1).
    next: u64,
    /// First offset of the current live epoch.
    epoch_start: u64,
    /// Pending ranges still to re-run, oldest first.
    pending: VecDeque<(u64, Range)>,
    /// High watermark at start (for `until_caught_up`).
    target: u64,
    /// Kafka timestamp of the last message placed (ms; 0 before the first).
    last_message_ms: i64,
    /// Messages before this offset are read only to fill the dedup window, not counted.
    count_from: u64,
}

/// Where a message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    /// Already read before (a fetch repeated after a reconnect): drop it.
    Repeat,
    /// Part of a pending epoch being re-run.
    Pending(u64),
    /// Part of the current live epoch.
    Live,
    /// Before the first offset counted: read to rebuild the dedup window only.
    Warmup,
}

impl PartitionCursor {
    /// A cursor starting at `start`, re-running `pending` (ranges of this partition, in
    /// epoch order, contiguous from `start`) before live epochs.
    pub fn new(partition: u32, start: u64, pending: VecDeque<(u64, Range)>, target: u64) -> Self {
        let epoch_start = pending.back().map_or(start, |(_, r)| r.end);
        PartitionCursor { partition, next: start, epoch_start, pending, target, last_message_ms: 0, count_from: start }
    }

    /// Reads from `from` (before the start) first, to rebuild the dedup window: those messages
    /// are placed as [`Placement::Warmup`].
    pub fn warm_from(mut self, from: u64) -> Self {
        self.next = from.min(self.next);
        self
    }

    /// Places the message at `offset`; `finished` receives each pending epoch whose range in
    /// this partition is now complete.
    pub fn place(&mut self, offset: u64, finished: &mut Vec<u64>) -> Placement {
        if offset < self.next {
            return Placement::Repeat;
        }
        self.next = offset + 1;
        if offset < self.count_from {
            return Placement::Warmup;
        }
        while self.pending.front().is_some_and(|(_, r)| offset >= r.end) {
            finished.push(self.pending.pop_front().expect("front exists").0);
        }
        let Some(&(epoch, range)) = self.pending.front() else { return Placement::Live };
        if self.next >= range.end {
            finished.push(self.pending.pop_front().expect("front exists").0);
        }
        Placement::Pending(epoch)
    }

    /// Undoes the last `place` of a live message at `offset` (it will be read again).
    pub fn unread(&mut self, offset: u64) {
        self.next = offset;
    }

    /// The consumer's position passed `position` (control records take offsets too).
    pub fn advance_to(&mut self, position: u64, finished: &mut Vec<u64>) {
        self.next = self.next.max(position);
        while self.pending.front().is_some_and(|(_, r)| self.next >= r.end) {
            finished.push(self.pending.pop_front().expect("front exists").0);
        }
    }

    /// Closes the live epoch: the range it covers in this partition, if any.
    pub fn close_epoch(&mut self) -> Option<Range> {
        if !self.pending.is_empty() || self.next <= self.epoch_start {
            return None;
        }
        let range = Range { partition: self.partition, start: self.epoch_start, end: self.next };
        self.epoch_start = self.next;
        Some(range)
    }

    pub fn replaying(&self) -> bool {
        !self.pending.is_empty()
    }

    pub fn caught_up(&self) -> bool {
        self.pending.is_empty() && self.next >= self.target
    }

    pub fn next(&self) -> u64 {
        self.next
    }

    /// The Kafka timestamp of the last message placed (ms; 0 before the first).
    pub fn last_message_ms(&self) -> i64 {
        self.last_message_ms
    }

    /// Notes the Kafka timestamp of the message just placed (for the lag in seconds).
    pub fn saw_timestamp(&mut self, ms: Option<i64>) {
        if let Some(ms) = ms {
            self.last_message_ms = ms;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(partition: u32, start: u64, end: u64) -> Range {
        Range { partition, start, end }
    }

    #[test]
    fn live_epochs_cover_what_was_read() {
        let mut cursor = PartitionCursor::new(3, 10, VecDeque::new(), 15);
        let mut finished = Vec::new();
        assert_eq!(cursor.close_epoch(), None, "an epoch that read nothing has no range");
        for offset in 10..13 {
            assert_eq!(cursor.place(offset, &mut finished), Placement::Live);
        }
        assert_eq!(cursor.place(11, &mut finished), Placement::Repeat);
        assert_eq!(cursor.close_epoch(), Some(range(3, 10, 13)));
        assert!(!cursor.caught_up());
        cursor.place(13, &mut finished);
        cursor.place(14, &mut finished);
        assert!(cursor.caught_up());
        assert_eq!(cursor.close_epoch(), Some(range(3, 13, 15)));
        assert!(finished.is_empty());
    }

    #[test]
    fn pending_ranges_are_rerun_exactly_then_live_continues() {
        let pending = VecDeque::from([(7, range(0, 100, 103)), (9, range(0, 103, 104))]);
        let mut cursor = PartitionCursor::new(0, 100, pending, 0);
        let mut finished = Vec::new();
        assert!(cursor.replaying());
        assert_eq!(cursor.place(100, &mut finished), Placement::Pending(7));
        assert_eq!(cursor.place(101, &mut finished), Placement::Pending(7));
        assert_eq!(cursor.close_epoch(), None, "no live range while replaying");
        assert_eq!(cursor.place(102, &mut finished), Placement::Pending(7));
        assert_eq!(finished, vec![7]);
        assert_eq!(cursor.place(103, &mut finished), Placement::Pending(9));
        assert_eq!(finished, vec![7, 9]);
        assert!(!cursor.replaying());
        assert_eq!(cursor.place(104, &mut finished), Placement::Live);
        assert_eq!(cursor.close_epoch(), Some(range(0, 104, 105)));
    }

    #[test]
    fn a_warm_up_is_read_before_the_first_counted_offset() {
        let pending = VecDeque::from([(7, range(0, 100, 102))]);
        let mut cursor = PartitionCursor::new(0, 100, pending, 0).warm_from(95);
        let mut finished = Vec::new();
        assert_eq!(cursor.next(), 95);
        assert_eq!(cursor.place(95, &mut finished), Placement::Warmup);
        assert_eq!(cursor.place(99, &mut finished), Placement::Warmup);
        assert_eq!(cursor.place(99, &mut finished), Placement::Repeat);
        assert_eq!(cursor.place(100, &mut finished), Placement::Pending(7));
        assert_eq!(cursor.place(101, &mut finished), Placement::Pending(7));
        assert_eq!(cursor.place(102, &mut finished), Placement::Live);
        assert_eq!(cursor.close_epoch(), Some(range(0, 102, 103)));
    }

    #[test]
    fn offsets_skipped_by_control_records_still_finish_ranges() {
        let pending = VecDeque::from([(4, range(1, 0, 10)), (5, range(1, 10, 20))]);
        let mut cursor = PartitionCursor::new(1, 0, pending, 20);
        let mut finished = Vec::new();
        assert_eq!(cursor.place(8, &mut finished), Placement::Pending(4));
        // Offset 9 was a transaction marker: the next message is 11, in the next range.
        assert_eq!(cursor.place(11, &mut finished), Placement::Pending(5));
        assert_eq!(finished, vec![4]);
        cursor.advance_to(20, &mut finished);
        assert_eq!(finished, vec![4, 5]);
        assert!(cursor.caught_up());
        assert_eq!(cursor.close_epoch(), None);
    }
}
