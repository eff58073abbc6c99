//! Typed ClickHouse settings with pure validation.

use std::time::Duration;

/// Where and how to reach ClickHouse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClickHouseConfig {
    /// HTTP endpoint, e.g. `http://127.0.0.1:8123`, or the endpoints of the replicas,
    /// comma-separated: requests go to one, and move to the next when it is unavailable.
    pub url: String,
    /// Database holding the tables of `sql/schema.sql`.
    pub database: String,
    /// User name; the server's `default` user when `None`.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<String>,
    /// Upper bound on one request (insert or query) before it counts as failed and is retried.
    pub request_timeout: Duration,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".into(),
            database: "video_counts".into(),
            user: None,
            password: None,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// The ClickHouse flags of every binary (flatten them into its parser); each also from the
/// environment. Global, so a CLI takes them before or after its subcommand.
#[derive(clap::Args, Clone, Debug)]
pub struct ClickHouseArgs {
    /// ClickHouse HTTP endpoint, or the replicas' endpoints comma-separated (requests move to
    /// the next when one is unavailable).
    #[arg(long = "clickhouse-url", global = true, env = "CLICKHOUSE_URL", default_value = "http://127.0.0.1:8123")]
    pub url: String,
    /// ClickHouse database holding the tables of sql/schema.sql.
    #[arg(long, global = true, env = "CLICKHOUSE_DATABASE", default_value = "video_counts")]
    pub database: String,
    /// ClickHouse user (default: the server's `default` user).
    #[arg(long = "clickhouse-user", global = true, env = "CLICKHOUSE_USER")]
    pub user: Option<String>,
    /// ClickHouse password.
    #[arg(long = "clickhouse-password", global = true, env = "CLICKHOUSE_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

impl ClickHouseArgs {
    /// The settings, with the default request timeout.
    pub fn config(&self) -> ClickHouseConfig {
        ClickHouseConfig {
            url: self.url.clone(),
            database: self.database.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            ..ClickHouseConfig::default()
        }
    }
}

/// A setting that cannot work, found before any connection is made.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("ClickHouse URL {0:?} must start with http:// or https://")]
    BadUrl(String),
    #[error("database name {0:?} must be 1-64 characters of [A-Za-z0-9_] and not start with a digit")]
    BadDatabase(String),
    #[error("request timeout must be greater than zero")]
    ZeroTimeout,
}

/// A ClickHouse identifier we are willing to splice into SQL (databases, tables).
pub fn valid_identifier(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.as_bytes()[0].is_ascii_digit()
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

impl ClickHouseConfig {
    /// The endpoints of `url`, in order.
    pub fn urls(&self) -> Vec<&str> {
        self.url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let urls = self.urls();
        if urls.is_empty() {
            return Err(ConfigError::BadUrl(self.url.clone()));
        }
        if let Some(bad) = urls.iter().find(|u| !(u.starts_with("http://") || u.starts_with("https://"))) {
            return Err(ConfigError::BadUrl((*bad).to_owned()));
        }
        if !valid_identifier(&self.database) {
            return Err(ConfigError::BadDatabase(self.database.clone()));
        }
        if self.request_timeout.is_zero() {
            return Err(ConfigError::ZeroTimeout);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_what_cannot_work() {
        assert!(ClickHouseConfig::default().validate().is_ok());
        let bad = |f: fn(&mut ClickHouseConfig)| {
            let mut c = ClickHouseConfig::default();
            f(&mut c);
            c.validate().unwrap_err()
        };
        assert!(matches!(bad(|c| c.url = "127.0.0.1:8123".into()), ConfigError::BadUrl(_)));
        assert!(matches!(bad(|c| c.url = "http://a:8123,b:8123".into()), ConfigError::BadUrl(u) if u == "b:8123"));
        assert!(matches!(bad(|c| c.url = " , ".into()), ConfigError::BadUrl(_)));
        let replicas = ClickHouseConfig { url: "http://a:8123, http://b:8123".into(), ..ClickHouseConfig::default() };
        assert!(replicas.validate().is_ok());
        assert_eq!(replicas.urls(), ["http://a:8123", "http://b:8123"]);
        assert!(matches!(bad(|c| c.database = "x; DROP TABLE y".into()), ConfigError::BadDatabase(_)));
        assert!(matches!(bad(|c| c.database = "1db".into()), ConfigError::BadDatabase(_)));
        assert_eq!(bad(|c| c.request_timeout = Duration::ZERO), ConfigError::ZeroTimeout);
    }
}
