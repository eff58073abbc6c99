//! The live panel's data (`GET /v1/live`): the four golden signals (latency, traffic, errors,
//! saturation) scraped from the ingest service's and the jobs' `/metrics` and this service's
//! own, the freshness canary, how long ago each job last committed an epoch, and the latest
//! dead letters.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use videocount_clickhouse::ClickHouse;
use videocount_query::{QueryError, format_time};

use crate::metrics::Metrics;
use crate::prometheus::{Sample, parse_samples, quantile_between, sum};

/// Two consecutive scrapes of one target.
#[derive(Default)]
struct Scrapes {
    before: Option<(Instant, Vec<Sample>)>,
    after: Option<(Instant, Vec<Sample>)>,
    error: Option<String>,
}

impl Scrapes {
    fn push(&mut self, samples: Vec<Sample>) {
        self.before = self.after.take();
        self.after = Some((Instant::now(), samples));
        self.error = None;
    }

    fn fail(&mut self, error: String) {
        self.before = None;
        self.after = None;
        self.error = Some(error);
    }

    /// The counters' rates and the histograms' quantiles between the two scrapes.
    fn window(&self) -> Option<Window<'_>> {
        let (t0, before) = self.before.as_ref()?;
        let (t1, after) = self.after.as_ref()?;
        let seconds = t1.duration_since(*t0).as_secs_f64();
        (seconds > 0.0).then_some(Window { before, after, seconds })
    }

    fn latest(&self) -> &[Sample] {
        self.after.as_ref().map_or(&[], |(_, s)| s.as_slice())
    }
}

struct Window<'a> {
    before: &'a [Sample],
    after: &'a [Sample],
    seconds: f64,
}

impl Window<'_> {
    fn rate(&self, name: &str, keep: impl Fn(&Sample) -> bool + Copy) -> f64 {
        ((sum(self.after, name, keep) - sum(self.before, name, keep)) / self.seconds).max(0.0)
    }

    fn quantile(&self, histogram: &str, q: f64) -> Option<f64> {
        quantile_between(self.before, self.after, histogram, q)
    }
}

fn status_class(class: char) -> impl Fn(&Sample) -> bool + Copy {
    move |s: &Sample| s.label("status").is_some_and(|status| status.starts_with(class))
}

fn all(_: &Sample) -> bool {
    true
}

/// What an HTTP service's metrics say: latency, traffic, errors and its process.
fn service_signals(prefix: &str, scrapes: &Scrapes) -> serde_json::Value {
    let latest = scrapes.latest();
    let mut out = serde_json::json!({
        "error": scrapes.error,
        "resident_bytes": sum(latest, &format!("{prefix}_process_resident_memory_bytes"), all),
    });
    if let Some(w) = scrapes.window() {
        let requests = format!("{prefix}_requests_total");
        let latency = format!("{prefix}_request_duration_seconds");
        out["requests_per_second"] = w.rate(&requests, all).into();
        out["errors_5xx_per_second"] = w.rate(&requests, status_class('5')).into();
        out["errors_4xx_per_second"] = w.rate(&requests, status_class('4')).into();
        out["latency_p50_seconds"] = w.quantile(&latency, 0.5).into();
        out["latency_p99_seconds"] = w.quantile(&latency, 0.99).into();
        out["cpu_percent"] = (100.0 * w.rate(&format!("{prefix}_process_cpu_seconds_total"), all)).into();
    }
    out
}

/// The golden signals of one job, from its `/metrics`.
fn job_signals(url: &str, scrapes: &Scrapes) -> serde_json::Value {
    let latest = scrapes.latest();
    let job = latest.iter().find_map(|s| s.label("job")).unwrap_or("unknown");
    let lag_seconds =
        latest.iter().filter(|s| s.name == "videocount_job_consumer_lag_seconds").map(|s| s.value).fold(0.0, f64::max);
    let queued = sum(latest, "videocount_job_writer_queue_batches", all);
    let capacity = sum(latest, "videocount_job_writer_queue_capacity_batches", all);
    let mut out = serde_json::json!({
        "job": job,
        "url": url,
        "error": scrapes.error,
        "lag_messages": sum(latest, "videocount_job_consumer_lag_messages", all),
        "lag_seconds": lag_seconds,
        "writer_queue_fill": if capacity > 0.0 { queued / capacity } else { 0.0 },
        "dead_letters_total": sum(latest, "videocount_job_dead_letters_total", all),
        "resident_bytes": sum(latest, "videocount_job_process_resident_memory_bytes", all),
    });
    if let Some(w) = scrapes.window() {
        out["messages_per_second"] = w.rate("videocount_job_messages_total", all).into();
        out["rows_per_second"] = w.rate("videocount_job_rows_written_total", all).into();
        out["dead_letters_per_second"] = w.rate("videocount_job_dead_letters_total", all).into();
        out["insert_retries_per_second"] = w.rate("videocount_job_insert_retries_total", all).into();
        out["cpu_percent"] = (100.0 * w.rate("videocount_job_process_cpu_seconds_total", all)).into();
    }
    out
}

/// Scrapes the ingest service's and the jobs' `/metrics` (and this service's own registry)
/// every few seconds and keeps the last two scrapes of each, for the live panel's golden
/// signals: latency, traffic, errors and saturation.
pub struct Golden {
    ingest_url: Option<String>,
    job_urls: Vec<String>,
    own: Arc<Metrics>,
    http: reqwest::Client,
    ingest: Mutex<Scrapes>,
    jobs: Mutex<Vec<Scrapes>>,
    query: Mutex<Scrapes>,
}

