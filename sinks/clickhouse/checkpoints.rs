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

/// Epoch numbers carry the run's *generation* in their high 32 bits: every start of a job takes
/// a generation above every generation it can find, so a plan sent by a process that was killed
/// and that lands late can never share an epoch number with a plan of a later run.
pub const GENERATION_SHIFT: u32 = 32;

/// The generation of an epoch number (0 for epochs numbered before generations existed).
pub fn generation(epoch: u64) -> u64 {
    epoch >> GENERATION_SHIFT
}

/// The tables of the checkpoint (a start reads them all), in the order a start syncs a replica:
/// the plans last, so that the plan of every commit and snapshot synced before is fetched too
/// (a plan is written before its commit).
pub const TABLES: [&str; 5] =
    ["checkpoint_commits", "checkpoint_snapshots", "checkpoint_generations", "job_runs", "checkpoint_ranges"];

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
    /// The first epoch number of this run: the first of its generation.
    pub next_epoch: u64,
    /// This run's generation (recorded with [`generation_block`] before it plans anything).
    pub generation: u64,
    /// The newest plan this run builds on: plans of earlier generations after it landed after
    /// this run read the checkpoint, from a process that was gone (see [`load`]).
    pub base_epoch: u64,
    /// Plans that do not count, as `(generation, base)`: epochs of `generation` above `base`
    /// ([`counted_plans`] turns them into SQL).
    pub void_plans: Vec<(u64, u64)>,
    /// The largest lease token any run recorded: this run's lease must be above it (see
    /// [`fenced_generations`]).
    pub newest_lease_token: u64,
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

#[derive(Row, Deserialize)]
struct GenerationRow {
    generation: u64,
    base_epoch: u64,
    lease_token: u64,
}

#[derive(Row, Deserialize)]
struct PlannedRow {
    generation: u64,
    max_epoch: u64,
}

/// A checkpoint that cannot be resumed exactly.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] SinkError),
    #[error(
        "the checkpoint of {job} on {topic} has pending plans that do not follow one another in partition \
         {partition} (epoch {epoch} starts at offset {start}, the pending plan before it ends at {previous_end}): \
         two instances of the job ran at once, plans were written out of order by an older build, or retention \
         deleted messages between them. Stop every instance; re-running these epochs could count offsets twice \
         or skip them, so the job does not start"
    )]
    NotContiguous { job: String, topic: String, partition: u32, epoch: u64, start: u64, previous_end: u64 },
}

/// For callers that only report: an overlap is a rejection with its explanation.
impl From<CheckpointError> for SinkError {
    fn from(error: CheckpointError) -> Self {
        match error {
            CheckpointError::Store(e) => e,
            other => SinkError::Rejected(other.to_string()),
        }
    }
}

/// The plans that do not count: for each generation, the epochs after the `base_epoch` of the
/// next generation that *started* (whose row in `checkpoint_generations` is there; a run writes
/// it, and waits for it, before it plans or re-runs anything). Such a plan landed after that run
/// read the checkpoint, so it was sent by a process that was already gone and never had it
/// acknowledged: none of its rows was ever sent (rows wait for their plan). It is ignored, and
/// its offsets belong to whichever later plan covers them. The next *started* generation, not
/// the next one with plans, decides: a run that re-ran a late plan of an older generation must
/// not have it voided afterwards by a generation it never saw.
///
/// Returns `(generation, base)` pairs: epochs of `generation` above `base` are void.
fn void_plans(planned: &[PlannedRow], generations: &[GenerationRow]) -> Vec<(u64, u64)> {
    planned
        .iter()
        .filter_map(|this| {
            let next = generations.iter().find(|g| g.generation > this.generation)?;
            (this.max_epoch > next.base_epoch).then_some((this.generation, next.base_epoch))
        })
        .collect()
}

/// The generations recorded by an instance that had already lost the job's lease: a run whose
/// lease token is below that of an earlier generation took its lease before that generation's
/// run did, so by the time it recorded its row another instance held the lease. It was paused
/// (between its fence check and its insert) and its row landed late. Such a generation never
/// counts: its row does not void the plans of the generation before it, and none of its own
/// plans count. Token 0 (no lease, builds before the lease) is never judged.
fn fenced_generations(generations: &[GenerationRow]) -> Vec<u64> {
    let mut newest = 0;
    let mut fenced = Vec::new();
    for row in generations {
        if row.lease_token > 0 && row.lease_token < newest {
            fenced.push(row.generation);
        }
        newest = newest.max(row.lease_token);
    }
    fenced
}

