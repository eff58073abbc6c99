//! The HTTP API: routes, validation of the parameters, and the answers.
//!
//! Every value a caller gives is checked before any query (ids by their character rules,
//! functions by name, times by parsing, ranges by order and length) and reaches ClickHouse
//! only as a bound value, never spliced into SQL text.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::handler::HandlerWithoutStateExt;
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::{Value, json};
use tower_http::services::ServeDir;
use videocount_clickhouse::SinkError;
use videocount_events::clock::now_ms;
use videocount_events::{DEFAULT_EVENT_TYPE, TRENDING_WINDOWS, valid_event_type, valid_video_id};
use videocount_http::{ApiError, Tracking};
use videocount_query::{
    CountPlan, Edges, Grain, QueryError, Reader, TimeRange, format_time, parse_time, segments, series_buckets,
};

use crate::live::{self, Golden};
use crate::memory::Memory;
use crate::metrics::Metrics;
use crate::stats_memory::StatsMemory;
use crate::trending::{Answer, Trending};

/// The OpenAPI description of every route.
pub const OPENAPI: &str = include_str!("openapi.json");
/// Videos `/v1/top` answers at most.
pub const MAX_TOP: u32 = 1000;

pub struct AppState {
    pub reader: Reader,
    pub memory: Option<Arc<Memory>>,
    pub stats_memory: Option<Arc<StatsMemory>>,
    pub trending: Option<Arc<Trending>>,
    pub metrics: Arc<Metrics>,
    pub golden: Arc<Golden>,
}

/// The routes; `ui_dir` (the built UI) is served at `/`.
pub fn router(state: Arc<AppState>, request_timeout: Duration, ui_dir: Option<PathBuf>) -> Router {
    let api = Router::new()
        .route("/v1/videos/{video_id}/views", get(views))
        .route("/v1/videos/{video_id}/events/{event_type}/count", get(count))
        .route("/v1/videos/{video_id}/events/{event_type}/stats/{function}", get(stats))
        .route("/v1/videos/{video_id}/events/{event_type}/series", get(series))
        .route("/v1/top", get(top))
        .route("/v1/live", get(live_panel))
        .route("/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }))
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/{*rest}", get(no_route))
        .layer(middleware::from_fn_with_state(
            crate::replicas::DelayHeader {
                clickhouse: state.reader.clickhouse().clone(),
                delay: state.metrics.replica_delay.clone(),
            },
            crate::replicas::header,
        ))
        .layer(middleware::from_fn_with_state(
            Arc::new(Tracking {
                metrics: state.metrics.http.clone(),
                deadline: request_timeout,
                late_message: String::new(),
            }),
            videocount_http::track,
        ))
        .with_state(state);
    // The UI's files (it routes nothing by path: anything else is the JSON 404), and for every
    // answer without a body of its own (405, a file service's 500) the JSON error body.
    let app = match ui_dir {
        Some(dir) => api.fallback_service(ServeDir::new(dir).not_found_service(no_route.into_service())),
        None => api.fallback(no_route),
    };
    app.layer(middleware::from_fn(videocount_http::json_errors)).layer(middleware::from_fn(reject_long_paths))
}

/// A path segment longer than any file name or id (255 bytes), or a path longer than any route
/// (1 KiB), is no route, before anything tries to open it (the file service answered 500 for
/// both: the system refuses such names).
async fn reject_long_paths(request: axum::extract::Request, next: middleware::Next) -> Response {
    let path = request.uri().path();
    if path.len() > 1024 || path.split('/').any(|segment| segment.len() > 255) {
        return no_route().await.into_response();
    }
    next.run(request).await
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found", "path", "no such route; GET /openapi.json lists them")
}

/// A bad argument: 400 naming `field`.
fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, "invalid argument", field, message)
}

/// A failed query: the caller's fault (400, naming `field`), ClickHouse unavailable (503)
/// or anything else (500).
fn query_error(state: &AppState, error: QueryError, field: &str) -> ApiError {
    match error {
        QueryError::Invalid(message) => invalid(field, message),
        QueryError::NotKept(message) => ApiError::new(StatusCode::NOT_FOUND, "function not kept", "function", message),
        QueryError::Store(SinkError::Unavailable(message)) => {
            state.metrics.clickhouse_errors.inc();
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "clickhouse unavailable", "", message)
                .retry_after(Duration::from_secs(1))
        }
        other => {
            state.metrics.clickhouse_errors.inc();
            tracing::error!(error = %other, "query failed");
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "", other.to_string())
        }
    }
}

/// A route's query string as its pairs, in order (so that a repeated name is seen).
type QueryString = Result<Query<Vec<(String, String)>>, QueryRejection>;

