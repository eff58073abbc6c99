//! What each table receives from one epoch of one worker, encoded as one native block.
//!
//! Rows are sorted before encoding: the same epoch re-run after a crash must produce a
//! byte-identical block for ClickHouse to recognise it as a repeat (docs/exactly-once.md).

use bytes::Bytes;

use crate::native::NativeBlock;

/// One insert: a table and a native block for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Insert {
    pub table: String,
    pub body: Bytes,
    pub rows: usize,
}

/// The three count tables, by the width of their time bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Grain {
    Minute,
    Hour,
    Day,
}

impl Grain {
    pub const ALL: [Grain; 3] = [Grain::Minute, Grain::Hour, Grain::Day];

    pub fn table(self) -> &'static str {
        match self {
            Grain::Minute => "event_counts_minute",
            Grain::Hour => "event_counts_hour",
            Grain::Day => "event_counts_day",
        }
    }

    /// The `event_stats` table of this grain.
    pub fn stats_table(self) -> &'static str {
        match self {
            Grain::Minute => "stats_minute",
            Grain::Hour => "stats_hour",
            Grain::Day => "stats_day",
        }
    }

    /// The time column of this grain's tables.
    pub fn column(self) -> &'static str {
        match self {
            Grain::Minute => "minute",
            Grain::Hour => "hour",
            Grain::Day => "day",
        }
    }

    /// The width of a bucket, in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Grain::Minute => 60,
            Grain::Hour => 3600,
            Grain::Day => 86_400,
        }
    }

    /// The bucket of an event time in epoch milliseconds: seconds for minutes and hours (a
    /// `DateTime`), days for days (a `Date`).
    pub fn bucket(self, ts_ms: u64) -> u32 {
        match self {
            Grain::Minute => videocount_events::minute_start(ts_ms),
            Grain::Hour => videocount_events::hour_start(ts_ms),
            Grain::Day => u32::from(videocount_events::day_number(ts_ms)),
        }
    }
}

/// A count of one (video, event type, bucket).
pub type CountRow = ((String, String, u32), u64);

/// Counts of one grain for one epoch. Sorts `rows` in place.
pub fn counts_block(grain: Grain, epoch: u64, rows: &mut [CountRow]) -> Insert {
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut block = NativeBlock::new(5, rows.len());
    block.column_str("video_id", rows.iter().map(|r| r.0.0.as_str()));
    block.column_str("event_type", rows.iter().map(|r| r.0.1.as_str()));
    match grain {
        Grain::Minute => block.column_u32("minute", "DateTime('UTC')", rows.iter().map(|r| r.0.2)),
        Grain::Hour => block.column_u32("hour", "DateTime('UTC')", rows.iter().map(|r| r.0.2)),
        Grain::Day => block.column_u16("day", "Date", rows.iter().map(|r| r.0.2 as u16)),
    }
    block.column_u64("count", rows.iter().map(|r| r.1));
    block.column_u64("epoch", rows.iter().map(|_| epoch));
    Insert { table: grain.table().into(), rows: block.rows(), body: block.finish() }
}

/// An epoch's block of `count_changes`: the minute counts, each with the milliseconds into the
/// minute of its events (sorted), which keep the query service's edge minutes current. Sorts
/// `rows` in place.
pub fn changes_block(epoch: u64, rows: &mut [(CountRow, Vec<u16>)]) -> Insert {
    rows.sort_unstable_by(|a, b| a.0.0.cmp(&b.0.0));
    let mut block = NativeBlock::new(6, rows.len());
    block.column_str("video_id", rows.iter().map(|r| r.0.0.0.as_str()));
    block.column_str("event_type", rows.iter().map(|r| r.0.0.1.as_str()));
    block.column_u32("minute", "DateTime('UTC')", rows.iter().map(|r| r.0.0.2));
    block.column_u64("count", rows.iter().map(|r| r.0.1));
    block.column_u64("epoch", rows.iter().map(|_| epoch));
    block.column_u16_arrays("times", rows.iter().map(|r| r.1.as_slice()));
    Insert { table: "count_changes".into(), rows: block.rows(), body: block.finish() }
}

