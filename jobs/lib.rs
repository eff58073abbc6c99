//! What the jobs share: flags, start-up checks, the source, plan, dead letters and commit of
//! every epoch ([`run_job`]), and the two dataflows between them: [`ViewCounts`] and
//! [`EventStats`].
//!
//! `view_counts`:
//!
//! ```text
//!  KafkaSource ─┬─ events ──exchange(video_id)──▶ WriteCounts ──────┐
//!   (worker i)  │         └────────────────────▶ WriteRaw ─────────┤
//!               ├─ dead letters ───────────────▶ WriteDeadLetters ─┼─exchange(0)─▶ Commit ─▶ probe
//!               └─ ranges ──exchange(0)──▶ WritePlan ──(gate)──────┘
//! ```
//!
//! `event_stats` replaces WriteCounts and WriteRaw with a fast and a slow stream
//! (`videocount_operators::aggregate_events`), both written before the commit.
//!
//! An epoch's rows are written only after its plan (the offset ranges) is, and its commit
//! only after all of its rows are: the timely frontier carries that order.

pub mod metrics;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::{Concatenate, OkErr, Probe};
use timely::dataflow::{Scope, Stream};
use tracing::{info, warn};
use videocount_clickhouse::checkpoints::{self, Range, commit_block, plan_block};
use videocount_clickhouse::rows::{DeadLetterRow, RawRow, dead_letters_block, raw_block};
use videocount_clickhouse::{ClickHouse, ClickHouseConfig, Writer};
use videocount_events::{Event, Rejection, TimeLimits, parse_event, parse_stats_event, route};
use videocount_operators::aggregate::{FunctionsConfig, Registry, Speed};
use videocount_operators::aggregate_events::{LocatedInput, Partial, PreAggregate, SlowStream, StatsEpoch, StatsInput};
use videocount_operators::kafka_source::{PartitionPosition, SourceProgress};
use videocount_operators::kafka_source::{Throttle, parse_kafka_option};
use videocount_operators::{EventCounts, FlushEpochs, SourceConfig, SourceItem, kafka_source};
use videocount_query::compact::compact;

/// An event with the partition and offset it was read from.
type Located = (Event, u32, u64);
/// What the source emits besides events: a dead letter or an epoch's offset range.
type Control = Result<DeadLetter, Range>;
type DeadLetter = Box<DeadLetterRow>;
/// A job's event with the partition and offset it was read from.
type Sourced<D> = (<D as Dataflow>::Event, u32, u64);

