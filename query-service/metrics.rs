//! The service's Prometheus metrics (`GET /metrics`, OpenMetrics text). Names are
//! `videocount_query_*`; README lists them.

use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use videocount_http::{ProcessCollector, RequestMetrics};

use crate::canary::CanaryStats;
use crate::memory::MemoryStats;
use crate::stats_memory::StatsMemoryStats;

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
    pub stats_memory: StatsMemoryStats,
    pub stats_memory_keys: Gauge,
    pub stats_memory_bytes: Gauge,
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
        registry.register(
            "memory_loads_put_off",
            "Key loads that met an epoch being written at each try, left to the key's next request",
            memory.loads_put_off.clone(),
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
        let stats_memory = StatsMemoryStats::default();
        for (name, help, counter) in [
            ("stats_memory_hits", "Stats answered from memory", &stats_memory.hits),
            ("stats_memory_misses", "Stats whose key was not in memory", &stats_memory.misses),
            ("stats_memory_loads", "Stats keys loaded into memory", &stats_memory.loads),
            (
                "stats_memory_load_retries",
                "Stats key loads that met a compaction ahead of the applied epoch and tried again",
                &stats_memory.load_retries,
            ),
            ("stats_memory_load_errors", "Stats key loads that failed", &stats_memory.load_errors),
            (
                "stats_memory_evictions",
                "Stats keys dropped to stay in --stats-memory-budget-mb",
                &stats_memory.evictions,
            ),
            ("stats_memory_applies", "Polls that applied newly committed event_stats epochs", &stats_memory.applies),
            (
                "stats_memory_poll_errors",
                "Polls of event_stats' committed epoch that failed",
                &stats_memory.poll_errors,
            ),
        ] {
            registry.register(name, help, counter.clone());
        }
        stats_memory.warm_up_seconds.set(-1.0);
        registry.register(
            "stats_memory_warm_up_seconds",
            "How long the last stats memory warm-up took (-1: none finished since the start or the last reset)",
            stats_memory.warm_up_seconds.clone(),
        );
        registry.register(
            "stats_memory_warm_up_keys",
            "Keys the last stats memory warm-up loaded",
            stats_memory.warm_up_keys.clone(),
        );
        let stats_memory_keys = Gauge::default();
        registry.register(
            "stats_memory_keys",
            "(video, event type, aggregate) keys in memory",
            stats_memory_keys.clone(),
        );
        let stats_memory_bytes = Gauge::default();
        registry.register(
            "stats_memory_bytes",
            "Bytes the stats keys in memory are estimated to take",
            stats_memory_bytes.clone(),
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
            stats_memory,
            stats_memory_keys,
            stats_memory_bytes,
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
