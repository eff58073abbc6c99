//! The hot cache: the minute counts of recent hours for the keys people ask about, kept fresh
//! by a background refresh, so that a range ending now reads its recent part from memory.
//!
//! - The cache covers minutes from its *horizon* (the start of the hour `window` hours before
//!   the current one) onwards. A range's minutes before the horizon come from ClickHouse.
//! - A key (video, event type) enters on its first query, with one indexed read of its recent
//!   minutes, and leaves when nobody asked for it for `idle`. At most `max_keys` keys.
//! - Every `refresh` the minutes of every cached key are read again, 500 keys a query. If the
//!   last refresh that worked is older than 3 refresh periods (ClickHouse down), the cache
//!   answers nothing and queries go to ClickHouse, which answers or fails: a stale cache never
//!   answers silently.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clickhouse::Row;
use prometheus_client::metrics::counter::Counter;
use serde::Deserialize;
use tracing::warn;
use videocount_clickhouse::ClickHouse;
use videocount_events::clock::now_secs;
use videocount_query::QueryError;

/// Keys per refresh query.
const REFRESH_CHUNK: usize = 500;

#[derive(Clone, Debug)]
pub struct HotConfig {
    /// Whole hours before the current one that the cache holds.
    pub window_hours: u64,
    pub refresh: Duration,
    pub idle: Duration,
    pub max_keys: usize,
}

impl Default for HotConfig {
    fn default() -> Self {
        HotConfig { window_hours: 2, refresh: Duration::from_secs(1), idle: Duration::from_secs(600), max_keys: 1_000 }
    }
}

type Key = (String, String);

struct Entry {
    /// Minute start (epoch seconds) to count.
    minutes: BTreeMap<u64, u64>,
    /// When it was last asked for, seconds since the cache started.
    used: AtomicU64,
}

struct Snapshot {
    horizon_s: u64,
    refreshed: Option<Instant>,
    keys: HashMap<Key, Entry>,
}

/// Counters the service exports (`/metrics`).
#[derive(Default, Debug, Clone)]
pub struct HotStats {
    /// Queries whose recent minutes came from memory.
    pub hits: Counter,
    /// Queries that found their key missing (loaded, or read from ClickHouse).
    pub misses: Counter,
    pub refreshes: Counter,
    pub refresh_errors: Counter,
}

pub struct HotCache {
    clickhouse: ClickHouse,
    config: HotConfig,
    started: Instant,
    state: RwLock<Snapshot>,
    pub stats: HotStats,
}

#[derive(Row, Deserialize)]
struct MinuteRow {
    video_id: String,
    event_type: String,
    minute: u64,
    total: u64,
}

impl HotCache {
    pub fn new(clickhouse: ClickHouse, config: HotConfig, stats: HotStats) -> HotCache {
        let horizon_s = Self::horizon_at(u64::from(now_secs()), config.window_hours);
        HotCache {
            clickhouse,
            config,
            started: Instant::now(),
            state: RwLock::new(Snapshot { horizon_s, refreshed: None, keys: HashMap::new() }),
            stats,
        }
    }

    fn horizon_at(now_s: u64, window_hours: u64) -> u64 {
        (now_s / 3600).saturating_sub(window_hours) * 3600
    }

