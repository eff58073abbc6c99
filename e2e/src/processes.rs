//! Processes a test starts (jobs, ingest, query), each killed when its guard drops, so a failed
//! test leaves nothing running.

use std::process::Child;

use crate::answers_ok;

/// A background job, killed on drop.
pub struct Running(pub Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A running `ingest` service on a free loopback port, killed on drop.
pub struct Ingest {
    pub url: String,
    pub process: Running,
}

impl Ingest {
    /// Whether `GET /readyz` answers 200.
    pub fn ready(&self) -> bool {
        answers_ok(&format!("{}/readyz", self.url))
    }
}

/// A running `query` service on a free loopback port, killed on drop.
pub struct QueryService {
    pub url: String,
    pub process: Running,
    pub(crate) http: reqwest::Client,
}

/// An answer of the query service: status, `Retry-After`, JSON body.
pub struct Answer {
    pub status: u16,
    pub retry_after: Option<String>,
    pub body: serde_json::Value,
}

impl QueryService {
    /// `GET path` (with its query string), parsed as JSON.
    pub fn get(&self, runtime: &tokio::runtime::Runtime, path: &str) -> Answer {
        runtime.block_on(async {
            let response = self.http.get(format!("{}{path}", self.url)).send().await.unwrap();
            let status = response.status().as_u16();
            let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap_or_default().to_owned());
            let text = response.text().await.unwrap();
            let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
            Answer { status, retry_after, body }
        })
    }

    /// `GET path`, which must answer 200; its JSON.
    pub fn ok(&self, runtime: &tokio::runtime::Runtime, path: &str) -> serde_json::Value {
        let answer = self.get(runtime, path);
        assert_eq!(answer.status, 200, "GET {path}: {}", answer.body);
        answer.body
    }
}
