//! Timely operators of the videocount jobs, one per file, and the per-epoch state types they
//! fold into:
//!
//! - [`kafka_source`]: reads the partitions a worker owns, parses each message into an event
//!   or a dead letter, and closes an epoch every interval, emitting the epoch's offset ranges;
//!   after a crash it first re-runs pending epochs over exactly their recorded ranges, placing
//!   each message with a [`partition_cursor`]; an event whose `event_id` was counted shortly
//!   before in its partition is a dead letter `duplicate event_id` ([`dedup`]).
//! - [`flush_epochs`]: gathers a stream per epoch and, once the frontier (and a gate) passed
//!   the epoch, hands its blocks to the bounded ClickHouse write queue, holding the epoch's
//!   capability until they are written.
//! - [`back_pressure`]: the protocol between the source, the writes and the commit (who may
//!   read ahead, who waits for whom), and the source's side of it, [`Throttle`].
//! - [`count_events`]: the per-epoch state type that counts events per (video, type, minute) and
//!   rolls the counts up to hours and days.
//! - [`pre_aggregate`]: `event_stats`' fast and slow streams (`PreAggregate`), with the slow
//!   stream's backlog in a [`spill`] file;
//! - [`stats_epoch`]: the per-epoch partial states of aggregate functions and their merge into
//!   minute, hour and day rows (a state type, like [`count_events`]).
//! - [`trending`]: the top videos per event type of the last hour and day of event time, kept
//!   incrementally with differential dataflow (hierarchical top K), and the rows each epoch
//!   writes to `top_videos`.

pub mod back_pressure;
pub mod count_events;
pub mod dedup;
pub mod flush_epochs;
pub mod kafka_source;
pub mod needed_offsets;
pub mod partition_cursor;
pub mod pre_aggregate;
pub mod spill;
pub mod stats_epoch;
pub mod trending;

pub use back_pressure::Throttle;
pub use count_events::EventCounts;
pub use flush_epochs::{EpochState, FlushEpochs};
pub use kafka_source::{SourceConfig, SourceItem, kafka_source};
pub use needed_offsets::NeededOffsets;
