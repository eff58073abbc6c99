//! Writing accepted events to Kafka: one idempotent producer per service, a circuit breaker in
//! front of it, and an answer per event only once Kafka has acknowledged it or failed it.

use std::time::Duration;

use compact_str::CompactString;
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use tracing::warn;
use videocount_client::{BreakerConfig, BreakerState, CircuitBreaker};
use videocount_kafka::KafkaClients;

/// One event ready for the topic: keyed by its video, in the canonical JSON of the event format.
#[derive(Clone, Debug)]
pub struct Outgoing {
    pub key: CompactString,
    pub payload: Vec<u8>,
    /// The Kafka timestamp: the time the service accepted it. The jobs check `ts` against it
    /// exactly as the service did, so an accepted event is never a dead letter downstream.
    pub timestamp_ms: i64,
}

/// Why events could not be written.
#[derive(Clone, Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Kafka is failing; not trying again for {retry_after:?} (circuit open)")]
    CircuitOpen { retry_after: Duration },
    #[error("Kafka did not take {} of the events: {message}", failed.len())]
    Kafka { failed: Vec<usize>, message: String, retry_after: Duration },
}

impl PublishError {
    pub fn retry_after(&self) -> Duration {
        match self {
            PublishError::CircuitOpen { retry_after } | PublishError::Kafka { retry_after, .. } => *retry_after,
        }
    }
}

/// Settings of the producer side.
#[derive(Clone, Debug)]
pub struct PublisherConfig {
    /// The brokers and the raw librdkafka settings (`-X key=value`), applied before the ones
    /// the service relies on.
    pub kafka: KafkaClients,
    pub topic: String,
    /// Kafka must acknowledge an event within this long (librdkafka's `message.timeout.ms`);
    /// after it the event is answered as failed. Requests never wait longer than this.
    pub delivery_timeout: Duration,
    /// Messages the producer queue holds at most; beyond, requests get 503 at once.
    pub queue_capacity: usize,
    pub breaker: BreakerConfig,
}

/// The producer's configuration: throughput defaults a user may change (a short linger fills
/// batches without making single-event requests wait noticeably), the user's `-X` options,
/// then what the service relies on.
pub fn producer_config(config: &PublisherConfig) -> ClientConfig {
    // Metadata every 10 s (librdkafka's default: 5 min): partitions added to the topic are used
    // by every instance within seconds, so an event and its retry through another instance land
    // in the same partition (the jobs' event-id window is per partition) except in those seconds.
    let mut kafka = config.kafka.config(&[
        ("linger.ms", "5"),
        ("batch.size", "1000000"),
        ("compression.type", "lz4"),
        ("topic.metadata.refresh.interval.ms", "10000"),
    ]);
    // No loss, no duplicates from librdkafka's own retries, no reordering within a video.
    kafka.set("enable.idempotence", "true").set("acks", "all");
    // Every delivery report arrives within the request's deadline: a request never returns
    // while its events could still be written later.
    kafka.set("message.timeout.ms", config.delivery_timeout.as_millis().to_string());
    kafka.set("queue.buffering.max.messages", config.queue_capacity.to_string());
    // The Java clients' partitioner: producers in any language agree on a video's partition.
    kafka.set("partitioner", "murmur2_random");
    kafka
}

pub struct Publisher {
    producer: FutureProducer,
    config: PublisherConfig,
    breaker: CircuitBreaker,
    /// The last readiness answer and when it was found: health checks of many clients cost
    /// the brokers one metadata request per second, and concurrent checks share one.
    readiness: tokio::sync::Mutex<Option<(tokio::time::Instant, Result<(), String>)>>,
}

impl Publisher {
    pub fn new(config: PublisherConfig) -> Result<Self, KafkaError> {
        let producer = producer_config(&config).create()?;
        let breaker = CircuitBreaker::new(config.breaker);
        Ok(Publisher { producer, config, breaker, readiness: tokio::sync::Mutex::new(None) })
    }

    pub fn topic(&self) -> &str {
        &self.config.topic
    }

    /// Writes `events` and waits for Kafka's answer on each. `Ok` means every one was
    /// acknowledged; [`PublishError::Kafka`] lists the indexes that were not (the others were).
    pub async fn publish(&self, events: &[Outgoing]) -> Result<(), PublishError> {
        self.breaker.try_acquire().map_err(|retry_after| PublishError::CircuitOpen { retry_after })?;
        let mut deliveries = Vec::with_capacity(events.len());
        let mut failed = Vec::new();
        let mut message = String::new();
        for (index, event) in events.iter().enumerate() {
            let record = FutureRecord::to(&self.config.topic)
                .key(event.key.as_str())
                .payload(&event.payload)
                .timestamp(event.timestamp_ms);
            match self.producer.send_result(record) {
                Ok(delivery) => deliveries.push((index, delivery)),
                Err((error, _)) => {
                    if matches!(error, KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) {
                        message = format!("the producer queue is full ({} messages)", self.config.queue_capacity);
                    } else {
                        message = error.to_string();
                    }
                    failed.push(index);
                }
            }
        }
        for (index, delivery) in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => {
                    message = error.to_string();
                    failed.push(index);
                }
                Err(_canceled) => {
                    message = "the producer shut down".into();
                    failed.push(index);
                }
            }
        }
        if failed.is_empty() {
            self.breaker.on_success();
            return Ok(());
        }
        failed.sort_unstable();
        self.breaker.on_failure();
        warn!(failed = failed.len(), of = events.len(), error = %message, "Kafka did not take events");
        Err(PublishError::Kafka { failed, message, retry_after: self.config.breaker.open_for })
    }

    /// [`ready`](Self::ready), answered from the last check when it is younger than a second.
    pub async fn ready_cached(&self, timeout: Duration) -> Result<(), String> {
        let mut last = self.readiness.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < Duration::from_secs(1)
        {
            return answer.clone();
        }
        let answer = self.ready(timeout).await;
        *last = Some((tokio::time::Instant::now(), answer.clone()));
        answer
    }

    /// Whether the topic's partitions have leaders, asked of the brokers within `timeout`.
    pub async fn ready(&self, timeout: Duration) -> Result<(), String> {
        let client = self.producer.clone();
        let topic = self.config.topic.clone();
        tokio::task::spawn_blocking(move || {
            let metadata =
                client.client().fetch_metadata(Some(&topic), timeout).map_err(|e| format!("Kafka metadata: {e}"))?;
            let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
                return Err(format!("topic {topic} not in the metadata"));
            };
            if let Some(error) = found.error() {
                return Err(format!("topic {topic}: {:?}", RDKafkaErrorCode::from(error)));
            }
            if found.partitions().is_empty() || found.partitions().iter().any(|p| p.leader() < 0) {
                return Err(format!("topic {topic} has partitions without a leader"));
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("readiness check failed: {e}"))?
    }

    /// Messages waiting in the producer or for an acknowledgement.
    pub fn queued(&self) -> i64 {
        i64::from(self.producer.in_flight_count())
    }

    pub fn queue_capacity(&self) -> usize {
        self.config.queue_capacity
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }

    /// Waits for everything queued to be acknowledged (at shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }
}
