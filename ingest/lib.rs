//! `ingest`: the write API of videocount. It validates video events sent over HTTP and writes
//! them to the Kafka topic keyed by `video_id` (one video, one partition), answering
//! `202 Accepted` only once Kafka has acknowledged them.
//!
//! - `POST /v1/videos/{video_id}/views`: one view (`countViewEvent`).
//! - `POST /v1/videos/{video_id}/events/{event_type}`: one event (`countEvent`).
//! - `POST /v1/videos/{video_id}/events/{event_type}/{function}` with
//!   `{"value": 12.5, "viewer_id": "...", "ts": ...}`: a value for one function (`processEvent`).
//! - `POST /v1/events`: a JSON array or NDJSON of events (`processEvents`), at most
//!   10,000 events and 4 MiB; the answer lists each rejected item with its index and reason.
//! - `GET /healthz`, `GET /readyz` (Kafka reachable, topic has leaders), `GET /metrics`.

pub mod api;
pub mod metrics;
pub mod publish;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::{info, warn};
use videocount_aggregates::FunctionsConfig;
use videocount_client::BreakerConfig;
use videocount_events::TimeLimits;

use crate::api::AppState;
use crate::publish::{Publisher, PublisherConfig};

/// Flags of `ingest`; each also from the environment.
#[derive(Parser, Debug, Clone)]
#[command(version, about = "The videocount write API: HTTP in, Kafka out; 202 only after Kafka acknowledged.")]
pub struct IngestArgs {
    /// Address to listen on. Anything but loopback needs --auth-token.
    #[arg(long, env = "VIDEOCOUNT_INGEST_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// The topic the jobs read.
    #[arg(long, env = "VIDEOCOUNT_TOPIC", default_value = "video-events")]
    pub topic: String,
    /// Bearer token required on the /v1 routes.
    #[arg(long, env = "VIDEOCOUNT_INGEST_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// The functions config `event_stats` runs with (default: the built-in
    /// config/functions.toml); events it would refuse are refused here with a 400.
    #[arg(long, env = "VIDEOCOUNT_FUNCTIONS")]
    pub functions: Option<PathBuf>,
    /// Kafka must acknowledge an event within this many milliseconds, or the request gets 503.
    /// Above a broker failover (a killed leader is replaced after the brokers' 9 s session
    /// timeout), so that a failover delays writes instead of failing them into client retries.
    #[arg(long, env = "VIDEOCOUNT_INGEST_DELIVERY_TIMEOUT_MS", default_value_t = 15_000)]
    pub delivery_timeout_ms: u64,
    /// No request takes longer (503 after it); must exceed --delivery-timeout-ms, and stay
    /// below the clients' request timeout (the client library's: 25 s).
    #[arg(long, env = "VIDEOCOUNT_INGEST_REQUEST_TIMEOUT_MS", default_value_t = 20_000)]
    pub request_timeout_ms: u64,
    /// Messages the producer queue holds; beyond, requests get 503 at once.
    #[arg(long, env = "VIDEOCOUNT_INGEST_QUEUE_CAPACITY", default_value_t = 1_000_000)]
    pub queue_capacity: usize,
    /// Requests in a row that Kafka failed before the circuit opens.
    #[arg(long, env = "VIDEOCOUNT_INGEST_BREAKER_FAILURES", default_value_t = 3)]
    pub breaker_failures: u32,
    /// How long an open circuit answers 503 at once before it lets a probe through.
    #[arg(long, env = "VIDEOCOUNT_INGEST_BREAKER_OPEN_MS", default_value_t = 2_000)]
    pub breaker_open_ms: u64,
    /// Raw librdkafka producer setting KEY=VALUE (repeatable), e.g. -X linger.ms=20.
    /// A write's body must arrive within this long after its headers, or the answer is 408
    /// (nothing written); keep it below --request-timeout-ms.
    #[arg(long, env = "VIDEOCOUNT_INGEST_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,
    /// MiB of request bodies held at once (being read, validated or waiting for Kafka); a
    /// request beyond it is a 503 with Retry-After at once. Bounds the memory requests take.
    #[arg(long, env = "VIDEOCOUNT_INGEST_MAX_INFLIGHT_MB", default_value_t = 256)]
    pub max_inflight_mb: usize,
    #[command(flatten)]
    pub serve: videocount_http::ServeArgs,
    #[arg(short = 'X', value_parser = videocount_kafka::parse_option)]
    pub kafka_options: Vec<(String, String)>,
}

