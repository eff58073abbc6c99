//! The event format on the topic: one JSON object per Kafka message, keyed by `video_id`.
//!
//! ```json
//! {"video_id":"dQw4w9WgXcQ","event_type":"view","ts":1795812377123}
//! ```
//!
//! [`parse_event`] turns a message into an [`Event`] or a [`Rejection`] whose
//! [`RejectReason`] is a short, stable string that ends up in `dead_letters.reason`.
//! Everything here is deterministic in its inputs (the payload and the message's own Kafka
//! timestamp, never the wall clock), so re-running an epoch after a crash rejects exactly the
//! same messages.

mod buckets;
pub mod clock;
mod reject;

pub use buckets::{day_number, hour_start, minute_start, route};
pub use reject::{RejectReason, Rejection};

use std::borrow::Cow;

use compact_str::CompactString;

use serde::Deserialize;
use serde_json::value::RawValue;

/// One counted event.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, Deserialize)]
pub struct Event {
    /// At most 64 bytes; short ids (24 bytes or less) are stored inline, without allocating.
    pub video_id: CompactString,
    pub event_type: CompactString,
    /// Event time, epoch milliseconds UTC.
    pub ts_ms: u64,
}

/// Video ids of the query service's freshness canaries start with this; top lists (and the
/// job's trending) leave them out.
pub const CANARY_PREFIX: &str = "videocount-canary";

/// The windows of event time view_counts keeps top lists of: name (as `/v1/top?window=` and
/// `top_videos.period` say it) and length in seconds, smallest first.
pub const TRENDING_WINDOWS: [(&str, u32); 2] = [("1h", 3600), ("24h", 86_400)];

/// An item with the Kafka partition and offset it was read from: what the source emits and
/// the raw log and dead letters record.
pub type Located<E = Event> = (E, u32, u64);

/// The event type used when a message has none.
pub const DEFAULT_EVENT_TYPE: &str = "view";

/// How far an event's time may lie from the Kafka timestamp of its message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeLimits {
    /// Older than this (relative to the message timestamp) is a dead letter.
    pub max_age_ms: u64,
    /// Further ahead than this is a dead letter.
    pub max_ahead_ms: u64,
}

impl Default for TimeLimits {
    fn default() -> Self {
        TimeLimits { max_age_ms: 7 * 24 * 3600 * 1000, max_ahead_ms: 10 * 60 * 1000 }
    }
}

/// The known fields, each kept raw so that a wrong type is reported for its field; unknown
/// fields are skipped without being materialised.
#[derive(Deserialize)]
struct Fields<'a> {
    #[serde(borrow, default)]
    video_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_type: Option<&'a RawValue>,
    #[serde(borrow, default)]
    ts: Option<&'a RawValue>,
    #[serde(borrow, default)]
    value: Option<&'a RawValue>,
    #[serde(borrow, default)]
    viewer_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    function: Option<&'a RawValue>,
    #[serde(borrow, default)]
    event_id: Option<&'a RawValue>,
}

/// What identifies an event across a client's retries, as the jobs remember it to count it
/// once: the 128-bit xxh3 hash of its video, type and `event_id` (1-64 characters of
/// `[A-Za-z0-9_-]`). Copies of one event agree on all three; an id a player reuses for another
/// video or type (or that another sender chooses) names another event.
pub type EventId = u128;

/// The [`EventId`] of `event_id` on `event`.
pub fn event_id_hash(event: &Event, event_id: &str) -> EventId {
    // On the stack: three parts of at most 64 bytes and their separators (the parts are ASCII
    // without NUL, so the separator keeps them apart); longer parts never pass validation.
    let mut key = [0u8; 3 * 65];
    let mut len = 0;
    for part in [event.video_id.as_bytes(), event.event_type.as_bytes(), event_id.as_bytes()] {
        let part = &part[..part.len().min(64)];
        key[len..len + part.len()].copy_from_slice(part);
        len += part.len() + 1;
    }
    xxhash_rust::xxh3::xxh3_128(&key[..len])
}

/// An event with the fields that aggregate functions read (`event_stats`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, Deserialize)]
pub struct StatsEvent {
    pub event: Event,
    /// A finite number, when the message has one.
    pub value: Option<f64>,
    /// Who caused the event: 1-64 characters of `[A-Za-z0-9_-]`.
    pub viewer_id: Option<CompactString>,
    /// The one function this event feeds; without it, the functions configured for its type.
    pub function: Option<CompactString>,
}

