//! The I/O thread: takes clients' submissions, drives the device queue, posts completions.
//!
//! It owns all data-plane state, so the hot path takes no lock and makes no syscall while
//! busy: it polls the rings and the device completion queue, and sleeps on eventfds and doorbells (clients'
//! submit doorbells, the device interrupt, the control wakeup) only after polling a while without
//! work (at most `poll_idle`, less when sleeps show that polling does not pay).
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
use nvmed_proto::wakeup::{adapt_poll, yield_cpu, YIELD_AFTER};
use nvmed_proto::{BrokerStatus, RingFault};
use slab::Slab;
use tracing::{debug, info, warn};

use super::buffer::RegisteredBuffer;
use super::manager::ControllerShared;
use super::reaper::Reaper;
use super::sched::{SchedConfig, Scheduler, TenantId, TenantLimits};
use super::session::{BrokerCounters, BufferTable, CachePadded, RingIo, Session, SessionCounters};
use super::tenant::TenantKey;
use super::validate::DeviceLimits;
use crate::device::NvmeDevice;
use crate::nvme::io::RetryPolicy;
use crate::nvme::{DmaSeg, IoQueue};
use crate::policy::NamespaceAccess;
use split::{InFlight, Split};
use vectored::{BouncePool, VecPool, VEC_NONE, VEC_SLOTS};

/// `pause` instructions between two looks at the rings when idle.
const IDLE_PAUSES: u32 = 1;
const WAKE_TOKEN: u64 = u64::MAX;
/// Interrupt of controller `c`: `IRQ_TOKEN + c` (ring keys are far below).
const IRQ_TOKEN: u64 = 1 << 62;

