//! The job's Kafka plumbing besides the source: the topic checks at start, the dead-letter
//! topic and its producer, and the lag monitor. Every client is built by
//! [`KafkaClients::config`], so `--kafka-option` reaches each of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use tracing::{info, warn};
use videocount_clickhouse::checkpoints::JobState;
use videocount_clickhouse::rows::DeadLetterRow;
use videocount_kafka::KafkaClients;
use videocount_operators::kafka_source::{PartitionPosition, SourceProgress};

/// The number of partitions of `topic`, or a clear error if it does not exist.
pub(crate) fn topic_partitions(kafka: &KafkaClients, topic: &str) -> anyhow::Result<u32> {
    let brokers = &kafka.brokers;
    let consumer: BaseConsumer = kafka.config(&[]).create()?;
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(30))
        .with_context(|| format!("cannot reach Kafka at {brokers}"))?;
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        bail!("topic {topic:?} not found on {brokers}");
    };
    if found.error().is_some() || found.partitions().is_empty() {
        bail!("topic {topic:?} does not exist on {brokers} (create it: make topic TOPIC={topic} PARTITIONS=n)");
    }
    Ok(found.partitions().len() as u32)
}

/// The message every check of offsets that went backwards ends with: what happened and what to do.
const OFFSETS_BACKWARDS: &str = "the topic was deleted and recreated, or its offsets were reset. Counting on \
     would treat every new message below the checkpoint as already counted and skip it. To count the topic \
     as it is now, from its start, run the job under a new --job-name (the counts already written stay)";

/// Refuses to start when the checkpoint has read further into a partition than the partition
/// now reaches, or knows partitions the topic no longer has: both mean the offsets went
/// backwards, and every message below the checkpoint would be skipped silently.
pub(crate) fn check_offsets(
    kafka: &KafkaClients,
    topic: &str,
    partitions: u32,
    state: &JobState,
    job: &str,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer = kafka.config(&[]).create()?;
    let mut needed: BTreeMap<u32, u64> = state.resume.iter().map(|(p, o)| (*p, *o)).collect();
    for range in state.pending.values().flatten() {
        let end = needed.entry(range.partition).or_default();
        *end = (*end).max(range.end);
    }
    for (&partition, &offset) in &needed {
        if partition >= partitions {
            bail!(
                "the checkpoint of {job} has read partition {partition} of topic {topic:?}, which now has \
                 {partitions} partitions: {OFFSETS_BACKWARDS}"
            );
        }
        let (_, high) = consumer
            .fetch_watermarks(topic, partition as i32, Duration::from_secs(30))
            .with_context(|| format!("reading the offsets of {topic:?} partition {partition}"))?;
        if offset > high.max(0) as u64 {
            bail!(
                "the checkpoint of {job} has read partition {partition} of topic {topic:?} up to offset {offset}, \
                 but the partition now ends at offset {high}: {OFFSETS_BACKWARDS}"
            );
        }
    }
    Ok(())
}

/// Creates `topic` with `partitions` unless it exists.
pub(crate) async fn ensure_topic(kafka: &KafkaClients, topic: &str, partitions: u32) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = kafka.config(&[]).create()?;
    let new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(1));
    let results = admin.create_topics([&new], &AdminOptions::new()).await?;
    for result in results {
        match result {
            Ok(_) => info!(topic, "created dead-letter topic"),
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => warn!(topic = name, %code, "could not create dead-letter topic"),
        }
    }
    Ok(())
}

pub(crate) fn dead_letter_json(row: &DeadLetterRow) -> String {
    serde_json::json!({
        "job": row.job, "topic": row.topic, "partition": row.partition, "offset": row.offset,
        "reason": row.reason, "detail": row.detail, "payload": row.payload, "message_ts": row.message_ts,
    })
    .to_string()
}

