//! The top lists `view_counts` keeps (`top_videos`), held in memory: `/v1/top?window=` answers
//! without a query.
//!
//! Every poll reads the job's newest committed epoch `C` and the lists written in the epochs
//! after the last poll's `C` up to this one's (an indexed read: the table is sorted by epoch);
//! per (event type, window) the newest epoch's list replaces the one held. An epoch's rows are
//! all written before its commit, so a list read at or below `C` is whole. The first poll reads
//! each list's newest epoch at or below `C` first. A restarted job may write a list twice in one
//! epoch, identical: one row per rank is kept.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;
use std::time::{Duration, Instant};

use clickhouse::Row;
use serde::Deserialize;
use tracing::info;
use videocount_clickhouse::ClickHouse;
use videocount_query::QueryError;

/// A list's videos and counts by rank.
type Ranked = BTreeMap<u32, (String, u64)>;

/// One list as of an epoch.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TopList {
    pub epoch: u64,
    pub from_ms: u64,
    pub to_ms: u64,
    /// Video and count, most counted first.
    pub videos: Vec<(String, u64)>,
}

#[derive(Default)]
struct State {
    /// The committed epoch the lists are read up to; `None` before the first poll.
    read_to: Option<u64>,
    polled: Option<Instant>,
    /// (event type, window) -> list.
    lists: HashMap<(String, String), TopList>,
}

pub struct Trending {
    clickhouse: ClickHouse,
    job: String,
    poll: Duration,
    state: RwLock<State>,
}

#[derive(Row, Deserialize)]
struct Committed {
    newest: u64,
}

#[derive(Row, Deserialize)]
struct Newest {
    event_type: String,
    period: String,
    newest: u64,
}

#[derive(Row, Deserialize)]
struct TopRow {
    epoch: u64,
    event_type: String,
    period: String,
    rank: u32,
    video_id: String,
    count: u64,
    from_ms: u64,
    to_ms: u64,
}

/// What `/v1/top?window=` can say.
pub enum Answer {
    /// The list, or `None` when no event of the type reached the window yet (then the window of
    /// another list, if any).
    List(Option<TopList>, Option<(u64, u64)>),
    /// No poll worked recently.
    Unavailable(String),
}

impl Trending {
    pub fn new(clickhouse: ClickHouse, job: String, poll: Duration) -> Trending {
        Trending { clickhouse, job, poll, state: RwLock::new(State::default()) }
    }

    /// The list of `event_type` over `window` (`1h` or `24h`), at most `limit` videos.
    pub fn top(&self, event_type: &str, window: &str, limit: usize) -> Answer {
        let state = self.state.read().expect("trending lock");
        let fresh = state.polled.is_some_and(|at| at.elapsed() <= self.poll * 3 + Duration::from_millis(500));
        if !fresh {
            return Answer::Unavailable(format!(
                "the top lists of {} are not readable (top_videos: is view_counts running with trending on, and its \
                 schema applied?)",
                self.job
            ));
        }
        let list = state.lists.get(&(event_type.to_owned(), window.to_owned())).cloned().map(|mut list| {
            list.videos.truncate(limit);
            list
        });
        let other = state.lists.iter().filter(|((_, w), _)| w == window).map(|(_, l)| (l.from_ms, l.to_ms)).max();
        Answer::List(list, other)
    }

    pub async fn poll(&self) -> Result<(), QueryError> {
        let client = self.clickhouse.client();
        let committed: Vec<Committed> = self
            .clickhouse
            .fetch_all(
                client
                    .query("SELECT toUInt64(max(epoch)) AS newest FROM checkpoint_commits WHERE job = ?")
                    .bind(&self.job),
            )
            .await?;
        let committed = committed.first().map_or(0, |c| c.newest);
        let read_to = self.state.read().expect("trending lock").read_to;
        let rows: Vec<TopRow> = match read_to {
            Some(read_to) if read_to <= committed => {
                if read_to == committed {
                    Vec::new()
                } else {
                    self.rows(&format!("epoch > {read_to} AND epoch <= {committed}")).await?
                }
            }
            _ => {
                // The first poll, or the commits went back (a new database, a replay): read
                // each list's newest epoch.
                let newest: Vec<Newest> = self
                    .clickhouse
                    .fetch_all(
                        client
                            .query(
                                "SELECT event_type, period, toUInt64(max(epoch)) AS newest FROM top_videos \
                                 WHERE epoch <= ? GROUP BY event_type, period",
                            )
                            .bind(committed),
                    )
                    .await?;
                let mut epochs: Vec<u64> = newest.iter().map(|n| n.newest).collect();
                epochs.sort_unstable();
                epochs.dedup();
                let mut rows = Vec::new();
                if !epochs.is_empty() {
                    let list = epochs.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
                    rows = self.rows(&format!("epoch IN ({list})")).await?;
                    rows.retain(|r| {
                        newest
                            .iter()
                            .any(|n| n.newest == r.epoch && n.event_type == r.event_type && n.period == r.period)
                    });
                }
                if read_to.is_some() {
                    info!(committed, "the commits went back: the top lists are read again");
                }
                let mut state = self.state.write().expect("trending lock");
                state.lists.clear();
                state.read_to = None;
                drop(state);
                rows
            }
        };
        // Per list, the newest epoch read and its videos by rank (a list written twice in one
        // epoch is the same list).
        let mut newest: BTreeMap<(String, String), (TopList, Ranked)> = BTreeMap::new();
        for row in rows {
            let fresh = || TopList { epoch: row.epoch, from_ms: row.from_ms, to_ms: row.to_ms, videos: Vec::new() };
            let (list, ranks) =
                newest.entry((row.event_type.clone(), row.period.clone())).or_insert_with(|| (fresh(), Ranked::new()));
            if row.epoch > list.epoch {
                *list = fresh();
                ranks.clear();
            }
            if row.epoch == list.epoch && row.rank > 0 {
                ranks.insert(row.rank, (row.video_id, row.count));
            }
        }
        let mut state = self.state.write().expect("trending lock");
        for (key, (mut list, ranks)) in newest {
            list.videos = ranks.into_values().collect();
            state.lists.insert(key, list);
        }
        state.read_to = Some(committed);
        state.polled = Some(Instant::now());
        Ok(())
    }

    async fn rows(&self, condition: &str) -> Result<Vec<TopRow>, QueryError> {
        let sql = format!(
            "SELECT epoch, event_type, period, rank, video_id, count, from_ms, to_ms FROM top_videos WHERE {condition}"
        );
        Ok(self.clickhouse.fetch_all(self.clickhouse.client().query(&sql)).await?)
    }

    /// Polls for ever; logs failures (the lists answer 503 until a poll works).
    pub async fn run(self: std::sync::Arc<Self>) {
        let mut every = crate::memory::ticker(self.poll);
        let mut log = crate::memory::PollLog::new(
            "reading the top lists failed; /v1/top?window= answers 503 until it works",
            "top list polls work again",
        );
        loop {
            every.tick().await;
            log.note(self.poll().await);
        }
    }
}
