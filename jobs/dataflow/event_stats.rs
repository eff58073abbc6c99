//! `event_stats`: states of aggregate functions on a fast and a slow stream, and the
//! compactor of closed buckets.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::{Scope, Stream};
use tracing::info;
use videocount_aggregates::{FunctionsConfig, Speed};
use videocount_clickhouse::Writer;
use videocount_events::{EventId, Rejection, TimeLimits, parse_stats_event_with_id, route};
use videocount_operators::FlushEpochs;
use videocount_operators::pre_aggregate::{PreAggregate, SlowStream};
use videocount_operators::stats_epoch::{LocatedInput, Partial, StatsEpoch, StatsInput};

use super::{Dataflow, Writes};
use crate::EventStatsArgs;
use crate::compactor::spawn_compactor;
use videocount_lease::Fence;

/// `event_stats`: states of aggregate functions per (video, type, aggregate, minute/hour/day),
/// on a fast stream (exact functions) and a slow one (sketches).
#[derive(Debug)]
pub struct EventStats {
    pub functions: FunctionsConfig,
    pub slow: SlowStream,
    pub max_slow_epochs_behind: u64,
}

impl Dataflow for EventStats {
    type Event = StatsInput;
    const NAME: &'static str = "event_stats";

    fn parse(
        &self,
        payload: Option<&[u8]>,
        ts: Option<i64>,
        limits: TimeLimits,
    ) -> Result<(StatsInput, Option<EventId>), Rejection> {
        let (event, id) = parse_stats_event_with_id(payload, ts, limits)?;
        let aggregates = self.functions.resolve(&event)?;
        Ok((StatsInput { event, aggregates }, id))
    }

    fn build<'scope>(
        &self,
        _scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<LocatedInput>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope> {
        let registry = self.functions.registry().clone();
        let fast = events.clone().pre_aggregate_fast(registry.clone(), registry.mask(Speed::Fast));
        let slow = events.pre_aggregate_slow(registry.clone(), registry.mask(Speed::Slow), self.slow.clone());
        let mut written = [(fast, "WriteFastStats"), (slow, "WriteSlowStats")]
            .into_iter()
            .map(|(partials, name)| {
                let registry = registry.clone();
                let label = name.to_owned();
                partials.flush_epochs::<StatsEpoch, _, _>(
                    planned.clone(),
                    Exchange::new(|partial: &Partial| route(&partial.key.0)),
                    name,
                    writer.clone(),
                    move |epoch, states| match states.into_inserts(&registry, epoch) {
                        Ok(inserts) => inserts,
                        // A state this binary encoded and cannot decode is a bug; losing the
                        // epoch silently would be worse than stopping here.
                        Err(e) => panic!("{label}: epoch {epoch}: {e}"),
                    },
                )
            })
            .collect::<Vec<_>>();
        let slow = written.pop().into_iter().collect();
        Writes { fast: written, slow }
    }

    fn max_commit_lag(&self) -> Option<u64> {
        Some(self.max_slow_epochs_behind)
    }

    const COMMIT_LAG_FLAG: &'static str = "--max-slow-epochs-behind";

    fn blocks_per_epoch(&self, peers: u64) -> Vec<(&'static str, u64)> {
        // Each worker writes up to two blocks into each table per epoch: fast and slow.
        // `stats_changes` first: the query service's changelog (the minute block again).
        vec![
            ("stats_changes", 2 * peers),
            ("stats_minute", 2 * peers),
            ("stats_hour", 2 * peers),
            ("stats_day", 2 * peers),
        ]
    }

    fn settings(&self) -> String {
        // "with changelog": this build writes stats_changes, which the query service's memory
        // relies on; an older build, which does not, refuses to re-run this build's epochs.
        format!("functions {:016x} with changelog", self.functions.fingerprint())
    }
}

/// Runs `event_stats` until it is caught up (with `--until-caught-up`) or stopped by a signal.
pub fn run_event_stats(args: EventStatsArgs) -> anyhow::Result<()> {
    let functions = FunctionsConfig::load_or_default(args.functions.as_deref())?;
    let source = args.functions.as_ref().map_or("built-in config/functions.toml".into(), |p| p.display().to_string());
    info!(functions = %source, aggregates = ?functions.registry(), "functions loaded");
    let spill_dir = args.spill_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&spill_dir)
        .and_then(|()| tempfile_probe(&spill_dir))
        .with_context(|| format!("--spill-dir {} is not a writable directory", spill_dir.display()))?;
    let slow = SlowStream {
        delay_per_epoch: Duration::from_millis(args.slow_stream_delay_ms),
        memory_budget: args.slow_stream_memory_mb << 20,
        spill_dir,
        name: format!(
            "{}-{}",
            args.job.job_name.as_deref().unwrap_or(EventStats::NAME),
            args.job.topic.replace(|c: char| !c.is_ascii_alphanumeric(), "_")
        ),
    };
    let stop = Arc::new(AtomicBool::new(false));
    let fence = Fence::unheld();
    let compactor = (args.compact_every_secs > 0).then(|| {
        spawn_compactor(
            &args.job,
            functions.registry().clone(),
            Duration::from_secs(args.compact_every_secs),
            (args.compact_grace_secs, args.compact_max_states),
            Arc::clone(&stop),
            fence.clone(),
        )
    });
    let dataflow = EventStats { functions, slow, max_slow_epochs_behind: args.max_slow_epochs_behind };
    let result = crate::pipeline::run_job_fenced(args.job, dataflow, fence);
    stop.store(true, Ordering::Relaxed);
    if let Some(Ok(thread)) = compactor {
        let _ = thread.join();
    }
    result
}

/// Checks that `dir` takes a file (the slow stream's spill files go there).
fn tempfile_probe(dir: &std::path::Path) -> std::io::Result<()> {
    let probe = dir.join(format!(".videocount-probe-{}", std::process::id()));
    std::fs::write(&probe, b"")?;
    std::fs::remove_file(&probe)
}
