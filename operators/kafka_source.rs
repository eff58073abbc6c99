//! `kafka_source`: the partitions a worker owns, read epoch by epoch.
//!
//! Worker `i` of `n` owns partition `p` when `p % n == i` (manual assignment: no consumer
//! group rebalancing can move a partition while an epoch is open). Each message becomes a
//! [`SourceItem::Event`] or a [`SourceItem::DeadLetter`] at the current epoch. Every
//! `epoch_interval` the source emits one [`SourceItem::Range`] per partition that moved, the
//! offsets the epoch covers, and advances its capability to the next epoch. Partitions added
//! to the topic while it runs (the lag monitor sees the count grow) are assigned at the next
//! epoch boundary, from their start, by the worker that owns them by the same rule.
//!
//! On start it first re-runs the pending epochs of the checkpoint (planned, not committed):
//! each message whose offset falls in a recorded range goes to that range's epoch, so the
//! re-run epoch holds exactly the messages it held before the crash. Live epochs continue
//! after the last recorded offset, numbered after every epoch ever planned.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::source;
use timely::dataflow::{Scope, Stream};
use tracing::{info, warn};
use videocount_clickhouse::checkpoints::{JobState, Range, generation};
use videocount_clickhouse::rows::{DeadLetterRow, stored_payload};
use videocount_events::{Event, EventId, RejectReason, Rejection, TimeLimits};
use videocount_kafka::KafkaClients;

use crate::back_pressure::Throttle;
use crate::dedup::DedupWindow;
use crate::partition_cursor::{PartitionCursor, Placement};

/// What the source emits.
#[derive(Clone, Debug, PartialEq)]
pub enum SourceItem<E = Event> {
    /// A valid event, with the partition and offset it was read from.
    Event(E, u32, u64),
    /// A message that is not a valid event (boxed: rare, and large next to an event).
    DeadLetter(Box<DeadLetterRow>),
    /// The offsets this epoch covers in one partition.
    Range(Range),
}

/// How long the client library retries an event (`max_elapsed`, 5 min) plus its request
/// timeout (25 s): a dedup window should reach back further.
const RETRY_SPAN_MS: i64 = 330_000;

/// Shared counters for progress logs and metrics.
#[derive(Debug, Default)]
pub struct SourceProgress {
    pub messages: AtomicU64,
    pub dead_letters: AtomicU64,
    /// Dead letters by their [`RejectReason`](videocount_events::RejectReason) string.
    pub dead_letter_reasons: std::sync::Mutex<BTreeMap<&'static str, u64>>,
    /// Per partition: where the source is (updated after every poll of this worker's
    /// partitions) and, from the lag monitor, how far behind.
    pub positions: std::sync::Mutex<BTreeMap<u32, PartitionPosition>>,
    /// Set by whoever watches the topic (the job's lag monitor) when the source cannot go on
    /// exactly, e.g. a partition's offsets went backwards: the job stops with this reason.
    pub fatal: std::sync::Mutex<Option<String>>,
    /// The offsets a restart would read again, where this process plans epochs (process 0);
    /// `None` elsewhere.
    pub needed: std::sync::Mutex<Option<crate::NeededOffsets>>,
    /// How many partitions the topic has, as last seen (the lag monitor reads the metadata);
    /// the source starts reading partitions added while it runs at its next epoch boundary.
    pub partitions: std::sync::atomic::AtomicU32,
}

impl SourceProgress {
    /// Stops the job with `reason` (every worker checks [`SourceProgress::fatal`]); the first
    /// reason given is the one reported.
    pub fn stop(&self, reason: String) {
        if let Ok(mut fatal) = self.fatal.lock() {
            fatal.get_or_insert(reason);
        }
    }

    /// Messages between the consumed positions and the high watermarks, over all partitions,
    /// as of the lag monitor's last look.
    pub fn lag(&self) -> u64 {
        self.positions.lock().map_or(0, |p| p.values().map(|position| position.lag_messages).sum())
    }
}

