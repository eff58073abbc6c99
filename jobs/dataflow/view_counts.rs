//! `view_counts`: counts per (video, type, minute/hour/day), and the raw event log.

use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::{Scope, Stream};
use videocount_clickhouse::Writer;
use videocount_clickhouse::rows::{Grain, Insert, RawRow, count_blocks_row, raw_block};
use videocount_events::{Event, EventId, Located, Rejection, TimeLimits, parse_event_with_id, route};
use videocount_operators::{EventCounts, FlushEpochs};

use super::{Dataflow, Writes};
use crate::JobArgs;

/// `view_counts`: counts per (video, type, minute/hour/day), and the raw event log.
#[derive(Debug)]
pub struct ViewCounts {
    pub events_raw: bool,
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
        tables
    }

    fn settings(&self) -> String {
        // "changelog": this build writes count_changes and count_blocks, which the query
        // service's memory relies on; an older build must not re-run this one's epochs.
        format!("events_raw {}, changelog", self.events_raw)
    }

    fn build<'scope>(
        &self,
        scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<Located>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope> {
        let (worker, peers) = (scope.index() as u32, scope.peers() as u32);
        let counted = events.clone().flush_epochs::<EventCounts, _, _>(
            planned.clone(),
            Exchange::new(|(event, _, _): &Located| route(&event.video_id)),
            "WriteCounts",
            writer.clone(),
            move |epoch, counts| with_changelog(counts.into_inserts(epoch), epoch, worker, peers),
        );
        let mut written = vec![counted];
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
/// rely on (docs/reads-from-memory.md): the minute block into `count_changes` first, then the
/// three count tables, then the worker's row in `count_blocks` saying they are all written. The
/// writer sends a batch's inserts one after the other.
fn with_changelog(counts: Vec<Insert>, epoch: u64, worker: u32, peers: u32) -> Vec<Insert> {
    let Some(minute) = counts.iter().find(|insert| insert.table == Grain::Minute.table()) else {
        return counts;
    };
    let changes = Insert { table: "count_changes".into(), rows: minute.rows, body: minute.body.clone() };
    let mut inserts = Vec::with_capacity(counts.len() + 2);
    inserts.push(changes);
    inserts.extend(counts);
    inserts.push(count_blocks_row(epoch, worker, peers));
    inserts
}

/// Runs `view_counts` until it is caught up (with `--until-caught-up`) or stopped by a signal.
pub fn run_view_counts(args: JobArgs) -> anyhow::Result<()> {
    let dataflow = ViewCounts { events_raw: !args.no_events_raw };
    crate::pipeline::run_job(args, dataflow)
}
