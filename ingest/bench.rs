//! `ingest_bench`: load on a running `ingest` over loopback; prints one JSON line with the
//! accepted events/s, requests/s and latency percentiles. `make bench-ingest` runs it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use rand::{Rng, SeedableRng};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Mode {
    /// `POST /v1/events` with --batch-size events each.
    Batch,
    /// `POST /v1/videos/{id}/views`, one event each.
    Single,
}

#[derive(Parser, Debug)]
#[command(about = "Drives a running ingest service and prints events/s and latency.")]
struct Args {
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    #[arg(long, value_enum)]
    mode: Mode,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    #[arg(long, default_value_t = 1000)]
    batch_size: usize,
    #[arg(long, default_value_t = 10_000)]
    videos: u64,
}

/// A JSON array of `size` view events over `videos` random videos.
fn batch_body(size: usize, videos: u64) -> bytes::Bytes {
    let mut rng = rand::rng();
    let mut body = String::with_capacity(size * 48);
    body.push('[');
    for i in 0..size {
        if i > 0 {
            body.push(',');
        }
        let video = rng.random_range(0..videos);
        body.push_str(&format!(r#"{{"video_id":"v{video:06}","event_type":"view"}}"#));
    }
    body.push(']');
    bytes::Bytes::from(body)
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    events: u64,
    errors: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.concurrency).tcp_nodelay(true).build()?;
    let stop = Arc::new(AtomicBool::new(false));
    // Batch bodies are made before the clock starts: the load generator shares the CPU with the
    // service, and building JSON is not what is measured.
    let bodies: Arc<Vec<bytes::Bytes>> = Arc::new(match args.mode {
        Mode::Batch => (0..64).map(|_| batch_body(args.batch_size, args.videos)).collect(),
        Mode::Single => Vec::new(),
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..args.concurrency {
        let (http, stop, url, mode, batch_size, videos, bodies) =
            (http.clone(), stop.clone(), args.url.clone(), args.mode, args.batch_size, args.videos, bodies.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut rng = rand::rngs::SmallRng::from_os_rng();
            while !stop.load(Ordering::Relaxed) {
                let (request, events) = match mode {
                    Mode::Single => {
                        let video = rng.random_range(0..videos);
                        (http.post(format!("{url}/v1/videos/v{video:06}/views")), 1)
                    }
                    Mode::Batch => {
                        let body = bodies[rng.random_range(0..bodies.len())].clone();
                        let request =
                            http.post(format!("{url}/v1/events")).header("content-type", "application/json").body(body);
                        (request, batch_size as u64)
                    }
                };
                let sent = Instant::now();
                let ok = matches!(request.send().await, Ok(r) if r.status().as_u16() == 202);
                tally.latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if ok {
                    tally.events += events;
                } else {
                    tally.errors += 1;
                }
            }
            tally
        }));
    }
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await?;
        all.latencies_us.extend(tally.latencies_us);
        all.events += tally.events;
        all.errors += tally.errors;
    }
    let seconds = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let percentile = |p: f64| -> f64 {
        let v = &all.latencies_us;
        if v.is_empty() { 0.0 } else { f64::from(v[((v.len() - 1) as f64 * p) as usize]) / 1000.0 }
    };
    let requests = all.latencies_us.len() as f64;
    println!(
        "{}",
        serde_json::json!({
            "mode": format!("{:?}", args.mode).to_lowercase(),
            "concurrency": args.concurrency,
            "batch_size": if matches!(args.mode, Mode::Batch) { args.batch_size } else { 1 },
            "seconds": (seconds * 10.0).round() / 10.0,
            "requests": requests,
            "errors": all.errors,
            "events_per_s": (all.events as f64 / seconds).round(),
            "requests_per_s": (requests / seconds).round(),
            "p50_ms": percentile(0.50),
            "p99_ms": percentile(0.99),
        })
    );
    Ok(())
}
