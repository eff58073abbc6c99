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
//!   order: `count_changes`, the count tables, then a row in `count_blocks` (epoch, worker). So
//!   the load first reads `count_blocks` after the applied epoch `A`, then the key's minutes,
//!   then the key's `count_changes` rows after `A`. An epoch among those rows whose block was
//!   marked written before the read was in it: its rows are taken off. One that is not marked
//!   may or may not have been: the load tries again a little later. An epoch that is not among
//!   them was not in the read (its `count_changes` rows would have come first). What is left is
//!   the key as of `A`; the epochs applied since are read for the key before it is installed.
//! - **Warmed before it is asked** (`warm_up`): after the first poll and after every reset, the
//!   keys of `event_counts_day`, the most recently counted first, load 500 at a time with the same
//!   three reads (their videos' rows), until they take nine tenths of the budget. A key an epoch
//!   in flight touched is read again a little later, and after ten tries left to its first
//!   request. Until a key is in, ClickHouse answers it.
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
use tracing::{info, warn};
use videocount_clickhouse::ClickHouse;
use videocount_query::QueryError;

/// A service whose polls failed longer than this empties memory when they work again: the job
/// drops changelog ranges at least 2^20 epochs behind its commits (17 minutes at 1 ms epochs),
/// and the epochs it missed may be gone.
const AWAY_LIMIT: Duration = Duration::from_secs(300);
/// Keys loaded at once (each load is three small queries).
const CONCURRENT_LOADS: usize = 4;
/// Loads a key tries before it gives up (and leaves it to a later request).
const LOAD_ATTEMPTS: u32 = 10;
/// Changes a key gathers before they are merged into its arrays.
const MERGE_AFTER: usize = 256;
/// Keys a warm-up reads at once (the rows of their videos in three queries).
const WARM_CHUNK: usize = 500;
/// A warm-up stops once the keys take this share of the budget (in tenths): the rest is for the
/// keys asked for later.
const WARM_TENTHS: usize = 9;
/// How long one of a warm-up's reads may take.
const WARM_TIMEOUT: Duration = Duration::from_secs(120);
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
    pub load_errors: Counter,
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
    /// The tables have several replicas: memory is off.
    replicated: bool,
    keys: HashMap<Key, Series>,
    bytes: usize,
}

pub struct Memory {
    clickhouse: ClickHouse,
    config: MemoryConfig,
    started: Instant,
    state: RwLock<State>,
    loading: Mutex<HashSet<Key>>,
    load_permits: tokio::sync::Semaphore,
    pub stats: MemoryStats,
}

#[derive(Row, Deserialize)]
struct Poll {
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

/// A key's minutes with a count, in no particular order.
#[derive(Row, Deserialize)]
struct KeyMinutes {
    video_id: String,
    event_type: String,
    minutes: Vec<u32>,
    counts: Vec<u64>,
}

#[derive(Row, Deserialize)]
struct Counted {
    video_id: String,
    event_type: String,
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
    pub fn new(clickhouse: ClickHouse, config: MemoryConfig, stats: MemoryStats) -> Memory {
        stats.warm_up_seconds.set(-1.0);
        Memory {
            clickhouse,
            config,
            started: Instant::now(),
            state: RwLock::new(State {
                applied: None,
                polled: None,
                table: String::new(),
                generation: 0,
                replicated: false,
                keys: HashMap::new(),
                bytes: 0,
            }),
            loading: Mutex::new(HashSet::new()),
            load_permits: tokio::sync::Semaphore::new(CONCURRENT_LOADS),
            stats,
        }
    }

