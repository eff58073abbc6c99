//! Stats from memory: per (video, event type, aggregate) asked for, the merged state of each
//! minute, hour and day bucket with data, so a range is the merge of the buckets of its
//! segments (whole days, whole hours, the minutes left): at most about 420 merges for a year.
//!
//! - **Kept current by commits.** Every `poll` reads the newest epoch `event_stats` committed.
//!   The job writes each epoch's minute states twice: into `stats_minute` and into
//!   `stats_changes`, which is sorted by epoch. The rows of the epochs committed since the last
//!   poll are read from there, and each row of a held key is merged into its minute, hour and
//!   day buckets, once: the service remembers the last epoch it applied. An epoch commits only
//!   once all its blocks (fast and slow streams) are written, so the newest commit covers
//!   every epoch up to it.
//! - **Loaded on first use, exactly as of an epoch.** Stats rows are never summed by the
//!   engine: each row carries the epoch that wrote it, so a load reads the key's rows of the
//!   epochs up to the applied one `A` (`epoch <= A`), all written since `A` is committed.
//!   Compaction merges a closed bucket's states through the last committed epoch `E` into one
//!   row of epoch `E` and empties the rows it merged: a load that meets a compacted row past
//!   `A` cannot take the rows of `A` apart from it, and tries again once the poll reached `E`
//!   (at most a poll later, since `E` was committed). Before installing, the load merges the
//!   key's `stats_changes` rows of the epochs applied meanwhile.
//! - **Replicas.** As the counts' memory (memory.rs): each poll pins one replica and syncs
//!   `stats_changes` before reading changes; loads read the replica of the last poll after
//!   syncing the stats tables.
//! - **Bounded.** Keys take at most `budget_bytes` (estimated from their states' heap size); the
//!   least recently asked for leave, and a key over a quarter of it is left to ClickHouse.
//! - **Never stale without saying so.** Memory answers only while the last poll is at most
//!   three polls old; otherwise, and for keys not loaded yet, the caller reads ClickHouse.
//!
//! Floating-point sums (`sum`, `avg`) may differ from ClickHouse's merge in their last bits:
//! the same states are added in another grouping (per bucket, then across buckets).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use clickhouse::Row;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tracing::{debug, info, warn};
use videocount_aggregates::{AggregateId, DynAggregate, Registry, State};
use videocount_clickhouse::states::{KeyedState, StoredState, emptied_without_compaction, live_states};
use videocount_clickhouse::{ClickHouse, SinkError};
use videocount_query::{Grain, QueryError, Segment};

use crate::memory::{
    AWAY_LIMIT, CONCURRENT_LOADS, LOAD_ATTEMPTS, PollLog, ReplicaSync, WARM_KEYS, WARM_TENTHS, WARM_TIMEOUT, WarmUps,
    clamp, fresh, retry_pause, ticker,
};

/// Bytes a bucket takes beside its state (its map entry).
const BUCKET_OVERHEAD: usize = 64;
/// Bytes a key takes beside its buckets (its map entry, ids and locks): a key without data
/// counts too, so that requests for any number of unknown ids stay within the budget.
const KEY_OVERHEAD: usize = 256;
/// The stats tables by grain: the grain's index in `Held::grains`, the table, and its bucket
/// start in seconds.
const TABLES: [(usize, &str, &str); 3] = [
    (0, "stats_minute", "toUInt32(minute)"),
    (1, "stats_hour", "toUInt32(hour)"),
    (2, "stats_day", "toUInt32(toUInt32(day) * 86400)"),
];

#[derive(Clone, Debug)]
pub struct StatsMemoryConfig {
    /// How often the committed epoch is read.
    pub poll: Duration,
    /// Memory the keys may take.
    pub budget_bytes: usize,
    /// The checkpoint name of the `event_stats` writing the stats tables (its `--job-name`).
    pub job: String,
    /// Load keys before they are asked for, after the first poll and after every reset.
    pub warm_up: bool,
}

