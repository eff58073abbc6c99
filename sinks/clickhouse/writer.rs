//! The bounded internal queue between the dataflow and ClickHouse, and its writer tasks.
//!
//! Timely workers hand finished epoch blocks to [`Writer::try_submit`], which never blocks:
//! a full queue hands the batch back, the operator keeps it and tries again later, and the
//! source stops reading while epochs pile up (back-pressure instead of unbounded memory).
//! Writer tasks retry what can be retried, with exponential backoff and jitter, for as long
//! as it takes: an epoch is never skipped. A rejected insert (bad table, wrong types) stops
//! the job with [`Writer::fatal_error`]; a restart re-runs the epoch once the cause is fixed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{error, warn};

use videocount_lease::Fence;

use crate::rows::Insert;
use crate::service::{ClickHouse, SinkError};

/// Inserts that belong together (one epoch of one operator), and what to do when all of them
/// are written.
pub struct Batch {
    /// For logs: which operator and epoch.
    pub label: String,
    pub inserts: Vec<Insert>,
    /// Called once every insert succeeded; never called if one is rejected.
    pub on_done: Box<dyn FnOnce() + Send>,
}

impl std::fmt::Debug for Batch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batch").field("label", &self.label).field("inserts", &self.inserts.len()).finish()
    }
}

/// Counters the job logs and exports.
#[derive(Debug, Default)]
pub struct WriterStats {
    pub rows_written: AtomicU64,
    /// Rows written, by table.
    pub rows_by_table: Mutex<std::collections::BTreeMap<String, u64>>,
    pub inserts: AtomicU64,
    pub retries: AtomicU64,
    pub batches_done: AtomicU64,
}

/// A cheap-to-clone handle to the queue.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Batch>,
    capacity: usize,
    stats: Arc<WriterStats>,
    fatal: Arc<Mutex<Option<String>>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("capacity", &self.capacity).field("queued", &self.queued()).finish()
    }
}

/// Where the writer tasks send inserts: ClickHouse, or a recorder in tests.
pub trait InsertService: Clone + Send + Sync + 'static {
    fn insert(&self, table: &str, body: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send;
}

impl InsertService for ClickHouse {
    fn insert(&self, table: &str, body: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send {
        self.insert_native(table, body)
    }
}

/// The retry schedule: 50 ms doubling to 5 s, with jitter, without end.
fn backoff() -> ExponentialBuilder {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
}

impl Writer {
    /// Starts `tasks` writer tasks on `runtime` behind a queue of `capacity` batches.
    pub fn start<S: InsertService>(
        runtime: &tokio::runtime::Handle,
        service: S,
        tasks: usize,
        capacity: usize,
    ) -> Writer {
        Writer::start_fenced(runtime, service, tasks, capacity, Fence::open())
    }