/// Requests from the control side.
pub enum IoRequest {
    /// Serve a ring of a session; answers its key on this thread.
    AddRing {
        /// Session id (for logs).
        session: u64,
        /// The client's uid (whose turn the reaper takes when the ring is released).
        uid: u32,
        /// The ring's id in its session.
        ring_id: u32,
        /// Namespaces the session may use.
        namespaces: Vec<NamespaceAccess>,
        /// The ring's counters.
        counters: Arc<SessionCounters>,
        /// The ring.
        ring: Box<RingIo>,
        /// The session's buffers registered so far, by id.
        buffers: Vec<(u32, Arc<RegisteredBuffer>)>,
        /// Its tenant on each controller it may use, with the limits this thread enforces.
        tenants: Vec<(TenantKey, TenantLimits)>,
        /// Gets the ring's key, once it is being polled.
        reply: Sender<usize>,
    },
    /// The session's grants changed: the namespaces (windows, read-only) its ring may use now.
    UpdateRing {
        /// Ring key.
        key: usize,
        /// What it may use.
        namespaces: Vec<NamespaceAccess>,
    },
    /// A tenant's rings moved between threads: the limits this thread enforces for it now.
    SetTenantLimits {
        /// The tenant.
        key: TenantKey,
        /// Its limits here.
        limits: TenantLimits,
    },
    /// A buffer the session registered: usable from this ring too.
    AddBuffer {
        /// Ring key.
        key: usize,
        /// Its id in the session.
        id: u32,
        /// The buffer.
        buffer: Arc<RegisteredBuffer>,
        /// Answered once the ring may use it.
        reply: Sender<()>,
    },
    /// The session unregisters a buffer: new requests may not use it; answered once no
    /// command of this ring uses it.
    RetireBuffer {
        /// Ring key.
        key: usize,
        /// Buffer id.
        id: u32,
        /// Answered when no command of this ring uses it any more.
        reply: Sender<()>,
    },
    /// Stop taking the ring's SQEs, drain it, release it; answered when done.
    CloseRing {
        /// Ring key.
        key: usize,
        /// Why, as the ring's fault word will say once it is closed (`Closed`, or `Killed`).
        fault: RingFault,
        /// Answered after release.
        reply: Sender<()>,
    },
    /// The metrics endpoint's look at this thread's schedulers and device queues (asked at
    /// most every [`crate::broker::metrics::SAMPLE_MAX_AGE`], never on the I/O path).
    Sample {
        /// Gets the figures.
        reply: Sender<crate::broker::metrics::ThreadSample>,
    },
    /// Drain everything and delete this thread's I/O queue.
    Shutdown {
        /// Answered when the queue is deleted.
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
    /// Index of this thread among the controller's I/O threads (0-based).
    pub index: u16,
    /// Control requests.
    pub rx: Receiver<IoRequest>,
    /// Set when a control request was sent.
    pub requests_pending: Arc<CachePadded<AtomicBool>>,
    /// Written when a control request was sent (or the controller was reset).
    pub wake: Arc<OwnedFd>,
    /// This thread's queue on each controller (by controller index).
    pub ports: Vec<PortSetup>,
    /// Its queue id (the same on every controller).
    pub qid: u16,
    /// Each controller's request limits.
    pub limits: Vec<DeviceLimits>,
    /// Longest poll before sleeping, with commands at the device.
    pub poll_idle: Duration,
    /// Longest poll before sleeping, with none.
    pub poll_clients: Duration,
    /// Command timeout.
    pub io_timeout: Duration,
    /// Where released rings go.
    pub reaper: Reaper,
    /// This thread's data path counters.
    pub counters: Arc<BrokerCounters>,
    /// CPUs to run on (all if empty).
    pub cpus: Vec<usize>,
    /// The schedulers' cap on a contended tenant's cost at the device
    /// ([`super::sched::SchedConfig::contended_cost`]).
    pub contended_cost: u64,
    /// How the device queues retry commands.
    pub retry: RetryPolicy,
    /// Abort a command that timed out before resetting its controller.
    pub aborts: bool,
    /// Token buckets of tenants whose last ring on a thread ended before they were full again,
    /// shared by the I/O threads (see [`SavedTenants`]).
    pub saved: Arc<SavedTenants>,
}

/// Token buckets of tenants whose last ring on an I/O thread ended before they were full again
/// (debt included): taken back when the tenant comes back to a thread (a new ring or session of
/// the same uid), so that ending a ring does not refill a tenant's buckets. Kept per thread (a
/// tenant spread over threads has buckets on each); a tenant coming back to another thread takes
/// one of those. Per-session tenants never come back and are not kept. Touched only when a
/// tenant leaves or arrives on a thread, never per I/O.
#[derive(Debug, Default)]
pub struct SavedTenants(std::sync::Mutex<std::collections::HashMap<TenantKey, Vec<SavedOnThread>>>);

/// One thread's saved buckets of a tenant.
#[derive(Debug)]
struct SavedOnThread {
    thread: u16,
    buckets: crate::broker::sched::SavedBuckets,
    saved_at: Instant,
    full_at: Instant,
}

impl SavedTenants {
    fn map(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<TenantKey, Vec<SavedOnThread>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps `saved` (taken at `now` of thread `thread`'s clock) for tenant `key`.
    fn keep(&self, key: TenantKey, thread: u16, saved: crate::broker::sched::SavedBuckets, now: u64) {
        if key.session().is_some() {
            return;
        }
        let at = Instant::now();
        let full_at = at + Duration::from_nanos(saved.full_at_ns.saturating_sub(now));
        let mut map = self.map();
        // Bounded: one per tenant key and thread, each only until its buckets refill.
        map.retain(|_, v| {
            v.retain(|s| s.full_at > at);
            !v.is_empty()
        });
        let v = map.entry(key).or_default();
        v.retain(|s| s.thread != thread);
        v.push(SavedOnThread { thread, buckets: saved, saved_at: at, full_at });
    }

    /// What tenant `key` left behind on thread `thread` (else on another), on the clock of a
    /// thread whose time is `now`.
    fn take(&self, key: TenantKey, thread: u16, now: u64) -> Option<crate::broker::sched::SavedBuckets> {
        let mut map = self.map();
        let v = map.get_mut(&key)?;
        let i = v.iter().position(|s| s.thread == thread).unwrap_or(0);
        let s = v.swap_remove(i);
        if v.is_empty() {
            map.remove(&key);
        }
        if s.full_at <= Instant::now() {
            return None;
        }
        let mut buckets = s.buckets;
        buckets.rebase(now.saturating_sub(s.saved_at.elapsed().as_nanos() as u64));
        Some(buckets)
    }
}

/// An I/O thread's queue on one controller, as created at start.
pub struct PortSetup {
    /// The controller (admin queue, resets).
    pub ctrl: Arc<ControllerShared>,
    /// The queue.
    pub queue: IoQueue<InFlight>,
    /// Its interrupt vector.
    pub vector: Option<u16>,
    /// Bounce buffers for vectored pieces the device cannot reach directly.
    pub bounce: BouncePool,
}

/// This thread's side of one controller: its queue pair there, and what follows from it.
pub struct Port {
    ctrl: Arc<ControllerShared>,
    device: Arc<dyn NvmeDevice>,
    /// The controller's reset generation this queue belongs to.
    generation: u64,
    dq: DeviceQueue,
    vector: Option<u16>,
    bounce: BouncePool,
    /// The controller could not be brought back: its commands fail with `DeviceFault` (or
    /// `DeviceGone`).
    device_failed: bool,
    /// Resets asked for in a row because this thread's queue could not be created again after
    /// one (a few are tried before the thread gives the controller up).
    recreate_tries: u8,
    /// The controller is gone (surprise removal).
    gone: bool,
    /// Whether the device was seen to stop its DMA when it failed. If not, commands it held
    /// are never reported finished and their rings' buffers are never released.
    dma_stopped: bool,
    /// Commands such a device completed after it failed: taken off its queue (so it does not
    /// look busy for ever) but still counted as using their buffers (a failed device is not
    /// trusted to be done with them), so an unregister of one is answered as for a command it
    /// still holds. At most a queue's worth: a failed device takes no new command.
    abandoned: Vec<InFlight>,
    /// Shares this queue between the tenants of this thread's rings.
    sched: Scheduler,
    /// Those tenants' scheduler ids.
    tenants: std::collections::HashMap<TenantKey, TenantId>,
    /// Each tenant's rings here (ring keys), and where its next visit starts among them.
    tenant_rings: crate::broker::sched::TenantIdMap<(Vec<usize>, usize)>,
}

/// The I/O thread's state.
pub struct IoThread {
    index: u16,
    rx: Receiver<IoRequest>,
    requests_pending: Arc<CachePadded<AtomicBool>>,
    closing: usize,
    wake: Arc<OwnedFd>,
    /// Its queue on each controller, by controller index.
    ports: Vec<Port>,
    qid: u16,
    splits: Slab<Split>,
    io_timeout: Duration,
    /// Abort overdue commands before resetting (else reset at once).
    aborts: bool,
    saved: Arc<SavedTenants>,
    epoch: u32,
    epoch_started: Instant,
    busy_rounds: u32,
    limits: Vec<DeviceLimits>,
    /// The rings served here (each with its view of its session).
    sessions: Slab<Session>,
    /// Ring keys in the order submissions are taken, rotated every round.
    order: Vec<usize>,
    next_first: usize,
    /// Rings whose commands a failed device may still be executing (kept in `sessions`, marked
    /// `zombie`): never released.
    zombies: usize,
    epoll: Epoll,
    poll_idle: Duration,
    poll_clients: Duration,
    touched: Vec<usize>,
    reaper: Reaper,
    shutdown: Option<Sender<()>>,
    /// Segment lists of vectored requests in flight.
    vecs: VecPool,
    /// One piece's device runs, while its command is built.
    scratch: Box<[DmaSeg]>,
    broker_counters: Arc<BrokerCounters>,
    cpus: Vec<usize>,
    /// The schedulers' time origin.
    started: Instant,
    /// Ring keys of the tenant being visited (reused: no allocation per round).
    visit: Vec<usize>,
    /// Earliest time (schedulers' clock) a rate limit lets a tenant with work go again.
    throttled_until: Option<u64>,
}

/// Whether a ring with `slots` device commands per controller has some at a controller that
/// failed without confirming it stopped (they may still execute, and never complete).
fn on_unstopped_device(ports: &[Port], slots: &[u32]) -> bool {
    ports.iter().zip(slots).any(|(p, &n)| n > 0 && !p.dma_stopped)
}

/// Whether a ring with commands at each controller as `slots` says has any at a controller
/// that will report them (every one but those that failed without confirming they stopped).
fn on_answering_device(ports: &[Port], slots: &[u32]) -> bool {
    ports.iter().zip(slots).any(|(p, &n)| n > 0 && p.dma_stopped)
}

/// Calls `f` with the id of each buffer that ring `key`'s commands at `port` use (every
/// segment's of a vectored command; an id once per command or segment).
fn buffers_used_at(port: &Port, vecs: &VecPool, key: usize, mut f: impl FnMut(u32)) {
    let contexts = port.dq.queue.in_flight_contexts().chain(&port.abandoned);
    for ctx in contexts.filter(|ctx| ctx.session as usize == key) {
        if ctx.buffer != u32::MAX {
            f(ctx.buffer);
        }
        if ctx.vec != VEC_NONE {
            for seg in vecs.segs(ctx.vec) {
                f(seg.tag);
            }
        }
    }
}

/// Whether a command of ring `key` at a controller that failed without confirming it stopped
/// uses buffer `id` (the device may still move its data: it stays mapped for good).
fn buffer_at_unstopped_device(ports: &[Port], vecs: &VecPool, slots: &[u32], key: usize, id: u32) -> bool {
    ports.iter().zip(slots).filter(|(p, &n)| n > 0 && !p.dma_stopped).any(|(p, _)| {
        let mut used = false;
        buffers_used_at(p, vecs, key, |b| used |= b == id);
        used
    })
}

impl IoThread {
    /// Prepares the thread's state (run it with [`IoThread::run`]).
    pub fn new(setup: IoThreadSetup) -> std::io::Result<Self> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        epoll.add(setup.wake.as_fd(), EpollEvent::new(EpollFlags::EPOLLIN, WAKE_TOKEN))?;
        let mut ports = Vec::new();
        for (c, mut p) in setup.ports.into_iter().enumerate() {
            p.queue.set_retry_policy(setup.retry);
            let device = p.ctrl.device().clone();
            if let Some(fd) = p.vector.and_then(|v| device.interrupt_fd(v)) {
                epoll.add(fd, EpollEvent::new(EpollFlags::EPOLLIN, IRQ_TOKEN + c as u64))?;
            }
            let slots = p.queue.free_slots() as u32;
            ports.push(Port {
                generation: p.ctrl.generation(),
                ctrl: p.ctrl,
                device,
                sched: Scheduler::new(SchedConfig {
                    contended_cost: setup.contended_cost,
                    ..SchedConfig::new(slots)
                }),
                tenants: std::collections::HashMap::new(),
                tenant_rings: Default::default(),
                dq: DeviceQueue::new(p.queue),
                vector: p.vector,
                bounce: p.bounce,
                device_failed: false,
                recreate_tries: 0,
                gone: false,
                dma_stopped: true,
                abandoned: Vec::new(),
            });
        }
        Ok(Self {
            index: setup.index,
            rx: setup.rx,
            requests_pending: setup.requests_pending,
            closing: 0,
            wake: setup.wake,
            ports,
            qid: setup.qid,
            splits: Slab::new(),
            io_timeout: setup.io_timeout,
            aborts: setup.aborts,
            saved: setup.saved,
            epoch: 0,
            epoch_started: Instant::now(),
            busy_rounds: 0,
            limits: setup.limits,
            sessions: Slab::new(),
            order: Vec::new(),
            next_first: 0,
            zombies: 0,
            epoll,
            poll_idle: setup.poll_idle,
            poll_clients: setup.poll_clients,
            touched: Vec::new(),
            reaper: setup.reaper,
            shutdown: None,
            vecs: VecPool::new(VEC_SLOTS),
            scratch: vec![DmaSeg::default(); usize::from(nvmed_proto::MAX_SEGMENTS)].into_boxed_slice(),
            broker_counters: setup.counters,
            cpus: setup.cpus,
            started: Instant::now(),
            visit: Vec::new(),
            throttled_until: None,
        })
    }

    /// Nanoseconds since the thread started (the schedulers' clock).
    fn now_ns(&self) -> u64 {
        self.started.elapsed().as_nanos() as u64
    }

    /// Pins the thread to its CPUs, if any were given.
    fn pin(&self) {
        if self.cpus.is_empty() {
            return;
        }
        let mut set = nix::sched::CpuSet::new();
        for &c in &self.cpus {
            if let Err(e) = set.set(c) {
                warn!(thread = self.index, cpu = c, "cannot pin to this CPU: {e}");
            }
        }
        if let Err(e) = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set) {
            warn!(thread = self.index, cpus = ?self.cpus, "cannot pin the I/O thread: {e}");
        }
    }

