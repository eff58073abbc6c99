//! [`run_job`]: what every job does around its dataflow. Checks at start, the checkpoint, the
//! source, the plan of each epoch, the dead letters, the dataflow's writes and the commit.
//!
//! ```text
//!  KafkaSource ─┬─ events ──────▶ Dataflow::build (the job's writes) ──┐
//!   (worker i)  ├─ dead letters ─▶ WriteDeadLetters ───────────────────┼─exchange(0)─▶ Commit ─▶ probe
//!               └─ ranges ──exchange(0)──▶ WritePlan ──(gate)──────────┘
//! ```
//!
//! An epoch's rows are written only after its plan (the offset ranges) is, and its commit
//! only after all of its rows are: the timely frontier carries that order. How far the source
//! may read ahead of those writes is [`Throttle`]'s contract.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rdkafka::consumer::CommitMode;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Concatenate, OkErr, Probe};
use tracing::{info, warn};
use videocount_clickhouse::checkpoints::{self, JobState, Range, commit_block, plan_block, snapshot_block};
use videocount_clickhouse::rows::{DeadLetterRow, dead_letters_block};
use videocount_clickhouse::{ClickHouse, Writer};
use videocount_events::clock::now_secs;
use videocount_events::{Located, TimeLimits};
use videocount_lease::{Fence, describe_me};
use videocount_operators::back_pressure::Throttle;
use videocount_operators::kafka_source::SourceProgress;
use videocount_operators::{FlushEpochs, NeededOffsets, SourceConfig, SourceItem, kafka_source};

use crate::agreement::{all_read_the_same_checkpoint, checkpoint_digest};
use crate::database::{check_dedup_windows, check_one_topic};
use crate::dataflow::{Dataflow, Writes};
use crate::kafka::{
    check_offsets, check_topic_config, commit_group_offsets, dead_letter_json, dead_letter_producer_config,
    ensure_topic, group_client, spawn_lag_monitor, topic_partitions,
};
use crate::{JobArgs, metrics};

/// What the source emits besides events: a dead letter or an epoch's offset range.
type Control = Result<DeadLetter, Range>;
type DeadLetter = Box<DeadLetterRow>;
/// A job's event with the partition and offset it was read from.
type Sourced<D> = Located<<D as Dataflow>::Event>;

/// Refuses to start when the schema is missing: a clear message instead of failed inserts.
async fn check_schema(clickhouse: &ClickHouse) -> anyhow::Result<()> {
    let missing = videocount_clickhouse::schema::missing_tables(clickhouse).await?;
    if missing.is_empty() {
        videocount_clickhouse::schema::add_missing_columns(clickhouse)
            .await
            .context("adding the columns newer versions of sql/schema.sql have")?;
    } else {
        bail!(
            "database {} lacks tables {missing:?}: apply the schema first (make schema CLICKHOUSE_DATABASE={})",
            clickhouse.database(),
            clickhouse.database()
        );
    }
    Ok(())
}

/// How many checkpoint snapshots a run writes between two deletions of the old ones (an hour
/// at the default interval).
const SNAPSHOTS_PER_TRIM: u64 = 60;

/// Records this run's generation (with the newest plan it builds on and its lease token) and its
/// settings fingerprint, each only while the lease holds, and waits for both to be acknowledged.
async fn record_run(
    clickhouse: &ClickHouse,
    job: &str,
    topic: &str,
    state: &checkpoints::JobState,
    (fingerprint, raw_log): (u64, bool),
    (fence, lease_token): (&Fence, u64),
) -> Result<(), String> {
    let generation = checkpoints::generation_block(job, topic, state, now_secs(), lease_token);
    let run = checkpoints::run_block(job, topic, state.next_epoch, fingerprint, raw_log, now_secs());
    for insert in [generation, run] {
        fence.wait().await?;
        clickhouse
            .insert_native(&insert.table, insert.body)
            .await
            .map_err(|e| format!("recording the run in {}: {e}", insert.table))?;
    }
    Ok(())
}

