//! Command timeouts and controller resets.
//!
//! A command the device keeps longer than the timeout resets the controller (see
//! [`crate::broker::manager`], which coordinates it across the I/O threads). Before any command
//! it held is reported finished, the device must be seen to have stopped its DMA: Bus Master
//! Enable is cleared first (as Linux disables the PCI device), then the controller is reset. If
//! neither can be confirmed, the commands stay outstanding for good: their rings are faulted
//! with `DeviceFailed` and their buffers are never unmapped, because the device may still write
//! to them.

use std::time::Instant;

use nvmed_proto::{BrokerStatus, RingFault, Status};
use tracing::{error, info};

use super::complete::{complete, release_slot};
use super::split::{piece_done, pieces_done};
use super::vectored::finish_bounce;
use super::{DeviceQueue, IoThread, EPOCH};
use crate::broker::manager::DeviceState;

impl IoThread {
    /// Advances the timeout clock; resets a controller whose command is overdue.
    pub(super) fn check_timeouts(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.epoch_started);
        if elapsed < EPOCH {
            return;
        }
        let ticks = (elapsed.as_millis() / EPOCH.as_millis()) as u32;
        self.epoch = self.epoch.wrapping_add(ticks);
        self.epoch_started += EPOCH * ticks;
        let limit = (self.io_timeout.as_millis() / EPOCH.as_millis()).max(1) as u32;
        let epoch = self.epoch;
        for c in 0..self.ports.len() {
            let p = &self.ports[c];
            // A failed device has nothing more to try; commands of one that never stopped stay.
            if !p.device_failed
                && p.dq.queue.in_flight_contexts().any(|x| epoch.wrapping_sub(x.epoch) > limit)
            {
                self.reset_device(c);
            }
        }
    }

    /// A command timed out on controller `c`: reset it (unless another thread just did), then
    /// bring this thread's queue there back.
    pub(super) fn reset_device(&mut self, c: usize) {
        let p = &self.ports[c];
        error!(
            thread = self.index,
            controller = c,
            device = %p.device.name(),
            in_flight = p.dq.queue.in_flight(),
            timeout_ms = self.io_timeout.as_millis() as u64,
            "a command did not complete in time; resetting the controller"
        );
        p.ctrl.reset(p.generation);
        self.recover(c);
    }

    /// Controller `c` was reset (by this thread or another): its DMA is stopped, or could not
    /// be confirmed stopped. Fails every command this thread had at it with `DeviceReset`
    /// (only if stopped) and creates this thread's queue there again.
    pub(super) fn recover(&mut self, c: usize) {
        let p = &mut self.ports[c];
        p.generation = p.ctrl.generation();
        let state = p.ctrl.state();
        self.cancel_partials(c);
        if state == DeviceState::FailedRunning {
            let p = &mut self.ports[c];
            p.device_failed = true;
            p.dma_stopped = false;
            for key in self.order.iter().copied() {
                let s = &mut self.sessions[key];
                if s.slots[c] > 0 {
                    s.buffers.give_up_retiring();
                    if let Some(ring) = s.ring.as_ref() {
                        ring.fault(RingFault::DeviceFailed);
                    }
                    s.faulted = true;
                }
            }
            self.publish_completions();
            return;
        }
        // The controller is disabled or cut off from memory: nothing it was given can DMA now.
        let p = &mut self.ports[c];
        for ctx in p.dq.queue.abandon_all() {
            let buffers = self.sessions.get(ctx.session as usize).map(|s| &s.buffers);
            finish_bounce(&ctx, false, &self.vecs, &mut p.bounce, buffers);
            release_slot(&mut self.sessions, &ctx);
            if let Some(status) =
                piece_done(&mut self.splits, &ctx, Status::Broker(BrokerStatus::DeviceReset))
            {
                let now_us = self.started.elapsed().as_micros() as u32;
                complete(
                    &mut self.sessions,
                    &mut self.touched,
                    &mut self.vecs,
                    &mut p.sched,
                    now_us,
                    ctx,
                    status,
                );
            }
        }
        if state == DeviceState::FailedStopped {
            p.device_failed = true;
        } else {
            match p.ctrl.create_queue(self.qid, self.queue_depth, p.vector) {
                Ok(q) => {
                    p.dq = DeviceQueue::new(q);
                    info!(
                        thread = self.index,
                        controller = c,
                        queue = self.qid,
                        "I/O queue created again; I/O resumed"
                    );
                }
                Err(e) => {
                    error!(
                        thread = self.index,
                        controller = c,
                        "the I/O queue could not be created again: {e}; failing its I/O"
                    );
                    p.device_failed = true;
                }
            }
        }
        self.publish_completions();
    }

    /// Drops the pieces of split requests for controller `c` that were never given to it.
    fn cancel_partials(&mut self, c: usize) {
        for key in self.order.iter().copied() {
            let s = &mut self.sessions[key];
            if s.partial.is_none_or(|p| usize::from(p.ctx.ctrl) != c) {
                continue;
            }
            let Some(p) = s.partial.take() else { continue };
            let status = Status::Broker(BrokerStatus::DeviceReset);
            if let Some(status) = pieces_done(&mut self.splits, &p.ctx, p.pieces - p.next, status) {
                let now_us = self.started.elapsed().as_micros() as u32;
                let sched = &mut self.ports[usize::from(p.ctx.ctrl)].sched;
                complete(&mut self.sessions, &mut self.touched, &mut self.vecs, sched, now_us, p.ctx, status);
            }
        }
    }
}
