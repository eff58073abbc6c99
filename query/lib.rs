//! The read API as a library: `getViewsCount`, `getCount` and `getStats` of the design notes.
//!
//! A range is half-open, `[from, to)` in epoch milliseconds. Stats (and counts of a reader with
//! [`Edges::WholeMinutes`], the default) are answered in whole minutes: a minute belongs to the
//! range when its start does. A reader with [`Edges::Raw`] counts the partial minutes at both
//! ends from `events_raw`, so counts are exact to the millisecond ([`CountPlan`]). The range is cut into whole days, whole
//! hours and the remaining minutes ([`segments`]), so a one-year range reads at most 365 day
//! buckets, 46 hour buckets and 118 minute buckets per key, whatever the data.
//!
//! Counts are summed in ClickHouse. Stats merge the stored states of the function's aggregate
//! with the same code the job uses (`videocount_aggregates`), then finish them; per
//! bucket, the newest compacted state and the states of later epochs (`videocount_clickhouse::compact`).

mod range;
mod stats;

use clickhouse::Row;
use serde::Deserialize;
use videocount_aggregates::{Function, FunctionsConfig, Registry};
pub use videocount_clickhouse::rows::Grain;
use videocount_clickhouse::{ClickHouse, SinkError};
use videocount_events::{DEFAULT_EVENT_TYPE, valid_event_type, valid_video_id};

pub use crate::range::{MAX_RANGE_MS, Segment, TimeRange, format_time, parse_time, segments};
use crate::range::{ceil_to, floor_to};
pub use crate::stats::StatsAnswer;

pub use videocount_events::CANARY_PREFIX;

/// Why a query cannot be answered.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The caller's input is wrong: says which argument and which rule.
    #[error("{0}")]
    Invalid(String),
    /// The function is not kept for the event type (see `Reader::with_functions`): names those
    /// that are.
    #[error("{0}")]
    NotKept(String),
    /// ClickHouse failed or is unreachable.
    #[error(transparent)]
    Store(#[from] SinkError),
    /// A stored state could not be decoded.
    #[error("{0}")]
    Corrupt(String),
}

/// Points a series answers at most.
pub const MAX_SERIES_POINTS: u64 = 20_000;

/// How counts treat the partial minutes at the two ends of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Edges {
    /// Whole minutes from the rollups, the partial minutes from `events_raw`: exact to the
    /// millisecond. Needs the job's raw log (on unless `--no-events-raw`).
    Raw,
    /// Whole minutes only: a minute counts when its start is in the range.
    WholeMinutes,
}

impl Edges {
    /// As answers name it: `raw` or `whole_minutes`.
    pub fn name(self) -> &'static str {
        match self {
            Edges::Raw => "raw",
            Edges::WholeMinutes => "whole_minutes",
        }
    }
}

/// The pieces a count range is read from: whole minutes `[start_s, end_s)` from the rollups
/// and millisecond ranges from `events_raw`. Together they cover the range once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountPlan {
    pub minutes: (u64, u64),
    pub raw: Vec<(u64, u64)>,
}

impl CountPlan {
    pub fn new(range: TimeRange, edges: Edges) -> CountPlan {
        let up = ceil_to(range.from_ms, 60_000);
        match edges {
            Edges::WholeMinutes => {
                CountPlan { minutes: (up / 1000, ceil_to(range.to_ms, 60_000) / 1000), raw: Vec::new() }
            }
            Edges::Raw => {
                let down = floor_to(range.to_ms, 60_000);
                if up <= down {
                    let raw = [(range.from_ms, up), (down, range.to_ms)].into_iter().filter(|(a, b)| a < b).collect();
                    CountPlan { minutes: (up / 1000, down / 1000), raw }
                } else {
                    let raw = if range.from_ms < range.to_ms { vec![(range.from_ms, range.to_ms)] } else { Vec::new() };
                    CountPlan { minutes: (up / 1000, up / 1000), raw }
                }
            }
        }
    }

    /// The whole minutes as a range.
    pub fn minute_range(&self) -> TimeRange {
        TimeRange { from_ms: self.minutes.0 * 1000, to_ms: self.minutes.1.max(self.minutes.0) * 1000 }
    }
}

/// The bind values of a condition: dates for the day table, numbers otherwise.
enum Bounds {
    Dates(String, String),
    /// Epoch seconds (minute and hour tables) or milliseconds (`events_raw.ts`).
    Numbers(u64, u64),
}

