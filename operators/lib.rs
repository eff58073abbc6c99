//! Timely operators of the videocount jobs, one per file:
//!
//! - [`kafka_source`]: reads the partitions a worker owns, parses each message into an event
//!   or a dead letter, and closes an epoch every interval, emitting the epoch's offset ranges;
//!   after a crash it first re-runs pending epochs over exactly their recorded ranges.
//! - [`flush_epochs`]: gathers a stream per epoch and, once the frontier (and a gate) passed
//!   the epoch, hands its blocks to the bounded ClickHouse write queue, holding the epoch's
//!   capability until they are written.
//! - [`count_events`]: the per-epoch state that counts events per (video, type, minute) and
//!   rolls the counts up to hours and days.
//! - [`aggregate`]: aggregate functions as an open set (one trait, one file per aggregate),
//!   and the functions config of `event_stats`.
//! - [`aggregate_events`]: `event_stats`' fast and slow streams (`PreAggregate`) and the
//!   per-epoch merge of partial states into minute, hour and day rows.

pub mod aggregate;
pub mod aggregate_events;
pub mod count_events;
pub mod flush_epochs;
pub mod kafka_source;

pub use count_events::EventCounts;
pub use flush_epochs::{EpochState, FlushEpochs};
pub use kafka_source::{SourceConfig, SourceItem, kafka_source};
