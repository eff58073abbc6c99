//! Reads never come from a lagging replica without the reader knowing: every few seconds the
//! service asks the ClickHouse replica in use how far behind it is (`system.replicas`
//! `absolute_delay`). Above `--max-replica-delay-secs` it asks the others and moves to the one
//! least behind. The delay of the replica in use is exported
//! (`videocount_query_replica_delay_seconds`) and sent with every answer
//! (`X-Videocount-Replica-Delay`), so a client sees it even when all replicas lag; after a
//! move caused by an unavailable replica the header says `unknown` until the next check.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use prometheus_client::metrics::gauge::Gauge;
use tracing::{info, warn};
use videocount_clickhouse::ClickHouse;

/// The delay of the replica in use, seconds; -1 until known (or while it does not answer).
/// The gauge is shared with the metrics registry.
#[derive(Clone, Debug)]
pub struct ReplicaDelay {
    pub gauge: Gauge,
    /// The replica the delay was measured on.
    replica: Arc<AtomicUsize>,
}

impl Default for ReplicaDelay {
    fn default() -> Self {
        let gauge = Gauge::default();
        gauge.set(-1);
        ReplicaDelay { gauge, replica: Arc::new(AtomicUsize::new(0)) }
    }
}

impl ReplicaDelay {
    /// The delay of `replica` if it is the one last measured.
    pub fn seconds(&self, replica: usize) -> Option<u64> {
        if self.replica.load(Ordering::Relaxed) != replica {
            return None;
        }
        u64::try_from(self.gauge.get()).ok()
    }

    fn set(&self, replica: usize, seconds: Option<u64>) {
        self.replica.store(replica, Ordering::Relaxed);
        self.gauge.set(seconds.map_or(-1, |s| i64::try_from(s).unwrap_or(i64::MAX)));
    }
}

/// What the header needs: the delay measured, and which replica requests go to now (a request
/// that found one unavailable moves them at once, before the next check).
#[derive(Clone, Debug)]
pub struct DelayHeader {
    pub clickhouse: ClickHouse,
    pub delay: ReplicaDelay,
}

/// Checks the replica in use every `every`, moving to the least delayed one when it is more
/// than `max_delay` behind. Runs until the process exits.
pub async fn watch(clickhouse: ClickHouse, delay: ReplicaDelay, max_delay: Duration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let in_use = clickhouse.replica_in_use();
        let current = clickhouse.replica_delay(in_use).await.ok();
        delay.set(in_use, current);
        let Some(seconds) = current else { continue };
        if clickhouse.replica_count() < 2 || seconds <= max_delay.as_secs() {
            continue;
        }
        let mut best = (in_use, seconds);
        for index in (0..clickhouse.replica_count()).filter(|&i| i != in_use) {
            if let Ok(other) = clickhouse.replica_delay(index).await
                && other < best.1
            {
                best = (index, other);
            }
        }
        if best.0 == in_use {
            warn!(replica = in_use, delay_s = seconds, "the ClickHouse replica in use lags and no other lags less");
        } else {
            info!(
                from = in_use,
                to = best.0,
                delay_s = seconds,
                now_s = best.1,
                "moving reads to a replica less behind"
            );
            clickhouse.use_replica(best.0);
            delay.set(best.0, Some(best.1));
        }
    }
}

/// Adds `X-Videocount-Replica-Delay: <seconds>` to every answer: the delay of the replica in
/// use, `unknown` until it was measured (after a move, up to one check).
pub async fn header(State(state): State<DelayHeader>, request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let in_use = state.clickhouse.replica_in_use();
    let value = state.delay.seconds(in_use).map_or(HeaderValue::from_static("unknown"), HeaderValue::from);
    response.headers_mut().insert("x-videocount-replica-delay", value);
    response
}
