//! One builder for every rdkafka client the project creates: the jobs' consumers, lag
//! monitor, admin and dead-letter producer, the ingest service's producer and the load
//! generator's.
//!
//! Raw librdkafka options given on a command line (`--kafka-option` on the jobs, `-X` on
//! ingest) must reach every client, not only the one they were first written for: a
//! `security.protocol=SASL_SSL` that reaches the consumer but not the admin client leaves the
//! job unable to start. [`KafkaClients::config`] applies, in this order:
//!
//! 1. the defaults of the client's role, which a user may override;
//! 2. the user's options;
//! 3. `bootstrap.servers`, which is the brokers flag and nothing else.
//!
//! The caller then sets what its correctness depends on (`enable.auto.commit=false`,
//! `enable.idempotence=true`, ...), each with a comment saying why, so a user option can never
//! switch those off.

use rdkafka::ClientConfig;

/// A raw option that is not `KEY=VALUE`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("expected KEY=VALUE, got {0:?}")]
pub struct OptionError(pub String);

/// A raw librdkafka setting as given on a command line, `KEY=VALUE` (both trimmed).
pub fn parse_option(text: &str) -> Result<(String, String), OptionError> {
    let (key, value) = text.split_once('=').ok_or_else(|| OptionError(text.to_owned()))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(OptionError(text.to_owned()));
    }
    Ok((key.to_owned(), value.trim().to_owned()))
}

/// Where the brokers are and the user's raw options: everything needed to build any client.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaClients {
    /// Bootstrap servers, comma-separated `host:port`.
    pub brokers: String,
    /// Raw librdkafka options, in the order given.
    pub options: Vec<(String, String)>,
}

impl KafkaClients {
    pub fn new(brokers: impl Into<String>, options: Vec<(String, String)>) -> Self {
        KafkaClients { brokers: brokers.into(), options }
    }

    /// A client configuration: `defaults`, then the user's options, then the brokers. Set what
    /// the client relies on after this.
    pub fn config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (key, value) in defaults {
            config.set(*key, *value);
        }
        for (key, value) in &self.options {
            config.set(key, value);
        }
        config.set("bootstrap.servers", &self.brokers);
        config
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_key_value() {
        assert_eq!(parse_option(" security.protocol = ssl "), Ok(("security.protocol".into(), "ssl".into())));
        assert_eq!(parse_option("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert_eq!(parse_option("sasl.password="), Ok(("sasl.password".into(), String::new())));
        assert!(parse_option("novalue").is_err());
        assert!(parse_option("=x").is_err());
    }

    #[test]
    fn user_options_override_defaults_but_not_the_brokers() {
        let clients = KafkaClients::new(
            "k1:9092,k2:9092",
            vec![
                ("linger.ms".into(), "50".into()),
                ("security.protocol".into(), "ssl".into()),
                ("bootstrap.servers".into(), "elsewhere:1".into()),
            ],
        );
        let config = clients.config(&[("linger.ms", "5"), ("batch.size", "1000")]);
        assert_eq!(config.get("linger.ms"), Some("50"));
        assert_eq!(config.get("batch.size"), Some("1000"));
        assert_eq!(config.get("security.protocol"), Some("ssl"));
        assert_eq!(config.get("bootstrap.servers"), Some("k1:9092,k2:9092"));
    }
}
