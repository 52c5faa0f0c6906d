//! Loom model of the ring's publication by per-entry tags (sequence numbers or phase bits) and
//! heads: every interleaving allowed by the memory model delivers each entry exactly once, in
//! order, and never lets the producer overwrite a slot the consumer has not finished reading.
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
    tags: Vec<AtomicU32>,
    slots: Vec<UnsafeCell<u64>>,
    /// Tag by NVMe-style phase bit (flips every lap) instead of a sequence number.
    phase: bool,
    /// Publish and look with `Relaxed` instead of `Release`/`Acquire` (the bug loom must find).
    weak: bool,
    /// Write the entry at publish, just before its tag (as the CQ does), instead of at push.
    whole_at_publish: bool,
}

#[derive(Clone)]
struct Handle(Arc<LoomRing>);

impl Handle {
    fn new(entries: usize, phase: bool, weak: bool) -> Self {
        Self::with(entries, phase, weak, false)
    }
    fn with(entries: usize, phase: bool, weak: bool, whole_at_publish: bool) -> Self {
        Handle(Arc::new(LoomRing {
            head: AtomicU32::new(0),
            tags: (0..entries).map(|_| AtomicU32::new(0)).collect(),
            slots: (0..entries).map(|_| UnsafeCell::new(0)).collect(),
            phase,
            weak,
            whole_at_publish,
        }))
    }
    fn slot(&self, index: u32) -> usize {
        (index & (self.entries() - 1)) as usize
    }
    fn tag_for(&self, index: u32) -> u32 {
        if self.0.phase {
            u32::from(index & self.entries() == 0)
        } else {
            index.wrapping_add(1)
        }
    }
    fn order(&self, strong: Ordering) -> Ordering {
        if self.0.weak {
            Ordering::Relaxed
        } else {
            strong
        }
    }
}

impl RingMemory for Handle {
    type Entry = u64;
    /// The tag, and the entry when it is written at publish.
    type Tag = (u32, Option<u64>);
    fn entries(&self) -> u32 {
        self.0.slots.len() as u32
    }
    fn load_head(&self, o: Ordering) -> u32 {
        self.0.head.load(o)
    }
    fn store_head(&self, v: u32, o: Ordering) {
        self.0.head.store(v, o)
    }
    fn write_body(&self, index: u32, e: u64) -> (u32, Option<u64>) {
        if self.0.whole_at_publish {
            return (self.tag_for(index), Some(e));
        }
        // SAFETY: loom checks that this write does not race with any access to the same slot.
        self.0.slots[self.slot(index)].with_mut(|p| unsafe { *p = e });
        (self.tag_for(index), None)
    }
    fn store_tag(&self, index: u32, (tag, entry): (u32, Option<u64>), batch: u32) {
        if let Some(e) = entry {
            // SAFETY: as in `write_body`.
            self.0.slots[self.slot(index)].with_mut(|p| unsafe { *p = e });
        }
        // The batch hint rides in the same word, as in the SQE's tag word.
        self.0.tags[self.slot(index)].store(tag | (batch << 16), self.order(Ordering::Release))
    }
    fn published(&self, index: u32) -> Option<u32> {
        let word = self.0.tags[self.slot(index)].load(self.order(Ordering::Acquire));
        (word & 0xffff == self.tag_for(index)).then_some(word >> 16)
    }
    fn read_entry(&self, index: u32) -> u64 {
        // SAFETY: loom checks that this read does not race with a write to the same slot.
        self.0.slots[self.slot(index)].with(|p| unsafe { *p })
    }
}

/// Each entry delivered once, in order, with no data race, over `entries` slots.
fn publication_model(entries: usize, phase: bool, weak: bool) {
    publication_model_with(entries, phase, weak, false)
}

