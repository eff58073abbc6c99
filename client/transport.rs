//! How the client reaches a service address: one POST of a batch, one readiness check.
//! [`HttpTransport`] is the real one (reqwest); tests put a scripted fake behind the trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use url::Url;

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// A service's answer to one request.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    /// The `Retry-After` header, in seconds.
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

/// The request did not get an answer (connection refused or reset, DNS, timeout).
#[derive(Clone, Debug, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

pub trait Transport: Send + Sync + 'static {
    /// `POST {endpoint}/v1/events` with a JSON array of events.
    fn post_events(&self, endpoint: &Url, body: Bytes) -> BoxFuture<Result<Reply, TransportError>>;
    /// `GET {endpoint}/readyz` answered 200.
    fn ready(&self, endpoint: &Url) -> BoxFuture<bool>;
}

/// HTTP/1.1 with keep-alive (reqwest), the bearer token if one is set.
#[derive(Clone, Debug)]
pub struct HttpTransport {
    http: reqwest::Client,
    auth_token: Option<String>,
}

impl HttpTransport {
    pub fn new(connect_timeout: Duration, auth_token: Option<String>) -> Result<Self, TransportError> {
        let http = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_max_idle_per_host(64)
            // The services close a connection idle for their header timeout (10 s by default):
            // drop it sooner here than reuse one the server is closing.
            .pool_idle_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| TransportError(format!("cannot build the HTTP client: {e}")))?;
        Ok(HttpTransport { http, auth_token })
    }
}

impl Transport for HttpTransport {
    fn post_events(&self, endpoint: &Url, body: Bytes) -> BoxFuture<Result<Reply, TransportError>> {
        let mut request = self
            .http
            .post(endpoint.join("v1/events").expect("a base URL joins a relative path"))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(token) = &self.auth_token {
            request = request.bearer_auth(token);
        }
        Box::pin(async move {
            let response = request.send().await.map_err(|e| TransportError(error_chain(&e)))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let body = response.bytes().await.map_err(|e| TransportError(error_chain(&e)))?;
            Ok(Reply { status, retry_after, body })
        })
    }

    fn ready(&self, endpoint: &Url) -> BoxFuture<bool> {
        let request = self.http.get(endpoint.join("readyz").expect("a base URL joins a relative path"));
        Box::pin(async move { request.send().await.is_ok_and(|r| r.status().is_success()) })
    }
}

/// reqwest's top-level message is terse ("error sending request"); the cause says why.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        message.push_str(": ");
        message.push_str(&cause.to_string());
        source = cause.source();
    }
    message
}
