//! The state rows of `event_stats`' tables as readers and the compactor see them, and which
//! of a bucket's rows count: one rule, shared by every reader and by compaction.

use clickhouse::Row;
use serde::Deserialize;

/// A stored state row of one bucket, as the readers fetch it.
#[derive(Row, Deserialize, Clone, Debug)]
pub struct StoredState {
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    pub segment: u32,
    pub bucket: u32,
    pub epoch: u64,
    pub compacted: u8,
}

/// A stored state row with its key, as compaction and the query service's loads read them.
#[derive(Row, Deserialize, Clone, Debug)]
pub struct KeyedState {
    pub video_id: String,
    pub event_type: String,
    pub aggregate: String,
    #[serde(with = "serde_bytes")]
    pub state: Vec<u8>,
    pub segment: u32,
    pub bucket: u32,
    pub epoch: u64,
    pub compacted: u8,
}

impl KeyedState {
    /// The row without its key.
    pub fn stored(&self) -> StoredState {
        StoredState {
            state: self.state.clone(),
            segment: self.segment,
            bucket: self.bucket,
            epoch: self.epoch,
            compacted: self.compacted,
        }
    }
}

/// The rows of one bucket that count, in merge order: the newest compacted state, then the
/// states of later epochs. `group` is ordered by compacted (descending), then epoch.
pub fn live_states(group: &[StoredState]) -> impl Iterator<Item = &StoredState> {
    let newest_compacted = group.iter().filter(|r| r.compacted == 1).max_by_key(|r| r.epoch);
    let through = newest_compacted.map(|r| r.epoch);
    newest_compacted.into_iter().chain(
        group.iter().filter(move |r| r.compacted == 0 && !r.state.is_empty() && through.is_none_or(|c| r.epoch > c)),
    )
}

/// Whether `group` (one bucket's rows, emptied ones included) shows a row whose state a
/// compaction emptied without the compacted row that holds it: compaction inserts that row
/// before it empties the rows it merged (epochs up to its own), so on the server that ran it
/// every emptied row is covered by a compacted row of an epoch at or after its own. A replica
/// can run the emptying before it fetched the compacted row; a read there would miss states
/// (read again once the replica caught up).
pub fn emptied_without_compaction(group: &[StoredState]) -> bool {
    let through = group.iter().filter(|r| r.compacted == 1).map(|r| r.epoch).max();
    group.iter().any(|r| r.compacted == 0 && r.state.is_empty() && through.is_none_or(|c| r.epoch > c))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A row of minute 60 of `epoch`.
    fn row(epoch: u64, compacted: u8, state: &[u8]) -> StoredState {
        StoredState { state: state.to_vec(), segment: 0, bucket: 60, epoch, compacted }
    }

    #[test]
    fn an_emptied_state_needs_a_compacted_row_of_its_epoch_or_later() {
        assert!(!emptied_without_compaction(&[row(3, 0, b"a"), row(5, 0, b"b")]));
        // Merged through 5, both emptied: covered.
        assert!(!emptied_without_compaction(&[row(5, 1, b"m"), row(3, 0, b""), row(5, 0, b"")]));
        // Emptied, and the compacted row not here (a replica that has not fetched it yet).
        assert!(emptied_without_compaction(&[row(3, 0, b""), row(5, 0, b"b")]));
        // Only an older compaction here: the row emptied by a newer one is not covered.
        assert!(emptied_without_compaction(&[row(2, 1, b"m"), row(3, 0, b""), row(5, 0, b"b")]));
    }

    #[test]
    fn a_bucket_counts_its_newest_compaction_and_later_epochs() {
        let epochs = |group: &[StoredState]| live_states(group).map(|r| (r.epoch, r.compacted)).collect::<Vec<_>>();
        // As written: every state.
        assert_eq!(epochs(&[row(3, 0, b"a"), row(5, 0, b"b")]), [(3, 0), (5, 0)]);
        // Compacted through 5, its UPDATE still pending, and a later epoch: 5 and 7 only.
        let group = [row(5, 1, b"c"), row(3, 0, b"a"), row(5, 0, b"b"), row(7, 0, b"d")];
        assert_eq!(epochs(&group), [(5, 1), (7, 0)]);
        // Two compactions (late data in between): the newest one; emptied states never count.
        let group = [row(5, 1, b"c"), row(9, 1, b"e"), row(3, 0, b""), row(7, 0, b""), row(11, 0, b"f")];
        assert_eq!(epochs(&group), [(9, 1), (11, 0)]);
    }
}
