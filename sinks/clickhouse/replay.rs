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
    // The replay's CREATE, RENAME and DROP are not replicated on ClickHouse 18.16: on replicas
    // they would leave the replicas with different tables and different replication logs.
    #[derive(Row, Deserialize)]
    struct Replicas {
        n: u64,
    }
    let replicas: Vec<Replicas> =
        clickhouse
            .fetch_all(clickhouse.client().query(
                "SELECT toUInt64(max(total_replicas)) AS n FROM system.replicas WHERE database = currentDatabase()",
            ))
            .await?;
    if replicas.first().is_some_and(|r| r.n > 1) {
        return Err(SinkError::Rejected(
            "the tables have several replicas, and a replay's CREATE, RENAME and DROP would run on one of them \
             only (their replication logs would part): replay is for a single server for now"
                .into(),
        ));
    }
    clickhouse.sync_replica(&checkpoints::TABLES).await?;
    let state = checkpoints::load(clickhouse, job, topic).await?;
    let Some(last) = state.last_committed else {
        return Err(SinkError::Rejected(format!(
            "job {job} has committed nothing on topic {topic}: nothing to replay"
        )));
    };
    // What a start reads (the newest snapshot and what follows): the checkpoint's history
    // before it is trimmed by the job.
    let ends = checkpoints::committed_ends(&state);
    let partitions: Vec<String> = ends.keys().map(u32::to_string).collect();
    let offsets: Vec<String> = ends.values().map(u64::to_string).collect();
    // Numbers only: built from typed rows, nothing from a user is spliced in.
    let committed =
        format!("offset < transform(partition, [{}], [{}], toUInt64(0))", partitions.join(","), offsets.join(","));
    // A year of events_raw takes longer to count than a request usually may.
    let long = clickhouse.with_request_timeout(timeout);
    let events: Vec<CountRow> =
        long.fetch_all(long.client().query(&format!("SELECT count() AS n FROM events_raw WHERE {committed}"))).await?;
    let events = events.first().map_or(0, |r| r.n);
    // The count tables of committed epochs must hold exactly what events_raw holds: periods run
    // with --no-events-raw (or raw rows deleted) would be lost by a replay.
    let counted: Vec<CountRow> = long
        .fetch_all(
            long.client()
                .query("SELECT toUInt64(sum(count)) AS n FROM event_counts_minute WHERE epoch <= ?")
                .bind(last),
        )
        .await?;
    let counted = counted.first().map_or(0, |r| r.n);
    // Rows above the last commit are this job's interrupted epochs (re-run into the new tables)
    // or another job's: one counting a recreated topic under a new --job-name, whose epochs lie
    // above every generation of this job. The swap would drop those.
    let others: Vec<CountRow> = long
        .fetch_all(
            long.client()
                .query(&format!(
                    "SELECT count() AS n FROM event_counts_minute WHERE epoch > ? AND intDiv(epoch, {}) NOT IN \
                     (SELECT generation FROM checkpoint_generations WHERE job = ? AND topic = ?)",
                    1u64 << checkpoints::GENERATION_SHIFT
                ))
                .bind(last)
                .bind(job)
                .bind(topic),
        )
        .await?;
    if let Some(rows) = others.first().map(|r| r.n).filter(|&n| n > 0) {
        return Err(SinkError::Rejected(format!(
            "event_counts_minute holds {rows} rows written after job {job}'s last commit by another job (a topic \
             recreated and counted under a new --job-name?): a replay of {job} would drop them, so nothing was \
             replaced. Replay the job that counts the topic now (--job-name)"
        )));
    }
    if counted != events {
        return Err(SinkError::Rejected(format!(
            "the count tables hold {counted} events of committed epochs but events_raw only {events}: periods \
             counted with --no-events-raw (or raw rows deleted) would be lost by a replay, so nothing was replaced"
        )));
    }

    let stamp = videocount_events::clock::now_ms();
    let mut renames = Vec::new();
    let mut old_tables = Vec::new();
    let mut created = Vec::new();
    let built = build_tables(clickhouse, &long, &committed, stamp, timeout, &mut created).await;
    if let Err(e) = built {
        // Nothing is swapped in: stop what the server may still be filling and drop it.
        discard(clickhouse, &created).await;
        return Err(match e {
            SinkError::Unavailable(why) => SinkError::Unavailable(format!(
                "{why}: the recomputation did not finish within {timeout:?} (raise --timeout-secs: a year of events \
                 takes minutes); nothing was replaced and the half-built tables were dropped"
            )),
            other => other,
        });
    }
    for table in Grain::ALL.map(Grain::table).into_iter().chain(CHANGELOG) {
        renames.push(format!("{table} TO {table}_old_{stamp}, {table}_replay_{stamp} TO {table}"));
        old_tables.push(format!("{table}_old_{stamp}"));
    }

    let now = checkpoints::load(clickhouse, job, topic).await?;
    if now.last_committed != state.last_committed || now.base_epoch != state.base_epoch {
        discard(clickhouse, &created).await;
        return Err(SinkError::Rejected(format!(
            "job {job} committed epochs during the replay: stop it, then replay again (nothing was replaced)"
        )));
    }
    // Swapped only while the lease is held: a replay paused past it lets the job run again.
    let unheld = match fence.check() {
        videocount_lease::Permit::Granted => None,
        videocount_lease::Permit::Wait => Some("the job's lease could not be confirmed".to_owned()),
        videocount_lease::Permit::Lost(reason) => Some(reason),
    };
    if let Some(reason) = unheld {
        discard(clickhouse, &created).await;
        return Err(SinkError::Fenced(format!(
            "{reason}: the replay did not swap its tables in (nothing was replaced)"
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

/// Creates `<table>_replay_<stamp>` for every grain and fills it from `events_raw` below the
/// committed ends (`committed`), each fill through `long` within `timeout` (also the server's
/// own limit). Pushes every table it creates onto `created` before the CREATE is sent. A
/// CREATE takes the usual request timeout, not `timeout`: a client that gave up on one while
/// the server went on to create the table left it behind (a 50 ms replay in CI).
async fn build_tables(
    clickhouse: &ClickHouse,
    long: &ClickHouse,
    committed: &str,
    stamp: u64,
    timeout: std::time::Duration,
    created: &mut Vec<String>,
) -> Result<(), SinkError> {
    let limit = timeout.as_secs().max(1);
    for grain in Grain::ALL {
        let table = grain.table();
        let new = format!("{table}_replay_{stamp}");
        created.push(new.clone());
        clickhouse.execute(&create_statement(table, &new)?).await?;
        let bucket = match grain {
            Grain::Minute => "toStartOfMinute(toDateTime(intDiv(ts, 1000), 'UTC'))",
            Grain::Hour => "toStartOfHour(toDateTime(intDiv(ts, 1000), 'UTC'))",
            Grain::Day => "toDate(toDateTime(intDiv(ts, 1000), 'UTC'))",
        };
        let column = grain.column();
        info!(table = %new, "replaying from events_raw");
        long.execute(&format!(
            "INSERT INTO {new} (video_id, event_type, {column}, count, epoch) \
                 SELECT video_id, event_type, {bucket} AS b, count() AS c, toUInt64(0) \
                 FROM events_raw WHERE {committed} GROUP BY video_id, event_type, b \
                 SETTINGS insert_deduplicate = 0, max_execution_time = {limit}"
        ))
        .await?;
    }
    // The changelog goes too, empty: its markers describe blocks of the old tables (an epoch
    // left pending by a crash is in them, not in the new ones; the job re-runs it into both).
    for table in CHANGELOG {
        let new = format!("{table}_replay_{stamp}");
        created.push(new.clone());
        clickhouse.execute(&create_statement(table, &new)?).await?;
    }
    // But with the minutes of the last 25 hours (of event time) of the new minute table, as
    // epoch 0: a restarted view_counts rebuilds its trending windows from the changelog up to
    // its last commit, and epoch 0 is below every epoch the query service's memory reads.
    let canaries = format!("video_id NOT LIKE '{}%'", videocount_events::CANARY_PREFIX);
    long.execute(&format!(
        "INSERT INTO count_changes_replay_{stamp} (video_id, event_type, minute, count, epoch) \
         SELECT video_id, event_type, minute, toUInt64(sum(count)), toUInt64(0) FROM event_counts_minute_replay_{stamp} \
         WHERE {canaries} AND minute > (SELECT max(minute) FROM event_counts_minute_replay_{stamp} WHERE {canaries}) - {} \
         GROUP BY video_id, event_type, minute SETTINGS insert_deduplicate = 0, max_execution_time = {limit}",
        crate::checkpoints::TRENDING_RETENTION_SECS
    ))
    .await?;
    Ok(())
}

/// The query service's changelog of the minute table (docs/reads-from-memory.md).
const CHANGELOG: [&str; 2] = ["count_changes", "count_blocks"];

/// Stops the server-side fills of `tables` (a client that gave up does not stop them) and
/// drops the tables; failures are logged (the tables are named `*_replay_<stamp>`).
async fn discard(clickhouse: &ClickHouse, tables: &[String]) {
    for table in tables {
        // Names built here from constants and a number; the pattern matches only the INSERT.
        let kill = format!("KILL QUERY WHERE query LIKE 'INSERT INTO {table} (%' SYNC");
        if let Err(e) = clickhouse.execute(&kill).await {
            tracing::warn!(%table, error = %e, "could not stop the replay's fill");
        }
        if let Err(e) = clickhouse.execute(&format!("DROP TABLE IF EXISTS {table}")).await {
            tracing::warn!(%table, error = %e, "could not drop the half-built table; drop it by hand");
        }
    }
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
