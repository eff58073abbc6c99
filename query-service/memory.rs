//! Counts from memory: per (video, event type), the minute counts of all time as a sorted array
//! with prefix sums, so a range of whole minutes is two binary searches, whatever its length.
//!
//! - **Kept current by commits.** Every `poll` the service reads the newest epoch `view_counts`
//!   committed. The rows of the epochs committed since the last poll come from `count_changes`
//!   (the job writes each epoch's minute block there, sorted by epoch: an indexed read) and are
//!   added to the keys held, once: the service remembers the last epoch it applied.
//! - **Loaded on first use, exactly as of an epoch.** A key's load reads its minutes from
//!   `event_counts_minute`. That read can catch an epoch being written: rows of epochs the
//!   service has not applied yet. The job writes an epoch's rows of a key in one block, in this
//!   order: `count_changes`, `event_counts_minute`, a row in `count_blocks` (epoch, worker),
//!   then the hour and day tables. So the load first reads `count_blocks` after the applied
//!   epoch `A`, then the key's minutes, then the key's `count_changes` rows after `A`. An epoch among those rows whose block was
//!   marked written before the read was in it: its rows are taken off. One that is not marked
//!   may or may not have been: the load tries again a little later (ten times; then the key's
//!   next request starts a new load, `memory_loads_put_off_total`). An epoch that is not among
//!   them was not in the read (its `count_changes` rows would have come first). What is left is
//!   the key as of `A`; the epochs applied since are read for the key before it is installed.
//! - **Warmed before it is asked** (`warm_up`): after the first poll and after every reset, the
//!   keys of `event_counts_day`, the most recently counted first, load 500 at a time with the same
//!   three reads (their videos' rows), until they take nine tenths of the budget. A key an epoch
//!   in flight touched is read again a little later, and after ten tries left to its first
//!   request. Until a key is in, ClickHouse answers it.
//! - **Edge minutes.** The event times of a partial minute at a range's edge come from the
//!   changelog (`count_changes.times`): a held key's minute of the last hour that had no event
//!   is kept from its first row on, and each later row adds its times. A minute that had events
//!   before is read from `events_raw` after its first request and kept if their number equals
//!   the minute's count as of the applied epoch (`want_edge` has the argument); later rows add
//!   their times to it too if every run that counted wrote the raw log (`job_runs.raw_log`),
//!   else its next change drops it. A held key's minute without events answers 0.
//! - **Replicas.** Each poll reads one replica, loads and edge reads the same one, and
//!   `SYSTEM SYNC REPLICA` runs between the reads that rely on the job's write order (`sync`).
//! - **Bounded.** Keys held take at most `budget_bytes`; the least recently asked for leave.
//! - **Never stale without saying so.** Memory answers only while the last poll is at most
//!   three polls old; otherwise, and for keys not loaded yet, the caller reads ClickHouse.
//!   When `event_counts_minute` is replaced (`videocount replay` renames fresh tables in), every
//!   key is dropped and loaded again.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use clickhouse::Row;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tracing::{debug, info, warn};
use videocount_clickhouse::schema::RUNS_RECORDED;
use videocount_clickhouse::{ClickHouse, SinkError};
use videocount_query::QueryError;

/// A service whose polls failed longer than this empties memory when they work again: the job
/// drops changelog ranges at least 2^20 epochs behind its commits (17 minutes at 1 ms epochs),
/// and the epochs it missed may be gone.
pub(crate) const AWAY_LIMIT: Duration = Duration::from_secs(300);
/// Keys loaded at once (each load is three small queries).
pub(crate) const CONCURRENT_LOADS: usize = 4;
/// Loads a key tries before it gives up (and leaves it to a later request).
pub(crate) const LOAD_ATTEMPTS: u32 = 10;
/// Changes a key gathers before they are merged into its arrays.
const MERGE_AFTER: usize = 256;
/// Keys a warm-up reads at once at most (the rows of their videos in three queries)...
pub(crate) const WARM_KEYS: usize = 500;
/// ... and about this many minutes (their arrays are in memory twice while they load).
const WARM_MINUTES: usize = 2_000_000;
/// Batches failing in a row that end a warm-up.
const WARM_FAILURES: u32 = 3;
/// A warm-up that failed is started again after this.
const WARM_RETRY: Duration = Duration::from_secs(30);
/// A warm-up stops once the keys take this share of the budget (in tenths): the rest is for the
/// keys asked for later.
pub(crate) const WARM_TENTHS: usize = 9;
/// The last hour: an edge minute asked for in it reads the key's whole last hour.
const HOT_WINDOW_SECS: u64 = 3600;
/// Edge reads waiting or running at most (more misses meanwhile read `events_raw` only).
const EDGE_PENDING: usize = 64;
/// Edge minutes' event times may take a budget's `1 / EDGE_SHARE`.
const EDGE_SHARE: usize = 8;
/// How long a replica may take to sync a table before a read that needs it (memory stops
/// answering meanwhile: its polls wait).
const SYNC_LIMIT: Duration = Duration::from_secs(10);
/// How long one of a warm-up's reads may take.
pub(crate) const WARM_TIMEOUT: Duration = Duration::from_secs(120);
/// The rows of `count_changes` of the epochs in `(?, ?]`, with their event times (the poll's).
const TIMED_CHANGES: &str = "SELECT video_id, event_type, toUInt32(minute) AS minute, count, times FROM count_changes \
                             WHERE epoch > ? AND epoch <= ?";
/// The rows of `count_changes` of the epochs in `(?, ?]`.
const CHANGES: &str = "SELECT video_id, event_type, toUInt32(minute) AS minute, count, epoch FROM count_changes \
                       WHERE epoch > ? AND epoch <= ?";

#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// How often the committed epoch is read.
    pub poll: Duration,
    /// Memory the keys may take (their arrays and changes).
    pub budget_bytes: usize,
    /// The checkpoint name of the `view_counts` writing the count tables (its `--job-name`).
    pub job: String,
    /// Load keys before they are asked for, after the start and after every reset: the most
    /// recently counted first, until the keys take nine tenths of the budget.
    pub warm_up: bool,
}

/// Counters the service exports (`/metrics`).
#[derive(Default, Debug, Clone)]
pub struct MemoryStats {
    /// Counts answered from memory.
    pub hits: Counter,
    /// Counts whose key was not held (read from ClickHouse; the key is loaded meanwhile).
    pub misses: Counter,
    pub loads: Counter,
    /// Loads that caught an epoch being written and tried again.
    pub load_retries: Counter,
    /// Loads that met an epoch being written at each try, left to the key's next request.
    pub loads_put_off: Counter,
    pub load_errors: Counter,
    /// Partial edge minutes answered from the kept event times.
    pub edge_hits: Counter,
    /// Edge minutes whose event times were read and kept.
    pub edge_loads: Counter,
    pub evictions: Counter,
    /// Polls that found newer commits and applied them.
    pub applies: Counter,
    pub poll_errors: Counter,
    /// How long the last finished warm-up took (-1: none finished since the last reset).
    pub warm_up_seconds: Gauge<f64, AtomicU64>,
    /// Keys the last warm-up installed.
    pub warm_up_keys: Gauge,
}

type Key = (String, String);

/// The minute counts of one key.
#[derive(Debug, Default)]
struct Series {
    /// Minute starts (epoch seconds), increasing.
    minutes: Vec<u32>,
    /// `prefix[i]`: the count of `minutes[..i]`.
    prefix: Vec<u64>,
    /// Changes applied since the arrays were built.
    changes: BTreeMap<u32, u64>,
    /// When it was last asked for, seconds since the store started.
    used: AtomicU64,
}

