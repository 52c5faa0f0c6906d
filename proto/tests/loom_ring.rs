//! Loom model of the ring's head/tail publication: every interleaving allowed by the memory
//! model delivers each entry exactly once, in order, and never lets the producer overwrite a
//! slot the consumer has not finished reading.
//!
//! Run with `RUSTFLAGS="--cfg loom" cargo test -p nvmed-proto --test loom_ring --release`.
#![cfg(loom)]

use core::sync::atomic::Ordering;

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicU32;
use loom::sync::Arc;
use nvmed_proto::ring::{Consumer, Producer, RingMemory};

struct LoomRing {
    head: AtomicU32,
    tail: AtomicU32,
    slots: Vec<UnsafeCell<u64>>,
}

#[derive(Clone)]
struct Handle(Arc<LoomRing>);

impl RingMemory for Handle {
    type Entry = u64;
    fn entries(&self) -> u32 {
        self.0.slots.len() as u32
    }
    fn load_head(&self, o: Ordering) -> u32 {
        self.0.head.load(o)
    }
    fn store_head(&self, v: u32, o: Ordering) {
        self.0.head.store(v, o)
    }
    fn load_tail(&self, o: Ordering) -> u32 {
        self.0.tail.load(o)
    }
    fn store_tail(&self, v: u32, o: Ordering) {
        self.0.tail.store(v, o)
    }
    fn read_entry(&self, slot: u32) -> u64 {
        // SAFETY: loom checks that this read does not race with a write to the same slot.
        self.0.slots[slot as usize].with(|p| unsafe { *p })
    }
    fn write_entry(&self, slot: u32, e: u64) {
        // SAFETY: loom checks that this write does not race with any access to the same slot.
        self.0.slots[slot as usize].with_mut(|p| unsafe { *p = e })
    }
}

#[test]
fn publication_is_ordered_and_race_free() {
    loom::model(|| {
        let ring = Handle(Arc::new(LoomRing {
            head: AtomicU32::new(0),
            tail: AtomicU32::new(0),
            slots: (0..2).map(|_| UnsafeCell::new(0)).collect(),
        }));
        const N: u64 = 3;
        let producer_mem = ring.clone();
        let t = loom::thread::spawn(move || {
            let mut p = Producer::new(producer_mem, 0);
            let mut next = 1;
            while next <= N {
                if p.push(next).unwrap() {
                    p.publish();
                    next += 1;
                } else {
                    loom::thread::yield_now();
                }
            }
        });
        let mut c = Consumer::new(ring, 0);
        let mut expect = 1;
        while expect <= N {
            match c.pop().unwrap() {
                Some(v) => {
                    assert_eq!(v, expect);
                    expect += 1;
                }
                None => loom::thread::yield_now(),
            }
        }
        t.join().unwrap();
    });
}