/// Everything the bytes of a re-run epoch's blocks depend on besides its offset ranges and the
/// worker count (checked on its own): the block format, the parse limits (which messages are
/// dead letters, and which are duplicates) and the dataflow's own settings. Its hash is the run's fingerprint in
/// `job_runs`; an interrupted epoch is only re-run under the same one.
pub fn block_settings<D: Dataflow>(args: &JobArgs, dataflow: &D) -> String {
    format!(
        "block format {}; --max-age-secs {}; --max-ahead-secs {}; --dedup-window {} (chunks); {}",
        videocount_clickhouse::native::BLOCK_FORMAT,
        args.max_age_secs,
        args.max_ahead_secs,
        args.dedup_window,
        dataflow.settings()
    )
}

/// Runs a job: checks, checkpoint, source, plan, dead letters, `dataflow`'s writes, commit.
pub fn run_job<D: Dataflow>(args: JobArgs, dataflow: D) -> anyhow::Result<()> {
    run_job_fenced(args, dataflow, Fence::unheld())
}

/// As [`run_job`], with a fence made by the caller (made with [`Fence::unheld`]; it opens once
/// this run holds the job's lease), for the job's own writers outside the dataflow.
pub fn run_job_fenced<D: Dataflow>(mut args: JobArgs, dataflow: D, fence: Fence) -> anyhow::Result<()> {
    args.validate()?;
    let job_name = args.job_name.get_or_insert_with(|| D::NAME.to_owned()).clone();
    let timely_config = args.timely_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let clickhouse = ClickHouse::new(args.clickhouse.config());

    let kafka = args.kafka();
    let partitions = topic_partitions(&kafka, &args.topic)?;
    let dlq_topic = args.dlq_topic.clone().unwrap_or_else(|| format!("{}-dlq", args.topic));
    let peers = (args.workers * args.processes) as u64;
    let max_commit_lag = dataflow.max_commit_lag().unwrap_or(args.max_epochs_in_flight);
    let settings = block_settings(&args, &dataflow);
    let fingerprint = xxhash_rust::xxh3::xxh3_64(settings.as_bytes());
    // Served before the lease is taken: a standby shows `lease_held 0`.
    let metrics_state = metrics::JobState::new(fence.clone());
    if let Some(listen) = args.metrics_listen {
        metrics::serve(&runtime, listen, &job_name, metrics_state.clone())?;
    }
    let (state, lease, newest_generation) = runtime.block_on(async {
        clickhouse
            .with_database("default")
            .ping()
            .await
            .with_context(|| format!("cannot reach ClickHouse at {}", args.clickhouse.url))?;
        check_schema(&clickhouse).await?;
        // One active instance: a second one waits here, before it reads anything, until this
        // one's lease ends (videocount-lease; docs/exactly-once.md).
        let lease_config = args.lease.config(&args.clickhouse.database, &job_name, args.process);
        info!(lease = %lease_config.path, zookeeper = %lease_config.zookeeper, "taking the lease");
        let lease = videocount_lease::acquire(&lease_config, &describe_me(&job_name), &fence)
            .await
            .context("taking the job's lease")?;
        // With replicas: read the checkpoint only once this replica has every acknowledged write.
        clickhouse
            .sync_replica(&checkpoints::TABLES)
            .await
            .context("waiting for this ClickHouse replica to have the whole checkpoint (SYSTEM SYNC REPLICA)")?;
        check_one_topic(&clickhouse, &args.topic).await?;
        let mut tables = dataflow.blocks_per_epoch(peers);
        tables.push(("dead_letters", peers));
        // The throttle lets the commit lag by the larger of the two (operators/back_pressure.rs).
        let lag = max_commit_lag.max(args.max_epochs_in_flight);
        let flags = format!(
            "{} {max_commit_lag} and --max-epochs-in-flight {} with {peers} workers",
            D::COMMIT_LAG_FLAG,
            args.max_epochs_in_flight
        );
        check_dedup_windows(&clickhouse, &tables, lag + args.max_epochs_in_flight + 1, &flags).await?;
        ensure_topic(&kafka, &dlq_topic, 1).await?;
        if args.process == 0 {
            check_topic_config(&kafka, &args.topic, partitions).await?;
        }
        let state = checkpoints::load(&clickhouse, &job_name, &args.topic).await.map_err(|e| match e {
            checkpoints::CheckpointError::Store(e) => anyhow::Error::new(e).context(format!(
                "cannot read the checkpoint (is the schema applied to {}? make schema)",
                args.clickhouse.database
            )),
            other => anyhow::Error::new(other),
        })?;
        // A job's first run (no row of its own: `load` picked generation 1) numbers its epochs
        // above every generation of the database's jobs: a job counting a recreated topic anew
        // must number them above the old job's (checkpoints.rs). Later runs stay above their
        // own, and only their own: a late generation row of this job must keep looking late to
        // the fencing (checkpoints::fenced_generations). 0 raises nothing.
        let newest_generation = if state.generation == 1 {
            checkpoints::newest_generation_of_any_job(&clickhouse)
                .await
                .context("reading the newest generation of the database's jobs")?
        } else {
            0
        };
        if let Some((&first_pending, _)) = state.pending.first_key_value() {
            let recorded = checkpoints::run_fingerprint(&clickhouse, &job_name, &args.topic, first_pending).await?;
            if let Some(recorded) = recorded.filter(|&recorded| recorded != fingerprint) {
                bail!(
                    "epochs {:?} were interrupted under other settings than this run's ({settings}; settings \
                     fingerprint {fingerprint:016x}, theirs {recorded:016x}). A re-run must write the blocks their \
                     first run wrote, or what had landed would count twice: restart with the build and flags they \
                     ran with (the `starting` line of that run's log lists them; builds before settings were \
                     recorded list none, so finish with that build) to finish them, then change them",
                    state.pending.keys().collect::<Vec<_>>()
                );
            }
        }
        dataflow.restore(&clickhouse, &state).await?;
        anyhow::Ok((state, lease, newest_generation))
    })?;
    check_offsets(&kafka, &args.topic, partitions, &state, &job_name)?;
    let peers = peers as u32;
    if let Some(before) = state.pending_peers.filter(|_| !state.pending.is_empty())
        && before != peers
    {
        {
            bail!(
                "epochs {:?} were interrupted while the job ran with {before} workers in all; restart with \
                 {before} workers in all to finish them (they must be re-run as they were), then change the count",
                state.pending.keys().collect::<Vec<_>>()
            );
        }
    }
    info!(
        topic = %args.topic, partitions, database = %args.clickhouse.database, workers = peers,
        last_committed = ?state.last_committed, pending_epochs = state.pending.len(),
        generation = state.generation, void_plans = ?state.void_plans,
        settings = %settings, "{job_name} starting"
    );

    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&shutdown))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&shutdown))?;

    let writer = Writer::start_fenced(
        runtime.handle(),
        clickhouse.clone(),
        args.writer_tasks,
        args.queue_capacity,
        fence.clone(),
    );
    let dlq: ThreadedProducer<DefaultProducerContext> =
        dead_letter_producer_config(&kafka).create().context("creating the dead-letter producer")?;
    let dlq = Arc::new(dlq);
    let progress = Arc::new(SourceProgress::default());
    progress.partitions.store(partitions, Ordering::Relaxed);
    if args.process == 0 {
        // Process 0 plans every epoch (worker 0) and sees them commit: it tracks what a restart
        // would read again, for the retention headroom.
        let resume = state.resume.iter().map(|(p, o)| (*p, *o));
        let pending = state
            .pending
            .iter()
            .map(|(e, ranges)| (*e, ranges.iter().map(|r| (r.partition, r.start, r.end)).collect()));
        *progress.needed.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(NeededOffsets::new(resume, pending));
    }
    spawn_lag_monitor(
        &kafka,
        &args.topic,
        &job_name,
        Arc::clone(&progress),
        Arc::clone(&shutdown),
        Duration::from_secs(2),
    );
    metrics_state.running(metrics::Running {
        progress: Arc::clone(&progress),
        writer: writer.clone(),
        queue_capacity: args.queue_capacity,
    });
    // The token this run records: above every recorded one while ZooKeeper keeps its history.
    // A new ensemble starts its transaction ids again; a token not above the recorded ones is
    // then recorded as 0 (never judged) rather than making this run's plans look fenced.
    let lease_token = if lease.token() > state.newest_lease_token {
        lease.token()
    } else {
        warn!(
            token = lease.token(),
            newest_recorded = state.newest_lease_token,
            "the lease's token is not above the recorded ones (a new ZooKeeper ensemble?): this run records none"
        );
        0
    };
    let state = Arc::new(state);
    let args = Arc::new(args);
    let dataflow = Arc::new(dataflow);

    // For the last commit of offsets to the consumer group, after the workers are done.
    let (group_kafka, group_job, group_topic) = (kafka.clone(), job_name.clone(), args.topic.clone());
    let guards = {
        let (writer, dlq, progress, shutdown) =
            (writer.clone(), Arc::clone(&dlq), Arc::clone(&progress), Arc::clone(&shutdown));
        let (handle, clickhouse, fence) = (runtime.handle().clone(), clickhouse.clone(), fence.clone());
        timely::execute(timely_config, move |worker| -> Result<(), String> {
            // Worker 0 records the run once every process has read the checkpoint (timely has
            // connected them all by now, and they compared what they read), and before anything is
            // planned or re-run: a later run must know what this one built on.
            let newest_generation = if args.processes > 1 {
                all_read_the_same_checkpoint(worker, checkpoint_digest(&state, fingerprint), newest_generation)?
            } else {
                newest_generation
            };
            // A first run's generation, above the newest any process read (see above).
            let mut raised = JobState::clone(&state);
            let state = if raised.raise_above(newest_generation) {
                if worker.index() == 0 {
                    info!(
                        generation = raised.generation,
                        "this job's first run: it numbers its epochs above every generation the database's jobs recorded"
                    );
                }
                Arc::new(raised)
            } else {
                Arc::clone(&state)
            };
            // The tables this job writes each epoch. The run records whether every event it adds
            // to the count tables is in `events_raw` too (the query service's edge times rely on it).
            let writes = |name: &str| dataflow.blocks_per_epoch(1).iter().any(|(table, _)| *table == name);
            let raw_log = writes("events_raw") || !writes("event_counts_minute");
            if worker.index() == 0 {
                handle.block_on(record_run(
                    &clickhouse,
                    &job_name,
                    &args.topic,
                    &state,
                    (fingerprint, raw_log),
                    (&fence, lease_token),
                ))?;
            }
            let probe = ProbeHandle::new();
            let written_probe = ProbeHandle::new();
            let job = job_name.clone();
            let topic = args.topic.clone();
            let (snapshot_job, snapshot_topic) = (job.clone(), topic.clone());
            // The job writes the query service's changelog: it drops its old partitions too.
            let (changelog, stats_changelog) = (writes("count_changes"), writes("stats_changes"));
            let source_config = SourceConfig {
                job: job.clone(),
                topic: topic.clone(),
                kafka: kafka.clone(),
                partitions,
                epoch_interval: Duration::from_millis(args.epoch_ms),
                limits: TimeLimits { max_age_ms: args.max_age_secs * 1000, max_ahead_ms: args.max_ahead_secs * 1000 },
                until_caught_up: args.until_caught_up,
                state: Arc::clone(&state),
                shutdown: Arc::clone(&shutdown),
                progress: Arc::clone(&progress),
                dedup_window: args.dedup_window,
            };
            let (writer, dlq, dlq_topic) = (writer.clone(), Arc::clone(&dlq), dlq_topic.clone());
            let dataflow = Arc::clone(&dataflow);
            worker.dataflow::<u64, _, _>(|scope| -> Result<(), String> {
                let parser = Arc::clone(&dataflow);
                let parse = move |payload: Option<&[u8]>, ts: Option<i64>, limits: TimeLimits| {
                    parser.parse(payload, ts, limits)
                };
                let throttle = Throttle {
                    written: written_probe.clone(),
                    committed: probe.clone(),
                    max_epochs_in_flight: args.max_epochs_in_flight,
                    max_commit_lag,
                };
                let items = kafka_source(scope, source_config, throttle, parse).map_err(|e| e.to_string())?;
                let (events, other) =
                    items.ok_err::<Vec<Sourced<D>>, Sourced<D>, Vec<Control>, Control, _>(|item| match item {
                        SourceItem::Event(event, partition, offset) => Ok((event, partition, offset)),
                        SourceItem::DeadLetter(row) => Err(Ok(row)),
                        SourceItem::Range(range) => Err(Err(range)),
                    });
                let (dead, ranges): (Stream<'_, u64, Vec<DeadLetter>>, Stream<'_, u64, Vec<Range>>) =
                    other.ok_err(|item| item);

                let (plan_job, plan_topic, plan_progress) = (job.clone(), topic.clone(), Arc::clone(&progress));
                let planned = ranges.flush_epochs_in_order::<Vec<Range>, _, _>(
                    empty(scope),
                    Exchange::new(|_: &Range| 0),
                    "WritePlan",
                    writer.clone(),
                    move |epoch, mut ranges| {
                        if ranges.is_empty() {
                            return Vec::new();
                        }
                        if let Ok(mut needed) = plan_progress.needed.lock()
                            && let Some(needed) = needed.as_mut()
                        {
                            needed.planned(epoch, ranges.iter().map(|r| (r.partition, r.start, r.end)));
                        }
                        vec![plan_block(&plan_job, &plan_topic, epoch, peers, &mut ranges)]
                    },
                );
                let dead_written = dead.flush_epochs::<Vec<DeadLetter>, _, _>(
                    planned.clone(),
                    Pipeline,
                    "WriteDeadLetters",
                    writer.clone(),
                    move |_epoch, rows| {
                        if rows.is_empty() {
                            return Vec::new();
                        }
                        for row in &rows {
                            let payload = dead_letter_json(row);
                            let key = format!("{}:{}", row.partition, row.offset);
                            if let Err((e, _)) = dlq.send(BaseRecord::to(&dlq_topic).key(&key).payload(&payload)) {
                                warn!(error = %e, "dead letter not sent to the DLQ topic (it is in the dead_letters table)");
                            }
                        }
                        let mut rows: Vec<DeadLetterRow> = rows.into_iter().map(|row| *row).collect();
                        vec![dead_letters_block(&mut rows)]
                    },
                );
                let Writes { fast, slow } = dataflow.build(scope, events, planned.clone(), &writer);
                let mut written = vec![planned, dead_written];
                written.extend(fast);
                // The source keeps within --max-epochs-in-flight of these.
                scope.concatenate(written.clone()).probe_with(&written_probe);
                written.extend(slow);
                scope
                    .concatenate(written)
                    .flush_epochs::<Vec<()>, _, _>(
                        empty(scope),
                        Exchange::new(|_: &()| 0),
                        "Commit",
                        writer.clone(),
                        move |epoch, _| vec![commit_block(&job, &topic, epoch, now_secs())],
                    )
                    .probe_with(&probe);
                Ok(())
            })?;

            let started = Instant::now();
            let mut last_committed_below = Some(0);
            let snapshot_every = Duration::from_secs(args.checkpoint_snapshot_secs);
            let mut last_snapshot = Instant::now();
            let (mut snapshots_written, mut previous_snapshot) = (0u64, None);
            let mut last_log = Instant::now();
            let mut last_messages = 0;
            while !probe.done() {
                worker.step_or_park(Some(Duration::from_millis(50)));
                let stop = writer
                    .fatal_error()
                    .or_else(|| progress.fatal.lock().ok().and_then(|f| f.clone()))
                    .or_else(|| fence.lost());
                if let Some(reason) = stop {
                    // Timely would step a dataflow whose writes never finish for ever after
                    // this closure returns: drop it (nothing more of it is written).
                    for dataflow in worker.installed_dataflows() {
                        worker.drop_dataflow(dataflow);
                    }
                    return Err(reason);
                }
                let committed_below = probe.with_frontier(|f| f.first().copied());
                if worker.index() == 0
                    && committed_below != last_committed_below
                    && let Ok(mut needed) = progress.needed.lock()
                    && let Some(needed) = needed.as_mut()
                {
                    needed.committed_below(committed_below);
                    last_committed_below = committed_below;
                    // Now and then, where every partition resumes as of the newest committed
                    // epoch: a start reads only what came after it (bounded start-up).
                    if last_snapshot.elapsed() >= snapshot_every
                        && let Some(epoch) = needed.last_committed()
                    {
                        last_snapshot = Instant::now();
                        snapshots_written += 1;
                        let insert = snapshot_block(&snapshot_job, &snapshot_topic, epoch, needed.committed());
                        // Every SNAPSHOTS_PER_TRIM snapshots, the snapshots, plans and commits
                        // before the previous snapshot are deleted: a start reads only the
                        // newest snapshot and what follows it (the previous one is as correct).
                        let trim_below = (snapshots_written % SNAPSHOTS_PER_TRIM == 0).then_some(previous_snapshot).flatten();
                        previous_snapshot = Some(epoch);
                        let (clickhouse, job, topic) = (clickhouse.clone(), snapshot_job.clone(), snapshot_topic.clone());
                        let fence = fence.clone();
                        handle.spawn(async move {
                            if fence.wait().await.is_err() {
                                // Lost the lease: the loop stops the run; nothing more is written.
                            } else if let Err(e) = clickhouse.insert_native(&insert.table, insert.body).await {
                                warn!(error = %e, "checkpoint snapshot not written (the next one will be)");
                            } else if let Some(below) = trim_below
                                && fence.wait().await.is_ok()
                            {
                                if let Err(e) = checkpoints::trim_checkpoint(&clickhouse, &job, &topic, below).await {
                                    warn!(error = %e, "old checkpoint rows not deleted (the next trim will)");
                                }
                                if changelog
                                    && let Err(e) = checkpoints::drop_old_changelog(&clickhouse, below).await
                                {
                                    warn!(error = %e, "old changelog partitions not dropped (the next trim will)");
                                }
                                if stats_changelog
                                    && let Err(e) = checkpoints::drop_old_stats_changes(&clickhouse, below).await
                                {
                                    warn!(error = %e, "old stats_changes partitions not dropped (the next trim will)");
                                }
                            }
                        });
                    }
                }
                if worker.index() == 0 && last_log.elapsed() >= Duration::from_secs(5) {
                    let messages = progress.messages.load(Ordering::Relaxed);
                    let rate = (messages - last_messages) as f64 / last_log.elapsed().as_secs_f64();
                    last_messages = messages;
                    last_log = Instant::now();
                    let stats = writer.stats();
                    info!(
                        committed_below = ?probe.with_frontier(|f| f.first().copied()),
                        messages,
                        events_per_sec = rate as u64,
                        dead_letters = progress.dead_letters.load(Ordering::Relaxed),
                        rows_written = stats.rows_written.load(Ordering::Relaxed),
                        insert_retries = stats.retries.load(Ordering::Relaxed),
                        queue = writer.queued(),
                        lag = progress.lag(),
                        "progress"
                    );
                }
            }
            if worker.index() == 0 {
                let messages = progress.messages.load(Ordering::Relaxed);
                info!(
                    messages,
                    seconds = started.elapsed().as_secs_f64(),
                    rows_written = writer.stats().rows_written.load(Ordering::Relaxed),
                    "all epochs committed"
                );
            }
            Ok(())
        })
        .map_err(|e| anyhow::anyhow!("starting timely: {e}"))?
    };
    let mut failure = None;
    for result in guards.join() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(e),
        }
    }
    dlq.flush(Duration::from_secs(10)).ok();
    // A standby can take over at once.
    let lost = fence.lost();
    runtime.block_on(lease.release(Duration::from_secs(5)));
    let committed = lost
        .is_none()
        .then(|| progress.needed.lock().ok().and_then(|n| n.as_ref().map(|n| n.committed().clone())))
        .flatten();
    if let Some(committed) = committed {
        // On a thread with a deadline: a commit to an unreachable Kafka may never return, and
        // it is for monitoring only.
        let (sent, done) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let result = group_client(&group_kafka, &group_job)
                .and_then(|group| commit_group_offsets(&group, &group_topic, &committed, CommitMode::Sync));
            let _ = sent.send(result);
        });
        match done.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                warn!(error = %e, "could not commit the last offsets to the consumer group (monitoring only)")
            }
            Err(_) => {
                warn!("the last commit of offsets to the consumer group did not finish within 10 s (monitoring only)")
            }
        }
    }
    if let Some(e) = failure {
        bail!("{e}");
    }
    Ok(())
}