impl Series {
    fn new(rows: impl IntoIterator<Item = (u32, u64)>) -> Series {
        let mut series = Series { prefix: vec![0], ..Series::default() };
        let mut total = 0;
        for (minute, count) in rows {
            total += count;
            series.minutes.push(minute);
            series.prefix.push(total);
        }
        // Held for long: no spare capacity.
        series.minutes.shrink_to_fit();
        series.prefix.shrink_to_fit();
        series
    }

    /// The count of the minutes in `[start_s, end_s)`.
    fn sum(&self, start_s: u32, end_s: u32) -> u64 {
        if start_s >= end_s {
            return 0;
        }
        let at = |s: u32| self.prefix[self.minutes.partition_point(|&m| m < s)];
        at(end_s) - at(start_s) + self.changes.range(start_s..end_s).map(|(_, n)| n).sum::<u64>()
    }

    fn add(&mut self, minute: u32, count: u64) {
        *self.changes.entry(minute).or_insert(0) += count;
        if self.changes.len() > MERGE_AFTER {
            self.merge();
        }
    }

    /// Folds the changes into the arrays: one pass over both, in minute order.
    fn merge(&mut self) {
        let changes = std::mem::take(&mut self.changes);
        let held = self.minutes.iter().enumerate().map(|(i, &m)| (m, self.prefix[i + 1] - self.prefix[i]));
        let mut merged = Vec::with_capacity(self.minutes.len() + changes.len());
        let (mut held, mut changes) = (held.peekable(), changes.into_iter().peekable());
        loop {
            let next = match (held.peek(), changes.peek()) {
                (Some(&(a, n)), Some(&(b, c))) if a == b => {
                    held.next();
                    changes.next();
                    (a, n + c)
                }
                (Some(&(a, _)), Some(&(b, _))) if b < a => changes.next().expect("peeked"),
                (Some(_), _) => held.next().expect("peeked"),
                (None, Some(_)) => changes.next().expect("peeked"),
                (None, None) => break,
            };
            merged.push(next);
        }
        let used = self.used.load(Ordering::Relaxed);
        *self = Series::new(merged);
        self.used = AtomicU64::new(used);
    }

    /// Marks it used now; written only when the second changed, so that readers of one hot key
    /// do not all write the same cache line.
    fn touch(&self, now_s: u64) {
        if self.used.load(Ordering::Relaxed) != now_s {
            self.used.store(now_s, Ordering::Relaxed);
        }
    }

    fn bytes(&self) -> usize {
        self.minutes.capacity() * 4 + self.prefix.capacity() * 8 + self.changes.len() * 32 + 160
    }
}

struct State {
    /// The last committed epoch applied; `None` until the first poll worked.
    applied: Option<u64>,
    /// When the last poll worked.
    polled: Option<Instant>,
    /// What identifies the count table in use (its creation); a change empties the store.
    table: String,
    /// Raised whenever the store is emptied: a load begun before does not install.
    generation: u64,
    /// The replicas of the tables (from the last poll): above one, every read that relies on
    /// the job's write order first syncs the replica it reads.
    replicas: u64,
    /// The replica (index among the URLs) the last poll read: loads and edge reads read the
    /// same one, whose view of the replication log includes the commits applied.
    replica: usize,
    /// The tables have several replicas but this service knows one URL (maybe a balancer, whose
    /// reads may each reach another replica): memory is off.
    off: bool,
    keys: HashMap<Key, Series>,
    bytes: usize,
    /// Edge minutes: (key, minute start) -> the milliseconds into the minute of its events,
    /// sorted, exactly as of `applied` (see [`Memory::want_edge`] and [`Kept`]); an applied
    /// epoch that changes the minute adds its times to them, or drops them.
    edges: HashMap<(Key, u32), Kept>,
    edge_bytes: usize,
    /// Edge minutes before this one (seconds) are not kept: the oldest left to make room.
    edge_floor: u32,
    /// Not every event counted is known to be in `events_raw` (`job_runs`): times read from
    /// there are not followed (see [`Kept::follows`]). Runs are never removed, so once seen it
    /// stays until a reset.
    raw_gap: bool,
}

/// What a poll's rows add to an edge minute: their times (`None`: the kept times are dropped),
/// and whether the minute was kept before.
type Added = (Option<Vec<u16>>, bool);

/// The event times of an edge minute, exactly as of the applied epoch.
#[derive(Debug, PartialEq)]
struct Kept {
    /// Milliseconds into the minute, sorted.
    offsets: Vec<u16>,
    /// The changelog's next rows of the minute are added to them. True for times kept from the
    /// changelog, and for times read from `events_raw` while every event counted is known to be
    /// in it (`Memory::raw_log_whole`). Otherwise they are dropped at the minute's next change:
    /// their count check cannot tell a minute counted while the raw log was off, and adding to
    /// them would keep such a mistake for good.
    follows: bool,
}

impl Kept {
    /// What it takes (its capacity: added times may leave room unused).
    fn bytes(&self) -> usize {
        self.offsets.capacity() * 2 + 96
    }
}

impl State {
    /// Empty, before the first poll.
    fn new() -> State {
        State {
            applied: None,
            polled: None,
            table: String::new(),
            generation: 0,
            replicas: 1,
            replica: 0,
            off: false,
            keys: HashMap::new(),
            bytes: 0,
            edges: HashMap::new(),
            edge_bytes: 0,
            edge_floor: 0,
            raw_gap: false,
        }
    }

    /// Empties the store (keys and edge minutes).
    fn clear(&mut self) {
        self.keys.clear();
        self.bytes = 0;
        self.edges.clear();
        self.edge_bytes = 0;
        self.edge_floor = 0;
        self.raw_gap = false;
    }

    /// Keeps `kept` as the event times of an edge minute, after making room for them.
    fn keep_edge(&mut self, edge: (Key, u32), kept: Kept, limit: usize) {
        let bytes = kept.bytes();
        self.trim_edges(bytes, limit);
        if edge.1 < self.edge_floor {
            return;
        }
        self.edge_bytes += bytes;
        if let Some(old) = self.edges.insert(edge, kept) {
            self.edge_bytes -= old.bytes();
        }
    }

    /// Drops the oldest edge minutes if they and `more` bytes would take more than `limit`:
    /// the newest are asked for most (ranges ending now), and minutes before those dropped are
    /// no longer kept (until a reset), so that a small share does not read and drop the same
    /// minutes over and over.
    fn trim_edges(&mut self, more: usize, limit: usize) {
        if self.edge_bytes + more <= limit {
            return;
        }
        let mut minutes: Vec<(u32, usize)> = self.edges.iter().map(|((_, m), kept)| (*m, kept.bytes())).collect();
        minutes.sort_unstable();
        // Down to three quarters, so that this does not run for every minute kept.
        let target = (limit / 4 * 3).saturating_sub(more);
        let mut left = self.edge_bytes;
        for (minute, bytes) in minutes {
            if left <= target {
                break;
            }
            left -= bytes;
            self.edge_floor = self.edge_floor.max(minute + 1);
        }
        let (floor, edge_bytes) = (self.edge_floor, &mut self.edge_bytes);
        self.edges.retain(|(_, minute), kept| {
            let keep = *minute >= floor;
            if !keep {
                *edge_bytes -= kept.bytes();
            }
            keep
        });
    }
}

pub struct Memory {
    clickhouse: ClickHouse,
    config: MemoryConfig,
    started: Instant,
    state: RwLock<State>,
    loading: Mutex<HashSet<Key>>,
    edge_loading: Mutex<HashSet<(Key, u32)>>,
    load_permits: tokio::sync::Semaphore,
    /// Syncs of the replica read run one at a time (shared with the stats' memory).
    syncing: Arc<ReplicaSync>,
    /// Edge reads run beside key loads, not in their queue.
    edge_permits: tokio::sync::Semaphore,
    /// Said once that the job has no commit.
    waiting_logged: std::sync::atomic::AtomicBool,
    /// The minute (from the start, plus one) a put-off load was last logged in.
    put_off_logged: AtomicU64,
    pub stats: MemoryStats,
}