/// Counters the service exports (`/metrics`).
#[derive(Default, Debug, Clone)]
pub struct StatsMemoryStats {
    pub hits: Counter,
    pub misses: Counter,
    pub loads: Counter,
    /// Loads that met a compaction past the applied epoch and tried again.
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

/// (video, event type, aggregate).
type Key = (String, String, AggregateId);

/// A bucket's merged state and the bytes it is taken to take.
struct Bucket {
    state: State,
    cost: usize,
}

/// The merged states of one key's buckets: minutes, hours and days (start in seconds).
struct Held {
    grains: [BTreeMap<u32, Bucket>; 3],
    /// What the key takes: [`KEY_OVERHEAD`] and its buckets' costs.
    bytes: usize,
}

impl Held {
    fn new(key: &Key) -> Held {
        Held { grains: Default::default(), bytes: KEY_OVERHEAD + key.0.len() + key.1.len() }
    }

    /// Merges `state` into bucket `start` of `grain`, and counts what the bucket takes now
    /// ([`DynAggregate::heap_bytes`]).
    fn merge(&mut self, aggregate: &dyn DynAggregate, grain: usize, start: u32, state: &State) {
        let bucket = self.grains[grain].entry(start).or_insert_with(|| Bucket { state: aggregate.create(), cost: 0 });
        aggregate.merge(&mut bucket.state, state);
        let cost = aggregate.heap_bytes(&bucket.state) + BUCKET_OVERHEAD;
        self.bytes = self.bytes - bucket.cost + cost;
        bucket.cost = cost;
    }

    /// Merges one minute's state into its minute, hour and day.
    fn add_minute(&mut self, aggregate: &dyn DynAggregate, minute: u32, state: &State) {
        for (grain, width) in [(0, 60), (1, 3600), (2, 86_400)] {
            self.merge(aggregate, grain, minute / width * width, state);
        }
    }
}

struct Entry {
    used: AtomicU64,
    held: Mutex<Held>,
}

#[derive(Default)]
struct StatsState {
    /// The last committed epoch applied; `None` before the first poll.
    applied: Option<u64>,
    /// Bumped by every reset: a load begun before one does not install.
    generation: u64,
    polled: Option<Instant>,
    /// Replicas of the tables (`system.replicas`) and the one the last poll read.
    replicas: u64,
    replica: usize,
    off: bool,
    keys: HashMap<Key, Arc<Entry>>,
    bytes: usize,
}

impl StatsState {
    fn clear(&mut self) {
        self.keys.clear();
        self.bytes = 0;
    }
}

pub struct StatsMemory {
    clickhouse: ClickHouse,
    registry: Registry,
    config: StatsMemoryConfig,
    started: Instant,
    state: RwLock<StatsState>,
    loading: Mutex<HashSet<Key>>,
    load_permits: tokio::sync::Semaphore,
    syncing: Arc<ReplicaSync>,
    /// Said once that the job has no commit.
    waiting_logged: std::sync::atomic::AtomicBool,
    pub stats: StatsMemoryStats,
}

#[derive(Row, Deserialize)]
struct Poll {
    commits: u64,
    committed: u64,
    replicas: u64,
}

/// A row of `stats_changes`.
#[derive(Row, Deserialize)]
struct Change {
    video_id: String,
    event_type: String,
    aggregate: String,
    minute: u32,
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
}

impl StatsMemory {
    pub fn new(
        clickhouse: ClickHouse,
        registry: Registry,
        config: StatsMemoryConfig,
        stats: StatsMemoryStats,
        syncing: Arc<ReplicaSync>,
    ) -> StatsMemory {
        StatsMemory {
            clickhouse,
            registry,
            config,
            started: Instant::now(),
            state: RwLock::new(StatsState::default()),
            loading: Mutex::new(HashSet::new()),
            load_permits: tokio::sync::Semaphore::new(CONCURRENT_LOADS),
            syncing,
            waiting_logged: std::sync::atomic::AtomicBool::new(false),
            stats,
        }
    }

