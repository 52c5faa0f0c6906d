//! Command timeouts, aborts, controller resets, and a controller gone.
//!
//! A command the device keeps longer than the timeout is aborted (NVMe Abort): the controller
//! then completes it with Command Abort Requested, and the driver sends it again (see
//! [`crate::nvme::io`]). A controller may decline the abort (best effort): the command then
//! gets one more timeout. If the Abort command itself fails, if the command is overdue again
//! after its abort, if many commands are overdue at once (a stuck controller),
//! or if it reports a fatal status (CSTS.CFS), the controller is reset (see
//! [`crate::broker::manager`], which coordinates it across the I/O threads), and every command
//! that was in flight is sent again on the new queue. Before any command it held is reported
//! finished, the device must be seen to have stopped its DMA: Bus Master Enable is cleared
//! first (as Linux disables the PCI device), then the controller is reset. If neither can be
//! confirmed, the commands stay outstanding for good: their rings are faulted with
//! `DeviceFailed` and their buffers are never unmapped, because the device may still write to
//! them. A controller whose registers read as all ones is gone: its commands fail with
//! `DeviceGone` (it can no longer reach memory).

use std::time::Instant;

use nvmed_proto::{BrokerStatus, RingFault, Status};
use tracing::{error, info, warn};

use super::complete::{complete, release_slot};
use super::split::{piece_done, pieces_done, InFlight};
use super::vectored::finish_bounce;
use super::{buffers_used_at, IoThread, EPOCH};
use crate::broker::manager::DeviceState;
use crate::nvme::spec::CSTS_CFS;
use crate::nvme::DriverError;

/// More commands than this overdue at once: the controller is stuck, reset it without aborts.
const MAX_ABORTS: usize = 4;

