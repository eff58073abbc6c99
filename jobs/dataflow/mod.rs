//! The two dataflows between the shared source and commit ([`crate::pipeline`]): what a job
//! parses a message into and which writes an epoch makes.

pub mod event_stats;
pub mod view_counts;

use timely::dataflow::{Scope, Stream};
use videocount_clickhouse::checkpoints::JobState;
use videocount_clickhouse::{ClickHouse, Writer};
use videocount_events::{EventId, Located, Rejection, TimeLimits};

/// The part of a job between its source and its commit.
pub trait Dataflow: Send + Sync + 'static {
    /// What the source makes of a valid message.
    type Event: timely::ExchangeData + Clone;
    /// The default `--job-name`.
    const NAME: &'static str;
    /// Parses one message, with its `event_id`; must depend on its arguments only (a re-run
    /// parses alike).
    fn parse(
        &self,
        payload: Option<&[u8]>,
        message_ts_ms: Option<i64>,
        limits: TimeLimits,
    ) -> Result<(Self::Event, Option<EventId>), Rejection>;
    /// The writes of an epoch's events, each gated on `planned`; the epoch commits once the
    /// frontier of every returned stream has passed it.
    fn build<'scope>(
        &self,
        scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<Located<Self::Event>>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope>;
    /// The dataflow's own settings that the bytes of its blocks depend on (`events_raw=true`,
    /// the functions config's hash), in a stable text: part of the settings a re-run of an
    /// interrupted epoch must share with its first run ([`crate::pipeline::block_settings`]).
    fn settings(&self) -> String;
    /// How many epochs the commit may lag behind the source (default: --max-epochs-in-flight).
    fn max_commit_lag(&self) -> Option<u64> {
        None
    }
    /// The flag that sets [`Dataflow::max_commit_lag`], for messages.
    const COMMIT_LAG_FLAG: &'static str = "--max-epochs-in-flight";
    /// Reads what the dataflow keeps across epochs as it was after the last committed epoch,
    /// before any epoch runs (view_counts' trending windows); nothing by default.
    fn restore(
        &self,
        _clickhouse: &ClickHouse,
        _state: &JobState,
    ) -> impl std::future::Future<Output = anyhow::Result<()>> + Send {
        async { Ok(()) }
    }
    /// The tables this dataflow writes and the most blocks one epoch writes into each, with
    /// `peers` workers in all (for the dedup window check at start).
    fn blocks_per_epoch(&self, peers: u64) -> Vec<(&'static str, u64)>;
}

/// A dataflow's writes: the source waits for `fast` within --max-epochs-in-flight, and for the
/// commit (which also waits for `slow`) within [`Dataflow::max_commit_lag`].
pub struct Writes<'scope> {
    pub fast: Vec<Stream<'scope, u64, Vec<()>>>,
    pub slow: Vec<Stream<'scope, u64, Vec<()>>>,
}