    /// The merge of `aggregate`'s states over `segments` of a key, and how many bucket states
    /// it merged, when the key is held and the store is current; counts the hit or the miss.
    pub fn merge(
        &self,
        video_id: &str,
        event_type: &str,
        aggregate: AggregateId,
        segments: &[Segment],
    ) -> Option<(State, usize)> {
        // The read lock stays held while merging: a poll applies all its epochs between reads.
        let state = self.state.read().expect("stats memory lock");
        let key = (video_id.to_owned(), event_type.to_owned(), aggregate);
        let Some(entry) = fresh(state.polled, self.config.poll).then(|| state.keys.get(&key)).flatten() else {
            self.stats.misses.inc();
            return None;
        };
        entry.used.store(self.started.elapsed().as_secs(), Ordering::Relaxed);
        let held = entry.held.lock().expect("stats key lock");
        let aggregate = self.registry.get(aggregate);
        let mut merged = aggregate.create();
        let mut states = 0;
        for segment in segments {
            let grain = match segment.grain {
                Grain::Minute => 0,
                Grain::Hour => 1,
                Grain::Day => 2,
            };
            let (start, end) = (clamp(segment.start_s), clamp(segment.end_s));
            for bucket in held.grains[grain].range(start..end).map(|(_, bucket)| bucket) {
                aggregate.merge(&mut merged, &bucket.state);
                states += 1;
            }
        }
        self.stats.hits.inc();
        Some((merged, states))
    }

    pub fn len(&self) -> usize {
        self.state.read().expect("stats memory lock").keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the keys are estimated to take.
    pub fn bytes(&self) -> usize {
        self.state.read().expect("stats memory lock").bytes
    }

    /// The last committed epoch of `event_stats` applied.
    pub fn applied(&self) -> Option<u64> {
        self.state.read().expect("stats memory lock").applied
    }

    /// Loads the key in the background unless it is held or being loaded.
    pub fn want(self: &Arc<Self>, video_id: &str, event_type: &str, aggregate: AggregateId) {
        let key = (video_id.to_owned(), event_type.to_owned(), aggregate);
        {
            let state = self.state.read().expect("stats memory lock");
            if state.off || state.applied.is_none() || state.keys.contains_key(&key) {
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
                warn!(video_id = %key.0, event_type = %key.1, %error, "loading a key's stats into memory failed; ClickHouse answers it");
            }
            memory.loading.lock().expect("loading lock").remove(&key);
        });
    }

    /// Loads a key, trying again while a compaction is ahead of the applied epoch.
    pub async fn load(&self, key: &Key) -> Result<(), QueryError> {
        for _ in 0..50 {
            if self.applied().is_some() {
                break;
            }
            tokio::time::sleep(self.config.poll).await;
        }
        for attempt in 0..LOAD_ATTEMPTS {
            let read_at = self.applied();
            match self.try_load(std::slice::from_ref(key), self.started.elapsed().as_secs()).await? {
                Some(busy) if !busy.is_empty() => {
                    self.stats.load_retries.inc();
                    tokio::time::sleep(retry_pause(attempt) + Duration::from_millis(rand::random_range(0..20))).await;
                    // The compaction it met was committed: the next read waits for the poll to
                    // move on (a slow poll under frequent compactions would otherwise meet one
                    // at every try; seen in CI with compactions every second).
                    for _ in 0..20 {
                        if self.applied() != read_at {
                            break;
                        }
                        tokio::time::sleep(self.config.poll).await;
                    }
                }
                _ => return Ok(()),
            }
        }
        Err(QueryError::Invalid(format!(
            "a compaction was ahead of the applied epoch during each of {LOAD_ATTEMPTS} reads"
        )))
    }

    /// The applied epoch and the generation, and the replica the last poll read if requests
    /// still go there (then what the poll applied is on it).
    fn snapshot(&self) -> Option<(u64, u64, ClickHouse)> {
        let (pinned, index) = self.clickhouse.pinned();
        let state = self.state.read().expect("stats memory lock");
        let applied = state.applied?;
        (state.replica == index && !state.off).then_some((applied, state.generation, pinned))
    }

    async fn sync(&self, clickhouse: &ClickHouse, tables: &[&str]) -> Result<(), QueryError> {
        let several =
            self.state.read().expect("stats memory lock").replicas != 1 || self.clickhouse.replica_count() != 1;
        self.syncing.sync(several, clickhouse, tables).await
    }