#[derive(Row, Deserialize)]
struct Poll {
    commits: u64,
    committed: u64,
    table: String,
    replicas: u64,
}

#[derive(Row, Deserialize)]
struct Block {
    epoch: u64,
    worker: u32,
    peers: u32,
}

/// A key's minute rows (minute, count), in no particular order, maybe several per minute.
#[derive(Row, Deserialize)]
struct KeyMinutes {
    video_id: String,
    event_type: String,
    minutes: Vec<(u32, u64)>,
}

/// An event time of `events_raw`.
#[derive(Row, Deserialize)]
struct RawTime {
    video_id: String,
    event_type: String,
    ts: u64,
}

/// A key of the day table, with its events and days counted.
#[derive(Row, Deserialize)]
struct Counted {
    video_id: String,
    event_type: String,
    events: u64,
    days: u64,
}

/// A `count_changes` row as the poll reads it: with the milliseconds into the minute of its
/// events (sorted; empty when its writer did not record them).
#[derive(Row, Deserialize)]
struct TimedChange {
    video_id: String,
    event_type: String,
    minute: u32,
    count: u64,
    times: Vec<u16>,
}

#[derive(Row, Deserialize)]
struct Change {
    video_id: String,
    event_type: String,
    minute: u32,
    count: u64,
    epoch: u64,
}

/// What a load of some keys did; `None` when the store was not ready (no poll yet) or was
/// emptied meanwhile.
#[derive(Debug, Default)]
struct Loaded {
    /// Keys installed (not those that came in meanwhile).
    installed: usize,
    /// Keys an epoch being written touched while they were read: not installed.
    busy: Vec<Key>,
}

impl Memory {
    pub fn new(clickhouse: ClickHouse, config: MemoryConfig, stats: MemoryStats, syncing: Arc<ReplicaSync>) -> Memory {
        stats.warm_up_seconds.set(-1.0);
        Memory {
            clickhouse,
            config,
            started: Instant::now(),
            state: RwLock::new(State::new()),
            loading: Mutex::new(HashSet::new()),
            edge_loading: Mutex::new(HashSet::new()),
            load_permits: tokio::sync::Semaphore::new(CONCURRENT_LOADS),
            syncing,
            edge_permits: tokio::sync::Semaphore::new(2),
            waiting_logged: std::sync::atomic::AtomicBool::new(false),
            put_off_logged: AtomicU64::new(0),
            stats,
        }
    }

    fn now_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn fresh(&self, state: &State) -> bool {
        fresh(state.polled, self.config.poll)
    }

    /// The count of whole minutes `[start_s, end_s)` of a key, when it is held and the store
    /// is current.
    pub fn count(&self, video_id: &str, event_type: &str, start_s: u64, end_s: u64) -> Option<u64> {
        self.read(video_id, event_type, |series| series.sum(clamp(start_s), clamp(end_s)))
    }

    /// The counts per bucket of `width` seconds from `first` (`points` buckets), when held.
    pub fn series(&self, video_id: &str, event_type: &str, first: u64, width: u64, points: u64) -> Option<Vec<u64>> {
        self.read(video_id, event_type, |series| {
            (0..points).map(|i| series.sum(clamp(first + i * width), clamp(first + (i + 1) * width))).collect()
        })
    }

    /// `answer` of the key's minutes, when it is held and the store is current; counts the hit
    /// or the miss.
    fn read<T>(&self, video_id: &str, event_type: &str, answer: impl FnOnce(&Series) -> T) -> Option<T> {
        let state = self.state.read().expect("memory lock");
        let found = self.fresh(&state).then(|| state.keys.get(&(video_id.to_owned(), event_type.to_owned()))).flatten();
        let Some(series) = found else {
            self.stats.misses.inc();
            return None;
        };
        series.touch(self.now_s());
        self.stats.hits.inc();
        Some(answer(series))
    }

    /// The events of the key in `[from_ms, to_ms)`, a piece of one minute, from the kept event
    /// times of that minute, when the store is current and keeps them, or when the key is held
    /// and the minute has no event (as of the same applied epoch).
    pub fn edge(&self, video_id: &str, event_type: &str, from_ms: u64, to_ms: u64) -> Option<u64> {
        let minute_ms = from_ms / 60_000 * 60_000;
        let state = self.state.read().expect("memory lock");
        if !self.fresh(&state) {
            return None;
        }
        let minute = clamp(minute_ms / 1000);
        let key = ((video_id.to_owned(), event_type.to_owned()), minute);
        let Some(Kept { offsets, .. }) = state.edges.get(&key) else {
            let empty = state.keys.get(&key.0).is_some_and(|series| series.sum(minute, minute.saturating_add(60)) == 0);
            if empty {
                self.stats.edge_hits.inc();
            }
            return empty.then_some(0);
        };
        let at = |ms: u64| offsets.partition_point(|&o| u64::from(o) < ms.saturating_sub(minute_ms));
        self.stats.edge_hits.inc();
        Some((at(to_ms) - at(from_ms)) as u64)
    }

    /// Reads the event times of the key's minute starting at `minute_ms` (of its whole last
    /// hour when the minute is in it) from `events_raw` in the background, and keeps those of a
    /// minute if they are exactly the minute's count as of the applied epoch: every epoch up to it is in `events_raw` (its rows are written before the commit),
    /// so the read holds at least that count, and exactly that count only if no later epoch's
    /// event of the minute was in it. The key must be held (its count is the reference), and
    /// the applied epoch must not move during the read. The epochs applied later add their
    /// times to them if every run that counted wrote the raw log ([`Kept::follows`]); otherwise
    /// a later epoch that changes the minute drops them again.
    pub fn want_edge(self: &Arc<Self>, video_id: &str, event_type: &str, minute_ms: u64) {
        let key = (video_id.to_owned(), event_type.to_owned());
        let minute = clamp(minute_ms / 60_000 * 60);
        {
            let state = self.state.read().expect("memory lock");
            if state.off || state.edges.contains_key(&(key.clone(), minute)) || !state.keys.contains_key(&key) {
                return;
            }
        }
        // An edge in the last hour (where unaligned questions come from) reads the key's whole
        // last hour at once: one query instead of one per minute asked for.
        // The last two minutes (still being counted: the next epochs may change them) read
        // only the minute; the two edge permits bound what that costs.
        let (hot_start, hot_last) = hot_window();
        let (first, last, loading) = if minute >= hot_start && minute + 60 < hot_last {
            (hot_start, hot_last - 60, (key, u32::MAX))
        } else {
            (minute, minute, (key, minute))
        };
        {
            let mut pending = self.edge_loading.lock().expect("loading lock");
            if pending.len() >= EDGE_PENDING || !pending.insert(loading.clone()) {
                return;
            }
        }
        let memory = self.clone();
        tokio::spawn(async move {
            let _permit = memory.edge_permits.acquire().await.expect("the semaphore is never closed");
            let keys = std::slice::from_ref(&loading.0);
            if let Err(error) = memory.load_edges(&memory.clickhouse, keys, first, last).await {
                memory.stats.load_errors.inc();
                let (video_id, event_type) = &loading.0;
                debug!(%video_id, %event_type, first, last, %error, "reading edge minutes' event times failed");
            }
            memory.edge_loading.lock().expect("loading lock").remove(&loading);
        });
    }