    /// Runs until a Shutdown request has been served.
    pub fn run(mut self) {
        self.pin();
        let vectors: Vec<Option<u16>> = self.ports.iter().map(|p| p.vector).collect();
        info!(
            thread = self.index,
            queue = self.qid,
            controllers = self.ports.len(),
            ?vectors,
            cpus = ?self.cpus,
            "I/O thread started"
        );
        let mut idle_since: Option<Instant> = None;
        // How long to poll without work before sleeping, adapted to how long the sleeps last
        // (see `nvmed_proto::wakeup::adapt_poll`): one window while commands are at the device (their
        // completions are sure to come, and soon: at most `poll_idle`), one while waiting for
        // clients only (whose next request may never come: at most `poll_clients`).
        let mut windows = [self.poll_idle, self.poll_clients];
        let mut idle_spins = 0u32;
        let mut yield_early = false;
        loop {
            // Control requests are rare: look at the channel only when one was announced.
            let mut work = self.requests_pending.load(Ordering::Relaxed)
                && self.requests_pending.swap(false, Ordering::Acquire)
                && self.serve_requests();
            // A reset by any thread stopped this thread's queue on that controller too: rebuild
            // it first.
            for c in 0..self.ports.len() {
                if self.ports[c].ctrl.generation() != self.ports[c].generation {
                    self.recover(c);
                }
            }
            work |= self.take_submissions();
            let mut resent = false;
            for p in &mut self.ports {
                if p.dq.queue.has_retries() && !p.device_failed {
                    resent |= p.dq.queue.resubmit_due(Instant::now()) > 0;
                }
                p.dq.queue.ring_doorbell();
            }
            if resent {
                self.publish_retries();
                work = true;
            }
            work |= self.reap() > 0;
            self.publish_completions();
            self.release_closed_sessions();
            // Commands of a device that never stopped are not waited for: they never end.
            let drained = self.ports.iter().all(|p| p.dq.queue.in_flight() == 0 || !p.dma_stopped);
            if self.shutdown.is_some() && self.sessions.len() == self.zombies && drained {
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
            // Idle for a while (not just between two requests of a busy client), or the last
            // yield found others waiting for this CPU: offer it to any other runnable thread
            // every 64 looks. On a machine with fewer CPUs than busy threads, a client (or
            // another I/O thread) sharing this CPU has the work this loop waits for, and would
            // otherwise wait for this spin's time slice to end. With nobody else to run it is a
            // bare system call.
            if yield_early || idle_since.is_some_and(|t| now.duration_since(t) >= YIELD_AFTER) {
                yield_early = !yield_cpu().is_zero();
            }
            let Some(t) = idle_since else {
                idle_since = Some(now);
                continue;
            };
            // 0: commands are at the device; 1: waiting for clients only.
            let waits = usize::from(self.ports.iter().all(|p| p.dq.queue.in_flight() == 0));
            if now.duration_since(t) >= windows[waits] {
                // Timed from here: `now` may predate a yield that let other threads run.
                let before = Instant::now();
                self.sleep();
                let max = [self.poll_idle, self.poll_clients][waits];
                windows[waits] = adapt_poll(windows[waits], before.elapsed(), max);
                self.serve_requests(); // also notices a broker that went away
                idle_since = None;
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
                IoRequest::AddRing {
                    session,
                    uid,
                    ring_id,
                    namespaces,
                    counters,
                    ring,
                    buffers,
                    tenants,
                    reply,
                } => {
                    let mut table = BufferTable::default();
                    for (id, b) in buffers {
                        table.insert(id, b);
                    }
                    let key = self.sessions.vacant_key();
                    let now = self.now_ns();
                    let mut ring_tenants = vec![None; self.ports.len()];
                    for (tk, limits) in tenants {
                        let Some(port) = self.ports.get_mut(usize::from(tk.controller)) else { continue };
                        let id = match port.tenants.get(&tk) {
                            Some(&id) => id,
                            None => {
                                let id = port.sched.add_tenant(limits);
                                port.tenants.insert(tk, id);
                                if let Some(saved) = self.saved.take(tk, self.index, now) {
                                    port.sched.restore_buckets(id, saved, now);
                                }
                                id
                            }
                        };
                        port.sched.set_limits(id, now, limits);
                        port.tenant_rings.entry(id).or_default().0.push(key);
                        ring_tenants[usize::from(tk.controller)] = Some((tk, id));
                    }
                    let ev = EpollEvent::new(EpollFlags::EPOLLIN, key as u64);
                    if let Err(e) = self.epoll.add(ring.submit_fd.as_fd(), ev) {
                        warn!(session, "epoll add failed: {e}");
                    }
                    // A ring added once the broker is shutting down (by a control thread that
                    // was held past the shutdown's wait) is closed at once, like the others:
                    // the shutdown waits for every ring to be released.
                    let closing = if self.shutdown.is_some() {
                        self.closing += 1;
                        Some(None)
                    } else {
                        None
                    };
                    self.sessions.insert(Session {
                        id: session,
                        uid,
                        zombie: false,
                        ring_id,
                        namespaces,
                        ring: Some(*ring),
                        buffers: table,
                        in_flight: 0,
                        slots: vec![0; self.ports.len()],
                        tenants: ring_tenants,
                        partial: None,
                        vectored: 0,
                        faulted: false,
                        closing,
                        close_fault: RingFault::Closed,
                        held_since: None,
                        blocked_on: None,
                        blocked_vectored: false,
                        counters,
                    });
                    self.order.push(key);
                    let _ = reply.send(key);
                }
                IoRequest::AddBuffer { key, id, buffer, reply } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.buffers.insert(id, buffer);
                    }
                    let _ = reply.send(());
                }
                IoRequest::RetireBuffer { key, id, reply } => match self.sessions.get_mut(key) {
                    Some(s) => {
                        s.buffers.retire(id, reply);
                        // Commands of a controller that failed without confirming it stopped
                        // never end: if one uses the buffer, answer now (it stays mapped for
                        // good; the session's control thread sees it still in use) rather than
                        // never. Commands at the other controllers still end and release it.
                        if buffer_at_unstopped_device(&self.ports, &self.vecs, &s.slots, key, id) {
                            s.buffers.give_up_retiring_one(id);
                        }
                    }
                    None => {
                        let _ = reply.send(());
                    }
                },
                IoRequest::CloseRing { key, fault, reply } => match self.sessions.get_mut(key) {
                    Some(s) => {
                        s.close_fault = fault;
                        if s.closing.is_none() {
                            self.closing += 1;
                        }
                        s.closing = Some(Some(reply));
                    }
                    None => {
                        let _ = reply.send(());
                    }
                },
                IoRequest::UpdateRing { key, namespaces } => {
                    if let Some(s) = self.sessions.get_mut(key) {
                        s.namespaces = namespaces;
                    }
                }
                IoRequest::SetTenantLimits { key, limits } => {
                    let now = self.now_ns();
                    if let Some(port) = self.ports.get_mut(usize::from(key.controller)) {
                        if let Some(&id) = port.tenants.get(&key) {
                            port.sched.set_limits(id, now, limits);
                        }
                    }
                }
                IoRequest::Sample { reply } => {
                    let _ = reply.send(self.sample());
                }
                IoRequest::Shutdown { reply } => self.begin_shutdown(reply),
            }
        }
    }

