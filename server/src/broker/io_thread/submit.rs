//! Taking submissions: each round visits the sessions starting one further along than the
//! round before, takes at most [`TAKE_BATCH`] SQEs from each, and admits device commands only
//! while the device queue has room and the session is under its share of the queue's slots.
//! So no session can hold the whole queue, and no session always comes last.

use std::sync::atomic::Ordering;

use nvmed_proto::{BrokerStatus, Cqe, Opcode, RingFault, Segment, Status, MAX_SEGMENTS};
use zerocopy::FromBytes;

use super::split::{admit, Admission, InFlight, Partial, Split, Work, WHOLE};
use super::vectored::{VecIo, VecWork};
use super::{complete, IoThread};
use crate::broker::sched::Dispatch;
use crate::broker::session::{bump, SessionCounters};
use crate::broker::validate::{validate, validate_segments, Validated, SEGMENT_SIZE};
use crate::nvme::{Cursor, RwCommand};

/// Most SQEs taken from one ring per round (fairness between clients).
const TAKE_BATCH: u32 = 64;

/// Most SQEs one tenant's turn takes, over all of its rings on the thread. Requests for the
/// device are held by the tenant's deficit and limits anyway; this bounds the others (no-ops,
/// requests refused at validation), so a tenant with many rings cannot make every round long.
const TURN_BUDGET: u32 = 8 * TAKE_BATCH;

/// Most SQEs taken per round from a ring without a tenant (a session granted no namespace:
/// it can send no-ops and refused requests only).
const TENANTLESS_BATCH: u32 = 8;

impl IoThread {
    /// One round: each ring with work makes its tenants want a turn; each controller's
    /// scheduler then hands out turns (deficit round robin by weight, within each tenant's
    /// limits and share of the queue), and a turn takes SQEs from that tenant's rings. Rings
    /// without a tenant (no namespace) are visited in turn. Returns whether anything was taken
    /// or admitted.
    pub(super) fn take_submissions(&mut self) -> bool {
        let n = self.order.len();
        if n == 0 {
            return false;
        }
        // Rotations by compare and subtract: a division per ring per round costs more than the
        // rest of a look at an idle ring.
        let first = if self.next_first >= n { 0 } else { self.next_first };
        self.next_first = first + 1;
        let mut took = false;
        let mut wanted = false;
        // The schedulers' clock, read at most once (and only if needed) in the loop.
        let mut now_ns: Option<u64> = None;
        for i in 0..n {
            let at = first + i;
            let key = self.order[if at >= n { at - n } else { at }];
            let s = &mut self.sessions[key];
            if s.faulted || s.closing.is_some() {
                continue;
            }
            if let Some(p) = s.partial.as_ref() {
                // The rest of a split request was charged as one request when dispatched; it
                // goes in its tenant's turns, but a tenant the scheduler would not visit now
                // (at its queue-depth cap, perhaps with this very request, or over its share)
                // would never get one: then it goes here, as device slots free up. Budget 0:
                // nothing new is taken.
                let c = usize::from(p.ctx.ctrl);
                let waits = match s.tenants[c] {
                    Some((_, t)) => {
                        let now = *now_ns.get_or_insert_with(|| self.now_ns());
                        !self.ports[c].sched.can_dispatch(t, now)
                    }
                    None => false, // taken just below, as every tenantless ring
                };
                if waits {
                    took |= self.take_from(key, 0, 0).0;
                }
            }
            let s = &mut self.sessions[key];
            let Some(ring) = s.ring.as_mut() else { continue };
            let wants = s.partial.is_some() || !ring.overflow.is_empty() || ring.sq.ready(1) > 0;
            if !wants {
                if ring.dirty {
                    self.touched.push(key);
                }
                continue;
            }
            if s.tenants.iter().all(Option::is_none) {
                took |= self.take_from(key, 0, TENANTLESS_BATCH).0;
                continue;
            }
            for &(tk, id) in s.tenants.iter().flatten() {
                self.ports[usize::from(tk.controller)].sched.set_has_work(id, true);
            }
            wanted = true;
        }
        if !wanted {
            return took;
        }
        let now = self.now_ns();
        self.throttled_until = None;
        for c in 0..self.ports.len() {
            // Each tenant at most twice per round: then back to reaping.
            for _ in 0..2 * self.ports[c].tenant_rings.len() {
                let Some(t) = self.ports[c].sched.next_tenant(now) else { break };
                let mut visit = std::mem::take(&mut self.visit);
                visit.clear();
                let start = match self.ports[c].tenant_rings.get_mut(&t) {
                    Some((rings, next)) => {
                        visit.extend_from_slice(rings);
                        *next = next.wrapping_add(1);
                        *next
                    }
                    None => 0,
                };
                let mut more = false;
                let count = visit.len();
                let start = if count > 1 { start % count } else { 0 };
                let mut budget = TURN_BUDGET;
                for j in 0..count {
                    if budget == 0 {
                        // The turn is spent: the rest of its rings wait for its next one.
                        more = true;
                        break;
                    }
                    let at = start + j;
                    let (t_took, t_more, taken) =
                        self.take_from(visit[if at >= count { at - count } else { at }], now, budget);
                    took |= t_took;
                    more |= t_more;
                    budget = budget.saturating_sub(taken);
                }
                self.visit = visit;
                if !more {
                    self.ports[c].sched.set_has_work(t, false);
                }
            }
            if let Some(w) = self.ports[c].sched.next_wakeup(now) {
                self.throttled_until = Some(self.throttled_until.map_or(w, |u| u.min(w)));
            }
        }
        took
    }

