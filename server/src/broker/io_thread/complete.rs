//! Reaping the device's completions and posting them to the clients' rings.

use std::sync::atomic::Ordering;

use nvmed_proto::{BrokerStatus, Cqe, NvmeStatus, Opcode, RingFault, Status};
use slab::Slab;
use tracing::warn;

use super::split::{piece_done, InFlight};
use super::vectored::{finish_bounce, VecPool, NO_BOUNCE, VEC_NONE};
use super::IoThread;
use crate::broker::sched::Scheduler;
use crate::broker::session::{bump, RingIo, Session};

/// Most completions reaped per round.
const REAP_BATCH: usize = 256;

impl IoThread {
    /// Reaps up to a batch of device completions from each controller; returns how many.
    pub(super) fn reap(&mut self) -> usize {
        let sessions = &mut self.sessions;
        let touched = &mut self.touched;
        let splits = &mut self.splits;
        let vecs = &mut self.vecs;
        let mut total = 0;
        let started = self.started;
        // The clock is read once per batch, and only if something completed.
        let mut now_us: Option<u32> = None;
        for p in &mut self.ports {
            if p.gone {
                // Everything it held was failed already; what it may still have posted is stale.
                continue;
            }
            if !p.dma_stopped {
                // A controller that failed without confirming it stopped: its commands' rings
                // were faulted and kept as zombies, and their commands are never reported
                // finished. What it still posts is consumed (so the queue does not look busy
                // for ever), and the command is kept as still using its buffers.
                let abandoned = &mut p.abandoned;
                total += p.dq.queue.reap(REAP_BATCH, |ctx, _, _| abandoned.push(ctx));
                // A retryable status it posts would wait for a retry never sent (and keep
                // this thread waking for it): drop it too.
                p.dq.queue.drop_retries();
                continue;
            }
            let bounce = &mut p.bounce;
            let sched = &mut p.sched;
            total += p.dq.queue.reap(REAP_BATCH, |ctx, status_field, _result| {
                let mut status = if status_field & 0x7ff == 0 {
                    Status::Success
                } else {
                    Status::Nvme(NvmeStatus::from_status_field(status_field))
                };
                // A bounced read's data reaches the client before its completion does.
                if ctx.bounce != NO_BOUNCE {
                    let buffers = sessions.get(ctx.session as usize).map(|s| &s.buffers);
                    if !finish_bounce(&ctx, status.is_success(), vecs, bounce, buffers) {
                        status = Status::Broker(BrokerStatus::BadBuffer);
                    }
                }
                release_slot(sessions, &ctx);
                if let Some(status) = piece_done(splits, &ctx, status) {
                    let now = *now_us.get_or_insert_with(|| started.elapsed().as_micros() as u32);
                    complete(sessions, touched, vecs, sched, now, ctx, status);
                }
            });
        }
        if total > 0 {
            bump(&self.broker_counters.device_commands, total as u64);
        }
        total
    }

    /// Publishes the CQEs pushed this round (written whole, first entry last) and wakes the
    /// clients that sleep, one fence per ring.
    pub(super) fn publish_completions(&mut self) {
        for key in self.touched.drain(..) {
            let Some(s) = self.sessions.get_mut(key) else { continue };
            let mut all_out = true;
            if let Some(ring) = s.ring.as_mut() {
                if ring.dirty {
                    ring.publish();
                }
                // Completions still waiting for room in the CQ are not seen yet.
                all_out = ring.overflow.is_empty();
            }
            // Unregisters waiting for these completions are answered after them (once the
            // overflow is in the CQ too: its ring is published again then).
            if all_out {
                s.buffers.send_ready();
            }
        }
    }
}

/// A device command of this session finished (or was abandoned): its queue slot is free.
pub(super) fn release_slot(sessions: &mut Slab<Session>, ctx: &InFlight) {
    if let Some(s) = sessions.get_mut(ctx.session as usize) {
        s.slots[usize::from(ctx.ctrl)] -= 1;
    }
}

/// Posts the completion of a request to its client and updates the accounting (a vectored
/// request gives back its segment list slot and releases every buffer it used).
pub(super) fn complete(
    sessions: &mut Slab<Session>,
    touched: &mut Vec<usize>,
    vecs: &mut VecPool,
    sched: &mut Scheduler,
    now_us: u32,
    ctx: InFlight,
    status: Status,
) {
    if let Some(t) = ctx.tenant {
        // As the request was charged when dispatched (see `submit`).
        sched.complete(t, super::submit::charged_bytes(ctx.op, ctx.len), ctx.op.modifies_data());
        if ctx.vec != VEC_NONE {
            sched.vec_given_back(t);
        }
    }
    let Some(s) = sessions.get_mut(ctx.session as usize) else {
        warn!("completion for a session that no longer exists");
        if ctx.vec != VEC_NONE {
            vecs.release(ctx.vec);
        }
        return;
    };
    s.in_flight -= 1;
    s.counters.in_flight.store(u64::from(s.in_flight), Ordering::Relaxed);
    if ctx.buffer != u32::MAX {
        s.buffers.release(ctx.buffer);
    }
    if ctx.vec != VEC_NONE {
        for seg in vecs.segs(ctx.vec) {
            s.buffers.release(seg.tag);
        }
        vecs.release(ctx.vec);
        s.vectored -= 1;
    }
    bump(&s.counters.completed, 1);
    let latency_us = now_us.wrapping_sub(ctx.start_us);
    bump(&s.counters.latency_log2_us[nvmed_proto::admin::latency_bucket(latency_us)], 1);
    bump(&s.counters.latency_sum_us, u64::from(latency_us));
    if status.is_success() {
        match ctx.op {
            Opcode::Read | Opcode::ReadV => bump(&s.counters.bytes_read, u64::from(ctx.len)),
            Opcode::Write | Opcode::WriteV => bump(&s.counters.bytes_written, u64::from(ctx.len)),
            _ => {}
        }
    } else {
        bump(&s.counters.errors, 1);
    }
    let cqe = Cqe {
        user_data: ctx.user_data,
        status: status.encode(),
        result: if status.is_success() { ctx.len } else { 0 },
    };
    let Some(ring) = s.ring.as_mut() else {
        s.buffers.send_ready(); // nothing to publish first
        return;
    };
    if s.faulted {
        s.buffers.send_ready();
        return; // the client broke its ring; nothing can be posted safely
    }
    if !ring.overflow.is_empty() || !matches!(ring.cq.push(cqe), Ok(true)) {
        ring.overflow.push_back(cqe);
    }
    if !ring.dirty {
        ring.dirty = true;
        touched.push(ctx.session as usize);
    }
}

/// Stops serving a ring whose client published an impossible index.
pub(super) fn fault(session: u64, ring: &RingIo, why: RingFault, e: nvmed_proto::ring::RingError) {
    crate::broker::ratelog::limited!(warn, session, "client corrupted its ring ({why:?}: {e}); ring faulted");
    ring.fault(why);
}
