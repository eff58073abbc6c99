//! Reading a test's topics back and producing to them.

use std::time::Duration;

use rdkafka::ClientConfig;

use crate::BROKERS;

/// Every message payload of a topic (all partitions), read from the start to the high
/// watermarks.
pub fn read_topic(topic: &str) -> Vec<Vec<u8>> {
    read_messages(topic).into_iter().map(|m| m.payload).collect()
}

/// One message as read back from a topic.
#[derive(Clone, Debug)]
pub struct ReadMessage {
    pub partition: i32,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub timestamp_ms: Option<i64>,
}

/// Every message of a topic (all partitions), read from the start to the high watermarks.
pub fn read_messages(topic: &str) -> Vec<ReadMessage> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Message, Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", BROKERS)
        .set("group.id", "videocount-tests")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10)).unwrap();
    let partitions = metadata.topics()[0].partitions().len() as i32;
    let mut assignment = TopicPartitionList::new();
    let mut remaining = 0;
    for p in 0..partitions {
        let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(10)).unwrap();
        remaining += high;
        assignment.add_partition_offset(topic, p, Offset::Beginning).unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let mut messages = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (messages.len() as i64) < remaining && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            messages.push(ReadMessage {
                partition: message.partition(),
                key: message.key().map(<[u8]>::to_vec),
                payload: message.payload().unwrap_or_default().to_vec(),
                timestamp_ms: message.timestamp().to_millis(),
            });
        }
    }
    messages
}

/// Produces `(key, payload)` messages and waits until Kafka acknowledged all of them.
pub fn produce_keyed(topic: &str, messages: &[(String, String)]) {
    use rdkafka::producer::{BaseRecord, Producer};
    let producer = videocount_loadgen::producer(BROKERS).unwrap();
    for (key, payload) in messages {
        let mut record = BaseRecord::to(topic).key(key.as_str()).payload(payload.as_str());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}