/// Checks the flags, connects the producer and serves until SIGINT/SIGTERM; then finishes the
/// requests in flight and waits for Kafka's acknowledgements.
pub async fn run(args: IngestArgs) -> anyhow::Result<()> {
    if args.auth_token.is_none() && !args.listen.ip().is_loopback() {
        anyhow::bail!(
            "refusing to listen on {} without --auth-token (VIDEOCOUNT_INGEST_TOKEN): without a token only \
             loopback addresses are allowed",
            args.listen
        );
    }
    if args.auth_token.as_deref().is_some_and(str::is_empty) {
        anyhow::bail!("--auth-token is empty");
    }
    if args.request_timeout_ms <= args.delivery_timeout_ms {
        anyhow::bail!(
            "--request-timeout-ms ({}) must exceed --delivery-timeout-ms ({}): a request must outlive its deliveries",
            args.request_timeout_ms,
            args.delivery_timeout_ms
        );
    }
    if args.body_timeout_ms == 0 || args.body_timeout_ms >= args.request_timeout_ms {
        anyhow::bail!(
            "--body-timeout-ms ({}) must be above 0 and below --request-timeout-ms ({}): a slow body is answered \
             408 before the request's deadline",
            args.body_timeout_ms,
            args.request_timeout_ms
        );
    }
    if !(4..=4096).contains(&args.max_inflight_mb) {
        anyhow::bail!(
            "--max-inflight-mb ({}) must be 4 to 4096: one request body is up to 4 MiB",
            args.max_inflight_mb
        );
    }
    let functions = FunctionsConfig::load_or_default(args.functions.as_deref())?;
    let publisher = Publisher::new(PublisherConfig {
        kafka: videocount_kafka::KafkaClients::new(args.brokers.clone(), args.kafka_options.clone()),
        topic: args.topic.clone(),
        delivery_timeout: Duration::from_millis(args.delivery_timeout_ms),
        queue_capacity: args.queue_capacity,
        breaker: BreakerConfig {
            failures_to_open: args.breaker_failures.max(1),
            open_for: Duration::from_millis(args.breaker_open_ms),
        },
    })
    .context("cannot create the Kafka producer")?;
    match publisher.ready(Duration::from_secs(5)).await {
        Ok(()) => info!(brokers = %args.brokers, topic = %args.topic, "Kafka is ready"),
        Err(reason) => warn!(%reason, "Kafka is not ready yet; requests get 503 until it is"),
    }
    let state = Arc::new(AppState {
        publisher,
        functions,
        limits: TimeLimits::default(),
        metrics: metrics::Metrics::new(),
        auth_token: args.auth_token.clone(),
        body_timeout: Duration::from_millis(args.body_timeout_ms),
        inflight_bytes: Arc::new(tokio::sync::Semaphore::new(args.max_inflight_mb << 20)),
    });
    tokio::spawn(log_progress(state.clone()));
    let app = api::router(state.clone(), Duration::from_millis(args.request_timeout_ms));
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    info!(address = %listener.local_addr()?, auth = args.auth_token.is_some(), "listening");
    videocount_http::serve(listener, app, args.serve.limits()?, videocount_http::shutdown_signal())
        .await
        .context("HTTP server failed")?;
    info!("stopping: waiting for Kafka to acknowledge what is queued");
    let flushed = tokio::task::spawn_blocking(move || state.publisher.flush(Duration::from_secs(30))).await?;
    if let Err(e) = flushed {
        warn!(error = %e, "not everything queued was acknowledged before exit");
    }
    Ok(())
}

/// Every 10 s while traffic flows: the events accepted, refused and failed since the last line.
async fn log_progress(state: Arc<AppState>) {
    let metrics = &state.metrics;
    let totals = || (metrics.events_accepted.get(), metrics.events_rejected_all.get(), metrics.events_failed.get());
    let mut last = totals();
    let mut every = tokio::time::interval(Duration::from_secs(10));
    every.tick().await;
    loop {
        every.tick().await;
        let now = totals();
        if now != last {
            info!(
                accepted = now.0 - last.0,
                rejected = now.1 - last.1,
                failed = now.2 - last.2,
                producer_queue = state.publisher.queued(),
                breaker = ?state.publisher.breaker_state(),
                "progress"
            );
            last = now;
        }
    }
}