/// Flags of a counting job; each can also be set from the environment.
#[derive(Parser, Debug, Clone)]
#[command(version, about = "Counts video events from Kafka into ClickHouse, exactly once.")]
pub struct JobArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic of the events.
    #[arg(long, env = "VIDEOCOUNT_TOPIC", default_value = "video-events")]
    pub topic: String,
    /// Kafka topic that also receives dead letters (default: `<topic>-dlq`); created if missing.
    #[arg(long, env = "VIDEOCOUNT_DLQ_TOPIC")]
    pub dlq_topic: Option<String>,
    /// ClickHouse HTTP endpoint.
    #[arg(long, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub clickhouse_url: String,
    /// ClickHouse database holding the tables of sql/schema.sql.
    #[arg(long, env = "CLICKHOUSE_DATABASE", default_value = "video_counts")]
    pub database: String,
    /// ClickHouse user.
    #[arg(long, env = "CLICKHOUSE_USER")]
    pub clickhouse_user: Option<String>,
    /// ClickHouse password.
    #[arg(long, env = "CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub clickhouse_password: Option<String>,
    /// Worker threads in this process.
    #[arg(long, short = 'w', env = "VIDEOCOUNT_WORKERS", default_value_t = 1)]
    pub workers: usize,
    /// Timely processes in the cluster (with --hostfile).
    #[arg(long, short = 'n', env = "VIDEOCOUNT_PROCESSES", default_value_t = 1)]
    pub processes: usize,
    /// Index of this process in the cluster.
    #[arg(long, short = 'p', env = "VIDEOCOUNT_PROCESS", default_value_t = 0)]
    pub process: usize,
    /// File with one host:port per process (timely's cluster option).
    #[arg(long, env = "VIDEOCOUNT_HOSTFILE")]
    pub hostfile: Option<String>,
    /// Length of an epoch: how often counts are flushed, in milliseconds.
    #[arg(long, env = "VIDEOCOUNT_EPOCH_MS", default_value_t = 1000)]
    pub epoch_ms: u64,
    /// Events older than this, relative to their message's Kafka timestamp, are dead letters.
    #[arg(long, env = "VIDEOCOUNT_MAX_AGE_SECS", default_value_t = 7 * 24 * 3600)]
    pub max_age_secs: u64,
    /// Events further ahead than this of their message's Kafka timestamp are dead letters.
    #[arg(long, env = "VIDEOCOUNT_MAX_AHEAD_SECS", default_value_t = 600)]
    pub max_ahead_secs: u64,
    /// Process up to the high watermarks seen at start, flush, record offsets and exit 0.
    #[arg(long, env = "VIDEOCOUNT_UNTIL_CAUGHT_UP")]
    pub until_caught_up: bool,
    /// Do not write the raw event log (events_raw).
    #[arg(long, env = "VIDEOCOUNT_NO_EVENTS_RAW")]
    pub no_events_raw: bool,
    /// ClickHouse writer tasks.
    #[arg(long, env = "VIDEOCOUNT_WRITER_TASKS", default_value_t = 4)]
    pub writer_tasks: usize,
    /// Capacity of the internal write queue, in batches (one batch: one epoch of one operator).
    #[arg(long, env = "VIDEOCOUNT_QUEUE_CAPACITY", default_value_t = 32)]
    pub queue_capacity: usize,
    /// The source pauses while this many epochs are not yet written (event_stats: by its fast
    /// stream; view_counts: written and committed).
    #[arg(long, env = "VIDEOCOUNT_MAX_EPOCHS_IN_FLIGHT", default_value_t = 8)]
    pub max_epochs_in_flight: u64,
    /// Raw librdkafka consumer option KEY=VALUE (repeatable).
    #[arg(long = "kafka-option", value_parser = parse_kafka_option)]
    pub kafka_options: Vec<(String, String)>,
    /// Name under which the job keeps its checkpoint (default: the job's own name).
    #[arg(long, env = "VIDEOCOUNT_JOB_NAME")]
    pub job_name: Option<String>,
    /// Serve Prometheus metrics at http://ADDRESS/metrics (e.g. 127.0.0.1:9101); off without it.
    #[arg(long, env = "VIDEOCOUNT_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Flags of `event_stats`: the common ones and its own.
#[derive(Parser, Debug, Clone)]
#[command(version, about = "Maintains aggregate functions of video events from Kafka in ClickHouse, exactly once.")]
pub struct EventStatsArgs {
    #[command(flatten)]
    pub job: JobArgs,
    /// The functions applied per event type (TOML). Default: config/functions.toml as built
    /// into the binary.
    #[arg(long, env = "VIDEOCOUNT_FUNCTIONS")]
    pub functions: Option<std::path::PathBuf>,
    /// The source pauses while this many epochs are not yet committed (the slow stream may lag
    /// the fast one by this much; its backlog beyond --slow-stream-memory-mb goes to disk).
    #[arg(long, env = "VIDEOCOUNT_MAX_SLOW_EPOCHS_BEHIND", default_value_t = 120)]
    pub max_slow_epochs_behind: u64,
    /// Memory for the slow stream's backlog per worker, in MiB; beyond it, batches wait in an
    /// embedded database (redb) in --spill-dir.
    #[arg(long, env = "VIDEOCOUNT_SLOW_STREAM_MEMORY_MB", default_value_t = 256)]
    pub slow_stream_memory_mb: usize,
    /// Directory of the slow stream's spill files (one per worker, removed at start and exit).
    #[arg(long, env = "VIDEOCOUNT_SPILL_DIR")]
    pub spill_dir: Option<std::path::PathBuf>,
    /// Compact the states of closed buckets this often, in seconds (0: never; see
    /// `videocount compact`).
    #[arg(long, env = "VIDEOCOUNT_COMPACT_EVERY_SECS", default_value_t = 300)]
    pub compact_every_secs: u64,
    /// A bucket is closed for compaction once its end is this many seconds in the past.
    #[arg(long, env = "VIDEOCOUNT_COMPACT_GRACE_SECS", default_value_t = 120)]
    pub compact_grace_secs: u64,
    /// Testing aid: the slow stream sleeps this long before finishing each epoch.
    #[arg(long, env = "VIDEOCOUNT_SLOW_STREAM_DELAY_MS", default_value_t = 0, hide = true)]
    pub slow_stream_delay_ms: u64,
}

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

