//! The client's settings and its retry policy (full-jitter exponential backoff).

use std::time::Duration;

use rand::Rng;

use crate::BreakerConfig;

/// How long to keep retrying and how far apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// The first retry waits up to this long; each further one up to twice as long.
    pub base: Duration,
    /// No single wait is longer.
    pub max_delay: Duration,
    /// After this long since the first try the events fail with [`crate::ClientError::GaveUp`];
    /// `None` retries for as long as the client lives.
    pub max_elapsed: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_millis(50),
            max_delay: Duration::from_secs(5),
            max_elapsed: Some(Duration::from_secs(300)),
        }
    }
}

impl RetryPolicy {
    /// The wait before retry number `attempt` (1 is the first retry): full jitter, uniform in
    /// `[0, min(max_delay, base * 2^(attempt - 1))]`.
    pub fn delay(&self, attempt: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.base.saturating_mul(1 << attempt.saturating_sub(1).min(30)).min(self.max_delay);
        ceiling.mul_f64(rng.random::<f64>())
    }
}

/// Settings of a [`crate::Client`]; [`ClientConfig::new`] gives the defaults.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Base URLs of the ingestion services, e.g. `http://10.0.0.5:8080`.
    pub endpoints: Vec<String>,
    /// Events per `POST /v1/events` (the service takes up to 10,000).
    pub batch_size: usize,
    /// Bytes of JSON per batch at most (the service takes up to 4 MiB).
    pub max_batch_bytes: usize,
    /// How long a single event may wait for others to fill its batch.
    pub linger: Duration,
    /// Unresolved events at most; beyond that, [`crate::ClientError::BufferFull`].
    pub max_buffered: usize,
    /// Batches on the wire at most.
    pub max_in_flight: usize,
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub retry: RetryPolicy,
    pub breaker: BreakerConfig,
    /// How often each address's `/readyz` is asked; `None`: never, all count as healthy.
    pub health_interval: Option<Duration>,
    /// Sent as `Authorization: Bearer ...` when set.
    pub auth_token: Option<String>,
    /// Give every event without an `event_id` one (this client's random 64-bit id and a
    /// sequence number), kept across its retries, so that the jobs count it once however often
    /// it is sent. On by default.
    pub assign_event_ids: bool,
}

impl ClientConfig {
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        ClientConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            batch_size: 1000,
            max_batch_bytes: 3 << 20,
            linger: Duration::from_millis(10),
            max_buffered: 100_000,
            max_in_flight: 8,
            connect_timeout: Duration::from_secs(2),
            // Above the ingest service's own request timeout (20 s), which is above its Kafka
            // delivery timeout (15 s), which is above a broker failover: an answer comes first.
            request_timeout: Duration::from_secs(25),
            retry: RetryPolicy::default(),
            breaker: BreakerConfig::default(),
            health_interval: Some(Duration::from_secs(5)),
            auth_token: None,
            assign_event_ids: true,
        }
    }
}
