//! Every binary's `/metrics` (the jobs' `--metrics-listen`, ingest's and query's own): it parses
//! as Prometheus text, and the golden signals follow known events end to end, down to the
//! freshness canary and the live panel that summarises them.

use std::time::{Duration, Instant};

use videocount_e2e::{TestEnv, free_port, produce_keyed, sleep_ms};
use videocount_query_service::prometheus::{Sample, parse_samples};

fn scrape(url: &str) -> Option<Vec<Sample>> {
    let (status, text) = videocount_e2e::http_get(&format!("{url}/metrics"))?;
    (status == 200).then(|| {
        assert_prometheus_text(&text);
        parse_samples(&text)
    })
}

/// Every line is a comment or a sample that parses, and the text ends with `# EOF`.
fn assert_prometheus_text(text: &str) {
    assert!(text.trim_end().ends_with("# EOF"), "OpenMetrics text ends with # EOF");
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let sample = parse_samples(line);
        assert_eq!(sample.len(), 1, "not a sample: {line:?}");
        assert!(sample[0].name.starts_with("videocount_"), "unprefixed: {line:?}");
    }
}

/// The value of the sample `name` whose labels include `labels`.
fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples.iter().find(|s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(v))).map(|s| s.value)
}

/// Scrapes `url` until `done` holds (at most 120 s).
fn wait_for(url: &str, what: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(samples) = scrape(url)
            && done(&samples)
        {
            return samples;
        }
        assert!(Instant::now() < deadline, "{url}/metrics never showed {what}");
        sleep_ms(250);
    }
}

/// What a CPU counter promises: a number, never decreasing, and moving once the process has
/// done measurable work. A young process may well have used less than one clock tick (then
/// /proc says 0), so the work is made here: scrapes until the counter moves (at most 60 s).
fn assert_cpu_counter_moves(runtime: &tokio::runtime::Runtime, url: &str, name: &str, first: &[Sample]) {
    let start = value(first, name, &[]).unwrap_or_else(|| panic!("{url} exports {name}"));
    assert!(start.is_finite() && start >= 0.0, "{name} = {start}");
    let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(5)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = start;
    let mut scrapes = 0;
    while last <= start {
        assert!(Instant::now() < deadline, "{name} stayed at {start} over {scrapes} scrapes of {url}");
        let text =
            runtime.block_on(async { http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap() });
        let now = value(&parse_samples(&text), name, &[]).unwrap_or_else(|| panic!("{url} exports {name}"));
        assert!(now >= last, "{name} went back from {last} to {now}");
        last = now;
        scrapes += 1;
    }
}

