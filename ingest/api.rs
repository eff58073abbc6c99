//! The HTTP API: routes, validation of what comes in, and the answers.
//!
//! Every event goes through the same checks as in the jobs ([`parse_stats_event`] with the
//! service's clock as the message time, then the functions config), so an event answered 202
//! is counted and never becomes a dead letter downstream.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use videocount_aggregates::FunctionsConfig;
use videocount_events::clock::now_ms;
use videocount_events::{RejectReason, Rejection, TimeLimits, parse_stats_event_with_id_text};
use videocount_http::{ApiError, Tracking};

use crate::metrics::{Metrics, ReasonLabels};
use crate::publish::{Outgoing, PublishError, Publisher};

/// Events per `POST /v1/events` at most.
pub const MAX_BATCH_EVENTS: usize = 10_000;
/// Bytes per request body at most.
pub const MAX_BODY_BYTES: usize = 4 << 20;

pub struct AppState {
    pub publisher: Publisher,
    pub functions: FunctionsConfig,
    pub limits: TimeLimits,
    pub metrics: Arc<Metrics>,
    pub auth_token: Option<String>,
    /// How long a request's body may take to arrive (after its headers).
    pub body_timeout: Duration,
    /// Bytes of request bodies held at once (reading, validating, waiting for Kafka), one permit
    /// a byte: the bound on the service's memory for requests (`--max-inflight-mb`).
    pub inflight_bytes: Arc<tokio::sync::Semaphore>,
}

pub fn router(state: Arc<AppState>, request_timeout: Duration) -> Router {
    let v1 = Router::new()
        .route("/v1/videos/{video_id}/views", post(count_view))
        .route("/v1/videos/{video_id}/events/{event_type}", post(count_event))
        .route("/v1/videos/{video_id}/events/{event_type}/{function}", post(process_event))
        .route("/v1/events", post(process_events))
        // The token first, then the body: an unauthorized client never has a body buffered.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body_in_time))
        .route_layer(middleware::from_fn_with_state(state.clone(), refuse_query_parameters))
        .route_layer(middleware::from_fn_with_state(state.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { axum::Json(json!({"status": "ok"})) }))
        .route("/readyz", get(ready))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not found", "path", "no such route") })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(videocount_http::json_errors))
        .layer(middleware::from_fn_with_state(
            Arc::new(Tracking {
                metrics: state.metrics.http.clone(),
                deadline: request_timeout,
                late_message: "; the events may or may not be written".into(),
            }),
            videocount_http::track,
        ))
        .with_state(state)
}

/// The answer to an event that failed validation.
fn rejected(rejection: &Rejection) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, rejection.reason.as_str(), field(rejection.reason), &rejection.detail)
}

/// The answer when Kafka did not take the events: `body` says which, `Retry-After` when to retry.
fn unavailable(error: &PublishError, body: Value) -> ApiError {
    ApiError { status: StatusCode::SERVICE_UNAVAILABLE, body, retry_after: Some(error.retry_after()) }
}

/// The field of an event a reject reason is about.
fn field(reason: RejectReason) -> &'static str {
    use RejectReason::*;
    match reason {
        EmptyPayload | InvalidJson | NotAnObject => "body",
        MissingVideoId | InvalidVideoId => "video_id",
        InvalidEventType => "event_type",
        InvalidTs | MissingTimestamp | TsTooOld | TsInFuture => "ts",
        InvalidValue | MissingValue => "value",
        InvalidViewerId | MissingViewerId => "viewer_id",
        InvalidFunction | UnknownFunction => "function",
        InvalidEventId | DuplicateEventId => "event_id",
    }
}

/// The canonical form of an accepted event on the topic (`ts` always set).
#[derive(Serialize)]
struct Canonical<'a> {
    video_id: &'a str,
    event_type: &'a str,
    ts: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    viewer_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    function: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
}

impl AppState {
    /// One event's JSON checked as the jobs will check it, turned into its message.
    fn validate(&self, json: &[u8], now_ms: i64) -> Result<Outgoing, Rejection> {
        let (event, event_id) = parse_stats_event_with_id_text(Some(json), Some(now_ms), self.limits)?;
        self.functions.resolve(&event)?;
        let payload = serde_json::to_vec(&Canonical {
            video_id: &event.event.video_id,
            event_type: &event.event.event_type,
            ts: event.event.ts_ms,
            value: event.value,
            viewer_id: event.viewer_id.as_deref(),
            function: event.function.as_deref(),
            event_id: event_id.as_deref(),
        })
        .expect("the canonical event always serializes");
        Ok(Outgoing { key: event.event.video_id, payload, timestamp_ms: now_ms })
    }

