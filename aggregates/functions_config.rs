//! Which functions `event_stats` applies to an event, from `config/functions.toml`.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use videocount_events::{RejectReason, Rejection, StatsEvent, valid_event_type};

use crate::{Function, Input, Registry};

/// A configuration that cannot be used, with what is wrong in it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("{path}: {detail}")]
    Invalid { path: String, detail: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    default: Vec<String>,
    #[serde(default)]
    event_types: HashMap<String, Vec<String>>,
}

/// The functions per event type, resolved against a [`Registry`].
#[derive(Clone, Debug)]
pub struct FunctionsConfig {
    registry: Registry,
    default: Vec<Function>,
    event_types: HashMap<String, Vec<Function>>,
}

/// The functions config the repository ships (`config/functions.toml`), built into the binaries
/// that need it (`event_stats`, `ingest`).
pub const DEFAULT_FUNCTIONS: &str = include_str!("../config/functions.toml");

impl FunctionsConfig {
    /// The config in `path`, or the built-in [`DEFAULT_FUNCTIONS`] without one, with the
    /// built-in functions.
    pub fn load_or_default(path: Option<&Path>) -> Result<Self, ConfigError> {
        match path {
            Some(path) => Self::load(path, Registry::builtin()),
            None => Self::parse(DEFAULT_FUNCTIONS, Registry::builtin())
                .map_err(|detail| ConfigError::Invalid { path: "built-in config/functions.toml".into(), detail }),
        }
    }