/// One partition's place in the stream, for the lag metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PartitionPosition {
    /// The next offset to read.
    pub next: u64,
    /// Kafka timestamp (ms) of the last message read; 0 before the first.
    pub last_message_ms: i64,
    /// Messages between `next` and the high watermark (the lag monitor's last look).
    pub lag_messages: u64,
    /// How far behind in time: now minus the last read message's timestamp while messages are
    /// waiting, 0 when caught up.
    pub lag_seconds: f64,
    /// The oldest offset a restart would read again minus the partition's log start (the lag
    /// monitor's last look): how many messages retention may still delete before it deletes
    /// some the job needs; negative once it has. `None` where unknown.
    pub retention_headroom: Option<i64>,
    /// Event ids in the partition's dedup window.
    pub dedup_ids: u64,
    /// How far back the dedup window reaches: the Kafka time the last whole chunk took (ms);
    /// `None` until a whole chunk with ids was read since the start.
    pub dedup_window_ms: Option<i64>,
}

/// Settings of the source.
#[derive(Clone, Debug)]
pub struct SourceConfig {
    /// Job name: in dead letters and the consumer's client id.
    pub job: String,
    pub topic: String,
    /// The brokers and the user's raw librdkafka options.
    pub kafka: KafkaClients,
    /// Number of partitions of `topic`.
    pub partitions: u32,
    pub epoch_interval: Duration,
    pub limits: TimeLimits,
    /// Stop at the high watermarks seen at start.
    pub until_caught_up: bool,
    pub state: Arc<JobState>,
    /// Set by SIGINT/SIGTERM: close the current epoch and stop.
    pub shutdown: Arc<AtomicBool>,
    pub progress: Arc<SourceProgress>,
    /// Chunks of this many offsets: an event whose `event_id` a valid event before it in its
    /// chunk or the one before had is a duplicate ([`crate::dedup`]); 0: ids are not looked at.
    pub dedup_window: u64,
}

/// The source consumer's context: librdkafka reports an offset that is not on the broker (with
/// `auto.offset.reset=error`) as a client error, not as a message; it stops the job.
pub struct SourceContext {
    topic: String,
    progress: Arc<SourceProgress>,
}

impl ClientContext for SourceContext {
    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() != Some(RDKafkaErrorCode::AutoOffsetReset) {
            warn!(%error, reason, "Kafka client error");
            return;
        }
        offset_not_on_broker(&self.progress, &self.topic, reason);
    }
}

/// Stops the job: the offset to read next is not on the broker, and reading on from elsewhere
/// would skip or repeat messages. librdkafka reports it as a client error or as a consumption
/// error, depending on where the fetch failed.
fn offset_not_on_broker(progress: &SourceProgress, topic: &str, detail: &str) {
    let fatal = format!(
        "topic {topic:?}: {detail}. The offset the job must read next is not on the broker: the topic was deleted \
         and recreated, its offsets were reset, or retention deleted messages not yet counted. Counting on \
         would skip or repeat messages; to count the topic as it is now, run the job under a new --job-name"
    );
    progress.stop(fatal);
}

impl ConsumerContext for SourceContext {}

/// A source that cannot start.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("Kafka consumer for {topic}: {error}")]
    Kafka { topic: String, error: rdkafka::error::KafkaError },
    /// Retention deleted offsets the checkpoint needs (the job checks this before it starts;
    /// this is the same check at the moment of reading, for retention that ran in between).
    #[error(
        "retention deleted offsets {from}..{log_start} of partition {partition} of {topic} before they were \
         counted; starting would skip them (see the job's start-up check for what to do)"
    )]
    Retention { topic: String, partition: u32, from: u64, log_start: u64 },
}

/// The consumer configuration: tuning defaults, then the user's options, then what the job
/// relies on (which the user cannot override).
pub fn consumer_config(kafka: &KafkaClients, job: &str, worker: usize) -> ClientConfig {
    // Defaults for catching up fast: 1 MiB per partition per fetch (librdkafka's default)
    // capped a consumer at ~250k small events/s here; the prefetch queue holds a few epochs.
    let mut client = kafka.config(&[
        ("max.partition.fetch.bytes", "16777216"),
        ("fetch.max.bytes", "67108864"),
        ("queued.max.messages.kbytes", "131072"),
        ("fetch.wait.max.ms", "50"),
    ]);
    client
        .set("client.id", format!("videocount-{job}-{worker}"))
        // Only for monitoring tools; partitions are assigned by hand, never by the group.
        .set("group.id", format!("videocount-{job}"))
        // Offsets are the job's state, recorded in ClickHouse with its output.
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        // Every partition is assigned at an explicit offset. If that offset is not on the broker
        // (see the source's AutoOffsetReset error), jumping to another one would skip or repeat
        // messages silently: it is an error that stops the job.
        .set("auto.offset.reset", "error");
    client
}

