//! The timely dataflow jobs of videocount and the pipeline they share.
//!
//! - [`args`]: the flags, and the ClickHouse, Kafka and timely settings they turn into;
//! - [`kafka`]: topic checks, the dead-letter producer and the lag monitor;
//! - [`database`](mod@database): one topic per database, dedup windows large enough for re-runs;
//! - [`pipeline`]: [`run_job`], the source, plan, dead letters and commit of every epoch around
//!   a [`Dataflow`];
//! - [`dataflow`]: the two dataflows, [`ViewCounts`] and [`EventStats`];
//! - [`compactor`]: `event_stats`' merging of closed buckets;
//! - [`metrics`](mod@metrics): `--metrics-listen`.
//!
//! `view_counts`:
//!
//! ```text
//!  KafkaSource ─┬─ events ──exchange(video_id)──▶ WriteCounts ──────┐
//!   (worker i)  │         └────────────────────▶ WriteRaw ─────────┤
//!               ├─ dead letters ───────────────▶ WriteDeadLetters ─┼─exchange(0)─▶ Commit ─▶ probe
//!               └─ ranges ──exchange(0)──▶ WritePlan ──(gate)──────┘
//! ```
//!
//! `event_stats` replaces WriteCounts and WriteRaw with a fast and a slow stream
//! (`videocount_operators::pre_aggregate`), both written before the commit.

mod agreement;
pub mod args;
pub mod compactor;
pub mod database;
pub mod dataflow;
pub mod kafka;
pub mod metrics;
pub mod pipeline;

pub use args::{EventStatsArgs, JobArgs};
pub use dataflow::event_stats::{EventStats, run_event_stats};
pub use dataflow::view_counts::{ViewCounts, run_view_counts};
pub use dataflow::{Dataflow, Writes};
pub use kafka::partition_lag;
pub use pipeline::run_job;
pub use videocount_http::init_logging;
