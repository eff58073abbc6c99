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

/// A range as answers show it: `from` and `to` in RFC 3339 and in epoch milliseconds.
impl serde::Serialize for TimeRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut fields = serializer.serialize_struct("TimeRange", 4)?;
        fields.serialize_field("from", &format_time(self.from_ms))?;
        fields.serialize_field("to", &format_time(self.to_ms))?;
        fields.serialize_field("from_ms", &self.from_ms)?;
        fields.serialize_field("to_ms", &self.to_ms)?;
        fields.end()
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn minutes_of(range: TimeRange) -> Vec<u64> {
        let first = range.from_ms.div_ceil(60_000);
        let end = range.to_ms.div_ceil(60_000);
        (first..end).map(|m| m * 60).collect()
    }

    fn expand(segments: &[Segment]) -> Vec<u64> {
        let mut out = Vec::new();
        for s in segments {
            let step = match s.grain {
                Grain::Minute => 60,
                Grain::Hour => 3600,
                Grain::Day => 86_400,
            };
            assert_eq!(s.start_s % step, 0, "{s:?} is aligned");
            assert_eq!(s.end_s % step, 0, "{s:?} is aligned");
            let mut t = s.start_s;
            while t < s.end_s {
                out.extend((t..t + step).step_by(60));
                t += step;
            }
        }
        out.sort_unstable();
        out
    }

    proptest! {
        #[test]
        fn segments_cover_each_minute_once(from in 0u64..4_000_000_000_000, len in prop_oneof![0u64..200_000, 0u64..100_000_000, 0u64..40_000_000_000]) {
            let range = TimeRange { from_ms: from, to_ms: from + len };
            let segments = segments(range);
            prop_assert_eq!(expand(&segments), minutes_of(range));
            // At most: 2 x (59 minutes + 23 hours) around the days.
            let buckets: u64 = segments.iter().filter(|s| s.grain != Grain::Day).map(|s| (s.end_s - s.start_s) / if s.grain == Grain::Hour { 3600 } else { 60 }).sum();
            prop_assert!(buckets <= 2 * (59 + 23));
        }
    }

    #[test]
    fn a_year_reads_few_buckets() {
        let from = parse_time("2025-03-10T10:17:30Z").unwrap();
        let to = parse_time("2026-03-10T10:17:30Z").unwrap();
        let segments = segments(TimeRange::new(from, to).unwrap());
        assert_eq!(
            segments.iter().map(|s| s.grain).collect::<Vec<_>>(),
            [Grain::Minute, Grain::Hour, Grain::Day, Grain::Hour, Grain::Minute]
        );
    }

    #[test]
    fn times_parse_in_both_forms() {
        assert_eq!(parse_time("1795812377123"), Ok(1_795_812_377_123));
        assert_eq!(parse_time("2026-11-27T00:00:00Z"), Ok(1_795_737_600_000));
        assert_eq!(parse_time("2026-11-27T01:00:00+01:00"), Ok(1_795_737_600_000));
        assert_eq!(parse_time("2026-11-27T00:00:00.5Z"), Ok(1_795_737_600_500));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("").is_err());
        assert!(parse_time("-5").is_err());
        assert!(parse_time("1969-12-31T00:00:00Z").is_err());
        assert_eq!(format_time(1_795_737_600_000), "2026-11-27T00:00:00Z");
    }

    #[test]
    fn ranges_are_checked() {
        assert!(TimeRange::new(2, 1).is_err());
        assert!(TimeRange::new(0, MAX_RANGE_MS + 1).is_err());
        assert!(TimeRange::new(5, 5).is_ok());
        assert!(segments(TimeRange::new(5, 5).unwrap()).is_empty());
    }
}
