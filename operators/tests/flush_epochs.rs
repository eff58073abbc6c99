//! `flush_epochs` driven by hand: inputs advanced epoch by epoch, a probe on the output, and a
//! recording insert service that can hold writes back.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use videocount_clickhouse::SinkError;
use videocount_clickhouse::rows::Insert;
use videocount_clickhouse::writer::{InsertService, Writer};
use videocount_operators::FlushEpochs;

#[derive(Clone, Default)]
struct Recorder {
    written: Arc<Mutex<Vec<String>>>,
    hold: Arc<AtomicBool>,
}

impl InsertService for Recorder {
    fn insert(&self, table: &str, body: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send {
        let (written, hold, table) = (Arc::clone(&self.written), Arc::clone(&self.hold), table.to_owned());
        async move {
            while hold.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            written.lock().unwrap().push(format!("{table}={}", String::from_utf8_lossy(&body)));
            Ok(())
        }
    }
}

#[test]
fn epochs_are_written_in_order_after_data_and_gate_pass_and_released_after_the_write() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let recorder = Recorder::default();
    let writer = Writer::start(runtime.handle(), recorder.clone(), 2, 4);

    timely::execute_directly(move |worker| {
        let mut data = InputHandle::<u64, timely::container::CapacityContainerBuilder<Vec<u64>>>::new();
        let mut gate = InputHandle::<u64, timely::container::CapacityContainerBuilder<Vec<()>>>::new();
        let probe = ProbeHandle::new();
        worker.dataflow(|scope| {
            let gate_stream = scope.input_from(&mut gate);
            scope
                .input_from(&mut data)
                .flush_epochs::<Vec<u64>, _, _>(gate_stream, Pipeline, "Test", writer.clone(), |epoch, values| {
                    let sum: u64 = values.iter().sum();
                    vec![Insert { table: format!("e{epoch}"), body: Bytes::from(sum.to_string()), rows: values.len() }]
                })
                .probe_with(&probe);
        });
        let written = || recorder.written.lock().unwrap().clone();
        let step_for = |worker: &mut timely::worker::Worker, ms: u64| {
            let until = std::time::Instant::now() + Duration::from_millis(ms);
            while std::time::Instant::now() < until {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
        };

        // Epoch 0 complete on the data input, but the gate (the plan) is still open.
        data.send(1);
        data.send(2);
        data.advance_to(1);
        step_for(worker, 50);
        assert!(written().is_empty(), "nothing may be written before the gate passes the epoch");
        assert!(probe.less_than(&1));

        gate.advance_to(1);
        while probe.less_than(&1) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        assert_eq!(written(), vec!["e0=3"]);

        // Epoch 1: the write is held back, so the output frontier must wait at 1.
        recorder.hold.store(true, Ordering::SeqCst);
        data.send(5);
        data.advance_to(2);
        gate.advance_to(2);
        step_for(worker, 50);
        assert!(probe.less_than(&2), "an epoch is released only after its write");
        recorder.hold.store(false, Ordering::SeqCst);
        while probe.less_than(&2) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        assert_eq!(written(), vec!["e0=3", "e1=5"]);

        // An epoch without data writes nothing and does not hold the frontier.
        data.advance_to(3);
        gate.advance_to(3);
        while probe.less_than(&3) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        assert_eq!(written().len(), 2);
    });
}

#[test]
fn a_full_queue_holds_epochs_back_until_it_drains() {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let recorder = Recorder::default();
    recorder.hold.store(true, Ordering::SeqCst);
    // One writer task and a queue of one batch: the third epoch cannot even be queued.
    let writer = Writer::start(runtime.handle(), recorder.clone(), 1, 1);

    timely::execute_directly(move |worker| {
        let mut data = InputHandle::<u64, timely::container::CapacityContainerBuilder<Vec<u64>>>::new();
        let probe = ProbeHandle::new();
        worker.dataflow(|scope| {
            let gate = timely::dataflow::operators::generic::operator::empty(scope);
            scope
                .input_from(&mut data)
                .flush_epochs::<Vec<u64>, _, _>(gate, Pipeline, "Test", writer.clone(), |epoch, values| {
                    vec![Insert { table: format!("e{epoch}"), body: Bytes::new(), rows: values.len() }]
                })
                .probe_with(&probe);
        });
        for epoch in 0..5u64 {
            data.send(epoch);
            data.advance_to(epoch + 1);
        }
        let until = std::time::Instant::now() + Duration::from_millis(100);
        while std::time::Instant::now() < until {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        assert!(probe.less_than(&1), "nothing is released while writes are held");
        assert!(writer.queued() <= 1, "the queue never holds more than its capacity");
        recorder.hold.store(false, Ordering::SeqCst);
        while probe.less_than(&5) {
            worker.step_or_park(Some(Duration::from_millis(1)));
        }
        let written = recorder.written.lock().unwrap().clone();
        assert_eq!(written, vec!["e0=", "e1=", "e2=", "e3=", "e4="]);
    });
}

/// Inserts that take longer the earlier their epoch, and a count of how many run at once.
#[derive(Clone, Default)]
struct SlowFirst {
    written: Arc<Mutex<Vec<String>>>,
    running: Arc<std::sync::atomic::AtomicUsize>,
    most_at_once: Arc<std::sync::atomic::AtomicUsize>,
}

impl InsertService for SlowFirst {
    fn insert(&self, table: &str, _body: Bytes) -> impl Future<Output = Result<(), SinkError>> + Send {
        let this = self.clone();
        let table = table.to_owned();
        async move {
            let now = this.running.fetch_add(1, Ordering::SeqCst) + 1;
            this.most_at_once.fetch_max(now, Ordering::SeqCst);
            let epoch: u64 = table[1..].parse().unwrap();
            tokio::time::sleep(Duration::from_millis(40 - 4 * epoch)).await;
            this.written.lock().unwrap().push(table);
            this.running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        }
    }
}

/// Eight epochs complete at once, four writer tasks, earlier inserts slower: `flush_epochs`
/// lets them overlap and land out of order; `flush_epochs_in_order` writes one at a time, in
/// epoch order.
#[test]
fn in_order_flushing_lands_one_epoch_after_the_other() {
    for in_order in [false, true] {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let service = SlowFirst::default();
        let writer = Writer::start(runtime.handle(), service.clone(), 4, 16);
        timely::execute_directly(move |worker| {
            let mut data = InputHandle::<u64, timely::container::CapacityContainerBuilder<Vec<u64>>>::new();
            let probe = ProbeHandle::new();
            worker.dataflow(|scope| {
                let gate = timely::dataflow::operators::generic::operator::empty(scope);
                let stream = scope.input_from(&mut data);
                let make = |epoch: u64, values: Vec<u64>| {
                    vec![Insert { table: format!("e{epoch}"), body: Bytes::new(), rows: values.len() }]
                };
                let written = if in_order {
                    stream.flush_epochs_in_order::<Vec<u64>, _, _>(gate, Pipeline, "Plan", writer.clone(), make)
                } else {
                    stream.flush_epochs::<Vec<u64>, _, _>(gate, Pipeline, "Plan", writer.clone(), make)
                };
                written.probe_with(&probe);
            });
            for epoch in 0..8 {
                data.send(epoch);
                data.advance_to(epoch + 1);
            }
            while probe.less_than(&8) {
                worker.step_or_park(Some(Duration::from_millis(1)));
            }
        });
        let written = service.written.lock().unwrap().clone();
        let most = service.most_at_once.load(Ordering::SeqCst);
        if in_order {
            assert_eq!(written, (0..8).map(|e| format!("e{e}")).collect::<Vec<_>>());
            assert_eq!(most, 1, "one epoch in flight at a time");
        } else {
            assert!(most > 1, "the concurrent flush overlaps its writes ({written:?})");
        }
    }
}