/// The SQL condition selecting the plans `planned` saw: per generation, the epochs up to its
/// newest plan then (plans of one generation land in order, so a later one is newer).
fn seen_plans(planned: &[PlannedRow]) -> String {
    if planned.is_empty() {
        return "0".into();
    }
    let clauses: Vec<String> = planned
        .iter()
        .map(|p| format!("(epoch >= {} AND epoch <= {})", p.generation << GENERATION_SHIFT, p.max_epoch))
        .collect();
    format!("({})", clauses.join(" OR "))
}

/// The SQL condition selecting the plans that count (numbers only, never input).
pub fn counted_plans(void: &[(u64, u64)]) -> String {
    if void.is_empty() {
        return "1".into();
    }
    let clauses: Vec<String> = void
        .iter()
        .map(|(generation, base)| {
            let first = (base + 1).max(generation << GENERATION_SHIFT);
            format!("(epoch >= {first} AND epoch < {})", (generation + 1) << GENERATION_SHIFT)
        })
        .collect();
    format!("NOT ({})", clauses.join(" OR "))
}

/// The newest generation any job recorded in this database (0 if none). A job's first run
/// takes a generation above it, not only above its own (none): the query service reads the changelogs
/// (`count_changes`, `count_blocks`, `top_videos`, `stats_changes`) by epoch alone, and the
/// stats readers take the newest compacted row by epoch, so a job started under a new
/// `--job-name` where another one counted (a topic recreated and counted anew) must number its
/// epochs above every epoch that job wrote. Every epoch of a generation is planned after its
/// row in `checkpoint_generations` is acknowledged, so that small table bounds them all. Jobs
/// that start at the same moment may read different values; [`JobState::raise_above`] takes
/// the largest any process read (jobs/agreement.rs).
pub async fn newest_generation_of_any_job(clickhouse: &ClickHouse) -> Result<u64, SinkError> {
    #[derive(Row, Deserialize)]
    struct Newest {
        generation: u64,
    }
    let newest: Vec<Newest> = clickhouse
        .fetch_all(
            clickhouse.client().query("SELECT toUInt64(max(generation)) AS generation FROM checkpoint_generations"),
        )
        .await?;
    Ok(newest.first().map_or(0, |n| n.generation))
}

impl JobState {
    /// Moves this run's generation above `newest` (see [`newest_generation_of_any_job`]); true
    /// if it moved. Pending epochs keep their numbers: only new epochs are numbered from it.
    pub fn raise_above(&mut self, newest: u64) -> bool {
        if self.generation > newest {
            return false;
        }
        self.generation = newest + 1;
        self.next_epoch = self.generation << GENERATION_SHIFT;
        true
    }
}