#[test]
#[ignore = "needs Kafka and ClickHouse: make up, then make test"]
fn every_binary_exports_golden_signals_that_follow_the_events() {
    let env = TestEnv::new("metrics", 2);
    let (counts_port, stats_port) = (free_port(), free_port());
    let counts_url = format!("http://127.0.0.1:{counts_port}");
    let stats_url = format!("http://127.0.0.1:{stats_port}");
    let _counts = env.spawn(&["--metrics-listen", &format!("127.0.0.1:{counts_port}"), "--epoch-ms", "100"]);
    let _stats = TestEnv::spawn_command(env.stats_job(&[
        "--metrics-listen",
        &format!("127.0.0.1:{stats_port}"),
        "--epoch-ms",
        "100",
    ]));
    let ingest = env.ingest(&[]);

    // 1,000 events through the write API in 10 requests, 10 malformed straight into Kafka.
    let http = reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(5)).build().unwrap();
    for batch in 0..10 {
        let events: Vec<_> = (0..100)
            .map(|i| serde_json::json!({"video_id": format!("m{}", i % 7), "event_type": "view", "viewer_id": format!("u{batch}x{i}")}))
            .collect();
        let status = env.runtime.block_on(async {
            http.post(format!("{}/v1/events", ingest.url)).json(&events).send().await.unwrap().status().as_u16()
        });
        assert_eq!(status, 202);
    }
    produce_keyed(&env.topic, &(0..10).map(|i| (format!("bad{i}"), "{not json".to_owned())).collect::<Vec<_>>());

    let samples = scrape(&ingest.url).expect("ingest /metrics");
    let events = [("endpoint", "/v1/events")];
    assert_eq!(value(&samples, "videocount_ingest_events_accepted_total", &[]), Some(1_000.0));
    assert_eq!(value(&samples, "videocount_ingest_requests_total", &[events[0], ("status", "202")]), Some(10.0));
    assert_eq!(value(&samples, "videocount_ingest_request_duration_seconds_count", &events), Some(10.0));
    assert!(value(&samples, "videocount_ingest_process_resident_memory_bytes", &[]).unwrap() > 1e6);
    assert_cpu_counter_moves(&env.runtime, &ingest.url, "videocount_ingest_process_cpu_seconds_total", &samples);

    for (url, job, table) in
        [(&counts_url, "view_counts", "event_counts_minute"), (&stats_url, "event_stats", "stats_minute")]
    {
        let job_label = ("job", job);
        let samples = wait_for(url, "1,010 messages written to ClickHouse", |s| {
            value(s, "videocount_job_messages_total", &[job_label]) == Some(1_010.0)
                && value(s, "videocount_job_rows_written_total", &[job_label, ("table", table)])
                    .is_some_and(|r| r > 0.0)
        });
        let dead = |reason| value(&samples, "videocount_job_dead_letters_total", &[job_label, ("reason", reason)]);
        assert_eq!(dead("invalid json"), Some(10.0), "{job}");
        assert_eq!(dead("empty payload"), Some(0.0), "{job}: every reason is exported");
        for partition in ["0", "1"] {
            let lag = [job_label, ("partition", partition)];
            assert!(value(&samples, "videocount_job_consumer_lag_messages", &lag).is_some(), "{job} p{partition}");
            assert!(value(&samples, "videocount_job_consumer_lag_seconds", &lag).is_some(), "{job} p{partition}");
        }
        assert!(value(&samples, "videocount_job_inserts_total", &[job_label]).unwrap() > 0.0, "{job}");
        assert!(value(&samples, "videocount_job_process_resident_memory_bytes", &[job_label]).unwrap() > 1e6);
        assert!(value(&samples, "videocount_job_writer_queue_capacity_batches", &[job_label]).unwrap() > 0.0);
        // The lag monitor looks every 2 s: caught up, both partitions' lag goes to 0.
        wait_for(url, "zero lag", |s| {
            s.iter().filter(|s| s.name == "videocount_job_consumer_lag_messages").map(|s| s.value).sum::<f64>() == 0.0
        });
    }

    // The query service with the canary on: its views go through ingest and both jobs, and the
    // freshness histogram fills; the live panel shows the signals of all four processes.
    let query = env.query_service(&[
        "--ingest-url",
        &ingest.url,
        "--job-metrics-url",
        &format!("{counts_url},{stats_url}"),
        "--canary-interval-ms",
        "200",
    ]);
    let samples = wait_for(&query.url, "three canary samples", |s| {
        value(s, "videocount_query_canary_freshness_seconds_count", &[]).is_some_and(|n| n >= 3.0)
    });
    let freshness_sum = value(&samples, "videocount_query_canary_freshness_seconds_sum", &[]).unwrap();
    assert!(freshness_sum > 0.0 && freshness_sum < 3.0 * 60.0, "{freshness_sum}");
    assert!(value(&samples, "videocount_query_process_resident_memory_bytes", &[]).unwrap() > 1e6);
    // The canary's events are traffic like any other.
    wait_for(&counts_url, "the canary's views", |s| {
        value(s, "videocount_job_messages_total", &[("job", "view_counts")]).is_some_and(|n| n >= 1_013.0)
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let live = loop {
        let live = query.ok(&env.runtime, "/v1/live");
        let golden = &live["golden"];
        if golden["ingest"]["events_per_second"].is_number()
            && golden["jobs"]
                .as_array()
                .is_some_and(|j| j.len() == 2 && j.iter().all(|j| j["messages_per_second"].is_number()))
            && golden["query"]["requests_per_second"].is_number()
            && live["freshness"]["p99_seconds"].is_number()
        {
            break live;
        }
        assert!(Instant::now() < deadline, "the live panel never filled: {live}");
        sleep_ms(500);
    };
    let jobs: Vec<&str> =
        live["golden"]["jobs"].as_array().unwrap().iter().map(|j| j["job"].as_str().unwrap()).collect();
    assert_eq!(jobs, ["view_counts", "event_stats"]);
    assert!(live["golden"]["ingest"]["latency_p99_seconds"].is_number(), "{live}");
    assert!(live["freshness"].get("video_id").is_none(), "the canary's video is not published: {live}");
    let hour_ago = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() - 3_600_000;
    let top = query.ok(&env.runtime, &format!("/v1/top?event_type=view&from={hour_ago}&limit=100"));
    assert!(top.to_string().contains("\"m0\""), "{top}");
    assert!(!top.to_string().contains("videocount-canary"), "top lists leave the canary out: {top}");
    env.drop();
}