    fn fresh(&self, snapshot: &Snapshot) -> bool {
        snapshot.refreshed.is_some_and(|at| at.elapsed() <= self.config.refresh * 3)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.state.read().expect("hot cache lock").keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Seconds since the last refresh that worked (`None` before the first).
    pub fn age(&self) -> Option<Duration> {
        self.state.read().expect("hot cache lock").refreshed.map(|at| at.elapsed())
    }

    /// The current horizon: minutes from here on may be served from memory.
    pub fn horizon_s(&self) -> u64 {
        self.state.read().expect("hot cache lock").horizon_s
    }

    /// The count of the key's minutes in `[max(start_s, horizon), end_s)` and the horizon it
    /// used, when the cache holds the key and is fresh.
    fn lookup(&self, video_id: &str, event_type: &str, start_s: u64, end_s: u64) -> Option<(u64, u64)> {
        let snapshot = self.state.read().expect("hot cache lock");
        if !self.fresh(&snapshot) {
            return None;
        }
        let entry = snapshot.keys.get(&(video_id.to_owned(), event_type.to_owned()))?;
        entry.used.store(self.started.elapsed().as_secs(), Ordering::Relaxed);
        let from = start_s.max(snapshot.horizon_s);
        let total = if from < end_s { entry.minutes.range(from..end_s).map(|(_, n)| n).sum() } else { 0 };
        Some((snapshot.horizon_s, total))
    }

    /// As [`lookup`](Self::lookup), loading the key first when it is missing. `None` when the
    /// cache is stale or full: the caller reads ClickHouse.
    pub async fn count(
        &self,
        video_id: &str,
        event_type: &str,
        start_s: u64,
        end_s: u64,
    ) -> Result<Option<(u64, u64)>, QueryError> {
        if let Some(found) = self.lookup(video_id, event_type, start_s, end_s) {
            self.stats.hits.inc();
            return Ok(Some(found));
        }
        self.stats.misses.inc();
        {
            let snapshot = self.state.read().expect("hot cache lock");
            if !self.fresh(&snapshot) || snapshot.keys.len() >= self.config.max_keys {
                return Ok(None);
            }
        }
        let key = (video_id.to_owned(), event_type.to_owned());
        let horizon_s = self.horizon_s();
        let rows = self.read(std::slice::from_ref(&key), horizon_s).await?;
        let minutes = rows.into_iter().filter(|r| r.event_type == key.1).map(|r| (r.minute, r.total)).collect();
        {
            let mut snapshot = self.state.write().expect("hot cache lock");
            // A refresh may have moved the horizon meanwhile: this read then lacks nothing the
            // new horizon needs (the horizon only moves forward).
            if snapshot.horizon_s >= horizon_s && snapshot.keys.len() < self.config.max_keys {
                let used = AtomicU64::new(self.started.elapsed().as_secs());
                snapshot.keys.entry(key).or_insert(Entry { minutes, used });
            }
        }
        Ok(self.lookup(video_id, event_type, start_s, end_s))
    }

    /// The minute counts of `keys` from `horizon_s` on (and of other pairs of their videos
    /// and event types, which the callers skip).
    async fn read(&self, keys: &[Key], horizon_s: u64) -> Result<Vec<MinuteRow>, QueryError> {
        let mut videos: Vec<&str> = keys.iter().map(|(v, _)| v.as_str()).collect();
        let mut types: Vec<&str> = keys.iter().map(|(_, t)| t.as_str()).collect();
        videos.sort_unstable();
        videos.dedup();
        types.sort_unstable();
        types.dedup();
        let marks = |n: usize| vec!["?"; n].join(", ");
        let sql = format!(
            "SELECT video_id, event_type, toUInt64(toUInt32(minute)) AS minute, toUInt64(sum(count)) AS total \
             FROM event_counts_minute WHERE video_id IN ({}) AND event_type IN ({}) \
             AND minute >= toDateTime(?, 'UTC') GROUP BY video_id, event_type, minute",
            marks(videos.len()),
            marks(types.len())
        );
        let mut query = self.clickhouse.client().query(&sql);
        for value in videos.into_iter().chain(types) {
            query = query.bind(value);
        }
        Ok(self.clickhouse.fetch_all(query.bind(horizon_s)).await?)
    }

    /// Reads every cached key again and moves the horizon; drops idle keys.
    pub async fn refresh(&self) -> Result<(), QueryError> {
        let horizon_s = Self::horizon_at(u64::from(now_secs()), self.config.window_hours);
        let idle_before = self.started.elapsed().as_secs().saturating_sub(self.config.idle.as_secs());
        let keys: Vec<Key> = {
            let mut snapshot = self.state.write().expect("hot cache lock");
            snapshot.keys.retain(|_, entry| entry.used.load(Ordering::Relaxed) >= idle_before);
            snapshot.keys.keys().cloned().collect()
        };
        let mut fresh: HashMap<Key, BTreeMap<u64, u64>> =
            keys.iter().map(|key| (key.clone(), BTreeMap::new())).collect();
        for chunk in keys.chunks(REFRESH_CHUNK) {
            for row in self.read(chunk, horizon_s).await? {
                if let Some(minutes) = fresh.get_mut(&(row.video_id, row.event_type)) {
                    minutes.insert(row.minute, row.total);
                }
            }
        }
        let mut snapshot = self.state.write().expect("hot cache lock");
        snapshot.horizon_s = horizon_s;
        snapshot.refreshed = Some(Instant::now());
        // Keys loaded during this refresh keep what they loaded (read at an older or the same
        // horizon: a superset of what the new horizon needs).
        for (key, minutes) in fresh {
            if let Some(entry) = snapshot.keys.get_mut(&key) {
                entry.minutes = minutes;
            }
        }
        Ok(())
    }

    /// Refreshes every `refresh` for ever; logs failures (the cache goes stale and stops
    /// answering until a refresh works again).
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut every = tokio::time::interval(self.config.refresh);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            every.tick().await;
            match self.refresh().await {
                Ok(()) => {
                    self.stats.refreshes.inc();
                    if failing {
                        tracing::info!("hot cache refresh works again");
                        failing = false;
                    }
                }
                Err(error) => {
                    self.stats.refresh_errors.inc();
                    if !failing {
                        warn!(%error, "hot cache refresh failed; queries read ClickHouse until it works");
                        failing = true;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_horizon_is_a_whole_hour_window_hours_back() {
        // 2026-11-27T10:17:00Z
        let now = 1_795_774_620;
        assert_eq!(HotCache::horizon_at(now, 2), 1_795_766_400); // 08:00
        assert_eq!(HotCache::horizon_at(now, 0), 1_795_773_600); // 10:00
    }
}
