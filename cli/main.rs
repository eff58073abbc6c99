//! `videocount`: read counts and stats, and operate a videocount database, from the command
//! line. Exit codes: 0 answered, 1 failed (ClickHouse unreachable, ...), 2 bad arguments.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use videocount_aggregates::{FunctionsConfig, Registry};
use videocount_clickhouse::compact::{RoundLimits, compact};
use videocount_clickhouse::config::ClickHouseArgs;
use videocount_clickhouse::{ClickHouse, replay, schema};
use videocount_lease::{Fence, LeaseArgs, LeaseError, describe_me};
use videocount_query::{CountPlan, Edges, QueryError, Reader, TimeRange, parse_time};

#[derive(Parser, Debug)]
#[command(version, about = "Operate a videocount ClickHouse database.")]
struct Cli {
    #[command(flatten)]
    clickhouse: ClickHouseArgs,
    #[command(subcommand)]
    command: Command,
}

/// The range of a read: half-open `[from, to)` in milliseconds, as the HTTP API takes it.
#[derive(Args, Debug)]
struct Range {
    /// Start (inclusive): RFC 3339 (2026-11-27T10:00:00Z) or epoch milliseconds.
    #[arg(long, value_parser = parse_time)]
    from: u64,
    /// End (exclusive), same forms; default: now.
    #[arg(long, value_parser = parse_time)]
    to: Option<u64>,
    /// Print the HTTP API's JSON answer instead of the bare number.
    #[arg(long)]
    json: bool,
    /// Count whole minutes only (a minute counts when its start is in the range) instead of
    /// reading the partial minutes at both ends from events_raw: for jobs run with
    /// --no-events-raw (the query service's --no-raw-edges, and its environment variable).
    /// Stats are always whole minutes.
    #[arg(long, env = "VIDEOCOUNT_QUERY_NO_RAW_EDGES")]
    whole_minutes: bool,
}

fn video_id(s: &str) -> Result<String, String> {
    if videocount_events::valid_video_id(s) {
        Ok(s.to_owned())
    } else {
        Err("a video id is 1-64 characters of [A-Za-z0-9_-]".into())
    }
}

fn event_type(s: &str) -> Result<String, String> {
    if videocount_events::valid_event_type(s) {
        Ok(s.to_owned())
    } else {
        Err("an event type is 1-32 characters of [a-z0-9_]".into())
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Views of a video in a range (getViewsCount), exact to the millisecond like the HTTP API.
    Views {
        #[arg(value_parser = video_id)]
        video_id: String,
        #[command(flatten)]
        range: Range,
    },
    /// Events of one type for a video in a range (getCount), exact to the millisecond like the
    /// HTTP API.
    Count {
        #[arg(value_parser = video_id)]
        video_id: String,
        #[arg(value_parser = event_type)]
        event_type: String,
        #[command(flatten)]
        range: Range,
    },
    /// A function over a video's events of one type in a range (getStats): count, sum, min,
    /// max, avg, p1..p99 or uniq, over the whole minutes that start in the range. Prints
    /// `null` where a function has no value without data (sum, min, max, avg, pNN); count and
    /// uniq of nothing are 0. A function event_stats does not keep for the type is an error.
    Stats {
        #[arg(value_parser = video_id)]
        video_id: String,
        #[arg(value_parser = event_type)]
        event_type: String,
        function: String,
        #[command(flatten)]
        range: Range,
        /// The functions config event_stats runs with (default: the built-in one).
        #[arg(long, env = "VIDEOCOUNT_FUNCTIONS")]
        functions: Option<std::path::PathBuf>,
    },
    /// Create the database and apply sql/schema.sql to it (idempotent).
    Schema,
    /// Merge the event_stats states of closed buckets into one row each (event_stats does this
    /// every --compact-every-secs itself).
    Compact {
        /// Topic event_stats reads.
        #[arg(long, env = "VIDEOCOUNT_TOPIC", default_value = "video-events")]
        topic: String,
        /// Checkpoint name of the job.
        #[arg(long, env = "VIDEOCOUNT_JOB_NAME", default_value = "event_stats")]
        job_name: String,
        /// Buckets whose end is less than this many seconds ago are left open.
        #[arg(long, default_value_t = 120)]
        grace_secs: u64,
        /// Unmerged states a round merges per table at most; rounds follow one another until
        /// every closed bucket is compacted.
        #[arg(long, default_value_t = 200_000, value_parser = clap::value_parser!(u64).range(1..))]
        max_states: u64,
    },
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
        /// Seconds each table's recomputation may take (a year of events takes minutes).
        #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
        timeout_secs: u64,
        /// The job's lease, which the replay holds so that the job cannot run meanwhile.
        #[command(flatten)]
        lease: LeaseArgs,
    },
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    videocount_http::init_logging();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("videocount: error: {e:#}");
            match e.downcast_ref::<QueryError>() {
                Some(QueryError::Invalid(_) | QueryError::NotKept(_)) => std::process::ExitCode::from(2),
                _ => std::process::ExitCode::FAILURE,
            }
        }
    }
}

