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

/// A running `ingest` service on a free loopback port, killed on drop.
pub struct Ingest {
    pub url: String,
    pub process: Running,
}

impl Ingest {
    /// Whether `GET /readyz` answers 200.
    pub fn ready(&self) -> bool {
        Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", "--max-time", "3", &format!("{}/readyz", self.url)])
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

/// A running `query` service on a free loopback port, killed on drop.
pub struct QueryService {
    pub url: String,
    pub process: Running,
    http: reqwest::Client,
}

/// An answer of the query service: status, `Retry-After`, JSON body.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: serde_json::Value,
}

impl QueryService {
    /// `GET path` (with its query string), parsed as JSON.
    pub fn get(&self, runtime: &tokio::runtime::Runtime, path: &str) -> Answer {
        runtime.block_on(async {
            let response = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_owned());
            let text = response.text().await.unwrap();
            let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            Answer { status, retry_after, body }
        })
    }

    /// `GET path`, which must answer 200; its JSON.
    pub fn ok(&self, runtime: &tokio::runtime::Runtime, path: &str) -> serde_json::Value {
        let answer = self.get(runtime, path);
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
        answer.body
    }
}

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
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

    /// `view_counts` with this test's topic and database, reaching ClickHouse at `url` (a proxy).
    pub fn job_via(&self, url: &str, extra: &[&str]) -> Command {
        self.job_binary_at(env!("CARGO_BIN_EXE_view_counts"), &self.database, url, extra)
    }

    fn job_binary_on(&self, binary: &str, database: &str, extra: &[&str]) -> Command {
        self.job_binary_at(binary, database, CLICKHOUSE_URL, extra)
    }

    fn job_binary_at(&self, binary: &str, database: &str, url: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(binary);
        command
            .args(["--brokers", BROKERS, "--topic", &self.topic, "--clickhouse-url", url])
            .args(["--database", database])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null());
        command
    }

    /// `ingest` writing to this test's topic, once it is ready.
    pub fn ingest(&self, extra: &[&str]) -> Ingest {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(tool("ingest"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--brokers", BROKERS, "--topic", &self.topic])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let ingest = Ingest { url, process: Running(child) };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !ingest.ready() {
            assert!(std::time::Instant::now() < deadline, "ingest did not become ready");
            sleep_ms(100);
        }
        ingest
    }

    /// `query` reading this test's database and serving the built UI, once it answers.
    pub fn query_service(&self, extra: &[&str]) -> QueryService {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let ui = concat!(env!("CARGO_MANIFEST_DIR"), "/../ui/dist");
        let child = Command::new(tool("query"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--clickhouse-url", CLICKHOUSE_URL])
            .args(["--database", &self.database, "--ui-dir", ui])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let service = QueryService {
            url,
            process: Running(child),
            http: reqwest::Client::builder().timeout(Duration::from_secs(30)).build().unwrap(),
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !Command::new("curl")
            .args(["-fsS", "-o", "/dev/null", "--max-time", "3", &format!("{}/healthz", service.url)])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(std::time::Instant::now() < deadline, "query did not start");
            sleep_ms(100);
        }
        service
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

/// A shared service (ClickHouse, Kafka) that a test stops and starts again as it ran: its pid,
/// command line and working directory are taken from the running process, so the restart uses
/// the same data whichever checkout's `make up` started it.
pub struct Server {
    pub pid: String,
    command: Vec<String>,
    cwd: std::path::PathBuf,
    /// Where `make down` looks for the pid.
    pid_file: std::path::PathBuf,
    name: &'static str,
}

impl Server {
    fn find(name: &'static str, pattern: &str, pid_file: impl Fn(&[String]) -> std::path::PathBuf) -> Server {
        let output = Command::new("pgrep").args(["-f", pattern]).output().unwrap();
        let pid = String::from_utf8_lossy(&output.stdout).lines().next().expect("a running server").to_owned();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
        let command: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap();
        let pid_file = pid_file(&command);
        Server { pid, command, cwd, pid_file, name }
    }

    pub fn clickhouse() -> Server {
        Server::find("clickhouse", "clickhouse-server --config-file=", |command| {
            let config = command.iter().find_map(|a| a.strip_prefix("--config-file=")).unwrap();
            std::path::PathBuf::from(config).with_file_name("pid")
        })
    }

    /// The broker: `java ... kafka.Kafka .../server.properties`.
    pub fn kafka() -> Server {
        Server::find("kafka", "kafka\\.Kafka ", |command| {
            std::path::PathBuf::from(command.last().unwrap()).with_file_name("pid")
        })
    }

    /// SIGTERM, as an operator would stop it, and waits until the process is gone.
    pub fn stop(&self) {
        assert!(Command::new("kill").arg(&self.pid).status().unwrap().success());
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::path::Path::new(&format!("/proc/{}", self.pid)).exists() {
            assert!(std::time::Instant::now() < deadline, "{} did not stop", self.name);
            sleep_ms(200);
        }
    }

    /// Starts the server again as it ran. It outlives the test on purpose: it is the shared
    /// service, not a test fixture.
    #[allow(clippy::zombie_processes)]
    pub fn restart(&self) {
        let log_path = std::env::temp_dir().join(format!("videocount-test-{}.log", self.name));
        let log = std::fs::File::create(log_path).unwrap();
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .current_dir(&self.cwd)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        std::fs::write(&self.pid_file, child.id().to_string()).unwrap();
    }
}
