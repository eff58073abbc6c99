-- videocount: the analysts' contract. Applied with `make schema CLICKHOUSE_DATABASE=db`;
-- no database name appears here, so one file serves every database. Runs on ClickHouse 18.16
-- and on current ClickHouse (checked with chdb in `make test`).
--
-- Counts: read with sum(count), grouped as you need. Rows of one key may stay unmerged for a
-- while (SummingMergeTree merges in the background), so never read `count` without sum().
--
-- Tables are Replicated*MergeTree so that ClickHouse drops a repeated identical insert block:
-- that is how a re-run epoch after a crash is counted once (docs/exactly-once.md). The
-- `epoch` column is internal: it keeps blocks of different epochs distinct.
--
-- Every table takes replicated_max_ratio_of_wrong_parts = 1. A replica killed during an insert
-- keeps a part ZooKeeper never heard of, and by default starts only if such parts hold at most
-- half of the table's rows: a young table can be one such block, and the replica then refused
-- to start (seen in the chaos run of `make test`, kill -9 of a ClickHouse replica). That part's
-- insert was never acknowledged, so its writer sent it again; the replica puts it aside
-- (detached/ignored_*) and nothing is lost. A database created before this setting keeps its
-- old tables: start such a replica once with an empty file `flags/force_restore_data` in its
-- data path (README, "High availability").

