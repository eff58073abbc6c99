//! The client of the videocount ingestion service (the design notes' "partitioner service
//! client"): async and non-blocking, for players, apps and backends.
//!
//! ```no_run
//! # async fn demo() -> Result<(), videocount_client::ClientError> {
//! use videocount_client::{Client, ClientConfig};
//! let client = Client::new(ClientConfig::new(["http://127.0.0.1:8080"]))?;
//! let ack = client.count_view("dQw4w9WgXcQ")?; // buffered; returns at once
//! ack.await?; // resolves once Kafka acknowledged the batch that carried it
//! client.close().await; // sends what is buffered
//! # Ok(()) }
//! ```
//!
//! - **Buffering and batching.** Single events wait in a buffer and leave as one
//!   `POST /v1/events` when `batch_size` events are there or `linger` has passed since the
//!   first; at most `max_in_flight` batches are on the wire. The buffer holds at most
//!   `max_buffered` unresolved events: beyond that a call returns [`ClientError::BufferFull`]
//!   at once (back-pressure the caller sees, never a silent drop).
//! - **Timeouts.** `connect_timeout` per connection, `request_timeout` per request.
//! - **Retries.** Connection errors, timeouts, 429, 500, 502, 503 and 504 are retried with
//!   exponential backoff and full jitter (a delay drawn uniformly from zero to
//!   `min(max_delay, base * 2^attempt)`), at least the service's `Retry-After`, until
//!   `max_elapsed`. A 503 that names the failed items of a batch retries only those. 400, 401,
//!   413 and other answers are final: the ack says why.
//! - **Circuit breaker** per service address ([`CircuitBreaker`]): after repeated failures the
//!   address gets no calls for a while, then one probe.
//! - **Load balancing.** Several addresses spread batches round-robin over the healthy ones;
//!   a background task asks each `GET /readyz` every `health_interval`.
//! - [`Client::flush`] waits until everything sent before it is resolved; [`Client::close`]
//!   flushes and stops. Dropping the client also sends what is buffered, while the runtime
//!   lives.
//!
//! **Delivery guarantee.** An `Ok` ack means Kafka acknowledged the event: it is counted exactly
//! once downstream. A retry after an answer that was lost on the way back (the service or Kafka
//! failed after writing) can write an event twice; see the README's "Write path guarantees".

mod breaker;
pub mod canary;
mod config;
mod delivery;
mod event;
mod transport;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::JoinSet;

use crate::delivery::{check_health, deliver};
use tokio::time::Instant;
use url::Url;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use config::{ClientConfig, RetryPolicy};
pub use event::Event;
pub use transport::{BoxFuture, HttpTransport, Reply, Transport, TransportError};

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ClientError {
    #[error("invalid client configuration: {0}")]
    Config(String),
    #[error("{limit} events are waiting already (max_buffered); slow down or raise the limit")]
    BufferFull { limit: usize },
    #[error("the client was closed before the event was sent")]
    Closed,
    /// The service refused the event itself; sending it again will not help.
    #[error("rejected ({reason}): {message}")]
    Rejected { reason: String, field: Option<String>, message: String },
    /// An answer that is final for the whole batch (401, 413, 415, ...).
    #[error("HTTP {status}: {message}")]
    Status { status: u16, message: String },
    #[error("gave up after {attempts} attempts over {elapsed:?}; last error: {last}")]
    GaveUp { attempts: u32, elapsed: Duration, last: String },
}

/// Resolves when the event's batch is acknowledged (`Ok`) or has failed for good.
#[derive(Debug)]
pub struct Ack(oneshot::Receiver<Result<(), ClientError>>);

impl Future for Ack {
    type Output = Result<(), ClientError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx).map(|r| r.unwrap_or(Err(ClientError::Closed)))
    }
}

/// One event on its way: its JSON and who waits for it.
struct Pending {
    json: String,
    ack: oneshot::Sender<Result<(), ClientError>>,
}

enum Command {
    Send(Pending),
    /// Send the buffer now and answer once every batch so far is resolved.
    Flush(oneshot::Sender<()>),
}

struct Endpoint {
    url: Url,
    breaker: CircuitBreaker,
    healthy: AtomicBool,
}