/// The row of `count_blocks` saying that `worker` (of `peers`) wrote its count blocks of `epoch`.
pub fn count_blocks_row(epoch: u64, worker: u32, peers: u32) -> Insert {
    let mut block = NativeBlock::new(3, 1);
    block.column_u64("epoch", std::iter::once(epoch));
    block.column_u32("worker", "UInt32", std::iter::once(worker));
    block.column_u32("peers", "UInt32", std::iter::once(peers));
    Insert { table: "count_blocks".into(), rows: block.rows(), body: block.finish() }
}

/// One row of `top_videos`: a video's place in the top list of one event type and window as of
/// an epoch. An empty list is one row of rank 0 with no video.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TopRow {
    pub event_type: String,
    /// `1h` or `24h`.
    pub window: String,
    /// The window's first and end instants, epoch milliseconds (`[from_ms, to_ms)`).
    pub from_ms: u64,
    pub to_ms: u64,
    /// 1 for the most counted; 0 for the row of an empty list.
    pub rank: u32,
    pub video_id: String,
    pub count: u64,
}

/// The top lists one worker rewrote in `epoch`. Sorts `rows` in place.
pub fn top_videos_block(epoch: u64, rows: &mut [TopRow]) -> Insert {
    rows.sort_unstable();
    let mut block = NativeBlock::new(8, rows.len());
    block.column_u64("epoch", rows.iter().map(|_| epoch));
    block.column_str("event_type", rows.iter().map(|r| r.event_type.as_str()));
    block.column_str("period", rows.iter().map(|r| r.window.as_str()));
    block.column_u32("rank", "UInt32", rows.iter().map(|r| r.rank));
    block.column_str("video_id", rows.iter().map(|r| r.video_id.as_str()));
    block.column_u64("count", rows.iter().map(|r| r.count));
    block.column_u64("from_ms", rows.iter().map(|r| r.from_ms));
    block.column_u64("to_ms", rows.iter().map(|r| r.to_ms));
    Insert { table: "top_videos".into(), rows: block.rows(), body: block.finish() }
}

/// One row of a `stats_*` table: a state of one (video, event type, aggregate, bucket) with
/// the plain summary columns of the events that fed it.
#[derive(Clone, Debug, PartialEq)]
pub struct StatsRow {
    pub video_id: String,
    pub event_type: String,
    pub aggregate: String,
    /// Seconds for minutes and hours, days for days (as [`Grain::bucket`]).
    pub bucket: u32,
    pub count: u64,
    pub value_count: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
    pub state: Vec<u8>,
}

/// States of one grain for one epoch (`compacted`: rows that replace the states of earlier
/// epochs, see `videocount_clickhouse::compact`). Sorts `rows` in place by key.
/// `event_stats`' changelog for the query service: each epoch's `stats_minute` rows again, in a
/// table sorted by epoch (docs/reads-from-memory.md).
pub const STATS_CHANGES: &str = "stats_changes";

pub fn stats_block(grain: Grain, epoch: u64, compacted: bool, rows: &mut [StatsRow]) -> Insert {
    rows.sort_unstable_by(|a, b| {
        (&a.video_id, &a.event_type, &a.aggregate, a.bucket).cmp(&(&b.video_id, &b.event_type, &b.aggregate, b.bucket))
    });
    let mut block = NativeBlock::new(12, rows.len());
    block.column_str("video_id", rows.iter().map(|r| r.video_id.as_str()));
    block.column_str("event_type", rows.iter().map(|r| r.event_type.as_str()));
    block.column_str("aggregate", rows.iter().map(|r| r.aggregate.as_str()));
    match grain {
        Grain::Minute | Grain::Hour => {
            block.column_u32(grain.column(), "DateTime('UTC')", rows.iter().map(|r| r.bucket))
        }
        Grain::Day => block.column_u16("day", "Date", rows.iter().map(|r| r.bucket as u16)),
    }
    block.column_u64("count", rows.iter().map(|r| r.count));
    block.column_u64("value_count", rows.iter().map(|r| r.value_count));
    block.column_f64("sum", rows.iter().map(|r| r.sum));
    block.column_f64("min", rows.iter().map(|r| r.min));
    block.column_f64("max", rows.iter().map(|r| r.max));
    block.column_bytes("state", rows.iter().map(|r| r.state.as_slice()));
    block.column_u64("epoch", rows.iter().map(|_| epoch));
    block.column_u8("compacted", rows.iter().map(|_| u8::from(compacted)));
    Insert { table: grain.stats_table().into(), rows: block.rows(), body: block.finish() }
}

