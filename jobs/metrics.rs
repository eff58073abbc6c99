//! The job's Prometheus metrics (`GET /metrics` on `--metrics-listen`, OpenMetrics text):
//! `videocount_job_*`, each with a `job` label. Every value is read from the source's and the
//! writer's shared counters at scrape time (a [`Collector`]), so nothing on the hot path
//! touches the registry. The endpoint answers from the start: a standby waiting for the lease
//! shows `videocount_job_lease_held 0` and nothing else of the job's.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use videocount_clickhouse::Writer;
use videocount_http::ProcessCollector;
use videocount_lease::{Fence, Permit};
use videocount_operators::kafka_source::SourceProgress;

/// What the metrics read once the job holds its lease and runs; a standby has none yet.
#[derive(Debug)]
pub struct Running {
    pub progress: Arc<SourceProgress>,
    pub writer: Writer,
    pub queue_capacity: usize,
}

/// The metrics' view of the job: its fence (held or not) from the start, the rest once running.
#[derive(Debug, Clone)]
pub struct JobState {
    fence: Fence,
    running: Arc<OnceLock<Running>>,
}

impl JobState {
    pub fn new(fence: Fence) -> JobState {
        JobState { fence, running: Arc::new(OnceLock::new()) }
    }

    /// The job runs: its counters become visible.
    pub fn running(&self, running: Running) {
        let _ = self.running.set(running);
    }
}

#[derive(Debug)]
struct JobCollector {
    state: JobState,
}

/// Writes one metric: the first value alone when `label` is `None`, else one sample per
/// label value.
fn encode_metric<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: Option<&str>,
    series: Vec<(String, M)>,
) -> Result<(), std::fmt::Error> {
    let Some(first) = series.first() else { return Ok(()) };
    let mut metric = encoder.encode_descriptor(name, help, None, first.1.metric_type())?;
    match label {
        None => first.1.encode(metric),
        Some(key) => {
            series.iter().try_for_each(|(label, value)| value.encode(metric.encode_family(&[(key, label.as_str())])?))
        }
    }
}

impl Collector for JobCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let held = matches!(self.state.fence.check(), Permit::Granted);
        encode_metric(
            &mut encoder,
            "lease_held",
            "1 while this instance holds the job's lease and may write (active), 0 while it waits (standby) \
             or after it lost the lease",
            None,
            vec![(String::new(), ConstGauge::new(i64::from(held)))],
        )?;
        let Some(Running { progress, writer, queue_capacity }) = self.state.running.get() else { return Ok(()) };
        let stats = writer.stats();
        let counter =
            |v: &std::sync::atomic::AtomicU64| vec![(String::new(), ConstCounter::new(v.load(Ordering::Relaxed)))];
        encode_metric(&mut encoder, "messages", "Kafka messages read", None, counter(&progress.messages))?;
        // Every reason appears (0 until it happens), so rates and alerts need no special case.
        let reasons = progress.dead_letter_reasons.lock().map(|r| r.clone()).unwrap_or_default();
        let by_reason = videocount_events::RejectReason::ALL
            .iter()
            .map(|r| (r.as_str().to_owned(), ConstCounter::new(reasons.get(r.as_str()).copied().unwrap_or(0))))
            .collect();
        encode_metric(
            &mut encoder,
            "dead_letters",
            "Messages that became dead letters, by reason",
            Some("reason"),
            by_reason,
        )?;
        let tables = stats.rows_by_table.lock().map(|t| t.clone()).unwrap_or_default();
        let by_table = tables.into_iter().map(|(table, rows)| (table, ConstCounter::new(rows))).collect();
        encode_metric(&mut encoder, "rows_written", "Rows written to ClickHouse, by table", Some("table"), by_table)?;
        encode_metric(&mut encoder, "inserts", "Insert requests that succeeded", None, counter(&stats.inserts))?;
        encode_metric(
            &mut encoder,
            "insert_retries",
            "Insert attempts that failed and were retried",
            None,
            counter(&stats.retries),
        )?;
        let gauge = |v: usize| vec![(String::new(), ConstGauge::new(v as i64))];
        encode_metric(
            &mut encoder,
            "writer_queue_batches",
            "Batches waiting for the ClickHouse writer",
            None,
            gauge(writer.queued()),
        )?;
        encode_metric(
            &mut encoder,
            "writer_queue_capacity_batches",
            "The writer queue's capacity",
            None,
            gauge(*queue_capacity),
        )?;
        let positions = progress.positions.lock().map(|p| p.clone()).unwrap_or_default();
        let lag_messages =
            positions.iter().map(|(p, pos)| (p.to_string(), ConstGauge::new(pos.lag_messages as i64))).collect();
        encode_metric(
            &mut encoder,
            "consumer_lag_messages",
            "Messages between the consumed position and the high watermark, by partition",
            Some("partition"),
            lag_messages,
        )?;
        let lag_seconds = positions.iter().map(|(p, pos)| (p.to_string(), ConstGauge::new(pos.lag_seconds))).collect();
        encode_metric(
            &mut encoder,
            "consumer_lag_seconds",
            "Age of the last message read while more are waiting (0 when caught up), by partition",
            Some("partition"),
            lag_seconds,
        )?;
        let dedup_ids =
            positions.iter().map(|(p, pos)| (p.to_string(), ConstGauge::new(pos.dedup_ids as i64))).collect();
        encode_metric(
            &mut encoder,
            "dedup_ids",
            "Event ids in the partition's dedup window (--dedup-window offsets), by partition",
            Some("partition"),
            dedup_ids,
        )?;
        let dedup_seconds: Vec<_> = positions
            .iter()
            .filter_map(|(p, pos)| Some((p.to_string(), ConstGauge::new(pos.dedup_window_ms? as f64 / 1000.0))))
            .collect();
        if !dedup_seconds.is_empty() {
            encode_metric(
                &mut encoder,
                "dedup_window_seconds",
                "How far back --dedup-window offsets reach: the Kafka time the last whole chunk of them took, by \
                 partition (absent until one was read): keep it above the clients' retry span",
                Some("partition"),
                dedup_seconds,
            )?;
        }
        let headroom: Vec<_> = positions
            .iter()
            .filter_map(|(p, pos)| pos.retention_headroom.map(|h| (p.to_string(), ConstGauge::new(h))))
            .collect();
        if !headroom.is_empty() {
            encode_metric(
                &mut encoder,
                "retention_headroom_messages",
                "Oldest offset a restart would read again minus the partition's log start, by partition: \
                 alert well above 0; below 0 retention deleted messages the job needs",
                Some("partition"),
                headroom,
            )?;
        }
        Ok(())
    }
}

/// Serves `/metrics` on `listen` from the runtime until the process exits.
pub fn serve(runtime: &tokio::runtime::Runtime, listen: SocketAddr, job: &str, state: JobState) -> anyhow::Result<()> {
    let mut registry =
        Registry::with_prefix_and_labels("videocount_job", [("job".into(), job.to_owned().into())].into_iter());
    registry.register_collector(Box::new(JobCollector { state }));
    registry.register_collector(Box::new(ProcessCollector));
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let registry = Arc::clone(&registry);
            async move {
                let mut text = String::new();
                prometheus_client::encoding::text::encode(&mut text, &registry)
                    .expect("writing to a String never fails");
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
                    .into_response()
            }
        }),
    );
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(listen))
        .with_context(|| format!("cannot listen on {listen} for --metrics-listen"))?;
    tracing::info!(address = %listen, "serving /metrics");
    runtime.spawn(async move {
        if let Err(error) = axum::serve(listener, app).await {
            tracing::warn!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}
