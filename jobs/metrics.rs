//! The job's Prometheus metrics (`GET /metrics` on `--metrics-listen`, OpenMetrics text):
//! `videocount_job_*`, each with a `job` label. Values are read from the source's and the
//! writer's counters when scraped.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use videocount_clickhouse::Writer;
use videocount_operators::kafka_source::SourceProgress;

struct Exported {
    messages: Counter,
    dead_letters: Counter,
    rows_written: Counter,
    inserts: Counter,
    insert_retries: Counter,
    queue: Gauge,
    queue_capacity: Gauge,
    lag: Gauge,
    cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
    resident_bytes: Gauge,
}

/// Brings a counter up to `value` (the sources only grow).
fn advance(counter: &Counter, value: u64) {
    counter.inc_by(value.saturating_sub(counter.get()));
}

/// This process's CPU seconds (user + system) and resident bytes, from /proc.
fn process_usage() -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let resident_pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // Linux reports in clock ticks of 1/100 s and pages of 4 KiB on every platform we run on.
    Some((ticks / 100.0, resident_pages * 4096))
}

/// Serves `/metrics` on `listen` from the runtime until the process exits.
pub fn serve(
    runtime: &tokio::runtime::Runtime,
    listen: SocketAddr,
    job: &str,
    progress: Arc<SourceProgress>,
    writer: Writer,
    queue_capacity: usize,
) -> anyhow::Result<()> {
    let mut registry =
        Registry::with_prefix_and_labels("videocount_job", [("job".into(), job.to_owned().into())].into_iter());
    let exported = Exported {
        messages: Counter::default(),
        dead_letters: Counter::default(),
        rows_written: Counter::default(),
        inserts: Counter::default(),
        insert_retries: Counter::default(),
        queue: Gauge::default(),
        queue_capacity: Gauge::default(),
        lag: Gauge::default(),
        cpu_seconds: Counter::default(),
        resident_bytes: Gauge::default(),
    };
    registry.register("messages", "Kafka messages read", exported.messages.clone());
    registry.register("dead_letters", "Messages that became dead letters", exported.dead_letters.clone());
    registry.register("rows_written", "Rows written to ClickHouse", exported.rows_written.clone());
    registry.register("inserts", "Insert requests that succeeded", exported.inserts.clone());
    registry.register(
        "insert_retries",
        "Insert attempts that failed and were retried",
        exported.insert_retries.clone(),
    );
    registry.register("writer_queue_batches", "Batches waiting for the ClickHouse writer", exported.queue.clone());
    registry.register("writer_queue_capacity_batches", "The writer queue's capacity", exported.queue_capacity.clone());
    registry.register(
        "consumer_lag_messages",
        "Messages between the consumed positions and the high watermarks, all partitions",
        exported.lag.clone(),
    );
    registry.register("process_cpu_seconds", "CPU time of the job's process", exported.cpu_seconds.clone());
    registry.register(
        "process_resident_memory_bytes",
        "Resident memory of the job's process",
        exported.resident_bytes.clone(),
    );
    // One scrape at a time: `advance` reads a counter, then adds to it.
    let scraped = Arc::new(Mutex::new((registry, exported)));
    let render = move || {
        let guard = scraped.lock().expect("metrics lock");
        let (registry, exported) = &*guard;
        advance(&exported.messages, progress.messages.load(Ordering::Relaxed));
        advance(&exported.dead_letters, progress.dead_letters.load(Ordering::Relaxed));
        let stats = writer.stats();
        advance(&exported.rows_written, stats.rows_written.load(Ordering::Relaxed));
        advance(&exported.inserts, stats.inserts.load(Ordering::Relaxed));
        advance(&exported.insert_retries, stats.retries.load(Ordering::Relaxed));
        exported.queue.set(writer.queued() as i64);
        exported.queue_capacity.set(queue_capacity as i64);
        exported.lag.set(progress.lag.load(Ordering::Relaxed) as i64);
        if let Some((cpu, resident)) = process_usage() {
            exported.cpu_seconds.inc_by((cpu - exported.cpu_seconds.get()).max(0.0));
            exported.resident_bytes.set(resident as i64);
        }
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).expect("writing to a String never fails");
        text
    };
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let render = render.clone();
            async move {
                ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], render())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process_usage() {
        let (cpu, resident) = process_usage().expect("/proc is readable");
        assert!(cpu >= 0.0);
        assert!(resident > 1 << 20, "a running test holds more than 1 MiB");
    }
}
