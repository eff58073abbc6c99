//! Replay: recompute every count table from the raw log (`events_raw`) into fresh tables and
//! swap them in with one `RENAME`, so analysts never see a half-built table.
//!
//! Only events of committed epochs are replayed (offsets below each partition's committed
//! end): a pending epoch re-run by the job after the swap then lands in the new tables once.
//! The job must be stopped while a replay runs: `videocount replay` holds the job's lease (a
//! job cannot start meanwhile, and a running job makes the replay refuse), and a commit
//! appearing anyway aborts the swap.
use clickhouse::Row;
use serde::Deserialize;
use tracing::info;

use crate::checkpoints;
use crate::rows::Grain;
use crate::schema::{SCHEMA_SQL, statements};
use crate::service::{ClickHouse, SinkError};

/// What a replay did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    pub events: u64,
    pub last_committed_epoch: Option<u64>,
    pub old_tables: Vec<String>,
}

#[derive(Row, Deserialize)]
struct EndRow {
    partition: u32,
    end_offset: u64,
}

#[derive(Row, Deserialize)]
struct CountRow {
    n: u64,
}

/// The `CREATE TABLE` of `table` from the schema, for a table named `new_name` (the ZooKeeper
/// path follows the name, so the new table has a replication log of its own).
fn create_statement(table: &str, new_name: &str) -> Result<String, SinkError> {
    let prefix = format!("CREATE TABLE IF NOT EXISTS {table}\n");
    statements(SCHEMA_SQL)
        .into_iter()
        .find(|s| s.starts_with(&prefix))
        .map(|s| s.replace(table, new_name))
        .ok_or_else(|| SinkError::Rejected(format!("schema has no table {table}")))
}

/// Replays the counts of `job` on `topic` from `events_raw`. Old tables are dropped unless
/// `keep_old`. Each grain's `INSERT ... SELECT` may take up to `timeout` (a year of events takes
/// minutes; the usual request timeout would give up while the server goes on filling).
pub async fn replay_from_raw(
    clickhouse: &ClickHouse,
    job: &str,
    topic: &str,
    keep_old: bool,
    timeout: std::time::Duration,
    fence: &videocount_lease::Fence,
) -> Result<ReplayReport, SinkError> {
    let state = checkpoints::load(clickhouse, job, topic).await?;
    let Some(last) = state.last_committed else {
        return Err(SinkError::Rejected(format!(
            "job {job} has committed nothing on topic {topic}: nothing to replay"
        )));
    };
    // Every void plan of the history: the start only needs those after its newest snapshot.
    let void_plans = checkpoints::all_void_plans(clickhouse, job, topic).await?;
    let ends: Vec<EndRow> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(&format!(
                    "SELECT partition, max(end_offset) AS end_offset FROM checkpoint_ranges \
                     WHERE job = ? AND topic = ? AND epoch <= ? AND {} GROUP BY partition ORDER BY partition",
                    checkpoints::counted_plans(&void_plans)
                ))
                .bind(job)
                .bind(topic)
                .bind(last),
        )
        .await?;
    let partitions: Vec<String> = ends.iter().map(|e| e.partition.to_string()).collect();
    let offsets: Vec<String> = ends.iter().map(|e| e.end_offset.to_string()).collect();
    // Numbers only: built from typed rows, nothing from a user is spliced in.
    let committed =
        format!("offset < transform(partition, [{}], [{}], toUInt64(0))", partitions.join(","), offsets.join(","));
    let events: Vec<CountRow> = clickhouse
        .fetch_all(clickhouse.client().query(&format!("SELECT count() AS n FROM events_raw WHERE {committed}")))
        .await?;
    let events = events.first().map_or(0, |r| r.n);
    // The count tables of committed epochs must hold exactly what events_raw holds: periods run
    // with --no-events-raw (or raw rows deleted) would be lost by a replay.
    let counted: Vec<CountRow> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query("SELECT toUInt64(sum(count)) AS n FROM event_counts_minute WHERE epoch <= ?")
                .bind(last),
        )
        .await?;
    let counted = counted.first().map_or(0, |r| r.n);
    if counted != events {
        return Err(SinkError::Rejected(format!(
            "the count tables hold {counted} events of committed epochs but events_raw only {events}: periods \
             counted with --no-events-raw (or raw rows deleted) would be lost by a replay, so nothing was replaced"
        )));
    }
    let long = clickhouse.with_request_timeout(timeout);

    let stamp = videocount_events::clock::now_ms();
    let mut renames = Vec::new();
    let mut old_tables = Vec::new();
    for grain in Grain::ALL {
        let table = grain.table();
        let new = format!("{table}_replay_{stamp}");
        let old = format!("{table}_old_{stamp}");
        clickhouse.execute(&create_statement(table, &new)?).await?;
        let bucket = match grain {
            Grain::Minute => "toStartOfMinute(toDateTime(intDiv(ts, 1000), 'UTC'))",
            Grain::Hour => "toStartOfHour(toDateTime(intDiv(ts, 1000), 'UTC'))",
            Grain::Day => "toDate(toDateTime(intDiv(ts, 1000), 'UTC'))",
        };
        let column = match grain {
            Grain::Minute => "minute",
            Grain::Hour => "hour",
            Grain::Day => "day",
        };
        info!(table = %new, "replaying from events_raw");
        long.execute(&format!(
            "INSERT INTO {new} (video_id, event_type, {column}, count, epoch) \
                 SELECT video_id, event_type, {bucket} AS b, count() AS c, toUInt64(0) \
                 FROM events_raw WHERE {committed} GROUP BY video_id, event_type, b \
                 SETTINGS insert_deduplicate = 0"
        ))
        .await?;
        renames.push(format!("{table} TO {old}, {new} TO {table}"));
        old_tables.push(old);
    }

    let now = checkpoints::load(clickhouse, job, topic).await?;
    if now.last_committed != state.last_committed || now.base_epoch != state.base_epoch {
        return Err(SinkError::Rejected(format!(
            "job {job} committed epochs during the replay: stop it, then replay again (the new tables are left as *_replay_{stamp})"
        )));
    }
    // Swapped only while the lease is held: a replay paused past it lets the job run again.
    let unheld = match fence.check() {
        videocount_lease::Permit::Granted => None,
        videocount_lease::Permit::Wait => Some("the job's lease could not be confirmed".to_owned()),
        videocount_lease::Permit::Lost(reason) => Some(reason),
    };
    if let Some(reason) = unheld {
        return Err(SinkError::Fenced(format!(
            "{reason}: the replay did not swap its tables in (they are left as *_replay_{stamp})"
        )));
    }
    clickhouse.execute(&format!("RENAME TABLE {}", renames.join(", "))).await?;
    if !keep_old {
        for old in &old_tables {
            clickhouse.execute(&format!("DROP TABLE IF EXISTS {old}")).await?;
        }
    }
    Ok(ReplayReport {
        events,
        last_committed_epoch: Some(last),
        old_tables: if keep_old { old_tables } else { Vec::new() },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_tables_get_their_own_replication_path() {
        let sql = create_statement("event_counts_hour", "event_counts_hour_replay_1").unwrap();
        assert!(sql.starts_with("CREATE TABLE IF NOT EXISTS event_counts_hour_replay_1"));
        assert!(sql.contains("'/clickhouse/tables/{database}/event_counts_hour_replay_1'"));
        assert!(create_statement("nope", "x").is_err());
    }
}