impl JobArgs {
    fn clickhouse_config(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.clickhouse_url.clone(),
            database: self.database.clone(),
            user: self.clickhouse_user.clone(),
            password: self.clickhouse_password.clone(),
            ..ClickHouseConfig::default()
        }
    }

    fn timely_config(&self) -> anyhow::Result<timely::Config> {
        let mut args = vec![
            "videocount".to_owned(),
            "-w".into(),
            self.workers.to_string(),
            "-n".into(),
            self.processes.to_string(),
            "-p".into(),
            self.process.to_string(),
        ];
        if let Some(hostfile) = &self.hostfile {
            args.extend(["-h".into(), hostfile.clone()]);
        }
        timely::Config::from_args(args.into_iter()).map_err(|e| anyhow::anyhow!("timely cluster options: {e}"))
    }

    fn validate(&self) -> anyhow::Result<()> {
        self.clickhouse_config().validate()?;
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if self.epoch_ms == 0 {
            bail!("--epoch-ms must be at least 1");
        }
        if self.processes > 1 && self.hostfile.is_none() {
            bail!("--processes > 1 needs --hostfile");
        }
        if let Some(name) = &self.job_name
            && !videocount_clickhouse::config::valid_identifier(name)
        {
            bail!("--job-name must be 1-64 characters of [A-Za-z0-9_]");
        }
        Ok(())
    }
}

/// The number of partitions of `topic`, or a clear error if it does not exist.
fn topic_partitions(brokers: &str, topic: &str) -> anyhow::Result<u32> {
    let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("cannot reach Kafka at {brokers}"))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic:?} not found on {brokers}");
    };
    if found.error().is_some() || found.partitions().is_empty() {
        bail!("topic {topic:?} does not exist on {brokers} (create it: make topic TOPIC={topic} PARTITIONS=n)");
    }
    Ok(found.partitions().len() as u32)
}

async fn ensure_topic(brokers: &str, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1));
    let results = admin.create_topics([&new], &AdminOptions::new()).await?;
    for result in results {
        match result {
            Ok(_) => info!(topic, "created dead-letter topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => warn!(topic = name, %code, "could not create dead-letter topic"),
        }
    }
    Ok(())
}

/// Refuses to start when the schema is missing: a clear message instead of failed inserts.
async fn check_schema(clickhouse: &ClickHouse) -> anyhow::Result<()> {
    let missing = videocount_clickhouse::schema::missing_tables(clickhouse).await?;
    if !missing.is_empty() {
        bail!(
            "database {} lacks tables {missing:?}: apply the schema first (make schema CLICKHOUSE_DATABASE={})",
            clickhouse.database(),
            clickhouse.database()
        );
    }
    Ok(())
}

fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as u32).unwrap_or(0)
}

fn dead_letter_json(row: &DeadLetterRow) -> String {
    serde_json::json!({
        "job": row.job, "topic": row.topic, "partition": row.partition, "offset": row.offset,
        "reason": row.reason, "detail": row.detail, "payload": row.payload, "message_ts": row.message_ts,
    })
    .to_string()
}

/// Keeps each partition's lag (messages not yet read, and how old the last read message is
/// while more are waiting) up to date every `every`, off the worker threads: a watermark
/// request is a network round trip.
fn spawn_lag_monitor(
    brokers: &str,
    topic: &str,
    progress: Arc<SourceProgress>,
    shutdown: Arc<AtomicBool>,
    every: Duration,
) {
    let Ok(consumer) = ClientConfig::new().set("bootstrap.servers", brokers).create::<BaseConsumer>() else {
        warn!("no lag monitor: cannot create a Kafka client");
        return;
    };
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        while !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            let positions = progress.positions.lock().map(|p| p.clone()).unwrap_or_default();
            let mut lags = Vec::with_capacity(positions.len());
            for (partition, position) in positions {
                if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition as i32, Duration::from_secs(2)) {
                    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
                    let (messages, seconds) = partition_lag(&position, high, now_ms);
                    lags.push((partition, messages, seconds));
                }
            }
            if let Ok(mut positions) = progress.positions.lock() {
                for (partition, messages, seconds) in lags {
                    if let Some(position) = positions.get_mut(&partition) {
                        position.lag_messages = messages;
                        position.lag_seconds = seconds;
                    }
                }
            }
        }
    });
}

