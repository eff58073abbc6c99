//! `flush_epochs`: write each epoch of a stream to ClickHouse once the epoch is complete.
//!
//! ```text
//!   data ──(pact)──┐
//!                  ├─ FlushEpochs ── () at epoch e, once e's blocks are written
//!   gate ──────────┘
//! ```
//!
//! The operator folds its input into one [`EpochState`] per epoch. When neither the input
//! frontier nor the gate frontier can still reach epoch `e`, it turns `e`'s state into
//! inserts and hands them to the [`Writer`] queue without waiting. It keeps a capability for
//! `e` until the writer reports every insert written, then emits `()` at `e` and lets the
//! capability go: downstream frontiers passing `e` therefore mean "e is in ClickHouse".
//! When the queue is full the batch waits in the operator and the frontier waits with it.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::Stream;
use timely::dataflow::channels::pact::ParallelizationContract;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;
use videocount_clickhouse::rows::Insert;
use videocount_clickhouse::writer::{Batch, Writer};

/// What an epoch accumulates before it is written.
pub trait EpochState<D>: Default + 'static {
    fn absorb(&mut self, item: D);
}

impl<D: 'static> EpochState<D> for Vec<D> {
    fn absorb(&mut self, item: D) {
        self.push(item);
    }
}

/// See the module documentation.
pub trait FlushEpochs<'scope, D> {
    /// Writes each epoch of `self` through `writer` after `gate` passed it too.
    ///
    /// - `pact`: how the data is distributed over workers before folding;
    /// - `name`: the operator's name, also used in logs;
    /// - `make`: turns an epoch's state into inserts (none: nothing to write).
    fn flush_epochs<S, P, M>(
        self,
        gate: Stream<'scope, u64, Vec<()>>,
        pact: P,
        name: &str,
        writer: Writer,
        make: M,
    ) -> Stream<'scope, u64, Vec<()>>
    where
        S: EpochState<D>,
        P: ParallelizationContract<u64, Vec<D>>,
        M: FnMut(u64, S) -> Vec<Insert> + 'static;

    /// As [`FlushEpochs::flush_epochs`], but an epoch's inserts go to the writer only once the
    /// previous epoch's are written: at most one epoch of this operator is in flight, so its
    /// epochs land in ClickHouse in order (the plan of `e + 1` never lands without the plan of
    /// `e`; docs/exactly-once.md).
    fn flush_epochs_in_order<S, P, M>(
        self,
        gate: Stream<'scope, u64, Vec<()>>,
        pact: P,
        name: &str,
        writer: Writer,
        make: M,
    ) -> Stream<'scope, u64, Vec<()>>
    where
        S: EpochState<D>,
        P: ParallelizationContract<u64, Vec<D>>,
        M: FnMut(u64, S) -> Vec<Insert> + 'static;
}

impl<'scope, D: Clone + 'static> FlushEpochs<'scope, D> for Stream<'scope, u64, Vec<D>> {
    fn flush_epochs<S, P, M>(
        self,
        gate: Stream<'scope, u64, Vec<()>>,
        pact: P,
        name: &str,
        writer: Writer,
        make: M,
    ) -> Stream<'scope, u64, Vec<()>>
    where
        S: EpochState<D>,
        P: ParallelizationContract<u64, Vec<D>>,
        M: FnMut(u64, S) -> Vec<Insert> + 'static,
    {
        flush(self, gate, pact, name, writer, make, false)
    }

    fn flush_epochs_in_order<S, P, M>(
        self,
        gate: Stream<'scope, u64, Vec<()>>,
        pact: P,
        name: &str,
        writer: Writer,
        make: M,
    ) -> Stream<'scope, u64, Vec<()>>
    where
        S: EpochState<D>,
        P: ParallelizationContract<u64, Vec<D>>,
        M: FnMut(u64, S) -> Vec<Insert> + 'static,
    {
        flush(self, gate, pact, name, writer, make, true)
    }
}

/// Both methods; `in_order`: one epoch in flight at a time.
fn flush<'scope, D, S, P, M>(
    stream: Stream<'scope, u64, Vec<D>>,
    gate: Stream<'scope, u64, Vec<()>>,
    pact: P,
    name: &str,
    writer: Writer,
    mut make: M,
    in_order: bool,
) -> Stream<'scope, u64, Vec<()>>
where
    D: Clone + 'static,
    S: EpochState<D>,
    P: ParallelizationContract<u64, Vec<D>>,
    M: FnMut(u64, S) -> Vec<Insert> + 'static,
{
    let scope = stream.scope();
    let worker = scope.worker();
    let label = name.to_owned();
    stream.binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
        gate,
        pact,
        timely::dataflow::channels::pact::Pipeline,
        name,
        move |_initial, info| {
            let activator = scope.activator_for(Rc::clone(&info.address));
            let wake = worker.sync_activator_for(info.address.to_vec());
            let mut open: BTreeMap<u64, (Capability<u64>, S)> = BTreeMap::new();
            let mut blocked: VecDeque<(Capability<u64>, Batch, Arc<AtomicBool>)> = VecDeque::new();
            let mut writing: Vec<(Capability<u64>, Arc<AtomicBool>)> = Vec::new();
            move |(input, frontier), (gate, gate_frontier), output| {
                input.for_each(|stamp, data| {
                    let Some(&time) = stamp.least() else { return };
                    let (_, state) = open.entry(time).or_insert_with(|| {
                        (stamp.retain_least(output.output_index()).expect("stamp has a time"), S::default())
                    });
                    for item in data.drain(..) {
                        state.absorb(item);
                    }
                });
                gate.for_each(|_, _| {});

                // Epochs that neither input can reach any more are complete.
                while let Some((&epoch, _)) = open.first_key_value() {
                    if frontier.less_equal(&epoch) || gate_frontier.less_equal(&epoch) {
                        break;
                    }
                    let (capability, state) = open.remove(&epoch).expect("first key exists");
                    let inserts = make(epoch, state);
                    if inserts.is_empty() {
                        output.session(&capability).give(());
                        continue;
                    }
                    let done = Arc::new(AtomicBool::new(false));
                    let (flag, wake) = (Arc::clone(&done), wake.clone());
                    let batch = Batch {
                        label: format!("{label} epoch {epoch}"),
                        inserts,
                        on_done: Box::new(move || {
                            flag.store(true, Ordering::Release);
                            let _ = wake.activate();
                        }),
                    };
                    blocked.push_back((capability, batch, done));
                }

                // Written epochs: announce them and release their capabilities.
                writing.retain(|(capability, done)| {
                    if done.load(Ordering::Acquire) {
                        output.session(capability).give(());
                        false
                    } else {
                        true
                    }
                });

                // Hand waiting batches to the queue, in order, as long as it has room (and,
                // in order, once the previous epoch is written; its completion wakes us).
                while (!in_order || writing.is_empty())
                    && let Some((capability, batch, done)) = blocked.pop_front()
                {
                    match writer.try_submit(batch) {
                        Ok(()) => writing.push((capability, done)),
                        Err(batch) => {
                            blocked.push_front((capability, batch, done));
                            activator.activate_after(Duration::from_millis(5));
                            break;
                        }
                    }
                }
            }
        },
    )
}
