//! Load and stress tests of a running videocount (`make load-test`, `make stress-test`).
//!
//! [`run`] drives the write API through the client library at a steady rate, spread like real
//! traffic (Zipf over videos; views, likes, shares and watch time with values), while a canary
//! measures freshness through the read API; then it checks through the read API that every
//! accepted event was counted exactly once. [`stress`] repeats it at rising rates until a
//! bound breaks, reading the saturation signals from the query service's `/v1/live`.

mod report;
mod stress;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hdrhistogram::Histogram;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Zipf};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;
use videocount_client::canary::Canary;
use videocount_client::{Client, ClientConfig, ClientError, Event};
use videocount_events::clock::now_ms;

use report::quantiles;
pub use report::{Exactness, LoadReport, Quantiles};
pub use stress::{Saturation, Step, StressConfig, StressReport, stress};

/// The event types sent, with their share of the traffic; `watch_time` carries a value.
const TYPES: [(&str, f64); 4] = [("view", 0.80), ("like", 0.10), ("share", 0.05), ("watch_time", 0.05)];

/// One load run.
#[derive(Clone, Debug)]
pub struct LoadConfig {
    pub ingest_urls: Vec<String>,
    /// Query service base URLs: reads go to the first that answers.
    pub query_urls: Vec<String>,
    pub token: Option<String>,
    /// Events per second.
    pub rate: f64,
    pub duration: Duration,
    /// Distinct videos, Zipf-spread with exponent `zipf`.
    pub videos: u64,
    pub zipf: f64,
    /// Check every accepted event through the read API afterwards.
    pub check: bool,
    /// How long the check waits for the counts to settle.
    pub settle: Duration,
    /// Canaries probing freshness during the run, each waiting this long between probes.
    pub canaries: usize,
    pub canary_every: Duration,
    /// Read API requests in flight during the check.
    pub check_concurrency: usize,
}

/// Per (video index, type index): events acknowledged, and events whose outcome is unknown.
#[derive(Default)]
struct Tally {
    accepted: HashMap<(u32, u8), u64>,
    unknown: HashMap<(u32, u8), u64>,
    latency_us: Option<Histogram<u64>>,
    failed: u64,
    first_error: Option<String>,
}

/// Whether a failed ack may still have been written (the answer was lost, not refused).
fn outcome_unknown(error: &ClientError) -> bool {
    !matches!(error, ClientError::Rejected { .. } | ClientError::Status { .. } | ClientError::BufferFull { .. })
}

fn new_client(config: &LoadConfig, batch_size: usize, linger: Duration) -> anyhow::Result<Client> {
    let mut client = ClientConfig::new(config.ingest_urls.clone());
    client.batch_size = batch_size;
    client.linger = linger;
    client.max_buffered = 1_000_000;
    client.max_in_flight = 16;
    client.auth_token = config.token.clone();
    client.retry.max_elapsed = Some(Duration::from_secs(30));
    Client::new(client).context("the load test's client")
}