    /// Loads keys exactly as of the applied epoch (the module documentation has the argument),
    /// all with one read of the three tables; `used`: the last-use time they get (a warm-up's
    /// get 0: they leave before those requests asked for). Returns the keys a compaction past
    /// the applied epoch kept out (to try again after a poll), or `None` when the store was
    /// not ready or was emptied meanwhile.
    async fn try_load(&self, keys: &[Key], used: u64) -> Result<Option<Vec<Key>>, QueryError> {
        let Some((mut applied, generation, clickhouse)) = self.snapshot() else { return Ok(None) };
        // Every row of the epochs up to the applied one was acknowledged before its commit.
        self.sync(&clickhouse, &["stats_minute", "stats_hour", "stats_day"]).await?;
        let distinct = |part: fn(&Key) -> &str| -> Vec<&str> {
            keys.iter().map(part).collect::<std::collections::BTreeSet<_>>().into_iter().collect()
        };
        let videos = distinct(|key| key.0.as_str());
        let kinds = distinct(|key| key.1.as_str());
        let aggregates: Vec<&str> = keys
            .iter()
            .map(|key| self.registry.get(key.2).name())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        // One query for the three tables (`segment` is the grain's index), by the primary key.
        let parts: Vec<String> = TABLES
            .iter()
            .map(|(grain, table, bucket)| {
                format!(
                    "SELECT video_id, event_type, aggregate, state, toUInt32({grain}) AS segment, {bucket} AS bucket, \
                     epoch, compacted FROM {table} WHERE video_id IN (SELECT arrayJoin(?)) \
                     AND event_type IN (SELECT arrayJoin(?)) AND aggregate IN (SELECT arrayJoin(?)) \
                     AND (compacted = 1 OR epoch <= ?)"
                )
            })
            .collect();
        let sql = format!(
            "SELECT * FROM ({}) ORDER BY video_id, event_type, aggregate, segment, bucket, compacted DESC, epoch",
            parts.join(" UNION ALL ")
        );
        let mut query = clickhouse.client().query(&sql);
        for _ in TABLES {
            query = query.bind(&videos).bind(&kinds).bind(&aggregates).bind(applied);
        }
        let rows: Vec<KeyedState> = clickhouse.fetch_all(query).await?;
        let mut loaded: HashMap<Key, Held> = keys.iter().map(|key| (key.clone(), Held::new(key))).collect();
        let mut busy = Vec::new();
        for rows in rows
            .chunk_by(|a, b| (&a.video_id, &a.event_type, &a.aggregate) == (&b.video_id, &b.event_type, &b.aggregate))
        {
            let first = &rows[0];
            let Some(id) = self.registry.by_name(&first.aggregate) else { continue };
            let key = (first.video_id.clone(), first.event_type.clone(), id);
            let Some(held) = loaded.get_mut(&key) else { continue };
            if rows.iter().any(|row| row.compacted == 1 && row.epoch > applied) {
                loaded.remove(&key);
                busy.push(key);
                continue;
            }
            let aggregate = self.registry.get(id);
            let stored: Vec<StoredState> = rows.iter().map(KeyedState::stored).collect();
            let groups: Vec<&[StoredState]> =
                stored.chunk_by(|a, b| (a.segment, a.bucket) == (b.segment, b.bucket)).collect();
            // The emptied rows are read too: one without its compacted row (a replica that
            // ran the emptying before it fetched that row) would lose states for good.
            if groups.iter().any(|group| emptied_without_compaction(group)) {
                loaded.remove(&key);
                busy.push(key);
                continue;
            }
            for group in groups {
                for row in live_states(group) {
                    held.merge(aggregate, row.segment as usize, row.bucket, &self.decode(id, &row.state)?);
                }
            }
        }
        // The epochs the poll applied meanwhile, from the changelog, until it has not moved.
        loop {
            let now = {
                let state = self.state.read().expect("stats memory lock");
                match state.applied {
                    Some(now) if state.generation == generation => now,
                    _ => return Ok(None),
                }
            };
            if now != applied {
                self.sync(&clickhouse, &["stats_changes"]).await?;
                let query = clickhouse
                    .client()
                    .query(
                        "SELECT video_id, event_type, aggregate, toUInt32(minute) AS minute, state FROM stats_changes \
                         WHERE epoch > ? AND epoch <= ? AND video_id IN (SELECT arrayJoin(?)) ORDER BY epoch, minute",
                    )
                    .bind(applied)
                    .bind(now)
                    .bind(&videos);
                for change in clickhouse.fetch_all::<Change>(query).await? {
                    let Some(id) = self.registry.by_name(&change.aggregate) else { continue };
                    let Some(held) = loaded.get_mut(&(change.video_id, change.event_type, id)) else { continue };
                    held.add_minute(self.registry.get(id), change.minute, &self.decode(id, &change.state)?);
                }
                applied = now;
                continue;
            }
            let mut state = self.state.write().expect("stats memory lock");
            if state.generation != generation || state.applied != Some(applied) {
                continue;
            }
            for (key, held) in loaded {
                // A key over a quarter of the budget would push out everything else, then
                // itself, and load again at every request: ClickHouse answers it.
                if held.bytes > self.config.budget_bytes / 4 {
                    debug!(video_id = %key.0, event_type = %key.1, bytes = held.bytes, "a key too large for the stats memory budget");
                    continue;
                }
                if !state.keys.contains_key(&key) {
                    state.bytes += held.bytes;
                    state.keys.insert(key, Arc::new(Entry { used: AtomicU64::new(used), held: Mutex::new(held) }));
                    self.stats.loads.inc();
                }
            }
            self.evict(&mut state);
            return Ok(Some(busy));
        }
    }

