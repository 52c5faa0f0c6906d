//! Sleeping when there is nothing the I/O thread can do.
//!
//! Only work that can progress counts as ready: SQEs whose completions have CQ room and whose
//! commands have a device slot. A ring whose client does not reap its CQ is not ready; the
//! broker asks that client (`BROKER_CQ_WAIT`) to write the submit doorbell once it frees CQ space,
//! and sleeps. SQEs waiting for device slots are woken by the completion that frees one (the
//! interrupt, or the 1 ms look of a polled queue), and so are pieces waiting for a bounce
//! buffer. So an idle or blocked broker uses no CPU.

use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};
use std::time::Instant;

use nix::sys::epoll::{EpollEvent, EpollTimeout};
use nvmed_proto::eventfd::Drained;
use nvmed_proto::layout::{BROKER_CQ_WAIT, BROKER_NEED_WAKEUP};
use nvmed_proto::wakeup::{announce_sleep, end_sleep, SharedFlags};
use nvmed_proto::RingFault;
use tracing::warn;

use super::{IoThread, IRQ_TOKEN, WAKE_TOKEN};

impl IoThread {
    pub(super) fn sleep(&mut self) {
        for (_, s) in self.sessions.iter() {
            if let Some(r) = s.ring.as_ref() {
                announce_sleep(&SharedFlags::broker(&r.mem), BROKER_NEED_WAKEUP);
            }
        }
        for p in &self.ports {
            if let (true, Some(v)) = (p.dq.queue.in_flight() > 0, p.vector) {
                p.device.interrupt_hint(v, true);
            }
        }
        // Orders the interrupt hints before the device CQ checks; the announcements above carry
        // their own fences (pairs with the clients' fence after publishing).
        fence(Ordering::SeqCst);
        // (A gone controller's queue is never reaped again: what it posted before is stale.)
        let mut ready = self.ports.iter().any(|p| !p.gone && p.dq.queue.has_completion());
        let vec_cap = (self.vecs.capacity() - self.vecs.capacity() / 4) as u32;
        let ports = &self.ports;
        let now = self.started.elapsed().as_nanos() as u64;
        // Whether a command of this ring could go to controller `c` now (a failed device takes
        // none: its requests complete at once with DeviceFault), its tenant there included (a
        // tenant held by a limit or at its share is woken by the limit's timer or a completion).
        let room =
            |slots: &[u32],
             tenants: &[Option<(crate::broker::tenant::TenantKey, crate::broker::sched::TenantId)>],
             c: usize| {
                let p = &ports[c];
                p.device_failed
                    || (p.dq.queue.free_slots() > 0
                        && slots[c] < p.dq.session_slots
                        && tenants[c].is_none_or(|(_, t)| p.sched.can_dispatch(t, now)))
            };
        for (_, s) in self.sessions.iter_mut() {
            let Some(r) = s.ring.as_mut() else { continue };
            if s.faulted || s.closing.is_some() {
                continue;
            }
            if let Some(p) = s.partial.as_ref() {
                // A piece waiting for a bounce slot is woken by the completion that frees one.
                let c = usize::from(p.ctx.ctrl);
                ready |=
                    room(&s.slots, &s.tenants, c) && (!p.waits_bounce || ports[c].bounce.available() > 0);
                continue;
            }
            // The controller the next entry waits for, if the last round found one; else any
            // with room will do (the entry is read then: if its own has none, a completion
            // there wakes us soon anyway).
            let can_admit = match s.blocked_on {
                // A vectored entry also needs a segment-list slot within its tenant's share
                // there: a completion of that tenant's own vectored requests frees one.
                Some(c) if s.blocked_vectored => {
                    let c = usize::from(c);
                    room(&s.slots, &s.tenants, c)
                        && (ports[c].device_failed
                            || s.tenants[c]
                                .is_none_or(|(_, t)| ports[c].sched.vec_room(t, self.vecs.capacity() as u32)))
                }
                Some(c) => room(&s.slots, &s.tenants, usize::from(c)),
                None => (0..ports.len()).any(|c| room(&s.slots, &s.tenants, c)),
            };
            if r.sq.ready(1) == 0 && r.overflow.is_empty() {
                continue;
            }
            let cq_room = |r: &mut crate::broker::session::RingIo, in_flight: u32| {
                r.cq.free().unwrap_or(0).saturating_sub(in_flight + r.overflow.len() as u32) > 0
            };
            if r.overflow.is_empty() && cq_room(r, s.in_flight) {
                // Without a slot, commands are in flight: their completion frees one and wakes us.
                // The same holds for segment list slots.
                let vec_room = self.vecs.available() > 0 && s.vectored < vec_cap;
                // Only an entry known to be vectored waits for a segment list slot; without
                // one, an entry for a failed controller completes at once (only one known to be
                // for such a controller counts: slots a failed device holds never come back).
                let failed_next = s.blocked_on.is_some_and(|c| ports[usize::from(c)].device_failed);
                ready |= can_admit && (!s.blocked_vectored || vec_room || failed_next);
                continue;
            }
            // The CQ is full: the client must reap first. Ask it to wake us, then look again.
            announce_sleep(&SharedFlags::broker(&r.mem), BROKER_CQ_WAIT);
            if r.overflow.is_empty() && cq_room(r, s.in_flight) {
                ready = true;
            }
        }
        let in_flight = self.ports.iter().any(|p| p.dq.queue.in_flight() > 0);
        let polled = self.ports.iter().any(|p| p.dq.queue.in_flight() > 0 && p.vector.is_none());
        if !ready {
            let mut timeout: u16 = if polled {
                1 // a polled queue: look again soon
            } else if in_flight {
                100
            } else {
                1000
            };
            // A command waiting for its retry goes again then.
            if let Some(due) = self.ports.iter().filter_map(|p| p.dq.queue.next_retry()).min() {
                let ms = due.saturating_duration_since(Instant::now()).as_millis().max(1);
                timeout = timeout.min(ms.min(u128::from(u16::MAX)) as u16);
            }
            // A tenant held by a rate limit may go again then.
            if let Some(until) = self.throttled_until {
                let ms = until.saturating_sub(now).div_ceil(1_000_000).max(1);
                timeout = timeout.min(ms.min(u64::from(u16::MAX)) as u16);
            }
            let mut events = [EpollEvent::empty(); 32];
            let n = self.epoll.wait(&mut events, EpollTimeout::from(timeout)).unwrap_or(0);
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        nvmed_proto::eventfd::drain(self.wake.as_fd());
                    }
                    t if t >= IRQ_TOKEN => {
                        let Some(p) = self.ports.get((t - IRQ_TOKEN) as usize) else { continue };
                        if let Some(fd) = p.vector.and_then(|v| p.device.interrupt_fd(v)) {
                            nvmed_proto::eventfd::drain(fd);
                        }
                    }
                    key => {
                        let Some(s) = self.sessions.get_mut(key as usize) else { continue };
                        let Some(r) = s.ring.as_ref() else { continue };
                        match nvmed_proto::eventfd::drain_untrusted_doorbell(r.submit_fd.as_fd()) {
                            Drained::Quiet | Drained::Rung => {}
                            Drained::Closed => {
                                // The client closed its end: it can never ring again, and the
                                // closed end would report readiness for good (a thread that
                                // never sleeps). The ring is still polled whenever this thread
                                // is awake.
                                let _ = self.epoll.delete(r.submit_fd.as_fd());
                            }
                            Drained::Descriptors => {
                                // Left unread (see `Drained`): the ring is no longer served,
                                // and its session's thread closes the doorbell last.
                                warn!(
                                    session = s.id,
                                    ring = s.ring_id,
                                    uid = s.uid,
                                    "the client sent file descriptors on its submit doorbell; ring faulted"
                                );
                                let _ = self.epoll.delete(r.submit_fd.as_fd());
                                r.fault(RingFault::ProtocolViolation);
                                s.faulted = true;
                            }
                        }
                    }
                }
            }
        }
        for p in &self.ports {
            if let Some(v) = p.vector {
                p.device.interrupt_hint(v, false);
            }
        }
        for (_, s) in self.sessions.iter() {
            if let Some(r) = s.ring.as_ref() {
                end_sleep(&SharedFlags::broker(&r.mem), BROKER_NEED_WAKEUP | BROKER_CQ_WAIT);
            }
        }
    }
}