/// Copies this worker's cursors and dedup windows into the shared positions (the lag monitor
/// and the metrics read them).
fn publish_positions(
    progress: &SourceProgress,
    partitions: &BTreeMap<u32, PartitionCursor>,
    windows: &BTreeMap<u32, DedupWindow>,
) {
    let Ok(mut positions) = progress.positions.lock() else { return };
    for (p, cursor) in partitions {
        let position = positions.entry(*p).or_default();
        position.next = cursor.next();
        position.last_message_ms = cursor.last_message_ms();
        if let Some(window) = windows.get(p) {
            position.dedup_ids = window.len() as u64;
            position.dedup_window_ms = window.chunk_ms().filter(|ms| *ms >= 0);
        }
    }
}

/// Starts reading the partitions `new` that this worker owns, from their log start (they were
/// never read), by assigning them beside the others (each at its cursor). Returns the added ones.
fn add_partitions<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    config: &SourceConfig,
    new: std::ops::Range<u32>,
    worker: usize,
    peers: usize,
    partitions: &mut BTreeMap<u32, PartitionCursor>,
) -> Result<Vec<u32>, rdkafka::error::KafkaError> {
    let owned: Vec<u32> = new.filter(|p| *p as usize % peers == worker).collect();
    if owned.is_empty() {
        return Ok(owned);
    }
    // The client's cached metadata does not know the new partitions yet.
    consumer.fetch_metadata(Some(&config.topic), Duration::from_secs(5))?;
    let mut cursors = Vec::with_capacity(owned.len());
    for &p in &owned {
        let (low, high) = consumer.fetch_watermarks(&config.topic, p as i32, Duration::from_secs(5))?;
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        if low > 0 {
            // A new partition starts at offset 0: retention (or DeleteRecords) removed messages
            // before the job read them. Stop as for any other partition, never skip silently.
            let error = SourceError::Retention { topic: config.topic.clone(), partition: p, from: 0, log_start: low };
            config.progress.stop(error.to_string());
            return Ok(Vec::new());
        }
        cursors.push((p, PartitionCursor::new(p, 0, VecDeque::new(), high)));
    }
    let mut assignment = TopicPartitionList::new();
    for (p, cursor) in partitions.iter().chain(cursors.iter().map(|(p, c)| (p, c))) {
        assignment.add_partition_offset(&config.topic, *p as i32, Offset::Offset(cursor.next() as i64))?;
    }
    consumer.assign(&assignment)?;
    partitions.extend(cursors);
    Ok(owned)
}

/// A partition's dedup window, when the source looks at event ids.
fn new_window(config: &SourceConfig) -> Option<DedupWindow> {
    (config.dedup_window > 0).then(|| DedupWindow::new(config.dedup_window))
}

