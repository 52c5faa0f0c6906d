//! The I/O thread: takes clients' submissions, drives the device queue, posts completions.
//!
//! It owns all data-plane state, so the hot path takes no lock and makes no syscall while
//! busy: it polls the rings and the device completion queue, and sleeps on eventfds (clients'
//! submit eventfds, the device interrupt, the control wakeup) only after `poll_idle` without work.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::AtomicBool;
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nvmed_proto::layout::BROKER_NEED_WAKEUP;
use nvmed_proto::wakeup::{announce_sleep, end_sleep, SharedFlags};
use nvmed_proto::{BrokerStatus, ControlError, Cqe, NvmeStatus, Opcode, RingFault, Status};
use slab::Slab;
use tracing::{debug, error, info, warn};

use super::buffer::RegisteredBuffer;
use super::session::{bump, BufferEntry, CachePadded, RingIo, Session, SessionCounters};
use super::validate::{validate, DeviceLimits, Validated};
use crate::device::NvmeDevice;
use crate::nvme::{Controller, IoQueue};
use crate::policy::NamespaceAccess;

/// Most SQEs taken from one ring per round (fairness between clients).
const TAKE_BATCH: u32 = 64;
/// Most completions reaped per round.
const REAP_BATCH: usize = 256;
/// `pause` instructions between two looks at the rings when idle.
const IDLE_PAUSES: u32 = 1;
const WAKE_TOKEN: u64 = u64::MAX;
const IRQ_TOKEN: u64 = u64::MAX - 1;

/// Requests from the control side.
pub enum IoRequest {
    /// A new session; answers its key.
    AddSession {
        /// Session id.
        id: u64,
        /// Namespaces it may use.
        namespaces: Vec<NamespaceAccess>,
        /// Its counters.
        counters: Arc<SessionCounters>,
        /// Gets the session key.
        reply: Sender<usize>,
    },
    /// Attach the session's ring.
    AddRing {
        /// Session key.
        key: usize,
        /// The ring.
        ring: Box<RingIo>,
        /// Acknowledged once the ring is being polled.
        reply: Sender<()>,
    },
    /// Add a registered buffer; answers its id.
    AddBuffer {
        /// Session key.
        key: usize,
        /// The buffer.
        buffer: RegisteredBuffer,
        /// Gets the buffer id.
        reply: Sender<u32>,
    },
    /// Remove a buffer unless I/O on it is in flight.
    RemoveBuffer {
        /// Session key.
        key: usize,
        /// Buffer id.
        buffer_id: u32,
        /// Result.
        reply: Sender<Result<(), ControlError>>,
    },
    /// End a session: stop taking its SQEs, drain, release; answered when done.
    CloseSession {
        /// Session key.
        key: usize,
        /// Answered after release.
        reply: Sender<()>,
    },
    /// Drain everything, delete the I/O queue and shut the controller down.
    Shutdown {
        /// Answered when the controller is shut down.
        reply: Sender<()>,
    },
}

/// Per-command context kept while the device works.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    session: u32,
    buffer: u32,
    user_data: u64,
    len: u32,
    op: Opcode,
    epoch: u32,
    /// Index in `IoThread::splits` when this command is one piece of a split request.
    split: u32,
}

/// No split: the command is the whole request.
const WHOLE: u32 = u32::MAX;

/// A client request carried by several device commands.
#[derive(Debug)]
struct Split {
    remaining: u32,
    status: Status,
}

/// Accounts one finished piece; returns the request's status once its last piece finished.
fn piece_done(splits: &mut Slab<Split>, ctx: &InFlight, status: Status) -> Option<Status> {
    if ctx.split == WHOLE {
        return Some(status);
    }
    let sp = splits.get_mut(ctx.split as usize)?;
    sp.remaining -= 1;
    if sp.status.is_success() && !status.is_success() {
        sp.status = status; // the first error wins
    }
    (sp.remaining == 0).then(|| splits.remove(ctx.split as usize).status)
}

/// Granularity of command timeouts.
const EPOCH: Duration = Duration::from_millis(100);