/// Reads the checkpoint of `job` on `topic` and picks this run's generation.
///
/// Plans are written one epoch after the other, so a process has at most one plan in flight;
/// if it is killed, that plan may land later, even after the next run read the checkpoint.
/// [`void_plans`] sets such plans aside, and [`JobState::resume`] comes only from the plans
/// that count. Among the pending epochs, the ranges of each partition must follow one another;
/// an overlap or a gap is refused ([`CheckpointError::NotContiguous`]): re-running such epochs
/// would count offsets twice (an overlap) or fold the gap's messages into the next epoch, which
/// then differs from what was written before (a gap).
pub async fn load(clickhouse: &ClickHouse, job: &str, topic: &str) -> Result<JobState, CheckpointError> {
    let client = clickhouse.client();
    // The newest snapshot bounds what is read: commits and plans after it (the primary key
    // starts with job, topic, epoch, so those are the table's tail), and its offsets for the
    // partitions that did not move since.
    let snapshot = newest_snapshot(clickhouse, job, topic).await?;
    let since = snapshot.as_ref().map_or(0, |(epoch, _)| *epoch);
    let commits: Vec<MaxRow> = clickhouse
        .fetch_all(
            client
                .query(
                    "SELECT count() AS rows, max(epoch) AS max_epoch FROM checkpoint_commits \
                     WHERE job = ? AND topic = ? AND epoch >= ?",
                )
                .bind(job)
                .bind(topic)
                .bind(since),
        )
        .await?;
    // A snapshot is written only once its epoch and every epoch before it finished, so its
    // epoch counts as committed even without a commit row (a re-run epoch whose range held
    // no message writes none).
    let last_committed =
        commits.first().filter(|r| r.rows > 0).map(|r| r.max_epoch).max(snapshot.as_ref().map(|(epoch, _)| *epoch));

    let mut generations = started_generations(clickhouse, job, topic).await?;
    let newest_lease_token = generations.iter().map(|g| g.lease_token).max().unwrap_or(0);
    let fenced = fenced_generations(&generations);
    generations.retain(|g| !fenced.contains(&g.generation));
    // With a snapshot, plans at or before it are settled: the void plans among them are in no
    // snapshot, and nothing below reads them.
    let planned = planned_by_generation(clickhouse, job, topic, snapshot.as_ref().map(|(epoch, _)| *epoch)).await?;
    let mut void = void_plans(&planned, &generations);
    // Every plan of a fenced generation is void (its first epoch is generation << 32).
    for &generation in &fenced {
        void.retain(|(g, _)| *g != generation);
        void.push((generation, (generation << GENERATION_SHIFT).saturating_sub(1)));
    }
    void.sort_unstable();
    // Only the plans the query above saw: one landing while this function reads is, for this
    // run, a late plan (its base epoch, recorded from the same view, sets it aside for later
    // runs too). Reading it below would count it here and void it for every later run: a
    // fault test found exactly that double count under load.
    let counted = format!("{} AND {}", counted_plans(&void), seen_plans(&planned));

    let tail = match &snapshot {
        Some((epoch, _)) => format!("epoch > {epoch}"),
        None => "1".to_owned(),
    };
    let resume: Vec<ResumeRow> = clickhouse
        .fetch_all(
            client
                .query(&format!(
                    "SELECT partition, max(end_offset) AS end_offset FROM checkpoint_ranges \
                     WHERE job = ? AND topic = ? AND {tail} AND {counted} GROUP BY partition"
                ))
                .bind(job)
                .bind(topic),
        )
        .await?;
    let mut resume: HashMap<u32, u64> = resume.into_iter().map(|r| (r.partition, r.end_offset)).collect();
    for (partition, end) in snapshot.map(|(_, offsets)| offsets).unwrap_or_default() {
        let offset = resume.entry(partition).or_default();
        *offset = (*offset).max(end);
    }

    let after = last_committed.map_or(0, |e| e + 1);
    let pending_rows: Vec<RangeRow> = clickhouse
        .fetch_all(
            client
                .query(&format!(
                    "SELECT epoch, partition, start_offset, end_offset, peers FROM checkpoint_ranges \
                     WHERE job = ? AND topic = ? AND epoch >= ? AND {counted} ORDER BY epoch, partition"
                ))
                .bind(job)
                .bind(topic)
                .bind(after),
        )
        .await?;

    // The newest plan that counts (none of a fenced generation), and a generation above every
    // one found.
    let base_epoch = planned
        .iter()
        .filter(|p| !fenced.contains(&p.generation))
        .map(|p| void.iter().find(|(g, _)| *g == p.generation).map_or(p.max_epoch, |(_, base)| p.max_epoch.min(*base)))
        .chain(last_committed)
        .max()
        .unwrap_or(0);
    let generation = planned
        .iter()
        .map(|p| p.generation)
        .chain(generations.iter().map(|g| g.generation))
        .chain(last_committed.map(|e| e >> GENERATION_SHIFT))
        .max()
        .map_or(1, |g| g + 1);
    let mut state = JobState {
        last_committed,
        next_epoch: generation << GENERATION_SHIFT,
        generation,
        base_epoch,
        resume,
        void_plans: void,
        newest_lease_token,
        ..JobState::default()
    };
    let mut ends: HashMap<u32, u64> = HashMap::new();
    for row in pending_rows {
        if let Some(&previous_end) = ends.get(&row.partition)
            && row.start_offset != previous_end
        {
            return Err(CheckpointError::NotContiguous {
                job: job.to_owned(),
                topic: topic.to_owned(),
                partition: row.partition,
                epoch: row.epoch,
                start: row.start_offset,
                previous_end,
            });
        }
        ends.insert(row.partition, row.end_offset);
        state.pending_peers = Some(row.peers);
        state.pending.entry(row.epoch).or_default().push(Range {
            partition: row.partition,
            start: row.start_offset,
            end: row.end_offset,
        });
    }
    Ok(state)
}