/// Builds the source for this worker. See the module documentation.
///
/// `parse` turns a message (payload, Kafka timestamp, limits) into an event and its
/// `event_id`, or a rejection: `videocount_events::parse_event_with_id` for `view_counts`. It
/// must depend on nothing but its arguments, so that a re-run epoch parses exactly as the first
/// run did. With a dedup window, the source first reads up to that many offsets before the
/// first one it counts in each partition, to remember their ids (see [`crate::dedup`]).
pub fn kafka_source<'scope, E, F>(
    scope: Scope<'scope, u64>,
    config: SourceConfig,
    throttle: Throttle,
    mut parse: F,
) -> Result<Stream<'scope, u64, Vec<SourceItem<E>>>, SourceError>
where
    E: Clone + 'static,
    F: FnMut(Option<&[u8]>, Option<i64>, TimeLimits) -> Result<(E, Option<EventId>), Rejection> + 'static,
{
    let worker = scope.index();
    let peers = scope.peers();
    let kafka_err = |error| SourceError::Kafka { topic: config.topic.clone(), error };
    let context = SourceContext { topic: config.topic.clone(), progress: Arc::clone(&config.progress) };
    let consumer: BaseConsumer<SourceContext> =
        consumer_config(&config.kafka, &config.job, worker).create_with_context(context).map_err(kafka_err)?;

    let owned: Vec<u32> = (0..config.partitions).filter(|p| *p as usize % peers == worker).collect();
    let mut partitions: BTreeMap<u32, PartitionCursor> = BTreeMap::new();
    let mut windows: BTreeMap<u32, DedupWindow> = BTreeMap::new();
    let mut assignment = TopicPartitionList::new();
    let mut pending_epochs: BTreeMap<u64, usize> = BTreeMap::new();
    for &p in &owned {
        let (low, high) =
            consumer.fetch_watermarks(&config.topic, p as i32, Duration::from_secs(30)).map_err(kafka_err)?;
        let (low, high) = (low.max(0) as u64, high.max(0) as u64);
        let pending: VecDeque<(u64, Range)> = config
            .state
            .pending
            .iter()
            .flat_map(|(epoch, ranges)| ranges.iter().filter(|r| r.partition == p).map(|r| (*epoch, *r)))
            .filter(|(_, r)| r.end > r.start)
            .collect();
        for (epoch, _) in &pending {
            *pending_epochs.entry(*epoch).or_insert(0) += 1;
        }
        let resume = config.state.resume.get(&p).copied();
        let start = pending.front().map(|(_, r)| r.start).or(resume).unwrap_or(low);
        if start < low {
            // Not an error returned here: the other workers have built their dataflows and would
            // wait for this one forever. The job stops through `fatal`, which every worker
            // checks; the partition is not assigned meanwhile, so nothing of it is read.
            let error =
                SourceError::Retention { topic: config.topic.clone(), partition: p, from: start, log_start: low };
            config.progress.stop(error.to_string());
            continue;
        }
        // The dedup window is rebuilt from the offsets before the first one counted (what is
        // left of them: retention may have deleted the oldest, see docs/exactly-once.md).
        let window = new_window(&config);
        let warm = window.as_ref().map_or(start, |window| window.warm_up_from(start).max(low));
        if warm < start {
            info!(worker, partition = p, from = warm, to = start, "reading the dedup window before counting");
        }
        assignment.add_partition_offset(&config.topic, p as i32, Offset::Offset(warm as i64)).map_err(kafka_err)?;
        partitions.insert(p, PartitionCursor::new(p, start, pending, high).warm_from(warm));
        windows.extend(window.map(|window| (p, window)));
    }
    consumer.assign(&assignment).map_err(kafka_err)?;
    publish_positions(&config.progress, &partitions, &windows);
    info!(
        worker,
        partitions = ?owned,
        pending_epochs = pending_epochs.len(),
        first_live_epoch = config.state.next_epoch,
        "source assigned"
    );

    Ok(source::<_, CapacityContainerBuilder<Vec<SourceItem<E>>>, _, _>(scope, "KafkaSource", move |initial, info| {
        let activator = scope.activator_for(info.address);
        let mut live: Option<Capability<u64>> = Some(initial.delayed(&config.state.next_epoch));
        let mut pending_caps: BTreeMap<u64, Capability<u64>> =
            pending_epochs.keys().map(|e| (*e, initial.delayed(e))).collect();
        drop(initial);
        let mut last_close = Instant::now();
        let mut last_position_check = Instant::now();
        let mut known_partitions = config.partitions;
        let mut last_add_warning: Option<Instant> = None;
        let mut live_items: Vec<SourceItem<E>> = Vec::new();
        let mut last_window_check = Instant::now();
        let mut window_warnings: HashMap<u32, Instant> = HashMap::new();
        let mut pending_items: HashMap<u64, Vec<SourceItem<E>>> = HashMap::new();
        let mut stopping = false;
        // Kafka errors (a broker restarting) are logged at most every 5 s, with a count.
        let mut errors_since_log = 0u64;
        let mut last_error_log: Option<Instant> = None;

        move |output| {
            let Some(live_epoch) = live.as_ref().map(|c| *c.time()) else { return };
            let replaying = !pending_caps.is_empty();
            let mut finished = Vec::new();
            if config.shutdown.load(Ordering::Relaxed) && !stopping {
                info!(worker, epoch = live_epoch, "shutdown requested: closing the current epoch");
                stopping = true;
            }
            // Back-pressure (crate::back_pressure): wait while the writes or commits lag.
            let saturated = throttle.blocked(live_epoch).is_some();

            let mut more = false;
            if replaying || (!stopping && !saturated) {
                let started = Instant::now();
                let mut polled = 0;
                // The clock is read every 256 messages: reading it per message showed in profiles.
                while polled < 20_000 && (polled % 256 != 0 || started.elapsed() < Duration::from_millis(5)) {
                    let Some(result) = consumer.poll(Duration::ZERO) else { break };
                    polled += 1;
                    let message = match result {
                        Ok(message) => message,
                        Err(e) if e.rdkafka_error_code() == Some(RDKafkaErrorCode::AutoOffsetReset) => {
                            offset_not_on_broker(&config.progress, &config.topic, &e.to_string());
                            break;
                        }
                        Err(e) => {
                            errors_since_log += 1;
                            if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
                                warn!(worker, error = %e, errors = errors_since_log, "Kafka consumer error; retrying");
                                errors_since_log = 0;
                                last_error_log = Some(Instant::now());
                            }
                            break;
                        }
                    };
                    let p = message.partition() as u32;
                    let offset = message.offset().max(0) as u64;
                    let Some(cursor) = partitions.get_mut(&p) else { continue };
                    let placement = cursor.place(offset, &mut finished);
                    if placement == Placement::Repeat {
                        continue;
                    }
                    if placement == Placement::Live && (stopping || saturated) {
                        // Live data while stopping or saturated: read it again later.
                        cursor.unread(offset);
                        let mut seek = TopicPartitionList::new();
                        let _ = seek.add_partition_offset(&config.topic, p as i32, Offset::Offset(offset as i64));
                        let _ = consumer.seek_partitions(seek, Duration::from_secs(10));
                        break;
                    }
                    let message_ts = message.timestamp().to_millis();
                    cursor.saw_timestamp(message_ts);
                    let parsed = parse(message.payload(), message_ts, config.limits);
                    // Remembers the id of a valid event; a copy within the window is a dead letter.
                    let duplicate = match (&parsed, windows.get_mut(&p)) {
                        (Ok((_, Some(id))), Some(window)) => window.is_duplicate(offset, message_ts.unwrap_or(0), *id),
                        _ => false,
                    };
                    if placement == Placement::Warmup {
                        continue;
                    }
                    let parsed = match parsed {
                        Ok(_) if duplicate => Err(Rejection::new(
                            RejectReason::DuplicateEventId,
                            format!(
                                "an event with this event_id came before it in partition {p}, in its chunk of {} \
                                 offsets or the one before: a retry, counted once",
                                config.dedup_window
                            ),
                        )),
                        other => other,
                    };
                    let item = match parsed {
                        Ok((event, _)) => SourceItem::Event(event, p, offset),
                        Err(rejection) => {
                            config.progress.dead_letters.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut reasons) = config.progress.dead_letter_reasons.lock() {
                                *reasons.entry(rejection.reason.as_str()).or_default() += 1;
                            }
                            SourceItem::DeadLetter(Box::new(DeadLetterRow {
                                job: config.job.clone(),
                                topic: config.topic.clone(),
                                partition: p,
                                offset,
                                reason: rejection.reason.as_str().to_owned(),
                                detail: rejection.detail,
                                payload: stored_payload(message.payload()),
                                message_ts: message_ts.unwrap_or(0).max(0) as u64,
                            }))
                        }
                    };
                    match placement {
                        Placement::Pending(epoch) => pending_items.entry(epoch).or_default().push(item),
                        _ => live_items.push(item),
                    }
                }
                config.progress.messages.fetch_add(polled as u64, Ordering::Relaxed);
                if polled > 0 {
                    publish_positions(&config.progress, &partitions, &windows);
                }
                // A full budget means more is waiting: come back at once.
                more = polled >= 20_000 || started.elapsed() >= Duration::from_millis(5);

                // Control records (transactions) take offsets that never arrive as messages:
                // the consumer's position says when a range or the target is passed.
                if polled == 0 && last_position_check.elapsed() > Duration::from_millis(200) {
                    last_position_check = Instant::now();
                    if let Ok(positions) = consumer.position() {
                        for element in positions.elements() {
                            let Offset::Offset(position) = element.offset() else { continue };
                            let Some(cursor) = partitions.get_mut(&(element.partition() as u32)) else { continue };
                            cursor.advance_to(position.max(0) as u64, &mut finished);
                        }
                    }
                }
            }
            for epoch in finished.drain(..) {
                if let Some(n) = pending_epochs.get_mut(&epoch) {
                    *n = n.saturating_sub(1);
                }
            }

            // Send what was read, each item under its epoch's capability.
            for (epoch, items) in pending_items.drain() {
                let capability =
                    pending_caps.get(&epoch).or(live.as_ref()).expect("a capability at or before the epoch");
                let capability = capability.delayed(&epoch);
                output.session(&capability).give_iterator(items.into_iter());
            }
            pending_caps.retain(|epoch, _| pending_epochs.get(epoch).is_some_and(|n| *n > 0));
            if !live_items.is_empty() {
                let capability = live.as_ref().expect("live capability");
                output.session(capability).give_iterator(live_items.drain(..));
            }

            // A window whose offsets take less time than the clients' retry span would count a
            // late retry again: said in the log (every 10 minutes at most), beside the metric.
            if last_window_check.elapsed() >= Duration::from_secs(10) {
                last_window_check = Instant::now();
                for (p, window) in &windows {
                    let Some(reach_ms) = window.chunk_ms().filter(|ms| *ms >= 0) else { continue };
                    let warned =
                        window_warnings.get(p).is_some_and(|t: &Instant| t.elapsed() < Duration::from_secs(600));
                    if reach_ms < RETRY_SPAN_MS && !warned {
                        warn!(
                            worker,
                            partition = p,
                            reach_s = reach_ms / 1000,
                            window = window.window(),
                            "the dedup window reaches back less than the client library's retry span (330 s) at \
                             this partition's rate: a retry arriving later is counted again; raise --dedup-window"
                        );
                        window_warnings.insert(*p, Instant::now());
                    }
                }
            }

            let caught_up = config.until_caught_up && partitions.values().all(PartitionCursor::caught_up);
            let finishing = pending_caps.is_empty() && (caught_up || stopping);
            if finishing || (!saturated && last_close.elapsed() >= config.epoch_interval) {
                last_close = Instant::now();
                let capability = live.as_mut().expect("live capability");
                let epoch = *capability.time();
                let mut session = output.session(capability);
                session.give_iterator(
                    partitions.values_mut().filter_map(PartitionCursor::close_epoch).map(SourceItem::Range),
                );
                drop(session);
                if finishing {
                    info!(worker, last_epoch = epoch, "source finished");
                    live = None;
                    return;
                }
                // Partitions added to the topic while running: read from the next epoch on (a
                // `--until-caught-up` run leaves them to the next run, and re-run epochs finish
                // first).
                let seen = config.progress.partitions.load(Ordering::Relaxed);
                // After a failure (no leader yet) wait 5 s: the calls block this worker.
                let backing_off = last_add_warning.is_some_and(|t: Instant| t.elapsed() < Duration::from_secs(5));
                if seen > known_partitions && !config.until_caught_up && pending_caps.is_empty() && !backing_off {
                    match add_partitions(&consumer, &config, known_partitions..seen, worker, peers, &mut partitions) {
                        Ok(added) => {
                            info!(worker, epoch = epoch + 1, partitions = ?added, "reading partitions added to the topic");
                            known_partitions = seen;
                            windows.extend(added.iter().filter_map(|p| Some((*p, new_window(&config)?))));
                            publish_positions(&config.progress, &partitions, &windows);
                        }
                        Err(e) => {
                            warn!(worker, error = %e, "cannot read the partitions added to the topic yet; retrying in 5 s");
                            last_add_warning = Some(Instant::now());
                        }
                    }
                }
                if generation(epoch + 1) != generation(epoch) {
                    // 2^32 epochs in one run (49 days at --epoch-ms 1): the next number would
                    // belong to a later generation. A restart takes a new one.
                    config.progress.stop("this run used every epoch number of its generation; restart the job".into());
                    return;
                }
                capability.downgrade(&(epoch + 1));
            }
            let delay = if more || replaying {
                Duration::ZERO
            } else if saturated {
                Duration::from_millis(10)
            } else {
                Duration::from_millis(1)
            };
            activator.activate_after(delay);
        }
    }))
}
