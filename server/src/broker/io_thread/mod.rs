//! The I/O thread: takes clients' submissions, drives the device queue, posts completions.
//!
//! It owns all data-plane state, so the hot path takes no lock and makes no syscall while
//! busy: it polls the rings and the device completion queue, and sleeps on eventfds (clients'
//! submit eventfds, the device interrupt, the control wakeup) only after `poll_idle` without work.
//!
//! The jobs live in their own files: [`submit`] (taking SQEs fairly and admitting commands),
//! [`complete`] (reaping the device and posting CQEs), [`split`] (requests carried by several
//! commands), [`vectored`] (segment lists, PRP/SGL/bounce per piece), [`sleep`] (when and how
//! to block), [`reset`] (timeouts and controller resets).
//! Buffers and rings it no longer needs go to the [`Reaper`], never unmapped here.

mod complete;
mod reset;
mod sleep;
pub mod split;
mod submit;
pub mod vectored;

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags};
use nvmed_proto::{BrokerStatus, ControlError, RingFault};
use slab::Slab;
use tracing::{debug, info, warn};

use super::buffer::RegisteredBuffer;
use super::reaper::Reaper;
use super::session::{bump, BrokerCounters, BufferEntry, CachePadded, RingIo, Session, SessionCounters};
use super::validate::DeviceLimits;
use crate::device::NvmeDevice;
use crate::nvme::{Controller, DmaSeg, IoQueue};
use crate::policy::NamespaceAccess;
use split::{InFlight, Split};
use vectored::{BouncePool, VecPool, VEC_SLOTS};

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

/// Granularity of command timeouts.
const EPOCH: Duration = Duration::from_millis(100);

/// The device queue as the I/O thread uses it, with what follows from its real size.
struct DeviceQueue {
    queue: IoQueue<InFlight>,
    /// Most device slots one session may hold: a quarter of the queue stays for the others.
    session_slots: u32,
}

impl DeviceQueue {
    fn new(queue: IoQueue<InFlight>) -> Self {
        let capacity = queue.free_slots() as u32;
        Self { session_slots: (capacity - capacity / 4).max(1), queue }
    }
}

/// What the I/O thread was set up with.
pub struct IoThreadSetup {
    /// Control requests.
    pub rx: Receiver<IoRequest>,
    /// Set when a control request was sent.
    pub requests_pending: Arc<CachePadded<AtomicBool>>,
    /// Written when a control request was sent.
    pub wake: Arc<OwnedFd>,
    /// The controller (admin queue).
    pub controller: Controller,
    /// The I/O queue.
    pub queue: IoQueue<InFlight>,
    /// Entries asked for when the queue is created again after a reset.
    pub queue_depth: u16,
    /// Its interrupt vector.
    pub vector: Option<u16>,
    /// Request limits.
    pub limits: DeviceLimits,
    /// Polling time before sleeping.
    pub poll_idle: Duration,
    /// Command timeout.
    pub io_timeout: Duration,
    /// Where released buffers and rings go.
    pub reaper: Reaper,
    /// Bounce buffers for vectored pieces the device cannot reach directly.
    pub bounce: BouncePool,
    /// Broker-wide data path counters.
    pub counters: Arc<BrokerCounters>,
}

/// The I/O thread's state.
pub struct IoThread {
    rx: Receiver<IoRequest>,
    requests_pending: Arc<CachePadded<AtomicBool>>,
    closing: usize,
    wake: Arc<OwnedFd>,
    controller: Controller,
    dq: DeviceQueue,
    splits: Slab<Split>,
    queue_depth: u16,
    io_timeout: Duration,
    epoch: u32,
    epoch_started: Instant,
    busy_rounds: u32,
    /// The controller could not be brought back: device commands fail with `DeviceFault`.
    device_failed: bool,
    /// Whether the device was seen to stop its DMA when it failed. If not, commands it held
    /// are never reported finished and their sessions' buffers are never released.
    dma_stopped: bool,
    device: Arc<dyn NvmeDevice>,
    vector: Option<u16>,
    limits: DeviceLimits,
    sessions: Slab<Session>,
    /// Session keys in the order submissions are taken, rotated every round.
    order: Vec<usize>,
    next_first: usize,
    /// Sessions whose commands a failed device may still be executing: never released.
    zombies: Vec<Session>,
    epoll: Epoll,
    poll_idle: Duration,
    touched: Vec<usize>,
    reaper: Reaper,
    shutdown: Option<Sender<()>>,
    /// Segment lists of vectored requests in flight.
    vecs: VecPool,
    bounce: BouncePool,
    /// One piece's device runs, while its command is built.
    scratch: Box<[DmaSeg]>,
    broker_counters: Arc<BrokerCounters>,
}

