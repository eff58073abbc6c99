//! Job checkpoints: the offset ranges of each epoch, written before the epoch's rows, and the
//! epochs whose rows are all written. See docs/exactly-once.md.

use std::collections::{BTreeMap, HashMap};

use clickhouse::Row;
use serde::Deserialize;

use crate::native::NativeBlock;
use crate::rows::Insert;
use crate::service::{ClickHouse, SinkError};

/// The offsets `[start, end)` an epoch covers in one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub struct Range {
    pub partition: u32,
    pub start: u64,
    pub end: u64,
}

/// Where a job left off, as recorded in ClickHouse.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JobState {
    /// The newest epoch whose rows are all written.
    pub last_committed: Option<u64>,
    /// Epochs planned after `last_committed`: their rows may be partly written, so they are
    /// re-run over exactly these ranges.
    pub pending: BTreeMap<u64, Vec<Range>>,
    /// Number of workers that ran the pending epochs (their blocks depend on it).
    pub pending_peers: Option<u32>,
    /// Per partition, the offset after the last planned range: where new epochs start.
    pub resume: HashMap<u32, u64>,
    /// The first epoch number not yet used.
    pub next_epoch: u64,
}

#[derive(Row, Deserialize)]
struct MaxRow {
    rows: u64,
    max_epoch: u64,
}

#[derive(Row, Deserialize)]
struct ResumeRow {
    partition: u32,
    end_offset: u64,
}

#[derive(Row, Deserialize)]
struct RangeRow {
    epoch: u64,
    partition: u32,
    start_offset: u64,
    end_offset: u64,
    peers: u32,
}

/// Reads the checkpoint of `job` on `topic`.
pub async fn load(clickhouse: &ClickHouse, job: &str, topic: &str) -> Result<JobState, SinkError> {
    let client = clickhouse.client();
    let commits: Vec<MaxRow> = clickhouse
        .fetch_all(
            client
                .query("SELECT count() AS rows, max(epoch) AS max_epoch FROM checkpoint_commits WHERE job = ? AND topic = ?")
                .bind(job)
                .bind(topic),
        )
        .await?;
    let last_committed = commits.first().filter(|r| r.rows > 0).map(|r| r.max_epoch);

    let planned: Vec<MaxRow> = clickhouse
        .fetch_all(
            client
                .query("SELECT count() AS rows, max(epoch) AS max_epoch FROM checkpoint_ranges WHERE job = ? AND topic = ?")
                .bind(job)
                .bind(topic),
        )
        .await?;
    let max_planned = planned.first().filter(|r| r.rows > 0).map(|r| r.max_epoch);

    let resume: Vec<ResumeRow> = clickhouse
        .fetch_all(
            client
                .query(
                    "SELECT partition, max(end_offset) AS end_offset FROM checkpoint_ranges \
                     WHERE job = ? AND topic = ? GROUP BY partition",
                )
                .bind(job)
                .bind(topic),
        )
        .await?;

    let after = last_committed.map_or(0, |e| e + 1);
    let pending_rows: Vec<RangeRow> = clickhouse
        .fetch_all(
            client
                .query(
                    "SELECT epoch, partition, start_offset, end_offset, peers FROM checkpoint_ranges \
                     WHERE job = ? AND topic = ? AND epoch >= ? ORDER BY epoch, partition",
                )
                .bind(job)
                .bind(topic)
                .bind(after),
        )
        .await?;

    let mut state = JobState {
        last_committed,
        next_epoch: max_planned.max(last_committed).map_or(1, |e| e + 1),
        resume: resume.into_iter().map(|r| (r.partition, r.end_offset)).collect(),
        ..JobState::default()
    };
    for row in pending_rows {
        state.pending_peers = Some(row.peers);
        state.pending.entry(row.epoch).or_default().push(Range {
            partition: row.partition,
            start: row.start_offset,
            end: row.end_offset,
        });
    }
    Ok(state)
}

/// The plan of one epoch: its ranges, written before any of its rows.
pub fn plan_block(job: &str, topic: &str, epoch: u64, peers: u32, ranges: &mut [Range]) -> Insert {
    ranges.sort_unstable_by_key(|r| r.partition);
    let mut block = NativeBlock::new(7, ranges.len());
    block.column_str("job", ranges.iter().map(|_| job));
    block.column_str("topic", ranges.iter().map(|_| topic));
    block.column_u64("epoch", ranges.iter().map(|_| epoch));
    block.column_u32("partition", "UInt32", ranges.iter().map(|r| r.partition));
    block.column_u64("start_offset", ranges.iter().map(|r| r.start));
    block.column_u64("end_offset", ranges.iter().map(|r| r.end));
    block.column_u32("peers", "UInt32", ranges.iter().map(|_| peers));
    Insert { table: "checkpoint_ranges".into(), rows: block.rows(), body: block.finish() }
}

/// The commit of one epoch, written once all its rows are.
/// The settings fingerprint of the run that planned `epoch` (the latest run that started at or
/// before it), if runs were recorded.
pub async fn run_fingerprint(
    clickhouse: &ClickHouse,
    job: &str,
    topic: &str,
    epoch: u64,
) -> Result<Option<u64>, SinkError> {
    #[derive(Row, Deserialize)]
    struct Run {
        fingerprint: u64,
    }
    let runs: Vec<Run> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(
                    "SELECT fingerprint FROM job_runs WHERE job = ? AND topic = ? AND first_epoch <= ? \
                     ORDER BY first_epoch DESC LIMIT 1",
                )
                .bind(job)
                .bind(topic)
                .bind(epoch),
        )
        .await?;
    Ok(runs.first().map(|r| r.fingerprint))
}

/// Records a run that plans epochs from `first_epoch` on with settings `fingerprint`.
pub fn run_block(job: &str, topic: &str, first_epoch: u64, fingerprint: u64, now_secs: u32) -> Insert {
    let mut block = NativeBlock::new(5, 1);
    block.column_str("job", [job].into_iter());
    block.column_str("topic", [topic].into_iter());
    block.column_u64("first_epoch", [first_epoch].into_iter());
    block.column_u64("fingerprint", [fingerprint].into_iter());
    block.column_u32("started_at", "DateTime('UTC')", [now_secs].into_iter());
    Insert { table: "job_runs".into(), rows: 1, body: block.finish() }
}

pub fn commit_block(job: &str, topic: &str, epoch: u64, now_secs: u32) -> Insert {
    let mut block = NativeBlock::new(4, 1);
    block.column_str("job", [job].into_iter());
    block.column_str("topic", [topic].into_iter());
    block.column_u64("epoch", [epoch].into_iter());
    block.column_u32("committed_at", "DateTime('UTC')", [now_secs].into_iter());
    Insert { table: "checkpoint_commits".into(), rows: 1, body: block.finish() }
}