    fn now_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    fn fresh(&self, state: &State) -> bool {
        state.polled.is_some_and(|at| at.elapsed() <= self.config.poll * 3 + Duration::from_millis(500))
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
            if state.replicated || state.keys.contains_key(&key) {
                return;
            }
        }
        if !self.loading.lock().expect("loading lock").insert(key.clone()) {
            return;
        }
        let memory = self.clone();
        tokio::spawn(async move {
            let _permit = memory.load_permits.acquire().await.expect("the semaphore is never closed");
            if let Err(error) = memory.load(&key).await {
                memory.stats.load_errors.inc();
                warn!(video_id = %key.0, event_type = %key.1, %error, "loading a key into memory failed; ClickHouse answers it");
            }
            memory.loading.lock().expect("loading lock").remove(&key);
        });
    }

    /// Loads a key, trying again while epochs are being written.
    pub async fn load(&self, key: &Key) -> Result<(), QueryError> {
        self.wait_for_first_poll().await;
        for attempt in 0..LOAD_ATTEMPTS {
            match self.try_load(&self.clickhouse, std::slice::from_ref(key)).await? {
                None => return Ok(()),
                Some(loaded) if loaded.busy.is_empty() => {
                    if loaded.installed > 0 {
                        self.stats.loads.inc();
                    }
                    return Ok(());
                }
                Some(_) => {
                    self.stats.load_retries.inc();
                    let pause = 20 * (1 << attempt.min(4)) + rand::random_range(0..20);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        Err(QueryError::Invalid(format!("an epoch was being written during each of {LOAD_ATTEMPTS} reads")))
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
    /// all of them with the same three reads.
    async fn try_load(&self, clickhouse: &ClickHouse, keys: &[Key]) -> Result<Option<Loaded>, QueryError> {
        let (applied, generation) = {
            let state = self.state.read().expect("memory lock");
            match state.applied {
                Some(applied) => (applied, state.generation),
                None => return Ok(None),
            }
        };
        let videos: Vec<&str> =
            keys.iter().map(|(video, _)| video.as_str()).collect::<BTreeSet<_>>().into_iter().collect();
        let client = clickhouse.client();
        // 1. The blocks marked written: an epoch's block of a key marked here is all in step 2.
        let marked: Vec<Block> = clickhouse
            .fetch_all(client.query("SELECT epoch, worker, peers FROM count_blocks WHERE epoch > ?").bind(applied))
            .await?;
        // 2. The keys' minutes: everything applied, and maybe epochs being written. One row per
        // key, its rows as arrays (a year of a busy key is 500,000 minutes); a minute's rows not
        // merged yet are summed here, which costs ClickHouse far less than a GROUP BY minute.
        let base: Vec<KeyMinutes> = clickhouse
            .fetch_all(
                client
                    .query(
                        "SELECT video_id, event_type, groupArray(toUInt32(minute)) AS minutes, groupArray(count) AS counts \
                         FROM event_counts_minute WHERE video_id IN (SELECT arrayJoin(?)) GROUP BY video_id, event_type",
                    )
                    .bind(&videos),
            )
            .await?;
        let mut minutes: HashMap<Key, Vec<(u32, u64)>> = keys.iter().map(|key| (key.clone(), Vec::new())).collect();
        for row in base {
            if let Some(rows) = minutes.get_mut(&(row.video_id, row.event_type)) {
                *rows = row.minutes.into_iter().zip(row.counts).collect();
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
        let mut busy = BTreeSet::new();
        for change in self.changes_of(clickhouse, &videos, applied, None).await? {
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
        minutes.retain(|key, _| !busy.contains(key));
        // Now the keys as of `applied`. Add the epochs applied meanwhile, then install, unless
        // the poller moved on again.
        loop {
            let now_applied = self.applied().unwrap_or(applied);
            let meanwhile = if now_applied > applied {
                self.changes_of(clickhouse, &videos, applied, Some(now_applied)).await?
            } else {
                Vec::new()
            };
            let mut loaded: HashMap<Key, Series> = minutes
                .iter()
                .map(|(key, rows)| (key.clone(), Series::new(rows.iter().copied().filter(|(_, n)| *n > 0))))
                .collect();
            for change in meanwhile {
                if let Some(series) = loaded.get_mut(&(change.video_id, change.event_type)) {
                    series.add(change.minute, change.count);
                }
            }
            let used = self.now_s();
            let mut state = self.state.write().expect("memory lock");
            if state.generation != generation {
                return Ok(None);
            }
            if state.applied != Some(now_applied) {
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

    /// The `count_changes` rows of `videos` of the epochs in `(after, through]`.
    async fn changes_of(
        &self,
        clickhouse: &ClickHouse,
        videos: &[&str],
        after: u64,
        through: Option<u64>,
    ) -> Result<Vec<Change>, QueryError> {
        let sql = format!("{CHANGES} AND video_id IN (SELECT arrayJoin(?))");
        let query = clickhouse.client().query(&sql).bind(after).bind(through.unwrap_or(u64::MAX));
        Ok(clickhouse.fetch_all(query.bind(videos)).await?)
    }

    /// Loads keys before they are asked for: the most recently counted first (by day, then
    /// count), `WARM_CHUNK` at a time, until they take nine tenths of the budget or none is
    /// left. Keys an epoch being written touched are left to their first request. Stops when
    /// the store is emptied (a reset starts a new warm-up).
    pub async fn warm_up(&self, generation: u64) -> Result<(), QueryError> {
        let started = Instant::now();
        // Its reads are larger than a request's: they get longer than --clickhouse-timeout-ms.
        let clickhouse = self.clickhouse.with_request_timeout(WARM_TIMEOUT);
        let keys: Vec<Counted> = clickhouse
            .fetch_all(
                clickhouse
                    .client()
                    .query(
                        "SELECT video_id, event_type FROM event_counts_day GROUP BY video_id, event_type \
                         ORDER BY max(day) DESC, sum(count) DESC, video_id, event_type LIMIT ?",
                    )
                    // No more than the budget could hold (a key takes at least its fixed part).
                    .bind((self.config.budget_bytes / Series::default().bytes()) as u64),
            )
            .await?;
        let (mut installed, mut busy) = (0, 0);
        for chunk in by_video(&keys, WARM_CHUNK) {
            {
                let state = self.state.read().expect("memory lock");
                if state.generation != generation {
                    info!("memory warm-up stopped: the store was emptied (a new warm-up follows)");
                    return Ok(());
                }
                if state.bytes >= self.config.budget_bytes / 10 * WARM_TENTHS {
                    break;
                }
            }
            // Keys an epoch in flight touched are read again a little later, as a load would.
            let mut chunk = chunk;
            for attempt in 0..LOAD_ATTEMPTS {
                if attempt > 0 {
                    self.stats.load_retries.inc();
                    tokio::time::sleep(Duration::from_millis(20 * (1 << attempt.min(4)))).await;
                }
                let Some(loaded) = self.try_load(&clickhouse, &chunk).await? else { return Ok(()) };
                installed += loaded.installed;
                self.stats.loads.inc_by(loaded.installed as u64);
                chunk = loaded.busy;
                if chunk.is_empty() {
                    break;
                }
            }
            busy += chunk.len();
        }
        let seconds = started.elapsed().as_secs_f64();
        self.stats.warm_up_seconds.set(seconds);
        self.stats.warm_up_keys.set(installed as i64);
        info!(
            keys = installed,
            of = keys.len(),
            left_to_requests = busy,
            mib = self.bytes() >> 20,
            seconds = format!("{seconds:.1}"),
            "memory warm-up done"
        );
        Ok(())
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
        let client = self.clickhouse.client();
        let query = client
            .query(
                "SELECT (SELECT toUInt64(max(epoch)) FROM checkpoint_commits WHERE job = ?) AS committed, \
                 (SELECT toString(metadata_modification_time) FROM system.tables \
                  WHERE database = currentDatabase() AND name = 'event_counts_minute') AS table, \
                 (SELECT toUInt64(max(total_replicas)) FROM system.replicas WHERE database = currentDatabase()) AS replicas",
            )
            .bind(&self.config.job);
        let polled: Vec<Poll> = self.clickhouse.fetch_all(query).await?;
        let Some(Poll { committed, table, replicas }) = polled.into_iter().next() else {
            return Err(QueryError::Corrupt("the poll query answered no row".into()));
        };
        if replicas > 1 {
            // Each table replicates on its own: the write order a load relies on holds only on
            // the replica the job wrote to, and a commit may arrive before its changes.
            let mut state = self.state.write().expect("memory lock");
            if !state.replicated {
                warn!(replicas, "the count tables have several replicas: memory is off, counts read ClickHouse");
                state.replicated = true;
            }
            state.keys.clear();
            state.bytes = 0;
            state.applied = None;
            state.generation += 1;
            state.polled = None;
            return Ok(());
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
            state.keys.clear();
            state.bytes = 0;
            self.stats.warm_up_seconds.set(-1.0);
            state.applied = Some(committed);
            state.table = table;
            state.generation += 1;
            state.replicated = false;
            state.polled = Some(Instant::now());
            return Ok(());
        }
        let applied = applied.expect("checked");
        let changes = if committed > applied {
            let query = client.query(CHANGES).bind(applied).bind(committed);
            self.clickhouse.fetch_all::<Change>(query).await?
        } else {
            Vec::new()
        };
        let mut state = self.state.write().expect("memory lock");
        if state.applied != Some(applied) {
            return Ok(());
        }
        let State { keys, bytes, .. } = &mut *state;
        let mut key = (String::new(), String::new());
        for change in changes {
            key.0 = change.video_id;
            key.1 = change.event_type;
            if let Some(series) = keys.get_mut(&key) {
                let before = series.bytes();
                series.add(change.minute, change.count);
                *bytes = *bytes - before + series.bytes();
            }
        }
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
        let mut warmed = None;
        loop {
            every.tick().await;
            let polled = self.poll().await;
            if polled.is_err() {
                self.stats.poll_errors.inc();
            }
            log.note(polled);
            let ready = {
                let state = self.state.read().expect("memory lock");
                (state.applied.is_some() && !state.replicated).then_some(state.generation)
            };
            if let Some(generation) = ready.filter(|_| self.config.warm_up && ready != warmed) {
                warmed = ready;
                let memory = self.clone();
                tokio::spawn(async move {
                    if let Err(error) = memory.warm_up(generation).await {
                        warn!(%error, "the memory warm-up failed; keys load when first asked for");
                    }
                });
            }
        }
    }
}

/// The keys in batches of about `size`, in their order, each batch with every key of its
/// videos (a batch reads its videos' rows: a video's keys in two batches would be read twice).
fn by_video(keys: &[Counted], size: usize) -> Vec<Vec<Key>> {
    let mut videos: Vec<(&str, Vec<&str>)> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for key in keys {
        let at = *index.entry(&key.video_id).or_insert_with(|| {
            videos.push((&key.video_id, Vec::new()));
            videos.len() - 1
        });
        videos[at].1.push(&key.event_type);
    }
    let mut batches = vec![Vec::new()];
    for (video, types) in videos {
        let batch = batches.last_mut().expect("never empty");
        batch.extend(types.into_iter().map(|kind| (video.to_owned(), kind.to_owned())));
        if batch.len() >= size {
            batches.push(Vec::new());
        }
    }
    batches.retain(|batch| !batch.is_empty());
    batches
}

/// Ticks every `period`; a tick missed (a slow poll) is delayed, not caught up in a burst.
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

fn clamp(s: u64) -> u32 {
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
                .map(|(video, kind)| Counted { video_id: video.into(), event_type: kind.into() })
                .collect();
        let batches = by_video(&keys, 3);
        let names: Vec<Vec<String>> =
            batches.iter().map(|batch| batch.iter().map(|(v, k)| format!("{v}/{k}")).collect()).collect();
        assert_eq!(names, [vec!["a/view", "a/like", "b/view", "b/like"], vec!["c/view", "d/view"]]);
        assert!(by_video(&[], 3).is_empty());
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