/// The I/O thread's state.
pub struct IoThread {
    rx: Receiver<IoRequest>,
    requests_pending: Arc<CachePadded<AtomicBool>>,
    closing: usize,
    wake: Arc<OwnedFd>,
    controller: Controller,
    queue: IoQueue<InFlight>,
    splits: Slab<Split>,
    queue_depth: u16,
    io_timeout: Duration,
    epoch: u32,
    epoch_started: Instant,
    busy_rounds: u32,
    device_failed: bool,
    device: Arc<dyn NvmeDevice>,
    vector: Option<u16>,
    limits: DeviceLimits,
    sessions: Slab<Session>,
    epoll: Epoll,
    poll_idle: Duration,
    touched: Vec<usize>,
    shutdown: Option<Sender<()>>,
}

impl IoThread {
    /// Prepares the thread's state (run it with [`IoThread::run`]).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        rx: Receiver<IoRequest>,
        requests_pending: Arc<CachePadded<AtomicBool>>,
        wake: Arc<OwnedFd>,
        controller: Controller,
        queue: IoQueue<InFlight>,
        queue_depth: u16,
        vector: Option<u16>,
        limits: DeviceLimits,
        poll_idle: Duration,
        io_timeout: Duration,
    ) -> std::io::Result<Self> {
        let device = controller.device().clone();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        if let Some(fd) = vector.and_then(|v| device.interrupt_fd(v)) {
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, IRQ_TOKEN))?;
        }
        Ok(Self {
            rx,
            requests_pending,
            closing: 0,
            wake,
            controller,
            queue,
            splits: Slab::new(),
            queue_depth,
            io_timeout,
            epoch: 0,
            epoch_started: Instant::now(),
            busy_rounds: 0,
            device_failed: false,
            device,
            vector,
            limits,
            sessions: Slab::new(),
            epoll,
            poll_idle,
            touched: Vec::new(),
            shutdown: None,
        })
    }

    /// Runs until a Shutdown request has been served.
    pub fn run(mut self) {
        let mut idle_since: Option<Instant> = None;
        let mut idle_spins = 0u32;
        loop {
            // Control requests are rare: look at the channel only when one was announced.
            let mut work = self.requests_pending.load(Ordering::Relaxed)
                && self.requests_pending.swap(false, Ordering::Acquire)
                && self.serve_requests();
            work |= self.take_submissions();
            self.queue.ring_doorbell();
            work |= self.reap() > 0;
            self.publish_completions();
            self.release_closed_sessions();
            if self.shutdown.is_some() && self.sessions.is_empty() && self.queue.in_flight() == 0 {
                self.stop();
                return;
            }
            if work {
                idle_since = None;
                idle_spins = 0;
                self.busy_rounds = self.busy_rounds.wrapping_add(1);
                if self.busy_rounds.is_multiple_of(4096) {
                    self.check_timeouts(Instant::now());
                }
                continue;
            }
            // Idle: keep polling, reading the clock only every 64 empty rounds.
            idle_spins += 1;
            if !idle_spins.is_multiple_of(64) {
                // Back off a little between looks: polling the clients' index lines too eagerly
                // steals them from the clients writing them.
                for _ in 0..IDLE_PAUSES {
                    std::hint::spin_loop();
                }
                continue;
            }
            let now = Instant::now();
            self.check_timeouts(now);
            match idle_since {
                None => idle_since = Some(now),
                Some(t) if now.duration_since(t) >= self.poll_idle => {
                    self.sleep();
                    self.serve_requests(); // also notices a broker that went away
                    idle_since = None;
                }
                Some(_) => {}
            }
        }
    }

    fn serve_requests(&mut self) -> bool {
        let mut any = false;
        loop {
            let req = match self.rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) => return any,
                Err(TryRecvError::Disconnected) => {
                    // The broker is gone without a Shutdown: behave as if asked to stop.
                    let (tx, _rx) = std::sync::mpsc::channel();
                    self.begin_shutdown(tx);
                    return any;
                }
            };
            any = true;
            match req {
                IoRequest::AddSession { id, namespaces, counters, reply } => {
                    let key = self.sessions.insert(Session {
                        id,
                        namespaces,
                        ring: None,
                        buffers: Slab::new(),
                        in_flight: 0,
                        faulted: false,
                        closing: None,
                        counters,
                    });
                    let _ = reply.send(key);
                }
                IoRequest::AddRing { key, ring, reply } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        let ev = EpollEvent::new(EpollFlags::EPOLLIN, key as u64);
                        if let Err(e) = self.epoll.add(ring.submit_fd.as_fd(), ev) {
                            warn!(session = s.id, "epoll add failed: {e}");
                        }
                        s.ring = Some(*ring);
                    }
                    let _ = reply.send(());
                }
                IoRequest::AddBuffer { key, buffer, reply } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        bump(&s.counters.buffers, 1);
                        bump(&s.counters.buffer_bytes, buffer.len());
                        let id = s.buffers.insert(BufferEntry { buffer, in_flight: 0 });
                        let _ = reply.send(id as u32);
                    }
                }
                IoRequest::RemoveBuffer { key, buffer_id, reply } => {
                    let r = match self.sessions.get_mut(key) {
                        None => Err(ControlError::UnknownBuffer(buffer_id)),
                        Some(s) => match s.buffers.get(buffer_id as usize) {
                            None => Err(ControlError::UnknownBuffer(buffer_id)),
                            Some(b) if b.in_flight > 0 => {
                                Err(ControlError::BufferBusy { buffer_id, in_flight: u64::from(b.in_flight) })
                            }
                            Some(_) => {
                                let b = s.buffers.remove(buffer_id as usize);
                                bump(&s.counters.buffers, u64::MAX); // -1
                                bump(&s.counters.buffer_bytes, b.buffer.len().wrapping_neg());
                                drop(b); // unmaps from the device, then from the broker
                                Ok(())
                            }
                        },
                    };
                    let _ = reply.send(r);
                }
                IoRequest::CloseSession { key, reply } => match self.sessions.get_mut(key) {
                    Some(s) => {
                        if s.closing.is_none() {
                            self.closing += 1;
                        }
                        s.closing = Some(Some(reply));
                    }
                    None => {
                        let _ = reply.send(());
                    }
                },
                IoRequest::Shutdown { reply } => self.begin_shutdown(reply),
            }
        }
    }

    fn stop(self) {
        let IoThread { mut controller, queue, .. } = self;
        if let Err(e) = controller.delete_io_queue(queue.into_queue_pair()) {
            warn!("deleting the I/O queue failed: {e}");
        }
        if let Err(e) = controller.shutdown() {
            error!("controller shutdown failed: {e}");
        }
        info!("I/O thread stopped");
    }

    /// Advances the timeout clock; resets the controller if a command is overdue.
    fn check_timeouts(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.epoch_started);
        if elapsed < EPOCH {
            return;
        }
        let ticks = (elapsed.as_millis() / EPOCH.as_millis()) as u32;
        self.epoch = self.epoch.wrapping_add(ticks);
        self.epoch_started += EPOCH * ticks;
        let limit = (self.io_timeout.as_millis() / EPOCH.as_millis()).max(1) as u32;
        let epoch = self.epoch;
        if self.queue.in_flight_contexts().any(|c| epoch.wrapping_sub(c.epoch) > limit) {
            self.reset_device();
        }
    }

    /// A command timed out: reset the controller (which stops all its DMA), fail every command
    /// that was at the device with `DeviceReset`, and bring the I/O queue back.
    fn reset_device(&mut self) {
        error!(
            in_flight = self.queue.in_flight(),
            timeout_ms = self.io_timeout.as_millis() as u64,
            "a command did not complete in time; resetting the controller"
        );
        let reset = self.controller.reset();
        // The controller is disabled now (or unreachable): nothing it was given can DMA anymore.
        for ctx in self.queue.abandon_all() {
            if let Some(status) =
                piece_done(&mut self.splits, &ctx, Status::Broker(BrokerStatus::DeviceReset))
            {
                complete(&mut self.sessions, &mut self.touched, ctx, status);
            }
        }
        let restored = reset.and_then(|()| {
            self.controller.request_io_queues(1)?;
            let qp = self.controller.create_io_queue(1, self.queue_depth, self.vector)?;
            IoQueue::new(qp, self.controller.device(), self.controller.iova_space()).map_err(Into::into)
        });
        match restored {
            Ok(q) => {
                self.queue = q;
                info!("controller reset; I/O resumed");
            }
            Err(e) => {
                error!("the controller did not come back after a reset: {e}; failing all I/O");
                self.device_failed = true;
            }
        }
        self.publish_completions();
    }

    fn begin_shutdown(&mut self, reply: Sender<()>) {
        for (_, s) in self.sessions.iter_mut() {
            if s.closing.is_none() {
                self.closing += 1;
                s.closing = Some(None);
            }
        }
        self.shutdown = Some(reply);
    }

    fn take_submissions(&mut self) -> bool {
        let mut took = false;
        let limits = self.limits;
        for (key, s) in self.sessions.iter_mut() {
            if s.faulted || s.closing.is_some() {
                continue;
            }
            let Some(ring) = s.ring.as_mut() else { continue };
            // Retry completions that did not fit earlier.
            while let Some(&c) = ring.overflow.front() {
                match ring.cq.push(c) {
                    Ok(true) => {
                        ring.overflow.pop_front();
                        ring.dirty = true;
                    }
                    Ok(false) => break,
                    Err(_) => break,
                }
            }
            let available = match ring.sq.available() {
                Ok(n) => n,
                Err(e) => {
                    fault(s.id, ring, RingFault::SqTailCorrupt, e);
                    s.faulted = true;
                    continue;
                }
            };
            if available == 0 {
                if ring.dirty {
                    self.touched.push(key);
                }
                continue;
            }
            // Room for every completion this ring may receive: never post more than fits.
            // The client's CQ head is read only when the cached view has too little room.
            let reserved = s.in_flight + ring.overflow.len() as u32;
            let free = match ring.cq.free_at_least(reserved + available.min(TAKE_BATCH)) {
                Ok(f) => f,
                Err(e) => {
                    fault(s.id, ring, RingFault::CqHeadCorrupt, e);
                    s.faulted = true;
                    continue;
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
                    Ok(Validated::Device { .. }) if self.device_failed => {
                        Status::Broker(BrokerStatus::DeviceFault)
                    }
                    Ok(Validated::Device { cmd, buffer, len }) => {
                        let pieces = cmd.piece_count(limits.max_transfer);
                        if self.queue.free_slots() < pieces as usize {
                            break; // device queue full: leave the entry for the next round
                        }
                        let split = if pieces > 1 {
                            self.splits.insert(Split { remaining: pieces, status: Status::Success }) as u32
                        } else {
                            WHOLE
                        };
                        let ctx = InFlight {
                            epoch: self.epoch,
                            session: key as u32,
                            buffer: buffer.unwrap_or(u32::MAX),
                            user_data: sqe.user_data,
                            len,
                            op: Opcode::from_u8(sqe.opcode).unwrap_or(Opcode::Nop),
                            split,
                        };
                        for k in 0..pieces {
                            let piece = cmd.piece(k, limits.max_transfer);
                            let queued = self.queue.submit(&piece, ctx);
                            debug_assert!(queued.is_ok(), "free slots were checked");
                        }
                        s.in_flight += 1;
                        if let Some(b) = buffer.and_then(|b| s.buffers.get_mut(b as usize)) {
                            b.in_flight += 1;
                        }
                        taken += 1;
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
        }
        took
    }

    fn reap(&mut self) -> usize {
        let sessions = &mut self.sessions;
        let touched = &mut self.touched;
        let splits = &mut self.splits;
        self.queue.reap(REAP_BATCH, |ctx, status_field, _result| {
            let status = if status_field & 0x7ff == 0 {
                Status::Success
            } else {
                Status::Nvme(NvmeStatus::from_status_field(status_field))
            };
            if let Some(status) = piece_done(splits, &ctx, status) {
                complete(sessions, touched, ctx, status);
            }
        })
    }

    fn publish_completions(&mut self) {
        for key in self.touched.drain(..) {
            if let Some(ring) = self.sessions.get_mut(key).and_then(|s| s.ring.as_mut()) {
                if ring.dirty {
                    ring.publish();
                }
            }
        }
    }

    fn release_closed_sessions(&mut self) {
        if self.closing == 0 {
            return;
        }
        let done: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.closing.is_some() && s.in_flight == 0)
            .map(|(k, _)| k)
            .collect();
        for key in done {
            self.closing -= 1;
            let mut s = self.sessions.remove(key);
            if let Some(ring) = s.ring.as_ref() {
                let _ = self.epoll.delete(ring.submit_fd.as_fd());
                ring.fault(RingFault::Closed);
            }
            let buffers = s.buffers.len();
            s.buffers.clear(); // DMA unmap happens here, after the last command completed
            debug!(session = s.id, buffers, "session released");
            if let Some(Some(reply)) = s.closing.take() {
                let _ = reply.send(());
            }
        }
    }

    fn sleep(&mut self) {
        for (_, s) in self.sessions.iter() {
            if let Some(r) = s.ring.as_ref() {
                announce_sleep(&SharedFlags::broker(&r.mem), BROKER_NEED_WAKEUP);
            }
        }
        let in_flight = self.queue.in_flight() > 0;
        if let (true, Some(v)) = (in_flight, self.vector) {
            self.device.interrupt_hint(v, true);
        }
        fence(Ordering::SeqCst); // orders the interrupt hint before the device CQ check
                                 // Re-check everything after announcing the sleep (pairs with the clients' fence).
        let mut blocked = false;
        let mut ready = self.queue.has_completion();
        for (_, s) in self.sessions.iter_mut() {
            let Some(r) = s.ring.as_mut() else { continue };
            if s.faulted || s.closing.is_some() {
                continue;
            }
            if r.sq.available().is_ok_and(|n| n > 0) {
                let room = r.cq.free().unwrap_or(0).saturating_sub(s.in_flight + r.overflow.len() as u32);
                if room > 0 {
                    ready = true;
                } else {
                    blocked = true; // waiting for the client to reap; it does not signal us
                }
            }
            blocked |= !r.overflow.is_empty();
        }
        if !ready {
            let timeout = if blocked || (in_flight && self.vector.is_none()) {
                1 // nothing will wake us: look again soon
            } else if in_flight {
                100
            } else {
                1000
            };
            let mut events = [EpollEvent::empty(); 32];
            let n = self.epoll.wait(&mut events, EpollTimeout::try_from(timeout).unwrap()).unwrap_or(0);
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
                end_sleep(&SharedFlags::broker(&r.mem), BROKER_NEED_WAKEUP);
            }
        }
    }
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread").field("sessions", &self.sessions.len()).finish()
    }
}

/// Posts the completion of a device command to its client and updates the accounting.
fn complete(sessions: &mut Slab<Session>, touched: &mut Vec<usize>, ctx: InFlight, status: Status) {
    let Some(s) = sessions.get_mut(ctx.session as usize) else {
        warn!("completion for a session that no longer exists");
        return;
    };
    s.in_flight -= 1;
    s.counters.in_flight.store(u64::from(s.in_flight), Ordering::Relaxed);
    if let Some(b) = s.buffers.get_mut(ctx.buffer as usize) {
        b.in_flight -= 1;
    }
    bump(&s.counters.completed, 1);
    if status.is_success() {
        match ctx.op {
            Opcode::Read => bump(&s.counters.bytes_read, u64::from(ctx.len)),
            Opcode::Write => bump(&s.counters.bytes_written, u64::from(ctx.len)),
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
    let Some(ring) = s.ring.as_mut() else { return };
    if s.faulted {
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
fn fault(session: u64, ring: &RingIo, why: RingFault, e: nvmed_proto::ring::RingError) {
    warn!(session, "client corrupted its ring ({why:?}: {e}); ring faulted");
    ring.fault(why);
}