/// A partition's lag: the messages from `position.next` up to the high watermark `high`, and,
/// while any are waiting, the age at `now_ms` of the last message read (0 when caught up or
/// before the first message: the age of the next one is not known without reading it).
pub fn partition_lag(position: &PartitionPosition, high: i64, now_ms: i64) -> (u64, f64) {
    let messages = (high.max(0) as u64).saturating_sub(position.next);
    let seconds = if messages == 0 || position.last_message_ms <= 0 {
        0.0
    } else {
        (now_ms - position.last_message_ms).max(0) as f64 / 1000.0
    };
    (messages, seconds)
}

/// The part of a job between its source and its commit.
pub trait Dataflow: Send + Sync + 'static {
    /// What the source makes of a valid message.
    type Event: timely::ExchangeData + Clone;
    /// The default `--job-name`.
    const NAME: &'static str;
    /// Parses one message; must depend on its arguments only (a re-run parses alike).
    fn parse(
        &self,
        payload: Option<&[u8]>,
        message_ts_ms: Option<i64>,
        limits: TimeLimits,
    ) -> Result<Self::Event, Rejection>;
    /// The writes of an epoch's events, each gated on `planned`; the epoch commits once the
    /// frontier of every returned stream has passed it.
    fn build<'scope>(
        &self,
        scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<(Self::Event, u32, u64)>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope>;
    /// A fingerprint of the settings the written blocks depend on, beyond the flags the
    /// checkpoint already checks: a re-run of interrupted epochs needs the same one.
    fn fingerprint(&self) -> u64 {
        0
    }
    /// How many epochs the commit may lag behind the source (default: --max-epochs-in-flight).
    fn max_commit_lag(&self) -> Option<u64> {
        None
    }
}

/// A dataflow's writes: the source waits for `fast` within --max-epochs-in-flight, and for the
/// commit (which also waits for `slow`) within [`Dataflow::max_commit_lag`].
pub struct Writes<'scope> {
    pub fast: Vec<Stream<'scope, u64, Vec<()>>>,
    pub slow: Vec<Stream<'scope, u64, Vec<()>>>,
}

/// `view_counts`: counts per (video, type, minute/hour/day), and the raw event log.
#[derive(Debug)]
pub struct ViewCounts {
    pub events_raw: bool,
}

impl Dataflow for ViewCounts {
    type Event = Event;
    const NAME: &'static str = "view_counts";

    fn parse(&self, payload: Option<&[u8]>, ts: Option<i64>, limits: TimeLimits) -> Result<Event, Rejection> {
        parse_event(payload, ts, limits)
    }

    fn build<'scope>(
        &self,
        _scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<Located>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope> {
        let counted = events.clone().flush_epochs::<EventCounts, _, _>(
            planned.clone(),
            Exchange::new(|(event, _, _): &Located| route(&event.video_id)),
            "WriteCounts",
            writer.clone(),
            |epoch, counts| counts.into_inserts(epoch),
        );
        let mut written = vec![counted];
        if self.events_raw {
            written.push(events.flush_epochs::<Vec<Located>, _, _>(
                planned,
                Pipeline,
                "WriteRaw",
                writer.clone(),
                |_epoch, rows| {
                    if rows.is_empty() {
                        return Vec::new();
                    }
                    let mut rows: Vec<RawRow> = rows
                        .into_iter()
                        .map(|(e, partition, offset)| RawRow {
                            video_id: e.video_id.into_string(),
                            event_type: e.event_type.into_string(),
                            ts_ms: e.ts_ms,
                            partition,
                            offset,
                        })
                        .collect();
                    vec![raw_block(&mut rows)]
                },
            ));
        }
        Writes { fast: written, slow: Vec::new() }
    }
}

