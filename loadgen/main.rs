//! `loadgen`: produce N events, or R events/s for D seconds, and write the expected counts.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use videocount_loadgen::{Amount, Spec, produce};

#[derive(Parser, Debug)]
#[command(about = "Produces generated video events to Kafka and writes the expected counts as JSON.")]
struct Args {
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    #[arg(long, env = "VIDEOCOUNT_TOPIC", default_value = "video-events")]
    topic: String,
    /// Number of messages to produce as fast as possible.
    #[arg(long, conflicts_with = "rate")]
    events: Option<u64>,
    /// Messages per second (with --duration).
    #[arg(long, requires = "duration")]
    rate: Option<u64>,
    /// Seconds to produce at --rate.
    #[arg(long)]
    duration: Option<u64>,
    /// Number of distinct videos.
    #[arg(long, default_value_t = 1000)]
    videos: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[arg(long, default_value_t = 0.05)]
    late_fraction: f64,
    #[arg(long, default_value_t = 0.01)]
    malformed_fraction: f64,
    #[arg(long, default_value_t = 0.01)]
    duplicate_fraction: f64,
    /// Give every valid event a distinct event_id, as the client library does (needs
    /// --duplicate-fraction 0: copies with one id are counted once).
    #[arg(long)]
    event_ids: bool,
    /// Skew over videos: rank k drawn with weight 1/k^s; 0 draws every video alike.
    #[arg(long, default_value_t = 1.1)]
    zipf_exponent: f64,
    /// Where to write the expected counts (JSON).
    #[arg(long)]
    expected: Option<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let amount = match (args.events, args.rate, args.duration) {
        (Some(n), None, _) => Amount::Count(n),
        (None, Some(r), Some(d)) => Amount::Rate { per_second: r, duration: Duration::from_secs(d) },
        _ => anyhow::bail!("give --events N, or --rate R --duration D"),
    };
    for (name, f) in
        [("late", args.late_fraction), ("malformed", args.malformed_fraction), ("duplicate", args.duplicate_fraction)]
    {
        anyhow::ensure!((0.0..=1.0).contains(&f), "--{name}-fraction must be within 0..1");
    }
    let spec = Spec {
        videos: args.videos,
        seed: args.seed,
        late_fraction: args.late_fraction,
        malformed_fraction: args.malformed_fraction,
        duplicate_fraction: args.duplicate_fraction,
        event_ids: args.event_ids,
        zipf_exponent: args.zipf_exponent,
    };
    anyhow::ensure!(args.zipf_exponent >= 0.0, "--zipf-exponent must be 0 or more");
    anyhow::ensure!(
        !args.event_ids || args.duplicate_fraction == 0.0,
        "--event-ids needs --duplicate-fraction 0: copies of an event with one id are counted once"
    );
    let started = std::time::Instant::now();
    let expected = produce(&args.brokers, &args.topic, spec, amount)?;
    let total = expected.events + expected.dead_letters.values().sum::<u64>();
    eprintln!(
        "loadgen: produced {total} messages ({} events, {} dead letters) in {:.1}s",
        expected.events,
        total - expected.events,
        started.elapsed().as_secs_f64()
    );
    if let Some(path) = args.expected {
        let rows: Vec<_> = expected.minutes.iter().map(|((v, t, m), n)| (v, t, m, n)).collect();
        let json =
            serde_json::json!({"events": expected.events, "dead_letters": expected.dead_letters, "minutes": rows});
        std::fs::write(&path, json.to_string()).with_context(|| format!("writing {path}"))?;
    }
    Ok(())
}
