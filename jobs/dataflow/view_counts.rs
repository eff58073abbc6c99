//! `view_counts`: counts per (video, type, minute/hour/day), and the raw event log.

use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use compact_str::CompactString;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::{Scope, Stream};
use tracing::{info, warn};
use videocount_clickhouse::checkpoints::{self, JobState};
use videocount_clickhouse::rows::{Insert, RawRow, TopRow, count_blocks_row, raw_block, top_videos_block};
use videocount_clickhouse::{ClickHouse, Writer};
use videocount_events::{Event, EventId, Located, Rejection, TimeLimits, parse_event_with_id, route};
use videocount_operators::count_events::count_epochs;
use videocount_operators::trending::{Cell, Restored, WINDOWS, trending};
use videocount_operators::{EventCounts, FlushEpochs};

use super::{Dataflow, Writes};
use crate::JobArgs;

/// `view_counts`: counts per (video, type, minute/hour/day), and the raw event log.
#[derive(Debug, Default)]
pub struct ViewCounts {
    pub events_raw: bool,
    /// The length of the top lists, or no trending.
    pub top_k: Option<usize>,
    /// The trending windows as the last committed epoch left them (read by `restore`); each
    /// worker takes its videos' share when it builds its dataflow.
    restored: Mutex<Option<Arc<Restored>>>,
}

impl ViewCounts {
    pub fn new(events_raw: bool, top_k: Option<usize>) -> ViewCounts {
        ViewCounts { events_raw, top_k, restored: Mutex::default() }
    }

    /// The restored windows' cells of the videos worker `index` (of `peers`) counts.
    fn restored_share(&self, index: usize, peers: usize) -> Restored {
        let all = self.restored.lock().ok().and_then(|restored| restored.clone());
        let Some(all) = all else { return Restored::default() };
        let cells = all
            .cells
            .iter()
            .filter(|((_, video, _), _)| route(video) % peers as u64 == index as u64)
            .cloned()
            .collect();
        Restored { now: all.now, cells, lists: all.lists.clone() }
    }
}

impl Dataflow for ViewCounts {
    type Event = Event;
    const NAME: &'static str = "view_counts";

    fn parse(
        &self,
        payload: Option<&[u8]>,
        ts: Option<i64>,
        limits: TimeLimits,
    ) -> Result<(Event, Option<EventId>), Rejection> {
        parse_event_with_id(payload, ts, limits)
    }

    fn blocks_per_epoch(&self, peers: u64) -> Vec<(&'static str, u64)> {
        // Each worker writes one block into each table per epoch.
        let mut tables = vec![
            ("count_changes", peers),
            ("event_counts_minute", peers),
            ("event_counts_hour", peers),
            ("event_counts_day", peers),
            ("count_blocks", peers),
        ];
        if self.events_raw {
            tables.push(("events_raw", peers));
        }
        if self.top_k.is_some() {
            tables.push(("top_videos", peers));
        }
        tables
    }

    async fn restore(&self, clickhouse: &ClickHouse, state: &JobState) -> anyhow::Result<()> {
        let (Some(_), Some(last_committed)) = (self.top_k, state.last_committed) else { return Ok(()) };
        let started = Instant::now();
        // With replicas: read only once this replica has every acknowledged minute block.
        clickhouse.sync_replica(&["count_changes", "top_videos"]).await.context(
            "waiting for this ClickHouse replica to have count_changes and top_videos (SYSTEM SYNC REPLICA)",
        )?;
        let lists: Vec<(CompactString, u8)> = checkpoints::top_lists(clickhouse, last_committed)
            .await
            .context("reading which top lists top_videos has")?
            .into_iter()
            .filter_map(|(event_type, period)| {
                let window = WINDOWS.iter().position(|w| w.name == period)?;
                Some((CompactString::from(event_type), window as u8))
            })
            .collect();
        // No list written yet: the first run with trending. Builds before it dropped the
        // changelog's older partitions (they did not keep the windows' minutes), so it may hold
        // only part of the window; the raw log has every committed event once.
        let first_run = lists.is_empty();
        let (mut now, mut cells, mut source) = (None, Vec::new(), "events_raw");
        if !(first_run && self.events_raw) {
            (now, cells) = checkpoints::trending_window(clickhouse, last_committed)
                .await
                .context("reading the trending windows' minute counts from count_changes")?;
            source = "count_changes";
        }
        if now.is_none() && self.events_raw {
            // Empty: written by a build without it, or a new database.
            (now, cells) = checkpoints::trending_window_from_raw(clickhouse, &state.pending)
                .await
                .context("reading the trending windows' minute counts from events_raw")?;
            source = "events_raw";
        }
        let cells: Vec<Cell> = cells
            .into_iter()
            .map(|(event_type, video, minute, count)| ((event_type.into(), video.into(), minute), count))
            .collect();
        if now.is_none() {
            warn!(
                last_committed,
                "count_changes holds no minute up to the last committed epoch (written by a build without it) and \
                 events_raw is off or empty: the top lists start from empty windows and hold only what this run counts"
            );
        }
        info!(
            last_committed,
            source,
            newest_minute = ?now,
            cells = cells.len(),
            seconds = started.elapsed().as_secs_f64(),
            "trending windows restored"
        );
        *self.restored.lock().map_err(|_| anyhow::anyhow!("poisoned"))? =
            Some(Arc::new(Restored { now, cells, lists }));
        Ok(())
    }