    /// Loads keys before they are asked for: every (video, event type, aggregate) of
    /// `stats_day`, the most recently counted first, [`WARM_KEYS`] at a time, until they take
    /// nine tenths of the budget or the store is emptied. Returns whether it ran to its end.
    pub async fn warm_up(&self, generation: u64) -> Result<bool, QueryError> {
        let started = Instant::now();
        let clickhouse = self.clickhouse.with_request_timeout(WARM_TIMEOUT);
        #[derive(Row, Deserialize)]
        struct Counted {
            video_id: String,
            event_type: String,
            aggregate: String,
        }
        let counted: Vec<Counted> = clickhouse
            .fetch_all(
                clickhouse
                    .client()
                    .query(
                        "SELECT video_id, event_type, aggregate FROM stats_day GROUP BY video_id, event_type, aggregate \
                         ORDER BY max(day) DESC, sum(count) DESC, video_id, event_type, aggregate LIMIT ?",
                    )
                    // No more than the budget could hold at a kilobyte a key.
                    .bind((self.config.budget_bytes / 1024) as u64),
            )
            .await?;
        let keys: Vec<Key> = counted
            .into_iter()
            .filter_map(|c| self.registry.by_name(&c.aggregate).map(|id| (c.video_id, c.event_type, id)))
            .collect();
        let (total, mut installed, mut left) = (keys.len(), 0, 0);
        let limit = self.config.budget_bytes / 10 * WARM_TENTHS;
        for batch in keys.chunks(WARM_KEYS) {
            let mut batch: Vec<Key> = {
                let state = self.state.read().expect("stats memory lock");
                if state.generation != generation {
                    info!("stats memory warm-up stopped: the store was emptied (a new warm-up follows)");
                    return Ok(false);
                }
                if state.bytes > limit {
                    break;
                }
                batch.iter().filter(|key| !state.keys.contains_key(*key)).cloned().collect()
            };
            for attempt in 0..LOAD_ATTEMPTS {
                if batch.is_empty() {
                    break;
                }
                if attempt > 0 {
                    self.stats.load_retries.inc();
                    tokio::time::sleep(retry_pause(attempt)).await;
                }
                let before = batch.len();
                let Some(busy) = self.try_load(&batch, 0).await? else { return Ok(false) };
                installed += before - busy.len();
                batch = busy;
            }
            left += batch.len();
        }
        let seconds = started.elapsed().as_secs_f64();
        {
            let state = self.state.read().expect("stats memory lock");
            if state.generation != generation {
                return Ok(false);
            }
            self.stats.warm_up_seconds.set(seconds);
            self.stats.warm_up_keys.set(installed as i64);
        }
        info!(
            keys = installed,
            of = total,
            left_to_requests = left,
            mib = self.bytes() >> 20,
            seconds = format!("{seconds:.1}"),
            "stats memory warm-up done"
        );
        Ok(true)
    }

    fn decode(&self, aggregate: AggregateId, bytes: &[u8]) -> Result<State, QueryError> {
        self.registry.get(aggregate).decode(bytes).map_err(|e| QueryError::Corrupt(e.to_string()))
    }

    fn evict(&self, state: &mut StatsState) {
        while state.bytes > self.config.budget_bytes && !state.keys.is_empty() {
            let oldest = state
                .keys
                .iter()
                .min_by_key(|(_, entry)| entry.used.load(Ordering::Relaxed))
                .map(|(key, _)| key.clone())
                .expect("not empty");
            if let Some(entry) = state.keys.remove(&oldest) {
                state.bytes -= entry.held.lock().expect("stats key lock").bytes;
                self.stats.evictions.inc();
            }
        }
    }

