//! `view_counts`: counts every event per (video_id, event_type, minute/hour/day) from Kafka
//! into ClickHouse, exactly once. See README.md and docs/exactly-once.md.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = videocount_jobs::JobArgs::parse();
    videocount_jobs::init_logging();
    match videocount_jobs::run_view_counts(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("view_counts: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