    /// Writes `events` and counts the outcome. On failure, also the indexes (into `events`)
    /// Kafka did not take; the others were written.
    async fn publish(&self, events: &[Outgoing]) -> Result<(), (PublishError, Vec<usize>)> {
        let result = self.publisher.publish(events).await;
        let failed: Vec<usize> = match &result {
            Ok(()) => Vec::new(),
            Err(PublishError::CircuitOpen { .. }) => (0..events.len()).collect(),
            Err(PublishError::Kafka { failed, .. }) => failed.clone(),
        };
        self.metrics.events_accepted.inc_by((events.len() - failed.len()) as u64);
        self.metrics.events_failed.inc_by(failed.len() as u64);
        result.map_err(|error| (error, failed))
    }

    fn count_rejection(&self, reason: RejectReason) {
        self.metrics.events_rejected.get_or_create(&ReasonLabels { reason: reason.as_str().to_owned() }).inc();
        self.metrics.events_rejected_all.inc();
    }
}

/// The optional body of the single-event calls.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SingleBody<'a> {
    #[serde(borrow)]
    value: Option<&'a RawValue>,
    #[serde(borrow)]
    viewer_id: Option<&'a RawValue>,
    #[serde(borrow)]
    ts: Option<&'a RawValue>,
    #[serde(borrow)]
    event_id: Option<&'a RawValue>,
}

/// The event the path and the body describe, as event-format JSON.
#[derive(Serialize)]
struct Assembled<'a> {
    video_id: &'a str,
    event_type: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    function: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    viewer_id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a RawValue>,
}

fn media_type(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    Some(value.split(';').next().unwrap_or_default().trim().to_ascii_lowercase())
}

fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "body too large",
                "body",
                format!("a request body is at most {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(rejection.status(), "bad body", "body", rejection.body_text())
        }
    })
}

async fn count_view(
    State(state): State<Arc<AppState>>,
    Path(video_id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    single(&state, &video_id, "view", None, &headers, body_bytes(body)?).await
}

async fn count_event(
    State(state): State<Arc<AppState>>,
    Path((video_id, event_type)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    single(&state, &video_id, &event_type, None, &headers, body_bytes(body)?).await
}

async fn process_event(
    State(state): State<Arc<AppState>>,
    Path((video_id, event_type, function)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    single(&state, &video_id, &event_type, Some(&function), &headers, body_bytes(body)?).await
}

async fn single(
    state: &AppState,
    video_id: &str,
    event_type: &str,
    function: Option<&str>,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let has_body = !body.iter().all(u8::is_ascii_whitespace);
    let fields = if has_body {
        if media_type(headers).as_deref() != Some("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                "body",
                "a body must be Content-Type: application/json",
            ));
        }
        serde_json::from_slice::<SingleBody<'_>>(&body).map_err(|e| {
            state.count_rejection(RejectReason::InvalidJson);
            ApiError::new(
                StatusCode::BAD_REQUEST,
                RejectReason::InvalidJson.as_str(),
                "body",
                format!("expected an object with value, viewer_id, ts (each optional): {e}"),
            )
        })?
    } else {
        SingleBody { value: None, viewer_id: None, ts: None, event_id: None }
    };
    let assembled = Assembled {
        video_id,
        event_type,
        function,
        value: fields.value,
        viewer_id: fields.viewer_id,
        ts: fields.ts,
        event_id: fields.event_id,
    };
    let json = serde_json::to_vec(&assembled).expect("path strings and raw JSON always serialize");
    let outgoing = state.validate(&json, now_ms() as i64).map_err(|rejection| {
        state.count_rejection(rejection.reason);
        rejected(&rejection)
    })?;
    match state.publish(std::slice::from_ref(&outgoing)).await {
        Ok(()) => Ok((StatusCode::ACCEPTED, axum::Json(json!({"accepted": 1}))).into_response()),
        Err((error, _)) => {
            Err(unavailable(&error, json!({"error": "kafka unavailable", "message": error.to_string()})))
        }
    }
}

