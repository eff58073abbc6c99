//! The protocol between the source, the writes and the commit of a job: who may read ahead,
//! who must wait, and what unblocks whom. One type, [`Throttle`], holds the source's side; the
//! rest is carried by timely frontiers, which is why it is written down here.
//!
//! For an epoch `e` (a timely timestamp, one interval of the source):
//!
//! 1. **Plan first.** The source emits `e`'s offset ranges; `WritePlan` writes them to
//!    `checkpoint_ranges`. Every other write of `e` is a `flush_epochs` whose *gate* input is
//!    the plan's output, so no row of `e` reaches ClickHouse before the plan that lets a
//!    restart re-run `e` over exactly the same messages.
//! 2. **Rows next, in any order.** Each writer (`WriteCounts`, `WriteRaw`, `WriteDeadLetters`,
//!    the stats streams) holds a capability for `e` until the writer queue reports every block
//!    of `e` written; its output frontier passing `e` means "e's rows are in ClickHouse".
//!    The slow stream of `event_stats` holds its capabilities on another thread until its
//!    sketches of `e` are done, so it may finish long after the fast stream.
//! 3. **Commit last.** `Commit` is a `flush_epochs` over the concatenation of every write's
//!    output: it writes `e`'s row of `checkpoint_commits` once all of them passed `e`.
//! 4. **Read-ahead is bounded.** The source reads live messages into epoch `e` only while
//!    - the *fast* writes (plan, dead letters and the dataflow's fast streams) have passed
//!      `e - max_epochs_in_flight` ([`Throttle::written`]), and
//!    - the commits have passed `e - max_commit_lag` ([`Throttle::committed`]).
//!
//!    Otherwise it stops polling (messages it already fetched are read again later), and the
//!    back-pressure reaches Kafka, not memory. Re-runs of pending epochs are never held back:
//!    later epochs wait for them through the frontier anyway.
//!
//! "Why did the source stop reading?" is therefore [`Throttle::blocked`]: the writes (ClickHouse
//! slow or down: the writer queue is full and the fast frontier stands still) or the commits
//! (the slow stream's backlog).

use timely::dataflow::operators::probe::Handle as ProbeHandle;

/// What the source waits on before it reads ahead (rule 4 of the module documentation).
#[derive(Clone)]
pub struct Throttle {
    /// The frontier of the writes that must keep up with the source.
    pub written: ProbeHandle<u64>,
    /// The frontier of the commits, which may lag further behind when a slow stream keeps its
    /// backlog out of memory.
    pub committed: ProbeHandle<u64>,
    /// Epochs the fast writes may lag behind the source's live epoch.
    pub max_epochs_in_flight: u64,
    /// Epochs the commits may lag behind the source's live epoch (at least
    /// `max_epochs_in_flight`).
    pub max_commit_lag: u64,
}

/// Why the source does not read ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocked {
    /// The fast writes are more than `max_epochs_in_flight` epochs behind.
    Writes,
    /// The commits are more than `max_commit_lag` epochs behind.
    Commits,
}

impl Throttle {
    /// Whether the source may read live messages into `live_epoch`, and if not, why.
    pub fn blocked(&self, live_epoch: u64) -> Option<Blocked> {
        if self.written.less_than(&live_epoch.saturating_sub(self.max_epochs_in_flight)) {
            Some(Blocked::Writes)
        } else if self
            .committed
            .less_than(&live_epoch.saturating_sub(self.max_commit_lag.max(self.max_epochs_in_flight)))
        {
            Some(Blocked::Commits)
        } else {
            None
        }
    }
}
