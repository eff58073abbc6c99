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
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaResult;
use rdkafka::{Offset, TopicPartitionList};
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
     as it is now, from its start, run the job under a new --job-name (the counts already written stay), never \
     start it under the old name again (the new topic would be counted twice once it grows past the old \
     offsets), and give query services the new name (--job-name or --stats-job-name)";

/// Refuses to start when retention deleted offsets the checkpoint still needs (an interrupted
/// epoch's range, or offsets never read), or when the checkpoint has read further into a
/// partition than the partition now reaches, or knows partitions the topic no longer has: both mean the offsets went
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
        let (low, high) = consumer
            .fetch_watermarks(topic, partition as i32, Duration::from_secs(30))
            .with_context(|| format!("reading the offsets of {topic:?} partition {partition}"))?;
        if offset > high.max(0) as u64 {
            bail!(
                "the checkpoint of {job} has read partition {partition} of topic {topic:?} up to offset {offset}, \
                 but the partition now ends at offset {high}: {OFFSETS_BACKWARDS}"
            );
        }
        check_retention(state, partition, low.max(0) as u64, topic, job)?;
    }
    Ok(())
}

/// What the message about retention that overtook the job ends with.
const RETENTION_ADVICE: &str = "Those messages are gone, so no run can count them exactly. Give the topic a \
     retention well above the longest stop or stall of the job (alert on videocount_job_retention_headroom_messages); \
     to count what the topic still holds, run the job under a new --job-name into a new --database";

/// Refuses to start when Kafka retention deleted offsets of `partition` (its log now starts at
/// `log_start`) that the checkpoint needs: the range of an interrupted epoch (re-run over what
/// is left, it would write other blocks and what had landed would count twice) or offsets the
/// job never read (resuming would skip them silently).
fn check_retention(state: &JobState, partition: u32, log_start: u64, topic: &str, job: &str) -> anyhow::Result<()> {
    let truncated: Vec<u64> = state
        .pending
        .iter()
        .filter(|(_, ranges)| ranges.iter().any(|r| r.partition == partition && r.start < log_start && r.end > r.start))
        .map(|(epoch, _)| *epoch)
        .collect();
    if let Some(first) = truncated.first() {
        let start =
            state.pending[first].iter().filter(|r| r.partition == partition).map(|r| r.start).min().unwrap_or(0);
        bail!(
            "retention deleted offsets {start}..{log_start} of partition {partition} of topic {topic:?}, which \
             epochs {truncated:?} of {job} (interrupted by its last stop) need: re-run over what is left they would \
             write other blocks, and what of them had landed would count twice. {RETENTION_ADVICE}"
        );
    }
    let pending_here = state.pending.values().flatten().any(|r| r.partition == partition);
    if let Some(&resume) = state.resume.get(&partition)
        && resume < log_start
        && !pending_here
    {
        bail!(
            "retention deleted offsets {resume}..{log_start} of partition {partition} of topic {topic:?} before {job} \
             read them: {} messages were never counted, and starting would skip them silently. {RETENTION_ADVICE}",
            log_start - resume
        );
    }
    Ok(())
}

/// How far in the future the newest message's CreateTime may lie before the start-up check
/// warns about the producers' clocks.
const CLOCK_AHEAD_WARN_MS: i64 = 60_000;

