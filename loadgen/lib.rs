//! Generated traffic with a known answer: events spread Zipf-like over videos, several event
//! types, viewer ids and watch-time values, some late (hours to days old), some malformed or
//! out of the time window, and the counts a correct job must produce.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use serde::{Deserialize, Serialize};

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    pub videos: u64,
    pub seed: u64,
    /// Fraction of events whose time lies 1 hour to 6 days in the past.
    pub late_fraction: f64,
    /// Fraction of messages that are dead letters (malformed or outside the time window).
    pub malformed_fraction: f64,
    /// Fraction of valid events sent twice (two messages, counted twice).
    pub duplicate_fraction: f64,
    /// Give every valid event a distinct `event_id` (what the client library does): the jobs
    /// then keep their dedup windows. Duplicates would be counted once: use none with it.
    pub event_ids: bool,
    /// The skew over videos: video of rank k drawn with weight 1/k^s (0: every video alike).
    pub zipf_exponent: f64,
}

impl Default for Spec {
    fn default() -> Self {
        Spec {
            videos: 1000,
            seed: 1,
            late_fraction: 0.05,
            malformed_fraction: 0.01,
            duplicate_fraction: 0.01,
            event_ids: false,
            zipf_exponent: 1.1,
        }
    }
}

/// The answer a correct job gives for the traffic produced.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expected {
    /// Valid events produced.
    pub events: u64,
    /// (video_id, event_type, minute start in seconds) -> count.
    pub minutes: BTreeMap<(String, String, u32), u64>,
    /// Dead letters by reason.
    pub dead_letters: BTreeMap<String, u64>,
}

impl Expected {
    pub fn merge(&mut self, other: Expected) {
        self.events += other.events;
        for (k, v) in other.minutes {
            *self.minutes.entry(k).or_insert(0) += v;
        }
        for (k, v) in other.dead_letters {
            *self.dead_letters.entry(k).or_insert(0) += v;
        }
    }

    /// Rolls the minute counts up with `bucket` (seconds -> bucket).
    pub fn rollup(&self, bucket: impl Fn(u32) -> u32) -> BTreeMap<(String, String, u32), u64> {
        let mut out = BTreeMap::new();
        for ((v, t, m), n) in &self.minutes {
            *out.entry((v.clone(), t.clone(), bucket(*m))).or_insert(0) += n;
        }
        out
    }
}

const EVENT_TYPES: [(&str, u32); 5] = [("view", 80), ("like", 8), ("share", 3), ("comment", 4), ("watch_time", 5)];

/// One generated message: key, payload and the reason it is a dead letter, if it is one.
pub struct Message {
    pub key: String,
    pub payload: Vec<u8>,
    pub dead: Option<&'static str>,
    pub event: Option<(String, String, u64)>,
}

/// A deterministic stream of messages.
pub struct Generator {
    spec: Spec,
    rng: StdRng,
    zipf: Zipf<f64>,
    now_ms: u64,
    /// The number of the next event id.
    next_id: u64,
}

impl Generator {
    pub fn new(spec: Spec) -> Self {
        let zipf = Zipf::new(spec.videos.max(1) as f64, spec.zipf_exponent.max(0.0)).expect("valid zipf");
        Generator {
            rng: StdRng::seed_from_u64(spec.seed),
            spec,
            zipf,
            now_ms: videocount_events::clock::now_ms(),
            next_id: 0,
        }
    }

    fn video(&mut self) -> String {
        let rank = self.zipf.sample(&mut self.rng) as u64;
        format!("vid{rank:06}")
    }

