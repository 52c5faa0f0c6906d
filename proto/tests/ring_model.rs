//! Property tests: the shared-memory rings behave like a bounded FIFO (a `VecDeque` model) from
//! any starting index (the u32 wrap and the CQ's phase flips included), and hostile tags are
//! never taken for anything but what they must be.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvmed_proto::layout::{RingLayout, CQ_HEAD_OFFSET, SQ_ENTRIES_OFFSET, SQ_HEAD_OFFSET};
use nvmed_proto::ring::{completion_ring, submission_ring, Consumer, Producer, SharedRing};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::{Cqe, Sqe, SQE_SEQ_OFFSET};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Push(u8),
    Publish,
    Pop(u8),
    /// The producer learns the consumer's head some other way (as the client does from
    /// completions), possibly a stale value `.0` entries behind.
    Observe(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (1u8..20).prop_map(Op::Push),
        Just(Op::Publish),
        (1u8..20).prop_map(Op::Pop),
        (0u8..20).prop_map(Op::Observe),
    ]
}

/// Runs `ops` against a 16-entry ring starting at `start` and a `VecDeque`. A ring that got to
/// `start` wrote the lap before it: that lap is written (and consumed) first, so the slots hold
/// what they would (stale tags), not zeroes.
fn check_fifo<E: nvmed_proto::ring::SharedEntry + core::fmt::Debug>(
    ops: Vec<Op>,
    start: u32,
    ring: fn(Arc<SharedMemory>, &RingLayout) -> SharedRing<E>,
    head_offset: usize,
    make: fn(u64) -> E,
    key: fn(&E) -> u64,
    hinted: bool,
) -> Result<(), TestCaseError> {
    let layout = RingLayout::new(16, 16).unwrap();
    let mem = Arc::new(SharedMemory::anonymous(layout.total_size).unwrap());
    if start != 0 {
        let mut before = Producer::new(ring(mem.clone(), &layout), start.wrapping_sub(16));
        for i in 0..16 {
            before.push_unchecked(make(1_000_000 + i));
        }
        before.publish();
    }
    mem.store_u32(head_offset, start, Ordering::Relaxed);
    let mut prod = Producer::new(ring(mem.clone(), &layout), start);
    let mut cons = Consumer::new(ring(mem.clone(), &layout), start);
    let mut published: VecDeque<u64> = VecDeque::new();
    // Sizes of the published batches not yet consumed (the first: what is left of it).
    let mut batches: VecDeque<usize> = VecDeque::new();
    let mut pending: Vec<u64> = Vec::new();
    let mut next = 0u64;
    for op in ops {
        match op {
            Op::Push(n) => {
                for _ in 0..n {
                    let full = published.len() + pending.len() == 16;
                    let pushed = prod.push(make(next)).unwrap();
                    prop_assert_eq!(pushed, !full);
                    if pushed {
                        pending.push(next);
                        next += 1;
                    }
                }
            }
            Op::Publish => {
                prod.publish();
                if !pending.is_empty() {
                    batches.push_back(pending.len());
                }
                published.extend(pending.drain(..));
                prod.prefetch_free(16);
            }
            Op::Observe(behind) => prod.observe_head(cons.head().wrapping_sub(u32::from(behind))),
            Op::Pop(n) => {
                for _ in 0..n {
                    let got = cons.pop().map(|e| key(&e));
                    prop_assert_eq!(got, published.pop_front());
                    if got.is_some() {
                        batches[0] -= 1;
                        if batches[0] == 0 {
                            batches.pop_front();
                        }
                    }
                }
            }
        }
        // With batch hints (the SQ) a look sees the batch at the head, to its end and no further;
        // without (the CQ), everything published.
        let visible = if hinted { batches.front().copied().unwrap_or(0) } else { published.len() };
        prop_assert_eq!(cons.ready(3) as usize, visible.min(3));
        prop_assert_eq!(cons.ready(16) as usize, visible);
    }
    Ok(())
}

proptest! {
    #[test]
    fn submission_ring_matches_vecdeque(ops in proptest::collection::vec(op(), 1..300), start in any::<u32>()) {
        check_fifo(ops, start, submission_ring, SQ_HEAD_OFFSET, Sqe::nop, |e| e.user_data, true)?;
    }

    #[test]
    fn completion_ring_matches_vecdeque(ops in proptest::collection::vec(op(), 1..300), start in any::<u32>()) {
        let make = |n| Cqe { user_data: n, status: (n as u32) & 0x7fff_ffff, result: 1 };
        let key = |c: &Cqe| {
            assert_eq!(c.status_word(), (c.user_data as u32) & 0x7fff_ffff);
            c.user_data
        };
        check_fifo(ops, start, completion_ring, CQ_HEAD_OFFSET, make, key, false)?;
    }

    /// A client writing anything into its SQ's tags: the broker takes exactly the leading run
    /// of slots whose tag is the one their index must carry, never more than it asked for.
    #[test]
    fn hostile_seqs_are_only_taken_when_exact(
        tags in proptest::collection::vec(prop_oneof![Just(None), any::<u32>().prop_map(Some)], 16),
        start in any::<u32>(),
    ) {
        let layout = RingLayout::new(16, 16).unwrap();
        let mem = Arc::new(SharedMemory::anonymous(layout.total_size).unwrap());
        for (i, t) in tags.iter().enumerate() {
            let index = start.wrapping_add(i as u32);
            let value = t.unwrap_or(Sqe::seq_for(index));
            mem.store_u32(SQ_ENTRIES_OFFSET + (index & 15) as usize * 64 + SQE_SEQ_OFFSET, value, Ordering::Relaxed);
        }
        let exact = |i: usize| tags[i].is_none_or(|v| v == Sqe::seq_for(start.wrapping_add(i as u32)));
        let run = (0..16).take_while(|&i| exact(i)).count() as u32;
        let mut cons = Consumer::new(submission_ring(mem, &layout), start);
        prop_assert_eq!(cons.ready(16), run);
        prop_assert_eq!(cons.ready(4), run.min(4));
    }
}
