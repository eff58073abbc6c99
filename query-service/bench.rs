//! `query_bench`: the read-path benchmark. `make bench-query` runs it.
//!
//! - `query_bench load`: fills a database with a year of events for 10,000 videos, generated
//!   inside ClickHouse: `events_raw` first (skewed over the videos: a few are popular), then the
//!   minute, hour and day tables as exact GROUP BYs of it, month by month.
//! - `query_bench run`: 100 concurrent clients over random ranges (log-uniform lengths from a
//!   minute to a year; half end now) against the query service, per read call; then the same
//!   counts as plain SQL over `events_raw`. Prints one JSON line per run: p50/p99/p999 and
//!   requests/s.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand, ValueEnum};
use rand::{Rng, SeedableRng};
use videocount_clickhouse::{ClickHouse, ClickHouseConfig, schema};
use videocount_events::clock::now_ms;

#[derive(Parser, Debug)]
#[command(about = "Loads a year of data and measures the read API against it.")]
struct Args {
    #[arg(long, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    clickhouse_url: String,
    #[arg(long, default_value = "bench_query")]
    database: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Creates the tables and loads a year of events (skipped when the database holds them).
    Load {
        #[arg(long, default_value_t = 10_000)]
        videos: u64,
        /// Events over the year, all videos together.
        #[arg(long, default_value_t = 50_000_000)]
        events: u64,
        /// Views over the year of one more video, `heavy000`: a popular video, where the
        /// rollups matter.
        #[arg(long, default_value_t = 10_000_000)]
        heavy_events: u64,
    },
    /// Measures one read call.
    Run {
        #[arg(long, default_value = "http://127.0.0.1:18091")]
        url: String,
        #[arg(long, value_enum)]
        call: Call,
        #[arg(long, default_value_t = 100)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 10_000)]
        videos: u64,
        /// Ask for this video only (e.g. heavy000) instead of random ones.
        #[arg(long)]
        video: Option<String>,
        /// Ranges of whole minutes (both ends floored to a minute).
        #[arg(long)]
        aligned: bool,
        /// Ranges inside the last hour (the hot window), unaligned unless --aligned.
        #[arg(long)]
        hot: bool,
    },
    /// Asks for every video's views once and waits until the service holds them all in memory;
    /// prints how long that took and the memory the keys take.
    Warm {
        #[arg(long, default_value = "http://127.0.0.1:18091")]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        videos: u64,
        #[arg(long, default_value_t = 8)]
        clients: u64,
    },
    /// Waits for the service's stats warm-up, then asks for every video's watch-time p50 and
    /// distinct viewers once and waits until the stats memory loaded them all (keys the warm-up
    /// did not take load on these requests); prints how long each took and the memory they take.
    WarmStats {
        #[arg(long, default_value = "http://127.0.0.1:18091")]
        url: String,
        #[arg(long, default_value_t = 10_000)]
        videos: u64,
        #[arg(long, default_value_t = 8)]
        clients: u64,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Call {
    /// `GET /v1/videos/{id}/views`.
    Views,
    /// `GET /v1/videos/{id}/events/like/count`.
    Count,
    /// `GET /v1/videos/{id}/events/watch_time/stats/p50`.
    Stats,
    /// `GET /v1/videos/{id}/events/view/stats/uniq`.
    Uniq,
    /// Views as plain SQL over events_raw, straight to ClickHouse.
    RawSql,
    /// `GET /v1/top?window=1h|24h&limit=100`: the lists view_counts keeps, from memory.
    Top,
    /// `GET /v1/top?limit=100` over the last hour: a sum over the minute table per request.
    TopScan,
}

const DAY_MS: u64 = 86_400_000;
const YEAR_MS: u64 = 365 * DAY_MS;

async fn raw_events(clickhouse: &ClickHouse, condition: &str) -> anyhow::Result<u64> {
    let sql = format!("SELECT toUInt64(count()) FROM events_raw WHERE {condition}");
    let have: Vec<u64> = clickhouse.fetch_all(clickhouse.client().query(&sql)).await.map_err(anyhow::Error::msg)?;
    Ok(have.first().copied().unwrap_or(0))
}

/// Inserts the rollups of the raw events matching `condition`, month by month.
async fn roll_up(clickhouse: &ClickHouse, condition: &str, now: u64, started: Instant) -> anyhow::Result<()> {
    let months = 12;
    for (table, bucket) in [
        ("event_counts_minute", "toStartOfMinute(toDateTime(intDiv(ts, 1000), 'UTC'))"),
        ("event_counts_hour", "toStartOfHour(toDateTime(intDiv(ts, 1000), 'UTC'))"),
        ("event_counts_day", "toDate(toDateTime(intDiv(ts, 1000), 'UTC'))"),
    ] {
        for month in 0..=months {
            let from = now - YEAR_MS + month * YEAR_MS / months;
            let to = from + YEAR_MS / months;
            let sql = format!(
                "INSERT INTO {table} SELECT video_id, event_type, {bucket} AS b, count() AS count, 0 AS epoch \
                 FROM events_raw WHERE ts >= {from} AND ts < {to} AND {condition} GROUP BY video_id, event_type, b"
            );
            clickhouse.execute(&sql).await?;
        }
        println!("load: {table} ({:.0?})", started.elapsed());
    }
    Ok(())
}

async fn load(clickhouse: &ClickHouse, videos: u64, events: u64, heavy_events: u64) -> anyhow::Result<()> {
    schema::apply(clickhouse).await?;
    let now = now_ms();
    let start = Instant::now();
    let heavy = "video_id = 'heavy000'";
    if raw_events(clickhouse, heavy).await? == 0 && heavy_events > 0 {
        let sql = format!(
            "INSERT INTO events_raw (video_id, event_type, ts, partition, offset) \
             SELECT 'heavy000', 'view', {now} - {YEAR_MS} + cityHash64(number, 5) % {YEAR_MS}, 0, number \
             FROM numbers({heavy_events})"
        );
        clickhouse.execute(&sql).await?;
        roll_up(clickhouse, heavy, now, start).await?;
        println!("load: {heavy_events} views of heavy000 ({:.0?})", start.elapsed());
    }
    let have = raw_events(clickhouse, &format!("NOT {heavy}")).await?;
    if have > 0 {
        println!("load: {} already holds {have} raw events of the other videos; keeping them", clickhouse.database());
        return Ok(());
    }
    let start = Instant::now();
    // The video of event n: the product of two uniform draws in [0, 1) times the number of
    // videos, so low ids are popular and every id has events (a product of two whole numbers
    // below sqrt(videos) would reach only about 2,900 of 10,000 ids).
    let months = 12;
    let per_month = events / months;
    for month in 0..months {
        let offset = month * per_month;
        let sql = format!(
            "INSERT INTO events_raw (video_id, event_type, ts, partition, offset) \
             SELECT concat('vid', substring(toString(1000000 + toUInt64((cityHash64(number, 1) % 1000000) * \
                    (cityHash64(number, 2) % 1000000) * {videos} / 1000000000000)), 2)) AS video_id, \
                    multiIf(cityHash64(number, 3) % 100 < 80, 'view', cityHash64(number, 3) % 100 < 95, 'like', 'share'), \
                    {now} - {year} + ({month} * {year} / {months}) + cityHash64(number, 4) % ({year} / {months}), \
                    toUInt32(number % 8), number \
             FROM numbers({offset}, {per_month})",
            year = YEAR_MS,
        );
        clickhouse.execute(&sql).await?;
        println!("load: month {}/{months} of events_raw ({:.0?})", month + 1, start.elapsed());
    }
    roll_up(clickhouse, &format!("NOT {heavy}"), now, start).await?;
    clickhouse.execute("OPTIMIZE TABLE event_counts_day FINAL").await.ok();
    println!("load: done in {:.0?}", start.elapsed());
    Ok(())
}

/// A random range: length log-uniform from a minute to a year; half end now, the others at a
/// random point of the year.
fn random_range(rng: &mut impl Rng, now: u64) -> (u64, u64) {
    let length = (60_000f64 * (YEAR_MS as f64 / 60_000f64).powf(rng.random::<f64>())) as u64;
    let to = if rng.random::<bool>() { now } else { now - rng.random_range(0..=YEAR_MS - length) };
    (to - length, to)
}

/// A random range inside the last hour.
fn hot_range(rng: &mut impl Rng, now: u64) -> (u64, u64) {
    let from = now - rng.random_range(1..3_600_000);
    (from, rng.random_range(from..=now))
}

/// Which videos and ranges the clients ask for.
struct Pick {
    videos: u64,
    /// One video only instead of random ones.
    only: Option<String>,
    /// Whole-minute ranges.
    aligned: bool,
    /// Ranges inside the last hour.
    hot: bool,
}

#[derive(Default)]
struct Tally {
    latencies_us: Vec<u32>,
    errors: u64,
}

async fn run(clickhouse: ClickHouse, url: String, call: Call, clients: usize, seconds: u64, pick: Pick) {
    let Pick { videos, only, aligned, hot } = pick;
    let http = reqwest::Client::builder().pool_max_idle_per_host(clients).tcp_nodelay(true).build().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, stop, url, clickhouse, only) =
            (http.clone(), stop.clone(), url.clone(), clickhouse.clone(), only.clone());
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            let mut rng = rand::rngs::SmallRng::from_os_rng();
            while !stop.load(Ordering::Relaxed) {
                // Popular videos are asked for more, as they are watched more.
                let video = only.clone().unwrap_or_else(|| {
                    format!("vid{:06}", rng.random_range(0..videos).min(rng.random_range(0..videos)))
                });
                let (mut from, mut to) =
                    if hot { hot_range(&mut rng, now_ms()) } else { random_range(&mut rng, now_ms()) };
                if aligned {
                    (from, to) = (from / 60_000 * 60_000, to / 60_000 * 60_000);
                }
                let sent = Instant::now();
                let ok = match call {
                    Call::RawSql => {
                        let query = clickhouse
                            .client()
                            .query(
                                "SELECT toUInt64(count()) FROM events_raw WHERE video_id = ? AND event_type = 'view' \
                                 AND ts >= ? AND ts < ?",
                            )
                            .bind(&video)
                            .bind(from)
                            .bind(to);
                        clickhouse.fetch_all::<u64>(query).await.is_ok()
                    }
                    _ => {
                        let path = match call {
                            Call::Views => format!("/v1/videos/{video}/views?from={from}&to={to}"),
                            Call::Count => format!("/v1/videos/{video}/events/like/count?from={from}&to={to}"),
                            Call::Top => {
                                let window = if rng.random_bool(0.5) { "1h" } else { "24h" };
                                format!("/v1/top?event_type=view&window={window}&limit=100")
                            }
                            Call::TopScan => "/v1/top?event_type=view&limit=100".to_owned(),
                            Call::Uniq => format!("/v1/videos/{video}/events/view/stats/uniq?from={from}&to={to}"),
                            _ => format!("/v1/videos/{video}/events/watch_time/stats/p50?from={from}&to={to}"),
                        };
                        let response = http.get(format!("{url}{path}")).send().await;
                        match response {
                            Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                            _ => false,
                        }
                    }
                };
                tally.latencies_us.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                if !ok {
                    tally.errors += 1;
                }
            }
            tally
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Tally::default();
    for task in tasks {
        let tally = task.await.unwrap();
        all.latencies_us.extend(tally.latencies_us);
        all.errors += tally.errors;
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let quantile = |q: f64| {
        let n = all.latencies_us.len();
        if n == 0 { 0.0 } else { f64::from(all.latencies_us[((n as f64 * q) as usize).min(n - 1)]) / 1000.0 }
    };
    println!(
        "{}",
        serde_json::json!({
            "call": format!("{call:?}").to_lowercase(),
            "video": only.as_deref().unwrap_or("random"),
            "ranges": match (aligned, hot) {
                (true, false) => "whole minutes",
                (false, false) => "milliseconds",
                (true, true) => "whole minutes of the last hour",
                (false, true) => "milliseconds of the last hour",
            },
            "clients": clients,
            "requests": all.latencies_us.len(),
            "errors": all.errors,
            "requests_per_second": (all.latencies_us.len() as f64 / elapsed).round(),
            "p50_ms": quantile(0.5),
            "p99_ms": quantile(0.99),
            "p999_ms": quantile(0.999),
        })
    );
}

/// A gauge of the service's `/metrics`.
async fn gauge(http: &reqwest::Client, url: &str, name: &str) -> Option<f64> {
    let text = http.get(format!("{url}/metrics")).send().await.ok()?.text().await.ok()?;
    text.lines().find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// What a warm pass asks for: each path (after `/v1/videos/`) once over the last `span_ms`,
/// and the metrics (`videocount_query_{memory}_*`) of the memory that loads them.
struct WarmPass {
    what: &'static str,
    memory: &'static str,
    paths: Vec<String>,
    span_ms: u64,
}

/// The names of the benchmark's videos: `vid000000`.. and `heavy000`.
fn video_names(videos: u64) -> impl Iterator<Item = String> {
    (0..videos).map(|i| format!("vid{i:06}")).chain(["heavy000".to_owned()])
}

/// Waits for the service's own warm-up of `pass.memory` (it starts with the service, unless
/// --no-warm-up), then asks for every path once with `clients` clients and waits until that
/// memory loaded as many keys (some may have left again under the budget); prints how long
/// each took and the memory the keys take.
async fn warm(url: &str, clients: u64, pass: WarmPass) -> anyhow::Result<()> {
    let http = reqwest::Client::new();
    let metric = |name: &str| format!("videocount_query_{}_{name}", pass.memory);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(1800);
    let warm_up = loop {
        let seconds = gauge(&http, url, &metric("warm_up_seconds")).await.unwrap_or(-1.0);
        if seconds >= 0.0 || Instant::now() > deadline {
            break seconds;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    println!(
        "{}",
        serde_json::json!({
            "warm": format!("the service's warm-up ({})", pass.memory),
            "seconds": warm_up,
            "waited_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "keys": gauge(&http, url, &metric("warm_up_keys")).await.unwrap_or(0.0),
            "memory_mib": (gauge(&http, url, &metric("bytes")).await.unwrap_or(0.0) / 1048576.0 * 10.0).round() / 10.0,
        })
    );
    let started = Instant::now();
    let paths = Arc::new(pass.paths);
    let (failed, mut cold) = ask_all(&http, url, clients, &paths, pass.span_ms).await?;
    if failed > 0 {
        anyhow::bail!("{failed} of the warm pass's requests failed");
    }
    let asked = started.elapsed().as_secs_f64();
    // Until every path answers from memory (the loads its first requests queued are done).
    let deadline = Instant::now() + Duration::from_secs(1800);
    while cold > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(1)).await;
        cold = ask_all(&http, url, clients, &paths, pass.span_ms).await?.1;
    }
    let evictions = gauge(&http, url, &metric("evictions_total")).await.unwrap_or(0.0);
    if evictions > 0.0 {
        println!("warm: {evictions} keys left again under the memory budget");
    }
    println!(
        "{}",
        serde_json::json!({
            "warm": pass.what,
            "keys": gauge(&http, url, &metric("keys")).await.unwrap_or(0.0),
            "asked_seconds": (asked * 10.0).round() / 10.0,
            "loaded_seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "not_from_memory": cold,
            "memory_mib": (gauge(&http, url, &metric("bytes")).await.unwrap_or(0.0) / 1048576.0 * 10.0).round() / 10.0,
        })
    );
    Ok(())
}

/// Asks for every path once (`/v1/videos/{path}` over the last `span_ms`) with `clients`
/// clients: how many failed, and how many were not answered from memory.
async fn ask_all(
    http: &reqwest::Client,
    url: &str,
    clients: u64,
    paths: &Arc<Vec<String>>,
    span_ms: u64,
) -> anyhow::Result<(u64, u64)> {
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (http, paths, url) = (http.clone(), paths.clone(), url.to_owned());
        tasks.push(tokio::spawn(async move {
            let (mut failed, mut cold) = (0u64, 0u64);
            for path in paths.iter().skip(client as usize).step_by(clients as usize) {
                let to = now_ms();
                let answer = http.get(format!("{url}/v1/videos/{path}?from={}&to={to}", to - span_ms)).send().await;
                let answer = match answer {
                    Ok(answer) if answer.status().is_success() => answer.json::<serde_json::Value>().await.ok(),
                    _ => None,
                };
                match answer {
                    None => failed += 1,
                    Some(answer) if !answer["source"].as_str().is_some_and(|s| s.starts_with("memory")) => cold += 1,
                    Some(_) => {}
                }
            }
            (failed, cold)
        }));
    }
    let (mut failed, mut cold) = (0, 0);
    for task in tasks {
        let (f, c) = task.await?;
        (failed, cold) = (failed + f, cold + c);
    }
    Ok((failed, cold))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let config = ClickHouseConfig {
        url: args.clickhouse_url.clone(),
        database: args.database.clone(),
        request_timeout: Duration::from_secs(1800),
        ..ClickHouseConfig::default()
    };
    config.validate()?;
    let clickhouse = ClickHouse::new(config);
    match args.command {
        Command::Load { videos, events, heavy_events } => load(&clickhouse, videos, events, heavy_events).await,
        Command::Run { url, call, clients, seconds, videos, video, aligned, hot } => {
            run(clickhouse, url, call, clients, seconds, Pick { videos, only: video, aligned, hot }).await;
            Ok(())
        }
        Command::Warm { url, videos, clients } => {
            let paths = video_names(videos).map(|video| format!("{video}/views")).collect();
            let pass = WarmPass { what: "views of every video once", memory: "memory", paths, span_ms: 9 * YEAR_MS };
            warm(&url, clients, pass).await
        }
        Command::WarmStats { url, videos, clients } => {
            let paths = video_names(videos)
                .flat_map(|video| {
                    ["watch_time/stats/p50", "view/stats/uniq"].map(|what| format!("{video}/events/{what}"))
                })
                .collect();
            let what = "watch-time p50 and distinct viewers of every video once";
            warm(&url, clients, WarmPass { what, memory: "stats_memory", paths, span_ms: YEAR_MS }).await
        }
    }
}