fn publication_model_with(entries: usize, phase: bool, weak: bool, whole_at_publish: bool) {
    loom::model(move || {
        let ring = Handle::with(entries, phase, weak, whole_at_publish);
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
            match c.pop() {
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

#[test]
fn publication_by_seq_is_ordered_and_race_free() {
    publication_model(2, false, false);
}

#[test]
fn publication_by_phase_is_ordered_and_race_free() {
    publication_model(2, true, false);
}

/// Several entries per publish: the first entry's tag (with the batch's size) is stored last,
/// and the consumer, having seen it, reads the rest of the batch on the strength of that one
/// `Acquire`: two batches (two entries, then one) over two slots, by seq and by phase.
#[test]
fn batches_published_first_entry_last_are_ordered_and_race_free() {
    for phase in [false, true] {
        loom::model(move || {
            let ring = Handle::new(2, phase, false);
            let producer_mem = ring.clone();
            let t = loom::thread::spawn(move || {
                let mut p = Producer::new(producer_mem, 0);
                assert!(p.push(1).unwrap() && p.push(2).unwrap());
                p.publish();
                while !p.push(3).unwrap() {
                    loom::thread::yield_now();
                }
                p.publish();
            });
            let mut c = Consumer::new(ring, 0);
            let mut expect = 1;
            while expect <= 3 {
                let n = c.ready(2);
                if n == 0 {
                    loom::thread::yield_now();
                    continue;
                }
                if expect == 1 {
                    assert_eq!(n, 2, "the first batch seen in part");
                }
                for i in 0..n {
                    assert_eq!(c.read(i), expect + u64::from(i));
                }
                c.consume(n);
                expect += u64::from(n);
            }
            t.join().unwrap();
        });
    }
}

/// The CQ's way: the whole entry written at publish, just before its phase bit.
#[test]
fn whole_entries_written_at_publish_are_ordered_and_race_free() {
    publication_model_with(2, true, false, true);
    publication_model_with(1, true, false, true);
}

/// One slot: the phase flips with every entry, the tightest wrap-around there is.
#[test]
fn publication_by_phase_in_one_slot_is_ordered_and_race_free() {
    publication_model(1, true, false);
}

/// The model catches a tag stored or loaded without `Release`/`Acquire`: the entry's copy then
/// races with its write.
#[test]
#[should_panic(expected = "Causality violation")]
fn without_release_acquire_the_entry_read_races() {
    publication_model(2, false, true);
}

/// A flags word in loom memory, with its wake index.
struct LoomFlags(AtomicU32, AtomicU32);

impl LoomFlags {
    fn new() -> Self {
        Self(AtomicU32::new(0), AtomicU32::new(0))
    }
}

impl nvmed_proto::wakeup::FlagWord for LoomFlags {
    fn set(&self, bits: u32) {
        self.0.fetch_or(bits, Ordering::SeqCst);
    }
    fn clear(&self, bits: u32) {
        self.0.fetch_and(!bits, Ordering::SeqCst);
    }
    fn load(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    fn set_wake_at(&self, index: u32) {
        self.1.store(index, Ordering::Relaxed);
    }
    fn wake_at(&self) -> u32 {
        self.1.load(Ordering::Relaxed)
    }
}

/// An eventfd: a latch the waker sets and the sleeper consumes.
struct EventFd {
    signalled: loom::sync::Mutex<bool>,
    cond: loom::sync::Condvar,
}

impl EventFd {
    fn new() -> Self {
        Self { signalled: loom::sync::Mutex::new(false), cond: loom::sync::Condvar::new() }
    }
    fn signal(&self) {
        *self.signalled.lock().unwrap() = true;
        self.cond.notify_one();
    }
    fn wait(&self) {
        let mut s = self.signalled.lock().unwrap();
        while !*s {
            s = self.cond.wait(s).unwrap();
        }
        *s = false;
    }
}

/// The broker's side (consumer that sleeps when idle) and the client's side (producer that
/// signals only when the flag says so), with nvmed's real handshake functions. A lost wakeup
/// would leave the consumer blocked forever, which loom reports as a deadlock.
fn handshake_model(use_real_fences: bool) {
    use nvmed_proto::wakeup::{announce_sleep, end_sleep, peer_flags, FlagWord};
    const NEED_WAKEUP: u32 = 1;
    loom::model(move || {
        let ring = Handle::new(2, false, false);
        let flags = Arc::new(LoomFlags::new());
        let efd = Arc::new(EventFd::new());
        let (pm, pf, pe) = (ring.clone(), flags.clone(), efd.clone());
        let producer = loom::thread::spawn(move || {
            let mut p = Producer::new(pm, 0);
            for v in 1..=2u64 {
                assert!(p.push(v).unwrap());
                p.publish();
                let f = if use_real_fences { peer_flags(&*pf) } else { pf.load() };
                if f & NEED_WAKEUP != 0 {
                    pe.signal();
                }
            }
        });
        let mut c = Consumer::new(ring, 0);
        let mut got = 0;
        while got < 2 {
            if c.pop().is_some() {
                got += 1;
                continue;
            }
            if use_real_fences {
                announce_sleep(&*flags, NEED_WAKEUP);
            } else {
                flags.set(NEED_WAKEUP);
            }
            if c.ready(1) > 0 {
                end_sleep(&*flags, NEED_WAKEUP);
                continue;
            }
            efd.wait();
            end_sleep(&*flags, NEED_WAKEUP);
        }
        producer.join().unwrap();
    });
}

#[test]
fn sleep_wake_handshake_loses_no_wakeup() {
    handshake_model(true);
}

/// The model is strong enough to catch the bug the fences prevent: the consumer sleeps forever
/// (loom reports the deadlock: the producer finished, the consumer is blocked).
#[test]
#[should_panic(expected = "deadlock; threads = [(Id(0), Blocked(Location(None))), (Id(1), Terminated)]")]
fn without_the_fences_a_wakeup_is_lost() {
    handshake_model(false);
}

/// A client waiting for two completions with a wake index (`wait(2)`), the broker publishing
/// them one at a time and signalling only when [`wake_due`] says the index is reached: no
/// wakeup is lost (the client would block forever), and a sleep whose index is not reached
/// yet is not ended early (counted: the client never wakes with fewer than it asked for,
/// unless it sleeps twice).
///
/// [`wake_due`]: nvmed_proto::wakeup::wake_due
fn wake_index_model(two_publishes: bool) {
    use nvmed_proto::wakeup::{announce_sleep_until, end_sleep, wake_due};
    const WAITING: u32 = 1;
    const WAKE_AT: u32 = 2;
    loom::model(move || {
        let ring = Handle::new(2, true, false);
        let flags = Arc::new(LoomFlags::new());
        let efd = Arc::new(EventFd::new());
        let (pm, pf, pe) = (ring.clone(), flags.clone(), efd.clone());
        let producer = loom::thread::spawn(move || {
            let mut p = Producer::new(pm, 0);
            let mut signals = 0;
            for v in 1..=2u64 {
                assert!(p.push(v).unwrap());
                if two_publishes || v == 2 {
                    p.publish();
                    if wake_due(&*pf, WAITING, WAKE_AT, p.tail()) {
                        pe.signal();
                        signals += 1;
                    }
                }
            }
            signals
        });
        let mut c = Consumer::new(ring, 0);
        let mut got = 0u32;
        let mut sleeps = 0;
        while got < 2 {
            let n = c.ready(2 - got);
            if n > 0 {
                c.consume(n);
                got += n;
                continue;
            }
            // As `NvmeRing::wait`: announce, look again, take what is there; asleep with the same
            // index if that was not all (the index still names the last entry waited for).
            announce_sleep_until(&*flags, WAITING, WAKE_AT, c.head().wrapping_add(2 - got));
            let n = c.ready(2 - got);
            c.consume(n);
            got += n;
            if got == 2 {
                end_sleep(&*flags, WAITING | WAKE_AT);
                break;
            }
            if n > 0 {
                // A look reads one published batch and stops at its end: only a look that
                // found nothing makes sleeping safe. (Sleeping here instead, as `wait` once did,
                // deadlocks this model: the second batch, published before the bits were set,
                // is never looked at and never signalled.)
                continue;
            }
            efd.wait();
            sleeps += 1;
            end_sleep(&*flags, WAITING | WAKE_AT);
        }
        let signals = producer.join().unwrap();
        // One signal at most: the first publish (one entry of the two waited for) never wakes.
        assert!(signals <= 1, "woken before the wake index was reached");
        assert!(sleeps <= 1);
    });
}

#[test]
fn a_wake_index_loses_no_wakeup_and_wakes_once() {
    wake_index_model(true);
}

#[test]
fn a_wake_index_reached_in_one_publish_wakes() {
    wake_index_model(false);
}

fn loom_ring(entries: usize) -> Handle {
    Handle::new(entries, false, false)
}

/// Why the client may skip its look at `BROKER_CQ_WAIT` after reaping while it never had more
/// requests outstanding than CQ entries: a broker that sees an SQE published (its tag, Acquire)
/// and then reads the CQ head sees at least the head the client stored before publishing it,
/// so it always finds CQ room for what it sees and never has reason to wait for the client.
/// `overcommit`: the client publishes a second request before reaping the first completion
/// (two outstanding, one CQ entry), and then the broker can find no room (the assertion fails).
fn cq_room_model(overcommit: bool) {
    loom::model(move || {
        let (sq, cq) = (loom_ring(2), loom_ring(1));
        let (csq, ccq) = (sq.clone(), cq.clone());
        let client = loom::thread::spawn(move || {
            let mut sq = Producer::new(csq, 0);
            let mut cq = Consumer::new(ccq, 0);
            let mut reap = || loop {
                if cq.pop().is_some() {
                    break;
                }
                loom::thread::yield_now();
            };
            assert!(sq.push(1).unwrap());
            sq.publish();
            if !overcommit {
                reap();
            }
            assert!(sq.push(2).unwrap());
            sq.publish();
            if overcommit {
                reap();
            }
            reap();
        });
        let mut sq = Consumer::new(sq, 0);
        let mut cq = Producer::new(cq, 0);
        for _ in 0..2 {
            let available = loop {
                match sq.ready(2) {
                    0 => loom::thread::yield_now(),
                    n => break n,
                }
            };
            // The broker's test before taking (and before announcing CQ_WAIT): room for all.
            assert!(cq.free().unwrap() >= available, "the broker would wait for CQ room");
            let v = sq.read(0);
            sq.consume(1);
            assert!(cq.push(v).unwrap());
            cq.publish();
        }
        client.join().unwrap();
    });
}

#[test]
fn within_cq_size_the_broker_always_finds_cq_room() {
    cq_room_model(false);
}

#[test]
#[should_panic(expected = "the broker would wait for CQ room")]
fn beyond_cq_size_the_broker_may_find_no_room() {
    cq_room_model(true);
}
