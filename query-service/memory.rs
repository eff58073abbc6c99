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
//! - **Bounded.** Keys held take at most `budget_bytes`; the least recently asked for leave.
//! - **Never stale without saying so.** Memory answers only while the last poll is at most
//!   three polls old; otherwise, and for keys not loaded yet, the caller reads ClickHouse.
//!   When `event_counts_minute` is replaced (`videocount replay` renames fresh tables in), every
//!   key is dropped and loaded again.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use clickhouse::Row;
use prometheus_client::metrics::counter::Counter;
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

#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// How often the committed epoch is read.
    pub poll: Duration,
    /// Memory the keys may take (their arrays and changes).
    pub budget_bytes: usize,
    /// The checkpoint name of the `view_counts` writing the count tables (its `--job-name`).
    pub job: String,
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

#[derive(Row, Deserialize)]
struct Minute {
    minute: u32,
    count: u64,
}

#[derive(Row, Deserialize)]
struct Change {
    video_id: String,
    event_type: String,
    minute: u32,
    count: u64,
    epoch: u64,
}

/// Why a load did not install its key.
enum Outcome {
    Installed,
    /// The store is not ready (no poll yet) or the key came in meanwhile.
    Skipped,
    /// An epoch was being written while the key was read.
    Busy,
}

impl Memory {
    pub fn new(clickhouse: ClickHouse, config: MemoryConfig, stats: MemoryStats) -> Memory {
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
        // Asked for before the first poll (just after the start): wait for it a little.
        for _ in 0..50 {
            if self.applied().is_some() {
                break;
            }
            tokio::time::sleep(self.config.poll).await;
        }
        for attempt in 0..LOAD_ATTEMPTS {
            match self.try_load(key).await? {
                Outcome::Installed => {
                    self.stats.loads.inc();
                    return Ok(());
                }
                Outcome::Skipped => return Ok(()),
                Outcome::Busy => {
                    self.stats.load_retries.inc();
                    let pause = 20 * (1 << attempt.min(4)) + rand::random_range(0..20);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                }
            }
        }
        Err(QueryError::Invalid(format!("an epoch was being written during each of {LOAD_ATTEMPTS} reads")))
    }

    async fn try_load(&self, key: &Key) -> Result<Outcome, QueryError> {
        let (applied, generation) = {
            let state = self.state.read().expect("memory lock");
            match state.applied {
                Some(applied) => (applied, state.generation),
                None => return Ok(Outcome::Skipped),
            }
        };
        let client = self.clickhouse.client();
        // 1. The blocks marked written: an epoch's block of the key marked here is all in step 2.
        let marked: Vec<Block> = self
            .clickhouse
            .fetch_all(client.query("SELECT epoch, worker, peers FROM count_blocks WHERE epoch > ?").bind(applied))
            .await?;
        // 2. The key's minutes: everything applied, and maybe epochs being written.
        let base: Vec<Minute> = self
            .clickhouse
            .fetch_all(
                client
                    .query(
                        "SELECT toUInt32(minute) AS minute, toUInt64(sum(count)) AS count FROM event_counts_minute \
                         WHERE video_id = ? AND event_type = ? GROUP BY minute ORDER BY minute",
                    )
                    .bind(&key.0)
                    .bind(&key.1),
            )
            .await?;
        // 3. The key's rows of the epochs after the applied one: every epoch step 2 may hold.
        let later = self.changes_of(key, applied, None).await?;
        let route = videocount_events::route(&key.0);
        let mut minutes: BTreeMap<u32, u64> = base.into_iter().map(|m| (m.minute, m.count)).collect();
        for change in &later {
            let marker = marked
                .iter()
                .find(|b| b.epoch == change.epoch && u64::from(b.worker) == route % u64::from(b.peers.max(1)));
            if marker.is_none() {
                return Ok(Outcome::Busy);
            }
            let Some(count) = minutes.get_mut(&change.minute).filter(|n| **n >= change.count) else {
                return Err(QueryError::Corrupt(format!(
                    "epoch {} of {}/{} is marked written but its minute {} is not in event_counts_minute",
                    change.epoch, key.0, key.1, change.minute
                )));
            };
            *count -= change.count;
        }
        // Now the key as of `applied`. Add the epochs applied meanwhile, then install, unless
        // the poller moved on again.
        loop {
            let now_applied = self.applied().unwrap_or(applied);
            let mut rows = minutes.clone();
            if now_applied > applied {
                for change in self.changes_of(key, applied, Some(now_applied)).await? {
                    *rows.entry(change.minute).or_insert(0) += change.count;
                }
            }
            let series = Series::new(rows.into_iter().filter(|(_, n)| *n > 0));
            series.used.store(self.now_s(), Ordering::Relaxed);
            let mut state = self.state.write().expect("memory lock");
            if state.generation != generation || state.keys.contains_key(key) {
                return Ok(Outcome::Skipped);
            }
            if state.applied != Some(now_applied) {
                continue;
            }
            state.bytes += series.bytes();
            state.keys.insert(key.clone(), series);
            self.evict(&mut state);
            return Ok(Outcome::Installed);
        }
    }

    /// The key's `count_changes` rows of the epochs in `(after, through]`.
    async fn changes_of(&self, key: &Key, after: u64, through: Option<u64>) -> Result<Vec<Change>, QueryError> {
        let sql = "SELECT video_id, event_type, toUInt32(minute) AS minute, count, epoch FROM count_changes \
                   WHERE epoch > ? AND epoch <= ? AND video_id = ? AND event_type = ?";
        let query = self.clickhouse.client().query(sql).bind(after).bind(through.unwrap_or(u64::MAX));
        Ok(self.clickhouse.fetch_all(query.bind(&key.0).bind(&key.1)).await?)
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
            state.applied = Some(committed);
            state.table = table;
            state.generation += 1;
            state.replicated = false;
            state.polled = Some(Instant::now());
            return Ok(());
        }
        let applied = applied.expect("checked");
        let changes = if committed > applied {
            let query = client
                .query(
                    "SELECT video_id, event_type, toUInt32(minute) AS minute, count, epoch FROM count_changes \
                     WHERE epoch > ? AND epoch <= ?",
                )
                .bind(applied)
                .bind(committed);
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
    pub async fn run(self: Arc<Self>) {
        let mut every = tokio::time::interval(self.config.poll);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            every.tick().await;
            match self.poll().await {
                Ok(()) if failing => {
                    info!("memory polls work again");
                    failing = false;
                }
                Ok(()) => {}
                Err(error) => {
                    self.stats.poll_errors.inc();
                    if !failing {
                        warn!(%error, "reading the committed epoch failed; counts read ClickHouse until it works");
                        failing = true;
                    }
                }
            }
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
