//! Per partition, the oldest offset a restart would have to read again: the start of the oldest
//! planned but uncommitted epoch's range, else where the committed checkpoint resumes. Kafka
//! retention must not delete it: an epoch re-run over a truncated range writes other blocks (what
//! had landed counts twice), and offsets never read are lost. The lag monitor compares it with
//! each partition's log start (`videocount_job_retention_headroom_messages`) so an alert can
//! fire before retention overtakes the job.

use std::collections::BTreeMap;

/// Planned ranges not yet committed, and the committed resume offsets.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct NeededOffsets {
    /// Partition -> the offset the committed checkpoint resumes from.
    committed: BTreeMap<u32, u64>,
    /// Epoch -> its planned `(partition, start, end)` ranges, until the epoch commits.
    planned: BTreeMap<u64, Vec<(u32, u64, u64)>>,
    /// The newest planned epoch seen to commit (with all before it), in this run.
    last_committed: Option<u64>,
}

impl NeededOffsets {
    /// As the checkpoint was at start: the resume offsets and the interrupted epochs (to be
    /// re-run, so still needed). A partition with interrupted epochs counts as committed only
    /// up to the start of the first of them (the resume offset lies after them).
    pub fn new(
        resume: impl IntoIterator<Item = (u32, u64)>,
        pending: impl IntoIterator<Item = (u64, Vec<(u32, u64, u64)>)>,
    ) -> NeededOffsets {
        let planned: BTreeMap<u64, Vec<(u32, u64, u64)>> = pending.into_iter().collect();
        let mut committed: BTreeMap<u32, u64> = resume.into_iter().collect();
        for &(partition, start, _) in planned.values().flatten() {
            committed.entry(partition).and_modify(|c| *c = (*c).min(start)).or_insert(start);
        }
        NeededOffsets { committed, planned, last_committed: None }
    }

    /// `epoch` was planned with these ranges.
    pub fn planned(&mut self, epoch: u64, ranges: impl IntoIterator<Item = (u32, u64, u64)>) {
        self.planned.entry(epoch).or_default().extend(ranges);
    }

    /// Every epoch below `frontier` has committed (`None`: all have).
    pub fn committed_below(&mut self, frontier: Option<u64>) {
        let still_open = match frontier {
            Some(frontier) => self.planned.split_off(&frontier),
            None => BTreeMap::new(),
        };
        for (epoch, ranges) in std::mem::replace(&mut self.planned, still_open) {
            self.last_committed = self.last_committed.max(Some(epoch));
            for (partition, _, end) in ranges {
                let committed = self.committed.entry(partition).or_default();
                *committed = (*committed).max(end);
            }
        }
    }

    /// Partition -> the offset the committed checkpoint resumes from.
    pub fn committed(&self) -> &BTreeMap<u32, u64> {
        &self.committed
    }

    /// The newest epoch this run saw commit, with every epoch before it: [`Self::committed`]
    /// is where each partition resumes after it (what a checkpoint snapshot records).
    pub fn last_committed(&self) -> Option<u64> {
        self.last_committed
    }

    /// The oldest offset of `partition` a restart would read; `None` if nothing of it was
    /// read or planned yet (a restart starts at its beginning).
    pub fn oldest(&self, partition: u32) -> Option<u64> {
        let open =
            self.planned.values().flatten().filter(|(p, _, _)| *p == partition).map(|(_, start, _)| *start).min();
        open.or_else(|| self.committed.get(&partition).copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_uncommitted_range_is_needed_until_its_epoch_commits() {
        let mut needed = NeededOffsets::new([(0, 120), (1, 50)], [(7, vec![(0, 100, 120)])]);
        assert_eq!(needed.committed()[&0], 100, "the interrupted epoch is not committed");
        assert_eq!(needed.oldest(0), Some(100));
        assert_eq!(needed.oldest(1), Some(50));
        assert_eq!(needed.oldest(2), None);
        needed.planned(8, [(0, 120, 130), (1, 50, 60)]);
        needed.planned(9, [(1, 60, 70)]);
        assert_eq!(needed.last_committed(), None);
        needed.committed_below(Some(8));
        assert_eq!((needed.oldest(0), needed.oldest(1)), (Some(120), Some(50)));
        assert_eq!(needed.last_committed(), Some(7));
        needed.committed_below(Some(9));
        assert_eq!((needed.oldest(0), needed.oldest(1)), (Some(130), Some(60)));
        needed.committed_below(None);
        assert_eq!((needed.oldest(0), needed.oldest(1)), (Some(130), Some(70)));
        // A commit never moves a partition back.
        needed.planned(10, [(0, 130, 130)]);
        needed.committed_below(None);
        assert_eq!(needed.oldest(0), Some(130));
    }
}
