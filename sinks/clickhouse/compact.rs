//! Compaction of `event_stats` states: any range is answered by merging a few states per
//! bucket, however many epochs wrote to it.
//!
//! The job writes one row per key per epoch that touched it, so a busy video's day bucket can
//! collect tens of thousands of states. [`compact`] merges the states of each *closed* bucket
//! (its end is `grace` behind now) up to the last committed epoch `E` into one row with
//! `compacted = 1` and `epoch = E`, then empties the `state` of the rows it merged (an
//! `ALTER ... UPDATE`, which ClickHouse runs in the background). Readers use, per bucket, the
//! newest compacted row and the states of later epochs, so an answer is the same before, during
//! and after a compaction. Compacted rows have zero counts, so plain SQL over the count, sum,
//! min and max columns never sees them.
//!
//! Safe to repeat and to interrupt: epochs up to `E` are committed, so no row of them is written
//! later; the compacted block of a round is deterministic (a repeat is dropped by ClickHouse's
//! insert deduplication); a round killed before its `UPDATE` leaves both the compacted row and
//! the merged rows, and readers count only one of them.

use clickhouse::Row;
use serde::Deserialize;
use videocount_aggregates::{Moments, Registry};

use crate::ClickHouse;
use crate::rows::{Grain, StatsRow, stats_block};
use crate::service::SinkError;
use crate::states::{StoredState, live_states};

/// A compaction round that failed; the next round starts over (see the module documentation).
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error("ClickHouse: {0}")]
    Store(#[from] SinkError),
    /// A stored state could not be decoded, or names an aggregate this binary does not know.
    #[error("{0}")]
    Corrupt(String),
}

/// What one table's compaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Compacted {
    pub table: &'static str,
    /// Buckets merged into a compacted row.
    pub buckets: usize,
    /// States merged into them.
    pub states: usize,
    /// The last committed epoch the compacted rows include.
    pub through_epoch: u64,
}

/// The condition selecting the closed buckets of `grain` as of `now_s - grace_s`, and its
/// limit (computed here from numbers, never from input).
fn closed_condition(grain: Grain, now_s: u64, grace_s: u64) -> (String, String) {
    let horizon = now_s.saturating_sub(grace_s);
    match grain {
        Grain::Day => {
            // Day d (starting at d * 86400) is closed when d * 86400 + 86400 <= horizon.
            let last_closed_day = (horizon / 86_400).saturating_sub(1);
            let date = jiff::Timestamp::from_second((last_closed_day * 86_400) as i64)
                .map_or_else(|_| "1970-01-01".to_owned(), |t| t.strftime("%Y-%m-%d").to_string());
            (format!("day <= toDate('{date}')"), date)
        }
        grain => {
            let limit = horizon.saturating_sub(grain.seconds()).to_string();
            (format!("{} <= toDateTime({limit}, 'UTC')", grain.column()), limit)
        }
    }
}

#[derive(Row, Deserialize)]
struct KeyedState {
    video_id: String,
    event_type: String,
    aggregate: String,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
    segment: u32,
    bucket: u32,
    epoch: u64,
    compacted: u8,
}

impl KeyedState {
    fn stored(&self) -> StoredState {
        StoredState {
            state: self.state.clone(),
            segment: self.segment,
            bucket: self.bucket,
            epoch: self.epoch,
            compacted: self.compacted,
        }
    }
}

