//! `query`: the read API of videocount over HTTP, and the browser UI.
//!
//! - `GET /v1/videos/{video_id}/views?from=&to=` (`getViewsCount`),
//!   `GET /v1/videos/{video_id}/events/{event_type}/count?from=&to=` (`getCount`): exact to the
//!   millisecond (whole minutes from the rollups, the partial minutes from `events_raw`).
//! - `GET /v1/videos/{video_id}/events/{event_type}/stats/{function}?from=&to=` (`getStats`):
//!   in whole minutes.
//! - `GET /v1/videos/{video_id}/events/{event_type}/series?from=&to=&step=` and
//!   `GET /v1/top?event_type=&from=&to=&limit=`, for charts; `GET /v1/live` for the live panel.
//! - `GET /openapi.json`, `/healthz`, `/readyz`, `/metrics`; the UI at `/`.
//!
//! Whole minutes of the keys asked for come from memory ([`memory`]), the rest from ClickHouse.

pub mod api;
pub mod canary;
pub mod live;
pub mod memory;
pub mod metrics;
pub mod prometheus;
pub mod replicas;
pub mod stats_memory;
pub mod trending;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::{info, warn};
use videocount_aggregates::{FunctionsConfig, Registry};
use videocount_clickhouse::config::ClickHouseArgs;
use videocount_clickhouse::{ClickHouse, ClickHouseConfig};
use videocount_client::canary::Canary;
use videocount_client::{Client, ClientConfig};
pub use videocount_query::CANARY_PREFIX;
use videocount_query::{Edges, Reader};

use crate::api::AppState;
use crate::live::Golden;
use crate::memory::{Memory, MemoryConfig, ReplicaSync};
use crate::stats_memory::{StatsMemory, StatsMemoryConfig};