/// The query string, or a 400 naming what is wrong with it.
struct Params(HashMap<String, String>);

impl Params {
    fn new(query: QueryString, allowed: &[&str]) -> Result<Self, ApiError> {
        let Query(pairs) = query.map_err(|e| invalid("query", e.body_text()))?;
        let mut map = HashMap::with_capacity(pairs.len());
        for (name, value) in pairs {
            if !allowed.contains(&name.as_str()) {
                return Err(invalid(
                    &name,
                    format!("unknown parameter {name:?}; this route takes {}", allowed.join(", ")),
                ));
            }
            if map.contains_key(&name) {
                return Err(invalid(&name, format!("{name} is given more than once")));
            }
            map.insert(name, value);
        }
        Ok(Params(map))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str)
    }

    fn time(&self, name: &str) -> Result<Option<u64>, ApiError> {
        self.get(name).map(|text| parse_time(text).map_err(|message| invalid(name, message))).transpose()
    }

    /// `[from, to)`: `from` required unless `default_span` is given; `to` defaults to now.
    fn range(&self, default_span: Option<u64>) -> Result<TimeRange, ApiError> {
        let to = self.time("to")?.unwrap_or_else(now_ms);
        let from = match (self.time("from")?, default_span) {
            (Some(from), _) => from,
            (None, Some(span)) => to.saturating_sub(span),
            (None, None) => return Err(invalid("from", "from is required: RFC 3339 or epoch milliseconds")),
        };
        TimeRange::new(from, to).map_err(|e| invalid("range", e.to_string()))
    }
}

fn check_video(video_id: &str) -> Result<(), ApiError> {
    if valid_video_id(video_id) {
        Ok(())
    } else {
        Err(invalid("video_id", format!("{video_id:?} is not 1-64 characters of [A-Za-z0-9_-]")))
    }
}

fn check_type(event_type: &str) -> Result<(), ApiError> {
    if valid_event_type(event_type) {
        Ok(())
    } else {
        Err(invalid("event_type", format!("{event_type:?} is not 1-32 characters of [a-z0-9_]")))
    }
}

fn echo(range: TimeRange) -> Value {
    json!(range)
}

/// Counts `[from, to)`: the whole minutes from memory when it holds the key (else it loads it
/// for later requests), the rest (the partial minutes at the edges, or everything) in one query.
/// `source` says where the answer came from: `memory` (edges included), `memory+raw` (whole
/// minutes from memory, the edges from `events_raw`) or `clickhouse`; `edges` says where the
/// partial minutes came from: `memory` (its kept event times), `raw` or `whole_minutes`.
async fn count_range(state: &AppState, video_id: &str, event_type: &str, range: TimeRange) -> Result<Value, ApiError> {
    let plan = CountPlan::new(range, state.reader.edges());
    let mut rest = plan.clone();
    let (start, end) = plan.minutes;
    let from_memory = state.memory.as_ref().and_then(|memory| {
        let found = memory.count(video_id, event_type, start, end.max(start));
        if found.is_none() {
            memory.want(video_id, event_type);
        }
        found
    });
    // The partial minutes at the edges: from the event times memory keeps of them, else from
    // events_raw (and memory reads that minute's times for later requests).
    let mut edges_from_memory = 0;
    if let (Some(memory), Some(_)) = (&state.memory, from_memory) {
        rest.minutes.1 = start;
        rest.raw.retain(|&(from_ms, to_ms)| match memory.edge(video_id, event_type, from_ms, to_ms) {
            Some(count) => {
                edges_from_memory += count;
                false
            }
            None => {
                memory.want_edge(video_id, event_type, from_ms);
                true
            }
        });
    }
    let stored = if from_memory.is_some() && rest.raw.is_empty() {
        0
    } else {
        state.reader.count_plan(video_id, event_type, &rest).await.map_err(|e| query_error(state, e, "range"))?
    };
    let source = match (from_memory.is_some(), rest.raw.is_empty()) {
        (true, true) => "memory",
        (true, false) => "memory+raw",
        (false, _) => "clickhouse",
    };
    let edges = if plan.raw.is_empty() || !rest.raw.is_empty() { state.reader.edges().name() } else { "memory" };
    Ok(json!({
        "video_id": video_id,
        "event_type": event_type,
        "range": echo(range),
        "value": from_memory.unwrap_or(0) + edges_from_memory + stored,
        "edges": edges,
        "source": source,
    }))
}

async fn views(
    State(state): State<Arc<AppState>>,
    Path(video_id): Path<String>,
    query: QueryString,
) -> Result<axum::Json<Value>, ApiError> {
    check_video(&video_id)?;
    let range = Params::new(query, &["from", "to"])?.range(None)?;
    Ok(axum::Json(count_range(&state, &video_id, DEFAULT_EVENT_TYPE, range).await?))
}

