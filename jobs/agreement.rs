//! Every process of a multi-process run reads the checkpoint on its own, at its own moment. A
//! plan, commit or generation row landing late (sent by a killed run) can land between two of
//! those reads, and then the processes would re-run or skip different epochs than the run
//! records (process 0's view): offsets counted twice or never. So before the run records its
//! generation, the processes compare what they read, through timely itself, and all stop when
//! they differ; a restart reads again, with nothing in flight any more.

use std::cell::RefCell;
use std::rc::Rc;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Input, Inspect, Probe};
use timely::dataflow::{InputHandle, ProbeHandle};
use timely::worker::Worker;
use videocount_clickhouse::checkpoints::JobState;

/// A digest of everything a run takes from the checkpoint, independent of map order, and of
/// the settings its blocks depend on (processes started with other flags would write other
/// blocks for the same epochs).
pub(crate) fn checkpoint_digest(state: &JobState, settings_fingerprint: u64) -> u64 {
    let mut resume: Vec<(u32, u64)> = state.resume.iter().map(|(p, o)| (*p, *o)).collect();
    resume.sort_unstable();
    let text = format!(
        "{:?}|{:?}|{:?}|{resume:?}|{}|{}|{}|{:?}|{settings_fingerprint}",
        state.last_committed,
        state.pending,
        state.pending_peers,
        state.next_epoch,
        state.generation,
        state.base_epoch,
        state.void_plans
    );
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// Every worker sends its process's digest, and the newest generation of any job its process
/// read, to all workers; each compares the digests and all decide alike. `Err` when they
/// differ; else the largest newest generation any process read (other jobs of the database
/// may record theirs while the processes start, which is no reason to stop).
pub(crate) fn all_read_the_same_checkpoint(worker: &mut Worker, digest: u64, newest: u64) -> Result<u64, String> {
    let seen = Rc::new(RefCell::new(Vec::new()));
    let mut input = InputHandle::<u64, CapacityContainerBuilder<Vec<(usize, u64, u64)>>>::new();
    let probe = ProbeHandle::new();
    let sink = Rc::clone(&seen);
    worker.dataflow::<u64, _, _>(|scope| {
        scope.input_from(&mut input).broadcast().inspect(move |x| sink.borrow_mut().push(*x)).probe_with(&probe);
    });
    input.send((worker.index(), digest, newest));
    input.close();
    while !probe.done() {
        worker.step();
    }
    let seen = seen.borrow();
    if seen.iter().all(|(_, d, _)| *d == digest) {
        return Ok(seen.iter().map(|(_, _, n)| *n).max().unwrap_or(newest));
    }
    Err(format!(
        "the processes of this run read different checkpoints or run with different settings (digests by \
         worker: {:?}): a plan, commit or generation row of an earlier run landed while they started, or their \
         flags differ (each logs its settings in its `starting` line). Nothing was recorded or written; start \
         the job again, every process with the same flags",
        seen.iter().map(|(w, d, _)| (*w, *d)).collect::<Vec<_>>()
    ))
}

#[cfg(test)]
mod tests {
    use videocount_clickhouse::checkpoints::Range;

    use super::*;

    #[test]
    fn the_digest_follows_what_was_read_not_map_order() {
        let mut a = JobState { generation: 3, next_epoch: 3 << 32, ..JobState::default() };
        let mut b = a.clone();
        a.resume.extend([(0, 10), (1, 20), (2, 30)]);
        b.resume.extend([(2, 30), (0, 10), (1, 20)]);
        assert_eq!(checkpoint_digest(&a, 7), checkpoint_digest(&b, 7));
        assert_ne!(checkpoint_digest(&a, 7), checkpoint_digest(&a, 8), "other settings change it");
        b.pending.insert((2 << 32) + 5, vec![Range { partition: 0, start: 0, end: 10 }]);
        assert_ne!(checkpoint_digest(&a, 7), checkpoint_digest(&b, 7), "a late plan changes it");
        let mut c = a.clone();
        c.generation = 4;
        assert_ne!(checkpoint_digest(&a, 7), checkpoint_digest(&c, 7));
    }
}