    /// Each tenant's scheduler figures and each device queue's commands in flight.
    fn sample(&self) -> crate::broker::metrics::ThreadSample {
        use crate::broker::metrics::{TenantSample, ThreadSample};
        let mut tenants = Vec::new();
        for p in &self.ports {
            for (&key, &id) in &p.tenants {
                let s = p.sched.stats(id);
                tenants.push(TenantSample {
                    key,
                    dispatched: s.dispatched,
                    read_bytes: s.read_bytes,
                    write_bytes: s.write_bytes,
                    throttled_ns: s.throttled_ns,
                    in_flight: s.in_flight,
                });
            }
        }
        let queue_in_flight = self.ports.iter().map(|p| p.dq.queue.in_flight() as u64).collect();
        ThreadSample { tenants, queue_in_flight }
    }

    fn stop(self) {
        let IoThread { ports, sessions, zombies, index, .. } = self;
        for (c, p) in ports.into_iter().enumerate() {
            if !p.device_failed {
                if let Err(e) = p.ctrl.delete_queue(p.dq.queue) {
                    warn!(thread = index, controller = c, "deleting the I/O queue failed: {e}");
                }
            } else if !p.dma_stopped {
                std::mem::forget(p.dq); // its memory may still be written by the device
            }
        }
        if zombies > 0 {
            tracing::error!(
                rings = zombies,
                "the device never confirmed it stopped; their buffers stay mapped until exit"
            );
            for (_, s) in sessions {
                if s.zombie {
                    std::mem::forget(s);
                }
            }
        }
        info!(thread = index, "I/O thread stopped");
    }

