//! The jobs' `/metrics` (`--metrics-listen`): Prometheus text whose counters follow the events.

mod common;

use std::time::{Duration, Instant};

use common::{TestEnv, free_port, produce_keyed, sleep_ms};

fn scrape(port: u16) -> Option<String> {
    let output = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "3", &format!("http://127.0.0.1:{port}/metrics")])
        .output()
        .ok()?;
    output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The value of a sample `name{job="..."}`.
fn sample(text: &str, name: &str, job: &str) -> Option<f64> {
    let prefix = format!("{name}{{job=\"{job}\"}} ");
    text.lines().find_map(|line| line.strip_prefix(&prefix)?.parse().ok())
}

/// Every line is a comment or `name{labels} value`, and the text ends with `# EOF`.
fn assert_prometheus_text(text: &str) {
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "value of {line:?}");
        assert!(series.starts_with("videocount_job_") && series.ends_with('}'), "series of {line:?}");
    }
}

#[test]
fn both_jobs_export_counters_that_follow_the_events() {
    let env = TestEnv::new("metrics", 2);
    let mut messages: Vec<(String, String)> = (0..1_000)
        .map(|i| {
            let video = format!("m{}", i % 7);
            let payload = format!(r#"{{"video_id":"{video}","event_type":"view","viewer_id":"u{i}"}}"#);
            (video, payload)
        })
        .collect();
    messages.extend((0..10).map(|i| (format!("bad{i}"), "{not json".to_owned())));
    produce_keyed(&env.topic, &messages);

    let (counts_port, stats_port) = (free_port(), free_port());
    let _counts = env.spawn(&["--metrics-listen", &format!("127.0.0.1:{counts_port}"), "--epoch-ms", "100"]);
    let _stats = TestEnv::spawn_command(env.stats_job(&[
        "--metrics-listen",
        &format!("127.0.0.1:{stats_port}"),
        "--epoch-ms",
        "100",
    ]));
    for (port, job) in [(counts_port, "view_counts"), (stats_port, "event_stats")] {
        let deadline = Instant::now() + Duration::from_secs(120);
        let text = loop {
            if let Some(text) = scrape(port)
                && sample(&text, "videocount_job_messages_total", job) == Some(1_010.0)
                && sample(&text, "videocount_job_consumer_lag_messages", job) == Some(0.0)
                && sample(&text, "videocount_job_rows_written_total", job).is_some_and(|rows| rows > 0.0)
            {
                break text;
            }
            assert!(Instant::now() < deadline, "{job}: /metrics never showed the 1,010 messages written");
            sleep_ms(250);
        };
        assert_prometheus_text(&text);
        assert_eq!(sample(&text, "videocount_job_dead_letters_total", job), Some(10.0), "{job}: {text}");
        assert!(sample(&text, "videocount_job_inserts_total", job).unwrap() > 0.0, "{job}");
        assert!(sample(&text, "videocount_job_process_resident_memory_bytes", job).unwrap() > 1e6, "{job}");
        assert!(sample(&text, "videocount_job_writer_queue_capacity_batches", job).unwrap() > 0.0, "{job}");
    }
    env.drop();
}
