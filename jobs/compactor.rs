//! The compactor of `event_stats`: merges the states of closed buckets on a thread of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use videocount_aggregates::Registry;
use videocount_clickhouse::ClickHouse;
use videocount_clickhouse::compact::{RoundLimits, compact};
use videocount_lease::{Fence, Permit};

use crate::JobArgs;
use crate::dataflow::Dataflow;
use crate::dataflow::event_stats::EventStats;

/// Compacts `event_stats`' closed buckets every `every`, on a thread of its own (see
/// `videocount_clickhouse::compact`), each round bounded by `max_states` per table; while a
/// round leaves closed buckets behind (a backlog), the next one follows at once. The first pass
/// looks at every closed bucket; once it is through, rounds look only at buckets that late events
/// can still reach (`--max-age-secs` and a day before now). Failures are logged and retried at the
/// next round.
pub(crate) fn spawn_compactor(
    args: &JobArgs,
    registry: Registry,
    every: Duration,
    (grace_secs, max_states): (u64, u64),
    stop: Arc<AtomicBool>,
    fence: Fence,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // A round's queries read a slice of a year-sized table: more than a write's timeout.
    let clickhouse = ClickHouse::new(args.clickhouse.config()).with_request_timeout(Duration::from_secs(600));
    let reach_secs = args.max_age_secs + 86_400;
    let job = args.job_name.clone().unwrap_or_else(|| EventStats::NAME.to_owned());
    let topic = args.topic.clone();
    std::thread::Builder::new().name("compactor".into()).spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            warn!("no compaction: cannot start a runtime");
            return;
        };
        let mut next = Instant::now() + every;
        let mut since_s = None;
        let mut after = std::collections::BTreeMap::new();
        let mut last_full_pass = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() < next {
                continue;
            }
            // Only the instance that holds the job's lease compacts (a standby waits, and an
            // instance that lost it stops).
            match fence.check() {
                Permit::Granted => {}
                Permit::Wait => continue,
                Permit::Lost(_) => return,
            }
            let started = Instant::now();
            let now = u64::from(videocount_events::clock::now_secs());
            // Once a day, a pass over every closed bucket again: late states below `since_s`
            // (a job that caught up on old messages) are compacted then.
            if last_full_pass.elapsed() >= Duration::from_secs(86_400) && after.is_empty() {
                since_s = None;
                last_full_pass = Instant::now();
            }
            let limits = RoundLimits { max_states, since_s, after: after.clone() };
            next = Instant::now() + every;
            match runtime.block_on(compact(&clickhouse, &registry, &job, &topic, (now, grace_secs), limits)) {
                Ok(report) => {
                    if report.more {
                        // The rest of the backlog, after this round's states (a table that had
                        // nothing left keeps its mark).
                        next = Instant::now();
                        after.extend(report.reached.clone());
                    } else {
                        // Through every closed bucket: from now on, only those late events reach.
                        after.clear();
                        since_s = Some(now.saturating_sub(reach_secs));
                    }
                    for table in report.tables {
                        info!(
                            table = table.table,
                            buckets = table.buckets,
                            states = table.states,
                            through_epoch = table.through_epoch,
                            seconds = started.elapsed().as_secs_f64(),
                            more = report.more,
                            "compacted"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "compaction failed; retrying next round"),
            }
        }
    })
}
