//! The live panel's data (`GET /v1/live`): the ingest rate (sampled from the ingest service's
//! `/metrics`), how long ago each job last committed an epoch, and the latest dead letters.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clickhouse::Row;
use serde::{Deserialize, Serialize};
use videocount_clickhouse::ClickHouse;
use videocount_query::{QueryError, format_time};

/// The accepted-events counter of the ingest service.
const INGEST_COUNTER: &str = "videocount_ingest_events_accepted_total";

/// Samples the ingest service's accepted-events counter and turns two samples into a rate.
pub struct IngestRate {
    url: Option<String>,
    http: reqwest::Client,
    samples: Mutex<Samples>,
}

#[derive(Default)]
struct Samples {
    last: Option<(Instant, u64)>,
    rate: Option<f64>,
    error: Option<String>,
}

/// The value of an unlabelled counter in Prometheus text.
pub fn counter_value(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse::<f64>().ok().map(|v| v as u64)
    })
}

impl IngestRate {
    pub fn new(url: Option<String>) -> IngestRate {
        let http =
            reqwest::Client::builder().timeout(Duration::from_secs(2)).build().expect("a plain HTTP client builds");
        IngestRate { url: url.map(|u| u.trim_end_matches('/').to_owned()), http, samples: Mutex::default() }
    }

    async fn sample(&self, url: &str) -> Result<u64, String> {
        let response = self.http.get(format!("{url}/metrics")).send().await.map_err(|e| e.to_string())?;
        let text = response.text().await.map_err(|e| e.to_string())?;
        counter_value(&text, INGEST_COUNTER).ok_or_else(|| format!("{url}/metrics has no {INGEST_COUNTER}"))
    }

    /// Samples every `every` for ever (nothing without an ingest URL).
    pub async fn run(self: std::sync::Arc<Self>, every: Duration) {
        let Some(url) = self.url.clone() else { return };
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let result = self.sample(&url).await;
            let mut samples = self.samples.lock().expect("ingest rate lock");
            match result {
                Ok(value) => {
                    let now = Instant::now();
                    if let Some((at, before)) = samples.last {
                        let seconds = now.duration_since(at).as_secs_f64();
                        if seconds > 0.0 {
                            samples.rate = Some(value.saturating_sub(before) as f64 / seconds);
                        }
                    }
                    samples.last = Some((now, value));
                    samples.error = None;
                }
                Err(error) => {
                    samples.rate = None;
                    samples.last = None;
                    samples.error = Some(error);
                }
            }
        }
    }

    pub fn snapshot(&self) -> serde_json::Value {
        let samples = self.samples.lock().expect("ingest rate lock");
        serde_json::json!({
            "url": self.url,
            "events_per_second": samples.rate,
            "accepted_total": samples.last.map(|(_, v)| v),
            "error": samples.error,
        })
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
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
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
    fn reads_an_unlabelled_counter() {
        let text = "# TYPE videocount_ingest_events_accepted counter\n\
                    videocount_ingest_events_accepted_total 12345\n\
                    videocount_ingest_events_failed_total 3\n";
        assert_eq!(counter_value(text, INGEST_COUNTER), Some(12_345));
        assert_eq!(counter_value(text, "videocount_ingest_events_failed_total"), Some(3));
        assert_eq!(counter_value(text, "videocount_ingest_events"), None);
    }
}