/// `video_id`: 1-64 characters from `[A-Za-z0-9_-]`.
pub fn valid_video_id(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// `viewer_id`: the same rule as `video_id`.
pub fn valid_viewer_id(s: &str) -> bool {
    valid_video_id(s)
}

/// `event_id`: the same rule as `video_id`.
pub fn valid_event_id(s: &str) -> bool {
    valid_video_id(s)
}

/// A function name (`function` of an event): 1-32 characters from `[a-z0-9_]`.
pub fn valid_function_name(s: &str) -> bool {
    valid_event_type(s)
}

/// `event_type`: 1-32 characters from `[a-z0-9_]`.
pub fn valid_event_type(s: &str) -> bool {
    (1..=32).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn string_field<'a>(raw: &'a RawValue) -> Option<Cow<'a, str>> {
    serde_json::from_str::<Cow<'a, str>>(raw.get()).ok()
}

fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// Parses and validates one message.
///
/// `message_ts_ms` is the Kafka timestamp of the message: the event time when the payload has
/// no `ts`, and the reference for the too-old / too-far-ahead checks.
pub fn parse_event(payload: Option<&[u8]>, message_ts_ms: Option<i64>, limits: TimeLimits) -> Result<Event, Rejection> {
    parse_event_with_id(payload, message_ts_ms, limits).map(|(event, _)| event)
}

/// [`parse_event`], and the event's [`EventId`] when it has an `event_id`.
pub fn parse_event_with_id(
    payload: Option<&[u8]>,
    message_ts_ms: Option<i64>,
    limits: TimeLimits,
) -> Result<(Event, Option<EventId>), Rejection> {
    let (event, id) = parse_with(payload, message_ts_ms, limits, |event, _| Ok(event))?;
    let id = id.map(|id| event_id_hash(&event, &id));
    Ok((event, id))
}

/// Parses a message for `event_stats`: [`parse_event`]'s rules, plus `value` (a finite number),
/// `viewer_id` and `function` (syntax only: whether the function exists is the job's call).
pub fn parse_stats_event(
    payload: Option<&[u8]>,
    message_ts_ms: Option<i64>,
    limits: TimeLimits,
) -> Result<StatsEvent, Rejection> {
    parse_stats_event_with_id_text(payload, message_ts_ms, limits).map(|(event, _)| event)
}

/// [`parse_stats_event`], and the event's [`EventId`] when it has an `event_id`.
pub fn parse_stats_event_with_id(
    payload: Option<&[u8]>,
    message_ts_ms: Option<i64>,
    limits: TimeLimits,
) -> Result<(StatsEvent, Option<EventId>), Rejection> {
    let (event, id) = parse_stats_event_with_id_text(payload, message_ts_ms, limits)?;
    let id = id.map(|id| event_id_hash(&event.event, &id));
    Ok((event, id))
}

/// [`parse_stats_event`], and the event's `event_id` as written (the ingest service passes it
/// on).
pub fn parse_stats_event_with_id_text<'a>(
    payload: Option<&'a [u8]>,
    message_ts_ms: Option<i64>,
    limits: TimeLimits,
) -> Result<(StatsEvent, Option<Cow<'a, str>>), Rejection> {
    use RejectReason::*;
    parse_with(payload, message_ts_ms, limits, |event, fields| {
        let value = match fields.value.filter(|raw| raw.get() != "null") {
            None => None,
            Some(raw) => match serde_json::from_str::<f64>(raw.get()) {
                Ok(v) if v.is_finite() => Some(v),
                _ => {
                    return Err(Rejection::new(
                        InvalidValue,
                        format!("expected a finite number, got {}", shorten(raw.get())),
                    ));
                }
            },
        };
        let viewer_id =
            optional_string(fields.viewer_id, valid_viewer_id, InvalidViewerId, "1-64 characters of [A-Za-z0-9_-]")?;
        let function =
            optional_string(fields.function, valid_function_name, InvalidFunction, "1-32 characters of [a-z0-9_]")?;
        Ok(StatsEvent { event, value, viewer_id, function })
    })
}

