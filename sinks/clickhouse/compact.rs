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
use crate::states::{KeyedState, StoredState, live_states};

/// A compaction round that failed; the next round starts over (see the module documentation).
#[derive(Debug, thiserror::Error)]
pub enum CompactError {
    #[error(transparent)]
    Store(#[from] SinkError),
    /// A stored state could not be decoded, or names an aggregate this binary does not know.
    #[error("{0}")]
    Corrupt(String),
}

/// How much one round takes on, so that a round stays bounded however large the tables and
/// the backlog grow: per table, the oldest closed buckets whose unmerged states add up to at
/// most `max_states`, and only buckets that start at or after `since_s` when given (a compactor
/// that already passed over the older ones). A bucket too big for one round is taken in shards
/// (a hash of the key, [`SHARDS`] per bucket): a slice is a run of (bucket, shard) pairs, and a
/// round takes at least one. Within one pass over a backlog, `after` holds, per table, the last
/// (bucket, shard) a round took: its states are emptied by a background `UPDATE` that may not
/// have run yet, so the next round starts after it instead of taking the same states again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoundLimits {
    pub max_states: u64,
    pub since_s: Option<u64>,
    pub after: std::collections::BTreeMap<&'static str, (u32, u32)>,
}

/// What a round did, and whether closed buckets were left for the next round (then `reached`
/// is the `after` of the next round of the pass).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub tables: Vec<Compacted>,
    pub more: bool,
    pub reached: std::collections::BTreeMap<&'static str, (u32, u32)>,
}

/// How many (bucket, shard) pairs of unmerged states a round looks at to choose its slice.
const SLICE_CANDIDATES: usize = 100_000;

/// Shards per bucket: a round can take part of a bucket (a key's states are never split).
const SHARDS: u32 = 64;

/// The slice of a round: from the (bucket, shard) pairs with unmerged states, oldest first, with
/// their state counts (at most [`SLICE_CANDIDATES`] of them), the last pair of the longest prefix
/// within `max_states` (at least the first), and whether pairs remain after it.
fn choose_slice(counts: &[((u32, u32), u64)], max_states: u64) -> Option<((u32, u32), bool)> {
    let mut total = 0;
    let mut last = None;
    for (i, &(pair, n)) in counts.iter().enumerate() {
        if last.is_some() && total + n > max_states {
            return Some((last?, true));
        }
        total += n;
        last = Some(pair);
        if i + 1 == counts.len() {
            return Some((pair, counts.len() >= SLICE_CANDIDATES));
        }
    }
    None
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

/// Compacts closed buckets of every stats table, up to `job`'s last committed epoch on `topic`,
/// within `limits`. Returns what it did per table (nothing before the first commit) and whether
/// another round has more to do.
pub async fn compact(
    clickhouse: &ClickHouse,
    registry: &Registry,
    job: &str,
    topic: &str,
    (now_s, grace_s): (u64, u64),
    limits: RoundLimits,
) -> Result<Round, CompactError> {
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
        return Ok(Round::default());
    };
    let mut report = Round::default();
    for grain in Grain::ALL {
        let table = grain.stats_table();
        let column = grain.column();
        let (closed, _) = closed_condition(grain, now_s, grace_s);
        // The UPDATE empties states on every replica: what it merges must be all of them.
        clickhouse.sync_replica(&[table]).await?;
        let mut since = limits.since_s.map_or("1".to_owned(), |since| match grain {
            Grain::Day => format!("toUInt32(day) >= {}", since / 86_400),
            grain => format!("toUInt32({}) >= {since}", grain.column()),
        });
        // A key's shard: every state of one (video, type, aggregate, bucket) is in one shard.
        let shard = format!("toUInt32(cityHash64(video_id, event_type, aggregate) % {SHARDS})");
        let bucket = format!("toUInt32({column})");
        if let Some((after_bucket, after_shard)) = limits.after.get(table) {
            since = format!(
                "{since} AND ({bucket} > {after_bucket} OR ({bucket} = {after_bucket} AND {shard} > {after_shard}))"
            );
        }
        #[derive(Row, Deserialize)]
        struct Bucket {
            bucket: u32,
            shard: u32,
            n: u64,
        }
        let candidates: Vec<Bucket> = clickhouse
            .fetch_all(
                clickhouse
                    .client()
                    .query(&format!(
                        "SELECT {bucket} AS bucket, {shard} AS shard, count() AS n FROM {table} \
                         WHERE compacted = 0 AND state != '' AND epoch <= ? AND {closed} AND {since} \
                         GROUP BY bucket, shard ORDER BY bucket, shard LIMIT {SLICE_CANDIDATES}"
                    ))
                    .bind(through),
            )
            .await?;
        let counts: Vec<((u32, u32), u64)> = candidates.iter().map(|b| ((b.bucket, b.shard), b.n)).collect();
        let Some(((last_bucket, last_shard), more)) = choose_slice(&counts, limits.max_states) else { continue };
        report.more |= more;
        report.reached.insert(table, (last_bucket, last_shard));
        // This round's states: numbers only, computed here.
        let closed = format!(
            "{closed} AND {since} AND ({bucket} < {last_bucket} OR ({bucket} = {last_bucket} AND {shard} <= {last_shard}))"
        );
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
            report.tables.push(Compacted { table, buckets, states, through_epoch: through });
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
    fn a_round_takes_the_oldest_buckets_within_its_states() {
        let counts = [((60, 0), 40), ((60, 9), 50), ((120, 3), 30), ((180, 0), 10)];
        assert_eq!(choose_slice(&counts, 100), Some(((60, 9), true)), "40 + 50 fit, 30 more would not");
        assert_eq!(choose_slice(&counts, 130), Some(((180, 0), false)), "everything fits");
        assert_eq!(choose_slice(&counts, 10), Some(((60, 0), true)), "at least one shard, however many states");
        assert_eq!(choose_slice(&[], 10), None, "nothing to compact");
        let full: Vec<((u32, u32), u64)> = (0..SLICE_CANDIDATES as u32).map(|b| ((b, 0), 1)).collect();
        assert_eq!(
            choose_slice(&full, u64::MAX),
            Some(((SLICE_CANDIDATES as u32 - 1, 0), true)),
            "more beyond the look"
        );
    }

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
