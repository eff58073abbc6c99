//! One test's fresh topic and database, and the commands that run the binaries on them.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use rand::Rng;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use serde::Deserialize;
use videocount_clickhouse::{ClickHouse, ClickHouseConfig, schema};
use videocount_loadgen::Expected;

use crate::{
    BROKERS, CLICKHOUSE_URL, HA_BROKERS, HA_CLICKHOUSE_URLS, HA_ZOOKEEPER, Ingest, QueryService, Running, ZOOKEEPER,
    answers_ok, free_port, repo_path, tool, wait_until,
};

/// A topic and a database of one test.
pub struct TestEnv {
    pub topic: String,
    pub database: String,
    /// On the first (or only) ClickHouse server.
    pub clickhouse: ClickHouse,
    pub runtime: tokio::runtime::Runtime,
    /// Kafka bootstrap servers and ClickHouse URL(s) the binaries are given.
    pub brokers: &'static str,
    pub clickhouse_url: &'static str,
    /// The jobs' lease's ZooKeeper (`VIDEOCOUNT_ZOOKEEPER`).
    pub zookeeper: &'static str,
}

impl TestEnv {
    /// On `make up`'s single nodes.
    pub fn new(name: &str, partitions: i32) -> TestEnv {
        TestEnv::on(name, partitions, (BROKERS, CLICKHOUSE_URL, ZOOKEEPER), 1)
    }

    /// On `make up-ha`'s replicated stack: the topic with 3 replicas, the schema on both
    /// ClickHouse replicas; the binaries get every broker and both replicas.
    pub fn new_ha(name: &str, partitions: i32) -> TestEnv {
        TestEnv::on(name, partitions, (HA_BROKERS, HA_CLICKHOUSE_URLS, HA_ZOOKEEPER), 3)
    }