/// Every generation that started, with the newest plan it built on.
async fn started_generations(clickhouse: &ClickHouse, job: &str, topic: &str) -> Result<Vec<GenerationRow>, SinkError> {
    clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(
                    "SELECT generation, max(base_epoch) AS base_epoch, max(lease_token) AS lease_token \
                     FROM checkpoint_generations WHERE job = ? AND topic = ? GROUP BY generation ORDER BY generation",
                )
                .bind(job)
                .bind(topic),
        )
        .await
}

/// Per generation, the newest planned epoch (of the plans after `after`, if given).
async fn planned_by_generation(
    clickhouse: &ClickHouse,
    job: &str,
    topic: &str,
    after: Option<u64>,
) -> Result<Vec<PlannedRow>, SinkError> {
    let tail = after.map_or("1".to_owned(), |epoch| format!("epoch > {epoch}"));
    clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(&format!(
                    "SELECT intDiv(epoch, {}) AS generation, max(epoch) AS max_epoch FROM checkpoint_ranges \
                     WHERE job = ? AND topic = ? AND {tail} GROUP BY generation ORDER BY generation",
                    1u64 << GENERATION_SHIFT
                ))
                .bind(job)
                .bind(topic),
        )
        .await
}

/// Where each partition's committed epochs end, as of `state` (a replay counts the events below):
/// the start of its first pending range, else where it resumes.
pub fn committed_ends(state: &JobState) -> BTreeMap<u32, u64> {
    let mut ends: BTreeMap<u32, u64> = state.resume.iter().map(|(p, o)| (*p, *o)).collect();
    for range in state.pending.values().flatten() {
        let end = ends.entry(range.partition).or_insert(range.start);
        *end = (*end).min(range.start);
    }
    ends
}

/// The newest snapshot of `job` on `topic`: its epoch and each partition's resume offset.
async fn newest_snapshot(
    clickhouse: &ClickHouse,
    job: &str,
    topic: &str,
) -> Result<Option<(u64, Vec<(u32, u64)>)>, SinkError> {
    let newest: Vec<MaxRow> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(
                    "SELECT count() AS rows, max(epoch) AS max_epoch FROM checkpoint_snapshots \
                     WHERE job = ? AND topic = ?",
                )
                .bind(job)
                .bind(topic),
        )
        .await?;
    let Some(epoch) = newest.first().filter(|r| r.rows > 0).map(|r| r.max_epoch) else { return Ok(None) };
    let rows: Vec<ResumeRow> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(
                    "SELECT partition, end_offset FROM checkpoint_snapshots WHERE job = ? AND topic = ? AND epoch = ? \
                     ORDER BY partition",
                )
                .bind(job)
                .bind(topic)
                .bind(epoch),
        )
        .await?;
    Ok(Some((epoch, rows.into_iter().map(|r| (r.partition, r.end_offset)).collect())))
}

/// A snapshot: once `epoch` and every epoch before it are committed, each partition resumes at
/// its offset in `offsets` (the newest end of the plans that count). One block: it lands whole
/// or not at all. Write it only after the commit of `epoch` was acknowledged.
pub fn snapshot_block(job: &str, topic: &str, epoch: u64, offsets: &BTreeMap<u32, u64>) -> Insert {
    let mut block = NativeBlock::new(5, offsets.len());
    block.column_str("job", offsets.keys().map(|_| job));
    block.column_str("topic", offsets.keys().map(|_| topic));
    block.column_u64("epoch", offsets.keys().map(|_| epoch));
    block.column_u32("partition", "UInt32", offsets.keys().copied());
    block.column_u64("end_offset", offsets.values().copied());
    Insert { table: "checkpoint_snapshots".into(), rows: block.rows(), body: block.finish() }
}

/// Epochs per partition of `count_changes`, `count_blocks` and `stats_changes` (their `PARTITION BY`).
pub const CHANGELOG_PARTITION_EPOCHS: u64 = 1 << 20;

/// Epochs per partition of `top_videos`.
pub const TOP_PARTITION_EPOCHS: u64 = 1 << 16;

/// How far back in event time a restarted `view_counts` reads minute counts from
/// `count_changes` for its trending windows: the largest window, and an hour to spare.
pub const TRENDING_RETENTION_SECS: u32 = 25 * 3600;

