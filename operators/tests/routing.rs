//! Routing: with several workers, every event of one video is counted on one worker, the one
//! `route(video_id) % workers` names, whichever worker read it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Input, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use videocount_events::{Event, route};

#[test]
fn each_video_is_counted_on_the_worker_its_hash_names() {
    const WORKERS: usize = 3;
    let seen: Arc<Mutex<BTreeMap<String, BTreeSet<usize>>>> = Arc::default();
    let record = Arc::clone(&seen);
    timely::execute(timely::Config::process(WORKERS), move |worker| {
        let index = worker.index();
        let mut input = InputHandle::<u64, timely::container::CapacityContainerBuilder<Vec<Event>>>::new();
        let probe = ProbeHandle::new();
        let record = Arc::clone(&record);
        worker.dataflow(|scope| {
            scope
                .input_from(&mut input)
                .unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                    Exchange::new(|event: &Event| route(&event.video_id)),
                    "Record",
                    move |_, _| {
                        move |input, _output| {
                            input.for_each(|_, data| {
                                let mut seen = record.lock().unwrap();
                                for event in data.drain(..) {
                                    seen.entry(event.video_id.to_string()).or_default().insert(index);
                                }
                            });
                        }
                    },
                )
                .probe_with(&probe);
        });
        // Every worker reads events of every video, as sources reading different partitions do.
        for i in 0..300 {
            input.send(Event {
                video_id: format!("video{}", (i * 7 + index) % 50).into(),
                event_type: "view".into(),
                ts_ms: 0,
            });
        }
        input.advance_to(1);
        while probe.less_than(&1) {
            worker.step();
        }
    })
    .unwrap();

    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 50);
    let mut used = BTreeSet::new();
    for (video, workers) in seen.iter() {
        let expected = (route(video) % WORKERS as u64) as usize;
        assert_eq!(workers, &BTreeSet::from([expected]), "{video} was counted on {workers:?}");
        used.insert(expected);
    }
    assert_eq!(used.len(), WORKERS, "50 videos spread over every worker");
}
