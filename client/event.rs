//! One event as the client sends it (`POST /v1/events`), with a builder.

use serde::{Deserialize, Serialize};

/// One event, as `POST /v1/events` takes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    pub video_id: String,
    pub event_type: String,
    /// Event time, epoch milliseconds; the service's clock when absent.
    #[serde(rename = "ts", skip_serializing_if = "Option::is_none")]
    pub ts_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub viewer_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    /// What identifies the event across retries: the jobs count an id once (1-64 characters of
    /// `[A-Za-z0-9_-]`). The client assigns one when it is absent (see
    /// [`crate::ClientConfig::assign_event_ids`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub event_id: Option<String>,
}

impl Event {
    pub fn new(video_id: impl Into<String>, event_type: impl Into<String>) -> Self {
        Event {
            video_id: video_id.into(),
            event_type: event_type.into(),
            ts_ms: None,
            value: None,
            viewer_id: None,
            function: None,
            event_id: None,
        }
    }

    pub fn view(video_id: impl Into<String>) -> Self {
        Event::new(video_id, "view")
    }

    pub fn at(mut self, ts_ms: u64) -> Self {
        self.ts_ms = Some(ts_ms);
        self
    }

    pub fn value(mut self, value: f64) -> Self {
        self.value = Some(value);
        self
    }

    pub fn viewer(mut self, viewer_id: impl Into<String>) -> Self {
        self.viewer_id = Some(viewer_id.into());
        self
    }

    pub fn function(mut self, function: impl Into<String>) -> Self {
        self.function = Some(function.into());
        self
    }

    /// An id of the caller's own (an id from the player, say), instead of the client's.
    pub fn id(mut self, event_id: impl Into<String>) -> Self {
        self.event_id = Some(event_id.into());
        self
    }
}
