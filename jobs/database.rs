//! Start-up checks of the database a job writes to, beyond its schema: one topic per database,
//! and ClickHouse's dedup windows large enough for every block a crash may have the job re-run.

use anyhow::bail;
use clickhouse::Row;
use serde::Deserialize;
use videocount_clickhouse::ClickHouse;

/// Refuses to count `topic` into a database that already holds the counts of another topic.
/// The count tables carry no topic column: two topics' blocks for a quiet epoch can be
/// byte-identical, and ClickHouse would drop one as a repeat; their blocks also share each
/// table's dedup window. A topic holds counts here once a job committed an epoch of it
/// (`checkpoint_commits`, or a snapshot, which outlives the commits it trimmed); a run that never
/// committed (stopped at once, a typo) does not count.
pub(crate) async fn check_one_topic(clickhouse: &ClickHouse, topic: &str) -> anyhow::Result<()> {
    #[derive(Row, Deserialize)]
    struct Other {
        topic: String,
        job: String,
    }
    let query = clickhouse
        .client()
        .query(
            "SELECT topic, any(job) AS job FROM (SELECT topic, job FROM checkpoint_commits WHERE topic != ? \
             UNION ALL SELECT topic, job FROM checkpoint_snapshots WHERE topic != ?) \
             GROUP BY topic ORDER BY topic LIMIT 1",
        )
        .bind(topic)
        .bind(topic);
    let others: Vec<Other> = clickhouse.fetch_all(query).await?;
    if let Some(other) = others.first() {
        bail!(
            "database {:?} already holds the counts of topic {:?} (job {}); each topic needs a database of its own: \
             the count tables have no topic column, and two topics' blocks can be byte-identical (ClickHouse would \
             drop one as a repeat). Use another --database for topic {topic:?}. If the counts of {:?} do not belong \
             here (a run by mistake), remove its checkpoint: ALTER TABLE checkpoint_commits DELETE WHERE topic = '{}' \
             and ALTER TABLE checkpoint_snapshots DELETE WHERE topic = '{}'",
            clickhouse.database(),
            other.topic,
            other.job,
            other.topic,
            other.topic.replace('\'', ""),
            other.topic.replace('\'', "")
        );
    }
    Ok(())
}

/// The dedup window of `table` (`replicated_deduplication_window`: the last N blocks whose
/// hashes ClickHouse remembers), as the table was created, else the server's default.
async fn dedup_window(clickhouse: &ClickHouse, table: &str) -> anyhow::Result<u64> {
    #[derive(Row, Deserialize)]
    struct Engine {
        engine_full: String,
    }
    #[derive(Row, Deserialize)]
    struct Setting {
        value: String,
    }
    let query = clickhouse
        .client()
        .query("SELECT engine_full FROM system.tables WHERE database = currentDatabase() AND name = ?")
        .bind(table);
    let engines: Vec<Engine> = clickhouse.fetch_all(query).await?;
    if let Some(window) = engines.first().and_then(|e| setting_in(&e.engine_full, "replicated_deduplication_window")) {
        return Ok(window);
    }
    let query = clickhouse
        .client()
        .query("SELECT value FROM system.merge_tree_settings WHERE name = 'replicated_deduplication_window'");
    let defaults: Vec<Setting> = clickhouse.fetch_all(query).await?;
    Ok(defaults.first().and_then(|s| s.value.parse().ok()).unwrap_or(100))
}

/// The value of `name = N` in a table's `SETTINGS` clause.
fn setting_in(engine_full: &str, name: &str) -> Option<u64> {
    let (_, settings) = engine_full.rsplit_once("SETTINGS ")?;
    settings.split(',').find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        (key.trim() == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// How many blocks of `table` a job may need ClickHouse to remember: after a crash, the blocks
/// of the open epochs are written again, and every block inserted into the table since the
/// first write of the oldest of them must still be in the window. The oldest open epoch lies
/// up to the commit lag behind the source, and epochs up to `--max-epochs-in-flight` before the
/// newest may still be landing (writes retry), so `exposed_epochs` = lag + in flight + 1. Each
/// insert is one block per month partition it touches (an epoch's events can span two months),
/// and tables that both jobs of a topic write (`dead_letters`) count twice.
pub(crate) fn blocks_to_remember(table: &str, blocks_per_epoch: u64, exposed_epochs: u64) -> u64 {
    let shared = if table == "dead_letters" { 2 } else { 1 };
    blocks_per_epoch * MONTHS_PER_INSERT * exposed_epochs * shared
}

/// The month partitions one epoch's insert can touch.
const MONTHS_PER_INSERT: u64 = 2;

/// The share of a window the check hands out; the rest is for other writers of the table
/// (compaction's rewritten states, `videocount replay`).
fn usable(window: u64) -> u64 {
    window / 5 * 4
}

/// Refuses a configuration whose re-runs could outgrow a table's dedup window: ClickHouse would
/// then insert a repeated block again, and its rows would count twice.
pub(crate) async fn check_dedup_windows(
    clickhouse: &ClickHouse,
    tables: &[(&'static str, u64)],
    exposed_epochs: u64,
    flags: &str,
) -> anyhow::Result<()> {
    for &(table, blocks_per_epoch) in tables {
        let window = dedup_window(clickhouse, table).await?;
        let needed = blocks_to_remember(table, blocks_per_epoch, exposed_epochs);
        if needed > usable(window) {
            bail!(
                "{table} remembers the last {window} blocks for deduplication (replicated_deduplication_window; a fifth \
                 is kept for other writers), but with {blocks_per_epoch} blocks per epoch and {flags} a crash could need \
                 {needed} of them remembered{}, and the blocks written again beyond the window would count twice. \
                 Lower the workers or {flags}, or count into a database created by this version's sql/schema.sql \
                 (larger windows; on ClickHouse 19.x and later also: ALTER TABLE {table} MODIFY SETTING \
                 replicated_deduplication_window = ...)",
                if table == "dead_letters" { " (both jobs of a topic write the table)" } else { "" }
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_is_read_from_the_engine_settings() {
        let engine = "ReplicatedMergeTree('/t', '{replica}') ORDER BY x SETTINGS replicated_deduplication_window = 1000, \
                      index_granularity = 8192";
        assert_eq!(setting_in(engine, "replicated_deduplication_window"), Some(1000));
        assert_eq!(setting_in(engine, "index_granularity"), Some(8192));
        assert_eq!(setting_in("ReplicatedMergeTree('/t', 'r') ORDER BY x", "replicated_deduplication_window"), None);
    }

    #[test]
    fn blocks_to_remember_cover_every_open_epoch() {
        assert_eq!(blocks_to_remember("event_counts_minute", 4, 17), 4 * 2 * 17);
        assert_eq!(blocks_to_remember("dead_letters", 4, 17), 4 * 2 * 17 * 2);
        assert_eq!(usable(1000), 800);
    }
}
