//! The service's Prometheus metrics (`GET /metrics`, OpenMetrics text). Names are
//! `videocount_query_*`; README lists them.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use videocount_http::{ProcessCollector, RequestMetrics};

use crate::canary::CanaryStats;
use crate::memory::MemoryStats;

pub struct Metrics {
    pub registry: Registry,
    pub http: RequestMetrics,
    /// Queries ClickHouse failed (answered 503 or 500).
    pub clickhouse_errors: Counter,
    pub memory: MemoryStats,
    pub memory_keys: Gauge,
    pub memory_bytes: Gauge,
    /// Seconds since the last poll of the committed epoch that worked (-1 before the first).
    pub memory_age: Gauge<f64, std::sync::atomic::AtomicU64>,
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
        let memory = MemoryStats::default();
        registry.register("memory_hits", "Counts and series answered from memory", memory.hits.clone());
        registry.register("memory_misses", "Counts and series whose key was not in memory", memory.misses.clone());
        registry.register("memory_loads", "Keys loaded into memory", memory.loads.clone());
        registry.register(
            "memory_load_retries",
            "Key loads that met an epoch being written and tried again",
            memory.load_retries.clone(),
        );
        registry.register("memory_load_errors", "Key loads that failed", memory.load_errors.clone());
        registry.register(
            "memory_edge_hits",
            "Partial edge minutes of ranges answered from kept event times",
            memory.edge_hits.clone(),
        );
        registry.register(
            "memory_edge_loads",
            "Edge minutes whose event times were read from events_raw and kept",
            memory.edge_loads.clone(),
        );
        registry.register("memory_evictions", "Keys dropped to stay in --memory-budget-mb", memory.evictions.clone());
        registry.register("memory_applies", "Polls that applied newly committed epochs", memory.applies.clone());
        registry.register("memory_poll_errors", "Polls of the committed epoch that failed", memory.poll_errors.clone());
        registry.register(
            "memory_warm_up_seconds",
            "How long the last memory warm-up took (-1: none finished since the start or the last reset)",
            memory.warm_up_seconds.clone(),
        );
        registry.register("memory_warm_up_keys", "Keys the last memory warm-up loaded", memory.warm_up_keys.clone());
        let memory_keys = Gauge::default();
        registry.register("memory_keys", "(video, event type) keys in memory", memory_keys.clone());
        let memory_bytes = Gauge::default();
        registry.register("memory_bytes", "Bytes the keys in memory take", memory_bytes.clone());
        let memory_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "memory_age_seconds",
            "Seconds since the last poll of the committed epoch that worked (-1 before the first)",
            memory_age.clone(),
        );
        let canary = CanaryStats::register(&mut registry);
        let replica_delay = crate::replicas::ReplicaDelay::default();
        registry.register(
            "replica_delay_seconds",
            "How far behind the ClickHouse replica reads go to is (system.replicas absolute_delay; -1: unknown)",
            replica_delay.gauge.clone(),
        );
        Arc::new(Metrics {
            registry,
            http,
            clickhouse_errors,
            memory,
            memory_keys,
            memory_bytes,
            memory_age,
            canary,
            replica_delay,
        })
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}