    /// Reads the key's event times of the minutes `first..=last` (minute starts, seconds) and
    /// keeps those of each minute whose number equals its count in memory (see [`want_edge`]).
    ///
    /// [`want_edge`]: Memory::want_edge
    async fn load_edges(&self, clickhouse: &ClickHouse, keys: &[Key], first: u32, last: u32) -> Result<(), QueryError> {
        let Some((applied, generation)) = self.snapshot() else { return Ok(()) };
        let (start_ms, end_ms) = (u64::from(first) * 1000, (u64::from(last) + 60) * 1000);
        let (videos, kinds) = videos_and_kinds(keys);
        // Every epoch up to the applied one wrote its raw block before its commit, and every run
        // that committed one of them recorded itself in `job_runs` before.
        let Some(clickhouse) = &self.on_polled_replica(clickhouse) else { return Ok(()) };
        let gap = self.state.read().expect("memory lock").raw_gap;
        self.sync(clickhouse, if gap { &["events_raw"] } else { &["events_raw", "job_runs"] }).await?;
        let follows = !gap && self.raw_log_whole(clickhouse).await;
        let query = clickhouse
            .client()
            .query(
                "SELECT video_id, event_type, ts FROM events_raw WHERE video_id IN (SELECT arrayJoin(?)) \
                 AND event_type IN (SELECT arrayJoin(?)) AND ts >= ? AND ts < ?",
            )
            .bind(&videos)
            .bind(&kinds)
            .bind(start_ms)
            .bind(end_ms);
        let times: Vec<RawTime> = clickhouse.fetch_all(query).await?;
        // Per key, minute start (seconds) -> milliseconds into it, every minute of the span.
        let span = || (first..=last).step_by(60).map(|m| (m, Vec::new())).collect::<BTreeMap<u32, Vec<u16>>>();
        let mut minutes: HashMap<Key, BTreeMap<u32, Vec<u16>>> = keys.iter().map(|key| (key.clone(), span())).collect();
        for RawTime { video_id, event_type, ts } in times {
            let minute_ms = ts / 60_000 * 60_000;
            let offsets = minutes.get_mut(&(video_id, event_type)).and_then(|m| m.get_mut(&clamp(minute_ms / 1000)));
            if let Some(offsets) = offsets {
                offsets.push((ts - minute_ms) as u16);
            }
        }
        let mut state = self.state.write().expect("memory lock");
        if state.generation != generation || state.applied != Some(applied) {
            return Ok(());
        }
        let limit = self.config.budget_bytes / EDGE_SHARE;
        for (key, key_minutes) in minutes {
            for (minute, mut offsets) in key_minutes {
                let Some(series) = state.keys.get(&key) else { break };
                let edge = (key.clone(), minute);
                // A minute without events needs nothing kept: `edge` answers 0 from its count.
                if offsets.is_empty()
                    || edge_bytes_of(&offsets) > limit / 16
                    || minute < state.edge_floor
                    || state.edges.contains_key(&edge)
                    || series.sum(minute, minute.saturating_add(60)) != offsets.len() as u64
                {
                    continue;
                }
                offsets.sort_unstable();
                offsets.shrink_to_fit();
                state.keep_edge(edge, Kept { offsets, follows }, limit);
                self.stats.edge_loads.inc();
            }
        }
        Ok(())
    }

