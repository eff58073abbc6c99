//! What a load run found, and how it prints: rates, latency and freshness quantiles, exactness.

use hdrhistogram::Histogram;
use serde::Serialize;

#[derive(Clone, Debug, Default, Serialize)]
pub struct Quantiles {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
    pub p999: Option<f64>,
    pub max: Option<f64>,
}

/// What a check of the counts found.
#[derive(Clone, Debug, Serialize)]
pub struct Exactness {
    /// (video, event type) keys checked.
    pub keys: usize,
    /// Accepted events over those keys.
    pub events: u64,
    /// Keys whose count stayed below the accepted events.
    pub short_keys: usize,
    pub missing_events: u64,
    /// Keys counted more than accepted (plus the events whose outcome the client never
    /// learned: those may or may not have been written).
    pub over_keys: usize,
    pub extra_events: u64,
    /// Over every key: the events counted; accepted but not counted (lost); counted more than
    /// accepted (doubled: a retry after a lost acknowledgement whose first try had landed, or
    /// an event whose outcome the client never learned and which was written anyway).
    pub counted: u64,
    pub lost_events: u64,
    pub doubled_events: u64,
    pub first_mismatch: Option<String>,
    pub seconds: f64,
}

impl Exactness {
    pub fn exact(&self) -> bool {
        self.short_keys == 0 && self.over_keys == 0
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct LoadReport {
    pub run_id: String,
    pub target_rate: f64,
    pub seconds: f64,
    pub sent: u64,
    pub accepted: u64,
    /// Acks that failed (after the client's retries).
    pub failed: u64,
    /// Sends the client refused at once (its buffer was full: the generator outran it).
    pub refused: u64,
    pub first_error: Option<String>,
    pub achieved_rate: f64,
    pub error_rate: f64,
    /// Send to acknowledgement, per event, milliseconds.
    pub latency_ms: Quantiles,
    /// Canary: acknowledgement to counted, seconds.
    pub freshness_s: Quantiles,
    pub freshness_samples: usize,
    pub freshness_failures: usize,
    /// Batch requests sent by the client (tries and retries), and those answered 2xx.
    pub requests: u64,
    pub requests_2xx: u64,
    /// Reads of the read API every 100 ms (failing over between query services), and those
    /// that got no 2xx from any.
    pub reads: u64,
    pub reads_failed: u64,
    pub exactness: Option<Exactness>,
}

impl LoadReport {
    /// Exactness held (when checked) and errors are at most `max_error_rate`.
    pub fn passed(&self, max_error_rate: f64) -> bool {
        self.exactness.as_ref().is_none_or(Exactness::exact) && self.error_rate <= max_error_rate
    }

    pub fn print(&self) {
        let q = |q: &Quantiles, digits: usize| {
            let f = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.digits$}"));
            format!("p50 {}  p99 {}  p999 {}  max {}", f(q.p50), f(q.p99), f(q.p999), f(q.max))
        };
        println!(
            "sent {}  accepted {}  failed {}  refused {}  error rate {:.3} %",
            self.sent,
            self.accepted,
            self.failed,
            self.refused,
            100.0 * self.error_rate
        );
        if let Some(error) = &self.first_error {
            println!("first error: {error}");
        }
        println!(
            "achieved {:.0} events/s (target {:.0}) over {:.1} s",
            self.achieved_rate, self.target_rate, self.seconds
        );
        println!("request latency (send to Kafka ack) ms: {}", q(&self.latency_ms, 1));
        let share = |part: u64, all: u64| if all == 0 { 100.0 } else { 100.0 * part as f64 / all as f64 };
        println!(
            "write requests answered 2xx: {} of {} ({:.2} %); reads answered: {} of {} ({:.2} %)",
            self.requests_2xx,
            self.requests,
            share(self.requests_2xx, self.requests),
            self.reads - self.reads_failed,
            self.reads,
            share(self.reads - self.reads_failed, self.reads)
        );
        println!(
            "freshness (ack to counted, canary) s: {}  ({} samples, {} failed)",
            q(&self.freshness_s, 2),
            self.freshness_samples,
            self.freshness_failures
        );
        match &self.exactness {
            None => println!("exactness: not checked"),
            Some(e) if e.exact() => println!(
                "exactness: {} (video, type) keys, {} events: every accepted event counted exactly once (settled in {:.1} s); \
                 counted {}, lost {}, doubled {}",
                e.keys, e.events, e.seconds, e.counted, e.lost_events, e.doubled_events
            ),
            Some(e) => println!(
                "exactness: FAILED over {} keys / {} events (counted {}, lost {}, doubled {}): {} keys short by {} \
                 events, {} keys over by {}; first: {}",
                e.keys,
                e.events,
                e.counted,
                e.lost_events,
                e.doubled_events,
                e.short_keys,
                e.missing_events,
                e.over_keys,
                e.extra_events,
                e.first_mismatch.as_deref().unwrap_or("-")
            ),
        }
    }
}

pub(crate) fn quantiles(histogram: &Histogram<u64>, scale: f64) -> Quantiles {
    if histogram.is_empty() {
        return Quantiles::default();
    }
    let at = |q: f64| Some(histogram.value_at_quantile(q) as f64 / scale);
    Quantiles { p50: at(0.5), p99: at(0.99), p999: at(0.999), max: Some(histogram.max() as f64 / scale) }
}