    /// `stack`: Kafka brokers, ClickHouse URLs, ZooKeeper.
    fn on(name: &str, partitions: i32, stack: (&'static str, &'static str, &'static str), replication: i32) -> TestEnv {
        let (brokers, urls, zookeeper) = stack;
        let suffix: u32 = rand::rng().random();
        let topic = format!("test-{name}-{suffix:08x}");
        let database = format!("test_{name}_{suffix:08x}");
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let server = |url: &str| {
            ClickHouse::new(ClickHouseConfig {
                url: url.into(),
                database: database.clone(),
                ..ClickHouseConfig::default()
            })
        };
        let clickhouse = server(urls.split(',').next().unwrap());
        runtime.block_on(async {
            let admin: AdminClient<DefaultClientContext> =
                ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
            let new = NewTopic::new(&topic, partitions, TopicReplication::Fixed(replication));
            for result in admin.create_topics([&new], &AdminOptions::new()).await.unwrap() {
                result.expect("topic created");
            }
            for url in urls.split(',') {
                schema::apply(&server(url)).await.expect("schema applied (is `make up` / `make up-ha` running?)");
            }
        });
        TestEnv { topic, database, clickhouse, runtime, brokers, clickhouse_url: urls, zookeeper }
    }

    /// The `view_counts` binary with this test's topic and database.
    pub fn job(&self, extra: &[&str]) -> Command {
        self.job_binary(&tool("view_counts"), extra)
    }

    /// The `event_stats` binary with this test's topic and database, and the repository's
    /// functions config.
    pub fn stats_job(&self, extra: &[&str]) -> Command {
        self.stats_job_on(&self.database, extra)
    }

    /// `event_stats` on this test's topic, writing to `database`.
    pub fn stats_job_on(&self, database: &str, extra: &[&str]) -> Command {
        let mut command = self.job_binary_on(&tool("event_stats"), database, extra);
        command.arg("--functions").arg(repo_path("config/functions.toml"));
        command
    }

    /// `event_stats` writing through `url` (a proxy) to this test's database.
    pub fn stats_job_via(&self, url: &str, extra: &[&str]) -> Command {
        let mut command = self.job_binary_at(&tool("event_stats"), &self.database, url, extra);
        command.arg("--functions").arg(repo_path("config/functions.toml"));
        command
    }

    fn job_binary(&self, binary: &std::path::Path, extra: &[&str]) -> Command {
        self.job_binary_on(binary, &self.database, extra)
    }

    /// `view_counts` with this test's topic, writing to `database`.
    pub fn job_on(&self, database: &str, extra: &[&str]) -> Command {
        self.job_binary_on(&tool("view_counts"), database, extra)
    }

    /// `view_counts` with this test's topic and database, reaching ClickHouse at `url` (a proxy).
    pub fn job_via(&self, url: &str, extra: &[&str]) -> Command {
        self.job_binary_at(&tool("view_counts"), &self.database, url, extra)
    }

    fn job_binary_on(&self, binary: &std::path::Path, database: &str, extra: &[&str]) -> Command {
        self.job_binary_at(binary, database, self.clickhouse_url, extra)
    }

    fn job_binary_at(&self, binary: &std::path::Path, database: &str, url: &str, extra: &[&str]) -> Command {
        let mut command = Command::new(binary);
        command
            .args(["--brokers", self.brokers, "--topic", &self.topic, "--clickhouse-url", url])
            .args(["--database", database])
            .args(extra)
            .env("RUST_LOG", "warn")
            .env("VIDEOCOUNT_ZOOKEEPER", self.zookeeper)
            .stdin(Stdio::null());
        command
    }

    /// `ingest` writing to this test's topic, once it is ready.
    pub fn ingest(&self, extra: &[&str]) -> Ingest {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let child = Command::new(tool("ingest"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--brokers", self.brokers, "--topic", &self.topic])
            .args(extra)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let ingest = Ingest { url, process: Running(child) };
        wait_until("ingest ready", Duration::from_secs(60), || ingest.ready());
        ingest
    }

    /// `query` reading this test's database and serving the built UI, once it answers.
    pub fn query_service(&self, extra: &[&str]) -> QueryService {
        self.query_service_via(self.clickhouse_url, extra)
    }

    /// `query` reading this test's database at `urls` (ClickHouse endpoints, comma-separated).
    pub fn query_service_via(&self, urls: &str, extra: &[&str]) -> QueryService {
        let port = free_port();
        let url = format!("http://127.0.0.1:{port}");
        let ui = repo_path("ui/dist");
        let child = Command::new(tool("query"))
            .args(["--listen", &format!("127.0.0.1:{port}"), "--clickhouse-url", urls])
            .args(["--database", &self.database, "--ui-dir"])
            .arg(ui)
            .args(extra)
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let service = QueryService {
            url,
            process: Running(child),
            http: reqwest::Client::builder()
                // Below the service's idle close (its header timeout, 10 s): this runtime does not
                // run between requests, so a connection closed meanwhile would only be seen on reuse.
                .pool_idle_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap(),
        };
        let healthz = format!("{}/healthz", service.url);
        wait_until("query answering /healthz", Duration::from_secs(60), || answers_ok(&healthz));
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
            .args(["--clickhouse-url", self.clickhouse_url, "--database", &self.database])
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

    /// `videocount replay` of the test's topic for `view_counts`: fresh count tables renamed in.
    pub fn replay(&self) {
        self.replay_through(&self.clickhouse, Duration::from_secs(600)).expect("replay");
    }

    /// A replay of the test's topic for `view_counts` through `clickhouse` (a proxy, say), its
    /// fills within `timeout`: what it reports, or why it replaced nothing.
    pub fn replay_through(
        &self,
        clickhouse: &ClickHouse,
        timeout: Duration,
    ) -> Result<videocount_clickhouse::replay::ReplayReport, videocount_clickhouse::SinkError> {
        self.runtime.block_on(videocount_clickhouse::replay::replay_from_raw(
            clickhouse,
            "view_counts",
            &self.topic,
            false,
            timeout,
            &videocount_lease::Fence::open(),
        ))
    }

    pub fn drop(self) {
        for url in self.clickhouse_url.split(',') {
            let server = ClickHouse::new(ClickHouseConfig { url: url.into(), ..self.clickhouse.config().clone() });
            self.runtime.block_on(schema::drop_database(&server)).ok();
        }
        let topics = [self.topic.clone(), format!("{}-dlq", self.topic)];
        self.runtime.block_on(async {
            let admin: AdminClient<DefaultClientContext> =
                ClientConfig::new().set("bootstrap.servers", self.brokers).create().unwrap();
            let names: Vec<&str> = topics.iter().map(String::as_str).collect();
            admin.delete_topics(&names, &AdminOptions::new()).await.ok();
        });
    }
}
