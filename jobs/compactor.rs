//! The compactor of `event_stats`: merges the states of closed buckets on a thread of its own.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use videocount_aggregates::Registry;
use videocount_clickhouse::ClickHouse;
use videocount_clickhouse::compact::compact;
use videocount_lease::{Fence, Permit};

use crate::JobArgs;
use crate::dataflow::Dataflow;
use crate::dataflow::event_stats::EventStats;

/// Compacts `event_stats`' closed buckets every `every`, on a thread of its own (see
/// `videocount_clickhouse::compact`). Failures are logged and retried at the next round.
pub(crate) fn spawn_compactor(
    args: &JobArgs,
    registry: Registry,
    every: Duration,
    grace_secs: u64,
    stop: Arc<AtomicBool>,
    fence: Fence,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let clickhouse = ClickHouse::new(args.clickhouse.config());
    let job = args.job_name.clone().unwrap_or_else(|| EventStats::NAME.to_owned());
    let topic = args.topic.clone();
    std::thread::Builder::new().name("compactor".into()).spawn(move || {
        let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            warn!("no compaction: cannot start a runtime");
            return;
        };
        let mut next = Instant::now() + every;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(200));
            if Instant::now() < next {
                continue;
            }
            next = Instant::now() + every;
            // Only the instance that holds the job's lease compacts (a standby waits, and an
            // instance that lost it stops).
            match fence.check() {
                Permit::Granted => {}
                Permit::Wait => continue,
                Permit::Lost(_) => return,
            }
            let started = Instant::now();
            let now = u64::from(videocount_events::clock::now_secs());
            match runtime.block_on(compact(&clickhouse, &registry, &job, &topic, now, grace_secs)) {
                Ok(report) => {
                    for table in report {
                        info!(
                            table = table.table,
                            buckets = table.buckets,
                            states = table.states,
                            through_epoch = table.through_epoch,
                            seconds = started.elapsed().as_secs_f64(),
                            "compacted"
                        );
                    }
                }
                Err(e) => warn!(error = %e, "compaction failed; retrying next round"),
            }
        }
    })
}
