//! Why a message is a dead letter: the stable reasons analysts filter `dead_letters.reason` on.

/// Why a message is a dead letter. [`RejectReason::as_str`] is stable: analysts filter on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    EmptyPayload,
    InvalidJson,
    NotAnObject,
    MissingVideoId,
    InvalidVideoId,
    InvalidEventType,
    InvalidTs,
    MissingTimestamp,
    TsTooOld,
    TsInFuture,
    InvalidValue,
    InvalidViewerId,
    InvalidFunction,
    UnknownFunction,
    MissingValue,
    MissingViewerId,
    InvalidEventId,
    /// Not malformed: an event whose `event_id` was already counted (a client's retry).
    DuplicateEventId,
}

impl RejectReason {
    pub const ALL: [RejectReason; 18] = [
        RejectReason::EmptyPayload,
        RejectReason::InvalidJson,
        RejectReason::NotAnObject,
        RejectReason::MissingVideoId,
        RejectReason::InvalidVideoId,
        RejectReason::InvalidEventType,
        RejectReason::InvalidTs,
        RejectReason::MissingTimestamp,
        RejectReason::TsTooOld,
        RejectReason::TsInFuture,
        RejectReason::InvalidValue,
        RejectReason::InvalidViewerId,
        RejectReason::InvalidFunction,
        RejectReason::UnknownFunction,
        RejectReason::MissingValue,
        RejectReason::MissingViewerId,
        RejectReason::InvalidEventId,
        RejectReason::DuplicateEventId,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::EmptyPayload => "empty payload",
            RejectReason::InvalidJson => "invalid json",
            RejectReason::NotAnObject => "not a json object",
            RejectReason::MissingVideoId => "missing video_id",
            RejectReason::InvalidVideoId => "invalid video_id",
            RejectReason::InvalidEventType => "invalid event_type",
            RejectReason::InvalidTs => "invalid ts",
            RejectReason::MissingTimestamp => "missing timestamp",
            RejectReason::TsTooOld => "ts too old",
            RejectReason::TsInFuture => "ts too far in future",
            RejectReason::InvalidValue => "invalid value",
            RejectReason::InvalidViewerId => "invalid viewer_id",
            RejectReason::InvalidFunction => "invalid function",
            RejectReason::UnknownFunction => "unknown function",
            RejectReason::MissingValue => "missing value",
            RejectReason::MissingViewerId => "missing viewer_id",
            RejectReason::InvalidEventId => "invalid event_id",
            RejectReason::DuplicateEventId => "duplicate event_id",
        }
    }
}

impl std::fmt::Display for RejectReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A message that is not a valid event: the stable reason and a detail for humans.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Rejection { reason, detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_distinct_and_short() {
        let mut seen = std::collections::HashSet::new();
        for reason in RejectReason::ALL {
            assert!(seen.insert(reason.as_str()));
            assert!(reason.as_str().len() <= 32);
        }
    }
}