fn too_many_events() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too many events",
        "body",
        format!("a request carries at most {MAX_BATCH_EVENTS} events"),
    )
}

/// The error [`json_array`] stops with past [`MAX_BATCH_EVENTS`] items.
const TOO_MANY: &str = "too many events";

/// The items of a JSON array, each kept raw; it stops at item [`MAX_BATCH_EVENTS`] + 1, so a
/// body of millions of tiny items (`[0,0,0,...]`) costs no more than the largest batch.
fn json_array(body: &[u8]) -> Result<Vec<&RawValue>, serde_json::Error> {
    struct Items;
    impl<'de> serde::de::Visitor<'de> for Items {
        type Value = Vec<&'de RawValue>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON array")
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element::<&'de RawValue>()? {
                if items.len() == MAX_BATCH_EVENTS {
                    return Err(serde::de::Error::custom(TOO_MANY));
                }
                items.push(item);
            }
            Ok(items)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let items = serde::Deserializer::deserialize_seq(&mut deserializer, Items)?;
    deserializer.end()?;
    Ok(items)
}

/// `POST /v1/events`: a JSON array (`application/json`) or one event per line
/// (`application/x-ndjson`).
async fn process_events(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    // Each event with its index in the answer: its array position, or its 0-based line
    // number in NDJSON (blank lines are skipped but counted, so indexes are line numbers).
    let items: Vec<(usize, &[u8])> = match media_type(&headers).as_deref() {
        Some("application/json") => {
            let items = json_array(&body).map_err(|e| {
                if e.to_string().starts_with(TOO_MANY) {
                    return too_many_events();
                }
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    RejectReason::InvalidJson.as_str(),
                    "body",
                    format!("expected a JSON array of events: {e}"),
                )
            })?;
            items.into_iter().map(|raw| raw.get().as_bytes()).enumerate().collect()
        }
        Some("application/x-ndjson" | "application/ndjson") => body
            .split(|b| *b == b'\n')
            .map(<[u8]>::trim_ascii)
            .enumerate()
            .filter(|(_, line)| !line.is_empty())
            .take(MAX_BATCH_EVENTS + 1)
            .collect(),
        other => {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                "body",
                format!(
                    "expected Content-Type application/json (an array) or application/x-ndjson, got {}",
                    other.unwrap_or("none")
                ),
            ));
        }
    };
    if items.len() > MAX_BATCH_EVENTS {
        return Err(too_many_events());
    }
    if items.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "no events", "body", "the body holds no events"));
    }

    let now = now_ms() as i64;
    let mut accepted = Vec::with_capacity(items.len());
    let mut indexes = Vec::with_capacity(items.len());
    let mut rejected = Vec::new();
    for &(index, item) in &items {
        match state.validate(item, now) {
            Ok(outgoing) => {
                accepted.push(outgoing);
                indexes.push(index);
            }
            Err(rejection) => {
                state.count_rejection(rejection.reason);
                rejected.push(json!({
                    "index": index,
                    "reason": rejection.reason.as_str(),
                    "field": field(rejection.reason),
                    "message": rejection.detail,
                }));
            }
        }
    }
    if accepted.is_empty() {
        return Err(ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({
                "error": "every event was rejected",
                "field": "body",
                "message": format!("{} events, none valid; see rejected", items.len()),
                "accepted": 0,
                "rejected": rejected,
            }),
            retry_after: None,
        });
    }
    match state.publish(&accepted).await {
        Ok(()) => Ok((StatusCode::ACCEPTED, axum::Json(json!({"accepted": accepted.len(), "rejected": rejected})))
            .into_response()),
        Err((error, failed)) => {
            let failed: Vec<usize> = failed.iter().map(|&i| indexes[i]).collect();
            Err(unavailable(
                &error,
                json!({
                    "error": "kafka unavailable",
                    "message": error.to_string(),
                    "accepted": accepted.len() - failed.len(),
                    "failed": failed,
                    "rejected": rejected,
                }),
            ))
        }
    }
}

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    match state.publisher.ready_cached(Duration::from_secs(2)).await {
        Ok(()) => axum::Json(json!({"status": "ready", "topic": state.publisher.topic()})).into_response(),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({"status": "not ready", "reason": reason})))
            .into_response(),
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = &state.metrics;
    metrics.producer_queue.set(state.publisher.queued());
    metrics.producer_queue_capacity.set(state.publisher.queue_capacity() as i64);
    metrics.breaker_state.set(match state.publisher.breaker_state() {
        videocount_client::BreakerState::Closed => 0,
        videocount_client::BreakerState::Open => 1,
        videocount_client::BreakerState::HalfOpen => 2,
    });
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], metrics.encode())
        .into_response()
}