-- Views and any other event type per video, per minute (UTC).
CREATE TABLE IF NOT EXISTS event_counts_minute
(
    video_id String,
    event_type String,
    minute DateTime('UTC'),
    count UInt64,
    epoch UInt64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{database}/event_counts_minute', '{replica}', (count))
PARTITION BY toYYYYMM(minute)
ORDER BY (video_id, event_type, minute)
SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- The same counts rolled up per hour: a one-year range reads a few thousand rows at most.
CREATE TABLE IF NOT EXISTS event_counts_hour
(
    video_id String,
    event_type String,
    hour DateTime('UTC'),
    count UInt64,
    epoch UInt64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{database}/event_counts_hour', '{replica}', (count))
PARTITION BY toYYYYMM(hour)
ORDER BY (video_id, event_type, hour)
SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- The same counts rolled up per day: a one-year range reads at most 366 rows per key.
CREATE TABLE IF NOT EXISTS event_counts_day
(
    video_id String,
    event_type String,
    day Date,
    count UInt64,
    epoch UInt64
)
ENGINE = ReplicatedSummingMergeTree('/clickhouse/tables/{database}/event_counts_day', '{replica}', (count))
PARTITION BY toYear(day)
ORDER BY (video_id, event_type, day)
SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- The changelog of event_counts_minute, for the query service's in-memory counts: each epoch's
-- minute block of view_counts, written here before the count tables, and a row in
-- count_blocks (epoch, the worker that wrote the block, the workers in all) once the block is in
-- event_counts_minute (before the hour and day blocks). Sorted by epoch, so the rows of the
-- epochs after a given one are an indexed read; partitioned by ranges of 2^20 epochs (an epoch's block lands in one part, and
-- old ranges can be dropped whole). `times`: the milliseconds into the minute of the row's
-- events, sorted (empty in rows written by older builds and by a replay), which keep the
-- service's partial edge minutes current. Internal: analysts read the count tables
-- (docs/reads-from-memory.md).
CREATE TABLE IF NOT EXISTS count_changes
(
    video_id String,
    event_type String,
    minute DateTime('UTC'),
    count UInt64,
    epoch UInt64,
    times Array(UInt16)
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/count_changes', '{replica}')
PARTITION BY intDiv(epoch, 1048576)
ORDER BY (epoch, video_id, event_type, minute)
SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

CREATE TABLE IF NOT EXISTS count_blocks
(
    epoch UInt64,
    worker UInt32,
    peers UInt32
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/count_blocks', '{replica}')
PARTITION BY intDiv(epoch, 1048576)
ORDER BY (epoch, worker)
SETTINGS replicated_deduplication_window = 1000, replicated_max_ratio_of_wrong_parts = 1;

-- view_counts' trending (on unless --no-trending): the top videos per event type over the last
-- hour and the last 24 hours of event time ("now" is the newest minute of any event counted, so
-- a replay of the same events gives the same lists). Each epoch that changes a list (or moves
-- "now") writes the whole list again: `rank` 1 is the most counted (ties: the smaller video id
-- first); an empty list is one row of rank 0 and no video. `from_ms`/`to_ms` are the window,
-- [from, to) in epoch milliseconds. A reader takes, per (event_type, period), the rows of the
-- newest epoch at or below the job's newest commit; a restarted job may write a list twice in
-- one epoch, identical, so read one row per rank. Sorted by epoch (the lists newer than a known
-- epoch are an indexed read); the job drops ranges of 2^16 epochs older than every list's
-- newest epoch.
CREATE TABLE IF NOT EXISTS top_videos
(
    epoch UInt64,
    event_type String,
    period String,
    rank UInt32,
    video_id String,
    count UInt64,
    from_ms UInt64,
    to_ms UInt64
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/top_videos', '{replica}')
PARTITION BY intDiv(epoch, 65536)
ORDER BY (epoch, event_type, period, rank)
SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- event_stats: the states of aggregate functions per (video, event type, aggregate, minute),
-- one row per epoch that touched the key (merge the rows of a key; never read one alone).
-- `aggregate` is the stored state: 'moments' answers count, sum, min, max and avg;
-- 'quantiles' (a DDSketch) answers p1..p99; 'uniq' (a HyperLogLog) answers uniq.
-- Every row also has plain columns over the events that fed it: `count` (events),
-- `value_count`, `sum`, `min` and `max` (of their values; min is inf and max -inf without
-- values), so the exact functions are plain SQL over aggregate = 'moments':
--   count = sum(count), sum = sum(sum), min = min(min), max = max(max),
--   avg = sum(sum) / sum(value_count).
-- `state` holds the encoded state; percentiles and uniq are merged by the project's query code
-- (`videocount stats`, the query library). Hour and day tables hold the same states rolled up.
-- Compaction (run by event_stats) merges the states of a closed bucket into one row with
-- `compacted = 1` (its count, sum... columns are 0, so plain SQL is unaffected) and empties
-- the `state` of the rows it merged; a reader merges the newest compacted row of a bucket
-- with the rows of later epochs.
-- The dedup window is larger here: uncommitted epochs may lag further behind (the slow stream;
-- the jobs check at start that their re-runs fit, jobs/database.rs).
CREATE TABLE IF NOT EXISTS stats_minute
(
    video_id String,
    event_type String,
    aggregate String,
    minute DateTime('UTC'),
    count UInt64,
    value_count UInt64,
    sum Float64,
    min Float64,
    max Float64,
    state String,
    epoch UInt64,
    compacted UInt8
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/stats_minute', '{replica}')
PARTITION BY toYYYYMM(minute)
ORDER BY (video_id, event_type, aggregate, minute)
SETTINGS replicated_deduplication_window = 20000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

CREATE TABLE IF NOT EXISTS stats_hour
(
    video_id String,
    event_type String,
    aggregate String,
    hour DateTime('UTC'),
    count UInt64,
    value_count UInt64,
    sum Float64,
    min Float64,
    max Float64,
    state String,
    epoch UInt64,
    compacted UInt8
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/stats_hour', '{replica}')
PARTITION BY toYYYYMM(hour)
ORDER BY (video_id, event_type, aggregate, hour)
SETTINGS replicated_deduplication_window = 20000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

CREATE TABLE IF NOT EXISTS stats_day
(
    video_id String,
    event_type String,
    aggregate String,
    day Date,
    count UInt64,
    value_count UInt64,
    sum Float64,
    min Float64,
    max Float64,
    state String,
    epoch UInt64,
    compacted UInt8
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/stats_day', '{replica}')
PARTITION BY toYear(day)
ORDER BY (video_id, event_type, aggregate, day)
SETTINGS replicated_deduplication_window = 20000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- event_stats' changelog for the query service: each epoch's stats_minute rows again (the same
-- block), sorted by epoch so that the rows of the epochs after a given one are an indexed read,
-- partitioned by ranges of 2^20 epochs (event_stats drops the old ones). Never compacted.
-- Internal: analysts read the stats tables (docs/reads-from-memory.md).
CREATE TABLE IF NOT EXISTS stats_changes
(
    video_id String,
    event_type String,
    aggregate String,
    minute DateTime('UTC'),
    count UInt64,
    value_count UInt64,
    sum Float64,
    min Float64,
    max Float64,
    state String,
    epoch UInt64,
    compacted UInt8
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/stats_changes', '{replica}')
PARTITION BY intDiv(epoch, 1048576)
ORDER BY (epoch, video_id, event_type, aggregate, minute)
SETTINGS replicated_deduplication_window = 20000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- The raw event log: every counted event once, for replays and ad-hoc slicing.
-- ts is epoch milliseconds UTC; `toDateTime(intDiv(ts, 1000))` gives a DateTime.
-- The job's --no-events-raw flag switches it off.
CREATE TABLE IF NOT EXISTS events_raw
(
    video_id String,
    event_type String,
    ts UInt64,
    partition UInt32,
    offset UInt64
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/events_raw', '{replica}')
PARTITION BY toYYYYMM(toDateTime(intDiv(ts, 1000), 'UTC'))
ORDER BY (video_id, event_type, ts)
SETTINGS replicated_deduplication_window = 1000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- Messages no job could use, each with a short stable reason and the payload (cut at 64 KiB).
-- message_ts is the Kafka timestamp of the message, epoch milliseconds (0 if it had none).
CREATE TABLE IF NOT EXISTS dead_letters
(
    job String,
    topic String,
    partition UInt32,
    offset UInt64,
    reason String,
    detail String,
    payload String,
    message_ts UInt64
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/dead_letters', '{replica}')
PARTITION BY toYYYYMM(toDateTime(intDiv(message_ts, 1000), 'UTC'))
ORDER BY (job, topic, partition, offset)
SETTINGS replicated_deduplication_window = 10000, index_granularity = 8192, replicated_max_ratio_of_wrong_parts = 1;

-- Job checkpoints: before an epoch's rows are written, the offset range [start_offset,
-- end_offset) it covers in each partition; `peers` is the number of workers that routed it.
CREATE TABLE IF NOT EXISTS checkpoint_ranges
(
    job String,
    topic String,
    epoch UInt64,
    partition UInt32,
    start_offset UInt64,
    end_offset UInt64,
    peers UInt32
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/checkpoint_ranges', '{replica}')
ORDER BY (job, topic, epoch, partition)
SETTINGS replicated_max_ratio_of_wrong_parts = 1;

-- Job checkpoint snapshots: where every partition resumes once `epoch` and all epochs before
-- it are committed (the newest end offset of the plans that count). Written now and then by a
-- running job, one block per snapshot; a start reads the newest snapshot and only the plans
-- and commits after it, so start-up stays bounded however long the job has run.
CREATE TABLE IF NOT EXISTS checkpoint_snapshots
(
    job String,
    topic String,
    epoch UInt64,
    partition UInt32,
    end_offset UInt64
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/checkpoint_snapshots', '{replica}')
ORDER BY (job, topic, epoch, partition)
SETTINGS replicated_max_ratio_of_wrong_parts = 1;

-- Job runs: the first epoch each run of a job planned, and a fingerprint of the settings its
-- output depends on (event_stats: its functions config). A run re-running interrupted epochs
-- must have the fingerprint of the run that planned them, or it would write other blocks.
-- raw_log is 1 if every event the run adds to the count tables is also written to events_raw
-- (view_counts without --no-events-raw; event_stats, which adds none); 0 otherwise, and for
-- runs recorded before the column existed. The schema writes a row with job '' (raw_log 1)
-- when it creates the count tables: every run that counted into them is recorded. The query
-- service follows edge times read from events_raw only with that row and no raw_log 0.
CREATE TABLE IF NOT EXISTS job_runs
(
    job String,
    topic String,
    first_epoch UInt64,
    fingerprint UInt64,
    started_at DateTime('UTC'),
    raw_log UInt8 DEFAULT 0
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/job_runs', '{replica}')
ORDER BY (job, topic, first_epoch)
SETTINGS replicated_max_ratio_of_wrong_parts = 1;

-- Job generations: every start of a job takes a generation (the high 32 bits of its epoch
-- numbers) and records the newest plan it builds on, before it plans anything. A plan of an
-- earlier generation after that epoch landed late, from a process that was already gone, and
-- does not count (docs/exactly-once.md).
CREATE TABLE IF NOT EXISTS checkpoint_generations
(
    job String,
    topic String,
    generation UInt64,
    base_epoch UInt64,
    started_at DateTime('UTC'),
    -- The fencing token of the job's lease when the run started (0: no lease, older builds).
    lease_token UInt64 DEFAULT 0
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/checkpoint_generations', '{replica}')
ORDER BY (job, topic, generation)
SETTINGS replicated_max_ratio_of_wrong_parts = 1;

-- Job checkpoints: an epoch whose rows are all written. Epochs planned but not committed are
-- re-run over exactly their ranges on restart.
CREATE TABLE IF NOT EXISTS checkpoint_commits
(
    job String,
    topic String,
    epoch UInt64,
    committed_at DateTime('UTC')
)
ENGINE = ReplicatedMergeTree('/clickhouse/tables/{database}/checkpoint_commits', '{replica}')
ORDER BY (job, topic, epoch)
SETTINGS replicated_max_ratio_of_wrong_parts = 1;