    /// As [`Writer::start`], but every insert (and every retry of one) is sent only while
    /// `fence` grants it: it waits while the job's lease is unconfirmed, and the job stops
    /// without sending it once the lease is lost.
    pub fn start_fenced<S: InsertService>(
        runtime: &tokio::runtime::Handle,
        service: S,
        tasks: usize,
        capacity: usize,
        fence: Fence,
    ) -> Writer {
        let (tx, rx) = mpsc::channel::<Batch>(capacity.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let writer = Writer {
            tx,
            capacity: capacity.max(1),
            stats: Arc::new(WriterStats::default()),
            fatal: Arc::new(Mutex::new(None)),
        };
        for _ in 0..tasks.max(1) {
            let rx = Arc::clone(&rx);
            let service = service.clone();
            let stats = Arc::clone(&writer.stats);
            let fatal = Arc::clone(&writer.fatal);
            let fence = fence.clone();
            runtime.spawn(async move {
                loop {
                    let batch = { rx.lock().await.recv().await };
                    let Some(Batch { label, inserts, on_done }) = batch else { return };
                    match write_batch(&service, &fence, &stats, &label, &inserts).await {
                        Ok(()) => {
                            stats.batches_done.fetch_add(1, Ordering::Relaxed);
                            on_done();
                        }
                        Err(e) => {
                            error!(batch = %label, error = %e, "insert rejected; the job stops");
                            fatal.lock().unwrap().get_or_insert_with(|| format!("{label}: {e}"));
                            return;
                        }
                    }
                }
            });
        }
        writer
    }

    /// Queues a batch, or hands it back when the queue is full.
    pub fn try_submit(&self, batch: Batch) -> Result<(), Batch> {
        self.tx.try_send(batch).map_err(|e| match e {
            mpsc::error::TrySendError::Full(b) | mpsc::error::TrySendError::Closed(b) => b,
        })
    }

    /// Batches waiting in the queue.
    pub fn queued(&self) -> usize {
        self.capacity - self.tx.capacity()
    }

    pub fn stats(&self) -> &WriterStats {
        &self.stats
    }

    /// The first rejected insert, if any: the job cannot go on without losing it.
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.lock().unwrap().clone()
    }
}

async fn write_batch<S: InsertService>(
    service: &S,
    fence: &Fence,
    stats: &WriterStats,
    label: &str,
    inserts: &[Insert],
) -> Result<(), SinkError> {
    for insert in inserts {
        (|| async {
            fence.wait().await.map_err(SinkError::Fenced)?;
            service.insert(&insert.table, insert.body.clone()).await
        })
        .retry(backoff())
        .when(SinkError::is_retryable)
        .notify(|e, delay| {
            stats.retries.fetch_add(1, Ordering::Relaxed);
            warn!(batch = %label, table = %insert.table, error = %e, ?delay, "insert failed; retrying");
        })
        .await?;
        stats.inserts.fetch_add(1, Ordering::Relaxed);
        stats.rows_written.fetch_add(insert.rows as u64, Ordering::Relaxed);
        if let Ok(mut tables) = stats.rows_by_table.lock() {
            *tables.entry(insert.table.clone()).or_default() += insert.rows as u64;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    /// Fails the first `failures` inserts with the given error, then records.
    #[derive(Clone, Default)]
    struct Flaky {
        failures: Arc<AtomicUsize>,
        retryable: bool,
        written: Arc<Mutex<Vec<String>>>,
    }

    impl InsertService for Flaky {
        fn insert(&self, table: &str, _body: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send {
            let result = if self.failures.load(Ordering::SeqCst) > 0 {
                self.failures.fetch_sub(1, Ordering::SeqCst);
                Err(if self.retryable {
                    SinkError::Unavailable("down".into())
                } else {
                    SinkError::Rejected("no such table".into())
                })
            } else {
                self.written.lock().unwrap().push(table.to_owned());
                Ok(())
            };
            async move { result }
        }
    }

    fn batch(done: Arc<AtomicUsize>) -> Batch {
        Batch {
            label: "test".into(),
            inserts: vec![Insert { table: "t".into(), body: Bytes::new(), rows: 3 }],
            on_done: Box::new(move || {
                done.fetch_add(1, Ordering::SeqCst);
            }),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_unavailable_until_written() {
        let service = Flaky { failures: Arc::new(AtomicUsize::new(5)), retryable: true, ..Flaky::default() };
        let writer = Writer::start(&tokio::runtime::Handle::current(), service.clone(), 1, 4);
        let done = Arc::new(AtomicUsize::new(0));
        writer.try_submit(batch(Arc::clone(&done))).unwrap();
        while done.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*service.written.lock().unwrap(), vec!["t".to_string()]);
        assert_eq!(writer.stats().retries.load(Ordering::SeqCst), 5);
        assert_eq!(writer.stats().rows_written.load(Ordering::SeqCst), 3);
        assert!(writer.fatal_error().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_rejected_insert_is_fatal_and_never_acknowledged() {
        let service = Flaky { failures: Arc::new(AtomicUsize::new(1)), retryable: false, ..Flaky::default() };
        let writer = Writer::start(&tokio::runtime::Handle::current(), service.clone(), 1, 4);
        let done = Arc::new(AtomicUsize::new(0));
        writer.try_submit(batch(Arc::clone(&done))).unwrap();
        while writer.fatal_error().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(writer.fatal_error().unwrap().contains("no such table"));
        assert_eq!(done.load(Ordering::SeqCst), 0);
        assert!(service.written.lock().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_is_sent_once_the_lease_is_lost() {
        let service = Flaky::default();
        let fence = Fence::open();
        fence.lose_for_test("the session expired");
        let writer = Writer::start_fenced(&tokio::runtime::Handle::current(), service.clone(), 1, 4, fence);
        let done = Arc::new(AtomicUsize::new(0));
        writer.try_submit(batch(Arc::clone(&done))).unwrap();
        while writer.fatal_error().is_none() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(writer.fatal_error().unwrap().contains("the session expired"));
        assert_eq!(done.load(Ordering::SeqCst), 0);
        assert!(service.written.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_full_queue_hands_the_batch_back() {
        // No writer task runs on a current-thread runtime until we yield.
        let writer = Writer::start(&tokio::runtime::Handle::current(), Flaky::default(), 1, 2);
        let done = Arc::new(AtomicUsize::new(0));
        assert!(writer.try_submit(batch(Arc::clone(&done))).is_ok());
        assert!(writer.try_submit(batch(Arc::clone(&done))).is_ok());
        assert_eq!(writer.queued(), 2);
        assert!(writer.try_submit(batch(Arc::clone(&done))).is_err());
    }
}