impl IoThread {
    /// Advances the timeout clock; aborts overdue commands, or resets their controller.
    pub(super) fn check_timeouts(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.epoch_started);
        if elapsed < EPOCH {
            return;
        }
        let ticks = (elapsed.as_millis() / EPOCH.as_millis()) as u32;
        self.epoch = self.epoch.wrapping_add(ticks);
        self.epoch_started += EPOCH * ticks;
        let limit = (self.io_timeout.as_millis() / EPOCH.as_millis()).max(1) as u32;
        for c in 0..self.ports.len() {
            let p = &mut self.ports[c];
            p.dq.queue.set_epoch(self.epoch);
            // A failed device has nothing more to try; commands of one that never stopped stay.
            if p.device_failed {
                continue;
            }
            let mut overdue = p.dq.queue.overdue(limit).peekable();
            if overdue.peek().is_none() {
                continue;
            }
            let overdue: Vec<_> = overdue.collect();
            let csts = p.ctrl.csts();
            if csts == u32::MAX {
                p.ctrl.gone(p.generation);
                self.recover(c);
                continue;
            }
            let why = if csts & CSTS_CFS != 0 {
                Some("the controller reports a fatal status (CSTS.CFS)")
            } else if overdue.iter().any(|o| o.abort_sent) {
                Some("a command did not complete after it was aborted")
            } else if overdue.len() > MAX_ABORTS || !self.aborts {
                Some("commands did not complete in time")
            } else {
                self.abort_overdue(c, &overdue)
            };
            if let Some(why) = why {
                self.reset_device(c, why);
            }
        }
    }

    /// Publishes how many commands the device queues sent again.
    pub(super) fn publish_retries(&self) {
        let n = self.ports.iter().map(|p| p.dq.queue.retried()).sum();
        self.broker_counters.retries.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Aborts the overdue commands of controller `c`; returns why the controller must be reset
    /// instead, if it must.
    fn abort_overdue(&mut self, c: usize, overdue: &[crate::nvme::io::Overdue]) -> Option<&'static str> {
        let p = &mut self.ports[c];
        for o in overdue {
            warn!(
                thread = self.index,
                controller = c,
                cid = o.cid,
                timeout_ms = self.io_timeout.as_millis() as u64,
                "a command did not complete in time; aborting it"
            );
            self.broker_counters.aborts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match p.ctrl.abort(self.qid, o.cid) {
                Ok(true) => p.dq.queue.abort_sent(o.cid),
                Ok(false) => {
                    // Abort is best effort: many controllers decline it for a command they are
                    // executing (or it completed meanwhile). As Linux does, the command gets
                    // one more timeout; only if it is overdue again is the controller reset.
                    warn!(
                        thread = self.index,
                        controller = c,
                        cid = o.cid,
                        "the controller declined to abort the command; waiting one more timeout"
                    );
                    p.dq.queue.abort_sent(o.cid);
                }
                Err(e) => {
                    error!(thread = self.index, controller = c, "Abort failed: {e}");
                    return Some("an Abort command failed");
                }
            }
        }
        None
    }

    /// Controller `c` must be reset (`why`): reset it (unless another thread just did), then
    /// bring this thread's queue there back.
    pub(super) fn reset_device(&mut self, c: usize, why: &str) {
        let p = &self.ports[c];
        error!(
            thread = self.index,
            controller = c,
            device = %p.device.name(),
            in_flight = p.dq.queue.in_flight(),
            timeout_ms = self.io_timeout.as_millis() as u64,
            "{why}; resetting the controller"
        );
        p.ctrl.reset(p.generation);
        self.recover(c);
    }

    /// Controller `c` was reset (by this thread or another): its DMA is stopped, or could not
    /// be confirmed stopped, or it is gone. Creates this thread's queue there again and sends
    /// every command again (failing with `DeviceReset` those out of tries), or fails them all
    /// if the controller did not come back (only if it stopped).
    pub(super) fn recover(&mut self, c: usize) {
        let p = &mut self.ports[c];
        p.generation = p.ctrl.generation();
        let state = p.ctrl.state();
        if state == DeviceState::FailedRunning {
            // Also the unsent pieces, at any controller, of the rings about to be faulted: a
            // faulted ring sends nothing more, and those pieces' buffers would never drain.
            self.cancel_partials(c, Status::Broker(BrokerStatus::DeviceFault), true);
            let p = &mut self.ports[c];
            p.device_failed = true;
            p.dma_stopped = false;
            // Commands waiting to be sent again after a retryable status stay unsent: the
            // controller gets nothing more (their rings are faulted like the others').
            p.dq.queue.drop_retries();
            let (port, vecs) = (&self.ports[c], &self.vecs);
            for key in self.order.iter().copied() {
                let s = &mut self.sessions[key];
                if s.slots[c] > 0 {
                    // Unregisters of the buffers its commands there use will never drain:
                    // answered now (those stay mapped for good). Others still drain.
                    s.buffers.send_ready();
                    buffers_used_at(port, vecs, key, |id| s.buffers.give_up_retiring_one(id));
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
        let failed = match state {
            DeviceState::Gone => Some(BrokerStatus::DeviceGone),
            DeviceState::FailedStopped => Some(BrokerStatus::DeviceReset),
            _ => {
                let p = &mut self.ports[c];
                match p.ctrl.recreate_queue(&mut p.dq.queue, p.vector) {
                    Ok(generation) => {
                        // The reset it lives in (another thread may have made a newer one).
                        p.generation = generation;
                        p.recreate_tries = 0;
                        // Back in service if an earlier recreation had failed for good: a later
                        // reset (another thread's, a health read's) gave the queue back. Only a
                        // port failed that way (its DMA stopped, its commands all failed) gets
                        // here failed: a controller that failed running or is gone never
                        // becomes Running again.
                        if p.device_failed {
                            debug_assert!(p.dma_stopped && !p.gone, "reviving a port whose DMA may run");
                            info!(thread = self.index, controller = c, "the I/O queue serves again");
                        }
                        p.device_failed = false;
                        let in_flight = p.dq.queue.in_flight();
                        let given_up = p.dq.queue.restart();
                        info!(
                            thread = self.index,
                            controller = c,
                            queue = self.qid,
                            resent = in_flight - given_up.len(),
                            given_up = given_up.len(),
                            "I/O queue created again; its commands were sent again"
                        );
                        self.fail_contexts(c, given_up, Status::Broker(BrokerStatus::DeviceReset));
                        self.publish_retries();
                        None
                    }
                    // The admin queue may have stopped answering (the Create commands timed
                    // out): another reset gives it back. A few times, then this thread gives up.
                    Err(
                        e @ (DriverError::Timeout { .. }
                        | DriverError::AdminQueueStuck(_)
                        | DriverError::Fatal(_)),
                    ) if p.recreate_tries < 2 => {
                        p.recreate_tries += 1;
                        error!(
                            thread = self.index,
                            controller = c,
                            "the I/O queue could not be created again: {e}; resetting the controller again"
                        );
                        let seen = p.generation;
                        p.ctrl.reset(seen);
                        return self.recover(c);
                    }
                    Err(e) => {
                        error!(
                            thread = self.index,
                            controller = c,
                            "the I/O queue could not be created again: {e}; failing its I/O"
                        );
                        Some(BrokerStatus::DeviceReset)
                    }
                }
            }
        };
        if let Some(status) = failed {
            self.ports[c].device_failed = true;
            self.ports[c].gone = state == DeviceState::Gone;
            let all = self.ports[c].dq.queue.abandon_all();
            self.fail_contexts(c, all, Status::Broker(status));
            self.cancel_partials(c, Status::Broker(status), false);
            if state == DeviceState::Gone {
                self.ports[c].ctrl.ack_gone();
            }
        }
        self.publish_completions();
    }

    /// Completes commands of controller `c` that the device will never complete, with
    /// `status` (their DMA is stopped).
    fn fail_contexts(&mut self, c: usize, ctxs: Vec<InFlight>, status: Status) {
        let p = &mut self.ports[c];
        for ctx in ctxs {
            let buffers = self.sessions.get(ctx.session as usize).map(|s| &s.buffers);
            let _ = finish_bounce(&ctx, false, &self.vecs, &mut p.bounce, buffers);
            release_slot(&mut self.sessions, &ctx);
            if let Some(status) = piece_done(&mut self.splits, &ctx, status) {
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
    }

    /// Fails with `status` the pieces of split requests for controller `c` that were never
    /// given to it (`of_rings_at_c`: and those, for any controller, of rings with commands at
    /// `c`).
    fn cancel_partials(&mut self, c: usize, status: Status, of_rings_at_c: bool) {
        for key in self.order.iter().copied() {
            let s = &mut self.sessions[key];
            let at_c = of_rings_at_c && s.slots[c] > 0;
            if s.partial.is_none_or(|p| usize::from(p.ctx.ctrl) != c && !at_c) {
                continue;
            }
            let Some(p) = s.partial.take() else { continue };
            if let Some(status) = pieces_done(&mut self.splits, &p.ctx, p.pieces - p.next, status) {
                let now_us = self.started.elapsed().as_micros() as u32;
                let sched = &mut self.ports[usize::from(p.ctx.ctrl)].sched;
                complete(&mut self.sessions, &mut self.touched, &mut self.vecs, sched, now_us, p.ctx, status);
            }
        }
    }
}
