//! The error answer of both services: `{"error": reason, "field": ..., "message": ...}` with
//! its status, and `Retry-After` (whole seconds, at least 1) when a retry can help.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// An error answer; see the module documentation.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: Value,
    pub retry_after: Option<Duration>,
}

impl ApiError {
    /// `error` is a short stable reason, `field` what it is about (`""` for none), `message`
    /// for people.
    pub fn new(status: StatusCode, error: &str, field: &str, message: impl Into<String>) -> Self {
        ApiError { status, body: json!({"error": error, "field": field, "message": message.into()}), retry_after: None }
    }

    /// The same answer with `Retry-After`.
    pub fn retry_after(self, wait: Duration) -> Self {
        ApiError { retry_after: Some(wait), ..self }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        if let Some(wait) = self.retry_after {
            let seconds = wait.as_secs_f64().ceil().max(1.0) as u64;
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// Middleware: an error answer that is not JSON (a 405 from the router, a 500 or 416 from a
/// file service, a 413 from a body limit, the plain-text rejection of an extractor such as a
/// path that is not UTF-8) gets the JSON error body every other answer has, keeping its status
/// and headers (`Allow`, `Retry-After`); a plain-text body becomes the message.
pub async fn json_errors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|kind| kind.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    // An extractor's rejection is a line of text; a file service's error page is not kept.
    let is_text = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|kind| kind.starts_with("text/plain"));
    let text = if is_text {
        match axum::body::to_bytes(body, 4096).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_owned(),
            Err(_) => String::new(),
        }
    } else {
        String::new()
    };
    let (error, message) = match status {
        StatusCode::METHOD_NOT_ALLOWED => (
            "method not allowed",
            "this route does not take that method (the Allow header lists those it takes)".into(),
        ),
        StatusCode::NOT_FOUND => ("not found", "no such route".to_owned()),
        StatusCode::PAYLOAD_TOO_LARGE => ("too large", "the body is over the limit".to_owned()),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            ("bad range", "the Range header asks for bytes the file does not have".into())
        }
        status if status.is_client_error() => ("bad request", status.to_string()),
        status => ("internal", status.to_string()),
    };
    let message = if text.is_empty() { message } else { text };
    let body = json!({"error": error, "field": "", "message": message}).to_string();
    parts.headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    parts.headers.remove(header::CONTENT_LENGTH);
    Response::from_parts(parts, axum::body::Body::from(body))
}