    fn event_type(&mut self) -> &'static str {
        let mut pick = self.rng.random_range(0..100);
        for (name, weight) in EVENT_TYPES {
            if pick < weight {
                return name;
            }
            pick -= weight;
        }
        "view"
    }

    /// The next message.
    pub fn next_message(&mut self) -> Message {
        let video = self.video();
        if self.rng.random_bool(self.spec.malformed_fraction) {
            let (payload, reason) = match self.rng.random_range(0..7) {
                0 => (b"{\"video_id\":".to_vec(), "invalid json"),
                1 => (Vec::new(), "empty payload"),
                2 => (br#"{"video_id":"bad id!","event_type":"view"}"#.to_vec(), "invalid video_id"),
                3 => (format!(r#"{{"video_id":"{video}","event_type":"View"}}"#).into_bytes(), "invalid event_type"),
                4 => (format!(r#"{{"video_id":"{video}","ts":"yesterday"}}"#).into_bytes(), "invalid ts"),
                5 => (
                    format!(r#"{{"video_id":"{video}","ts":{}}}"#, self.now_ms - 8 * 86_400_000).into_bytes(),
                    "ts too old",
                ),
                _ => (
                    format!(r#"{{"video_id":"{video}","ts":{}}}"#, self.now_ms + 3_600_000).into_bytes(),
                    "ts too far in future",
                ),
            };
            return Message { key: video, payload, dead: Some(reason), event: None };
        }
        let kind = self.event_type();
        let ts = if self.rng.random_bool(self.spec.late_fraction) {
            self.now_ms - self.rng.random_range(3_600_000..6 * 86_400_000)
        } else {
            self.now_ms - self.rng.random_range(0..3_600_000)
        };
        // What event_stats reads: a viewer on most events, a value on every watch_time (seconds
        // watched, most short, a few long).
        let viewer = if self.rng.random_bool(0.8) {
            format!(r#","viewer_id":"u{}""#, self.rng.random_range(0..self.spec.videos.max(1) * 20))
        } else {
            String::new()
        };
        let viewer = if self.spec.event_ids {
            self.next_id += 1;
            format!(r#"{viewer},"event_id":"g{:x}-{:x}""#, self.spec.seed, self.next_id)
        } else {
            viewer
        };
        let payload = if kind == "view" && self.rng.random_bool(0.3) {
            format!(r#"{{"video_id":"{video}","ts":{ts},"client":"web"{viewer}}}"#)
        } else if kind == "watch_time" {
            let seconds = (self.rng.random::<f64>().powi(3) * 36_000.0).round() / 10.0;
            format!(r#"{{"video_id":"{video}","event_type":"{kind}","ts":{ts},"value":{seconds}{viewer}}}"#)
        } else {
            format!(r#"{{"video_id":"{video}","event_type":"{kind}","ts":{ts}{viewer}}}"#)
        };
        Message { key: video.clone(), payload: payload.into_bytes(), dead: None, event: Some((video, kind.into(), ts)) }
    }

    pub fn duplicate(&mut self) -> bool {
        self.rng.random_bool(self.spec.duplicate_fraction)
    }
}

fn record(expected: &mut Expected, message: &Message) {
    match (&message.event, message.dead) {
        (Some((v, t, ts)), _) => {
            expected.events += 1;
            *expected.minutes.entry((v.clone(), t.clone(), videocount_events::minute_start(*ts))).or_insert(0) += 1;
        }
        (None, Some(reason)) => *expected.dead_letters.entry(reason.into()).or_insert(0) += 1,
        (None, None) => {}
    }
}

/// How much to produce: a count as fast as possible, or a rate for a while.
#[derive(Clone, Copy, Debug)]
pub enum Amount {
    Count(u64),
    Rate { per_second: u64, duration: Duration },
}

/// A producer with the settings for no loss and good batching.
pub fn producer(brokers: &str) -> anyhow::Result<ThreadedProducer<DefaultProducerContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "10")
        .set("batch.size", "1000000")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "1000000")
        .create()?)
}

/// Produces to `topic` and returns what a correct job must count. Waits until Kafka
/// acknowledged everything.
pub fn produce(brokers: &str, topic: &str, spec: Spec, amount: Amount) -> anyhow::Result<Expected> {
    let producer = producer(brokers)?;
    let mut generator = Generator::new(spec);
    let mut expected = Expected::default();
    let started = Instant::now();
    let mut sent: u64 = 0;
    let send = |message: &Message| -> anyhow::Result<()> {
        loop {
            match producer.send(BaseRecord::to(topic).key(&message.key).payload(&message.payload)) {
                Ok(()) => return Ok(()),
                Err((
                    rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull),
                    _,
                )) => {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
    };
    loop {
        match amount {
            Amount::Count(n) if sent >= n => break,
            Amount::Rate { duration, .. } if started.elapsed() >= duration => break,
            Amount::Rate { per_second, .. } => {
                let due = (started.elapsed().as_secs_f64() * per_second as f64) as u64;
                if sent >= due {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
            }
            Amount::Count(_) => {}
        }
        let message = generator.next_message();
        send(&message)?;
        record(&mut expected, &message);
        sent += 1;
        if message.event.is_some() && generator.duplicate() {
            send(&message)?;
            record(&mut expected, &message);
            sent += 1;
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(expected)
}