/// `event_stats`: states of aggregate functions per (video, type, aggregate, minute/hour/day),
/// on a fast stream (exact functions) and a slow one (sketches).
#[derive(Debug)]
pub struct EventStats {
    pub functions: FunctionsConfig,
    pub slow: SlowStream,
    pub max_slow_epochs_behind: u64,
}

impl Dataflow for EventStats {
    type Event = StatsInput;
    const NAME: &'static str = "event_stats";

    fn parse(&self, payload: Option<&[u8]>, ts: Option<i64>, limits: TimeLimits) -> Result<StatsInput, Rejection> {
        let event = parse_stats_event(payload, ts, limits)?;
        let aggregates = self.functions.resolve(&event)?;
        Ok(StatsInput { event, aggregates })
    }

    fn build<'scope>(
        &self,
        _scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<LocatedInput>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope> {
        let registry = self.functions.registry().clone();
        let fast = events.clone().pre_aggregate_fast(registry.clone(), registry.mask(Speed::Fast));
        let slow = events.pre_aggregate_slow(registry.clone(), registry.mask(Speed::Slow), self.slow.clone());
        let mut written = [(fast, "WriteFastStats"), (slow, "WriteSlowStats")]
            .into_iter()
            .map(|(partials, name)| {
                let registry = registry.clone();
                let label = name.to_owned();
                partials.flush_epochs::<StatsEpoch, _, _>(
                    planned.clone(),
                    Exchange::new(|partial: &Partial| route(&partial.key.0)),
                    name,
                    writer.clone(),
                    move |epoch, states| match states.into_inserts(&registry, epoch) {
                        Ok(inserts) => inserts,
                        // A state this binary encoded and cannot decode is a bug; losing the
                        // epoch silently would be worse than stopping here.
                        Err(e) => panic!("{label}: epoch {epoch}: {e}"),
                    },
                )
            })
            .collect::<Vec<_>>();
        let slow = written.pop().into_iter().collect();
        Writes { fast: written, slow }
    }

    fn max_commit_lag(&self) -> Option<u64> {
        Some(self.max_slow_epochs_behind)
    }

    fn fingerprint(&self) -> u64 {
        self.functions.fingerprint()
    }
}

/// Runs `view_counts` until it is caught up (with `--until-caught-up`) or stopped by a signal.
pub fn run_view_counts(args: JobArgs) -> anyhow::Result<()> {
    let dataflow = ViewCounts { events_raw: !args.no_events_raw };
    run_job(args, dataflow)
}

/// Runs `event_stats` until it is caught up (with `--until-caught-up`) or stopped by a signal.
pub fn run_event_stats(args: EventStatsArgs) -> anyhow::Result<()> {
    let functions = FunctionsConfig::load_or_default(args.functions.as_deref())?;
    let source = args.functions.as_ref().map_or("built-in config/functions.toml".into(), |p| p.display().to_string());
    info!(functions = %source, aggregates = ?functions.registry(), "functions loaded");
    let peers = (args.job.workers * args.job.processes) as u64;
    // Each epoch writes up to two blocks per worker into each stats table (fast and slow); all
    // epochs not yet committed must stay inside ClickHouse's dedup window (5000 blocks).
    if args.max_slow_epochs_behind * 2 * peers > 4000 {
        bail!(
            "--max-slow-epochs-behind {} with {peers} workers could re-run more blocks than ClickHouse \
             remembers for deduplication; use at most {}",
            args.max_slow_epochs_behind,
            4000 / (2 * peers)
        );
    }
    let spill_dir = args.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&spill_dir)
        .and_then(|()| tempfile_probe(&spill_dir))
        .with_context(|| format!("--spill-dir {} is not a writable directory", spill_dir.display()))?;
    let slow = SlowStream {
        delay_per_epoch: Duration::from_millis(args.slow_stream_delay_ms),
        memory_budget: args.slow_stream_memory_mb << 20,
        spill_dir,
        name: format!(
            "{}-{}",
            args.job.job_name.as_deref().unwrap_or(EventStats::NAME),
            args.job.topic.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let compactor = (args.compact_every_secs > 0).then(|| {
        spawn_compactor(
            &args.job,
            functions.registry().clone(),
            Duration::from_secs(args.compact_every_secs),
            args.compact_grace_secs,
            Arc::clone(&stop),
        )
    });
    let dataflow = EventStats { functions, slow, max_slow_epochs_behind: args.max_slow_epochs_behind };
    let result = run_job(args.job, dataflow);
    stop.store(true, Ordering::Relaxed);
    if let Some(Ok(thread)) = compactor {
        let _ = thread.join();
    }
    result
}

/// Checks that `dir` takes a file (the slow stream's spill files go there).
fn tempfile_probe(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".videocount-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}

/// Compacts `event_stats`' closed buckets every `every`, on a thread of its own (see
/// `videocount_query::compact`). Failures are logged and retried at the next round.
fn spawn_compactor(
    args: &JobArgs,
    registry: Registry,
    every: Duration,
    grace_secs: u64,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let clickhouse = ClickHouse::new(args.clickhouse_config());
    let job = args.job_name.clone().unwrap_or_else(|| EventStats::NAME.to_owned());
    let topic = args.topic.clone();
    std::thread::Builder::new().name("compactor".into()).spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            warn!("no compaction: cannot start a runtime");
            return;
        };
        let mut next = Instant::now() + every;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + every;
            let started = Instant::now();
            let now = u64::from(now_secs());
            match runtime.block_on(compact(&clickhouse, &registry, &job, &topic, now, grace_secs)) {
                Ok(report) => {
                    for table in report {
                        info!(
                            table = table.table,
                            buckets = table.buckets,
                            states = table.states,
                            through_epoch = table.through_epoch,
                            seconds = started.elapsed().as_secs_f64(),
                            "compacted"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "compaction failed; retrying next round"),
            }
        }
    })
}