async fn count(
    State(state): State<Arc<AppState>>,
    Path((video_id, event_type)): Path<(String, String)>,
    query: QueryString,
) -> Result<axum::Json<Value>, ApiError> {
    check_video(&video_id)?;
    check_type(&event_type)?;
    let range = Params::new(query, &["from", "to"])?.range(None)?;
    Ok(axum::Json(count_range(&state, &video_id, &event_type, range).await?))
}

async fn stats(
    State(state): State<Arc<AppState>>,
    Path((video_id, event_type, function)): Path<(String, String, String)>,
    query: QueryString,
) -> Result<axum::Json<Value>, ApiError> {
    check_video(&video_id)?;
    check_type(&event_type)?;
    let resolved = state.reader.function(&function).map_err(|e| invalid("function", e.to_string()))?;
    let range = Params::new(query, &["from", "to"])?.range(None)?;
    // The states from memory when it holds the key (else it loads it meanwhile), or ClickHouse.
    let from_memory = state.stats_memory.as_ref().and_then(|memory| {
        let found = memory.merge(&video_id, &event_type, resolved.aggregate, &segments(range));
        if found.is_none() {
            memory.want(&video_id, &event_type, resolved.aggregate);
        }
        found
    });
    let source = if from_memory.is_some() { "memory" } else { "clickhouse" };
    let answer = match from_memory {
        Some((merged, states)) => state.reader.stats_answer(&event_type, &resolved, &merged, states),
        None => state.reader.stats(&video_id, &event_type, &function, range).await,
    }
    .map_err(|e| query_error(&state, e, "range"))?;
    let minutes = CountPlan::new(range, Edges::WholeMinutes).minute_range();
    Ok(axum::Json(json!({
        "video_id": video_id,
        "event_type": event_type,
        "function": function,
        "range": echo(range),
        "minutes": echo(minutes),
        "value": answer.value,
        "states": answer.states,
        "source": source,
    })))
}

/// The step a range gets when the caller names none: about 30 to 1,500 points.
pub fn default_step(range: TimeRange) -> Grain {
    let span = range.to_ms - range.from_ms;
    if span <= 24 * 3_600_000 {
        Grain::Minute
    } else if span <= 60 * 86_400_000 {
        Grain::Hour
    } else {
        Grain::Day
    }
}

async fn series(
    State(state): State<Arc<AppState>>,
    Path((video_id, event_type)): Path<(String, String)>,
    query: QueryString,
) -> Result<axum::Json<Value>, ApiError> {
    check_video(&video_id)?;
    check_type(&event_type)?;
    let params = Params::new(query, &["from", "to", "step"])?;
    let range = params.range(None)?;
    let step = match params.get("step") {
        None => default_step(range),
        Some("minute") => Grain::Minute,
        Some("hour") => Grain::Hour,
        Some("day") => Grain::Day,
        Some(other) => return Err(invalid("step", format!("{other:?} is not minute, hour or day"))),
    };
    let (first, width, count) = series_buckets(range, step).map_err(|e| query_error(&state, e, "step"))?;
    let from_memory = state.memory.as_ref().and_then(|memory| {
        let found = memory.series(&video_id, &event_type, first, width, count);
        if found.is_none() {
            memory.want(&video_id, &event_type);
        }
        found
    });
    let points = match from_memory {
        Some(counts) => counts.into_iter().enumerate().map(|(i, n)| (first + i as u64 * width, n)).collect(),
        None => state
            .reader
            .series(&video_id, &event_type, range, step)
            .await
            .map_err(|e| query_error(&state, e, "step"))?,
    };
    let total: u64 = points.iter().map(|p| p.1).sum();
    let points: Vec<Value> =
        points.into_iter().map(|(t, n)| json!({"t": format_time(t * 1000), "t_ms": t * 1000, "count": n})).collect();
    Ok(axum::Json(json!({
        "video_id": video_id,
        "event_type": event_type,
        "range": echo(range),
        "step": step.column(),
        "total": total,
        "points": points,
    })))
}