impl Bounds {
    fn bind(self, query: clickhouse::query::Query) -> clickhouse::query::Query {
        match self {
            Bounds::Dates(start, end) => query.bind(start).bind(end),
            Bounds::Numbers(start, end) => query.bind(start).bind(end),
        }
    }
}

/// The SQL condition selecting a segment's buckets, and its two bind values.
fn bucket_condition(segment: &Segment) -> (String, Bounds) {
    match segment.grain {
        Grain::Day => {
            let date = |s: u64| format_time(s * 1000)[..10].to_owned();
            ("day >= toDate(?) AND day < toDate(?)".into(), Bounds::Dates(date(segment.start_s), date(segment.end_s)))
        }
        grain => {
            let column = grain.column();
            (
                format!("{column} >= toDateTime(?, 'UTC') AND {column} < toDateTime(?, 'UTC')"),
                Bounds::Numbers(segment.start_s, segment.end_s),
            )
        }
    }
}

fn check_ids(video_id: &str, event_type: &str) -> Result<(), QueryError> {
    if !valid_video_id(video_id) {
        return Err(QueryError::Invalid(format!("video_id {video_id:?} is not 1-64 characters of [A-Za-z0-9_-]")));
    }
    if !valid_event_type(event_type) {
        return Err(QueryError::Invalid(format!("event_type {event_type:?} is not 1-32 characters of [a-z0-9_]")));
    }
    Ok(())
}

/// The buckets of a series of `range` in steps of `step`: the first bucket's start (epoch
/// seconds), the width (seconds) and how many (the first is the one `from` falls in, the last
/// the one before `to`).
pub fn series_buckets(range: TimeRange, step: Grain) -> Result<(u64, u64, u64), QueryError> {
    let width = step.seconds();
    let first = floor_to(range.from_ms / 1000, width);
    let end = ceil_to(range.to_ms.div_ceil(1000), width);
    let points = (end - first) / width;
    if points > MAX_SERIES_POINTS {
        return Err(QueryError::Invalid(format!(
            "{points} points of one {} each; at most {MAX_SERIES_POINTS}: choose a coarser step or a shorter range",
            step.column()
        )));
    }
    Ok((first, width, points))
}

/// Reads counts and stats from one database.
#[derive(Clone, Debug)]
pub struct Reader {
    clickhouse: ClickHouse,
    registry: Registry,
    edges: Edges,
    /// What `event_stats` keeps per event type: a stats query for a function it does not keep
    /// is an error rather than a believable 0 or null.
    functions: FunctionsConfig,
}

impl Reader {
    /// A reader answering counts in whole minutes (see [`Reader::with_edges`]) and stats of
    /// the functions of the built-in config (see [`Reader::with_functions`]).
    pub fn new(clickhouse: ClickHouse, registry: Registry) -> Self {
        let functions = FunctionsConfig::load_or_default(None).expect("the built-in functions config is valid");
        Reader { clickhouse, registry, edges: Edges::WholeMinutes, functions }
    }

    /// The functions config `event_stats` runs with.
    pub fn with_functions(mut self, functions: FunctionsConfig) -> Self {
        self.functions = functions;
        self
    }

    /// How counts treat the partial minutes at the ends of a range.
    pub fn with_edges(mut self, edges: Edges) -> Self {
        self.edges = edges;
        self
    }

    pub fn edges(&self) -> Edges {
        self.edges
    }

    /// Resolves a function name, or says which names exist.
    pub fn function(&self, name: &str) -> Result<Function, QueryError> {
        self.registry.function(name).ok_or_else(|| {
            QueryError::Invalid(format!("unknown function {name:?}: use count, sum, min, max, avg, p1..p99 or uniq"))
        })
    }

    /// `getViewsCount`: events of type `view`.
    pub async fn views(&self, video_id: &str, range: TimeRange) -> Result<u64, QueryError> {
        self.count(video_id, DEFAULT_EVENT_TYPE, range).await
    }

    /// `getCount`: events of `event_type` (as counted by `view_counts`), with the reader's
    /// [`Edges`] rule.
    pub async fn count(&self, video_id: &str, event_type: &str, range: TimeRange) -> Result<u64, QueryError> {
        self.count_plan(video_id, event_type, &CountPlan::new(range, self.edges)).await
    }