/// Drops the partitions of the query service's changelog (`count_changes`, `count_blocks`)
/// that end before the partition before `below`'s: at least 2^20 epochs before `below` stay
/// (17 minutes at 1 ms epochs, 12 days at the default 1 s). A service that was away longer
/// starts over (docs/reads-from-memory.md). A partition holding a minute within
/// [`TRENDING_RETENTION_SECS`] of the newest minute stays too: a restarted job rebuilds its
/// trending windows from it. And the partitions of `top_videos` before every list's newest
/// epoch at or below `below` go. Returns how many partitions went.
pub async fn drop_old_changelog(clickhouse: &ClickHouse, below: u64) -> Result<usize, SinkError> {
    #[derive(Row, Deserialize)]
    struct Part {
        table: String,
        partition: String,
    }
    #[derive(Row, Deserialize)]
    struct Newest {
        range: u64,
        minute: u32,
    }
    #[derive(Row, Deserialize)]
    struct Oldest {
        lists: u64,
        epoch: u64,
    }
    let keep_from = (below / CHANGELOG_PARTITION_EPOCHS).saturating_sub(1);
    let newest: Vec<Newest> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(&format!(
                    "SELECT intDiv(epoch, ?) AS range, toUInt32(max(minute)) AS minute FROM count_changes \
                     WHERE video_id NOT LIKE '{}%' GROUP BY range",
                    videocount_events::CANARY_PREFIX
                ))
                .bind(CHANGELOG_PARTITION_EPOCHS),
        )
        .await?;
    let newest_minute = newest.iter().map(|n| n.minute).max().unwrap_or(0);
    let window_from = newest_minute.saturating_sub(TRENDING_RETENTION_SECS);
    let in_window: Vec<u64> = newest.iter().filter(|n| n.minute >= window_from).map(|n| n.range).collect();
    // Each list's newest rows at or below `below` (committed: rows above it may be of epochs
    // still to be re-run) stay.
    let oldest: Vec<Oldest> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(
                    "SELECT count() AS lists, toUInt64(min(newest)) AS epoch FROM \
                     (SELECT max(epoch) AS newest FROM top_videos WHERE epoch <= ? GROUP BY event_type, period)",
                )
                .bind(below),
        )
        .await?;
    let top_keep_from = oldest.first().filter(|o| o.lists > 0).map(|o| o.epoch / TOP_PARTITION_EPOCHS);
    let parts: Vec<Part> = clickhouse
        .fetch_all(clickhouse.client().query(
            "SELECT DISTINCT table, partition FROM system.parts WHERE database = currentDatabase() \
             AND table IN ('count_changes', 'count_blocks', 'top_videos') AND active",
        ))
        .await?;
    let mut dropped = 0;
    for part in parts {
        // The partition of an integer key is its number; anything else is not ours to drop.
        let Ok(number) = part.partition.trim_matches('\'').parse::<u64>() else { continue };
        let old = match part.table.as_str() {
            "top_videos" => top_keep_from.is_some_and(|keep| number < keep),
            _ => number < keep_from && !in_window.contains(&number),
        };
        if old {
            clickhouse.execute(&format!("ALTER TABLE {} DROP PARTITION {number}", part.table)).await?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// Drops the partitions of `event_stats`' changelog (`stats_changes`) that end before the
/// partition before `below`'s, as [`drop_old_changelog`] does for the counts' (no trending
/// window reads it). Returns how many partitions went.
pub async fn drop_old_stats_changes(clickhouse: &ClickHouse, below: u64) -> Result<usize, SinkError> {
    #[derive(Row, Deserialize)]
    struct Part {
        partition: String,
    }
    let keep_from = (below / CHANGELOG_PARTITION_EPOCHS).saturating_sub(1);
    let parts: Vec<Part> = clickhouse
        .fetch_all(clickhouse.client().query(
            "SELECT DISTINCT partition FROM system.parts WHERE database = currentDatabase() \
             AND table = 'stats_changes' AND active",
        ))
        .await?;
    let mut dropped = 0;
    for part in parts {
        let Ok(number) = part.partition.trim_matches('\'').parse::<u64>() else { continue };
        if number < keep_from {
            clickhouse.execute(&format!("ALTER TABLE stats_changes DROP PARTITION {number}")).await?;
            dropped += 1;
        }
    }
    Ok(dropped)
}

/// A minute count of `count_changes`: event type, video, minute (seconds), count.
pub type MinuteCount = (String, String, u32, u64);

/// The newest minute of the trending windows' source, and whether it has rows at all.
#[derive(Row, Deserialize)]
struct NewestMinute {
    rows: u64,
    minute: u32,
}

/// A minute count as the trending windows' sources give it.
#[derive(Row, Deserialize)]
struct WindowCell {
    event_type: String,
    video_id: String,
    minute: u32,
    count: u64,
}

impl WindowCell {
    fn minute_count(self) -> MinuteCount {
        (self.event_type, self.video_id, self.minute, self.count)
    }
}

/// As [`trending_window`], from `events_raw` instead, for when `count_changes` was emptied (a
/// replay swaps in an empty one): every event of the committed epochs is there once, and those
/// of the `pending` epochs (planned, maybe partly written, to be re-run) are left out by their
/// offset ranges.
pub async fn trending_window_from_raw(
    clickhouse: &ClickHouse,
    pending: &BTreeMap<u64, Vec<Range>>,
) -> Result<(Option<u32>, Vec<MinuteCount>), SinkError> {
    let pending: Vec<String> = pending
        .values()
        .flatten()
        .map(|r| format!("(partition = {} AND offset >= {} AND offset < {})", r.partition, r.start, r.end))
        .collect();
    let counted = format!(
        "video_id NOT LIKE '{}%' AND NOT ({})",
        videocount_events::CANARY_PREFIX,
        if pending.is_empty() { "0".to_owned() } else { pending.join(" OR ") }
    );
    let newest: Vec<NewestMinute> = clickhouse
        .fetch_all(clickhouse.client().query(&format!(
            "SELECT count() AS rows, toUInt32(intDiv(max(ts), 60000) * 60) AS minute FROM events_raw WHERE {counted}"
        )))
        .await?;
    let Some(now) = newest.first().filter(|n| n.rows > 0).map(|n| n.minute) else {
        return Ok((None, Vec::new()));
    };
    let cells: Vec<WindowCell> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(&format!(
                    "SELECT event_type, video_id, toUInt32(intDiv(ts, 60000) * 60) AS minute, count() AS count \
                     FROM events_raw WHERE ts >= ? AND {counted} GROUP BY event_type, video_id, minute"
                ))
                .bind((u64::from(now.saturating_sub(TRENDING_RETENTION_SECS)) + 60) * 1000),
        )
        .await?;
    Ok((Some(now), cells.into_iter().map(WindowCell::minute_count).collect()))
}

/// The lists (event type, window name) `top_videos` has rows of up to `last_committed`: a
/// restarted job rewrites them all when "now" moves, as the run before it would have.
pub async fn top_lists(clickhouse: &ClickHouse, last_committed: u64) -> Result<Vec<(String, String)>, SinkError> {
    #[derive(Row, Deserialize)]
    struct List {
        event_type: String,
        period: String,
    }
    let lists: Vec<List> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query("SELECT DISTINCT event_type, period FROM top_videos WHERE epoch <= ?")
                .bind(last_committed),
        )
        .await?;
    Ok(lists.into_iter().map(|l| (l.event_type, l.period)).collect())
}

