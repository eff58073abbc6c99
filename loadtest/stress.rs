//! The stress test: load runs at rising rates until a bound breaks, with the saturation signals
//! of every process (from the query service's `/v1/live`) and the machine's CPU (/proc/stat)
//! recorded at each step, so the report can say which resource ran out first.

use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use tracing::info;

use crate::{LoadConfig, LoadReport, run};

#[derive(Clone, Debug)]
pub struct StressConfig {
    pub load: LoadConfig,
    pub start_rate: f64,
    /// Each step's rate is the previous one's times this.
    pub factor: f64,
    pub max_rate: f64,
    /// Request latency p99 bound (send to Kafka ack), milliseconds.
    pub p99_bound_ms: f64,
    /// Freshness p99 bound, seconds.
    pub freshness_bound_s: f64,
    /// Error-rate bound (0.001 = 0.1 %).
    pub error_bound: f64,
}

/// The highest readings of the saturation signals during one step.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Saturation {
    /// Busy share of all cores, per cent (100 = every core busy).
    pub machine_cpu_percent: f64,
    /// Per process (ingest, query, each job: the highest 2 s reading; load_test: the step's
    /// mean): CPU per cent (100 = one core).
    pub process_cpu_percent: Vec<(String, f64)>,
    pub max_lag_seconds: Vec<(String, f64)>,
    pub max_writer_queue_fill: Vec<(String, f64)>,
    pub max_producer_queue_fill: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Step {
    pub report: LoadReport,
    pub saturation: Saturation,
    /// Why the step did not hold; empty when it held.
    pub broke: Vec<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct StressReport {
    pub steps: Vec<Step>,
    pub highest_held_rate: Option<f64>,
    pub exhausted: String,
}

/// (busy, total) jiffies of all cores.
fn machine_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat.lines().next()?.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3)? + fields.get(4)?;
    Some((total - idle, total))
}

fn keep_max(list: &mut Vec<(String, f64)>, name: &str, value: Option<f64>) {
    let Some(value) = value else { return };
    match list.iter_mut().find(|(n, _)| n == name) {
        Some((_, v)) => *v = v.max(value),
        None => list.push((name.to_owned(), value)),
    }
}

/// Reads `/v1/live` every 2 s until `stop`, keeping the highest readings.
async fn watch(query_url: String, stop: tokio::sync::watch::Receiver<bool>) -> Saturation {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().expect("a plain HTTP client builds");
    let mut saturation = Saturation::default();
    let machine_before = machine_jiffies();
    let (own_before, started) = (videocount_http::process_usage(), Instant::now());
    while !*stop.borrow() {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let Ok(response) = http.get(format!("{query_url}/v1/live")).send().await else { continue };
        let Ok(live) = response.json::<serde_json::Value>().await else { continue };
        let golden = &live["golden"];
        for name in ["ingest", "query"] {
            keep_max(&mut saturation.process_cpu_percent, name, golden[name]["cpu_percent"].as_f64());
        }
        if let Some(fill) = golden["ingest"]["producer_queue_fill"].as_f64() {
            saturation.max_producer_queue_fill = saturation.max_producer_queue_fill.max(fill);
        }
        for job in golden["jobs"].as_array().into_iter().flatten() {
            let name = job["job"].as_str().unwrap_or("job");
            keep_max(&mut saturation.process_cpu_percent, name, job["cpu_percent"].as_f64());
            keep_max(&mut saturation.max_lag_seconds, name, job["lag_seconds"].as_f64());
            keep_max(&mut saturation.max_writer_queue_fill, name, job["writer_queue_fill"].as_f64());
        }
    }
    // The load generator shares the machine: its own CPU over the step.
    if let (Some((cpu0, _)), Some((cpu1, _))) = (own_before, videocount_http::process_usage()) {
        let cpu = 100.0 * (cpu1 - cpu0) / started.elapsed().as_secs_f64().max(1e-3);
        saturation.process_cpu_percent.push(("load_test".to_owned(), cpu));
    }
    if let (Some((b0, t0)), Some((b1, t1))) = (machine_before, machine_jiffies())
        && t1 > t0
    {
        saturation.machine_cpu_percent = 100.0 * (b1 - b0) as f64 / (t1 - t0) as f64;
    }
    saturation
}