impl Golden {
    pub fn new(ingest_url: Option<String>, job_urls: Vec<String>, own: Arc<Metrics>) -> Golden {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("a plain HTTP client builds");
        let trim = |u: String| u.trim_end_matches('/').to_owned();
        let jobs = job_urls.iter().map(|_| Scrapes::default()).collect();
        Golden {
            ingest_url: ingest_url.map(trim),
            job_urls: job_urls.into_iter().map(trim).collect(),
            own,
            http,
            ingest: Mutex::default(),
            jobs: Mutex::new(jobs),
            query: Mutex::default(),
        }
    }

    async fn scrape(&self, url: &str) -> Result<Vec<Sample>, String> {
        let response = self.http.get(format!("{url}/metrics")).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("{url}/metrics answered {}", response.status()));
        }
        Ok(parse_samples(&response.text().await.map_err(|e| e.to_string())?))
    }

    /// Scrapes every `every` for ever.
    pub async fn run(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if let Some(url) = &self.ingest_url {
                let result = self.scrape(url).await;
                let mut ingest = self.ingest.lock().expect("golden lock");
                match result {
                    Ok(samples) => ingest.push(samples),
                    Err(error) => ingest.fail(error),
                }
            }
            for (i, url) in self.job_urls.iter().enumerate() {
                let result = self.scrape(url).await;
                let mut jobs = self.jobs.lock().expect("golden lock");
                match result {
                    Ok(samples) => jobs[i].push(samples),
                    Err(error) => jobs[i].fail(error),
                }
            }
            let own = parse_samples(&self.own.encode());
            self.query.lock().expect("golden lock").push(own);
        }
    }

    /// The signals as the live panel shows them.
    pub fn snapshot(&self) -> serde_json::Value {
        let ingest = self.ingest.lock().expect("golden lock");
        let mut ingest_signals = service_signals("videocount_ingest", &ingest);
        ingest_signals["url"] = self.ingest_url.clone().into();
        ingest_signals["accepted_total"] =
            ingest.after.as_ref().map(|(_, s)| sum(s, "videocount_ingest_events_accepted_total", all)).into();
        if let Some(w) = ingest.window() {
            ingest_signals["events_per_second"] = w.rate("videocount_ingest_events_accepted_total", all).into();
            ingest_signals["events_failed_per_second"] = w.rate("videocount_ingest_events_failed_total", all).into();
        }
        let latest = ingest.latest();
        let capacity = sum(latest, "videocount_ingest_producer_queue_capacity_messages", all);
        if capacity > 0.0 {
            ingest_signals["producer_queue_fill"] =
                (sum(latest, "videocount_ingest_producer_queue_messages", all) / capacity).into();
        }
        let jobs = self.jobs.lock().expect("golden lock");
        let job_signals: Vec<_> = self.job_urls.iter().zip(jobs.iter()).map(|(u, s)| job_signals(u, s)).collect();
        let query = service_signals("videocount_query", &self.query.lock().expect("golden lock"));
        serde_json::json!({"ingest": ingest_signals, "jobs": job_signals, "query": query})
    }
}

#[derive(Serialize, Debug)]
pub struct JobState {
    pub job: String,
    pub topic: String,
    pub last_commit: String,
    /// Seconds since the job's last committed epoch: with traffic flowing, its lag.
    pub seconds_since_commit: u64,
}

#[derive(Serialize, Debug)]
pub struct DeadLetter {
    pub job: String,
    pub reason: String,
    pub detail: String,
    pub partition: u32,
    pub offset: u64,
    pub time: String,
    /// The first 300 bytes of the payload (invalid UTF-8 replaced).
    pub payload: String,
}

/// The last commit of each job.
pub async fn jobs(clickhouse: &ClickHouse) -> Result<Vec<JobState>, QueryError> {
    #[derive(Row, Deserialize)]
    struct Last {
        job: String,
        topic: String,
        last: u32,
    }
    let query = clickhouse.client().query(
        "SELECT job, topic, toUInt32(max(committed_at)) AS last FROM checkpoint_commits GROUP BY job, topic \
         ORDER BY job, topic",
    );
    let rows: Vec<Last> = clickhouse.fetch_all(query).await?;
    let now = u64::from(videocount_events::clock::now_secs());
    Ok(rows
        .into_iter()
        .map(|r| JobState {
            job: r.job,
            topic: r.topic,
            last_commit: format_time(u64::from(r.last) * 1000),
            seconds_since_commit: now.saturating_sub(u64::from(r.last)),
        })
        .collect())
}

/// The `limit` newest dead letters (by message time).
pub async fn dead_letters(clickhouse: &ClickHouse, limit: u32) -> Result<Vec<DeadLetter>, QueryError> {
    #[derive(Row, Deserialize)]
    struct Row_ {
        job: String,
        reason: String,
        #[serde(with = "serde_bytes")]
        detail: Vec<u8>,
        partition: u32,
        offset: u64,
        message_ts: u64,
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    }
    let query = clickhouse
        .client()
        .query(
            "SELECT job, reason, detail, partition, offset, message_ts, substring(payload, 1, 300) AS payload \
             FROM dead_letters ORDER BY message_ts DESC, offset DESC LIMIT ?",
        )
        .bind(limit);
    let rows: Vec<Row_> = clickhouse.fetch_all(query).await?;
    Ok(rows
        .into_iter()
        .map(|r| DeadLetter {
            job: r.job,
            reason: r.reason,
            detail: String::from_utf8_lossy(&r.detail).into_owned(),
            partition: r.partition,
            offset: r.offset,
            time: format_time(r.message_ts),
            payload: String::from_utf8_lossy(&r.payload).into_owned(),
        })
        .collect())
}
