//! Sleeping when there is nothing the I/O thread can do.
//!
//! Only work that can progress counts as ready: SQEs whose completions have CQ room and whose
//! commands have a device slot. A ring whose client does not reap its CQ is not ready; the
//! broker asks that client (`BROKER_CQ_WAIT`) to write the submit eventfd once it frees CQ space,
//! and sleeps. SQEs waiting for device slots are woken by the completion that frees one (the
//! interrupt, or the 1 ms look of a polled queue), and so are pieces waiting for a bounce
//! buffer. So an idle or blocked broker uses no CPU.

use std::os::fd::AsFd;
use std::sync::atomic::{fence, Ordering};

use nix::sys::epoll::{EpollEvent, EpollTimeout};
use nvmed_proto::layout::{BROKER_CQ_WAIT, BROKER_NEED_WAKEUP};
use nvmed_proto::wakeup::{announce_sleep, end_sleep, SharedFlags};

use super::{IoThread, IRQ_TOKEN, WAKE_TOKEN};

impl IoThread {
    pub(super) fn sleep(&mut self) {
        for (_, s) in self.sessions.iter() {
            if let Some(r) = s.ring.as_ref() {
                announce_sleep(&SharedFlags::broker(&r.mem), BROKER_NEED_WAKEUP);
            }
        }
        let in_flight = self.dq.queue.in_flight() > 0;
        if let (true, Some(v)) = (in_flight, self.vector) {
            self.device.interrupt_hint(v, true);
        }
        // Orders the interrupt hint before the device CQ check; the announcements above carry
        // their own fences (pairs with the clients' fence after publishing).
        fence(Ordering::SeqCst);
        let mut ready = self.dq.queue.has_completion();
        // A failed device takes no command: requests complete at once with DeviceFault.
        let device_room = self.device_failed || self.dq.queue.free_slots() > 0;
        let cap = self.dq.session_slots;
        let vec_cap = (self.vecs.capacity() - self.vecs.capacity() / 4) as u32;
        for (_, s) in self.sessions.iter_mut() {
            let Some(r) = s.ring.as_mut() else { continue };
            if s.faulted || s.closing.is_some() {
                continue;
            }
            let can_admit = device_room && (s.slots < cap || self.device_failed);
            if let Some(p) = s.partial.as_ref() {
                // A piece waiting for a bounce slot is woken by the completion that frees one.
                ready |= can_admit && (!p.waits_bounce || self.bounce.available() > 0);
                continue;
            }
            if !r.sq.available().is_ok_and(|n| n > 0) && r.overflow.is_empty() {
                continue;
            }
            let cq_room = |r: &mut crate::broker::session::RingIo, in_flight: u32| {
                r.cq.free().unwrap_or(0).saturating_sub(in_flight + r.overflow.len() as u32) > 0
            };
            if r.overflow.is_empty() && cq_room(r, s.in_flight) {
                // Without a slot, commands are in flight: their completion frees one and wakes us.
                // The same holds for segment list slots (the next entry may be vectored).
                let vec_room = self.vecs.available() > 0 && s.vectored < vec_cap;
                ready |= can_admit && (vec_room || self.device_failed);
                continue;
            }
            // The CQ is full: the client must reap first. Ask it to wake us, then look again.
            announce_sleep(&SharedFlags::broker(&r.mem), BROKER_CQ_WAIT);
            if r.overflow.is_empty() && cq_room(r, s.in_flight) {
                ready = true;
            }
        }
        if !ready {
            let timeout: u16 = if in_flight && self.vector.is_none() {
                1 // a polled queue: look again soon
            } else if in_flight {
                100
            } else {
                1000
            };
            let mut events = [EpollEvent::empty(); 32];
            let n = self.epoll.wait(&mut events, EpollTimeout::from(timeout)).unwrap_or(0);
            for ev in &events[..n] {
                match ev.data() {
                    WAKE_TOKEN => {
                        nvmed_proto::eventfd::drain(self.wake.as_fd());
                    }
                    IRQ_TOKEN => {
                        if let Some(fd) = self.vector.and_then(|v| self.device.interrupt_fd(v)) {
                            nvmed_proto::eventfd::drain(fd);
                        }
                    }
                    key => {
                        if let Some(r) = self.sessions.get(key as usize).and_then(|s| s.ring.as_ref()) {
                            nvmed_proto::eventfd::drain(r.submit_fd.as_fd());
                        }
                    }
                }
            }
        }
        if let (true, Some(v)) = (in_flight, self.vector) {
            self.device.interrupt_hint(v, false);
        }
        for (_, s) in self.sessions.iter() {
            if let Some(r) = s.ring.as_ref() {
                end_sleep(&SharedFlags::broker(&r.mem), BROKER_NEED_WAKEUP | BROKER_CQ_WAIT);
            }
        }
    }
}
