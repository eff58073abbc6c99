//! Time ranges of the read API: their checks, the times users type, and how a range is cut
//! into whole days, whole hours and minutes so that a year reads a few hundred buckets.

use crate::{Grain, QueryError};

/// The longest range a query may ask for.
pub const MAX_RANGE_MS: u64 = 10 * 366 * 86_400_000;

/// A half-open range `[from_ms, to_ms)` of epoch milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeRange {
    pub from_ms: u64,
    pub to_ms: u64,
}

impl TimeRange {
    /// Checks the order and the length of the range.
    pub fn new(from_ms: u64, to_ms: u64) -> Result<Self, QueryError> {
        if from_ms > to_ms {
            return Err(QueryError::Invalid(format!("from ({from_ms}) is after to ({to_ms})")));
        }
        if to_ms - from_ms > MAX_RANGE_MS {
            return Err(QueryError::Invalid("the range is longer than 10 years".into()));
        }
        if to_ms / 1000 > u64::from(u32::MAX) {
            return Err(QueryError::Invalid("to is after the year 2106".into()));
        }
        Ok(TimeRange { from_ms, to_ms })
    }
}

/// Parses a time: RFC 3339 (`2026-11-27T10:00:00Z`, any offset) or epoch milliseconds.
pub fn parse_time(text: &str) -> Result<u64, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text.parse::<u64>().map_err(|_| format!("{text:?} is too large for epoch milliseconds"));
    }
    let ts: jiff::Timestamp = text
        .parse()
        .map_err(|e| format!("{text:?} is neither RFC 3339 (2026-11-27T10:00:00Z) nor epoch milliseconds: {e}"))?;
    u64::try_from(ts.as_millisecond()).map_err(|_| format!("{text:?} is before 1970"))
}

/// Formats epoch milliseconds as RFC 3339 UTC.
pub fn format_time(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64).map(|t| t.to_string()).unwrap_or_else(|_| ms.to_string())
}

/// A run of buckets of one grain: `[start, end)` in seconds (days too, at midnight).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub grain: Grain,
    pub start_s: u64,
    pub end_s: u64,
}

pub(crate) fn ceil_to(x: u64, step: u64) -> u64 {
    x.div_ceil(step) * step
}

pub(crate) fn floor_to(x: u64, step: u64) -> u64 {
    x / step * step
}

/// The minutes of `range` as whole days, whole hours and the remaining minutes.
pub fn segments(range: TimeRange) -> Vec<Segment> {
    let first = ceil_to(range.from_ms, 60_000) / 1000;
    let end = ceil_to(range.to_ms, 60_000) / 1000;
    let mut out = Vec::new();
    if first >= end {
        return out;
    }
    let push = |out: &mut Vec<Segment>, grain, start_s, end_s| {
        if start_s < end_s {
            out.push(Segment { grain, start_s, end_s });
        }
    };
    let hours_and_minutes = |out: &mut Vec<Segment>, start: u64, end: u64| {
        let (h0, h1) = (ceil_to(start, 3600), floor_to(end, 3600));
        if h0 < h1 {
            push(out, Grain::Minute, start, h0);
            push(out, Grain::Hour, h0, h1);
            push(out, Grain::Minute, h1, end);
        } else {
            push(out, Grain::Minute, start, end);
        }
    };
    let (d0, d1) = (ceil_to(first, 86_400), floor_to(end, 86_400));
    if d0 < d1 {
        hours_and_minutes(&mut out, first, d0);
        push(&mut out, Grain::Day, d0, d1);
        hours_and_minutes(&mut out, d1, end);
    } else {
        hours_and_minutes(&mut out, first, end);
    }
    out
}
