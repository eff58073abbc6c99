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