impl IoThread {
    /// Prepares the thread's state (run it with [`IoThread::run`]).
    pub fn new(setup: IoThreadSetup) -> std::io::Result<Self> {
        let device = setup.controller.device().clone();
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(setup.wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        if let Some(fd) = setup.vector.and_then(|v| device.interrupt_fd(v)) {
            epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, IRQ_TOKEN))?;
        }
        Ok(Self {
            rx: setup.rx,
            requests_pending: setup.requests_pending,
            closing: 0,
            wake: setup.wake,
            controller: setup.controller,
            dq: DeviceQueue::new(setup.queue),
            splits: Slab::new(),
            queue_depth: setup.queue_depth,
            io_timeout: setup.io_timeout,
            epoch: 0,
            epoch_started: Instant::now(),
            busy_rounds: 0,
            device_failed: false,
            dma_stopped: true,
            device,
            vector: setup.vector,
            limits: setup.limits,
            sessions: Slab::new(),
            order: Vec::new(),
            next_first: 0,
            zombies: Vec::new(),
            epoll,
            poll_idle: setup.poll_idle,
            touched: Vec::new(),
            reaper: setup.reaper,
            shutdown: None,
            vecs: VecPool::new(VEC_SLOTS),
            bounce: setup.bounce,
            scratch: vec![DmaSeg::default(); usize::from(nvmed_proto::MAX_SEGMENTS)].into_boxed_slice(),
            broker_counters: setup.counters,
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
            self.dq.queue.ring_doorbell();
            work |= self.reap() > 0;
            self.publish_completions();
            self.release_closed_sessions();
            // Commands of a device that never stopped are not waited for: they never end.
            let drained = self.dq.queue.in_flight() == 0 || !self.dma_stopped;
            if self.shutdown.is_some() && self.sessions.is_empty() && drained {
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
                        slots: 0,
                        partial: None,
                        vectored: 0,
                        faulted: false,
                        closing: None,
                        counters,
                    });
                    self.order.push(key);
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
                                // No command uses it: unmapping is the reaper's job.
                                self.reaper.dispose(b);
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
        let IoThread { mut controller, dq, zombies, device_failed, .. } = self;
        if !device_failed {
            if let Err(e) = controller.delete_io_queue(dq.queue.into_queue_pair()) {
                warn!("deleting the I/O queue failed: {e}");
            }
        } else {
            std::mem::forget(dq); // its memory may still be written by the device
        }
        if let Err(e) = controller.shutdown() {
            tracing::error!("controller shutdown failed: {e}");
        }
        if !zombies.is_empty() {
            tracing::error!(
                sessions = zombies.len(),
                "the device never confirmed it stopped; their buffers stay mapped until exit"
            );
            std::mem::forget(zombies);
        }
        info!("I/O thread stopped");
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

    fn release_closed_sessions(&mut self) {
        if self.closing == 0 {
            return;
        }
        let mut i = 0;
        while i < self.order.len() {
            let key = self.order[i];
            let s = &mut self.sessions[key];
            if s.closing.is_none() {
                i += 1;
                continue;
            }
            // Pieces never given to the device are dropped; the request completes (unseen)
            // when its submitted pieces do.
            if let Some(p) = s.partial.take() {
                if let Some(status) = split::pieces_done(
                    &mut self.splits,
                    &p.ctx,
                    p.pieces - p.next,
                    nvmed_proto::Status::Broker(BrokerStatus::DeviceReset),
                ) {
                    complete::complete(&mut self.sessions, &mut self.touched, &mut self.vecs, p.ctx, status);
                }
            }
            let s = &mut self.sessions[key];
            let dead = s.in_flight > 0 && !self.dma_stopped;
            if s.in_flight > 0 && !dead {
                i += 1;
                continue;
            }
            self.closing -= 1;
            self.order.swap_remove(i);
            let mut s = self.sessions.remove(key);
            if let Some(ring) = s.ring.as_ref() {
                let _ = self.epoll.delete(ring.submit_fd.as_fd());
                ring.fault(if dead { RingFault::DeviceFailed } else { RingFault::Closed });
            }
            let reply = s.closing.take().flatten();
            if dead {
                // The device may still write into these buffers: keep them mapped for good.
                tracing::error!(session = s.id, in_flight = s.in_flight, "session ended with commands a failed device may still execute; keeping its buffers pinned");
                self.zombies.push(s);
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
            } else {
                debug!(session = s.id, buffers = s.buffers.len(), "session released");
                // DMA unmap happens on the reaper, after the last command completed; the session
                // is reported ended once its memory is released.
                self.reaper.dispose_then_notify((std::mem::take(&mut s.buffers), s.ring.take()), reply);
            }
        }
    }
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread").field("sessions", &self.sessions.len()).finish()
    }
}