/// Runs a job: checks, checkpoint, source, plan, dead letters, `dataflow`'s writes, commit.
pub fn run_job<D: Dataflow>(mut args: JobArgs, dataflow: D) -> anyhow::Result<()> {
    args.validate()?;
    let job_name = args.job_name.get_or_insert_with(|| D::NAME.to_owned()).clone();
    let timely_config = args.timely_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let clickhouse = ClickHouse::new(args.clickhouse_config());

    let partitions = topic_partitions(&args.brokers, &args.topic)?;
    let dlq_topic = args.dlq_topic.clone().unwrap_or_else(|| format!("{}-dlq", args.topic));
    let fingerprint = dataflow.fingerprint();
    let state = runtime.block_on(async {
        clickhouse
            .with_database("default")
            .ping()
            .await
            .with_context(|| format!("cannot reach ClickHouse at {}", args.clickhouse_url))?;
        check_schema(&clickhouse).await?;
        ensure_topic(&args.brokers, &dlq_topic, 1).await?;
        let state = checkpoints::load(&clickhouse, &job_name, &args.topic).await.with_context(|| {
            format!("cannot read the checkpoint (is the schema applied to {}? make schema)", args.database)
        })?;
        if let Some((&first_pending, _)) = state.pending.first_key_value() {
            let recorded = checkpoints::run_fingerprint(&clickhouse, &job_name, &args.topic, first_pending).await?;
            if recorded.is_some_and(|recorded| recorded != fingerprint) {
                bail!(
                    "epochs {:?} were interrupted under other settings (for event_stats: another functions \
                     config); restart with the settings they ran with to finish them, then change them",
                    state.pending.keys().collect::<Vec<_>>()
                );
            }
        }
        let run = checkpoints::run_block(&job_name, &args.topic, state.next_epoch, fingerprint, now_secs());
        clickhouse.insert_native(&run.table, run.body).await.context("recording the run")?;
        anyhow::Ok(state)
    })?;
    let peers = (args.workers * args.processes) as u32;
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
        topic = %args.topic, partitions, database = %args.database, workers = peers,
        last_committed = ?state.last_committed, pending_epochs = state.pending.len(),
        "{job_name} starting"
    );

    let shutdown = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&shutdown))?;
    signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&shutdown))?;

    let writer = Writer::start(runtime.handle(), clickhouse.clone(), args.writer_tasks, args.queue_capacity);
    let dlq: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "20")
        .create()
        .context("creating the dead-letter producer")?;
    let dlq = Arc::new(dlq);
    let progress = Arc::new(SourceProgress::default());
    spawn_lag_monitor(&args.brokers, &args.topic, Arc::clone(&progress), Arc::clone(&shutdown), Duration::from_secs(2));
    if let Some(listen) = args.metrics_listen {
        metrics::serve(&runtime, listen, &job_name, Arc::clone(&progress), writer.clone(), args.queue_capacity)?;
    }
    let state = Arc::new(state);
    let args = Arc::new(args);
    let max_commit_lag = dataflow.max_commit_lag().unwrap_or(args.max_epochs_in_flight);
    let dataflow = Arc::new(dataflow);

    let guards = {
        let (writer, dlq, progress, shutdown) =
            (writer.clone(), Arc::clone(&dlq), Arc::clone(&progress), Arc::clone(&shutdown));
        timely::execute(timely_config, move |worker| -> Result<(), String> {
            let probe = ProbeHandle::new();
            let written_probe = ProbeHandle::new();
            let job = job_name.clone();
            let topic = args.topic.clone();
            let source_config = SourceConfig {
                job: job.clone(),
                topic: topic.clone(),
                brokers: args.brokers.clone(),
                kafka_options: args.kafka_options.clone(),
                partitions,
                epoch_interval: Duration::from_millis(args.epoch_ms),
                limits: TimeLimits { max_age_ms: args.max_age_secs * 1000, max_ahead_ms: args.max_ahead_secs * 1000 },
                until_caught_up: args.until_caught_up,
                max_epochs_in_flight: args.max_epochs_in_flight,
                max_commit_lag: max_commit_lag.max(args.max_epochs_in_flight),
                state: Arc::clone(&state),
                shutdown: Arc::clone(&shutdown),
                progress: Arc::clone(&progress),
            };
            let (writer, dlq, dlq_topic) = (writer.clone(), Arc::clone(&dlq), dlq_topic.clone());
            let dataflow = Arc::clone(&dataflow);
            worker.dataflow::<u64, _, _>(|scope| -> Result<(), String> {
                let parser = Arc::clone(&dataflow);
                let parse = move |payload: Option<&[u8]>, ts: Option<i64>, limits: TimeLimits| {
                    parser.parse(payload, ts, limits)
                };
                let throttle = Throttle { written: written_probe.clone(), committed: probe.clone() };
                let items = kafka_source(scope, source_config, throttle, parse).map_err(|e| e.to_string())?;
                let (events, other) =
                    items.ok_err::<Vec<Sourced<D>>, Sourced<D>, Vec<Control>, Control, _>(|item| match item {
                        SourceItem::Event(event, partition, offset) => Ok((event, partition, offset)),
                        SourceItem::DeadLetter(row) => Err(Ok(row)),
                        SourceItem::Range(range) => Err(Err(range)),
                    });
                let (dead, ranges): (Stream<'_, u64, Vec<DeadLetter>>, Stream<'_, u64, Vec<Range>>) =
                    other.ok_err(|item| item);

                let (plan_job, plan_topic) = (job.clone(), topic.clone());
                let planned = ranges.flush_epochs::<Vec<Range>, _, _>(
                    empty(scope),
                    Exchange::new(|_: &Range| 0),
                    "WritePlan",
                    writer.clone(),
                    move |epoch, mut ranges| {
                        if ranges.is_empty() {
                            return Vec::new();
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
            let mut last_log = Instant::now();
            let mut last_messages = 0;
            while !probe.done() {
                worker.step_or_park(Some(Duration::from_millis(50)));
                if let Some(error) = writer.fatal_error() {
                    return Err(error);
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
    if let Some(e) = failure {
        bail!("{e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_counts_waiting_messages_and_the_age_of_the_last_read() {
        let at = |next, last_message_ms| PartitionPosition { next, last_message_ms, ..PartitionPosition::default() };
        // 40 messages waiting; the last one read was written 7.5 s before now.
        assert_eq!(partition_lag(&at(60, 92_500), 100, 100_000), (40, 7.5));
        // Caught up: no lag in time either, however old the last message is.
        assert_eq!(partition_lag(&at(100, 1_000), 100, 100_000), (0, 0.0));
        // Nothing read yet: the messages are known, their age is not.
        assert_eq!(partition_lag(&at(0, 0), 5, 100_000), (5, 0.0));
        // A clock behind the broker's timestamps gives 0, not a negative lag.
        assert_eq!(partition_lag(&at(1, 200_000), 2, 100_000), (1, 0.0));
    }
}
