//! Taking submissions: each round visits the sessions starting one further along than the
//! round before, takes at most [`TAKE_BATCH`] SQEs from each, and admits device commands only
//! while the device queue has room and the session is under its share of the queue's slots.
//! So no session can hold the whole queue, and no session always comes last.

use std::sync::atomic::Ordering;

use nvmed_proto::{BrokerStatus, Cqe, Opcode, RingFault, Status};

use super::split::{admit, InFlight, Partial, Split, WHOLE};
use super::{complete, IoThread};
use crate::broker::session::bump;
use crate::broker::validate::{validate, Validated};

/// Most SQEs taken from one ring per round (fairness between clients).
const TAKE_BATCH: u32 = 64;

impl IoThread {
    /// One round over every session; returns whether anything was taken or admitted.
    pub(super) fn take_submissions(&mut self) -> bool {
        let n = self.order.len();
        if n == 0 {
            return false;
        }
        let first = self.next_first % n;
        self.next_first = first + 1;
        let mut took = false;
        for i in 0..n {
            let key = self.order[(first + i) % n];
            took |= self.take_from(key);
        }
        took
    }

    fn take_from(&mut self, key: usize) -> bool {
        let limits = self.limits;
        let cap = self.dq.session_slots;
        let device_failed = self.device_failed;
        let epoch = self.epoch;
        let Some(s) = self.sessions.get_mut(key) else { return false };
        if s.faulted || s.closing.is_some() {
            return false;
        }
        let Some(ring) = s.ring.as_mut() else { return false };
        let queue = &mut self.dq.queue;
        let mut took = false;
        // Retry completions that did not fit earlier.
        while let Some(&c) = ring.overflow.front() {
            match ring.cq.push(c) {
                Ok(true) => {
                    ring.overflow.pop_front();
                    ring.dirty = true;
                }
                _ => break,
            }
        }
        // First the rest of a split request, as slots allow; nothing new before it is all in.
        if let Some(p) = s.partial.as_mut() {
            let before = p.next;
            let all_in = admit(queue, p, limits.max_transfer, &mut s.slots, cap);
            took |= p.next != before;
            if all_in {
                s.partial = None;
            } else {
                if ring.dirty {
                    self.touched.push(key);
                }
                return took;
            }
        }
        let available = match ring.sq.available() {
            Ok(n) => n,
            Err(e) => {
                complete::fault(s.id, ring, RingFault::SqTailCorrupt, e);
                s.faulted = true;
                return took;
            }
        };
        if available == 0 {
            if ring.dirty {
                self.touched.push(key);
            }
            return took;
        }
        // Room for every completion this ring may receive: never post more than fits.
        // The client's CQ head is read only when the cached view has too little room.
        let reserved = s.in_flight + ring.overflow.len() as u32;
        let free = match ring.cq.free_at_least(reserved + available.min(TAKE_BATCH)) {
            Ok(f) => f,
            Err(e) => {
                complete::fault(s.id, ring, RingFault::CqHeadCorrupt, e);
                s.faulted = true;
                return took;
            }
        };
        let room = free.saturating_sub(reserved);
        let n = available.min(room).min(TAKE_BATCH);
        let mut taken = 0;
        while taken < n {
            // Copy the entry out of shared memory once; validate only the copy.
            let sqe = ring.sq.read(taken);
            let buffers = &s.buffers;
            let decision = validate(
                &sqe,
                &s.namespaces,
                |id| buffers.get(id as usize).map(|b| (b.buffer.iova(), b.buffer.len())),
                limits,
            );
            let status = match decision {
                Ok(Validated::Nop) => Status::Success,
                Ok(Validated::Device { .. }) if device_failed => Status::Broker(BrokerStatus::DeviceFault),
                Ok(Validated::Device { cmd, buffer, len }) => {
                    if queue.free_slots() == 0 || s.slots >= cap {
                        break; // no slot for this session now: leave the entry for a later round
                    }
                    let pieces = cmd.piece_count(limits.max_transfer);
                    let split = if pieces > 1 {
                        self.splits.insert(Split { remaining: pieces, status: Status::Success }) as u32
                    } else {
                        WHOLE
                    };
                    let ctx = InFlight {
                        epoch,
                        session: key as u32,
                        buffer: buffer.unwrap_or(u32::MAX),
                        user_data: sqe.user_data,
                        len,
                        op: Opcode::from_u8(sqe.opcode).unwrap_or(Opcode::Nop),
                        split,
                    };
                    let mut p = Partial { cmd, next: 0, pieces, ctx };
                    let all_in = admit(queue, &mut p, limits.max_transfer, &mut s.slots, cap);
                    s.in_flight += 1;
                    if let Some(b) = buffer.and_then(|b| s.buffers.get_mut(b as usize)) {
                        b.in_flight += 1;
                    }
                    taken += 1;
                    if !all_in {
                        s.partial = Some(p);
                        break;
                    }
                    continue;
                }
                Err(b) => Status::Broker(b),
            };
            // Completed without the device; room was reserved above.
            let _ = ring.cq.push(Cqe { user_data: sqe.user_data, status: status.encode(), result: 0 });
            ring.dirty = true;
            bump(&s.counters.completed, 1);
            if !status.is_success() {
                bump(&s.counters.errors, 1);
            }
            taken += 1;
        }
        if taken > 0 {
            ring.sq.consume(taken);
            bump(&s.counters.submitted, u64::from(taken));
            s.counters.in_flight.store(u64::from(s.in_flight), Ordering::Relaxed);
            took = true;
        }
        if ring.dirty {
            self.touched.push(key);
        }
        took
    }
}
