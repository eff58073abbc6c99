//! The service's Prometheus metrics (`GET /metrics`, OpenMetrics text). Names are
//! `videocount_query_*`; README lists them.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::hot::HotStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// The route template, e.g. `/v1/videos/{video_id}/views`.
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<EndpointLabels, Histogram>,
    /// Queries ClickHouse failed (answered 503 or 500).
    pub clickhouse_errors: Counter,
    pub hot: HotStats,
    pub hot_keys: Gauge,
    /// Seconds since the hot cache's last refresh that worked (-1 before the first).
    pub hot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("videocount_query");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "HTTP requests by route and status", requests.clone());
        let latency = Family::<EndpointLabels, Histogram>::new_with_constructor(|| {
            // 0.125 ms .. 4 s, doubling.
            Histogram::new((0..16).map(|i| 0.000_125 * f64::from(1u32 << i)))
        });
        registry.register("request_duration_seconds", "Request latency by route", latency.clone());
        let clickhouse_errors = Counter::default();
        registry.register("clickhouse_errors", "Queries ClickHouse failed", clickhouse_errors.clone());
        let hot = HotStats::default();
        registry.register("hot_cache_hits", "Counts whose recent minutes came from memory", hot.hits.clone());
        registry.register("hot_cache_misses", "Counts whose key was not in the hot cache", hot.misses.clone());
        registry.register("hot_cache_refreshes", "Hot cache refreshes that worked", hot.refreshes.clone());
        registry.register("hot_cache_refresh_errors", "Hot cache refreshes that failed", hot.refresh_errors.clone());
        let hot_keys = Gauge::default();
        registry.register("hot_cache_keys", "(video, event type) keys in the hot cache", hot_keys.clone());
        let hot_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "hot_cache_age_seconds",
            "Seconds since the last hot cache refresh that worked (-1 before the first)",
            hot_age.clone(),
        );
        Arc::new(Metrics { registry, requests, latency, clickhouse_errors, hot, hot_keys, hot_age })
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}