struct Shared {
    config: ClientConfig,
    transport: Arc<dyn Transport>,
    endpoints: Vec<Endpoint>,
    next: AtomicUsize,
    in_flight: Semaphore,
    /// Events accepted by `send` and not yet resolved.
    outstanding: AtomicUsize,
    requests: RequestCounts,
    /// This client's part of the event ids it assigns, and the number of the next one.
    id_prefix: u64,
    next_id: AtomicU64,
}

/// Requests the client sent, and how many a service answered with 2xx (see
/// [`Client::request_counts`]).
#[derive(Debug, Default)]
pub(crate) struct RequestCounts {
    pub(crate) sent: AtomicU64,
    pub(crate) answered_2xx: AtomicU64,
}

pub struct Client {
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<Command>,
    batcher: Option<tokio::task::JoinHandle<()>>,
    health: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("endpoints", &self.shared.config.endpoints).finish_non_exhaustive()
    }
}

impl Client {
    /// A client over HTTP. Spawns its tasks on the current tokio runtime.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let transport = HttpTransport::new(config.connect_timeout, config.auth_token.clone())
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Client::with_transport(config, Arc::new(transport))
    }

    /// A client over another transport (tests use a scripted one).
    pub fn with_transport(config: ClientConfig, transport: Arc<dyn Transport>) -> Result<Client, ClientError> {
        if config.endpoints.is_empty() {
            return Err(ClientError::Config("no service address given".into()));
        }
        if config.batch_size == 0 || config.batch_size > 10_000 {
            return Err(ClientError::Config(format!("batch_size {} is not in 1..=10000", config.batch_size)));
        }
        if config.max_in_flight == 0 {
            return Err(ClientError::Config("max_in_flight must be at least 1".into()));
        }
        let endpoints = config
            .endpoints
            .iter()
            .map(|text| {
                let mut url = Url::parse(text).map_err(|e| ClientError::Config(format!("address {text:?}: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(ClientError::Config(format!("address {text:?}: expected http:// or https://")));
                }
                if !url.path().ends_with('/') {
                    url.set_path(&format!("{}/", url.path()));
                }
                Ok(Endpoint { url, breaker: CircuitBreaker::new(config.breaker), healthy: AtomicBool::new(true) })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            in_flight: Semaphore::new(config.max_in_flight),
            config,
            transport,
            endpoints,
            next: AtomicUsize::new(0),
            outstanding: AtomicUsize::new(0),
            requests: RequestCounts::default(),
            id_prefix: rand::random(),
            next_id: AtomicU64::new(0),
        });
        let (commands, receiver) = mpsc::unbounded_channel();
        let batcher = tokio::spawn(batch(shared.clone(), receiver));
        let health = shared.config.health_interval.map(|every| tokio::spawn(check_health(shared.clone(), every)));
        Ok(Client { shared, commands, batcher: Some(batcher), health })
    }

    /// `countViewEvent`: one view of `video_id`.
    pub fn count_view(&self, video_id: &str) -> Result<Ack, ClientError> {
        self.send(Event::view(video_id))
    }

    /// `countEvent`: one event of `event_type` on `video_id`.
    pub fn count_event(&self, video_id: &str, event_type: &str) -> Result<Ack, ClientError> {
        self.send(Event::new(video_id, event_type))
    }

    /// `processEvent`: a value for one function of `event_type` on `video_id`.
    pub fn process_event(
        &self,
        video_id: &str,
        event_type: &str,
        function: &str,
        value: f64,
    ) -> Result<Ack, ClientError> {
        self.send(Event::new(video_id, event_type).function(function).value(value))
    }

    /// Buffers one event; the ack resolves when its batch is answered for good.
    pub fn send(&self, event: Event) -> Result<Ack, ClientError> {
        let mut acks = self.enqueue(std::iter::once(event))?;
        Ok(acks.pop().expect("one event in, one ack out"))
    }

    /// `processEvents`: sends `events` (in batches of `batch_size`) and answers per event, in
    /// order.
    pub async fn process_events(&self, events: Vec<Event>) -> Vec<Result<(), ClientError>> {
        let n = events.len();
        let acks = match self.enqueue(events.into_iter()) {
            Ok(acks) => acks,
            Err(e) => return vec![Err(e); n],
        };
        let _ = self.flush_command();
        let mut results = Vec::with_capacity(acks.len());
        for ack in acks {
            results.push(ack.await);
        }
        results
    }

    fn enqueue(&self, events: impl ExactSizeIterator<Item = Event>) -> Result<Vec<Ack>, ClientError> {
        let n = events.len();
        let limit = self.shared.config.max_buffered;
        let before = self.shared.outstanding.fetch_add(n, Ordering::AcqRel);
        if before + n > limit && n > 0 {
            self.shared.outstanding.fetch_sub(n, Ordering::AcqRel);
            return Err(ClientError::BufferFull { limit });
        }
        let mut acks = Vec::with_capacity(n);
        for mut event in events {
            if self.shared.config.assign_event_ids && event.event_id.is_none() {
                let n = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
                event.event_id = Some(format!("{:016x}-{n:x}", self.shared.id_prefix));
            }
            // Serialized once: every retry sends these bytes, with the same id.
            let json = serde_json::to_string(&event).expect("an Event always serializes");
            let (tx, rx) = oneshot::channel();
            if self.commands.send(Command::Send(Pending { json, ack: tx })).is_err() {
                self.shared.outstanding.fetch_sub(1, Ordering::AcqRel);
                return Err(ClientError::Closed);
            }
            acks.push(Ack(rx));
        }
        Ok(acks)
    }

    fn flush_command(&self) -> Option<oneshot::Receiver<()>> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(Command::Flush(tx)).ok().map(|_| rx)
    }

    /// Sends what is buffered and waits until every event sent before this call is resolved.
    pub async fn flush(&self) {
        if let Some(done) = self.flush_command() {
            let _ = done.await;
        }
    }

    /// Flushes, then stops the client's tasks.
    pub async fn close(mut self) {
        self.flush().await;
        if let Some(health) = self.health.take() {
            health.abort();
        }
        let batcher = self.batcher.take();
        drop(self);
        if let Some(batcher) = batcher {
            let _ = batcher.await;
        }
    }

    /// `(sent, answered 2xx)`: the batch requests sent so far (first tries and retries) and those
    /// answered with 2xx: the write availability this client saw, before its retries hid it.
    pub fn request_counts(&self) -> (u64, u64) {
        let requests = &self.shared.requests;
        (requests.sent.load(Ordering::Relaxed), requests.answered_2xx.load(Ordering::Relaxed))
    }

    /// The breaker state of each address, in the order given.
    pub fn breaker_states(&self) -> Vec<BreakerState> {
        self.shared.endpoints.iter().map(|e| e.breaker.state()).collect()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(health) = self.health.take() {
            health.abort();
        }
        // The batcher sees the channel close, sends what is buffered and finishes on its own.
    }
}

