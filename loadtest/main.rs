//! `load_test`: `run` (make load-test) and `stress` (make stress-test) against a running
//! videocount: ingest, both jobs and the query service.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use videocount_loadtest::{LoadConfig, StressConfig, run, stress};

#[derive(Parser, Debug)]
#[command(version, about = "Load and stress tests of a running videocount, through its write and read APIs.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Steady rate for a while, then check every accepted event through the read API.
    Run {
        #[command(flatten)]
        load: LoadArgs,
        /// Events per second.
        #[arg(long, default_value_t = 2_000.0)]
        rate: f64,
        /// Skip the exactness check.
        #[arg(long)]
        no_check: bool,
        /// Fail when more than this share of the events fail (0.001 = 0.1 %).
        #[arg(long, default_value_t = 0.001)]
        max_error_rate: f64,
    },
    /// Rising rates until request p99, errors or freshness p99 break their bound.
    Stress {
        #[command(flatten)]
        load: LoadArgs,
        #[arg(long, default_value_t = 2_000.0)]
        start_rate: f64,
        #[arg(long, default_value_t = 2.0)]
        factor: f64,
        #[arg(long, default_value_t = 1_000_000.0)]
        max_rate: f64,
        /// Request latency p99 bound, ms (send to Kafka ack).
        #[arg(long, default_value_t = 500.0)]
        p99_bound_ms: f64,
        /// Freshness p99 bound, seconds.
        #[arg(long, default_value_t = 10.0)]
        freshness_bound_s: f64,
        /// Error-rate bound.
        #[arg(long, default_value_t = 0.001)]
        error_bound: f64,
    },
}

#[derive(Args, Debug)]
struct LoadArgs {
    /// Ingest service base URLs (comma-separated: the client balances over them).
    #[arg(long, env = "VIDEOCOUNT_INGEST_URL", value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    ingest_url: Vec<String>,
    /// Query service base URLs (comma-separated: reads go to the first that answers).
    #[arg(long, env = "VIDEOCOUNT_QUERY_URL", value_delimiter = ',', default_value = "http://127.0.0.1:8081")]
    query_url: Vec<String>,
    #[arg(long, env = "VIDEOCOUNT_INGEST_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds per run (per step for stress).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[arg(long, default_value_t = 1_000)]
    videos: u64,
    /// Zipf exponent over the videos.
    #[arg(long, default_value_t = 1.1)]
    zipf: f64,
    /// Seconds the check waits for the counts to settle.
    #[arg(long, default_value_t = 120.0)]
    settle: f64,
    /// Canaries probing freshness at once (each on its own video).
    #[arg(long, default_value_t = 4)]
    canaries: usize,
    /// Milliseconds each canary waits between probes.
    #[arg(long, default_value_t = 250)]
    canary_every_ms: u64,
    /// Read requests in flight during the check.
    #[arg(long, default_value_t = 16)]
    check_concurrency: usize,
    /// Also print the report as one JSON line (prefixed `RESULT `).
    #[arg(long)]
    json: bool,
}

impl LoadArgs {
    fn config(&self, rate: f64, check: bool) -> anyhow::Result<LoadConfig> {
        anyhow::ensure!(self.duration > 0.0 && self.settle >= 0.0, "--duration must be above 0, --settle at least 0");
        anyhow::ensure!(self.zipf > 0.0, "--zipf must be above 0");
        Ok(LoadConfig {
            ingest_urls: self.ingest_url.clone(),
            query_urls: self.query_url.clone(),
            token: self.token.clone(),
            rate,
            duration: Duration::from_secs_f64(self.duration),
            videos: self.videos,
            zipf: self.zipf,
            check,
            settle: Duration::from_secs_f64(self.settle),
            canaries: self.canaries,
            canary_every: Duration::from_millis(self.canary_every_ms),
            check_concurrency: self.check_concurrency,
        })
    }
}

/// Runs the command; `false` when a load test failed its check.
async fn main_async(cli: Cli) -> anyhow::Result<bool> {
    match cli.command {
        Command::Run { load, rate, no_check, max_error_rate } => {
            let config = load.config(rate, !no_check)?;
            println!(
                "load test: {rate:.0} events/s for {:.0} s over {} videos (Zipf {}), ingest {}, query {}",
                load.duration,
                load.videos,
                load.zipf,
                load.ingest_url.join(","),
                load.query_url.join(",")
            );
            let report = run(&config).await?;
            report.print();
            if load.json {
                println!("RESULT {}", serde_json::to_string(&report)?);
            }
            let passed = report.passed(max_error_rate);
            println!("load test {}", if passed { "PASSED" } else { "FAILED" });
            Ok(passed)
        }
        Command::Stress { load, start_rate, factor, max_rate, p99_bound_ms, freshness_bound_s, error_bound } => {
            anyhow::ensure!(start_rate > 0.0 && factor > 1.0, "--start-rate must be above 0 and --factor above 1");
            let config = StressConfig {
                load: load.config(start_rate, false)?,
                start_rate,
                factor,
                max_rate,
                p99_bound_ms,
                freshness_bound_s,
                error_bound,
            };
            println!(
                "stress test: from {start_rate:.0} events/s, x{factor} per {:.0} s step, until request p99 > {p99_bound_ms} ms, \
                 errors > {:.2} % or freshness p99 > {freshness_bound_s} s",
                load.duration,
                100.0 * error_bound
            );
            let report = stress(&config).await?;
            report.print();
            if load.json {
                println!("RESULT {}", serde_json::to_string(&report)?);
            }
            Ok(true)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    videocount_http::main("load_test", async move {
        if main_async(cli).await? { Ok(()) } else { anyhow::bail!("the load test failed (see above)") }
    })
}