/// Refuses a compacted topic, and says at start which clock gives events without `ts` their time: with the topic's
/// `message.timestamp.type=CreateTime` it is the producer's, and a newest message stamped more
/// than a minute in the future means a producer's clock is ahead (its events land in later
/// buckets; the age limits are measured from the message's timestamp and cannot catch it).
/// Warns, never stops: the job counts what the messages say.
pub(crate) async fn check_topic_config(kafka: &KafkaClients, topic: &str, partitions: u32) -> anyhow::Result<()> {
    use rdkafka::admin::ResourceSpecifier;
    let admin: AdminClient<DefaultClientContext> = kafka.config(&[]).create()?;
    let described = admin.describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new()).await;
    let resource = described.ok().and_then(|results| results.into_iter().next()).and_then(Result::ok);
    let config = |name: &str| resource.as_ref().and_then(|r| r.get(name)).and_then(|e| e.value.clone());
    if let Some(policy) = config("cleanup.policy").filter(|policy| policy.contains("compact")) {
        bail!(
            "topic {topic:?} has cleanup.policy={policy}: compaction removes messages inside offset ranges the job \
             may have to re-run after a crash (they would write other blocks and count twice), and drops events \
             that share a key. Count a topic with cleanup.policy=delete"
        );
    }
    let Some(kind) = config("message.timestamp.type") else {
        warn!(topic, "could not read the topic's message.timestamp.type");
        return Ok(());
    };
    if kind != "CreateTime" {
        info!(topic, timestamps = %kind, "events without ts take the broker's append time");
        return Ok(());
    }
    // The newest message of every partition at once, for at most 5 s in all; this client
    // never commits (the group id is only required by librdkafka).
    let consumer: BaseConsumer = kafka
        .config(&[])
        .set("group.id", "videocount-clock-check")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .create()?;
    let mut newest = TopicPartitionList::new();
    for partition in 0..partitions as i32 {
        if let Ok((low, high)) = consumer.fetch_watermarks(topic, partition, Duration::from_secs(5))
            && high > low
        {
            newest.add_partition_offset(topic, partition, Offset::Offset(high - 1))?;
        }
    }
    let mut waiting = newest.count();
    consumer.assign(&newest)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while waiting > 0 && std::time::Instant::now() < deadline {
        let Some(Ok(message)) = consumer.poll(Duration::from_millis(200)) else { continue };
        use rdkafka::Message;
        waiting -= 1;
        let partition = message.partition();
        let ahead = message.timestamp().to_millis().map_or(0, |ts| ts - videocount_events::clock::now_ms() as i64);
        if ahead > CLOCK_AHEAD_WARN_MS {
            warn!(
                topic,
                partition,
                seconds_ahead = ahead / 1000,
                "the newest message of partition {partition} has a CreateTime {} s in the future: a producer's \
                 clock is ahead. Events without ts take that time and are counted in later buckets (the \
                 --max-age-secs/--max-ahead-secs limits are measured from it, so they cannot catch this). Fix \
                 the producers' clocks or set message.timestamp.type=LogAppendTime on the topic",
                ahead / 1000
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
/// A client of the job's consumer group `videocount-{job}`, for committing offsets to it.
pub(crate) fn group_client(kafka: &KafkaClients, job: &str) -> KafkaResult<BaseConsumer> {
    let mut config = kafka.config(&[]);
    config.set("group.id", format!("videocount-{job}")).set("enable.auto.commit", "false");
    config.create()
}

/// Commits the checkpoint's committed offsets to the job's consumer group, so the lag tools
/// operators already use (kafka-consumer-groups, Burrow, exporters) see the job. For
/// monitoring only: the checkpoint in ClickHouse stays the truth and nothing reads these back.
/// The source assigns its partitions by hand and never joins the group, so these commits are
/// the group's only ones.
pub(crate) fn commit_group_offsets(
    consumer: &BaseConsumer,
    topic: &str,
    offsets: &BTreeMap<u32, u64>,
    mode: CommitMode,
) -> KafkaResult<()> {
    let mut list = TopicPartitionList::new();
    for (&partition, &offset) in offsets {
        list.add_partition_offset(topic, partition as i32, Offset::Offset(offset as i64))?;
    }
    if list.count() == 0 {
        return Ok(());
    }
    consumer.commit(&list, mode)
}

/// Every `every`: the topic's partition count, each partition's lag and retention headroom
/// into `progress`, and (where the checkpoint's commits are seen) the committed offsets into the
/// job's consumer group.
pub(crate) fn spawn_lag_monitor(
    kafka: &KafkaClients,
    topic: &str,
    job: &str,
    progress: Arc<SourceProgress>,
    shutdown: Arc<AtomicBool>,
    every: Duration,
) {
    let Ok(consumer) = group_client(kafka, job) else {
        warn!("no lag monitor: cannot create a Kafka client");
        return;
    };
    let topic = topic.to_owned();
    std::thread::spawn(move || {
        let mut warned = std::collections::BTreeSet::new();
        let mut group_committed = BTreeMap::new();
        while !shutdown.load(Ordering::Relaxed) {
            std::thread::sleep(every);
            // Partitions added to the topic: the source reads them from its next epoch.
            if let Ok(metadata) = consumer.fetch_metadata(Some(&topic), Duration::from_secs(2))
                && let Some(found) = metadata.topics().iter().find(|t| t.name() == topic)
                && found.error().is_none()
            {
                let count = found.partitions().len() as u32;
                if progress.partitions.fetch_max(count, Ordering::Relaxed) < count {
                    info!(topic, partitions = count, "the topic has new partitions");
                }
            }
            let positions = progress.positions.lock().map(|p| p.clone()).unwrap_or_default();
            let needed = progress.needed.lock().ok().and_then(|n| n.clone());
            if let Some(needed) = &needed
                && needed.committed() != &group_committed
            {
                match commit_group_offsets(&consumer, &topic, needed.committed(), CommitMode::Async) {
                    Ok(()) => group_committed = needed.committed().clone(),
                    Err(e) => warn!(error = %e, "could not commit offsets to the consumer group (monitoring only)"),
                }
            }
            let mut looks = Vec::with_capacity(positions.len());
            for (partition, position) in positions {
                if let Ok((low, high)) = consumer.fetch_watermarks(&topic, partition as i32, Duration::from_secs(2)) {
                    let now_ms = videocount_events::clock::now_ms() as i64;
                    let (messages, seconds) = partition_lag(&position, high, now_ms);
                    // Nothing read or planned yet: a restart starts at the log start, nothing to lose.
                    let oldest = needed.as_ref().and_then(|n| n.oldest(partition));
                    let headroom = oldest.map(|oldest| oldest as i64 - low.max(0));
                    if headroom.is_some_and(|h| h < 0) {
                        if warned.insert(partition) {
                            warn!(
                                partition, log_start = low, oldest_needed = ?oldest,
                                "retention deleted messages of partition {partition} that the job has not committed: \
                                 a restart now cannot finish its open epochs exactly and will refuse to start"
                            );
                        }
                    } else {
                        warned.remove(&partition);
                    }
                    looks.push((partition, messages, seconds, headroom));
                }
            }
            if let Ok(mut positions) = progress.positions.lock() {
                for (partition, messages, seconds, headroom) in looks {
                    if let Some(position) = positions.get_mut(&partition) {
                        position.lag_messages = messages;
                        position.lag_seconds = seconds;
                        position.retention_headroom = headroom;
                    }
                }
            }
        }
    });
}

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
