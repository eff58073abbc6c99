//! What the HTTP services (`ingest`, `query`) share: the process main, the shutdown signal,
//! the JSON error answer ([`ApiError`]), and a middleware that bounds every request by a
//! deadline and counts and times it by route. Also what every binary shares: the logging
//! set-up and the process metrics.

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

mod error;
mod process;
mod serve;
pub use error::{ApiError, json_errors};
pub use process::{ProcessCollector, process_usage};
pub use serve::{ServeArgs, ServeLimits, serve};

/// Logs of every binary (services, jobs, CLI) go to stderr; `RUST_LOG` filters (default
/// `info`); colour only on a terminal.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Logs ([`init_logging`]), runs `service` on a multi-threaded runtime and turns its error into
/// a message and exit code 1.
pub fn main(name: &str, service: impl Future<Output = anyhow::Result<()>>) -> ExitCode {
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("{name}: error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(service) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Resolves at SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler installs");
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutdown signal received");
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template, e.g. `/v1/videos/{video_id}/views`.
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

/// `requests_total{endpoint,status}` and `request_duration_seconds{endpoint}`.
#[derive(Clone, Debug)]
pub struct RequestMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabels, Histogram>,
}

impl RequestMetrics {
    /// Registers both; latency buckets from 0.125 ms to 8 s, doubling.
    pub fn register(registry: &mut Registry) -> RequestMetrics {
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests by route and status", requests.clone());
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            Histogram::new((0..17).map(|i| 0.000_125 * f64::from(1u32 << i)))
        });
        registry.register("request_duration_seconds", "Request latency by route", latency.clone());
        RequestMetrics { requests, latency }
    }
}

/// What [`track`] needs: where to count, and the deadline with what a late request hears.
#[derive(Clone, Debug)]
pub struct Tracking {
    pub metrics: RequestMetrics,
    pub deadline: Duration,
    /// The `message` of the JSON 503 a request past its deadline gets.
    pub late_message: String,
}

/// Middleware: answers a JSON 503 with `Retry-After: 1` when a request outlives its deadline
/// (the last resort: each service bounds its own waits well before), and counts and times
/// every request by route and status.
pub async fn track(State(tracking): State<Arc<Tracking>>, request: Request, next: Next) -> Response {
    let endpoint =
        request.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = match tokio::time::timeout(tracking.deadline, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            let body = serde_json::json!({"error": "timeout", "field": "",
                "message": format!("no answer within {:?}{}", tracking.deadline, tracking.late_message)});
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response();
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(1));
            response
        }
    };
    let metrics = &tracking.metrics;
    metrics
        .latency
        .get_or_create(&EndpointLabels { endpoint: endpoint.clone() })
        .observe(started.elapsed().as_secs_f64());
    metrics.requests.get_or_create(&RequestLabels { endpoint, status: response.status().as_u16() }).inc();
    response
}