    /// Reads the committed epoch, applies the epochs committed since the last poll.
    pub async fn poll(&self) -> Result<(), QueryError> {
        let (clickhouse, replica) = self.clickhouse.pinned();
        let query = clickhouse
            .client()
            .query(
                "SELECT (SELECT count() FROM checkpoint_commits WHERE job = ?) AS commits, \
                 (SELECT toUInt64(max(epoch)) FROM checkpoint_commits WHERE job = ?) AS committed, \
                 (SELECT toUInt64(max(total_replicas)) FROM system.replicas WHERE database = currentDatabase()) AS replicas",
            )
            .bind(&self.config.job)
            .bind(&self.config.job);
        let polled: Vec<Poll> = clickhouse.fetch_all(query).await?;
        let Some(Poll { commits, committed, replicas }) = polled.into_iter().next() else {
            return Err(QueryError::Corrupt("the poll query answered no row".into()));
        };
        if commits == 0 {
            // No commit (yet, or another --stats-job-name, or no event_stats at all): memory
            // would answer "nothing" for every key. It holds nothing, and ClickHouse answers.
            let mut state = self.state.write().expect("stats memory lock");
            if state.applied.is_some() || state.polled.is_some() || !self.waiting_logged.swap(true, Ordering::Relaxed) {
                info!(job = %self.config.job, "the stats job has committed no epoch in this database: stats read ClickHouse");
            }
            state.clear();
            if state.applied.take().is_some() {
                state.generation += 1;
            }
            state.polled = None;
            return Ok(());
        }
        if replicas == 0 {
            return Err(QueryError::Store(SinkError::Unavailable(
                "this ClickHouse replica has no ZooKeeper session (system.replicas shows no replica)".into(),
            )));
        }
        if replicas > 1 && self.clickhouse.replica_count() < 2 {
            // One URL before several replicas may be a balancer (see memory.rs).
            let mut state = self.state.write().expect("stats memory lock");
            state.off = true;
            state.clear();
            state.applied = None;
            state.generation += 1;
            state.polled = None;
            return Ok(());
        }
        {
            let mut state = self.state.write().expect("stats memory lock");
            state.replicas = replicas;
            state.replica = replica;
        }
        let applied = {
            let state = self.state.read().expect("stats memory lock");
            let away = state.polled.is_none_or(|at| at.elapsed() > AWAY_LIMIT);
            state.applied.filter(|&applied| committed >= applied && !away)
        };
        let Some(applied) = applied else {
            let mut state = self.state.write().expect("stats memory lock");
            if state.applied.is_some() {
                info!(committed, "event_stats' commits went back, or polls failed too long: stats memory emptied");
            }
            state.clear();
            self.stats.warm_up_seconds.set(-1.0);
            state.applied = Some(committed);
            state.generation += 1;
            state.off = false;
            state.polled = Some(Instant::now());
            return Ok(());
        };
        let mut rows: Vec<Change> = Vec::new();
        if committed > applied {
            // Every block of the epochs up to the commit seen was acknowledged before it.
            self.sync(&clickhouse, &["stats_changes"]).await?;
            let query = clickhouse
                .client()
                .query(
                    "SELECT video_id, event_type, aggregate, toUInt32(minute) AS minute, state FROM stats_changes \
                     WHERE epoch > ? AND epoch <= ? ORDER BY epoch, video_id, event_type, aggregate, minute",
                )
                .bind(applied)
                .bind(committed);
            rows = clickhouse.fetch_all(query).await?;
        }
        // The rows of the keys held now are decoded outside the lock; a key installed in the
        // meantime (as of `applied`: the poll has not moved it yet) gets its rows decoded under
        // the lock below, or it would miss these epochs for good (found by review).
        let held: HashSet<Key> = if rows.is_empty() {
            HashSet::new()
        } else {
            self.state.read().expect("stats memory lock").keys.keys().cloned().collect()
        };
        let key_of = |row: &Change| {
            self.registry.by_name(&row.aggregate).map(|id| (row.video_id.clone(), row.event_type.clone(), id))
        };
        let mut decoded: Vec<Option<State>> = Vec::with_capacity(rows.len());
        for row in &rows {
            let state = match key_of(row) {
                Some(key) if held.contains(&key) => Some(self.decode(key.2, &row.state)?),
                _ => None,
            };
            decoded.push(state);
        }
        let mut state = self.state.write().expect("stats memory lock");
        if state.applied != Some(applied) {
            return Ok(());
        }
        let StatsState { keys, bytes, .. } = &mut *state;
        // Every decode before the first merge: an error leaves the keys as they were (the next
        // poll applies the same epochs again).
        for (row, change) in rows.iter().zip(decoded.iter_mut()) {
            if change.is_none()
                && let Some(key) = key_of(row)
                && keys.contains_key(&key)
            {
                *change = Some(self.decode(key.2, &row.state)?);
            }
        }
        for (row, change) in rows.iter().zip(decoded) {
            let Some(key) = key_of(row) else { continue };
            // A key evicted meanwhile is loaded again when asked for.
            let (Some(entry), Some(change)) = (keys.get(&key), change) else { continue };
            let mut held = entry.held.lock().expect("stats key lock");
            let before = held.bytes;
            held.add_minute(self.registry.get(key.2), row.minute, &change);
            *bytes = *bytes - before + held.bytes;
        }
        if committed > applied {
            self.stats.applies.inc();
        }
        state.applied = Some(committed);
        state.polled = Some(Instant::now());
        self.evict(&mut state);
        Ok(())
    }