/// Which resource ran out first, judged from the step that broke: the first of the signals at
/// their limit in the order of the pipeline's back-pressure (a full writer queue stalls the
/// job, a full producer queue stalls ingest, a busy machine stalls everything; the client's
/// refusals are what the others cause), with the others named after it.
fn exhausted(step: &Step, config: &StressConfig) -> String {
    let s = &step.saturation;
    let mut found = Vec::new();
    if let Some((job, fill)) = s.max_writer_queue_fill.iter().find(|(_, f)| *f >= 0.8) {
        found.push(format!("ClickHouse writes: {job}'s writer queue {:.0} % full", 100.0 * fill));
    }
    if s.max_producer_queue_fill >= 0.8 {
        found.push(format!("Kafka produce: ingest's producer queue {:.0} % full", 100.0 * s.max_producer_queue_fill));
    }
    if s.machine_cpu_percent >= 90.0 {
        let busiest = s.process_cpu_percent.iter().max_by(|a, b| a.1.total_cmp(&b.1));
        let busiest = busiest.map_or(String::new(), |(name, cpu)| format!(", busiest {name} at {cpu:.0} % of a core"));
        found.push(format!("CPU: the machine {:.0} % busy{busiest}", s.machine_cpu_percent));
    }
    if let Some((job, lag)) = s.max_lag_seconds.iter().find(|(_, l)| *l > config.freshness_bound_s / 2.0) {
        found.push(format!("{job} fell behind: {lag:.1} s of lag"));
    }
    if step.report.refused > 0 {
        found.push(format!("the load generator's client buffer: {} sends refused", step.report.refused));
    }
    match found.split_first() {
        Some((first, [])) => first.clone(),
        Some((first, rest)) => format!("{first} (also: {})", rest.join("; ")),
        None => format!("no saturation signal at its limit (machine CPU {:.0} %)", s.machine_cpu_percent),
    }
}

/// Steps the rate up until a bound breaks or `max_rate` is passed.
pub async fn stress(config: &StressConfig) -> anyhow::Result<StressReport> {
    let mut steps = Vec::new();
    let mut rate = config.start_rate;
    while rate <= config.max_rate {
        info!(rate, "stress step");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let watcher = tokio::spawn(watch(config.load.query_urls[0].trim_end_matches('/').to_owned(), stop_rx));
        let started = Instant::now();
        let report = run(&LoadConfig { rate, check: false, ..config.load.clone() }).await?;
        let _ = stop_tx.send(true);
        let saturation = watcher.await?;
        let mut broke = Vec::new();
        if report.latency_ms.p99.is_none_or(|p99| p99 > config.p99_bound_ms) {
            broke.push(format!("request p99 {:?} ms > {} ms", report.latency_ms.p99, config.p99_bound_ms));
        }
        if report.error_rate > config.error_bound {
            broke.push(format!("errors {:.3} % > {:.3} %", 100.0 * report.error_rate, 100.0 * config.error_bound));
        }
        if report.freshness_s.p99.is_none_or(|p99| p99 > config.freshness_bound_s) {
            broke.push(format!("freshness p99 {:?} s > {} s", report.freshness_s.p99, config.freshness_bound_s));
        }
        if report.achieved_rate < 0.95 * rate {
            broke.push(format!("achieved {:.0}/s of {rate:.0}/s", report.achieved_rate));
        }
        info!(rate, held = broke.is_empty(), seconds = started.elapsed().as_secs_f64(), "step done");
        let held = broke.is_empty();
        steps.push(Step { report, saturation, broke });
        if !held {
            break;
        }
        rate *= config.factor;
    }
    let highest_held_rate = steps.iter().rev().find(|s| s.broke.is_empty()).map(|s| s.report.target_rate);
    let exhausted = match steps.last() {
        Some(last) if !last.broke.is_empty() => exhausted(last, config),
        _ => format!("nothing broke up to {} events/s (--max-rate)", config.max_rate),
    };
    Ok(StressReport { steps, highest_held_rate, exhausted })
}

impl StressReport {
    pub fn print(&self) {
        println!(
            "| target/s | achieved/s | errors | p50 ms | p99 ms | p999 ms | fresh p50 s | fresh p99 s | machine CPU | max lag s | held |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
        let f = |v: Option<f64>, d: usize| v.map_or("-".to_owned(), |v| format!("{v:.d$}"));
        for step in &self.steps {
            let r = &step.report;
            let lag = step.saturation.max_lag_seconds.iter().map(|(_, l)| *l).fold(0.0, f64::max);
            println!(
                "| {:.0} | {:.0} | {:.3} % | {} | {} | {} | {} | {} | {:.0} % | {:.1} | {} |",
                r.target_rate,
                r.achieved_rate,
                100.0 * r.error_rate,
                f(r.latency_ms.p50, 1),
                f(r.latency_ms.p99, 1),
                f(r.latency_ms.p999, 1),
                f(r.freshness_s.p50, 2),
                f(r.freshness_s.p99, 2),
                step.saturation.machine_cpu_percent,
                lag,
                if step.broke.is_empty() { "yes".to_owned() } else { format!("no: {}", step.broke.join("; ")) }
            );
        }
        for step in &self.steps {
            let cpu: Vec<String> =
                step.saturation.process_cpu_percent.iter().map(|(n, c)| format!("{n} {c:.0} %")).collect();
            println!("at {:.0}/s, process CPU (100 % = one core): {}", step.report.target_rate, cpu.join(", "));
        }
        match self.highest_held_rate {
            Some(rate) => println!("highest rate that held: {rate:.0} events/s"),
            None => println!("no rate held (not even the first step)"),
        }
        println!("ran out first: {}", self.exhausted);
    }
}