/// Runs the load, then (with `check`) the exactness check.
pub async fn run(config: &LoadConfig) -> anyhow::Result<LoadReport> {
    anyhow::ensure!(config.rate > 0.0 && config.videos > 0, "the rate and the number of videos must be above 0");
    anyhow::ensure!(!config.query_urls.is_empty(), "no query service URL given");
    let run_id = format!("lt{:06x}", rand::random::<u32>() & 0xff_ffff);
    info!(%run_id, rate = config.rate, seconds = config.duration.as_secs_f64(), videos = config.videos, "load test starts");
    let client = new_client(config, 1_000, Duration::from_millis(5))?;
    let (tx, mut rx) = mpsc::unbounded_channel::<((u32, u8), Instant, videocount_client::Ack)>();

    let collector = tokio::spawn(async move {
        let mut tally = Tally { latency_us: Histogram::new_with_bounds(1, 600_000_000, 3).ok(), ..Tally::default() };
        let mut pending = FuturesUnordered::new();
        let mut open = true;
        loop {
            tokio::select! {
                message = rx.recv(), if open => match message {
                    Some((key, at, ack)) => pending.push(async move { (key, at, ack.await) }),
                    None => open = false,
                },
                Some((key, at, result)) = pending.next(), if !pending.is_empty() => {
                    let (key, at): ((u32, u8), Instant) = (key, at);
                    match result {
                        Ok(()) => {
                            *tally.accepted.entry(key).or_default() += 1;
                            if let Some(h) = tally.latency_us.as_mut() {
                                let _ = h.record(at.elapsed().as_micros().max(1) as u64);
                            }
                        }
                        Err(error) => {
                            tally.failed += 1;
                            if outcome_unknown(&error) {
                                *tally.unknown.entry(key).or_default() += 1;
                            }
                            tally.first_error.get_or_insert_with(|| error.to_string());
                        }
                    }
                }
                else => break,
            }
        }
        tally
    });

    // Canaries probe freshness while the load runs: several, each on its own video, so that
    // a run of seconds still gets a few dozen samples.
    let stop = Arc::new(AtomicBool::new(false));
    let mut canaries = Vec::new();
    for i in 0..config.canaries.max(1) {
        // Each canary starts its reads at another query service, and moves on when it fails.
        let mut urls = config.query_urls.clone();
        let first = i % urls.len();
        urls.rotate_left(first);
        let mut canary =
            Canary::new(new_client(config, 1, Duration::ZERO)?, &urls.join(","), format!("{run_id}-canary{i}"));
        canary.timeout = config.settle.max(Duration::from_secs(1));
        let (stop, every) = (Arc::clone(&stop), config.canary_every);
        canaries.push(tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut failures = 0;
            while !stop.load(Ordering::Relaxed) {
                match canary.probe().await {
                    Ok(freshness) => samples.push(freshness),
                    Err(error) => {
                        failures += 1;
                        tracing::warn!(%error, "canary probe failed");
                    }
                }
                // A random pause: probes at a fixed phase to the epochs and the hot cache's
                // refresh would all measure the same delay.
                tokio::time::sleep(every.mul_f64(rand::random_range(0.0..2.0))).await;
            }
            (samples, failures)
        }));
    }

    // Read availability: a reader asks for a count every 100 ms, as a client with the list of
    // query services would (the next one when one does not answer 2xx within 2 s).
    let reader = {
        let (stop, urls) = (Arc::clone(&stop), config.query_urls.clone());
        let path = format!("v1/videos/{run_id}-v0/views?from={}", now_ms().saturating_sub(3_600_000));
        tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .pool_idle_timeout(Duration::from_secs(5))
                .build()
                .expect("a plain HTTP client");
            let (mut reads, mut failed) = (0u64, 0u64);
            while !stop.load(Ordering::Relaxed) {
                reads += 1;
                if get_json(&http, &urls, &path).await.is_none() {
                    failed += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (reads, failed)
        })
    };

    let zipf = Zipf::new(config.videos as f64, config.zipf).context("Zipf parameters")?;
    let mut rng = SmallRng::from_os_rng();
    let started = Instant::now();
    let start_ms = now_ms();
    let (mut sent, mut refused, mut first_refusal) = (0u64, 0u64, None);
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_log = Instant::now();
    while started.elapsed() < config.duration {
        tick.tick().await;
        let due = (config.rate * started.elapsed().min(config.duration).as_secs_f64()) as u64;
        while sent < due {
            let video = zipf.sample(&mut rng) as u32 - 1;
            let pick: f64 = rng.random();
            let mut cumulative = 0.0;
            let kind = TYPES
                .iter()
                .position(|(_, share)| {
                    cumulative += share;
                    pick < cumulative
                })
                .unwrap_or(0) as u8;
            let mut event = Event::new(format!("{run_id}-v{video}"), TYPES[kind as usize].0)
                .viewer(format!("u{}", rng.random_range(0..100_000u32)));
            if TYPES[kind as usize].0 == "watch_time" {
                event = event.value(f64::from(rng.random_range(1..=600u32)));
            }
            sent += 1;
            match client.send(event) {
                Ok(ack) => {
                    let _ = tx.send(((video, kind), Instant::now(), ack));
                }
                Err(error) => {
                    refused += 1;
                    first_refusal.get_or_insert_with(|| error.to_string());
                }
            }
        }
        if last_log.elapsed() >= Duration::from_secs(5) {
            last_log = Instant::now();
            info!(sent, refused, seconds = started.elapsed().as_secs(), "sending");
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    drop(tx);
    let (requests, requests_2xx) = client.request_counts();
    client.close().await;
    let (reads, reads_failed) = reader.await.context("the reader")?;
    let tally = collector.await.context("the ack collector")?;
    let (mut freshness, mut freshness_failures) = (Vec::new(), 0);
    for canary in canaries {
        let (samples, failures) = canary.await.context("a canary")?;
        freshness.extend(samples);
        freshness_failures += failures;
    }
    let accepted: u64 = tally.accepted.values().sum();
    let mut fresh = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3).expect("valid bounds");
    for sample in &freshness {
        let _ = fresh.record(sample.as_micros().max(1) as u64);
    }
    let mut report = LoadReport {
        run_id: run_id.clone(),
        target_rate: config.rate,
        seconds,
        sent,
        accepted,
        failed: tally.failed,
        refused,
        first_error: tally.first_error.clone().or(first_refusal),
        achieved_rate: accepted as f64 / seconds,
        error_rate: if sent == 0 { 0.0 } else { (tally.failed + refused) as f64 / sent as f64 },
        latency_ms: tally.latency_us.as_ref().map_or_else(Quantiles::default, |h| quantiles(h, 1_000.0)),
        freshness_s: quantiles(&fresh, 1_000_000.0),
        freshness_samples: freshness.len(),
        freshness_failures,
        requests,
        requests_2xx,
        reads,
        reads_failed,
        exactness: None,
    };
    if config.check {
        // Events carry the service's time of acceptance: between the start and now.
        let from = start_ms - start_ms % 60_000;
        let to = now_ms() + 60_000;
        report.exactness = Some(check(config, &run_id, &tally, from, to).await);
    }
    Ok(report)
}