/// Compacts the closed buckets of every stats table, up to `job`'s last committed epoch on
/// `topic`. Returns what it did per table (nothing before the first commit).
pub async fn compact(
    clickhouse: &ClickHouse,
    registry: &Registry,
    job: &str,
    topic: &str,
    now_s: u64,
    grace_s: u64,
) -> Result<Vec<Compacted>, CompactError> {
    #[derive(Row, Deserialize)]
    struct Last {
        epoch: u64,
        commits: u64,
    }
    let last: Vec<Last> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query("SELECT toUInt64(max(epoch)) AS epoch, count() AS commits FROM checkpoint_commits WHERE job = ? AND topic = ?")
                .bind(job)
                .bind(topic),
        )
        .await?;
    let Some(through) = last.first().filter(|l| l.commits > 0).map(|l| l.epoch) else {
        return Ok(Vec::new());
    };
    let mut report = Vec::new();
    for grain in Grain::ALL {
        let table = grain.stats_table();
        let column = grain.column();
        let (closed, _) = closed_condition(grain, now_s, grace_s);
        let sql = format!(
            "SELECT video_id, event_type, aggregate, state, toUInt32(0) AS segment, toUInt32({column}) AS bucket, epoch, compacted \
             FROM {table} \
             WHERE epoch <= ? AND {closed} AND (compacted = 1 OR state != '') \
               AND (video_id, event_type, aggregate, {column}) IN \
                   (SELECT video_id, event_type, aggregate, {column} FROM {table} \
                    WHERE compacted = 0 AND state != '' AND epoch <= ? AND {closed}) \
             ORDER BY video_id, event_type, aggregate, bucket, compacted DESC, epoch"
        );
        let query = clickhouse.client().query(&sql).bind(through).bind(through);
        let rows: Vec<KeyedState> = clickhouse.fetch_all(query).await?;
        let mut compacted = Vec::new();
        let mut states = 0;
        for group in rows.chunk_by(|a, b| {
            (&a.video_id, &a.event_type, &a.aggregate, a.bucket) == (&b.video_id, &b.event_type, &b.aggregate, b.bucket)
        }) {
            let first = &group[0];
            let Some(id) = registry.by_name(&first.aggregate) else {
                return Err(CompactError::Corrupt(format!("{table}: unknown aggregate {:?}", first.aggregate)));
            };
            let aggregate = registry.get(id);
            let stored: Vec<StoredState> = group.iter().map(KeyedState::stored).collect();
            let live: Vec<&StoredState> = live_states(&stored).collect();
            // Nothing newer than the last compacted row: an earlier round's UPDATE is pending.
            if live.iter().all(|r| r.compacted == 1) {
                continue;
            }
            let mut merged = aggregate.create();
            for row in &live {
                let state = aggregate.decode(&row.state).map_err(|e| CompactError::Corrupt(e.to_string()))?;
                aggregate.merge(&mut merged, &state);
            }
            states += live.len();
            let zero = Moments::default();
            compacted.push(StatsRow {
                video_id: first.video_id.clone(),
                event_type: first.event_type.clone(),
                aggregate: first.aggregate.clone(),
                bucket: first.bucket,
                count: 0,
                value_count: 0,
                sum: 0.0,
                min: zero.min,
                max: zero.max,
                state: aggregate.encode(&merged),
            });
        }
        if !compacted.is_empty() {
            let buckets = compacted.len();
            let insert = stats_block(grain, through, true, &mut compacted);
            clickhouse.insert_native(&insert.table, insert.body).await?;
            report.push(Compacted { table, buckets, states, through_epoch: through });
        }
        // Empty the merged states (also those an interrupted round left behind).
        let update = format!(
            "ALTER TABLE {table} UPDATE state = '' WHERE compacted = 0 AND state != '' AND epoch <= ? AND {closed}"
        );
        let query = clickhouse.client().query(&update).bind(through);
        if !rows.is_empty() {
            clickhouse.execute_query(query).await?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_buckets_end_a_grace_before_now() {
        let now = 1_795_812_377; // 2026-11-27T20:46:17Z
        assert_eq!(closed_condition(Grain::Minute, now, 120).1, (now - 120 - 60).to_string());
        assert_eq!(closed_condition(Grain::Hour, now, 0).1, (now - 3600).to_string());
        // Day 2026-11-27 is open until midnight: the last closed day is the 26th.
        assert_eq!(closed_condition(Grain::Day, now, 0).1, "2026-11-26");
        // At midnight the 27th is closed.
        assert_eq!(closed_condition(Grain::Day, 1_795_824_000, 0).1, "2026-11-27");
    }
}