/// `/v1/top`: with `window` (1h or 24h), the list view_counts keeps of that window of event time,
/// from memory; with `from`/`to` (or neither), a sum over the count tables.
async fn top(State(state): State<Arc<AppState>>, query: QueryString) -> Result<axum::Json<Value>, ApiError> {
    let params = Params::new(query, &["event_type", "from", "to", "limit", "window"])?;
    let event_type = params.get("event_type").unwrap_or(DEFAULT_EVENT_TYPE).to_owned();
    check_type(&event_type)?;
    let limit = match params.get("limit") {
        None => 10,
        Some(text) => text
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=MAX_TOP).contains(n))
            .ok_or_else(|| invalid("limit", format!("{text:?} is not a whole number from 1 to {MAX_TOP}")))?,
    };
    if let Some(window) = params.get("window") {
        if params.get("from").is_some() || params.get("to").is_some() {
            return Err(invalid("window", "window names its own range: give window, or from and to, not both"));
        }
        if !TRENDING_WINDOWS.iter().any(|(name, _)| *name == window) {
            return Err(invalid("window", format!("{window:?} is not 1h or 24h")));
        }
        let Some(trending) = &state.trending else {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "top lists off",
                "window",
                "this service runs with --no-memory",
            ));
        };
        let (list, other) = match trending.top(&event_type, window, limit as usize) {
            Answer::List(list, other) => (list, other),
            Answer::Unavailable(message) => {
                return Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "top lists unavailable", "window", message)
                    .retry_after(Duration::from_secs(1)));
            }
        };
        let range = list.as_ref().map(|l| (l.from_ms, l.to_ms)).or(other);
        let videos: Vec<Value> = list
            .map(|l| l.videos)
            .unwrap_or_default()
            .into_iter()
            .map(|(id, n)| json!({"video_id": id, "count": n}))
            .collect();
        let range = range.map(|(from_ms, to_ms)| echo(TimeRange { from_ms, to_ms }));
        return Ok(axum::Json(json!({
            "event_type": event_type,
            "window": window,
            "range": range,
            "videos": videos,
            "source": "trending",
        })));
    }
    let range = params.range(Some(3_600_000))?;
    let videos = state.reader.top(&event_type, range, limit).await.map_err(|e| query_error(&state, e, "range"))?;
    let videos: Vec<Value> = videos.into_iter().map(|(id, n)| json!({"video_id": id, "count": n})).collect();
    Ok(axum::Json(json!({
        "event_type": event_type,
        "range": echo(range),
        "minutes": echo(CountPlan::new(range, Edges::WholeMinutes).minute_range()),
        "videos": videos,
    })))
}

async fn live_panel(State(state): State<Arc<AppState>>) -> Result<axum::Json<Value>, ApiError> {
    let clickhouse = state.reader.clickhouse();
    let (jobs, dead) = tokio::join!(live::jobs(clickhouse), live::dead_letters(clickhouse, 10));
    let jobs = jobs.map_err(|e| query_error(&state, e, ""))?;
    let dead = dead.map_err(|e| query_error(&state, e, ""))?;
    Ok(axum::Json(json!({
        "now": format_time(now_ms()),
        "golden": state.golden.snapshot(),
        "freshness": state.metrics.canary.snapshot(),
        "jobs": jobs,
        "dead_letters": dead,
    })))
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.reader.ready().await {
        Ok(()) => {
            axum::Json(json!({"status": "ready", "database": state.reader.clickhouse().database()})).into_response()
        }
        Err(reason) => {
            (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "not ready", "reason": reason.to_string()})))
                .into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = &state.metrics;
    if let Some(memory) = &state.memory {
        metrics.memory_keys.set(memory.len() as i64);
        metrics.memory_bytes.set(memory.bytes() as i64);
        metrics.memory_age.set(memory.age().map_or(-1.0, |age| age.as_secs_f64()));
    }
    if let Some(stats_memory) = &state.stats_memory {
        metrics.stats_memory_keys.set(stats_memory.len() as i64);
        metrics.stats_memory_bytes.set(stats_memory.bytes() as i64);
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_document_lists_every_route() {
        let doc: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = doc["paths"].as_object().expect("paths");
        for route in [
            "/v1/videos/{video_id}/views",
            "/v1/videos/{video_id}/events/{event_type}/count",
            "/v1/videos/{video_id}/events/{event_type}/stats/{function}",
            "/v1/videos/{video_id}/events/{event_type}/series",
            "/v1/top",
            "/v1/live",
            "/healthz",
            "/readyz",
            "/metrics",
            "/openapi.json",
        ] {
            assert!(paths.contains_key(route), "{route} is described");
        }
        assert_eq!(paths.len(), 10, "no route described that does not exist");
    }

    #[test]
    fn the_default_step_keeps_charts_readable() {
        let range = |hours: u64| TimeRange { from_ms: 0, to_ms: hours * 3_600_000 };
        assert_eq!(default_step(range(1)), Grain::Minute);
        assert_eq!(default_step(range(24)), Grain::Minute);
        assert_eq!(default_step(range(24 * 7)), Grain::Hour);
        assert_eq!(default_step(range(24 * 365)), Grain::Day);
    }
}