impl Range {
    fn resolve(&self) -> Result<TimeRange, QueryError> {
        TimeRange::new(self.from, self.to.unwrap_or_else(videocount_events::clock::now_ms))
    }
}

/// Prints `answer`: the JSON object with `--json`, else its bare `value` (`null` for none).
fn print_answer(range: &Range, answer: serde_json::Value) {
    if range.json {
        println!("{answer}");
    } else if let Some(count) = answer["value"].as_u64() {
        println!("{count}");
    } else if let Some(value) = answer["value"].as_f64() {
        // Rust's shortest form: 103 for 103.0, 0.1 for 0.1.
        println!("{value}");
    } else {
        println!("null");
    }
}

/// `views` and `count`: the answer the HTTP API gives for the same range.
async fn count(reader: &Reader, video_id: String, event_type: String, range: &Range) -> anyhow::Result<()> {
    let resolved = range.resolve()?;
    let edges = if range.whole_minutes { Edges::WholeMinutes } else { Edges::Raw };
    let reader = reader.clone().with_edges(edges);
    let value = reader.count(&video_id, &event_type, resolved).await?;
    let answer = serde_json::json!({
        "video_id": video_id, "event_type": event_type, "range": resolved, "value": value, "edges": edges.name(), "source": "clickhouse",
    });
    print_answer(range, answer);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.clickhouse.config();
    config.validate()?;
    let clickhouse = ClickHouse::new(config);
    let reader = Reader::new(clickhouse.clone(), Registry::builtin());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    runtime.block_on(async {
        match cli.command {
            Command::Views { video_id, range } => {
                let event_type = videocount_events::DEFAULT_EVENT_TYPE.to_owned();
                count(&reader, video_id, event_type, &range).await?;
            }
            Command::Count { video_id, event_type, range } => count(&reader, video_id, event_type, &range).await?,
            Command::Stats { video_id, event_type, function, range, functions } => {
                let resolved = range.resolve()?;
                // A file that is missing or wrong is a bad argument (exit 2), like the others.
                let functions = FunctionsConfig::load_or_default(functions.as_deref())
                    .map_err(|e| QueryError::Invalid(format!("--functions: {e}")))?;
                let answer =
                    reader.with_functions(functions).stats(&video_id, &event_type, &function, resolved).await?;
                let minutes = CountPlan::new(resolved, Edges::WholeMinutes).minute_range();
                print_answer(
                    &range,
                    serde_json::json!({
                        "video_id": video_id, "event_type": event_type, "function": function,
                        "range": resolved, "minutes": minutes, "value": answer.value, "states": answer.states,
                    }),
                );
            }
            Command::Compact { topic, job_name, grace_secs, max_states } => {
                let now = u64::from(videocount_events::clock::now_secs());
                let mut limits = RoundLimits { max_states, ..RoundLimits::default() };
                let long = clickhouse.with_request_timeout(std::time::Duration::from_secs(600));
                let mut compacted_any = false;
                for round in 1.. {
                    let report =
                        compact(&long, &Registry::builtin(), &job_name, &topic, (now, grace_secs), limits.clone())
                            .await
                            .with_context(|| {
                                format!("compacting the stats of {job_name} on {topic} in {}", cli.clickhouse.database)
                            })?;
                    for table in &report.tables {
                        compacted_any = true;
                        println!(
                            "round {round}: {}: {} buckets from {} states, through epoch {}",
                            table.table, table.buckets, table.states, table.through_epoch
                        );
                    }
                    if !report.more {
                        break;
                    }
                    limits.after.extend(report.reached);
                }
                if !compacted_any {
                    println!("nothing to compact");
                }
            }
            Command::Schema => {
                schema::apply(&clickhouse).await.with_context(|| {
                    format!("applying sql/schema.sql to {} at {}", cli.clickhouse.database, cli.clickhouse.url)
                })?;
                println!("schema applied to database {}", cli.clickhouse.database);
            }
            Command::Replay { topic, job_name, keep_old, timeout_secs, lease } => {
                let timeout = std::time::Duration::from_secs(timeout_secs);
                // The job's lease (of process 0, which plans and commits every epoch): while the
                // replay holds it, the job cannot start, and a running job makes it refuse.
                let config = lease.config(&cli.clickhouse.database, &job_name, 0);
                let fence = Fence::unheld();
                let lease = videocount_lease::acquire_within(
                    &config,
                    &describe_me("videocount replay"),
                    &fence,
                    std::time::Duration::from_secs(3),
                )
                .await
                .map_err(|e| match e {
                    LeaseError::Held { holder, .. } => anyhow::anyhow!(
                        "{job_name} is running ({holder}): stop it first (make stop-job); a replay beside a running \
                         job would lose what it commits meanwhile"
                    ),
                    other => anyhow::Error::new(other).context("taking the job's lease for the replay"),
                })?;
                let report = replay::replay_from_raw(&clickhouse, &job_name, &topic, keep_old, timeout, &fence)
                    .await
                    .with_context(|| format!("replaying {} in {}", topic, cli.clickhouse.database))?;
                lease.release(std::time::Duration::from_secs(5)).await;
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
