//! `sql/schema.sql`, applied statement by statement to a database.

use crate::config::valid_identifier;
use crate::service::{ClickHouse, SinkError};

/// The analysts' contract, as committed in `sql/schema.sql`.
pub const SCHEMA_SQL: &str = include_str!("../../sql/schema.sql");

/// The statements of a SQL file: `--` comments dropped, split at `;`.
pub fn statements(sql: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .map(|line| if line.trim_start().starts_with("--") { "" } else { line })
        .collect::<Vec<_>>()
        .join("\n");
    without_comments.split(';').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect()
}

/// Creates the database if needed and applies the schema to it. Idempotent.
pub async fn apply(clickhouse: &ClickHouse) -> Result<(), SinkError> {
    let database = clickhouse.database();
    if !valid_identifier(database) {
        return Err(SinkError::Rejected(format!("invalid database name {database:?}")));
    }
    clickhouse.with_database("default").execute(&format!("CREATE DATABASE IF NOT EXISTS {database}")).await?;
    let created_here = missing_tables(clickhouse).await?.iter().any(|table| table == "event_counts_minute");
    for statement in statements(SCHEMA_SQL) {
        clickhouse.execute(&statement).await?;
    }
    add_missing_columns(clickhouse).await?;
    if created_here && counts_start_empty(clickhouse).await? {
        // Nothing was counted into this database before: every run that will is recorded in
        // `job_runs`, with whether it kept the raw log.
        let marker = crate::checkpoints::run_block(RUNS_RECORDED, "", 0, 0, true, videocount_events::clock::now_secs());
        clickhouse.insert_native(&marker.table, marker.body).await?;
    }
    Ok(())
}

/// Whether the count table this apply just created is new, not a replica of one that exists:
/// its ZooKeeper path has no other replica (a replica added to a cluster, or rebuilt, attaches
/// to the others' history, which may hold counts of runs never recorded) and it holds no row.
async fn counts_start_empty(clickhouse: &ClickHouse) -> Result<bool, SinkError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Count {
        n: u64,
    }
    let system = clickhouse.with_database("system");
    let replicas: Vec<Count> = system
        .fetch_all(
            system
                .client()
                .query("SELECT toUInt64(total_replicas) AS n FROM system.replicas WHERE database = ? AND table = ?")
                .bind(clickhouse.database())
                .bind("event_counts_minute"),
        )
        .await?;
    let rows: Vec<Count> =
        clickhouse.fetch_all(clickhouse.client().query("SELECT count() AS n FROM event_counts_minute")).await?;
    Ok(replicas.first().is_none_or(|r| r.n <= 1) && rows.first().is_some_and(|r| r.n == 0))
}

/// The `job_runs.job` of the row the schema writes when it creates the count tables: the runs
/// recorded there are every run that counted into them.
pub const RUNS_RECORDED: &str = "";

/// Columns added to `sql/schema.sql` after its tables first shipped: `CREATE TABLE IF NOT
/// EXISTS` leaves an existing table as it was, and ClickHouse 18.16 has no `ADD COLUMN IF NOT
/// EXISTS`, so a database made by an older version gets them here.
const ADDED_COLUMNS: &[(&str, &str, &str)] = &[
    ("checkpoint_generations", "lease_token", "UInt64 DEFAULT 0"),
    ("count_changes", "times", "Array(UInt16)"),
    ("job_runs", "raw_log", "UInt8 DEFAULT 0"),
];

/// Adds [`ADDED_COLUMNS`] a database lacks (the jobs call it at start too, so an upgraded job
/// runs on a database made by an older version).
pub async fn add_missing_columns(clickhouse: &ClickHouse) -> Result<(), SinkError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Present {
        n: u64,
    }
    for (table, column, definition) in ADDED_COLUMNS {
        let system = clickhouse.with_database("system");
        let present: Vec<Present> = system
            .fetch_all(
                system
                    .client()
                    .query("SELECT count() AS n FROM system.columns WHERE database = ? AND table = ? AND name = ?")
                    .bind(clickhouse.database())
                    .bind(*table)
                    .bind(*column),
            )
            .await?;
        if present.first().is_none_or(|p| p.n == 0) {
            clickhouse.execute(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}")).await?;
        }
    }
    Ok(())
}

/// The tables of the schema that the database lacks.
pub async fn missing_tables(clickhouse: &ClickHouse) -> Result<Vec<String>, SinkError> {
    #[derive(clickhouse::Row, serde::Deserialize)]
    struct Name {
        name: String,
    }
    let system = clickhouse.with_database("system");
    let present: Vec<Name> = system
        .fetch_all(
            system.client().query("SELECT name FROM system.tables WHERE database = ?").bind(clickhouse.database()),
        )
        .await?;
    Ok(table_names(SCHEMA_SQL).into_iter().filter(|t| !present.iter().any(|p| &p.name == t)).collect())
}

/// The tables `sql/schema.sql` creates.
pub fn table_names(sql: &str) -> Vec<String> {
    statements(sql)
        .iter()
        .filter_map(|s| s.strip_prefix("CREATE TABLE IF NOT EXISTS "))
        .filter_map(|rest| rest.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Drops a database and its tables (tests and replays clean up with it).
pub async fn drop_database(clickhouse: &ClickHouse) -> Result<(), SinkError> {
    let database = clickhouse.database();
    if !valid_identifier(database) {
        return Err(SinkError::Rejected(format!("invalid database name {database:?}")));
    }
    clickhouse.with_database("default").execute(&format!("DROP DATABASE IF EXISTS {database}")).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_the_schema_into_create_statements() {
        let statements = statements(SCHEMA_SQL);
        assert_eq!(statements.len(), 17);
        assert!(statements.iter().all(|s| s.starts_with("CREATE TABLE IF NOT EXISTS")));
    }

    /// A replica killed during an insert must start again whatever share of a table that
    /// unacknowledged block is (sql/schema.sql, e2e/tests/replicas.rs).
    #[test]
    fn every_replicated_table_starts_with_parts_zookeeper_never_heard_of() {
        for statement in statements(SCHEMA_SQL) {
            assert!(statement.contains("ENGINE = Replicated"), "{statement}");
            assert!(statement.contains("replicated_max_ratio_of_wrong_parts = 1"), "{statement}");
        }
    }
}