    /// Counts the pieces of a plan: its whole minutes from the rollups, its raw ranges from
    /// `events_raw`. One query, whatever the plan.
    pub async fn count_plan(&self, video_id: &str, event_type: &str, plan: &CountPlan) -> Result<u64, QueryError> {
        check_ids(video_id, event_type)?;
        // One subquery per table, its buckets' conditions joined by OR: each subquery costs a
        // look at every part of its table, so fewer is faster.
        let mut parts: Vec<(String, Vec<Bounds>)> = Vec::new();
        for grain in [Grain::Day, Grain::Hour, Grain::Minute] {
            let (conditions, bounds): (Vec<String>, Vec<Bounds>) =
                segments(plan.minute_range()).iter().filter(|s| s.grain == grain).map(bucket_condition).unzip();
            if !conditions.is_empty() {
                let table = grain.table();
                let sql = format!(
                    "SELECT count FROM {table} WHERE video_id = ? AND event_type = ? AND ({})",
                    conditions.join(" OR ")
                );
                parts.push((sql, bounds));
            }
        }
        if !plan.raw.is_empty() {
            let conditions = vec!["(ts >= ? AND ts < ?)"; plan.raw.len()].join(" OR ");
            let sql = format!(
                "SELECT toUInt64(count()) AS count FROM events_raw WHERE video_id = ? AND event_type = ? AND ({conditions})"
            );
            parts.push((sql, plan.raw.iter().map(|&(from, to)| Bounds::Numbers(from, to)).collect()));
        }
        if parts.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "SELECT toUInt64(sum(count)) AS total FROM ({})",
            parts.iter().map(|(sql, _)| sql.as_str()).collect::<Vec<_>>().join(" UNION ALL ")
        );
        let mut query = self.clickhouse.client().query(&sql);
        for (_, bounds) in parts {
            query = query.bind(video_id).bind(event_type);
            for bound in bounds {
                query = bound.bind(query);
            }
        }
        #[derive(Row, Deserialize)]
        struct Total {
            total: u64,
        }
        let rows: Vec<Total> = self.clickhouse.fetch_all(query).await?;
        Ok(rows.first().map_or(0, |r| r.total))
    }

    /// The counts of `event_type` per bucket of `step` (whole buckets: the first is the one
    /// `from` falls in, the last the one before `to`), zeros included, oldest first.
    pub async fn series(
        &self,
        video_id: &str,
        event_type: &str,
        range: TimeRange,
        step: Grain,
    ) -> Result<Vec<(u64, u64)>, QueryError> {
        check_ids(video_id, event_type)?;
        let (first, width, points) = series_buckets(range, step)?;
        let end = first + points * width;
        if points == 0 {
            return Ok(Vec::new());
        }
        let (condition, bounds) = bucket_condition(&Segment { grain: step, start_s: first, end_s: end });
        let bucket = match step {
            Grain::Day => "toUInt64(toUInt32(day)) * 86400",
            Grain::Hour => "toUInt64(toUInt32(hour))",
            Grain::Minute => "toUInt64(toUInt32(minute))",
        };
        let sql = format!(
            "SELECT {bucket} AS bucket, toUInt64(sum(count)) AS total FROM {table} \
             WHERE video_id = ? AND event_type = ? AND {condition} GROUP BY bucket ORDER BY bucket",
            table = step.table()
        );
        let query = bounds.bind(self.clickhouse.client().query(&sql).bind(video_id).bind(event_type));
        #[derive(Row, Deserialize)]
        struct Point {
            bucket: u64,
            total: u64,
        }
        let rows: Vec<Point> = self.clickhouse.fetch_all(query).await?;
        let mut out: Vec<(u64, u64)> = (0..points).map(|i| (first + i * width, 0)).collect();
        for row in rows {
            if let Some(slot) = row.bucket.checked_sub(first).map(|d| (d / width) as usize).and_then(|i| out.get_mut(i))
            {
                slot.1 += row.total;
            }
        }
        Ok(out)
    }

    /// The `limit` videos with the most events of `event_type` in the range (whole minutes: a
    /// minute counts when its start is in the range), most first, ties by video_id. The
    /// freshness canaries' videos ([`CANARY_PREFIX`]) are left out.
    pub async fn top(&self, event_type: &str, range: TimeRange, limit: u32) -> Result<Vec<(String, u64)>, QueryError> {
        if !valid_event_type(event_type) {
            return Err(QueryError::Invalid(format!("event_type {event_type:?} is not 1-32 characters of [a-z0-9_]")));
        }
        let segments = segments(range);
        if segments.is_empty() || limit == 0 {
            return Ok(Vec::new());
        }
        let parts: Vec<(String, Bounds)> = segments
            .iter()
            .map(|s| {
                let (condition, bounds) = bucket_condition(s);
                let table = s.grain.table();
                (format!("SELECT video_id, count FROM {table} WHERE event_type = ? AND {condition}"), bounds)
            })
            .collect();
        let sql = format!(
            "SELECT video_id, toUInt64(sum(count)) AS total FROM ({}) WHERE video_id NOT LIKE '{CANARY_PREFIX}%' \
             GROUP BY video_id ORDER BY total DESC, video_id LIMIT ?",
            parts.iter().map(|(sql, _)| sql.as_str()).collect::<Vec<_>>().join(" UNION ALL ")
        );
        let mut query = self.clickhouse.client().query(&sql);
        for (_, bounds) in parts {
            query = bounds.bind(query.bind(event_type));
        }
        #[derive(Row, Deserialize)]
        struct Top {
            video_id: String,
            total: u64,
        }
        let rows: Vec<Top> = self.clickhouse.fetch_all(query.bind(limit)).await?;
        Ok(rows.into_iter().map(|r| (r.video_id, r.total)).collect())
    }

    /// Answers `Ok` when ClickHouse answers and the database has the count tables.
    pub async fn ready(&self) -> Result<(), QueryError> {
        let query = self
            .clickhouse
            .client()
            .query("SELECT toUInt64(count()) AS total FROM system.tables WHERE database = ? AND name = 'event_counts_minute'")
            .bind(self.clickhouse.database());
        #[derive(Row, Deserialize)]
        struct Total {
            total: u64,
        }
        let rows: Vec<Total> = self.clickhouse.fetch_all(query).await?;
        if rows.first().map_or(0, |r| r.total) == 0 {
            return Err(QueryError::Invalid(format!(
                "database {:?} has no event_counts_minute table: run `videocount schema`",
                self.clickhouse.database()
            )));
        }
        Ok(())
    }

    /// The ClickHouse handle the reader uses.
    pub fn clickhouse(&self) -> &ClickHouse {
        &self.clickhouse
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_raw_edge_plan_covers_each_millisecond_once(from in 0u64..4_000_000_000_000, len in prop_oneof![0u64..200_000, 0u64..100_000_000]) {
            let range = TimeRange { from_ms: from, to_ms: from + len };
            let plan = CountPlan::new(range, Edges::Raw);
            let mut pieces = plan.raw.clone();
            let minutes = plan.minute_range();
            prop_assert_eq!(minutes.from_ms % 60_000, 0);
            prop_assert_eq!(minutes.to_ms % 60_000, 0);
            if minutes.from_ms < minutes.to_ms {
                pieces.push((minutes.from_ms, minutes.to_ms));
            }
            pieces.sort_unstable();
            let mut at = range.from_ms;
            for (a, b) in pieces {
                prop_assert_eq!(a, at);
                prop_assert!(a < b);
                at = b;
            }
            prop_assert_eq!(at, range.to_ms);
            prop_assert!(plan.raw.iter().all(|(a, b)| b - a < 60_000));
        }
    }

    #[test]
    fn a_whole_minute_plan_counts_minutes_starting_in_the_range() {
        let plan = CountPlan::new(TimeRange { from_ms: 60_001, to_ms: 180_001 }, Edges::WholeMinutes);
        assert_eq!(plan, CountPlan { minutes: (120, 240), raw: vec![] });
        let plan = CountPlan::new(TimeRange { from_ms: 60_001, to_ms: 180_001 }, Edges::Raw);
        assert_eq!(plan, CountPlan { minutes: (120, 180), raw: vec![(60_001, 120_000), (180_000, 180_001)] });
        let plan = CountPlan::new(TimeRange { from_ms: 60_001, to_ms: 60_002 }, Edges::Raw);
        assert_eq!(plan.raw, vec![(60_001, 60_002)]);
        assert!(plan.minute_range().from_ms >= plan.minute_range().to_ms);
    }
}
