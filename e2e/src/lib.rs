//! The end-to-end harness: the tests under `e2e/tests/` run the real binaries against the real
//! Kafka and ClickHouse that `make up` starts, each in a fresh topic and database.
//!
//! Every test here needs those services, so each is marked
//! `#[ignore = "needs Kafka and ClickHouse: make up, then make test"]`: a plain `cargo test`
//! on a machine without them runs the unit tests of the other crates and lists these as
//! ignored with that reason; `make test` (`scripts/test.sh`) runs them with `--include-ignored`.
//! Tests that need no service belong next to the code they test, not here.

mod env;
mod processes;
mod proxy;
mod servers;
mod topics;

use std::time::{Duration, Instant};

pub use env::TestEnv;
pub use processes::{Answer, Ingest, QueryService, Running};
pub use proxy::{DelayingProxy, Hold};
pub use servers::Server;
pub use topics::{ReadMessage, produce_keyed, read_messages, read_topic};

pub const BROKERS: &str = "127.0.0.1:9092";
pub const CLICKHOUSE_URL: &str = "http://127.0.0.1:8123";
/// `make up-ha`'s brokers and ClickHouse replicas (tests in `e2e/tests/replicas.rs`).
pub const HA_BROKERS: &str = "127.0.0.1:9191,127.0.0.1:9192,127.0.0.1:9193";
pub const HA_CLICKHOUSE_URLS: &str = "http://127.0.0.1:8221,http://127.0.0.1:8222";
pub const ZOOKEEPER: &str = "127.0.0.1:2181";
pub const HA_ZOOKEEPER: &str = "127.0.0.1:2281,127.0.0.1:2282,127.0.0.1:2283";

/// A loopback port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

pub fn sleep_ms(ms: u64) {
    std::thread::sleep(Duration::from_millis(ms));
}

/// A path inside the repository (`config/functions.toml`, `ui/dist`).
pub fn repo_path(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// A binary of the workspace (`view_counts`, `event_stats`, `videocount`, `ingest`, `query`),
/// built by `cargo test --workspace` (or `cargo build --profile tests --workspace --bins`) next to
/// this test binary's directory.
pub fn tool(name: &str) -> std::path::PathBuf {
    let test_binary = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let path = test_binary.parent().and_then(|deps| deps.parent()).unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built: run `cargo build --workspace --bins` with the profile of this test (make test does)",
        path.display()
    );
    path
}

/// Waits until `ready` holds, checking every 100 ms; panics naming `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ready() {
        assert!(Instant::now() < deadline, "{what} did not happen within {limit:?}");
        sleep_ms(100);
    }
}

/// The status and body of `GET url`, or `None` if nothing answered within 3 s.
pub fn http_get(url: &str) -> Option<(u16, String)> {
    let client = reqwest::blocking::Client::builder().timeout(Duration::from_secs(3)).build().ok()?;
    let response = client.get(url).send().ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().unwrap_or_default()))
}

/// The value of the sample `series` (its name and labels as exported, e.g.
/// `videocount_job_dead_letters_total{job="view_counts",reason="invalid json"}`) in the
/// `/metrics` of the service at `url`.
pub fn metric(url: &str, series: &str) -> Option<f64> {
    let (_, text) = http_get(&format!("{url}/metrics"))?;
    text.lines().find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
}

/// `POST url/v1/events` with a JSON body (ingest's batch endpoint): the status and the
/// answer's text.
pub fn post_events(url: &str, body: impl Into<String>) -> (u16, String) {
    let response = reqwest::blocking::Client::new()
        .post(format!("{url}/v1/events"))
        .header("content-type", "application/json")
        .body(body.into())
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().unwrap())
}

/// Whether `GET url` answers 200 within 3 s.
pub fn answers_ok(url: &str) -> bool {
    http_get(url).is_some_and(|(status, _)| status == 200)
}