/// One row of `events_raw`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawRow {
    pub video_id: String,
    pub event_type: String,
    pub ts_ms: u64,
    pub partition: u32,
    pub offset: u64,
}

/// The raw log of one epoch. Sorts `rows` in place by (partition, offset).
pub fn raw_block(rows: &mut [RawRow]) -> Insert {
    rows.sort_unstable_by_key(|r| (r.partition, r.offset));
    let mut block = NativeBlock::new(5, rows.len());
    block.column_str("video_id", rows.iter().map(|r| r.video_id.as_str()));
    block.column_str("event_type", rows.iter().map(|r| r.event_type.as_str()));
    block.column_u64("ts", rows.iter().map(|r| r.ts_ms));
    block.column_u32("partition", "UInt32", rows.iter().map(|r| r.partition));
    block.column_u64("offset", rows.iter().map(|r| r.offset));
    Insert { table: "events_raw".into(), rows: block.rows(), body: block.finish() }
}

/// Payloads longer than this are cut (at a character boundary) in `dead_letters`.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// One row of `dead_letters`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeadLetterRow {
    pub job: String,
    pub topic: String,
    pub partition: u32,
    pub offset: u64,
    pub reason: String,
    pub detail: String,
    pub payload: String,
    pub message_ts: u64,
}

/// The payload as stored: lossy UTF-8, cut to [`MAX_PAYLOAD_BYTES`].
pub fn stored_payload(payload: Option<&[u8]>) -> String {
    let bytes = payload.unwrap_or_default();
    let bytes = &bytes[..bytes.len().min(MAX_PAYLOAD_BYTES)];
    let mut text = String::from_utf8_lossy(bytes).into_owned();
    if text.len() > MAX_PAYLOAD_BYTES {
        let mut end = MAX_PAYLOAD_BYTES;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Dead letters of one epoch. Sorts `rows` in place by (topic, partition, offset).
pub fn dead_letters_block(rows: &mut [DeadLetterRow]) -> Insert {
    rows.sort_unstable_by(|a, b| (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset)));
    let mut block = NativeBlock::new(8, rows.len());
    block.column_str("job", rows.iter().map(|r| r.job.as_str()));
    block.column_str("topic", rows.iter().map(|r| r.topic.as_str()));
    block.column_u32("partition", "UInt32", rows.iter().map(|r| r.partition));
    block.column_u64("offset", rows.iter().map(|r| r.offset));
    block.column_str("reason", rows.iter().map(|r| r.reason.as_str()));
    block.column_str("detail", rows.iter().map(|r| r.detail.as_str()));
    block.column_str("payload", rows.iter().map(|r| r.payload.as_str()));
    block.column_u64("message_ts", rows.iter().map(|r| r.message_ts));
    Insert { table: "dead_letters".into(), rows: block.rows(), body: block.finish() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_do_not_depend_on_arrival_order() {
        let row = |v: &str, n| ((v.to_string(), "view".to_string(), 60u32), n);
        let mut a = vec![row("b", 2), row("a", 1)];
        let mut b = vec![row("a", 1), row("b", 2)];
        assert_eq!(counts_block(Grain::Minute, 7, &mut a), counts_block(Grain::Minute, 7, &mut b));
        assert_ne!(counts_block(Grain::Minute, 7, &mut a), counts_block(Grain::Minute, 8, &mut b));
    }

    #[test]
    fn payloads_are_cut_at_a_character_boundary() {
        let long = "é".repeat(MAX_PAYLOAD_BYTES);
        let stored = stored_payload(Some(long.as_bytes()));
        assert!(stored.len() <= MAX_PAYLOAD_BYTES);
        assert!(stored.chars().all(|c| c == 'é'));
        assert_eq!(stored_payload(None), "");
        assert_eq!(stored_payload(Some(&[0x66, 0xff])), "f\u{fffd}");
    }
}