    /// Takes what it may from one ring at `now` (schedulers' clock), at most `budget` SQEs
    /// (and [`TAKE_BATCH`]); returns whether anything was taken or admitted, whether the ring
    /// still has work it could not take, and how many SQEs it took.
    fn take_from(&mut self, key: usize, now: u64, budget: u32) -> (bool, bool, u32) {
        let epoch = self.epoch;
        let Some(s) = self.sessions.get_mut(key) else { return (false, false, 0) };
        if s.faulted || s.closing.is_some() {
            return (false, false, 0);
        }
        let batch = TAKE_BATCH.min(budget);
        let Some(ring) = s.ring.as_mut() else { return (false, false, 0) };
        // A ring holds at most three quarters of the segment list slots, as of device slots.
        let vec_cap = (self.vecs.capacity() - self.vecs.capacity() / 4) as u32;
        let ports = &mut self.ports;
        let limits = &self.limits;
        let vecs = &mut self.vecs;
        let scratch = &mut self.scratch;
        let counters = &*self.broker_counters;
        // Where a command for controller `c` goes.
        macro_rules! admission {
            ($c:expr) => {{
                let p = &mut ports[usize::from($c)];
                Admission {
                    queue: &mut p.dq.queue,
                    max_transfer: limits[usize::from($c)].max_transfer,
                    cap: p.dq.session_slots,
                    vec: VecIo {
                        vecs: &mut *vecs,
                        bounce: &mut p.bounce,
                        sgl: limits[usize::from($c)].sgl,
                        scratch: &mut *scratch,
                        counters,
                    },
                }
            }};
        }
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
            let c = p.ctx.ctrl;
            let all_in = admit(&mut admission!(c), p, &mut s.slots[usize::from(c)], &s.buffers, &s.counters);
            took |= p.next != before;
            if all_in {
                s.partial = None;
            } else {
                if ring.dirty {
                    self.touched.push(key);
                }
                return (took, true, 0);
            }
        }
        // Held back by the scheduler (this tenant's turn is over, or a limit holds it).
        let mut held = false;
        let mut taken_all = 0u32;
        // Whether the ring still has work it could not take.
        let more = loop {
            // The entries of the next published batch (`ready` fetched their lines together,
            // before anything else that may miss: the client's CQ head below).
            let available = ring.sq.ready(batch - taken_all);
            if available == 0 {
                break false;
            }
            // Room for every completion this ring may receive: never post more than fits.
            // The client's CQ head is read only when the cached view has too little room.
            let reserved = s.in_flight + ring.overflow.len() as u32;
            let free = match ring.cq.free_at_least(reserved + available) {
                Ok(f) => f,
                Err(e) => {
                    complete::fault(s.id, ring, RingFault::CqHeadCorrupt, e);
                    s.faulted = true;
                    return (took, false, taken_all);
                }
            };
            let room = free.saturating_sub(reserved);
            let n = available.min(room);
            let mut taken = 0;
            s.blocked_on = None;
            s.blocked_vectored = false;
            while taken < n {
                // Copy the entry out of shared memory once; validate only the copy.
                let sqe = ring.sq.read(taken);
                let buffers = &s.buffers;
                let decision = validate(
                    &sqe,
                    &s.namespaces,
                    |id| buffers.lookup(id).map(|b| (b.buffer.iova(), b.buffer.len())),
                    limits,
                );
                let op = Opcode::from_u8(sqe.opcode).unwrap_or(Opcode::Nop);
                let failed = |c: u16| ports[usize::from(c)].device_failed;
                let failure = |c: u16| {
                    Status::Broker(if ports[usize::from(c)].gone {
                        BrokerStatus::DeviceGone
                    } else {
                        BrokerStatus::DeviceFault
                    })
                };
                let status = match decision {
                    Ok(Validated::Nop) => Status::Success,
                    Ok(Validated::Device { controller: c, .. }) if failed(c) => failure(c),
                    Ok(Validated::Vectored(v)) if failed(v.controller) => failure(v.controller),
                    Ok(Validated::Device { controller: c, cmd, buffer, len }) => {
                        let p = &mut ports[usize::from(c)];
                        if p.dq.queue.free_slots() == 0 || s.slots[usize::from(c)] >= p.dq.session_slots {
                            s.blocked_on = Some(c);
                            break; // no slot for this ring now: leave the entry for a later round
                        }
                        let tenant = s.tenants[usize::from(c)].map(|(_, t)| t);
                        if let Some(t) = tenant {
                            let d = p.sched.try_dispatch(t, now, charged_bytes(op, len), op.modifies_data());
                            if !throttle_clock(&mut s.held_since, d, now, &s.counters) {
                                held = true;
                                s.blocked_on = Some(c);
                                break; // the entry waits for this tenant's next turn
                            }
                        }
                        let pieces = cmd.piece_count(limits[usize::from(c)].max_transfer);
                        let split = if pieces > 1 {
                            self.splits.insert(Split { remaining: pieces, status: Status::Success }) as u32
                        } else {
                            WHOLE
                        };
                        let ctx = InFlight {
                            ctrl: c,
                            tenant,
                            start_us: (now / 1000) as u32,
                            ..InFlight::new(
                                key as u32,
                                buffer.unwrap_or(u32::MAX),
                                sqe.user_data,
                                len,
                                op,
                                epoch,
                                split,
                            )
                        };
                        let mut p =
                            Partial { work: Work::Plain(cmd), next: 0, pieces, ctx, waits_bounce: false };
                        let all_in = admit(
                            &mut admission!(c),
                            &mut p,
                            &mut s.slots[usize::from(c)],
                            &s.buffers,
                            &s.counters,
                        );
                        s.in_flight += 1;
                        if let Some(b) = buffer {
                            s.buffers.acquire(b);
                        }
                        taken += 1;
                        if !all_in {
                            s.partial = Some(p);
                            break;
                        }
                        continue;
                    }
                    Ok(Validated::Vectored(v)) => {
                        let c = v.controller;
                        let p = &ports[usize::from(c)];
                        let tenant = s.tenants[usize::from(c)].map(|(_, t)| t);
                        if p.dq.queue.free_slots() == 0
                            || s.slots[usize::from(c)] >= p.dq.session_slots
                            || s.vectored >= vec_cap
                            || tenant.is_some_and(|t| !p.sched.vec_room(t, vecs.capacity() as u32))
                        {
                            s.blocked_on = Some(c);
                            s.blocked_vectored = true;
                            break; // as above
                        }
                        let Some(slot) = vecs.alloc() else {
                            s.blocked_on = Some(c);
                            s.blocked_vectored = true;
                            break;
                        };
                        // Copy the segment list out of client memory once, into the slot, checking
                        // each copied segment. (`validate` placed the whole list inside its buffer.)
                        let Some(list) = buffers.lookup(v.list_buf) else {
                            vecs.release(slot); // not reached: `validate` found the list's buffer
                            break;
                        };
                        let fault_safe = list.buffer.fault_safe();
                        let list = list.buffer.mem();
                        // A hugetlb buffer may have a hole no page can fill: its list is copied
                        // through the kernel, whole, once.
                        // (`validate` put the count within MAX_SEGMENTS and the list inside
                        // its buffer.)
                        let copied = fault_safe.then(|| {
                            let mut bytes = [0u8; MAX_SEGMENTS as usize * SEGMENT_SIZE as usize];
                            let n = usize::from(v.count.min(MAX_SEGMENTS)) * SEGMENT_SIZE as usize;
                            list.copy_out_fault_safe(v.list_offset as usize, &mut bytes[..n])
                                .ok()
                                .map(|()| bytes)
                        });
                        let checked = validate_segments(
                            v.count,
                            v.len,
                            |i| {
                                let at = i * SEGMENT_SIZE as usize;
                                match &copied {
                                    None => Ok(list.read::<Segment>((v.list_offset + at as u64) as usize)),
                                    Some(Some(bytes)) => {
                                        Segment::read_from_bytes(&bytes[at..at + SEGMENT_SIZE as usize])
                                            .map_err(|_| BrokerStatus::SegmentListRange)
                                    }
                                    Some(None) => Err(BrokerStatus::SegmentListRange),
                                }
                            },
                            |id| buffers.lookup(id).map(|b| (b.buffer.iova(), b.buffer.len())),
                            vecs.slot_mut(slot),
                        );
                        match checked {
                            Err(e) => {
                                vecs.release(slot);
                                Status::Broker(e)
                            }
                            Ok(()) => {
                                let tenant = s.tenants[usize::from(c)].map(|(_, t)| t);
                                if let Some(t) = tenant {
                                    let sched = &mut ports[usize::from(c)].sched;
                                    let d = sched.try_dispatch(t, now, u64::from(v.len), v.write);
                                    if !throttle_clock(&mut s.held_since, d, now, &s.counters) {
                                        vecs.release(slot);
                                        held = true;
                                        s.blocked_on = Some(c);
                                        break; // as above (the list is copied again next time)
                                    }
                                }
                                vecs.set_count(slot, v.count);
                                // Every buffer the request touches stays in use until it completes.
                                for seg in vecs.segs(slot) {
                                    s.buffers.acquire(seg.tag);
                                }
                                s.vectored += 1;
                                if let Some(t) = tenant {
                                    ports[usize::from(c)].sched.vec_taken(t);
                                }
                                let pieces = v.len.div_ceil(limits[usize::from(c)].max_transfer);
                                let split = if pieces > 1 {
                                    self.splits.insert(Split { remaining: pieces, status: Status::Success })
                                        as u32
                                } else {
                                    WHOLE
                                };
                                let ctx = InFlight {
                                    vec: slot,
                                    ctrl: c,
                                    tenant,
                                    start_us: (now / 1000) as u32,
                                    ..InFlight::new(
                                        key as u32,
                                        u32::MAX,
                                        sqe.user_data,
                                        v.len,
                                        op,
                                        epoch,
                                        split,
                                    )
                                };
                                let rw = RwCommand {
                                    write: v.write,
                                    nsid: v.nsid,
                                    slba: v.slba,
                                    blocks: v.blocks,
                                    fua: v.fua,
                                };
                                let work =
                                    Work::Vectored(VecWork { rw, len: v.len, cursor: Cursor::default() });
                                let mut p = Partial { work, next: 0, pieces, ctx, waits_bounce: false };
                                let all_in = admit(
                                    &mut admission!(c),
                                    &mut p,
                                    &mut s.slots[usize::from(c)],
                                    &s.buffers,
                                    &s.counters,
                                );
                                s.in_flight += 1;
                                taken += 1;
                                if !all_in {
                                    s.partial = Some(p);
                                    break;
                                }
                                continue;
                            }
                        }
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
            taken_all += taken;
            if held || taken < available || s.partial.is_some() || taken_all >= batch {
                break true;
            }
            // The whole batch is taken: its completions go out now (the wakeup check follows
            // with the round's `RingIo::publish`), before the look at the next slot, which at
            // low depth is the line the client is about to write.
            ring.cq.publish();
        };
        if ring.dirty {
            self.touched.push(key);
        }
        (took, more, taken_all)
    }
}

/// The bytes a request is charged to its tenant's scheduler for (its byte buckets and cost),
/// at dispatch and again at completion: what it reads or writes, and for Write Zeroes what it
/// writes on the media (as Linux's blk-throttle charges it), so a write limit holds zeroing
/// too. Deallocate and Flush move no data (charged as one request, like a discard there).
pub(super) fn charged_bytes(op: Opcode, len: u32) -> u64 {
    match op {
        Opcode::Read | Opcode::Write | Opcode::ReadV | Opcode::WriteV | Opcode::WriteZeroes => u64::from(len),
        Opcode::Nop | Opcode::Flush | Opcode::Deallocate => 0,
    }
}

/// Keeps a ring's throttled time: a `Wait` (a rate limit) opens a hold, the next `Go` closes it
/// and adds it to the ring's counters (`Later`, a turn or a slot share, neither opens nor closes
/// one). Returns whether the request goes.
fn throttle_clock(held_since: &mut Option<u64>, d: Dispatch, now: u64, counters: &SessionCounters) -> bool {
    match d {
        Dispatch::Go => {
            if let Some(since) = held_since.take() {
                bump(&counters.throttled_ns, now.saturating_sub(since));
            }
            true
        }
        Dispatch::Wait { .. } => {
            held_since.get_or_insert(now);
            false
        }
        Dispatch::Later => false,
    }
}