/// What the epochs up to `last_committed` left in `count_changes` for the trending windows: the
/// newest minute, and the minute counts from [`TRENDING_RETENTION_SECS`] before it, summed over
/// epochs (the freshness canaries' videos left out of both, as the job's windows leave them out).
pub async fn trending_window(
    clickhouse: &ClickHouse,
    last_committed: u64,
) -> Result<(Option<u32>, Vec<MinuteCount>), SinkError> {
    let newest: Vec<NewestMinute> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(&format!(
                    "SELECT count() AS rows, toUInt32(max(minute)) AS minute FROM count_changes WHERE epoch <= ? \
                     AND video_id NOT LIKE '{}%'",
                    videocount_events::CANARY_PREFIX
                ))
                .bind(last_committed),
        )
        .await?;
    let Some(now) = newest.first().filter(|n| n.rows > 0).map(|n| n.minute) else {
        return Ok((None, Vec::new()));
    };
    let cells: Vec<WindowCell> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(&format!(
                    "SELECT event_type, video_id, toUInt32(minute) AS minute, toUInt64(sum(count)) AS count \
                     FROM count_changes WHERE epoch <= ? AND toUInt32(minute) > ? \
                     AND video_id NOT LIKE '{}%' GROUP BY event_type, video_id, minute",
                    videocount_events::CANARY_PREFIX
                ))
                .bind(last_committed)
                .bind(now.saturating_sub(TRENDING_RETENTION_SECS)),
        )
        .await?;
    Ok((Some(now), cells.into_iter().map(WindowCell::minute_count).collect()))
}

