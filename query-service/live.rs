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

/// One sample of Prometheus text: the metric name, its labels and its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Parses the sample lines of Prometheus or OpenMetrics text (comments and `# EOF` skipped;
/// label values unescaped for `\"`, `\\` and `\n`). Lines that do not parse are skipped.
pub fn parse_samples(text: &str) -> Vec<Sample> {
    text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()).filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(['{', ' '])?;
    let name = line[..name_end].to_owned();
    let mut labels = Vec::new();
    let mut rest = &line[name_end..];
    if let Some(body) = rest.strip_prefix('{') {
        let mut chars = body.char_indices().peekable();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            if c == '}' {
                end = Some(i);
                break;
            }
            if c == ',' || c == ' ' {
                continue;
            }
            let key_start = i;
            let eq = body[key_start..].find('=')? + key_start;
            let key = body[key_start..eq].to_owned();
            while chars.peek().is_some_and(|(j, _)| *j <= eq) {
                chars.next();
            }
            if chars.next()?.1 != '"' {
                return None;
            }
            let mut value = String::new();
            loop {
                match chars.next()?.1 {
                    '"' => break,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    other => value.push(other),
                }
            }
            labels.push((key, value));
        }
        rest = &body[end? + 1..];
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample { name, labels, value })
}

/// The sum of the samples named `name` whose labels pass `keep`.
pub fn sum(samples: &[Sample], name: &str, keep: impl Fn(&Sample) -> bool) -> f64 {
    // `+ 0.0`: the sum of nothing is -0.0, which JSON and the UI would show as "-0".
    samples.iter().filter(|s| s.name == name && keep(s)).map(|s| s.value).sum::<f64>() + 0.0
}

/// The `q` quantile of a histogram's observations between two scrapes (all label sets
/// merged), interpolated inside its bucket as Prometheus' `histogram_quantile` does; `None`
/// without observations in between.
pub fn quantile_between(before: &[Sample], after: &[Sample], histogram: &str, q: f64) -> Option<f64> {
    let bucket = format!("{histogram}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for sample in after.iter().filter(|s| s.name == bucket) {
        let le: f64 = match sample.label("le")? {
            "+Inf" => f64::INFINITY,
            le => le.parse().ok()?,
        };
        let earlier: f64 =
            before.iter().filter(|b| b.name == bucket && b.labels == sample.labels).map(|b| b.value).sum();
        match buckets.iter_mut().find(|(l, _)| *l == le) {
            Some((_, count)) => *count += sample.value - earlier,
            None => buckets.push((le, sample.value - earlier)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let width = count - lower.1;
            let inside = if width > 0.0 { (rank - lower.1) / width } else { 1.0 };
            return Some(lower.0 + (le - lower.0) * inside);
        }
        lower = (le, count);
    }
    None
}

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
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("a plain HTTP client builds");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_prometheus_text() {
        let text = "# TYPE a counter\na_total 12345\nb{job=\"view_counts\",le=\"0.5\"} 3\n\
                    c{x=\"quo\\\"te, comma\"} 1.5e3\n# EOF\n";
        let samples = parse_samples(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0], Sample { name: "a_total".into(), labels: vec![], value: 12_345.0 });
        assert_eq!(samples[1].label("job"), Some("view_counts"));
        assert_eq!(samples[1].label("le"), Some("0.5"));
        assert_eq!(samples[2].label("x"), Some("quo\"te, comma"));
        assert_eq!(samples[2].value, 1500.0);
        assert_eq!(sum(&samples, "a_total", all), 12_345.0);
        assert!(sum(&samples, "absent", all).is_sign_positive(), "nothing sums to +0, not -0");
    }

    #[test]
    fn histogram_quantiles_use_the_observations_in_between() {
        let scrape = |counts: [f64; 4]| {
            let les = ["0.1", "0.2", "0.4", "+Inf"];
            let text: String = les
                .iter()
                .zip(counts)
                .map(|(le, c)| format!("h_bucket{{endpoint=\"/x\",le=\"{le}\"}} {c}\n"))
                .collect();
            parse_samples(&text)
        };
        let before = scrape([10.0, 10.0, 10.0, 10.0]);
        // 100 new observations: 50 at most 0.1, 40 in (0.1, 0.2], 10 in (0.2, 0.4].
        let after = scrape([60.0, 100.0, 110.0, 110.0]);
        assert_eq!(quantile_between(&before, &after, "h", 0.5), Some(0.1));
        let p90 = quantile_between(&before, &after, "h", 0.9).unwrap();
        assert!((p90 - 0.2).abs() < 1e-9, "{p90}");
        let p99 = quantile_between(&before, &after, "h", 0.99).unwrap();
        assert!((p99 - 0.38).abs() < 1e-9, "{p99}");
        assert_eq!(quantile_between(&after, &after, "h", 0.5), None, "nothing observed in between");
    }
}