/// The batcher: collects single events into batches and hands each to [`deliver`].
async fn batch(shared: Arc<Shared>, mut commands: mpsc::UnboundedReceiver<Command>) {
    let config = &shared.config;
    let mut buffer: Vec<Pending> = Vec::new();
    let mut bytes = 0;
    let mut deadline: Option<Instant> = None;
    let mut batches = JoinSet::new();
    let dispatch = |buffer: &mut Vec<Pending>, bytes: &mut usize, batches: &mut JoinSet<()>| {
        if !buffer.is_empty() {
            batches.spawn(deliver(shared.clone(), std::mem::take(buffer)));
        }
        *bytes = 0;
    };
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Send(pending)) => {
                    if !buffer.is_empty() && bytes + pending.json.len() + 1 > config.max_batch_bytes {
                        dispatch(&mut buffer, &mut bytes, &mut batches);
                    }
                    if buffer.is_empty() {
                        deadline = Some(Instant::now() + config.linger);
                    }
                    bytes += pending.json.len() + 1;
                    buffer.push(pending);
                    if buffer.len() >= config.batch_size {
                        dispatch(&mut buffer, &mut bytes, &mut batches);
                        deadline = None;
                    }
                }
                Some(Command::Flush(done)) => {
                    dispatch(&mut buffer, &mut bytes, &mut batches);
                    deadline = None;
                    while batches.join_next().await.is_some() {}
                    let _ = done.send(());
                }
                None => {
                    dispatch(&mut buffer, &mut bytes, &mut batches);
                    while batches.join_next().await.is_some() {}
                    return;
                }
            },
            _ = tokio::time::sleep_until(deadline.unwrap_or_else(Instant::now)), if deadline.is_some() => {
                dispatch(&mut buffer, &mut bytes, &mut batches);
                deadline = None;
            }
            Some(_) = batches.join_next(), if !batches.is_empty() => {}
        }
    }
}