/// An optional string field: absent or null is `None`; anything but a string passing `valid`
/// is a `reason` rejection that names the `rule`.
fn optional_string(
    raw: Option<&RawValue>,
    valid: fn(&str) -> bool,
    reason: RejectReason,
    rule: &str,
) -> Result<Option<CompactString>, Rejection> {
    let Some(raw) = raw.filter(|raw| raw.get() != "null") else { return Ok(None) };
    match string_field(raw) {
        Some(text) if valid(&text) => Ok(Some(CompactString::from(text.as_ref()))),
        _ => Err(Rejection::new(reason, format!("{} is not a string of {rule}", shorten(raw.get())))),
    }
}

fn parse_with<'a, T>(
    payload: Option<&'a [u8]>,
    message_ts_ms: Option<i64>,
    limits: TimeLimits,
    rest: impl FnOnce(Event, &Fields<'_>) -> Result<T, Rejection>,
) -> Result<(T, Option<Cow<'a, str>>), Rejection> {
    use RejectReason::*;
    let payload = match payload {
        Some(p) if !p.iter().all(u8::is_ascii_whitespace) => p,
        _ => return Err(Rejection::new(EmptyPayload, "message has no payload")),
    };
    let text =
        std::str::from_utf8(payload).map_err(|e| Rejection::new(InvalidJson, format!("payload is not UTF-8: {e}")))?;
    if !text.trim_start().starts_with('{') {
        // Serde would read `[a, b, c]` as a struct too; an event is only ever an object.
        return Err(match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => Rejection::new(NotAnObject, "expected a JSON object"),
            Err(e) => Rejection::new(InvalidJson, e.to_string()),
        });
    }
    let fields: Fields<'_> = serde_json::from_str(text).map_err(|e| Rejection::new(InvalidJson, e.to_string()))?;

    let raw_id = fields
        .video_id
        .filter(|raw| raw.get() != "null")
        .ok_or_else(|| Rejection::new(MissingVideoId, "field video_id is required"))?;
    let video_id = string_field(raw_id)
        .ok_or_else(|| Rejection::new(InvalidVideoId, format!("expected a string, got {}", shorten(raw_id.get()))))?;
    if !valid_video_id(&video_id) {
        return Err(Rejection::new(
            InvalidVideoId,
            format!("{:?} is not 1-64 characters of [A-Za-z0-9_-]", shorten(&video_id)),
        ));
    }

    let event_type = match fields.event_type.filter(|raw| raw.get() != "null") {
        None => Cow::Borrowed(DEFAULT_EVENT_TYPE),
        Some(raw) => {
            let value = string_field(raw).ok_or_else(|| {
                Rejection::new(InvalidEventType, format!("expected a string, got {}", shorten(raw.get())))
            })?;
            if !valid_event_type(&value) {
                return Err(Rejection::new(
                    InvalidEventType,
                    format!("{:?} is not 1-32 characters of [a-z0-9_]", shorten(&value)),
                ));
            }
            value
        }
    };

    let ts_ms = match fields.ts.filter(|raw| raw.get() != "null") {
        Some(raw) => serde_json::from_str::<u64>(raw.get()).map_err(|_| {
            Rejection::new(InvalidTs, format!("expected integer epoch milliseconds >= 0, got {}", shorten(raw.get())))
        })?,
        None => match message_ts_ms {
            Some(ts) if ts >= 0 => ts as u64,
            _ => {
                return Err(Rejection::new(
                    MissingTimestamp,
                    "no ts in the payload and no Kafka timestamp on the message",
                ));
            }
        },
    };

    if let Some(reference) = message_ts_ms.filter(|ts| *ts >= 0).map(|ts| ts as u64) {
        if ts_ms.saturating_add(limits.max_age_ms) < reference {
            return Err(Rejection::new(
                TsTooOld,
                format!("ts {ts_ms} is more than {} ms before the message time {reference}", limits.max_age_ms),
            ));
        }
        if ts_ms > reference.saturating_add(limits.max_ahead_ms) {
            return Err(Rejection::new(
                TsInFuture,
                format!("ts {ts_ms} is more than {} ms after the message time {reference}", limits.max_ahead_ms),
            ));
        }
    }
    if ts_ms / 1000 > u64::from(u32::MAX) {
        return Err(Rejection::new(InvalidTs, format!("ts {ts_ms} is after the year 2106")));
    }

    let event_id = match fields.event_id.filter(|raw| raw.get() != "null") {
        None => None,
        Some(raw) => match string_field(raw) {
            Some(id) if valid_event_id(&id) => Some(id),
            _ => {
                return Err(Rejection::new(
                    InvalidEventId,
                    format!("{} is not a string of 1-64 characters of [A-Za-z0-9_-]", shorten(raw.get())),
                ));
            }
        },
    };
    let event = Event {
        video_id: CompactString::from(video_id.as_ref()),
        event_type: CompactString::from(event_type.as_ref()),
        ts_ms,
    };
    Ok((rest(event, &fields)?, event_id))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_795_812_377_123;

    fn parse(payload: &str) -> Result<Event, Rejection> {
        parse_event(Some(payload.as_bytes()), Some(NOW), TimeLimits::default())
    }

    fn reason(payload: &str) -> RejectReason {
        parse(payload).unwrap_err().reason
    }

    #[test]
    fn an_event_id_names_one_event_of_one_video_and_type() {
        let id = |payload: &str| parse_event_with_id(Some(payload.as_bytes()), Some(NOW), TimeLimits::default());
        let (_, first) = id(r#"{"video_id":"v1","event_id":"a-1","ts":1795812377000}"#).unwrap();
        let (_, again) = id(r#"{"event_id":"a-1","ts":1795812377000,"video_id":"v1"}"#).unwrap();
        assert!(first.is_some() && first == again, "a copy has the same id");
        assert_ne!(first, id(r#"{"video_id":"v2","event_id":"a-1"}"#).unwrap().1, "another video");
        assert_ne!(first, id(r#"{"video_id":"v1","event_type":"like","event_id":"a-1"}"#).unwrap().1, "another type");
        assert_eq!(id(r#"{"video_id":"v1","event_id":null}"#).unwrap().1, None);
        for bad in [r#""a b""#, r#""""#, "17", &format!("\"{}\"", "x".repeat(65))] {
            let payload = format!(r#"{{"video_id":"v1","event_id":{bad}}}"#);
            assert_eq!(id(&payload).unwrap_err().reason, RejectReason::InvalidEventId, "{payload}");
        }
    }

    #[test]
    fn accepts_the_documented_example() {
        let event = parse(r#"{"video_id":"dQw4w9WgXcQ","event_type":"view","ts":1795812377123}"#).unwrap();
        assert_eq!(
            event,
            Event { video_id: "dQw4w9WgXcQ".into(), event_type: "view".into(), ts_ms: 1_795_812_377_123 }
        );
    }

    #[test]
    fn defaults_event_type_and_ts_and_ignores_unknown_fields() {
        let big = "x".repeat(100_000);
        let event = parse(&format!(r#"{{"video_id":"a-b_C","extra":{{"deep":["{big}"]}}}}"#)).unwrap();
        assert_eq!(event.event_type, "view");
        assert_eq!(event.ts_ms, NOW as u64);
        let escaped = parse(r#"{"video_id":"\u0061bc","event_type":"like"}"#).unwrap();
        assert_eq!(escaped.video_id, "abc");
    }

    #[test]
    fn every_reject_reason() {
        use RejectReason::*;
        assert_eq!(parse_event(None, Some(NOW), TimeLimits::default()).unwrap_err().reason, EmptyPayload);
        assert_eq!(reason(""), EmptyPayload);
        assert_eq!(reason("  \n"), EmptyPayload);
        assert_eq!(reason("{\"video_id\":"), InvalidJson);
        assert_eq!(reason("not json"), InvalidJson);
        assert_eq!(parse_event(Some(&[0xff, 0xfe]), Some(NOW), TimeLimits::default()).unwrap_err().reason, InvalidJson);
        assert_eq!(reason("[1,2]"), NotAnObject);
        assert_eq!(reason("42"), NotAnObject);
        assert_eq!(reason("{}"), MissingVideoId);
        assert_eq!(reason(r#"{"video_id":null}"#), MissingVideoId);
        assert_eq!(reason(r#"{"video_id":7}"#), InvalidVideoId);
        assert_eq!(reason(r#"{"video_id":""}"#), InvalidVideoId);
        assert_eq!(reason(r#"{"video_id":"has space"}"#), InvalidVideoId);
        assert_eq!(reason(&format!(r#"{{"video_id":"{}"}}"#, "a".repeat(65))), InvalidVideoId);
        assert_eq!(reason(r#"{"video_id":"v","event_type":"View"}"#), InvalidEventType);
        assert_eq!(reason(r#"{"video_id":"v","event_type":""}"#), InvalidEventType);
        assert_eq!(reason(r#"{"video_id":"v","event_type":["view"]}"#), InvalidEventType);
        assert_eq!(reason(&format!(r#"{{"video_id":"v","event_type":"{}"}}"#, "a".repeat(33))), InvalidEventType);
        assert_eq!(reason(r#"{"video_id":"v","ts":"1795812377123"}"#), InvalidTs);
        assert_eq!(reason(r#"{"video_id":"v","ts":1.5}"#), InvalidTs);
        assert_eq!(reason(r#"{"video_id":"v","ts":-5}"#), InvalidTs);
        assert_eq!(
            parse_event(Some(br#"{"video_id":"v"}"#), None, TimeLimits::default()).unwrap_err().reason,
            MissingTimestamp
        );
        let week = 7 * 24 * 3600 * 1000;
        assert_eq!(reason(&format!(r#"{{"video_id":"v","ts":{}}}"#, NOW - week - 1)), TsTooOld);
        assert!(parse(&format!(r#"{{"video_id":"v","ts":{}}}"#, NOW - week)).is_ok());
        assert_eq!(reason(&format!(r#"{{"video_id":"v","ts":{}}}"#, NOW + 600_001)), TsInFuture);
        assert!(parse(&format!(r#"{{"video_id":"v","ts":{}}}"#, NOW + 600_000)).is_ok());
        assert_eq!(reason(r#"{"video_id":"v","video_id":"w"}"#), InvalidJson);
    }

    fn stats(payload: &str) -> Result<StatsEvent, Rejection> {
        parse_stats_event(Some(payload.as_bytes()), Some(NOW), TimeLimits::default())
    }

    #[test]
    fn stats_fields() {
        let e = stats(r#"{"video_id":"v","event_type":"watch_time","value":12.5,"viewer_id":"u-1","function":"p99"}"#)
            .unwrap();
        assert_eq!(e.value, Some(12.5));
        assert_eq!(e.viewer_id.as_deref(), Some("u-1"));
        assert_eq!(e.function.as_deref(), Some("p99"));
        assert_eq!(e.event.event_type, "watch_time");
        let bare = stats(r#"{"video_id":"v","value":null}"#).unwrap();
        assert_eq!((bare.value, bare.viewer_id, bare.function), (None, None, None));
        assert_eq!(stats(r#"{"video_id":"v","value":-3}"#).unwrap().value, Some(-3.0));

        use RejectReason::*;
        let reason = |p: &str| stats(p).unwrap_err().reason;
        assert_eq!(reason(r#"{"video_id":"v","value":"12"}"#), InvalidValue);
        assert_eq!(reason(r#"{"video_id":"v","value":1e999}"#), InvalidValue);
        assert_eq!(reason(r#"{"video_id":"v","viewer_id":"a b"}"#), InvalidViewerId);
        assert_eq!(reason(r#"{"video_id":"v","viewer_id":5}"#), InvalidViewerId);
        assert_eq!(reason(r#"{"video_id":"v","function":"P99"}"#), InvalidFunction);
        // The spine's rules come first.
        assert_eq!(reason(r#"{"value":"x"}"#), MissingVideoId);
        // view_counts ignores the stats fields.
        assert!(parse(r#"{"video_id":"v","value":"not a number"}"#).is_ok());
    }

    #[test]
    fn configurable_limits() {
        let limits = TimeLimits { max_age_ms: 1000, max_ahead_ms: 0 };
        let at = |ts: i64| parse_event(Some(format!(r#"{{"video_id":"v","ts":{ts}}}"#).as_bytes()), Some(NOW), limits);
        assert_eq!(at(NOW - 1001).unwrap_err().reason, RejectReason::TsTooOld);
        assert!(at(NOW - 1000).is_ok());
        assert_eq!(at(NOW + 1).unwrap_err().reason, RejectReason::TsInFuture);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_event(Some(&bytes), Some(NOW), TimeLimits::default());
        }
    }
}
