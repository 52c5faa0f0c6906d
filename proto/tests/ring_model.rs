//! Property test: the shared-memory ring behaves like a bounded FIFO (a `VecDeque` model),
//! and hostile index values are reported, never obeyed.

use std::collections::VecDeque;
use std::sync::Arc;

use nvmed_proto::layout::{RingLayout, SQ_TAIL_OFFSET};
use nvmed_proto::ring::{submission_ring, Consumer, Producer, RingError};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::Sqe;
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

proptest! {
    #[test]
    fn ring_matches_vecdeque(ops in proptest::collection::vec(op(), 1..300), start in any::<u32>()) {
        let layout = RingLayout::new(16, 16).unwrap();
        let mem = Arc::new(SharedMemory::anonymous(layout.total_size).unwrap());
        // Start near an arbitrary index to cover wrap-around of the u32 counters.
        mem.store_u32(SQ_TAIL_OFFSET, start, std::sync::atomic::Ordering::Relaxed);
        mem.store_u32(nvmed_proto::layout::SQ_HEAD_OFFSET, start, std::sync::atomic::Ordering::Relaxed);
        let mut prod = Producer::new(submission_ring(mem.clone(), &layout), start);
        let mut cons = Consumer::new(submission_ring(mem.clone(), &layout), start);
        let mut published: VecDeque<u64> = VecDeque::new();
        let mut pending: Vec<u64> = Vec::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Push(n) => for _ in 0..n {
                    let full = published.len() + pending.len() == 16;
                    let pushed = prod.push(Sqe::nop(next)).unwrap();
                    prop_assert_eq!(pushed, !full);
                    if pushed { pending.push(next); next += 1; }
                },
                Op::Publish => {
                    prod.publish();
                    published.extend(pending.drain(..));
                    prod.prefetch_free(16);
                }
                Op::Observe(behind) => prod.observe_head(cons.head().wrapping_sub(u32::from(behind))),
                Op::Pop(n) => for _ in 0..n {
                    cons.prefetch(cons.available().unwrap());
                    let got = cons.pop().unwrap().map(|e| e.user_data);
                    prop_assert_eq!(got, published.pop_front());
                },
            }
            prop_assert_eq!(cons.available().unwrap() as usize, published.len());
        }
    }

    #[test]
    fn hostile_tail_is_reported(tail in any::<u32>()) {
        let layout = RingLayout::new(16, 16).unwrap();
        let mem = Arc::new(SharedMemory::anonymous(layout.total_size).unwrap());
        mem.store_u32(SQ_TAIL_OFFSET, tail, std::sync::atomic::Ordering::Relaxed);
        let cons = Consumer::new(submission_ring(mem, &layout), 0);
        match cons.available() {
            Ok(n) => prop_assert!(n <= 16 && n == tail),
            Err(RingError::Corrupt { tail: t, .. }) => prop_assert!(t == tail && tail > 16),
        }
    }
}
