//! The service's Prometheus metrics (`GET /metrics`, OpenMetrics text). Names are
//! `videocount_query_*`; README lists them.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use videocount_http::{ProcessCollector, RequestMetrics};

use crate::canary::CanaryStats;
use crate::hot::HotStats;

pub struct Metrics {
    pub registry: Registry,
    pub http: RequestMetrics,
    /// Queries ClickHouse failed (answered 503 or 500).
    pub clickhouse_errors: Counter,
    pub hot: HotStats,
    pub hot_keys: Gauge,
    /// Seconds since the hot cache's last refresh that worked (-1 before the first).
    pub hot_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    pub canary: CanaryStats,
    /// How far behind the ClickHouse replica in use is (replicas.rs).
    pub replica_delay: crate::replicas::ReplicaDelay,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("videocount_query");
        let http = RequestMetrics::register(&mut registry);
        registry.register_collector(Box::new(ProcessCollector));
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
        let canary = CanaryStats::register(&mut registry);
        let replica_delay = crate::replicas::ReplicaDelay::default();
        registry.register(
            "replica_delay_seconds",
            "How far behind the ClickHouse replica reads go to is (system.replicas absolute_delay; -1: unknown)",
            replica_delay.gauge.clone(),
        );
        Arc::new(Metrics { registry, http, clickhouse_errors, hot, hot_keys, hot_age, canary, replica_delay })
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}