/// Deletes what no start can read any more once a snapshot at or after epoch `below` exists:
/// the snapshots, plans and commits of `job` on `topic` before `below` (ClickHouse mutations, in
/// the background). A start reads only the newest snapshot and what follows it, and a replay
/// reads what a start reads, so the checkpoint tables stay the size of the interval between
/// trims instead of growing with the job's age.
pub async fn trim_checkpoint(clickhouse: &ClickHouse, job: &str, topic: &str, below: u64) -> Result<(), SinkError> {
    // Commits are trimmed only while a newer one stays: an idle job's epochs commit without
    // rows, and compaction and the one-topic check look for its newest commit.
    let newer: Vec<MaxRow> = clickhouse
        .fetch_all(
            clickhouse
                .client()
                .query(
                    "SELECT count() AS rows, toUInt64(max(epoch)) AS max_epoch FROM checkpoint_commits \
                     WHERE job = ? AND topic = ? AND epoch >= ?",
                )
                .bind(job)
                .bind(topic)
                .bind(below),
        )
        .await?;
    let keep_commits = newer.first().is_none_or(|r| r.rows == 0);
    for table in ["checkpoint_snapshots", "checkpoint_ranges", "checkpoint_commits"] {
        if table == "checkpoint_commits" && keep_commits {
            continue;
        }
        let query = clickhouse
            .client()
            .query(&format!("ALTER TABLE {table} DELETE WHERE job = ? AND topic = ? AND epoch < ?"))
            .bind(job)
            .bind(topic)
            .bind(below);
        clickhouse.execute_query(query).await?;
    }
    Ok(())
}