    /// Whether every event in the count tables is in `events_raw` too: `job_runs` has the row
    /// the schema writes when it creates the count tables (so every run that counted into them
    /// is recorded, whatever its job name), and no run without the raw log. Then `events_raw`
    /// holds every event of the applied epochs, so times read from it whose number is the
    /// minute's count are exactly its events (no event is missing that a later epoch's could
    /// stand in for), and the changelog's rows can be added to them. Runs recorded before
    /// `job_runs.raw_log` existed count as without; a database made before it has no such row;
    /// a failed read counts as a gap too.
    async fn raw_log_whole(&self, clickhouse: &ClickHouse) -> bool {
        #[derive(Row, Deserialize)]
        struct Runs {
            recorded: u64,
            gaps: u64,
        }
        let query = clickhouse
            .client()
            .query("SELECT countIf(job = ?) AS recorded, countIf(raw_log = 0) AS gaps FROM job_runs")
            .bind(RUNS_RECORDED);
        match clickhouse.fetch_all::<Runs>(query).await {
            Ok(runs) if runs.first().is_some_and(|r| r.recorded > 0 && r.gaps == 0) => true,
            Ok(runs) => {
                let mut state = self.state.write().expect("memory lock");
                if !state.raw_gap {
                    let (recorded, gaps) = runs.first().map_or((0, 0), |r| (r.recorded, r.gaps));
                    info!(
                        recorded_from_the_start = recorded > 0,
                        runs_without_raw_log = gaps,
                        "not every event counted is known to be in events_raw (job_runs): edge times \
                         read from there are read again after each change of their minute"
                    );
                }
                state.raw_gap = true;
                false
            }
            Err(error) => {
                debug!(%error, "reading job_runs.raw_log failed; edge times read from events_raw are not followed");
                false
            }
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.state.read().expect("memory lock").keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the keys take.
    pub fn bytes(&self) -> usize {
        self.state.read().expect("memory lock").bytes
    }

    /// Seconds since the last poll that worked.
    pub fn age(&self) -> Option<Duration> {
        self.state.read().expect("memory lock").polled.map(|at| at.elapsed())
    }

    /// The last committed epoch applied.
    pub fn applied(&self) -> Option<u64> {
        self.state.read().expect("memory lock").applied
    }

    /// Loads the key in the background unless it is held or being loaded.
    pub fn want(self: &Arc<Self>, video_id: &str, event_type: &str) {
        let key = (video_id.to_owned(), event_type.to_owned());
        {
            let state = self.state.read().expect("memory lock");
            if state.off || state.keys.contains_key(&key) {
                return;
            }
        }
        if !self.loading.lock().expect("loading lock").insert(key.clone()) {
            return;
        }
        let memory = self.clone();
        tokio::spawn(async move {
            match memory.load(&key).await {
                Ok(true) => {}
                Ok(false) => {
                    // Not a failure: the key's next request tries again. Said once a minute at
                    // most: a job stopped between an epoch's changelog rows and its marker keeps
                    // its keys out until it runs again.
                    memory.stats.loads_put_off.inc();
                    let minute = memory.now_s() / 60 + 1;
                    if memory.put_off_logged.swap(minute, Ordering::Relaxed) != minute {
                        warn!(
                            video_id = %key.0, event_type = %key.1, put_off = memory.stats.loads_put_off.get(),
                            "an epoch was being written during each of {LOAD_ATTEMPTS} reads of a key (slow inserts, or a \
                             job stopped mid-epoch): ClickHouse answers it, its next request loads it again"
                        );
                    }
                }
                Err(error) => {
                    memory.stats.load_errors.inc();
                    warn!(video_id = %key.0, event_type = %key.1, %error, "loading a key into memory failed; ClickHouse answers it");
                }
            }
            memory.loading.lock().expect("loading lock").remove(&key);
        });
    }

    /// Loads a key, trying again while epochs are being written: `false` when each of
    /// [`LOAD_ATTEMPTS`] reads met one (a key written every epoch, while inserts are slow).
    /// Holds one of the [`CONCURRENT_LOADS`] permits per read, not while it waits.
    pub async fn load(&self, key: &Key) -> Result<bool, QueryError> {
        self.wait_for_first_poll().await;
        for attempt in 0..LOAD_ATTEMPTS {
            let read = {
                let _permit = self.load_permits.acquire().await.expect("the semaphore is never closed");
                self.try_load(&self.clickhouse, std::slice::from_ref(key), self.now_s()).await?
            };
            match read {
                None => return Ok(true),
                Some(loaded) if loaded.busy.is_empty() => {
                    if loaded.installed > 0 {
                        self.stats.loads.inc();
                    }
                    return Ok(true);
                }
                Some(_) => {
                    self.stats.load_retries.inc();
                    tokio::time::sleep(retry_pause(attempt) + Duration::from_millis(rand::random_range(0..20))).await;
                }
            }
        }
        Ok(false)
    }

    /// The applied epoch and the store's generation, once the first poll worked: what a load
    /// reads as of, and what must not have moved when it installs.
    fn snapshot(&self) -> Option<(u64, u64)> {
        let state = self.state.read().expect("memory lock");
        state.applied.map(|applied| (applied, state.generation))
    }

    /// `clickhouse` pinned to the replica the last poll read, if requests still go there (else
    /// `None`: the next poll reads the new one, and the read waits for it).
    fn on_polled_replica(&self, clickhouse: &ClickHouse) -> Option<ClickHouse> {
        let (pinned, index) = clickhouse.pinned();
        (self.state.read().expect("memory lock").replica == index).then_some(pinned)
    }

    /// With several replicas, waits until the one `clickhouse` reads has every block of
    /// `tables` acknowledged before the call ([`ReplicaSync::sync`]).
    async fn sync(&self, clickhouse: &ClickHouse, tables: &[&str]) -> Result<(), QueryError> {
        let several = self.state.read().expect("memory lock").replicas != 1 || self.clickhouse.replica_count() != 1;
        self.syncing.sync(several, clickhouse, tables).await
    }

    /// Asked for before the first poll (just after the start): waits for it a little.
    async fn wait_for_first_poll(&self) {
        for _ in 0..50 {
            if self.applied().is_some() {
                break;
            }
            tokio::time::sleep(self.config.poll).await;
        }
    }

    /// Loads keys exactly as of the applied epoch (the module documentation has the argument),
    /// all of them with the same three reads. `used`: the last-use time they get (a warm-up's
    /// keys get 0: they leave before the keys requests asked for).
    async fn try_load(&self, clickhouse: &ClickHouse, keys: &[Key], used: u64) -> Result<Option<Loaded>, QueryError> {
        let Some((applied, generation)) = self.snapshot() else { return Ok(None) };
        let (videos, kinds) = videos_and_kinds(keys);
        // Every read on the replica the poll read, each after a sync of its table (on replicas).
        let Some(clickhouse) = &self.on_polled_replica(clickhouse) else { return Ok(None) };
        let client = clickhouse.client();
        // 1. The blocks marked written: an epoch's block of a key marked here is all in step 2.
        let marked: Vec<Block> = clickhouse
            .fetch_all(client.query("SELECT epoch, worker, peers FROM count_blocks WHERE epoch > ?").bind(applied))
            .await?;
        self.sync(clickhouse, &["event_counts_minute"]).await?;
        // 2. The keys' minutes: everything applied, and maybe epochs being written. One row per
        // key, its rows as an array (a year of a busy key is 500,000 minutes); a minute's rows
        // not merged yet are summed here, which costs ClickHouse far less than a GROUP BY minute.
        let base: Vec<KeyMinutes> = clickhouse
            .fetch_all(
                client
                    .query(
                        "SELECT video_id, event_type, groupArray((toUInt32(minute), count)) AS minutes \
                         FROM event_counts_minute \
                         WHERE video_id IN (SELECT arrayJoin(?)) AND event_type IN (SELECT arrayJoin(?)) \
                         GROUP BY video_id, event_type",
                    )
                    .bind(&videos)
                    .bind(&kinds),
            )
            .await?;
        let mut minutes: HashMap<Key, Vec<(u32, u64)>> = keys.iter().map(|key| (key.clone(), Vec::new())).collect();
        for row in base {
            if let Some(rows) = minutes.get_mut(&(row.video_id, row.event_type)) {
                *rows = row.minutes;
                rows.sort_unstable_by_key(|(minute, _)| *minute);
                rows.dedup_by(|(minute, count), (kept_minute, kept)| {
                    let same = minute == kept_minute;
                    if same {
                        *kept += *count;
                    }
                    same
                });
            }
        }
        // 3. The keys' rows of the epochs after the applied one: every epoch step 2 may hold.
        self.sync(clickhouse, &["count_changes"]).await?;
        let mut busy = BTreeSet::new();
        for change in self.changes_of(clickhouse, &videos, &kinds, applied, None).await? {
            let key = (change.video_id, change.event_type);
            let Some(rows) = minutes.get_mut(&key) else { continue };
            let route = videocount_events::route(&key.0);
            let marked = marked
                .iter()
                .any(|b| b.epoch == change.epoch && u64::from(b.worker) == route % u64::from(b.peers.max(1)));
            if !marked {
                busy.insert(key);
                continue;
            }
            let at = rows.binary_search_by_key(&change.minute, |(minute, _)| *minute);
            let Some(count) = at.ok().map(|i| &mut rows[i].1).filter(|n| **n >= change.count) else {
                return Err(QueryError::Corrupt(format!(
                    "epoch {} of {}/{} is marked written but its minute {} is not in event_counts_minute",
                    change.epoch, key.0, key.1, change.minute
                )));
            };
            *count -= change.count;
        }
        // Now the keys as of `applied`.
        let mut loaded: HashMap<Key, Series> = minutes
            .into_iter()
            .filter(|(key, _)| !busy.contains(key))
            .map(|(key, rows)| (key, Series::new(rows.into_iter().filter(|(_, n)| *n > 0))))
            .collect();
        // Add the epochs applied meanwhile (only those not added yet, each pass), then install,
        // unless the poller moved on again.
        let mut through = applied;
        loop {
            let now_applied = self.applied().unwrap_or(through);
            if now_applied > through {
                self.sync(clickhouse, &["count_changes"]).await?;
                for change in self.changes_of(clickhouse, &videos, &kinds, through, Some(now_applied)).await? {
                    if let Some(series) = loaded.get_mut(&(change.video_id, change.event_type)) {
                        series.add(change.minute, change.count);
                    }
                }
                through = now_applied;
            }
            let mut state = self.state.write().expect("memory lock");
            if state.generation != generation {
                return Ok(None);
            }
            if state.applied != Some(through) {
                continue;
            }
            let mut installed = 0;
            for (key, series) in loaded {
                if state.keys.contains_key(&key) {
                    continue;
                }
                series.used.store(used, Ordering::Relaxed);
                state.bytes += series.bytes();
                state.keys.insert(key, series);
                installed += 1;
            }
            self.evict(&mut state);
            return Ok(Some(Loaded { installed, busy: busy.into_iter().collect() }));
        }
    }

    /// The `count_changes` rows of the epochs in `(after, through]` of `videos` and `kinds`.
    async fn changes_of(
        &self,
        clickhouse: &ClickHouse,
        videos: &[&str],
        kinds: &[&str],
        after: u64,
        through: Option<u64>,
    ) -> Result<Vec<Change>, QueryError> {
        let sql = format!("{CHANGES} AND video_id IN (SELECT arrayJoin(?)) AND event_type IN (SELECT arrayJoin(?))");
        let query = clickhouse.client().query(&sql).bind(after).bind(through.unwrap_or(u64::MAX));
        Ok(clickhouse.fetch_all(query.bind(videos).bind(kinds)).await?)
    }

    /// Loads keys before they are asked for: the most recently counted first (by day, then
    /// count), in batches of whole videos of up to `WARM_KEYS` keys and about `WARM_MINUTES`
    /// minutes, while the keys held and the next batch fit in nine tenths of the budget. Keys
    /// an epoch being written touched are read again a little later, then left to their first
    /// request. A batch that fails is logged and skipped; `WARM_FAILURES` in a row end the
    /// warm-up with an error (`run` starts another later). `Ok(false)`: the store was emptied
    /// meanwhile (the next poll starts a new warm-up).
    pub async fn warm_up(&self, generation: u64) -> Result<bool, QueryError> {
        let started = Instant::now();
        // Its reads are larger than a request's: they get longer than --clickhouse-timeout-ms.
        let clickhouse = self.clickhouse.with_request_timeout(WARM_TIMEOUT);
        let keys: Vec<Counted> = clickhouse
            .fetch_all(
                clickhouse
                    .client()
                    .query(
                        "SELECT video_id, event_type, toUInt64(sum(count)) AS events, toUInt64(uniqExact(day)) AS days \
                         FROM event_counts_day GROUP BY video_id, event_type \
                         ORDER BY max(day) DESC, events DESC, video_id, event_type LIMIT ?",
                    )
                    // No more than the budget could hold at half a kilobyte a key.
                    .bind((self.config.budget_bytes / 512) as u64),
            )
            .await?;
        let total = keys.len();
        let (mut installed, mut busy, mut failures) = (0, 0, 0);
        let limit = self.config.budget_bytes / 10 * WARM_TENTHS;
        for (mut batch, minutes) in by_video(keys) {
            {
                let state = self.state.read().expect("memory lock");
                if state.generation != generation {
                    info!("memory warm-up stopped: the store was emptied (a new warm-up follows)");
                    return Ok(false);
                }
                if state.bytes + minutes * 12 > limit {
                    break;
                }
                // A warm-up started again after a failure does not read what is in already.
                batch.retain(|key| !state.keys.contains_key(key));
            }
            if batch.is_empty() {
                continue;
            }
            // Keys an epoch in flight touched are read again a little later, as a load would.
            for attempt in 0..LOAD_ATTEMPTS {
                if attempt > 0 {
                    self.stats.load_retries.inc();
                    tokio::time::sleep(retry_pause(attempt)).await;
                }
                let loaded = match self.try_load(&clickhouse, &batch, 0).await {
                    Ok(Some(loaded)) => loaded,
                    Ok(None) => return Ok(false),
                    Err(error) => {
                        self.stats.load_errors.inc();
                        failures += 1;
                        if failures >= WARM_FAILURES {
                            return Err(error);
                        }
                        warn!(%error, keys = batch.len(), "a memory warm-up batch failed; its keys load when first asked for");
                        break;
                    }
                };
                failures = 0;
                installed += loaded.installed;
                self.stats.loads.inc_by(loaded.installed as u64);
                // The keys' last hour of event times too (edges of recent ranges), while they
                // take under half of their share.
                let room =
                    self.state.read().expect("memory lock").edge_bytes < self.config.budget_bytes / EDGE_SHARE / 2;
                let done: Vec<Key> = batch.iter().filter(|key| !loaded.busy.contains(key)).cloned().collect();
                if room && !done.is_empty() {
                    let (first, last) = hot_window();
                    if let Err(error) = self.load_edges(&clickhouse, &done, first, last.saturating_sub(60)).await {
                        warn!(%error, "reading a warm-up batch's last hour of event times failed; edges read them when asked");
                    }
                }
                batch = loaded.busy;
                if batch.is_empty() {
                    break;
                }
            }
            busy += batch.len();
        }
        let seconds = started.elapsed().as_secs_f64();
        {
            // Not for a store emptied since: its own warm-up reports.
            let state = self.state.read().expect("memory lock");
            if state.generation != generation {
                return Ok(false);
            }
            self.stats.warm_up_seconds.set(seconds);
            self.stats.warm_up_keys.set(installed as i64);
        }
        info!(
            keys = installed,
            of = total,
            left_to_requests = busy,
            mib = self.bytes() >> 20,
            seconds = format!("{seconds:.1}"),
            "memory warm-up done"
        );
        Ok(true)
    }

    /// Drops the least recently used keys until the budget holds.
    fn evict(&self, state: &mut State) {
        while state.bytes > self.config.budget_bytes && !state.keys.is_empty() {
            let oldest = state
                .keys
                .iter()
                .min_by_key(|(_, series)| series.used.load(Ordering::Relaxed))
                .map(|(key, _)| key.clone())
                .expect("not empty");
            if let Some(series) = state.keys.remove(&oldest) {
                state.bytes -= series.bytes();
                self.stats.evictions.inc();
            }
        }
    }

    /// Reads the committed epoch, applies the epochs committed since the last poll.
    pub async fn poll(&self) -> Result<(), QueryError> {
        // One replica for the whole poll: what it reads must follow the commit it saw there.
        let (clickhouse, replica) = self.clickhouse.pinned();
        let client = clickhouse.client();
        let query = client
            .query(
                "SELECT (SELECT count() FROM checkpoint_commits WHERE job = ?) AS commits, \
                 (SELECT toUInt64(max(epoch)) FROM checkpoint_commits WHERE job = ?) AS committed, \
                 (SELECT toString(metadata_modification_time) FROM system.tables \
                  WHERE database = currentDatabase() AND name = 'event_counts_minute') AS table, \
                 (SELECT toUInt64(max(total_replicas)) FROM system.replicas WHERE database = currentDatabase()) AS replicas",
            )
            .bind(&self.config.job)
            .bind(&self.config.job);
        let polled: Vec<Poll> = clickhouse.fetch_all(query).await?;
        let Some(Poll { commits, committed, table, replicas }) = polled.into_iter().next() else {
            return Err(QueryError::Corrupt("the poll query answered no row".into()));
        };
        if commits == 0 {
            // No commit of this job (yet, or another --job-name): the count tables may hold
            // another job's counts (a topic recreated and counted under a new --job-name), whose
            // changelog rows and markers are not this job's. Memory holds nothing until the
            // job's first commit, and ClickHouse answers.
            let mut state = self.state.write().expect("memory lock");
            if state.applied.is_some() || !self.waiting_logged.swap(true, Ordering::Relaxed) {
                info!(job = %self.config.job, "the job has committed no epoch in this database: counts read ClickHouse");
            }
            state.clear();
            if state.applied.take().is_some() {
                state.generation += 1;
            }
            state.polled = None;
            return Ok(());
        }
        if replicas == 0 {
            // A replica without its ZooKeeper session (read-only) says 0, and cannot sync.
            return Err(QueryError::Store(SinkError::Unavailable(
                "this ClickHouse replica has no ZooKeeper session (system.replicas shows no replica)".into(),
            )));
        }
        if replicas > 1 && self.clickhouse.replica_count() < 2 {
            // One URL before several replicas may be a balancer: each read may reach another
            // replica, and a sync of one says nothing of the next.
            let mut state = self.state.write().expect("memory lock");
            if !state.off {
                warn!(
                    replicas,
                    "the tables have several replicas and this service knows one URL: memory is off, counts read \
                     ClickHouse (give --clickhouse-url each replica's URL)"
                );
                state.off = true;
            }
            state.clear();
            state.applied = None;
            state.generation += 1;
            state.polled = None;
            return Ok(());
        }
        {
            let mut state = self.state.write().expect("memory lock");
            state.replicas = replicas;
            state.replica = replica;
        }
        let applied = self.applied();
        let reset = match applied {
            None => true,
            Some(applied) => {
                let state = self.state.read().expect("memory lock");
                // Away longer than the job keeps the changelog for sure: start over.
                let away = state.polled.is_none_or(|at| at.elapsed() > AWAY_LIMIT);
                committed < applied || state.table != table || away
            }
        };
        if reset {
            let mut state = self.state.write().expect("memory lock");
            if state.applied.is_some() {
                info!(
                    committed,
                    "event_counts_minute was replaced or the commits went back: memory emptied, keys load again"
                );
            }
            state.clear();
            self.stats.warm_up_seconds.set(-1.0);
            state.applied = Some(committed);
            state.table = table;
            state.generation += 1;
            state.off = false;
            state.polled = Some(Instant::now());
            return Ok(());
        }
        let applied = applied.expect("checked");
        let changes = if committed > applied {
            // Every block of the epochs up to the commit seen was acknowledged before it.
            self.sync(&clickhouse, &["count_changes"]).await?;
            let query = client.query(TIMED_CHANGES).bind(applied).bind(committed);
            let changes = clickhouse.fetch_all::<TimedChange>(query).await?;
            debug!(
                applied,
                committed,
                replica,
                rows = changes.len(),
                "applying the epochs committed since the last poll"
            );
            changes
        } else {
            Vec::new()
        };
        let (hot_start, hot_last) = hot_window();
        let limit = self.config.budget_bytes / EDGE_SHARE;
        let mut state = self.state.write().expect("memory lock");
        if state.applied != Some(applied) {
            return Ok(());
        }
        // Per edge minute the poll changes: the times its rows add (`None`: its kept times are
        // dropped), and whether it was kept before. Added once per minute below (one merge,
        // however many epochs changed it).
        let mut added: HashMap<(Key, u32), Added> = HashMap::new();
        let mut edge = ((String::new(), String::new()), 0);
        for TimedChange { video_id, event_type, minute, count, times } in changes {
            (edge.0.0, edge.0.1, edge.1) = (video_id, event_type, minute);
            // The row's event times are all of its events, unless its writer did not record them.
            let timed = times.len() as u64 == count;
            // The minute had no event as of the epochs applied: with the row's times, its kept
            // times are exactly its events.
            let mut new_minute = false;
            let State { keys, bytes, edges, .. } = &mut *state;
            if let Some(series) = keys.get_mut(&edge.0) {
                let before = series.bytes();
                new_minute = series.sum(minute, minute.saturating_add(60)) == 0;
                series.add(minute, count);
                *bytes = *bytes - before + series.bytes();
            }
            if let Some((so_far, _)) = added.get_mut(&edge) {
                match so_far {
                    Some(so_far) if timed => so_far.extend_from_slice(&times),
                    _ => *so_far = None,
                }
            } else if let Some(kept) = edges.get(&edge) {
                // The minute's events changed: its kept times take the row's, or are dropped.
                added.insert(edge.clone(), ((timed && kept.follows).then_some(times), true));
            } else if new_minute && timed && minute >= hot_start && minute <= hot_last.saturating_add(60) {
                added.insert(edge.clone(), (Some(times), false));
            }
        }
        for (edge, (times, was_kept)) in added {
            let State { edges, edge_bytes, .. } = &mut *state;
            match (times, edges.get_mut(&edge)) {
                // Kept (and not dropped meanwhile to make room for a new minute): add the times.
                (Some(times), Some(kept)) if was_kept => {
                    let before = kept.bytes();
                    if edge_bytes_of(&kept.offsets) + times.len() * 2 <= limit / 16 {
                        // Two sorted runs: the stable sort merges them in one pass.
                        kept.offsets.extend_from_slice(&times);
                        kept.offsets.sort();
                        *edge_bytes = *edge_bytes - before + kept.bytes();
                    } else {
                        edges.remove(&edge);
                        *edge_bytes -= before;
                    }
                }
                (None, Some(kept)) => {
                    *edge_bytes -= kept.bytes();
                    edges.remove(&edge);
                }
                (Some(mut times), None) if !was_kept && edge_bytes_of(&times) <= limit / 16 => {
                    times.sort_unstable();
                    state.keep_edge(edge, Kept { offsets: times, follows: true }, limit);
                }
                _ => {}
            }
        }
        // Minutes that grew may have taken the share past its limit.
        state.trim_edges(0, limit);
        if committed > applied {
            self.stats.applies.inc();
        }
        state.applied = Some(committed);
        state.polled = Some(Instant::now());
        Ok(())
    }

    /// Polls every `poll` for ever; logs failures (memory stops answering until a poll works).
    /// Starts a warm-up after the first poll and after every reset (with `warm_up`).
    pub async fn run(self: Arc<Self>) {
        let mut every = ticker(self.config.poll);
        let mut log = PollLog::new(
            "reading the committed epoch failed; counts read ClickHouse until it works",
            "memory polls work again",
        );
        let warm_ups = WarmUps::default();
        loop {
            every.tick().await;
            let polled = self.poll().await;
            if polled.is_err() {
                self.stats.poll_errors.inc();
            }
            log.note(polled);
            let ready = {
                let state = self.state.read().expect("memory lock");
                (self.config.warm_up && state.applied.is_some() && !state.off).then_some(state.generation)
            };
            let Some(generation) = ready else { continue };
            let memory = self.clone();
            warm_ups.start(generation, async move { memory.warm_up(generation).await }, |error| {
                warn!(%error, "the memory warm-up failed; keys load when first asked for, and it starts again in 30 s");
            });
        }
    }
}

/// The warm-ups of one memory, one at a time: [`WarmUps::start`] after each poll starts one for
/// the store's generation unless one runs, one finished for that generation, or one failed
/// less than `WARM_RETRY` ago.
#[derive(Default)]
pub(crate) struct WarmUps {
    state: Arc<Mutex<WarmUpState>>,
}

/// The generation the last warm-up finished for, whether one runs, when one last failed.
type WarmUpState = (Option<u64>, bool, Option<Instant>);

impl WarmUps {
    /// Runs `warm` (which says whether it ran to its end) in the background if it is due;
    /// `failed` hears its error.
    pub(crate) fn start(
        &self,
        generation: u64,
        warm: impl Future<Output = Result<bool, QueryError>> + Send + 'static,
        failed: impl FnOnce(QueryError) + Send + 'static,
    ) {
        {
            let mut state = self.state.lock().expect("warm-up lock");
            let (done, running, failed_at) = &mut *state;
            if *done == Some(generation) || *running || failed_at.is_some_and(|at| at.elapsed() < WARM_RETRY) {
                return;
            }
            *running = true;
        }
        let state = self.state.clone();
        tokio::spawn(async move {
            let result = warm.await;
            {
                let mut state = state.lock().expect("warm-up lock");
                state.1 = false;
                match &result {
                    Ok(true) => state.0 = Some(generation),
                    Ok(false) => {}
                    Err(_) => state.2 = Some(Instant::now()),
                }
            }
            if let Err(error) = result {
                failed(error);
            }
        });
    }
}

/// `SYSTEM SYNC REPLICA` for the memories of one service, one at a time.
#[derive(Debug, Default)]
pub struct ReplicaSync {
    one: tokio::sync::Mutex<()>,
}

impl ReplicaSync {
    /// With several replicas (`several`: several URLs or several replicas in
    /// `system.replicas`), waits until the one `clickhouse` reads (pinned) has every block of
    /// `tables` acknowledged on any replica before the call: the jobs acknowledge an epoch's
    /// blocks before its commit, and its changelog and minute blocks before its marker (not its
    /// hour and day blocks), so a replica that shows one of those, then syncs the tables they
    /// follow, has their blocks. Nothing on a lone server known by one URL. One sync at a time; and
    /// none while an earlier one still runs on the server (ClickHouse 18.16 goes on with a sync
    /// whose client gave up, and a pile of them would fill its `max_concurrent_queries`).
    pub async fn sync(&self, several: bool, clickhouse: &ClickHouse, tables: &[&str]) -> Result<(), QueryError> {
        if !several {
            return Ok(());
        }
        let _one = self.one.lock().await;
        #[derive(Row, Deserialize)]
        struct Running {
            n: u64,
        }
        // This service's syncs name the database (a valid identifier: no quoting needed).
        let database = clickhouse.database();
        let running: Vec<Running> = clickhouse
            .fetch_all(
                clickhouse
                    .client()
                    .query("SELECT count() AS n FROM system.processes WHERE query LIKE ?")
                    .bind(format!("SYSTEM SYNC REPLICA {database}.%")),
            )
            .await?;
        if running.first().is_some_and(|r| r.n > 0) {
            return Err(QueryError::Store(SinkError::Unavailable(
                "an earlier SYSTEM SYNC REPLICA still runs on this replica; memory waits for it".into(),
            )));
        }
        let tables: Vec<String> = tables.iter().map(|table| format!("{database}.{table}")).collect();
        let tables: Vec<&str> = tables.iter().map(String::as_str).collect();
        clickhouse.sync_replica_within(&tables, SYNC_LIMIT).await?;
        Ok(())
    }
}

/// The keys in batches, in their order, each batch with every key of its videos (a batch
/// reads its videos' rows: a video's keys in two batches would be read twice), of up to
/// `WARM_KEYS` keys and about `WARM_MINUTES` minutes; each with its estimated minutes (at most
/// a key's events, and 1,440 per day with a count).
fn by_video(keys: Vec<Counted>) -> Vec<(Vec<Key>, usize)> {
    let mut videos: Vec<(String, Vec<(String, usize)>)> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    for Counted { video_id, event_type, events, days } in keys {
        let minutes = events.min(days.saturating_mul(1440)) as usize;
        let at = match index.get(&video_id) {
            Some(&at) => at,
            None => {
                index.insert(video_id.clone(), videos.len());
                videos.push((video_id, Vec::new()));
                videos.len() - 1
            }
        };
        videos[at].1.push((event_type, minutes));
    }
    let mut batches: Vec<(Vec<Key>, usize)> = vec![(Vec::new(), 0)];
    for (video, kinds) in videos {
        let (batch, minutes) = batches.last_mut().expect("never empty");
        for (kind, estimate) in kinds {
            batch.push((video.clone(), kind));
            *minutes += estimate;
        }
        if batch.len() >= WARM_KEYS || *minutes >= WARM_MINUTES {
            batches.push((Vec::new(), 0));
        }
    }
    batches.retain(|(batch, _)| !batch.is_empty());
    batches
}

/// The distinct videos and event types of `keys`, for `IN (SELECT arrayJoin(?))` reads.
fn videos_and_kinds(keys: &[Key]) -> (Vec<&str>, Vec<&str>) {
    let videos: BTreeSet<&str> = keys.iter().map(|(video, _)| video.as_str()).collect();
    let kinds: BTreeSet<&str> = keys.iter().map(|(_, kind)| kind.as_str()).collect();
    (videos.into_iter().collect(), kinds.into_iter().collect())
}

/// The first and the last minute start (seconds) of the last hour of the wall clock.
fn hot_window() -> (u32, u32) {
    let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    (clamp(now_s.saturating_sub(HOT_WINDOW_SECS) / 60 * 60), clamp(now_s / 60 * 60))
}

/// The bytes an edge minute's event times take.
fn edge_bytes_of(offsets: &[u16]) -> usize {
    offsets.len() * 2 + 96
}

/// Ticks every `period`; a tick missed (a slow poll) is delayed, not caught up in a burst.
/// Whether a memory whose last poll that worked was at `polled` may answer: it is at most
/// three polls (and half a second) old.
pub(crate) fn fresh(polled: Option<Instant>, poll: Duration) -> bool {
    polled.is_some_and(|at| at.elapsed() <= poll * 3 + Duration::from_millis(500))
}

/// How long a load (or a warm-up batch) waits after a try that met an epoch in flight:
/// `20 ms * 2^attempt`, up to 320 ms.
pub(crate) fn retry_pause(attempt: u32) -> Duration {
    Duration::from_millis(20 * (1 << attempt.min(4)))
}

pub(crate) fn ticker(period: Duration) -> tokio::time::Interval {
    let mut every = tokio::time::interval(period);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    every
}

/// Logs the first failure of a run of failed polls, and the poll that works again.
pub(crate) struct PollLog {
    failing: bool,
    failed: &'static str,
    recovered: &'static str,
}

impl PollLog {
    pub(crate) fn new(failed: &'static str, recovered: &'static str) -> PollLog {
        PollLog { failing: false, failed, recovered }
    }

    pub(crate) fn note(&mut self, polled: Result<(), QueryError>) {
        match polled {
            Ok(()) if self.failing => {
                info!("{}", self.recovered);
                self.failing = false;
            }
            Ok(()) => {}
            Err(error) if !self.failing => {
                warn!(%error, "{}", self.failed);
                self.failing = true;
            }
            Err(_) => {}
        }
    }
}

pub(crate) fn clamp(s: u64) -> u32 {
    u32::try_from(s).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn warm_up_batches_keep_a_videos_keys_together_in_order() {
        let keys: Vec<Counted> =
            [("a", "view"), ("b", "view"), ("a", "like"), ("c", "view"), ("b", "like"), ("d", "view")]
                .into_iter()
                .map(|(video, kind)| Counted { video_id: video.into(), event_type: kind.into(), events: 10, days: 1 })
                .collect();
        let names = |batches: Vec<(Vec<Key>, usize)>| -> Vec<(Vec<String>, usize)> {
            batches.into_iter().map(|(batch, n)| (batch.iter().map(|(v, k)| format!("{v}/{k}")).collect(), n)).collect()
        };
        let all = names(by_video(keys));
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0, ["a/view", "a/like", "b/view", "b/like", "c/view", "d/view"]);
        assert_eq!(all[0].1, 60);
        // A heavy video closes its batch: about WARM_MINUTES minutes each (a day of minutes at most
        // per day with a count).
        let heavy = |video: &str, days: u64| Counted {
            video_id: video.into(),
            event_type: "view".into(),
            events: u64::MAX,
            days,
        };
        let batches = names(by_video(vec![heavy("h1", 1000), heavy("h2", 1000), heavy("l", 1)]));
        assert_eq!(
            batches,
            [(vec!["h1/view".to_owned(), "h2/view".to_owned()], 2_880_000), (vec!["l/view".to_owned()], 1440)]
        );
        assert!(by_video(Vec::new()).is_empty());
    }

    #[test]
    fn edge_minutes_over_their_share_leave_oldest_first_and_are_not_kept_again() {
        let mut state = State { applied: Some(1), ..State::new() };
        let key = |video: &str| (video.to_owned(), "view".to_owned());
        let kept = |offsets: Vec<u16>| Kept { offsets, follows: true };
        let times = vec![7u16; 100];
        let each = edge_bytes_of(&times);
        let limit = 10 * each;
        for minute in 0..10 {
            state.keep_edge((key("a"), minute * 60), kept(times.clone()), limit);
        }
        assert_eq!((state.edges.len(), state.edge_bytes), (10, limit));
        // One more: the oldest leave, down to three quarters of the share with the new one in.
        state.keep_edge((key("b"), 600), kept(times.clone()), limit);
        let mut minutes: Vec<u32> = state.edges.keys().map(|(_, minute)| *minute).collect();
        minutes.sort_unstable();
        assert_eq!(minutes, [240, 300, 360, 420, 480, 540, 600]);
        assert_eq!(state.edge_bytes, 7 * each);
        assert_eq!(state.edge_floor, 181);
        // A minute before those that left is not kept again; a newer one is, and one kept
        // again replaces its times.
        state.keep_edge((key("c"), 120), kept(times.clone()), limit);
        state.keep_edge((key("c"), 660), kept(times.clone()), limit);
        state.keep_edge((key("c"), 660), kept(vec![1; 10]), limit);
        assert!(!state.edges.contains_key(&(key("c"), 120)));
        assert_eq!(state.edges[&(key("c"), 660)], kept(vec![1; 10]));
        assert_eq!(state.edge_bytes, 7 * each + edge_bytes_of(&[1; 10]));
        state.clear();
        assert_eq!((state.edges.len(), state.edge_bytes, state.edge_floor), (0, 0, 0));
    }

    proptest! {
        #[test]
        fn sums_equal_a_plain_sum(rows in proptest::collection::btree_map(0u32..500, 1u64..100, 0..100),
                                  changes in proptest::collection::vec((0u32..600, 1u64..100), 0..600),
                                  ranges in proptest::collection::vec((0u32..700, 0u32..700), 1..20)) {
            let mut series = Series::new(rows.clone());
            let mut plain = rows;
            for (minute, count) in changes {
                series.add(minute, count);
                *plain.entry(minute).or_insert(0) += count;
            }
            for (a, b) in ranges {
                let expected: u64 = plain.range(a..b.max(a)).map(|(_, n)| n).sum();
                prop_assert_eq!(series.sum(a, b), expected);
            }
        }
    }
}
