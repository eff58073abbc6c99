//! `view_counts`: counts per (video, type, minute/hour/day), and the raw event log.

use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::{Scope, Stream};
use videocount_clickhouse::Writer;
use videocount_clickhouse::rows::{RawRow, raw_block};
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
        let mut tables =
            vec![("event_counts_minute", peers), ("event_counts_hour", peers), ("event_counts_day", peers)];
        if self.events_raw {
            tables.push(("events_raw", peers));
        }
        tables
    }

    fn settings(&self) -> String {
        format!("events_raw {}", self.events_raw)
    }

    fn build<'scope>(
        &self,
        _scope: Scope<'scope, u64>,
        events: Stream<'scope, u64, Vec<Located>>,
        planned: Stream<'scope, u64, Vec<()>>,
        writer: &Writer,
    ) -> Writes<'scope> {
        let counted = events.clone().flush_epochs::<EventCounts, _, _>(
            planned.clone(),
            Exchange::new(|(event, _, _): &Located| route(&event.video_id)),
            "WriteCounts",
            writer.clone(),
            |epoch, counts| counts.into_inserts(epoch),
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

/// Runs `view_counts` until it is caught up (with `--until-caught-up`) or stopped by a signal.
pub fn run_view_counts(args: JobArgs) -> anyhow::Result<()> {
    let dataflow = ViewCounts { events_raw: !args.no_events_raw };
    crate::pipeline::run_job(args, dataflow)
}