    fn settings(&self) -> String {
        // "changelog with event times": this build writes count_changes (with each row's event
        // times) and count_blocks, which the query service's memory relies on; a build that
        // writes them otherwise must not re-run this one's epochs (nor this one theirs).
        let trending = self.top_k.map_or_else(|| "off".to_owned(), |k| format!("top {k}"));
        format!("events_raw {}, changelog with event times, trending {trending}", self.events_raw)
    }

    fn build<'scope>(
        &self,
        scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<Located>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope> {
        let (worker, peers) = (scope.index() as u32, scope.peers() as u32);
        // Each epoch's counts on the worker of their video, shared by the count blocks and the
        // top lists.
        let counts = count_epochs(events.clone());
        let counted = counts.clone().flush_epochs::<Vec<Rc<EventCounts>>, _, _>(
            planned.clone(),
            Pipeline,
            "WriteCounts",
            writer.clone(),
            move |epoch, counts| match counts.first() {
                Some(counts) if !counts.is_empty() => with_changelog(counts, epoch, worker, peers),
                _ => Vec::new(),
            },
        );
        let mut written = vec![counted];
        if let Some(k) = self.top_k {
            let restored = self.restored_share(scope.index(), scope.peers());
            written.push(trending(counts, k, restored).flush_epochs::<Vec<TopRow>, _, _>(
                planned.clone(),
                Pipeline,
                "WriteTop",
                writer.clone(),
                |epoch, mut rows| {
                    if rows.is_empty() {
                        return Vec::new();
                    }
                    vec![top_videos_block(epoch, &mut rows)]
                },
            ));
        }
        if self.events_raw {
            written.push(events.flush_epochs::<Vec<Located>, _, _>(
                planned,
                Pipeline,
                "WriteRaw",
                writer.clone(),
                |_epoch, rows| {
                    if rows.is_empty() {
                        return Vec::new();
                    }
                    let mut rows: Vec<RawRow> = rows
                        .into_iter()
                        .map(|(e, partition, offset)| RawRow {
                            video_id: e.video_id.into_string(),
                            event_type: e.event_type.into_string(),
                            ts_ms: e.ts_ms,
                            partition,
                            offset,
                        })
                        .collect();
                    vec![raw_block(&mut rows)]
                },
            ));
        }
        Writes { fast: written, slow: Vec::new() }
    }
}

/// An epoch's count blocks of one worker, in the order the query service's in-memory counts
/// rely on (docs/reads-from-memory.md): the minute block with its event times into
/// `count_changes` first, then `event_counts_minute`, then the worker's row in `count_blocks`
/// saying the minute block is in, then the hour and day blocks ([`EventCounts::inserts`] gives
/// changes, minute, hour, day). The writer sends a batch's inserts one after the other. The
/// marker comes right after the minute block, not after the rollups: a key's load that reads
/// while a block is between its changelog rows and its marker tries again, so the shorter that
/// stretch, the sooner a key written every epoch loads.
fn with_changelog(counts: &EventCounts, epoch: u64, worker: u32, peers: u32) -> Vec<Insert> {
    let mut inserts = counts.inserts(epoch);
    let after_minutes =
        inserts.iter().position(|insert| insert.table == "event_counts_minute").map_or(inserts.len(), |i| i + 1);
    inserts.insert(after_minutes, count_blocks_row(epoch, worker, peers));
    inserts
}

/// Runs `view_counts` until it is caught up (with `--until-caught-up`) or stopped by a signal.
pub fn run_view_counts(args: JobArgs) -> anyhow::Result<()> {
    let dataflow = ViewCounts::new(!args.no_events_raw, (!args.no_trending).then_some(args.top_k));
    crate::pipeline::run_job(args, dataflow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_follows_the_minute_block_and_precedes_the_rollups() {
        let mut counts = EventCounts::default();
        counts.add(videocount_events::Event {
            video_id: "v".into(),
            event_type: "view".into(),
            ts_ms: 1_795_737_600_000,
        });
        let tables: Vec<String> = with_changelog(&counts, 7, 1, 2).into_iter().map(|insert| insert.table).collect();
        assert_eq!(
            tables,
            ["count_changes", "event_counts_minute", "count_blocks", "event_counts_hour", "event_counts_day"]
        );
    }
}