/// Flags of `query`; each also from the environment.
#[derive(Parser, Debug, Clone)]
#[command(version, about = "The videocount read API over HTTP, and the browser UI.")]
pub struct QueryArgs {
    /// Address to listen on.
    #[arg(long, env = "VIDEOCOUNT_QUERY_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    #[command(flatten)]
    pub clickhouse: ClickHouseArgs,
    #[command(flatten)]
    pub serve: videocount_http::ServeArgs,
    /// A ClickHouse query taking longer fails; the request gets 503 with Retry-After.
    #[arg(long, env = "VIDEOCOUNT_QUERY_CLICKHOUSE_TIMEOUT_MS", default_value_t = 2_000)]
    pub clickhouse_timeout_ms: u64,
    /// Move reads to another ClickHouse replica when the one in use is more than this many
    /// seconds behind (checked every 2 s; the delay goes out with every answer as
    /// `X-Videocount-Replica-Delay`).
    #[arg(long, env = "VIDEOCOUNT_QUERY_MAX_REPLICA_DELAY_SECS", default_value_t = 10)]
    pub max_replica_delay_secs: u64,
    /// The functions config event_stats runs with (TOML; default: the built-in
    /// config/functions.toml): a stats query for a function it does not keep for the event
    /// type is a 404 naming those it keeps.
    #[arg(long, env = "VIDEOCOUNT_FUNCTIONS")]
    pub functions: Option<std::path::PathBuf>,
    /// Count in whole minutes instead of reading the partial minutes at the range's edges from
    /// events_raw: for jobs run with --no-events-raw.
    #[arg(long, env = "VIDEOCOUNT_QUERY_NO_RAW_EDGES")]
    pub no_raw_edges: bool,
    /// Memory the in-memory counts may take (the minute counts of the keys asked for; the
    /// least recently asked for leave first).
    #[arg(long, env = "VIDEOCOUNT_QUERY_MEMORY_BUDGET_MB", default_value_t = 1_024)]
    pub memory_budget_mb: usize,
    /// Read the newest committed epoch this often and apply what it changed: an acknowledged
    /// event is readable from memory within the job's epoch plus this.
    #[arg(long, env = "VIDEOCOUNT_QUERY_MEMORY_POLL_MS", default_value_t = 100)]
    pub memory_poll_ms: u64,
    /// Serve every count from ClickHouse.
    #[arg(long, env = "VIDEOCOUNT_QUERY_NO_MEMORY")]
    pub no_memory: bool,
    /// ClickHouse queries of requests in flight at once; more wait their turn (within
    /// --clickhouse-timeout-ms). A saturated ClickHouse would also delay memory's polls, and
    /// memory stops answering when they are late: they do not take turns.
    #[arg(long, env = "VIDEOCOUNT_QUERY_CLICKHOUSE_CONCURRENCY", default_value_t = 8)]
    pub clickhouse_concurrency: usize,
    /// Do not load keys into memory before they are asked for. By default, after the start
    /// (and after a replay), keys load the most recently counted first until they take nine
    /// tenths of --memory-budget-mb; until a key is in, ClickHouse answers it.
    #[arg(long, env = "VIDEOCOUNT_QUERY_NO_WARM_UP")]
    pub no_warm_up: bool,
    /// The checkpoint name of the view_counts job writing the database (its --job-name):
    /// memory follows its commits.
    #[arg(long, env = "VIDEOCOUNT_JOB_NAME", default_value = "view_counts")]
    pub job_name: String,
    /// Memory the stats of the keys asked for may take (the merged states of their minutes,
    /// hours and days; the least recently asked for leave first).
    #[arg(long, env = "VIDEOCOUNT_QUERY_STATS_MEMORY_BUDGET_MB", default_value_t = 512)]
    pub stats_memory_budget_mb: usize,
    /// The checkpoint name of the event_stats job writing the database (its --job-name): the
    /// stats' memory follows its commits.
    #[arg(long, env = "VIDEOCOUNT_STATS_JOB_NAME", default_value = "event_stats")]
    pub stats_job_name: String,
    /// The built UI (`make ui`), served at /.
    #[arg(long, env = "VIDEOCOUNT_UI_DIR", default_value = "ui/dist")]
    pub ui_dir: PathBuf,
    /// The ingest service: its /metrics feeds the live panel, and the freshness canary writes
    /// through it.
    #[arg(long, env = "VIDEOCOUNT_INGEST_URL")]
    pub ingest_url: Option<String>,
    /// The ingest service's bearer token, for the canary's writes.
    #[arg(long, env = "VIDEOCOUNT_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// The jobs' /metrics base URLs (their --metrics-listen), comma-separated, for the live panel.
    #[arg(long, env = "VIDEOCOUNT_JOB_METRICS_URLS", value_delimiter = ',')]
    pub job_metrics_url: Vec<String>,
    /// Write one canary view through --ingest-url about this often (random pauses averaging
    /// this) and time until it is readable here (videocount_query_canary_freshness_seconds);
    /// 0 turns the canary off.
    #[arg(long, env = "VIDEOCOUNT_CANARY_INTERVAL_MS", default_value_t = 1_000)]
    pub canary_interval_ms: u64,
    /// The canary's video id (default: videocount-canary- and 128 random bits per process, so
    /// that each canary knows its expected count and nobody else can write to it; it is not
    /// published). Top lists leave out ids starting with `videocount-canary`.
    #[arg(long, env = "VIDEOCOUNT_CANARY_VIDEO")]
    pub canary_video: Option<String>,
}