    /// Polls every `poll` for ever; logs failures (memory stops answering until a poll works).
    pub async fn run(self: Arc<Self>) {
        let mut every = ticker(self.config.poll);
        let mut log = PollLog::new(
            "reading event_stats' committed epoch failed; stats read ClickHouse until it works",
            "stats memory polls work again",
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
                let state = self.state.read().expect("stats memory lock");
                (self.config.warm_up && state.applied.is_some() && !state.off).then_some(state.generation)
            };
            let Some(generation) = ready else { continue };
            let (memory, errors) = (self.clone(), self.stats.load_errors.clone());
            warm_ups.start(generation, async move { memory.warm_up(generation).await }, move |error| {
                errors.inc();
                warn!(%error, "the stats memory warm-up failed; keys load when first asked for, and it starts again in 30 s");
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use videocount_aggregates::Sample;

    #[test]
    fn a_minute_merges_into_its_minute_hour_and_day_and_each_bucket_counts_what_it_takes() {
        let registry = Registry::builtin();
        let id = registry.by_name("moments").unwrap();
        let aggregate = registry.get(id);
        let key = ("v".to_owned(), "view".to_owned(), id);
        let mut held = Held::new(&key);
        assert_eq!(held.bytes, KEY_OVERHEAD + 5, "a key without data counts too");
        let mut state = aggregate.create();
        aggregate.update(&mut state, Sample { value: Some(2.0), viewer_id: None });
        let minute = 86_400 * 3 + 3600 * 5 + 60 * 7;
        held.add_minute(aggregate, minute, &state);
        held.add_minute(aggregate, minute + 60, &state);
        assert_eq!(held.grains[0].keys().copied().collect::<Vec<_>>(), [minute, minute + 60]);
        assert_eq!(held.grains[1].keys().copied().collect::<Vec<_>>(), [86_400 * 3 + 3600 * 5]);
        assert_eq!(held.grains[2].keys().copied().collect::<Vec<_>>(), [86_400 * 3]);
        assert_eq!(aggregate.finish(&held.grains[2][&(86_400 * 3)].state, "sum"), Some(4.0));
        // Four buckets of one moments state each (merging does not grow it).
        let bucket = aggregate.heap_bytes(&state) + BUCKET_OVERHEAD;
        assert_eq!(held.bytes, KEY_OVERHEAD + 5 + 4 * bucket);
        // A quantile sketch is counted by its bins, not its (sparse) encoding.
        let quantiles = registry.get(registry.by_name("quantiles").unwrap());
        let mut sketch = quantiles.create();
        for i in 1..=400 {
            quantiles.update(&mut sketch, Sample { value: Some(f64::from(i) * 2.5), viewer_id: None });
        }
        assert!(quantiles.heap_bytes(&sketch) > 4 * quantiles.encode(&sketch).len());
    }
}
