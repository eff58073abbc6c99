//! The service's Prometheus metrics (`GET /metrics`, OpenMetrics text). Names are
//! `videocount_ingest_*`; README lists them.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use videocount_http::{ProcessCollector, RequestMetrics};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub http: RequestMetrics,
    pub events_accepted: Counter,
    pub events_rejected: Family<ReasonLabels, Counter>,
    /// The sum of `events_rejected` over reasons, for the progress log (not exported).
    pub events_rejected_all: Counter,
    /// Valid events Kafka did not take (answered 503; the client retries them).
    pub events_failed: Counter,
    pub producer_queue: Gauge,
    pub producer_queue_capacity: Gauge,
    /// 0 closed, 1 open, 2 half open.
    pub breaker_state: Gauge,
    /// Requests refused because --max-inflight-mb of bodies were in flight.
    pub overloaded: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("videocount_ingest");
        let http = RequestMetrics::register(&mut registry);
        registry.register_collector(Box::new(ProcessCollector));
        let events_accepted = Counter::default();
        registry.register("events_accepted", "Events Kafka acknowledged", events_accepted.clone());
        let events_rejected = Family::<ReasonLabels, Counter>::default();
        registry.register("events_rejected", "Events refused as invalid, by reason", events_rejected.clone());
        let events_failed = Counter::default();
        registry.register("events_failed", "Valid events Kafka did not take (503)", events_failed.clone());
        let producer_queue = Gauge::default();
        registry.register(
            "producer_queue_messages",
            "Messages waiting in the producer or for Kafka's acknowledgement",
            producer_queue.clone(),
        );
        let producer_queue_capacity = Gauge::default();
        registry.register(
            "producer_queue_capacity_messages",
            "The producer queue's capacity",
            producer_queue_capacity.clone(),
        );
        let breaker_state = Gauge::default();
        registry.register(
            "kafka_breaker_state",
            "Circuit breaker: 0 closed, 1 open, 2 half open",
            breaker_state.clone(),
        );
        let overloaded = Counter::default();
        registry.register(
            "requests_overloaded",
            "Requests refused at once (503) because --max-inflight-mb of bodies were in flight",
            overloaded.clone(),
        );
        Arc::new(Metrics {
            overloaded,
            registry,
            http,
            events_accepted,
            events_rejected,
            events_rejected_all: Counter::default(),
            events_failed,
            producer_queue,
            producer_queue_capacity,
            breaker_state,
        })
    }

    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String never fails");
        text
    }
}
