//! Shared by the integration tests: a fresh topic and database per test on the real Kafka and
//! ClickHouse that `make up` starts, the job binary, and reading counts back.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::Rng;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::Deserialize;
use videocount_clickhouse::{ClickHouse, ClickHouseConfig, schema};
use videocount_loadgen::Expected;

pub const BROKERS: &str = "127.0.0.1:9092";
pub const CLICKHOUSE_URL: &str = "http://127.0.0.1:8123";

/// A background job, killed on drop.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A topic and a database of one test.
pub struct TestEnv {
    pub topic: String,
    pub database: String,
    pub clickhouse: ClickHouse,
    pub runtime: tokio::runtime::Runtime,
}

impl TestEnv {
    pub fn new(name: &str, partitions: i32) -> TestEnv {
        let suffix: u32 = rand::rng().random();
        let topic = format!("test-{name}-{suffix:08x}");
        let database = format!("test_{name}_{suffix:08x}");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let clickhouse = ClickHouse::new(ClickHouseConfig {
            url: CLICKHOUSE_URL.into(),
            database: database.clone(),
            ..ClickHouseConfig::default()
        });
        runtime.block_on(async {
            let admin: AdminClient<DefaultClientContext> =
                ClientConfig::new().set("bootstrap.servers", BROKERS).create().unwrap();
            let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(1));
            for result in admin.create_topics([&new], &AdminOptions::new()).await.unwrap() {
                result.expect("topic created");
            }
            schema::apply(&clickhouse).await.expect("schema applied (is `make up` running?)");
        });
        TestEnv { topic, database, clickhouse, runtime }
    }

    /// The `view_counts` binary with this test's topic and database.
    pub fn job(&self, extra: &[&str]) -> Command {
        self.job_binary(env!("CARGO_BIN_EXE_view_counts"), extra)
    }

    /// The `event_stats` binary with this test's topic and database, and the repository's
    /// functions config.
    pub fn stats_job(&self, extra: &[&str]) -> Command {
        self.stats_job_on(&self.database, extra)
    }

    /// `event_stats` on this test's topic, writing to `database`.
    pub fn stats_job_on(&self, database: &str, extra: &[&str]) -> Command {
        let functions = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/functions.toml");
        let mut command = self.job_binary_on(env!("CARGO_BIN_EXE_event_stats"), database, extra);
        command.args(["--functions", functions]);
        command
    }

    fn job_binary(&self, binary: &str, extra: &[&str]) -> Command {
        self.job_binary_on(binary, &self.database, extra)
    }

    fn job_binary_on(&self, binary: &str, database: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(binary);
        command
            .args(["--brokers", BROKERS, "--topic", &self.topic, "--clickhouse-url", CLICKHOUSE_URL])
            .args(["--database", database])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    /// Runs the job until it is caught up; panics with its stderr if it fails.
    pub fn run_until_caught_up(&self, extra: &[&str]) {
        let output = self.job(&[&["--until-caught-up"], extra].concat()).output().unwrap();
        assert!(output.status.success(), "job failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// Starts the job in the background; it is killed when the guard drops (a failed test
    /// leaves nothing running).
    pub fn spawn(&self, extra: &[&str]) -> Running {
        Running(self.job(extra).stderr(Stdio::null()).spawn().unwrap())
    }

    /// Starts `command` (a job) in the background, killed when the guard drops.
    pub fn spawn_command(mut command: Command) -> Running {
        Running(command.stderr(Stdio::null()).spawn().unwrap())
    }

    /// Runs `command` (a job) until it is caught up; panics with its stderr if it fails.
    pub fn run_command_until_caught_up(mut command: Command) {
        let output = command.arg("--until-caught-up").output().unwrap();
        assert!(output.status.success(), "job failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    /// `videocount` with this test's database: (exit code, stdout, stderr).
    pub fn videocount(&self, args: &[&str]) -> (i32, String, String) {
        let output = Command::new(tool("videocount"))
            .args(["--clickhouse-url", CLICKHOUSE_URL, "--database", &self.database])
            .args(args)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            output.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        )
    }

    pub fn query<T>(&self, sql: &str) -> Vec<T>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.runtime.block_on(self.clickhouse.fetch_all(self.clickhouse.client().query(sql))).unwrap()
    }

    /// (video_id, event_type, bucket) -> sum(count) of a count table; `bucket` is an
    /// expression giving a UInt32.
    pub fn counts(&self, table: &str, bucket: &str) -> BTreeMap<(String, String, u32), u64> {
        #[derive(clickhouse::Row, Deserialize)]
        struct Row {
            video_id: String,
            event_type: String,
            bucket: u32,
            count: u64,
        }
        let rows: Vec<Row> = self.query(&format!(
            "SELECT video_id, event_type, toUInt32({bucket}) AS bucket, sum(count) AS count FROM {table} \
             GROUP BY video_id, event_type, bucket HAVING count > 0"
        ));
        rows.into_iter().map(|r| ((r.video_id, r.event_type, r.bucket), r.count)).collect()
    }

    pub fn scalar(&self, sql: &str) -> u64 {
        #[derive(clickhouse::Row, Deserialize)]
        struct Row {
            n: u64,
        }
        let rows: Vec<Row> = self.query(&format!("SELECT toUInt64(({sql})) AS n"));
        rows[0].n
    }

    pub fn dead_letters_by_reason(&self) -> BTreeMap<String, u64> {
        #[derive(clickhouse::Row, Deserialize)]
        struct Row {
            reason: String,
            n: u64,
        }
        let rows: Vec<Row> = self.query("SELECT reason, count() AS n FROM dead_letters GROUP BY reason");
        rows.into_iter().map(|r| (r.reason, r.n)).collect()
    }

    /// Asserts every count table equals the expectation exactly, and the raw log and dead
    /// letters hold every message once.
    pub fn assert_exact(&self, expected: &Expected) {
        let minutes = self.counts("event_counts_minute", "minute");
        assert_eq!(minutes.len(), expected.minutes.len(), "number of (video, type, minute) keys");
        assert!(minutes == expected.minutes, "minute counts differ from the expectation");
        let hours = self.counts("event_counts_hour", "hour");
        assert!(hours == expected.rollup(|m| m / 3600 * 3600), "hour counts differ from the expectation");
        let days = self.counts("event_counts_day", "toUInt32(day)");
        assert!(days == expected.rollup(|m| m / 86_400), "day counts differ from the expectation");
        assert_eq!(self.scalar("SELECT count() FROM events_raw"), expected.events, "events_raw rows");
        assert_eq!(
            self.scalar("SELECT count() FROM (SELECT partition, offset FROM events_raw GROUP BY partition, offset)"),
            expected.events,
            "events_raw holds each message once"
        );
        assert_eq!(self.dead_letters_by_reason(), expected.dead_letters, "dead letters by reason");
    }

    pub fn drop(self) {
        self.runtime.block_on(schema::drop_database(&self.clickhouse)).ok();
        let topics = [self.topic.clone(), format!("{}-dlq", self.topic)];
        self.runtime.block_on(async {
            let admin: AdminClient<DefaultClientContext> =
                ClientConfig::new().set("bootstrap.servers", BROKERS).create().unwrap();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            admin.delete_topics(&names, &AdminOptions::new()).await.ok();
        });
    }
}

/// Every message payload of a topic (all partitions), read from the start to the high
/// watermarks.
pub fn read_topic(topic: &str) -> Vec<Vec<u8>> {
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
    let mut payloads = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while (payloads.len() as i64) < remaining && std::time::Instant::now() < deadline {
        if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
            payloads.push(message.payload().unwrap_or_default().to_vec());
        }
    }
    payloads
}

/// A binary of another crate of the workspace, built next to this crate's binaries by
/// `cargo test --workspace`.
pub fn tool(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_view_counts")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo test --workspace` (or cargo build -p videocount-cli)",
        path.display()
    );
    path
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

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}