/// Keeps each partition's lag (messages not yet read, and how old the last read message is
/// while more are waiting) up to date every `every`, off the worker threads: a watermark
/// request is a network round trip.
pub(crate) fn spawn_lag_monitor(
    kafka: &KafkaClients,
    topic: &str,
    progress: Arc<SourceProgress>,
    shutdown: Arc<AtomicBool>,
    every: Duration,
) {
    let Ok(consumer) = kafka.config(&[]).create::<BaseConsumer>() else {
        warn!("no lag monitor: cannot create a Kafka client");
        return;
    };
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        while !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            let positions = progress.positions.lock().map(|p| p.clone()).unwrap_or_default();
            let mut lags = Vec::with_capacity(positions.len());
            for (partition, position) in positions {
                if let Ok((_, high)) = consumer.fetch_watermarks(&topic, partition as i32, Duration::from_secs(2)) {
                    let now_ms = videocount_events::clock::now_ms() as i64;
                    let (messages, seconds) = partition_lag(&position, high, now_ms);
                    lags.push((partition, messages, seconds));
                }
            }
            if let Ok(mut positions) = progress.positions.lock() {
                for (partition, messages, seconds) in lags {
                    if let Some(position) = positions.get_mut(&partition) {
                        position.lag_messages = messages;
                        position.lag_seconds = seconds;
                    }
                }
            }
        }
    });
}

/// A partition's lag: the messages from `position.next` up to the high watermark `high`, and,
/// while any are waiting, the age at `now_ms` of the last message read (0 when caught up or
/// before the first message: the age of the next one is not known without reading it).
pub fn partition_lag(position: &PartitionPosition, high: i64, now_ms: i64) -> (u64, f64) {
    let messages = (high.max(0) as u64).saturating_sub(position.next);
    let seconds = if messages == 0 || position.last_message_ms <= 0 {
        0.0
    } else {
        (now_ms - position.last_message_ms).max(0) as f64 / 1000.0
    };
    (messages, seconds)
}

/// The producer of the dead-letter topic: defaults a user may change, the user's options, then
/// what the job relies on.
pub(crate) fn dead_letter_producer_config(kafka: &KafkaClients) -> ClientConfig {
    let mut config = kafka.config(&[("linger.ms", "20")]);
    // The dead_letters table is the record; the topic must still not hold a letter twice.
    config.set("enable.idempotence", "true");
    config
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_users_options_reach_every_client_of_the_job() {
        use clap::Parser;
        use videocount_operators::kafka_source::consumer_config;
        let args = crate::JobArgs::parse_from([
            "view_counts",
            "--brokers",
            "k1:9092,k2:9092",
            "--kafka-option",
            "security.protocol=ssl",
            "--kafka-option",
            "enable.idempotence=false",
            "--kafka-option",
            "enable.auto.commit=true",
            "--kafka-option",
            "auto.offset.reset=earliest",
        ]);
        let kafka = args.kafka();
        let clients = [
            ("consumer", consumer_config(&kafka, "view_counts", 0)),
            ("metadata, admin and lag monitor", kafka.config(&[])),
            ("dead-letter producer", dead_letter_producer_config(&kafka)),
        ];
        for (what, config) in clients {
            assert_eq!(config.get("security.protocol"), Some("ssl"), "{what}");
            assert_eq!(config.get("bootstrap.servers"), Some("k1:9092,k2:9092"), "{what}");
        }
        // What correctness depends on is not the user's to switch off.
        assert_eq!(consumer_config(&kafka, "view_counts", 0).get("enable.auto.commit"), Some("false"));
        assert_eq!(consumer_config(&kafka, "view_counts", 0).get("auto.offset.reset"), Some("error"));
        assert_eq!(dead_letter_producer_config(&kafka).get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn lag_counts_waiting_messages_and_the_age_of_the_last_read() {
        let at = |next, last_message_ms| PartitionPosition { next, last_message_ms, ..PartitionPosition::default() };
        // 40 messages waiting; the last one read was written 7.5 s before now.
        assert_eq!(partition_lag(&at(60, 92_500), 100, 100_000), (40, 7.5));
        // Caught up: no lag in time either, however old the last message is.
        assert_eq!(partition_lag(&at(100, 1_000), 100, 100_000), (0, 0.0));
        // Nothing read yet: the messages are known, their age is not.
        assert_eq!(partition_lag(&at(0, 0), 5, 100_000), (5, 0.0));
        // A clock behind the broker's timestamps gives 0, not a negative lag.
        assert_eq!(partition_lag(&at(1, 200_000), 2, 100_000), (1, 0.0));
    }
}