/// A write takes no query parameters: one given (`?ts=5`) is refused rather than ignored.
async fn refuse_query_parameters(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    match request.uri().query().filter(|q| !q.is_empty()) {
        Some(query) => {
            let name = query.split(['=', '&']).next().unwrap_or_default().to_owned();
            discard_body(request.into_body(), state.body_timeout);
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid argument",
                &name,
                format!("the write API takes no query parameters (got {name:?}); put fields in the body"),
            )
            .into_response()
        }
        None => next.run(request).await,
    }
}

/// Reads a write's body before its handler, bounded in size and time: a declared
/// `Content-Length` over the limit is a 413 at once, a body still incomplete after
/// `--body-timeout-ms` a 408. Either way nothing was written, and the answer says so.
async fn read_body_in_time(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body too large",
            "body",
            format!("a request body is at most {MAX_BODY_BYTES} bytes; nothing was written"),
        )
        .into_response()
    };
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        // Answered at once, the body discarded meanwhile.
        discard_body(request.into_body(), state.body_timeout);
        return too_large();
    }
    // Held until the answer: a body of unknown length counts as the largest allowed.
    let size = declared.map_or(MAX_BODY_BYTES, |length| length as usize).max(1);
    let Ok(_held) = Arc::clone(&state.inflight_bytes).try_acquire_many_owned(size as u32) else {
        state.metrics.overloaded.inc();
        discard_body(request.into_body(), state.body_timeout);
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "body",
            "too many request bytes in flight (--max-inflight-mb); nothing was written, retry",
        )
        .retry_after(Duration::from_secs(1))
        .into_response();
    };
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(state.body_timeout, read_body(body, declared)).await {
        Ok(Ok(Some(bytes))) => bytes,
        Ok(Ok(None)) => return too_large(),
        Ok(Err(error)) => {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad body",
                "body",
                format!("the body could not be read ({error}); nothing was written"),
            )
            .into_response();
        }
        Err(_) => {
            return ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body timeout",
                "body",
                format!("the body did not arrive within {:?}; nothing was written", state.body_timeout),
            )
            .into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes))).await
}

/// The body, at most [`MAX_BODY_BYTES`] (`None` past it), copied frame by frame into one buffer:
/// a chunked body of one-byte chunks takes the memory of its bytes, not a buffer entry per
/// chunk (tens of times more).
async fn read_body(mut body: Body, declared: Option<u64>) -> Result<Option<Bytes>, axum::Error> {
    let mut buffer = bytes::BytesMut::with_capacity(declared.map_or(64 << 10, |length| length as usize));
    while let Some(frame) = http_body_util::BodyExt::frame(&mut body).await {
        if let Some(data) = frame?.data_ref() {
            if buffer.len() + data.len() > MAX_BODY_BYTES {
                return Ok(None);
            }
            buffer.extend_from_slice(data);
        }
    }
    Ok(Some(buffer.freeze()))
}

/// Reads and drops the body of a request answered before it was read (refused: too large,
/// overloaded, unauthorized, bad parameters), in the background, for `within` and 64 MiB at
/// most. A client still sending it then gets to read the answer; closing the connection with
/// its bytes unread would reset it, and the client would see a broken pipe instead.
fn discard_body(mut body: Body, within: Duration) {
    tokio::spawn(async move {
        let drain = async {
            let mut seen = 0usize;
            while let Some(Ok(frame)) = http_body_util::BodyExt::frame(&mut body).await {
                seen += frame.data_ref().map_or(0, |data| data.len());
                if seen > 64 << 20 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(within, drain).await;
    });
}

/// Bearer-token check of the `/v1` routes, when the service has a token.
async fn authorize(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(token) = &state.auth_token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !constant_time_eq::constant_time_eq(given.as_bytes(), token.as_bytes()) {
            let mut response = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "authorization",
                "a valid bearer token is required",
            )
            .into_response();
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            discard_body(request.into_body(), state.body_timeout);
            return response;
        }
    }
    next.run(request).await
}