/// Asks the read API for every key's count until each equals what was accepted (up to the
/// events whose outcome is unknown), or `settle` passes.
async fn check(config: &LoadConfig, run_id: &str, tally: &Tally, from: u64, to: u64) -> Exactness {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("a plain HTTP client builds");
    let mut keys: Vec<(u32, u8)> = tally.accepted.keys().chain(tally.unknown.keys()).copied().collect();
    keys.sort_unstable();
    keys.dedup();
    let total = keys.len();
    let events = tally.accepted.values().sum();
    let started = Instant::now();
    let mut last: HashMap<(u32, u8), Option<u64>> = HashMap::new();
    let read_all = |keys: Vec<(u32, u8)>| {
        let http = &http;
        futures_util::stream::iter(keys)
            .map(move |key| {
                let path = format!(
                    "v1/videos/{run_id}-v{}/events/{}/count?from={from}&to={to}",
                    key.0, TYPES[key.1 as usize].0
                );
                async move { (key, get_json(http, &config.query_urls, &path).await.and_then(|b| b["value"].as_u64())) }
            })
            .buffer_unordered(config.check_concurrency.max(1))
            .collect::<Vec<((u32, u8), Option<u64>)>>()
    };
    // A key's count is right between the events acknowledged and those plus the ones whose
    // outcome the client never learned.
    let bounds = |key: (u32, u8)| {
        let accepted = tally.accepted.get(&key).copied().unwrap_or(0);
        (accepted, accepted + tally.unknown.get(&key).copied().unwrap_or(0))
    };
    let mut open = keys.clone();
    let mut steady = 0;
    info!(keys = total, events, "checking every count through the read API");
    loop {
        let answers = read_all(std::mem::take(&mut open)).await;
        let mut changed = false;
        let mut short = false;
        for (key, value) in answers {
            let (accepted, ceiling) = bounds(key);
            if !value.is_some_and(|v| v >= accepted && v <= ceiling) {
                open.push(key);
                short |= value.is_none_or(|v| v < accepted);
            }
            changed |= last.insert(key, value) != Some(value);
        }
        // Keys counted above the ceiling never settle: once nothing is short and nothing
        // moved for five polls, the counts are final.
        steady = if short || changed { 0 } else { steady + 1 };
        if open.is_empty() || steady >= 5 || started.elapsed() >= config.settle {
            break;
        }
        info!(open = open.len(), "waiting for counts to settle");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Once more over every key: a key that matched early and was counted again later (a
    // re-run epoch, a late insert) must not pass on its early answer.
    tokio::time::sleep(Duration::from_secs(2)).await;
    open.clear();
    for (key, value) in read_all(keys).await {
        let (accepted, ceiling) = bounds(key);
        if !value.is_some_and(|v| v >= accepted && v <= ceiling) {
            open.push(key);
        }
        last.insert(key, value);
    }
    let mut exactness = Exactness {
        keys: total,
        events,
        short_keys: 0,
        missing_events: 0,
        over_keys: 0,
        extra_events: 0,
        counted: 0,
        lost_events: 0,
        doubled_events: 0,
        first_mismatch: None,
        seconds: started.elapsed().as_secs_f64(),
    };
    for (&key, value) in &last {
        let (accepted, _) = bounds(key);
        let counted = value.unwrap_or(0);
        exactness.counted += counted;
        exactness.lost_events += accepted.saturating_sub(counted);
        exactness.doubled_events += counted.saturating_sub(accepted);
    }
    open.sort_unstable();
    for key in open {
        let (accepted, ceiling) = bounds(key);
        let counted = last.get(&key).copied().flatten();
        match counted {
            Some(v) if v > ceiling => {
                exactness.over_keys += 1;
                exactness.extra_events += v - ceiling;
            }
            v => {
                exactness.short_keys += 1;
                exactness.missing_events += accepted - v.unwrap_or(0).min(accepted);
            }
        }
        exactness.first_mismatch.get_or_insert_with(|| {
            let counted = counted.map_or("no answer".to_owned(), |v| v.to_string());
            format!("{run_id}-v{} {}: accepted {accepted}, counted {counted}", key.0, TYPES[key.1 as usize].0)
        });
    }
    exactness
}

/// `GET {url}/{path}` from the first of `urls` that answers 2xx with JSON.
async fn get_json(http: &reqwest::Client, urls: &[String], path: &str) -> Option<serde_json::Value> {
    for url in urls {
        let Ok(response) = http.get(format!("{}/{path}", url.trim_end_matches('/'))).send().await else { continue };
        if !response.status().is_success() {
            continue;
        }
        if let Ok(body) = response.json().await {
            return Some(body);
        }
    }
    None
}