    pub fn load(path: &Path, registry: Registry) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|error| ConfigError::Read { path: path.display().to_string(), error })?;
        Self::parse(&text, registry).map_err(|detail| ConfigError::Invalid { path: path.display().to_string(), detail })
    }

    /// Parses the TOML text; the error names the offending entry.
    pub fn parse(text: &str, registry: Registry) -> Result<Self, String> {
        let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
        let resolve = |what: &str, names: &[String]| -> Result<Vec<Function>, String> {
            if names.is_empty() {
                return Err(format!("{what}: no functions"));
            }
            names
                .iter()
                .map(|name| registry.function(name).ok_or_else(|| format!("{what}: unknown function {name:?}")))
                .collect()
        };
        let default = resolve("default", &file.default)?;
        let mut event_types = HashMap::new();
        for (event_type, names) in &file.event_types {
            if !valid_event_type(event_type) {
                return Err(format!("event type {event_type:?} is not 1-32 characters of [a-z0-9_]"));
            }
            event_types.insert(event_type.clone(), resolve(&format!("event_types.{event_type}"), names)?);
        }
        Ok(FunctionsConfig { registry, default, event_types })
    }

    /// A hash of what the config means (defaults and functions per type, in a canonical
    /// order): equal for configs that feed the same functions.
    pub fn fingerprint(&self) -> u64 {
        let names = |functions: &[Function]| functions.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(",");
        let mut types: Vec<(&String, &Vec<Function>)> = self.event_types.iter().collect();
        types.sort_by(|a, b| a.0.cmp(b.0));
        let mut canonical = format!("default={}", names(&self.default));
        for (event_type, functions) in types {
            canonical.push_str(&format!(";{event_type}={}", names(functions)));
        }
        xxhash_rust::xxh3::xxh3_64(canonical.as_bytes())
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The functions applied to `event_type` when an event names none.
    pub fn functions(&self, event_type: &str) -> &[Function] {
        self.event_types.get(event_type).map_or(&self.default, Vec::as_slice)
    }

    /// The aggregates (a bit per [`super::AggregateId`]) that `event` feeds, or why it cannot
    /// be used. An event that names a function must carry that function's input. Otherwise it
    /// feeds the functions configured for its type: it must carry a `value` when one of them
    /// reads values (the value is what such an event measures), while `viewer_id` stays
    /// optional (anonymous viewers are counted, just not in `uniq`).
    pub fn resolve(&self, event: &StatsEvent) -> Result<u32, Rejection> {
        let carries = |input: Input| match input {
            Input::None => true,
            Input::Value => event.value.is_some(),
            Input::Viewer => event.viewer_id.is_some(),
        };
        let missing = |function: &Function| match function.input {
            Input::Viewer => {
                Rejection::new(RejectReason::MissingViewerId, format!("function {} needs a viewer_id", function.name))
            }
            _ => Rejection::new(RejectReason::MissingValue, format!("function {} needs a value", function.name)),
        };
        if let Some(name) = &event.function {
            let function = self.registry.function(name).ok_or_else(|| {
                Rejection::new(
                    RejectReason::UnknownFunction,
                    format!("no function named {name:?} (count, sum, min, max, avg, p1..p99, uniq)"),
                )
            })?;
            if !carries(function.input) {
                return Err(missing(&function));
            }
            return Ok(1 << function.aggregate);
        }
        let functions = self.functions(&event.event.event_type);
        if let Some(needs_value) = functions.iter().find(|f| f.input == Input::Value && event.value.is_none()) {
            return Err(missing(needs_value));
        }
        Ok(functions.iter().filter(|f| carries(f.input)).fold(0u32, |m, f| m | (1 << f.aggregate)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use videocount_events::{TimeLimits, parse_stats_event};

    fn config() -> FunctionsConfig {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/functions.toml");
        FunctionsConfig::load(&path, Registry::builtin()).expect("the shipped config is valid")
    }

    fn event(json: &str) -> StatsEvent {
        parse_stats_event(Some(json.as_bytes()), Some(1_795_812_377_123), TimeLimits::default()).unwrap()
    }

    #[test]
    fn resolves_configured_and_named_functions() {
        let config = config();
        let registry = config.registry().clone();
        let bit = |name: &str| 1u32 << registry.function(name).unwrap().aggregate;
        assert_eq!(config.resolve(&event(r#"{"video_id":"v"}"#)).unwrap(), bit("count"));
        assert_eq!(config.resolve(&event(r#"{"video_id":"v","viewer_id":"u"}"#)).unwrap(), bit("count") | bit("uniq"));
        assert_eq!(
            config.resolve(&event(r#"{"video_id":"v","event_type":"watch_time","value":3}"#)).unwrap(),
            bit("sum") | bit("p50")
        );
        assert_eq!(config.resolve(&event(r#"{"video_id":"v","event_type":"other"}"#)).unwrap(), bit("count"));
        assert_eq!(config.resolve(&event(r#"{"video_id":"v","function":"p75","value":1.5}"#)).unwrap(), bit("p75"));
    }

    #[test]
    fn refuses_events_no_function_can_use() {
        let config = config();
        let reason = |json: &str| config.resolve(&event(json)).unwrap_err().reason;
        assert_eq!(reason(r#"{"video_id":"v","function":"median","value":1}"#), RejectReason::UnknownFunction);
        assert_eq!(reason(r#"{"video_id":"v","function":"p99"}"#), RejectReason::MissingValue);
        assert_eq!(reason(r#"{"video_id":"v","function":"uniq","value":1}"#), RejectReason::MissingViewerId);
        assert_eq!(reason(r#"{"video_id":"v","event_type":"watch_time"}"#), RejectReason::MissingValue);
    }

    #[test]
    fn fingerprints_follow_meaning_not_layout() {
        let parse = |text: &str| FunctionsConfig::parse(text, Registry::builtin()).unwrap().fingerprint();
        let a = parse("default = [\"count\"]\n[event_types]\nview = [\"count\", \"uniq\"]\nlike = [\"count\"]");
        let b =
            parse("# comment\ndefault = [ \"count\" ]\n[event_types]\nlike = [\"count\"]\nview = [\"count\",\"uniq\"]");
        assert_eq!(a, b);
        assert_ne!(a, parse("default = [\"count\"]\n[event_types]\nview = [\"count\"]\nlike = [\"count\"]"));
    }

    #[test]
    fn bad_configs_name_the_problem() {
        let bad = |text: &str| FunctionsConfig::parse(text, Registry::builtin()).unwrap_err();
        assert!(bad("default = [\"count\", \"p100\"]").contains("unknown function \"p100\""));
        assert!(bad("default = []").contains("no functions"));
        assert!(bad("default = [\"count\"]\n[event_types]\nView = [\"count\"]").contains("View"));
        assert!(bad("defaults = [\"count\"]").contains("defaults"));
    }
}
