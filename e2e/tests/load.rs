//! `make load-test` in small: `load_test run` drives the write API through the client library
//! against real services, then checks every accepted event through the read API. It passes
//! its own exactness check when the system counts, and fails it, naming the missing events,
//! when the counting job is not running.

use std::process::Command;

use videocount_e2e::{TestEnv, tool};

/// Runs `load_test run` (a few seconds, a low rate): exit success, stdout and the JSON report.
fn load_test(ingest: &str, query: &str, extra: &[&str]) -> (bool, String, serde_json::Value) {
    let output = Command::new(tool("load_test"))
        .args(["run", "--rate", "300", "--duration", "4", "--videos", "50", "--json"])
        .args(["--ingest-url", ingest, "--query-url", query, "--canary-every-ms", "100"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let report = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .map(|json| serde_json::from_str(json).unwrap())
        .unwrap_or_else(|| panic!("no RESULT line: {stdout}\n{}", String::from_utf8_lossy(&output.stderr)));
    (output.status.success(), stdout, report)
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn a_short_load_test_counts_every_accepted_event_exactly_once() {
    let env = TestEnv::new("load", 4);
    let counts = env.spawn(&["--epoch-ms", "200"]);
    let ingest = env.ingest(&[]);
    let query = env.query_service(&["--canary-interval-ms", "0"]);

    let (passed, stdout, report) = load_test(&ingest.url, &query.url, &[]);
    assert!(passed, "{stdout}");
    assert!(stdout.contains("every accepted event counted exactly once"), "{stdout}");
    assert_eq!(report["sent"], 1_200, "{stdout}");
    assert_eq!(report["accepted"], 1_200, "{stdout}");
    assert_eq!(report["error_rate"], 0.0, "{stdout}");
    let exactness = &report["exactness"];
    assert_eq!(exactness["events"], 1_200, "{stdout}");
    assert!(exactness["keys"].as_u64().unwrap() > 20, "Zipf over 50 videos and 4 types: {stdout}");
    assert!(report["freshness_samples"].as_u64().unwrap() >= 1, "{stdout}");
    assert!(report["latency_ms"]["p99"].as_f64().unwrap() > 0.0, "{stdout}");
    // The reference: everything the run wrote, straight from ClickHouse.
    let run_id = report["run_id"].as_str().unwrap();
    let counted =
        env.scalar(&format!("SELECT toUInt64(sum(count)) FROM event_counts_minute WHERE video_id LIKE '{run_id}-v%'"));
    assert_eq!(counted, 1_200);

    // Without the counting job nothing more is counted: the check fails and says what is short.
    drop(counts);
    let (passed, stdout, report) = load_test(&ingest.url, &query.url, &["--settle", "3"]);
    assert!(!passed, "{stdout}");
    assert!(stdout.contains("exactness: FAILED"), "{stdout}");
    assert_eq!(report["exactness"]["missing_events"], 1_200, "{stdout}");
    env.drop();
}
