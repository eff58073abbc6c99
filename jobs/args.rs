//! The flags of the jobs, their checks, and the settings they turn into (ClickHouse, Kafka,
//! timely).

use anyhow::bail;
use clap::Parser;
use videocount_clickhouse::config::ClickHouseArgs;
use videocount_kafka::KafkaClients;
use videocount_lease::LeaseArgs;

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
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub lease: LeaseArgs,
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
    /// An event whose `event_id` a valid event before it in its chunk of this many offsets, or
    /// in the chunk before, had is a duplicate (a client's retry): a dead letter `duplicate
    /// event_id`, not counted. A copy less than this many offsets after an earlier one is always
    /// caught. A start first reads up to twice this many offsets per partition to rebuild the
    /// window. It should cover the clients' retry span (the client library's: 5 min 25 s) at the
    /// topic's rate per partition (videocount_job_dedup_window_seconds); 0: ids are not looked at.
    #[arg(long, env = "VIDEOCOUNT_DEDUP_WINDOW", default_value_t = 1_000_000)]
    pub dedup_window: u64,
    /// Process up to the high watermarks seen at start, flush, record offsets and exit 0.
    #[arg(long, env = "VIDEOCOUNT_UNTIL_CAUGHT_UP")]
    pub until_caught_up: bool,
    /// Do not write the raw event log (events_raw).
    #[arg(long, env = "VIDEOCOUNT_NO_EVENTS_RAW")]
    pub no_events_raw: bool,
    /// view_counts: do not keep the top videos of the last hour and day (top_videos).
    #[arg(long, env = "VIDEOCOUNT_NO_TRENDING")]
    pub no_trending: bool,
    /// view_counts: how many videos each top list keeps (1-1000).
    #[arg(long, env = "VIDEOCOUNT_TOP_K", default_value_t = 100)]
    pub top_k: usize,
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
    /// Raw librdkafka option KEY=VALUE (repeatable), given to every Kafka client of the job
    /// (consumers, admin, lag monitor, dead-letter producer).
    #[arg(long = "kafka-option", value_parser = videocount_kafka::parse_option)]
    pub kafka_options: Vec<(String, String)>,
    /// Seconds between checkpoint snapshots (where every partition resumes as of a committed
    /// epoch): a start reads only the plans after the newest one.
    #[arg(long, env = "VIDEOCOUNT_CHECKPOINT_SNAPSHOT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub checkpoint_snapshot_secs: u64,
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
    /// Unmerged states one compaction round merges per table at most (its memory and the length
    /// of its queries); a backlog takes several rounds, one after the other.
    #[arg(long, env = "VIDEOCOUNT_COMPACT_MAX_STATES", default_value_t = 200_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub compact_max_states: u64,
    /// A bucket is closed for compaction once its end is this many seconds in the past.
    #[arg(long, env = "VIDEOCOUNT_COMPACT_GRACE_SECS", default_value_t = 120)]
    pub compact_grace_secs: u64,
    /// Testing aid: the slow stream sleeps this long before finishing each epoch.
    #[arg(long, env = "VIDEOCOUNT_SLOW_STREAM_DELAY_MS", default_value_t = 0, hide = true)]
    pub slow_stream_delay_ms: u64,
}

impl JobArgs {
    /// The brokers and the user's options, for every Kafka client of the job.
    pub fn kafka(&self) -> KafkaClients {
        KafkaClients::new(self.brokers.clone(), self.kafka_options.clone())
    }

    pub(crate) fn timely_config(&self) -> anyhow::Result<timely::Config> {
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

    pub(crate) fn validate(&self) -> anyhow::Result<()> {
        self.clickhouse.config().validate()?;
        if self.workers == 0 {
            bail!("--workers must be at least 1");
        }
        if !(1..=1000).contains(&self.top_k) {
            bail!("--top-k must be from 1 to 1000");
        }
        if self.epoch_ms == 0 {
            bail!("--epoch-ms must be at least 1");
        }
        if !self.lease.lease_root.starts_with('/') {
            bail!("--lease-root must be an absolute ZooKeeper path (start with /)");
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
