//! `event_stats`: states of aggregate functions (count, sum, min, max, avg, percentiles,
//! distinct viewers) per (video_id, event_type, minute/hour/day) from Kafka into ClickHouse,
//! exactly once. See README.md and docs/exactly-once.md.

use clap::Parser;

// As in view_counts: per-epoch buffers would otherwise be faulted in again every second.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    let args = videocount_jobs::EventStatsArgs::parse();
    videocount_jobs::init_logging();
    match videocount_jobs::run_event_stats(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("event_stats: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