    fn begin_shutdown(&mut self, reply: Sender<()>) {
        for (_, s) in self.sessions.iter_mut() {
            if s.closing.is_none() && !s.zombie {
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
                    let now_us = self.started.elapsed().as_micros() as u32;
                    let sched = &mut self.ports[usize::from(p.ctx.ctrl)].sched;
                    complete::complete(
                        &mut self.sessions,
                        &mut self.touched,
                        &mut self.vecs,
                        sched,
                        now_us,
                        p.ctx,
                        status,
                    );
                }
            }
            let s = &mut self.sessions[key];
            // Commands at a controller that failed without confirming it stopped never end:
            // then only those at the other controllers are waited for.
            let dead = on_unstopped_device(&self.ports, &s.slots);
            let busy = if dead { on_answering_device(&self.ports, &s.slots) } else { s.in_flight > 0 };
            if busy {
                i += 1;
                continue;
            }
            self.closing -= 1;
            self.order.swap_remove(i);
            if dead {
                // The device may still write into its buffers, and its commands on the other
                // controllers may still complete: the ring stays in the table under its key
                // (never given to another ring, whose requests those completions would reach),
                // faulted and no longer polled, its tenants kept, and the buffers those commands
                // use mapped for good. It lets go of the others (its commands elsewhere are
                // done), so its session can unmap them.
                let s = &mut self.sessions[key];
                s.buffers.drop_unused();
                tracing::error!(
                    session = s.id,
                    ring = s.ring_id,
                    in_flight = s.in_flight,
                    "ring ended with commands a failed device may still execute; keeping its buffers pinned"
                );
                s.zombie = true;
                s.faulted = true;
                if let Some(ring) = s.ring.as_ref() {
                    let _ = self.epoll.delete(ring.submit_fd.as_fd());
                    ring.fault(RingFault::DeviceFailed);
                }
                self.zombies += 1;
                if let Some(reply) = s.closing.take().flatten() {
                    let _ = reply.send(());
                }
                continue;
            }
            let mut s = self.sessions.remove(key);
            let now = self.now_ns();
            for &(tk, id) in s.tenants.iter().flatten() {
                let port = &mut self.ports[usize::from(tk.controller)];
                if let Some((rings, _)) = port.tenant_rings.get_mut(&id) {
                    rings.retain(|&r| r != key);
                    if rings.is_empty() {
                        port.tenant_rings.remove(&id);
                        port.tenants.remove(&tk);
                        let (_, saved) = port.sched.remove_tenant_saving(id, now);
                        if let Some(saved) = saved {
                            self.saved.keep(tk, self.index, saved, now);
                        }
                    }
                }
            }
            if let Some(ring) = s.ring.as_ref() {
                let _ = self.epoll.delete(ring.submit_fd.as_fd());
                ring.fault(s.close_fault);
            }
            let reply = s.closing.take().flatten();
            debug!(session = s.id, ring = s.ring_id, "ring released");
            // The ring's memory goes on the reaper; the buffers are the session's, which
            // releases them once every ring of it has drained.
            self.reaper.dispose_then_notify(s.uid, (std::mem::take(&mut s.buffers), s.ring.take()), reply);
        }
    }
}

impl std::fmt::Debug for IoThread {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoThread").field("sessions", &self.sessions.len()).finish()
    }
}
