//! The wall clock, for what is allowed to read it: logs, metrics, checkpoint rows, freshness.
//! Never for what an event counts towards (that is the event's own time, see the crate docs).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 for a clock before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Whole seconds since the Unix epoch, as ClickHouse's `DateTime` stores them.
pub fn now_secs() -> u32 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as u32)
}
