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

/// A handle to one ClickHouse database. Cheap to clone.
#[derive(Clone)]
pub struct ClickHouse {
    client: Client,
    config: ClickHouseConfig,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse").field("url", &self.config.url).field("database", &self.config.database).finish()
    }
}

impl ClickHouse {
    pub fn new(config: ClickHouseConfig) -> Self {
        let mut client = Client::default()
            .with_url(&config.url)
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
        ClickHouse { client, config }
    }

    pub fn config(&self) -> &ClickHouseConfig {
        &self.config
    }

    pub fn database(&self) -> &str {
        &self.config.database
    }

    /// The same server, another database.
    pub fn with_database(&self, database: &str) -> ClickHouse {
        ClickHouse::new(ClickHouseConfig { database: database.into(), ..self.config.clone() })
    }

    /// The same server and database, waiting up to `timeout` for each answer (a long
    /// `INSERT ... SELECT`, such as a replay's).
    pub fn with_request_timeout(&self, timeout: Duration) -> ClickHouse {
        ClickHouse::new(ClickHouseConfig { request_timeout: timeout, ..self.config.clone() })
    }

    /// The same handle with a ClickHouse setting sent on every request (e.g. `max_threads`).
    pub fn with_setting(&self, name: &str, value: &str) -> ClickHouse {
        ClickHouse { client: self.client.clone().with_setting(name, value), config: self.config.clone() }
    }

    /// The underlying client, for typed queries (`query(..).bind(..).fetch_all()`).
    pub fn client(&self) -> &Client {
        &self.client
    }

    fn timeout(&self) -> Duration {
        self.config.request_timeout
    }

    /// Inserts one native-format block into `table`.
    pub async fn insert_native(&self, table: &str, body: Bytes) -> Result<(), SinkError> {
        let mut insert = self
            .client
            .insert_formatted_with(format!("INSERT INTO {table} FORMAT Native"))
            .with_timeouts(Some(self.timeout()), Some(self.timeout()));
        insert.send(body).await.map_err(classify)?;
        insert.end().await.map_err(classify)
    }

    /// Runs a statement that returns nothing.
    pub async fn execute(&self, sql: &str) -> Result<(), SinkError> {
        tokio::time::timeout(self.timeout(), self.client.query(sql).execute())
            .await
            .map_err(|_| SinkError::Unavailable(format!("no answer within {:?}", self.timeout())))?
            .map_err(classify)
    }

    /// Runs a statement with bound values that returns nothing.
    pub async fn execute_query(&self, query: clickhouse::query::Query) -> Result<(), SinkError> {
        tokio::time::timeout(self.timeout(), query.execute())
            .await
            .map_err(|_| SinkError::Unavailable(format!("no answer within {:?}", self.timeout())))?
            .map_err(classify)
    }

    /// Fetches typed rows, with the request timeout.
    pub async fn fetch_all<T>(&self, query: clickhouse::query::Query) -> Result<Vec<T>, SinkError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        tokio::time::timeout(self.timeout(), query.fetch_all::<T>())
            .await
            .map_err(|_| SinkError::Unavailable(format!("no answer within {:?}", self.timeout())))?
            .map_err(classify)
    }

    /// Answers `Ok` when the server is reachable.
    pub async fn ping(&self) -> Result<(), SinkError> {
        self.execute("SELECT 1").await
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
