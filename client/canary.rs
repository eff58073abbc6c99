//! End-to-end freshness: write one view through the client, then read the same video's count
//! back through the read API until it shows; the time from Kafka's acknowledgement to the count
//! being queryable is one freshness sample.
//!
//! Used by the query service (`videocount_query_canary_freshness_seconds`) and the load test.
//! Each canary keeps its own video id. A probe reads the minute's count first, then writes one
//! view and waits for exactly one more: a higher count (a view counted twice, or views someone
//! else wrote to the canary's video to fake freshness) is an [`CanaryError::Overcount`], never
//! a sample. After a failed probe (its view may still arrive, or arrive twice) the rest of the
//! minute is left alone: the next probe waits for the next minute. The id should be
//! unguessable and unpublished.

use std::time::Duration;

use videocount_events::clock::now_ms;

use tokio::time::Instant;

use crate::{Client, ClientError, Event};

/// Why a probe gave no sample.
#[derive(Debug, thiserror::Error)]
pub enum CanaryError {
    #[error("the canary event was not accepted: {0}")]
    Write(ClientError),
    #[error("the read API failed: {0}")]
    Read(String),
    #[error("the canary event was not counted within {0:?}")]
    Timeout(Duration),
    /// The canary's video has more views than the canary wrote: a view counted twice, or
    /// someone else writing to the canary's video. No sample: the count no longer says when
    /// the canary's own view arrived.
    #[error("the canary's video counts {counted} views in the minute where {expected} were expected")]
    Overcount { expected: u64, counted: u64 },
}

impl From<ClientError> for CanaryError {
    fn from(error: ClientError) -> Self {
        CanaryError::Write(error)
    }
}

impl CanaryError {
    /// Every [`CanaryError::kind`].
    pub const KINDS: [&'static str; 4] = ["write", "read", "timeout", "overcount"];

    /// A short label for metrics: `write`, `read`, `timeout` or `overcount`.
    pub fn kind(&self) -> &'static str {
        match self {
            CanaryError::Write(_) => "write",
            CanaryError::Read(_) => "read",
            CanaryError::Timeout(_) => "timeout",
            CanaryError::Overcount { .. } => "overcount",
        }
    }
}

/// Writes canary views of one video and waits for each to be counted.
pub struct Canary {
    client: Client,
    http: reqwest::Client,
    /// Read API base URLs: each probe reads the first that answers.
    read_urls: Vec<String>,
    video_id: String,
    /// The minute (epoch ms of its start) of the last failed probe: its count is not known.
    tainted: Option<u64>,
    /// How long a probe waits for its view to be counted.
    pub timeout: Duration,
    /// How often it asks the read API meanwhile.
    pub poll: Duration,
}

impl Canary {
    /// `read_url` is the query service's base URL, or several comma-separated (each read goes
    /// to the first that answers); `video_id` should be used by nothing else.
    pub fn new(client: Client, read_url: &str, video_id: impl Into<String>) -> Canary {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(5))
            .build()
            .expect("a plain HTTP client builds");
        Canary {
            client,
            http,
            read_urls: read_url.split(',').map(|url| url.trim().trim_end_matches('/').to_owned()).collect(),
            video_id: video_id.into(),
            tainted: None,
            timeout: Duration::from_secs(60),
            poll: Duration::from_millis(50),
        }
    }

    pub fn video_id(&self) -> &str {
        &self.video_id
    }

    /// The view count of the canary's video in `minute` as the first read API that answers
    /// gives it.
    async fn counted(&self, minute: u64) -> Result<u64, CanaryError> {
        let mut error = CanaryError::Read("no read API address".into());
        for url in &self.read_urls {
            match self.counted_at(url, minute).await {
                Ok(count) => return Ok(count),
                Err(e) => error = e,
            }
        }
        Err(error)
    }

    async fn counted_at(&self, read_url: &str, minute: u64) -> Result<u64, CanaryError> {
        let url = format!("{read_url}/v1/videos/{}/views?from={minute}&to={}", self.video_id, minute + 60_000);
        let response = self.http.get(&url).send().await.map_err(|e| CanaryError::Read(e.to_string()))?;
        let status = response.status();
        let body: serde_json::Value = response.json().await.map_err(|e| CanaryError::Read(e.to_string()))?;
        if !status.is_success() {
            return Err(CanaryError::Read(format!("HTTP {status}: {body}")));
        }
        body["value"].as_u64().ok_or_else(|| CanaryError::Read(format!("no count in {body}")))
    }

    /// Sends one view and waits until the read API counts it: the seconds from the write's
    /// acknowledgement to the first answer that includes it.
    pub async fn probe(&mut self) -> Result<Duration, CanaryError> {
        let result = self.probe_once().await;
        if result.is_err() {
            let ts = now_ms();
            self.tainted = Some(ts - ts % 60_000);
        }
        result
    }

    async fn probe_once(&mut self) -> Result<Duration, CanaryError> {
        let mut ts = now_ms();
        if self.tainted == Some(ts - ts % 60_000) {
            tokio::time::sleep(Duration::from_millis(60_000 - ts % 60_000)).await;
            ts = now_ms();
        }
        let minute = ts - ts % 60_000;
        let expected = self.counted(minute).await? + 1;
        self.client.send(Event::view(self.video_id.clone()).at(ts))?.await?;
        let accepted = Instant::now();
        loop {
            match self.counted(minute).await {
                Ok(count) if count == expected => return Ok(accepted.elapsed()),
                Ok(counted) if counted > expected => return Err(CanaryError::Overcount { expected, counted }),
                Ok(_) => {}
                Err(error) if accepted.elapsed() >= self.timeout => return Err(error),
                Err(_) => {}
            }
            if accepted.elapsed() >= self.timeout {
                return Err(CanaryError::Timeout(self.timeout));
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}