/// Checks the flags and serves until SIGINT/SIGTERM.
pub async fn run(args: QueryArgs) -> anyhow::Result<()> {
    if args.clickhouse_timeout_ms == 0 || args.memory_poll_ms == 0 || args.clickhouse_concurrency == 0 {
        anyhow::bail!("--clickhouse-timeout-ms, --memory-poll-ms and --clickhouse-concurrency must be above 0");
    }
    let config = ClickHouseConfig {
        request_timeout: Duration::from_millis(args.clickhouse_timeout_ms),
        ..args.clickhouse.config()
    };
    config.validate()?;
    // Reads here touch a few granules each: one thread per query serves many clients better
    // than every query spreading over all cores.
    let clickhouse = ClickHouse::new(config).with_setting("max_threads", "1");
    let edges = if args.no_raw_edges { Edges::WholeMinutes } else { Edges::Raw };
    let functions = FunctionsConfig::load_or_default(args.functions.as_deref())?;
    // Requests' queries take turns (--clickhouse-concurrency); memory's polls and loads do not
    // wait behind them.
    let bounded = clickhouse.with_concurrency(args.clickhouse_concurrency);
    let reader = Reader::new(bounded, Registry::builtin()).with_edges(edges).with_functions(functions);
    match reader.ready().await {
        Ok(()) => info!(url = %args.clickhouse.url, database = %args.clickhouse.database, "ClickHouse is ready"),
        Err(error) => warn!(%error, "ClickHouse is not ready yet; requests get 503 until it is"),
    }
    let metrics = metrics::Metrics::new();
    tokio::spawn(replicas::watch(
        clickhouse.clone(),
        metrics.replica_delay.clone(),
        Duration::from_secs(args.max_replica_delay_secs),
        Duration::from_secs(2),
    ));
    // The memories' replica syncs take turns (memory.rs, ReplicaSync).
    let syncing = Arc::new(ReplicaSync::default());
    let memory = (!args.no_memory).then(|| {
        let config = MemoryConfig {
            poll: Duration::from_millis(args.memory_poll_ms),
            budget_bytes: args.memory_budget_mb.saturating_mul(1 << 20),
            job: args.job_name.clone(),
            warm_up: !args.no_warm_up,
        };
        Arc::new(Memory::new(clickhouse.clone(), config, metrics.memory.clone(), syncing.clone()))
    });
    if let Some(memory) = &memory {
        tokio::spawn(memory.clone().run());
    }
    let stats_memory = (!args.no_memory).then(|| {
        let config = StatsMemoryConfig {
            poll: Duration::from_millis(args.memory_poll_ms),
            budget_bytes: args.stats_memory_budget_mb.saturating_mul(1 << 20),
            job: args.stats_job_name.clone(),
            warm_up: !args.no_warm_up,
        };
        let stats = metrics.stats_memory.clone();
        Arc::new(StatsMemory::new(clickhouse.clone(), Registry::builtin(), config, stats, syncing.clone()))
    });
    if let Some(stats_memory) = &stats_memory {
        tokio::spawn(stats_memory.clone().run());
    }
    let trending = (!args.no_memory).then(|| {
        Arc::new(trending::Trending::new(
            clickhouse.clone(),
            args.job_name.clone(),
            Duration::from_millis(args.memory_poll_ms),
        ))
    });
    if let Some(trending) = &trending {
        tokio::spawn(trending.clone().run());
    }
    let golden = Arc::new(Golden::new(args.ingest_url.clone(), args.job_metrics_url.clone(), metrics.clone()));
    tokio::spawn(golden.clone().run(Duration::from_secs(2)));
    let ui_dir = if args.ui_dir.join("index.html").is_file() {
        Some(args.ui_dir.clone())
    } else {
        warn!(dir = %args.ui_dir.display(), "no built UI there (run `make ui`); / answers 404");
        None
    };
    let state = Arc::new(AppState { reader, memory, stats_memory, trending, metrics: metrics.clone(), golden });
    let request_timeout = Duration::from_millis(args.clickhouse_timeout_ms * 2 + 1_000);
    let app = api::router(state, request_timeout, ui_dir);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    info!(%address, ui = %format!("http://{address}/"), "listening");
    match (&args.ingest_url, args.canary_interval_ms) {
        (Some(ingest), every) if every > 0 => {
            let canary = start_canary(&args, ingest, address)?;
            info!(every_ms = every, "freshness canary on");
            tokio::spawn(canary::run(canary, Duration::from_millis(every), metrics));
        }
        _ => info!("freshness canary off (needs --ingest-url and --canary-interval-ms > 0)"),
    }
    videocount_http::serve(listener, app, args.serve.limits()?, videocount_http::shutdown_signal())
        .await
        .context("HTTP server failed")?;
    Ok(())
}

/// The canary writes through `ingest` with a client of its own (one event a batch, sent at
/// once) and reads back through this service at `address`.
fn start_canary(args: &QueryArgs, ingest: &str, address: SocketAddr) -> anyhow::Result<Canary> {
    let mut config = ClientConfig::new([ingest]);
    config.batch_size = 1;
    config.linger = Duration::ZERO;
    config.health_interval = None;
    config.retry.max_elapsed = Some(Duration::from_secs(10));
    config.auth_token = args.ingest_token.clone();
    let client = Client::new(config).context("the canary's ingest client")?;
    let read = if address.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), address.port())
    } else {
        address
    };
    let video = match &args.canary_video {
        Some(video) if videocount_events::valid_video_id(video) => video.clone(),
        Some(video) => anyhow::bail!("--canary-video {video:?} is not a valid video id (1-64 of [A-Za-z0-9_-])"),
        // 128 random bits: nobody can guess it to write views to it (see CanaryError::Overcount).
        None => format!("{CANARY_PREFIX}-{:032x}", rand::random::<u128>()),
    };
    Ok(Canary::new(client, &format!("http://{read}"), video))
}
