//! The freshness canary: every `--canary-interval-ms` one view of this process's own canary
//! video goes through the ingest service, and the time until this service's read API counts it
//! is observed in `videocount_query_canary_freshness_seconds`. The live panel shows the p50 and
//! p99 of the last five minutes.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::time::Instant;
use tracing::{info, warn};
use videocount_client::canary::{Canary, CanaryError};

/// Samples the live panel summarises.
const RECENT: Duration = Duration::from_secs(300);

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

pub struct CanaryStats {
    pub freshness: Histogram,
    pub failures: Family<KindLabels, Counter>,
    recent: Mutex<VecDeque<(Instant, f64)>>,
    last_error: Mutex<Option<String>>,
}

impl CanaryStats {
    /// Registers `canary_freshness_seconds` (buckets 0.05 s to 102 s, doubling) and
    /// `canary_failures_total{kind=write|read|timeout|overcount}`.
    pub fn register(registry: &mut Registry) -> CanaryStats {
        let freshness = Histogram::new((0..12).map(|i| 0.05 * f64::from(1u32 << i)));
        registry.register(
            "canary_freshness_seconds",
            "Time from a canary view's acceptance by ingest to its count being readable here",
            freshness.clone(),
        );
        let failures = Family::<KindLabels, Counter>::default();
        registry.register("canary_failures", "Canary probes that gave no sample, by kind", failures.clone());
        // Every kind from the start (0 until it happens), so rates and alerts need no special case.
        for kind in CanaryError::KINDS {
            let _ = failures.get_or_create(&KindLabels { kind: kind.to_owned() });
        }
        CanaryStats { freshness, failures, recent: Mutex::default(), last_error: Mutex::default() }
    }

    fn record(&self, seconds: f64) {
        self.freshness.observe(seconds);
        let mut recent = self.recent.lock().expect("canary lock");
        let now = Instant::now();
        recent.push_back((now, seconds));
        while recent.front().is_some_and(|(at, _)| now.duration_since(*at) > RECENT) {
            recent.pop_front();
        }
        *self.last_error.lock().expect("canary lock") = None;
    }

    /// p50 and p99 of the last five minutes' samples, and the last failure since the last sample.
    pub fn snapshot(&self) -> serde_json::Value {
        let now = Instant::now();
        let mut samples: Vec<f64> = self
            .recent
            .lock()
            .expect("canary lock")
            .iter()
            .filter(|(at, _)| now.duration_since(*at) <= RECENT)
            .map(|(_, s)| *s)
            .collect();
        samples.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            (!samples.is_empty())
                .then(|| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1])
        };
        // No video id: a client that knew it could write views to it.
        serde_json::json!({
            "samples": samples.len(),
            "p50_seconds": quantile(0.5),
            "p99_seconds": quantile(0.99),
            "error": *self.last_error.lock().expect("canary lock"),
        })
    }
}

/// Probes about every `every` after the previous probe ended, for ever.
pub async fn run(mut canary: Canary, every: Duration, metrics: std::sync::Arc<crate::metrics::Metrics>) {
    let stats = &metrics.canary;
    let mut failing = false;
    loop {
        // A random pause (mean `every`): probes at a fixed phase to the jobs' epochs and the hot
        // cache's refresh would all measure the same delay.
        tokio::time::sleep(every.mul_f64(rand::random_range(0.0..2.0))).await;
        match canary.probe().await {
            Ok(freshness) => {
                if failing {
                    info!(freshness_s = freshness.as_secs_f64(), "freshness canary counted again");
                }
                failing = false;
                stats.record(freshness.as_secs_f64());
            }
            Err(error) => {
                stats.failures.get_or_create(&KindLabels { kind: error.kind().to_owned() }).inc();
                let message = error.to_string();
                // Once per outage in the log; every failure in the metrics.
                if !failing {
                    warn!(error = %message, "freshness canary failed");
                }
                failing = true;
                *stats.last_error.lock().expect("canary lock") = Some(message);
            }
        }
    }
}