/// Records that generation `state.generation` of `job` on `topic` builds on `state.base_epoch`.
/// Written, and acknowledged, before the run plans anything.
pub fn generation_block(job: &str, topic: &str, state: &JobState, now_secs: u32, lease_token: u64) -> Insert {
    let mut block = NativeBlock::new(6, 1);
    block.column_str("job", [job].into_iter());
    block.column_str("topic", [topic].into_iter());
    block.column_u64("generation", [state.generation].into_iter());
    block.column_u64("base_epoch", [state.base_epoch].into_iter());
    block.column_u32("started_at", "DateTime('UTC')", [now_secs].into_iter());
    block.column_u64("lease_token", [lease_token].into_iter());
    Insert { table: "checkpoint_generations".into(), rows: 1, body: block.finish() }
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

/// Records a run that plans epochs from `first_epoch` on with settings `fingerprint`; `raw_log`
/// says every event it adds to the count tables is in `events_raw` too (the query service
/// follows edge times read from there only while every run's was).
pub fn run_block(job: &str, topic: &str, first_epoch: u64, fingerprint: u64, raw_log: bool, now_secs: u32) -> Insert {
    let mut block = NativeBlock::new(6, 1);
    block.column_str("job", [job].into_iter());
    block.column_str("topic", [topic].into_iter());
    block.column_u64("first_epoch", [first_epoch].into_iter());
    block.column_u64("fingerprint", [fingerprint].into_iter());
    block.column_u32("started_at", "DateTime('UTC')", [now_secs].into_iter());
    block.column_u8("raw_log", [u8::from(raw_log)].into_iter());
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

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << GENERATION_SHIFT;

    #[test]
    fn a_run_numbers_its_epochs_above_every_job_of_the_database() {
        let pending = BTreeMap::from([(2 * G + 4, vec![Range { partition: 0, start: 0, end: 9 }])]);
        let mut state = JobState { generation: 3, next_epoch: 3 * G, pending: pending.clone(), ..JobState::default() };
        assert!(!state.raise_above(2), "its own generations are above already");
        assert_eq!((state.generation, state.next_epoch), (3, 3 * G));
        assert!(state.raise_above(3), "another job recorded the same generation");
        assert_eq!((state.generation, state.next_epoch), (4, 4 * G));
        assert!(state.raise_above(7));
        assert_eq!((state.generation, state.next_epoch), (8, 8 * G));
        assert_eq!(state.pending, pending, "interrupted epochs keep their numbers");
    }

    #[test]
    fn a_late_plan_of_a_dead_process_does_not_count() {
        // Generation 1 planned up to epoch G+7, then was killed with the plan of G+8 in flight.
        // Generation 2 read the checkpoint (newest plan G+7), planned; then G+8 landed.
        let planned =
            [PlannedRow { generation: 1, max_epoch: G + 8 }, PlannedRow { generation: 2, max_epoch: 2 * G + 3 }];
        let generations = [
            GenerationRow { generation: 1, base_epoch: 0, lease_token: 0 },
            GenerationRow { generation: 2, base_epoch: G + 7, lease_token: 0 },
        ];
        let void = void_plans(&planned, &generations);
        assert_eq!(void, [(1, G + 7)]);
        assert_eq!(counted_plans(&void), format!("NOT ((epoch >= {} AND epoch < {}))", G + 8, 2 * G));
        // Had generation 2 seen it, it would count.
        let generations = [
            GenerationRow { generation: 1, base_epoch: 0, lease_token: 0 },
            GenerationRow { generation: 2, base_epoch: G + 8, lease_token: 0 },
        ];
        assert!(void_plans(&planned, &generations).is_empty());
        assert_eq!(counted_plans(&[]), "1");
        // Only what was seen: a plan landing after the look is not read.
        let seen = [PlannedRow { generation: 0, max_epoch: 3 }, PlannedRow { generation: 1, max_epoch: G + 7 }];
        assert_eq!(
            seen_plans(&seen),
            format!("((epoch >= 0 AND epoch <= 3) OR (epoch >= {G} AND epoch <= {}))", G + 7)
        );
        assert_eq!(seen_plans(&[]), "0");
        // The newest generation's own plans count while no later run has started.
        let planned = [PlannedRow { generation: 2, max_epoch: 2 * G + 3 }];
        assert!(void_plans(&planned, &generations).is_empty());
    }

    /// Two processes killed one after the other, each with a plan in flight, that land later:
    /// a generation that started (even one without plans of its own yet) decides, so a plan is
    /// never voided after a run re-ran it (a review found this).
    #[test]
    fn chained_late_plans_are_decided_by_the_next_run_that_started() {
        // Generation 1 planned up to G+7, G+8 in flight. Generation 2 started on G+7, sent
        // 2G+0, died. G+8 landed. Generation 3 reads the checkpoint.
        let planned = [PlannedRow { generation: 1, max_epoch: G + 8 }];
        let generations = [
            GenerationRow { generation: 1, base_epoch: 0, lease_token: 0 },
            GenerationRow { generation: 2, base_epoch: G + 7, lease_token: 0 },
        ];
        assert_eq!(void_plans(&planned, &generations), [(1, G + 7)], "G+8 landed after generation 2 started");
        // Generation 3 started on G+7; then 2G+0 landed. Generation 4 sets both aside.
        let planned = [PlannedRow { generation: 1, max_epoch: G + 8 }, PlannedRow { generation: 2, max_epoch: 2 * G }];
        let generations = [
            GenerationRow { generation: 1, base_epoch: 0, lease_token: 0 },
            GenerationRow { generation: 2, base_epoch: G + 7, lease_token: 0 },
            GenerationRow { generation: 3, base_epoch: G + 7, lease_token: 0 },
        ];
        assert_eq!(void_plans(&planned, &generations), [(1, G + 7), (2, G + 7)]);
    }

    /// An instance paused after it took the lease (token 5) records its generation only after a
    /// standby (token 6) took the lease and recorded the generation before it: that row is
    /// fenced, whatever its generation number (a review found the double count it caused).
    #[test]
    fn a_generation_recorded_by_an_instance_that_lost_the_lease_is_fenced() {
        let row = |generation, lease_token| GenerationRow { generation, base_epoch: 0, lease_token };
        assert_eq!(fenced_generations(&[row(1, 5), row(2, 6), row(3, 5)]), [3]);
        assert_eq!(fenced_generations(&[row(1, 5), row(2, 6), row(3, 7)]), Vec::<u64>::new());
        assert_eq!(fenced_generations(&[row(1, 0), row(2, 6), row(3, 0)]), Vec::<u64>::new(), "0 is never judged");
    }
}
