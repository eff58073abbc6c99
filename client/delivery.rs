//! How a batch travels: picking an address (round-robin over healthy ones whose breaker lets a
//! call through), sending until the batch is answered for good with retries where they help,
//! settling each item from the service's answer, and the health checks behind the picking.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::{ClientError, Endpoint, Pending, Reply, Shared};

/// What the service says about a batch: which items it refused, and on a 503 which items
/// Kafka did not take.
#[derive(Debug, Default, Deserialize)]
pub(super) struct BatchReply {
    #[serde(default)]
    rejected: Vec<RejectedItem>,
    failed: Option<Vec<usize>>,
    message: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RejectedItem {
    index: usize,
    reason: String,
    field: Option<String>,
    message: String,
}

impl BatchReply {
    fn parse(reply: &Reply) -> BatchReply {
        serde_json::from_slice(&reply.body).unwrap_or_default()
    }

    fn message(&self, reply: &Reply) -> String {
        self.message.clone().unwrap_or_else(|| String::from_utf8_lossy(&reply.body).chars().take(200).collect())
    }
}

pub(super) fn resolve(shared: &Shared, pending: Pending, result: Result<(), ClientError>) {
    shared.outstanding.fetch_sub(1, Ordering::AcqRel);
    let _ = pending.ack.send(result);
}

/// Sends one batch until it is answered for good, retrying what is worth retrying.
pub(super) async fn deliver(shared: Arc<Shared>, mut items: Vec<Pending>) {
    let _permit = shared.in_flight.acquire().await.expect("the semaphore is never closed");
    let config = &shared.config;
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        let (at_least, last_error) = match pick(&shared) {
            Err(wait) => (Some(wait), "every service address is refusing calls (circuit open)".to_owned()),
            Ok(endpoint) => {
                attempts += 1;
                shared.requests.sent.fetch_add(1, Ordering::Relaxed);
                let body = batch_body(&items);
                let answer =
                    tokio::time::timeout(config.request_timeout, shared.transport.post_events(&endpoint.url, body))
                        .await;
                match answer {
                    Err(_) => {
                        endpoint.breaker.on_failure();
                        (None, format!("no answer from {} within {:?}", endpoint.url, config.request_timeout))
                    }
                    Ok(Err(e)) => {
                        endpoint.breaker.on_failure();
                        (None, format!("{}: {e}", endpoint.url))
                    }
                    Ok(Ok(reply)) => {
                        let parsed = BatchReply::parse(&reply);
                        match reply.status {
                            200..=299 => {
                                shared.requests.answered_2xx.fetch_add(1, Ordering::Relaxed);
                                endpoint.breaker.on_success();
                                settle(&shared, items, &parsed, &[], true);
                                return;
                            }
                            429 | 500 | 502 | 503 | 504 => {
                                if reply.status != 429 {
                                    endpoint.breaker.on_failure();
                                }
                                let message =
                                    format!("{}: HTTP {}: {}", endpoint.url, reply.status, parsed.message(&reply));
                                if let Some(failed) = &parsed.failed {
                                    items = settle(&shared, items, &parsed, failed, true);
                                    if items.is_empty() {
                                        return;
                                    }
                                }
                                (reply.retry_after.map(|d| d.min(config.retry.max_delay)), message)
                            }
                            status => {
                                endpoint.breaker.on_success();
                                let error = ClientError::Status { status, message: parsed.message(&reply) };
                                // A 400 for a batch lists every item with its reason.
                                let rest = settle(&shared, items, &parsed, &[], false);
                                rest.into_iter().for_each(|p| resolve(&shared, p, Err(error.clone())));
                                return;
                            }
                        }
                    }
                }
            }
        };
        let elapsed = started.elapsed();
        if config.retry.max_elapsed.is_some_and(|max| elapsed >= max) {
            warn!(events = items.len(), attempts, error = %last_error, "giving up on a batch");
            let error = ClientError::GaveUp { attempts, elapsed, last: last_error };
            items.into_iter().for_each(|p| resolve(&shared, p, Err(error.clone())));
            return;
        }
        let delay = config.retry.delay(attempts.max(1), &mut rand::rng()).max(at_least.unwrap_or_default());
        debug!(events = items.len(), attempts, ?delay, error = %last_error, "retrying a batch");
        tokio::time::sleep(delay).await;
    }
}

/// Resolves the items of an answered batch: the rejected ones with their reasons. Returns the
/// ones in `retry`, and the unlisted ones unless `others_ok` (then they are acknowledged).
pub(super) fn settle(
    shared: &Shared,
    items: Vec<Pending>,
    reply: &BatchReply,
    retry: &[usize],
    others_ok: bool,
) -> Vec<Pending> {
    let mut rejected: Vec<Option<&RejectedItem>> = (0..items.len()).map(|_| None).collect();
    for item in &reply.rejected {
        if let Some(slot) = rejected.get_mut(item.index) {
            *slot = Some(item);
        }
    }
    let mut again = vec![false; items.len()];
    for &i in retry {
        if let Some(slot) = again.get_mut(i) {
            *slot = true;
        }
    }
    let mut rest = Vec::new();
    for (i, pending) in items.into_iter().enumerate() {
        if let Some(item) = rejected[i] {
            let error = ClientError::Rejected {
                reason: item.reason.clone(),
                field: item.field.clone(),
                message: item.message.clone(),
            };
            resolve(shared, pending, Err(error));
        } else if again[i] || !others_ok {
            rest.push(pending);
        } else {
            resolve(shared, pending, Ok(()));
        }
    }
    rest
}

pub(super) fn batch_body(items: &[Pending]) -> Bytes {
    let mut body = Vec::with_capacity(items.iter().map(|p| p.json.len() + 1).sum::<usize>() + 2);
    body.push(b'[');
    for (i, pending) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(pending.json.as_bytes());
    }
    body.push(b']');
    Bytes::from(body)
}

/// The next address to call: round-robin over the healthy ones whose breaker lets a call
/// through, then over any whose breaker does (health checks lag). `Err` is the shortest wait
/// until a breaker lets a call through.
pub(super) fn pick(shared: &Shared) -> Result<&Endpoint, Duration> {
    let endpoints = &shared.endpoints;
    let start = shared.next.fetch_add(1, Ordering::Relaxed);
    let mut wait = Duration::MAX;
    for healthy_only in [true, false] {
        for i in 0..endpoints.len() {
            let endpoint = &endpoints[(start + i) % endpoints.len()];
            if healthy_only && !endpoint.healthy.load(Ordering::Relaxed) {
                continue;
            }
            match endpoint.breaker.try_acquire() {
                Ok(()) => return Ok(endpoint),
                Err(w) => wait = wait.min(w),
            }
        }
    }
    Err(wait)
}

pub(super) async fn check_health(shared: Arc<Shared>, every: Duration) {
    loop {
        for endpoint in &shared.endpoints {
            let ready = tokio::time::timeout(shared.config.request_timeout, shared.transport.ready(&endpoint.url))
                .await
                .unwrap_or(false);
            if endpoint.healthy.swap(ready, Ordering::Relaxed) != ready {
                info!(address = %endpoint.url, ready, "service readiness changed");
            }
        }
        tokio::time::sleep(every).await;
    }
}
