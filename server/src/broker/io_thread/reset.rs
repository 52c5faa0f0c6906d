//! Command timeouts and controller resets.
//!
//! A command the device keeps longer than the timeout resets the controller. Before any command
//! it held is reported finished, the device must be seen to have stopped its DMA: Bus Master
//! Enable is cleared first (as Linux disables the PCI device), then the controller is reset. If
//! neither can be confirmed, the commands stay outstanding for good: their sessions are faulted
//! with `DeviceFailed` and their buffers are never unmapped, because the device may still write
//! to them.

use std::time::Instant;

use nvmed_proto::{BrokerStatus, RingFault, Status};
use tracing::{error, info};

use super::complete::{complete, release_slot};
use super::split::{piece_done, pieces_done};
use super::vectored::finish_bounce;
use super::{DeviceQueue, IoThread, EPOCH};
use crate::nvme::IoQueue;

impl IoThread {
    /// Advances the timeout clock; resets the controller if a command is overdue.
    pub(super) fn check_timeouts(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.epoch_started);
        if elapsed < EPOCH {
            return;
        }
        let ticks = (elapsed.as_millis() / EPOCH.as_millis()) as u32;
        self.epoch = self.epoch.wrapping_add(ticks);
        self.epoch_started += EPOCH * ticks;
        if self.device_failed {
            return; // nothing more to try; commands of a device that never stopped stay put
        }
        let limit = (self.io_timeout.as_millis() / EPOCH.as_millis()).max(1) as u32;
        let epoch = self.epoch;
        if self.dq.queue.in_flight_contexts().any(|c| epoch.wrapping_sub(c.epoch) > limit) {
            self.reset_device();
        }
    }

    /// A command timed out: stop the device's DMA, fail every command it held with
    /// `DeviceReset` (only once it is stopped), and bring the I/O queue back.
    pub(super) fn reset_device(&mut self) {
        error!(
            in_flight = self.dq.queue.in_flight(),
            timeout_ms = self.io_timeout.as_millis() as u64,
            "a command did not complete in time; resetting the controller"
        );
        let bus_master_off = self.device.set_bus_master(false);
        if let Err(e) = &bus_master_off {
            error!("clearing Bus Master Enable failed: {e}");
        }
        let reset = self.controller.reset();
        if let Err(e) = &reset {
            error!("controller reset failed: {e}");
        }
        self.cancel_partials();
        if reset.is_err() && bus_master_off.is_err() {
            self.device_failed = true;
            self.dma_stopped = false;
            error!(
                in_flight = self.dq.queue.in_flight(),
                "cannot confirm that the controller stopped its DMA: its commands never complete, \
                 their sessions are faulted and their buffers stay pinned until nvmed exits"
            );
            for key in self.order.iter().copied() {
                let s = &mut self.sessions[key];
                if s.in_flight > 0 {
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
        for ctx in self.dq.queue.abandon_all() {
            finish_bounce(&ctx, false, &self.vecs, &mut self.bounce, None);
            release_slot(&mut self.sessions, &ctx);
            if let Some(status) =
                piece_done(&mut self.splits, &ctx, Status::Broker(BrokerStatus::DeviceReset))
            {
                complete(&mut self.sessions, &mut self.touched, &mut self.vecs, ctx, status);
            }
        }
        let restored = reset.and_then(|()| {
            self.device.set_bus_master(true).map_err(|e| {
                crate::nvme::DriverError::Unsupported(format!("re-enabling Bus Master Enable: {e}"))
            })?;
            self.controller.request_io_queues(1)?;
            let qp = self.controller.create_io_queue(1, self.queue_depth, self.vector)?;
            IoQueue::new(qp, self.controller.device(), self.controller.iova_space()).map_err(Into::into)
        });
        match restored {
            Ok(q) => {
                self.dq = DeviceQueue::new(q);
                info!("controller reset; I/O resumed");
            }
            Err(e) => {
                error!("the controller did not come back after a reset: {e}; failing all I/O");
                self.device_failed = true;
            }
        }
        self.publish_completions();
    }

    /// Drops the pieces of split requests that were never given to the device.
    fn cancel_partials(&mut self) {
        for key in self.order.iter().copied() {
            let Some(p) = self.sessions[key].partial.take() else { continue };
            let status = Status::Broker(BrokerStatus::DeviceReset);
            if let Some(status) = pieces_done(&mut self.splits, &p.ctx, p.pieces - p.next, status) {
                complete(&mut self.sessions, &mut self.touched, &mut self.vecs, p.ctx, status);
            }
        }
    }
}
