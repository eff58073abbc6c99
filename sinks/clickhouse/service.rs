//! Requests to ClickHouse over HTTP, and which failures are worth retrying.

use std::time::Duration;

use bytes::Bytes;
use clickhouse::Client;

use crate::config::ClickHouseConfig;

/// A failed request, classified by whether trying again can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The server was unreachable, slow or temporarily unable (too many parts, ZooKeeper
    /// session lost, ...): the same request may succeed later.
    #[error("ClickHouse is unavailable: {0}")]
    Unavailable(String),
    /// The server refused the request itself (unknown table, wrong types, bad SQL): retrying
    /// the same request cannot succeed.
    #[error("ClickHouse rejected the request: {0}")]
    Rejected(String),
    /// The job lost its lease (videocount-lease): the request was not sent and must not be.
    #[error("not written: {0}")]
    Fenced(String),
}

impl SinkError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, SinkError::Unavailable(_))
    }
}

/// Server error codes that describe a passing condition rather than a bad request.
const RETRYABLE_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE
    159, // TIMEOUT_EXCEEDED
    164, // READONLY
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    225, // NO_ZOOKEEPER
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    319, // UNKNOWN_STATUS_OF_INSERT
    999, // KEEPER_EXCEPTION
];

/// The `Code: N` of a server error message.
fn server_code(message: &str) -> Option<u32> {
    let rest = &message[message.find("Code: ")? + 6..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Classifies an error of the `clickhouse` crate.
pub fn classify(error: clickhouse::error::Error) -> SinkError {
    use clickhouse::error::Error;
    match error {
        Error::Network(_) | Error::TimedOut => SinkError::Unavailable(error.to_string()),
        Error::BadResponse(message) => match server_code(&message) {
            Some(code) if RETRYABLE_CODES.contains(&code) => SinkError::Unavailable(message),
            // A proxy or an overloaded server may answer without a ClickHouse error body.
            None => SinkError::Unavailable(message),
            Some(_) => SinkError::Rejected(message),
        },
        other => SinkError::Rejected(other.to_string()),
    }
}

/// A handle to one ClickHouse database, on one server or on any of its replicas. Cheap to
/// clone (clones share which replica is in use).
///
/// With several endpoints, requests go to one replica; a request that finds it unavailable
/// moves every later request to the next (the caller retries, as the writer does: a block
/// retried on another replica is deduplicated by the replication log they share).
#[derive(Clone)]
pub struct ClickHouse {
    replicas: std::sync::Arc<Vec<Client>>,
    current: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    config: ClickHouseConfig,
    /// Requests of this handle (and its clones) in flight at once, when bounded.
    permits: Option<std::sync::Arc<tokio::sync::Semaphore>>,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse").field("url", &self.config.url).field("database", &self.config.database).finish()
    }
}

impl ClickHouse {
    pub fn new(config: ClickHouseConfig) -> Self {
        ClickHouse {
            replicas: std::sync::Arc::new(Self::clients(&config)),
            current: Default::default(),
            config,
            permits: None,
        }
    }

    /// Another handle on the same replicas (sharing which one is in use) with `config`.
    fn derive(&self, config: ClickHouseConfig) -> ClickHouse {
        ClickHouse {
            replicas: std::sync::Arc::new(Self::clients(&config)),
            current: std::sync::Arc::clone(&self.current),
            config,
            permits: self.permits.clone(),
        }
    }

    /// The same handle with at most `requests` of its requests (its clones' included) in
    /// flight at once; the others wait for a turn within their request timeout. A service
    /// bounds its request path so that ClickHouse does not slow down for everything else it
    /// asks (another handle, unbounded, keeps its own pace).
    pub fn with_concurrency(&self, requests: usize) -> ClickHouse {
        ClickHouse { permits: Some(std::sync::Arc::new(tokio::sync::Semaphore::new(requests.max(1)))), ..self.clone() }
    }

    fn clients(config: &ClickHouseConfig) -> Vec<Client> {
        let urls = config.urls();
        let urls = if urls.is_empty() { vec![config.url.as_str()] } else { urls };
        urls.into_iter()
            .map(|url| {
                let mut client = Client::default()
                    .with_url(url)
                    .with_database(&config.database)
                    // Validation asks the server for a format and a setting that 18.16 lacks.
                    .with_validation(false)
                    // 18.16 answers a SELECT with an empty body when the client asks for LZ4.
                    .with_compression(clickhouse::Compression::None);
                if let Some(user) = &config.user {
                    client = client.with_user(user);
                }
                if let Some(password) = &config.password {
                    client = client.with_password(password);
                }
                client
            })
            .collect()
    }

    /// The index of the replica requests go to now.
    fn replica(&self) -> usize {
        self.current.load(std::sync::atomic::Ordering::Relaxed) % self.replicas.len()
    }

    /// After a request to replica `used` failed: unavailable means the next requests go to the
    /// next replica (once per failure, however many requests saw it).
    fn after<T>(&self, used: usize, result: Result<T, SinkError>) -> Result<T, SinkError> {
        if let Err(SinkError::Unavailable(_)) = &result
            && self.replicas.len() > 1
        {
            let next = (used + 1) % self.replicas.len();
            let _ = self.current.compare_exchange(
                used,
                next,
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        result
    }

    pub fn config(&self) -> &ClickHouseConfig {
        &self.config
    }

    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// The same server, another database.
    pub fn with_database(&self, database: &str) -> ClickHouse {
        self.derive(ClickHouseConfig { database: database.into(), ..self.config.clone() })
    }

    /// The same server and database, waiting up to `timeout` for each answer (a long
    /// `INSERT ... SELECT`, such as a replay's).
    pub fn with_request_timeout(&self, timeout: Duration) -> ClickHouse {
        self.derive(ClickHouseConfig { request_timeout: timeout, ..self.config.clone() })
    }

    /// The same handle with a ClickHouse setting sent on every request (e.g. `max_threads`).
    pub fn with_setting(&self, name: &str, value: &str) -> ClickHouse {
        let replicas = self.replicas.iter().map(|c| c.clone().with_setting(name, value)).collect();
        ClickHouse {
            replicas: std::sync::Arc::new(replicas),
            current: std::sync::Arc::clone(&self.current),
            config: self.config.clone(),
            permits: self.permits.clone(),
        }
    }

    /// The client of the replica in use, for typed queries (`query(..).bind(..)`, then
    /// [`ClickHouse::fetch_all`] or [`ClickHouse::execute_query`]).
    pub fn client(&self) -> &Client {
        &self.replicas[self.replica()]
    }

    fn timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// Inserts one native-format block into `table`.
    pub async fn insert_native(&self, table: &str, body: Bytes) -> Result<(), SinkError> {
        let used = self.replica();
        let result = async {
            let mut insert = self.replicas[used]
                .insert_formatted_with(format!("INSERT INTO {table} FORMAT Native"))
                .with_timeouts(Some(self.timeout()), Some(self.timeout()));
            insert.send(body).await.map_err(classify)?;
            insert.end().await.map_err(classify)
        }
        .await;
        self.after(used, result)
    }

    /// Runs a statement that returns nothing.
    pub async fn execute(&self, sql: &str) -> Result<(), SinkError> {
        let used = self.replica();
        self.bounded(used, self.replicas[used].query(sql).execute()).await
    }

    /// Runs a statement with bound values that returns nothing.
    pub async fn execute_query(&self, query: clickhouse::query::Query) -> Result<(), SinkError> {
        self.bounded(self.replica(), query.execute()).await
    }

    /// Fetches typed rows, with the request timeout.
    pub async fn fetch_all<T>(&self, query: clickhouse::query::Query) -> Result<Vec<T>, SinkError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.bounded(self.replica(), query.fetch_all::<T>()).await
    }

    /// A request to replica `used` within the request timeout, its error classified, and the
    /// handle moved on if the replica was unavailable.
    async fn bounded<T>(
        &self,
        used: usize,
        request: impl Future<Output = Result<T, clickhouse::error::Error>>,
    ) -> Result<T, SinkError> {
        let request = async {
            let _turn = match &self.permits {
                Some(permits) => Some(permits.acquire().await.expect("the semaphore is never closed")),
                None => None,
            };
            request.await
        };
        let result = tokio::time::timeout(self.timeout(), request)
            .await
            .map_err(|_| SinkError::Unavailable(format!("no answer within {:?}", self.timeout())))
            .and_then(|r| r.map_err(classify));
        self.after(used, result)
    }

    /// Waits until the replica in use has every part the other replicas acknowledged before
    /// this call for each of `tables` (`SYSTEM SYNC REPLICA`, which waits for the replica's
    /// whole queue): what a start or a compaction round reads must include everything written
    /// through another replica. Also with one endpoint (a load balancer may hide replicas; on a
    /// lone server it returns at once). A replica that cannot sync (read-only, no ZooKeeper)
    /// moves the handle to the next one, which is tried in turn. ClickHouse 18.16 answers OK,
    /// without having synced, once its `receive_timeout` passed: that is raised far above the
    /// request's own limit, so a sync that takes too long is an error here, never a silent OK.
    pub async fn sync_replica(&self, tables: &[&str]) -> Result<(), SinkError> {
        self.sync_replica_within(tables, Duration::from_secs(120)).await
    }

    /// As [`ClickHouse::sync_replica`], failing after `limit` for each table.
    pub async fn sync_replica_within(&self, tables: &[&str], limit: Duration) -> Result<(), SinkError> {
        let mut result = Ok(());
        for _ in 0..self.replicas.len() {
            let syncing = self.with_request_timeout(limit).with_setting("receive_timeout", "86400");
            result = async {
                for table in tables {
                    syncing.execute(&format!("SYSTEM SYNC REPLICA {table}")).await?;
                }
                Ok(())
            }
            .await;
            if !matches!(result, Err(SinkError::Unavailable(_))) {
                break;
            }
        }
        result
    }

    /// A handle on the replica in use now, and on it alone (a failure does not move it to
    /// another), with that replica's index: for a sequence of reads whose argument holds on one
    /// replica.
    pub fn pinned(&self) -> (ClickHouse, usize) {
        // Read once: the URL (which derived handles rebuild their clients from) and the client
        // must be the same replica's.
        let index = self.replica();
        let urls = self.config.urls();
        let url = urls.get(index).map_or_else(|| self.config.url.clone(), |url| (*url).to_owned());
        let pinned = ClickHouse {
            replicas: std::sync::Arc::new(vec![self.replicas[index].clone()]),
            current: Default::default(),
            config: ClickHouseConfig { url, ..self.config.clone() },
            permits: self.permits.clone(),
        };
        (pinned, index)
    }

    /// How many replicas (endpoints) this handle knows.
    pub fn replica_count(&self) -> usize {
        self.replicas.len()
    }

    /// The index (in the order given) of the replica requests go to now.
    pub fn replica_in_use(&self) -> usize {
        self.replica()
    }

    /// Sends every later request (of every handle derived from this one) to replica `index`.
    pub fn use_replica(&self, index: usize) {
        self.current.store(index % self.replicas.len(), std::sync::atomic::Ordering::Relaxed);
    }

    /// How far replica `index` is behind, in seconds: the largest `absolute_delay` of this
    /// database's replicated tables in its `system.replicas` (the age of the oldest part it
    /// knows of and has not fetched yet; 0 when it has everything). Does not move the handle.
    pub async fn replica_delay(&self, index: usize) -> Result<u64, SinkError> {
        let query = self.replicas[index % self.replicas.len()]
            .query("SELECT toUInt64(max(absolute_delay)) FROM system.replicas WHERE database = currentDatabase()");
        tokio::time::timeout(self.timeout(), query.fetch_one::<u64>())
            .await
            .map_err(|_| SinkError::Unavailable(format!("no answer within {:?}", self.timeout())))?
            .map_err(classify)
    }

    /// Answers `Ok` when a replica is reachable, trying each in turn; later requests (of every
    /// handle derived from this one) go to the one that answered.
    pub async fn ping(&self) -> Result<(), SinkError> {
        let mut result = Ok(());
        for _ in 0..self.replicas.len() {
            result = self.execute("SELECT 1").await;
            if result.is_ok() {
                break;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_server_errors() {
        let bad = |m: &str| classify(clickhouse::error::Error::BadResponse(m.into()));
        assert!(bad("Code: 252, e.displayText() = DB::Exception: Too many parts").is_retryable());
        assert!(bad("Code: 242, e.displayText() = DB::Exception: Table is in readonly mode").is_retryable());
        assert!(!bad("Code: 60, e.displayText() = DB::Exception: Table x doesn't exist.").is_retryable());
        assert!(!bad("Code: 33, e.displayText() = DB::Exception: Cannot read all data").is_retryable());
        assert!(bad("502 Bad Gateway").is_retryable());
        assert!(classify(clickhouse::error::Error::TimedOut).is_retryable());
        assert_eq!(server_code("Code: 1000. x"), Some(1000));
    }
}
