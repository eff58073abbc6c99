//! `videocount`: operate a videocount database from the command line.

use anyhow::Context;
use clap::{Parser, Subcommand};
use videocount_clickhouse::{ClickHouse, ClickHouseConfig, replay, schema};

#[derive(Parser, Debug)]
#[command(version, about = "Operate a videocount ClickHouse database.")]
struct Cli {
    /// ClickHouse HTTP endpoint.
    #[arg(long, global = true, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    /// Database holding the tables of sql/schema.sql.
    #[arg(long, global = true, env = "CLICKHOUSE_DATABASE", default_value = "video_counts")]
    database: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create the database and apply sql/schema.sql to it (idempotent).
    Schema,
    /// Recompute every count table from events_raw and swap the results in. Stop the job first.
    Replay {
        /// Topic whose committed events are replayed.
        #[arg(long, env = "VIDEOCOUNT_TOPIC", default_value = "video-events")]
        topic: String,
        /// Checkpoint name of the job.
        #[arg(long, env = "VIDEOCOUNT_JOB_NAME", default_value = "view_counts")]
        job_name: String,
        /// Keep the replaced tables as *_old_<timestamp>.
        #[arg(long)]
        keep_old: bool,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("videocount: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = ClickHouseConfig {
        url: cli.clickhouse_url.clone(),
        database: cli.database.clone(),
        ..ClickHouseConfig::default()
    };
    config.validate()?;
    let clickhouse = ClickHouse::new(config);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Schema => {
                schema::apply(&clickhouse).await.with_context(|| {
                    format!("applying sql/schema.sql to {} at {}", cli.database, cli.clickhouse_url)
                })?;
                println!("schema applied to database {}", cli.database);
            }
            Command::Replay { topic, job_name, keep_old } => {
                let report = replay::replay_from_raw(&clickhouse, &job_name, &topic, keep_old)
                    .await
                    .with_context(|| format!("replaying {} in {}", topic, cli.database))?;
                println!(
                    "replayed {} events (epochs up to {:?}) into fresh count tables and swapped them in{}",
                    report.events,
                    report.last_committed_epoch,
                    if report.old_tables.is_empty() {
                        String::new()
                    } else {
                        format!("; old tables kept: {}", report.old_tables.join(", "))
                    }
                );
            }
        }
        Ok(())
    })
}
