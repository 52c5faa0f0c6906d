//! The vhost-user-blk device: this crate's own vhost-user request handler (the vhost crate's
//! [`VhostUserBackendReqHandlerMut`], served by its `BackendReqHandler`) and one thread per
//! virtqueue (or fewer threads, each serving several queues in turn: `--queue-threads`).
//!
//! vhost-user-backend's daemon cannot be used: its request handler is crate-private and refuses
//! GET_INFLIGHT_FD / SET_INFLIGHT_FD. Of that crate only the vring state ([`VringMutex`]: queue,
//! kick/call/err eventfds, enabled flag) is used. Each queue thread sleeps in its own epoll on
//! the guest's kick eventfd, its nvmed session's completion doorbell and a wake eventfd (ring
//! started, exit), and owns its queue's [`Worker`] behind a mutex that only the vhost-user
//! thread ever contends for (memory-table changes, ring start and stop, reset).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use vhost_user_backend::{VringMutex, VringT};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_F_CONFIG_WCE, VIRTIO_BLK_F_FLUSH};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_CLOEXEC, EFD_NONBLOCK};

use crate::config::{DiskGeometry, CONFIG_SIZE};
use crate::inflight::{region_len, InflightRegion};
use crate::worker::{region_files, QueueStats, RegionFiles, Worker};

/// Guest memory (no dirty-page bitmap: no live migration).
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The per-queue vring type.
pub type Vring = VringMutex<GuestMem>;

/// Largest virtqueue size accepted.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// How long a stopping ring waits for nvmed to finish its requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Memory slots offered with CONFIGURE_MEM_SLOTS (what vhost in the kernel offers).
pub const MAX_MEM_SLOTS: u64 = 509;
/// Writes `value` to `tmp` (created anew, never through a link: the socket's directory may be
/// shared, like /tmp) and renames it to `path`.
fn save_setting(tmp: &std::path::Path, path: &std::path::Path, value: u8) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(tmp)?;
    f.write_all(format!("{value}\n").as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// Reads a setting `save_setting` wrote: a regular file of this process's uid, not a link.
fn read_setting(path: &std::path::Path) -> io::Result<String> {
    use std::io::Read;
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    // O_NONBLOCK: a FIFO planted there must not hold the open (checked below, then refused).
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let meta = f.metadata()?;
    if !meta.is_file() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other("not a regular file of this user: ignored"));
    }
    let mut s = String::new();
    f.by_ref().take(16).read_to_string(&mut s)?;
    Ok(s)
}

/// Offset of `wce` in the configuration space.
const WCE_OFFSET: u32 = 32;

/// epoll tokens of a queue thread.
const EV_KICK: u64 = 0;
const EV_COMPLETION: u64 = 1;
const EV_WAKE: u64 = 2;
/// The nvmed control socket hung up.
const EV_CONTROL: u64 = 3;

/// The protocol features offered.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::RESET_DEVICE
        | VhostUserProtocolFeatures::INFLIGHT_SHMFD
}

/// What one queue thread and the vhost-user thread share.
struct QueueShared {
    index: usize,
    vring: Vring,
    worker: Mutex<Worker>,
    epoll: Epoll,
    wake: EventFd,
    exit: AtomicBool,
    /// The vhost-user thread waits for the worker's lock (a memory table, an inflight region,
    /// a ring start): a busy-polling queue thread lets go of it.
    control_waiting: AtomicBool,
    mem: GuestMem,
    poll: Duration,
    stats: Arc<QueueStats>,
    /// The ring's descriptors the epoll watches, and the connection they belong to.
    watched: Mutex<Watched>,
    /// `BAD_*` bits: what the driver set for this ring cannot be served (a size that is not a
    /// power of two, rings outside guest RAM or misaligned). Values the guest chooses: the
    /// ring is not started (the guest's own queue stalls) rather than the connection ended,
    /// which would make nvmed register and unregister all of guest RAM at the guest's will.
    bad_config: AtomicU8,
}

/// [`QueueShared::bad_config`]: the queue size.
const BAD_SIZE: u8 = 1;
/// [`QueueShared::bad_config`]: the ring addresses.
const BAD_ADDR: u8 = 2;

/// See [`QueueShared::rewatch`].
#[derive(Debug, Clone, Copy)]
struct Watched {
    epoch: u64,
    completion: RawFd,
    control: RawFd,
}

impl QueueShared {
    /// Makes the epoll watch the ring's current descriptors. The ring gets new ones whenever it
    /// reconnects, which with one session for all queues can happen inside any ring call (another
    /// queue reconnected the session first): called after each. Returns false if they cannot be
    /// watched (the queue then fails its requests).
    fn rewatch(&self, w: &Worker) -> bool {
        let mut cur = lock(&self.watched);
        let now = Watched {
            epoch: w.connection_epoch(),
            completion: w.completion_fd().as_raw_fd(),
            control: w.control_fd().as_raw_fd(),
        };
        if (cur.epoch, cur.completion, cur.control) == (now.epoch, now.completion, now.control) {
            return true;
        }
        // The old completion descriptor is closed (and so out of the epoll already); the old
        // control socket may still be open (other queues' rings hold it) and hung up.
        self.unwatch(&mut cur);
        let added = self
            .epoll
            .ctl(ControlOperation::Add, now.completion, EpollEvent::new(EventSet::IN, EV_COMPLETION))
            .and_then(|()| {
                self.epoll.ctl(
                    ControlOperation::Add,
                    now.control,
                    EpollEvent::new(EventSet::empty(), EV_CONTROL),
                )
            });
        match added {
            Ok(()) => {
                *cur = now;
                true
            }
            Err(e) => {
                tracing::error!(queue = self.index, "watching the new session: {e}");
                self.unwatch(&mut cur);
                false
            }
        }
    }

    /// Stops watching the ring's descriptors (a hung-up socket would be reported for good).
    fn unwatch(&self, cur: &mut Watched) {
        for fd in [cur.control, cur.completion] {
            if fd >= 0 {
                let _ = self.epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            }
        }
        *cur = Watched { epoch: u64::MAX, completion: -1, control: -1 };
    }

    /// The worker's lock, for the vhost-user thread: a queue thread busy-polling under it is
    /// asked to let go (it polls again after).
    fn control_lock(&self) -> MutexGuard<'_, Worker> {
        self.control_waiting.store(true, Ordering::Release);
        let w = lock(&self.worker);
        self.control_waiting.store(false, Ordering::Release);
        w
    }

    fn wake(&self) {
        if let Err(e) = self.wake.write(1) {
            tracing::warn!(queue = self.index, "waking the queue thread: {e}");
        }
    }

    /// Takes completions, resubmissions and new requests while the ring is started.
    fn run(&self) {
        let mut w = lock(&self.worker);
        if !self.vring.get_ref().get_queue().ready() {
            return;
        }
        let mem = self.mem.memory();
        loop {
            // Read at each pass: SET_VRING_ENABLE(0) may come while the thread polls.
            let take_new = self.vring.get_ref().is_enabled();
            if !self.poll.is_zero() {
                // Busy-poll the virtqueue (guest notifications off) and nvmed's CQ.
                let mut deadline = Instant::now() + self.poll;
                loop {
                    let p = w.run(self.vring.get_mut().get_queue_mut(), &*mem, false, take_new);
                    if p.used {
                        self.notify();
                    }
                    let now = Instant::now();
                    if self.control_waiting.load(Ordering::Acquire) || {
                        let st = self.vring.get_ref();
                        !st.get_queue().ready() || st.is_enabled() != take_new
                    } {
                        // The vhost-user thread needs the worker (or stopped the ring): let
                        // go now; a wake or kick brings the thread back.
                        break;
                    }
                    if p.any {
                        deadline = now + self.poll;
                    } else if now >= deadline {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            let take_new = self.vring.get_ref().is_enabled();
            let p = w.run(self.vring.get_mut().get_queue_mut(), &*mem, true, take_new);
            if p.used {
                self.notify();
            }
            let more = w.arm();
            if more && self.control_waiting.load(Ordering::Acquire) {
                // Let the vhost-user thread have the worker; come back for the rest after.
                self.wake();
                break;
            }
            if !more {
                break;
            }
        }
        if !self.rewatch(&w) {
            w.broker_gone();
        }
    }

    /// Waits until every request the queue took is in the used ring.
    fn drain(&self) {
        let mut w = self.control_lock();
        if w.busy() == 0 {
            return;
        }
        let mem = self.mem.memory();
        tracing::debug!(queue = self.index, busy = w.busy(), "draining");
        let p = {
            let mut g = self.vring.get_mut();
            w.drain(g.get_queue_mut(), &*mem, DRAIN_TIMEOUT)
        };
        if p.used {
            self.notify();
        }
        if !self.rewatch(&w) {
            w.broker_gone();
        }
    }

    /// Signals the guest that used entries were added, unless it asked not to be (EVENT_IDX).
    fn notify(&self) {
        if self.vring.needs_notification().unwrap_or(true) {
            QueueStats::add(&self.stats.notifications, 1);
            if let Err(e) = self.vring.signal_used_queue() {
                tracing::debug!(queue = self.index, "signalling the guest: {e}");
            }
        }
    }

    /// Waits up to `timeout_ms` (-1: for ever) for this queue's events and handles them;
    /// returns true once the queue is told to stop (or its epoll failed).
    fn handle_events(&self, timeout_ms: i32) -> bool {
        let mut events = [EpollEvent::new(EventSet::empty(), 0); 4];
        {
            let n = match self.epoll.wait(timeout_ms, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => return false,
                Err(e) => {
                    tracing::error!(queue = self.index, "epoll_wait: {e}; the queue stops");
                    return true;
                }
            };
            let mut run = false;
            for ev in &events[..n] {
                match ev.data() {
                    EV_KICK => match self.vring.read_kick() {
                        Ok(enabled) => {
                            QueueStats::add(&self.stats.kicks, 1);
                            run |= enabled
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => tracing::debug!(queue = self.index, "reading the kick eventfd: {e}"),
                    },
                    EV_COMPLETION => {
                        QueueStats::add(&self.stats.completion_wakeups, 1);
                        lock(&self.worker).disarm();
                        run = true;
                    }
                    EV_CONTROL => {
                        // A hang-up: nvmed exited, or the ring already moved to a newer
                        // connection (another queue reconnected the session) and this is the
                        // old one. Reconnect if needed (the queue's requests are sent again),
                        // then watch the ring's current descriptors; or fail what is in flight.
                        let mut w = lock(&self.worker);
                        match w.reconnect() {
                            Ok(()) => {
                                if self.rewatch(&w) {
                                    tracing::info!(
                                        queue = self.index,
                                        "on nvmed's current connection; requests in flight sent again"
                                    );
                                } else {
                                    w.broker_gone();
                                }
                            }
                            Err(e) => {
                                tracing::error!(
                                    queue = self.index,
                                    "nvmed is gone ({e}); failing this queue's requests"
                                );
                                self.unwatch(&mut lock(&self.watched));
                                w.broker_gone();
                            }
                        }
                        drop(w);
                        run = true;
                    }
                    EV_WAKE => {
                        let _ = self.wake.read();
                        if self.exit.load(Ordering::Acquire) {
                            return true;
                        }
                        run = true;
                    }
                    _ => {}
                }
            }
            if run {
                self.run();
            }
        }
        false
    }
}

/// A queue thread: serves `queues` (one, or several with `--queue-threads`) until each is told
/// to stop. Several queues are watched through one epoll over their own epolls; each is run in
/// turn when its events come, so one thread's queues never run at once (and never contend).
fn serve(queues: Vec<Arc<QueueShared>>) {
    if let [q] = &queues[..] {
        while !q.handle_events(-1) {}
        return;
    }
    let outer = match Epoll::new() {
        Ok(e) => e,
        Err(e) => {
            tracing::error!("creating a queue thread's epoll: {e}; its queues stop");
            return;
        }
    };
    for (k, q) in queues.iter().enumerate() {
        if let Err(e) =
            outer.ctl(ControlOperation::Add, q.epoll.as_raw_fd(), EpollEvent::new(EventSet::IN, k as u64))
        {
            tracing::error!(queue = q.index, "watching the queue's epoll: {e}; its queues stop");
            return;
        }
    }
    let mut stopped = vec![false; queues.len()];
    let mut events = vec![EpollEvent::new(EventSet::empty(), 0); queues.len()];
    while stopped.iter().any(|s| !s) {
        let n = match outer.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("epoll_wait: {e}; the thread's queues stop");
                return;
            }
        };
        for ev in &events[..n] {
            let k = ev.data() as usize;
            if !stopped[k] && queues[k].handle_events(0) {
                stopped[k] = true;
                let _ =
                    outer.ctl(ControlOperation::Delete, queues[k].epoll.as_raw_fd(), EpollEvent::default());
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn handler_error(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> VuError {
    VuError::ReqHandlerError(io::Error::other(e))
}

/// A guest RAM region as QEMU maps it, to translate the ring addresses it sends.
#[derive(Debug, Clone, Copy)]
struct AddrMapping {
    vmm_addr: u64,
    size: u64,
    gpa_base: u64,
}

/// The device for one frontend connection.
pub struct BlkDevice {
    geo: DiskGeometry,
    /// The write cache mode the workers follow (0: write through, their writes use FUA).
    wce: Arc<AtomicU8>,
    /// The mode the guest last chose through the config space (what the config space shows),
    /// kept across connections and restarts in `wce_file`: QEMU reads the config space once
    /// and does not tell a reconnected backend what its guest chose.
    wce_chosen: u8,
    wce_file: Option<std::path::PathBuf>,
    mem: GuestMem,
    mappings: Vec<AddrMapping>,
    queues: Vec<Arc<QueueShared>>,
    threads: Vec<JoinHandle<()>>,
    kick_fds: Vec<Option<RawFd>>,
    owned: bool,
    acked_features: u64,
    acked_protocol_features: u64,
    inflight: Option<Arc<InflightRegion>>,
}

impl BlkDevice {
    /// A device over one worker per queue, served by `threads` threads started at once (queue
    /// `i` by thread `i % threads`; one per queue when `threads` is 0 or at least the number of
    /// queues). `wce` must be the cell the workers read.
    pub fn new(
        geo: DiskGeometry,
        workers: Vec<Worker>,
        wce: Arc<AtomicU8>,
        poll: Duration,
        threads: usize,
    ) -> io::Result<Self> {
        let mem = GuestMem::new(GuestMemoryMmap::new());
        let wce_chosen = wce.load(Ordering::Relaxed);
        let mut dev = Self {
            geo,
            wce,
            wce_chosen,
            wce_file: None,
            mem: mem.clone(),
            mappings: Vec::new(),
            queues: Vec::new(),
            threads: Vec::new(),
            kick_fds: Vec::new(),
            owned: false,
            acked_features: 0,
            acked_protocol_features: 0,
            inflight: None,
        };
        for (index, worker) in workers.into_iter().enumerate() {
            let vring = Vring::new(mem.clone(), MAX_QUEUE_SIZE as u16).map_err(io::Error::other)?;
            let epoll = Epoll::new()?;
            let wake = EventFd::new(EFD_NONBLOCK | EFD_CLOEXEC)?;
            epoll.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, EV_WAKE))?;
            epoll.ctl(
                ControlOperation::Add,
                worker.completion_fd().as_raw_fd(),
                EpollEvent::new(EventSet::IN, EV_COMPLETION),
            )?;
            // No events asked: only a hang-up (nvmed exited, or ended the session) is reported
            // (replies to the queue's own requests on it are not).
            epoll.ctl(
                ControlOperation::Add,
                worker.control_fd().as_raw_fd(),
                EpollEvent::new(EventSet::empty(), EV_CONTROL),
            )?;
            let stats = worker.stats();
            let watched = Mutex::new(Watched {
                epoch: worker.connection_epoch(),
                completion: worker.completion_fd().as_raw_fd(),
                control: worker.control_fd().as_raw_fd(),
            });
            let q = Arc::new(QueueShared {
                index,
                stats,
                vring,
                worker: Mutex::new(worker),
                epoll,
                wake,
                exit: AtomicBool::new(false),
                control_waiting: AtomicBool::new(false),
                mem: mem.clone(),
                poll,
                watched,
                bad_config: AtomicU8::new(0),
            });
            dev.queues.push(q);
            dev.kick_fds.push(None);
        }
        let n = dev.queues.len();
        let threads = if threads == 0 { n } else { threads.min(n) };
        for t in 0..threads {
            let group: Vec<Arc<QueueShared>> = dev.queues.iter().skip(t).step_by(threads).cloned().collect();
            let name = if threads == n { format!("queue {t}") } else { format!("queues {t}/{threads}") };
            dev.threads.push(std::thread::Builder::new().name(name).spawn(move || serve(group))?);
        }
        Ok(dev)
    }

    /// Keeps the guest's write cache choice in `path` (read now if it exists, written at each
    /// change), so that a restarted backend writes through when the guest asked for it.
    pub fn persist_write_cache(&mut self, path: std::path::PathBuf) {
        match read_setting(&path) {
            Ok(s) if matches!(s.trim(), "0" | "1") => {
                self.wce_chosen = u8::from(s.trim() == "1");
                self.wce.store(self.wce_chosen, Ordering::Relaxed);
                tracing::info!(
                    file = %path.display(),
                    "the guest's write cache choice: {}",
                    if self.wce_chosen == 1 { "write back" } else { "write through" }
                );
            }
            Ok(_) => tracing::warn!(file = %path.display(), "not a write cache setting (0 or 1): ignored"),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!(file = %path.display(), "reading the write cache setting: {e}"),
        }
        self.wce_file = Some(path);
    }

    /// Virtqueues.
    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The inflight region QEMU handed over, if any.
    pub fn inflight(&self) -> Option<&Arc<InflightRegion>> {
        self.inflight.as_ref()
    }

    /// The frontend went away: finishes every request taken (into the used ring and out of the
    /// inflight region) and stops the queue threads.
    pub fn shutdown(&mut self) {
        // Stopped first: a busy-polling queue lets go, and nothing new is taken meanwhile.
        for q in &self.queues {
            q.vring.set_queue_ready(false);
        }
        self.drain_all();
        self.stop_threads();
        self.refresh_stats(true);
    }

    /// Updates each queue's `bounced_bytes` from its nvmed session's counters. With `wait`
    /// false, a queue whose thread is busy right now (its worker lock taken) keeps its last
    /// value: the signal thread must not wait behind a busy-polling queue.
    pub fn refresh_stats(&self, wait: bool) {
        for q in &self.queues {
            let w = if wait { Some(lock(&q.worker)) } else { q.worker.try_lock().ok() };
            if let Some(mut w) = w {
                if let Err(e) = w.refresh_stats() {
                    tracing::debug!(queue = q.index, "reading the nvmed session's counters: {e}");
                }
            }
        }
    }

    fn stop_threads(&mut self) {
        for q in &self.queues {
            q.exit.store(true, Ordering::Release);
            q.wake();
        }
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                tracing::error!("a queue thread panicked");
            }
        }
    }

    /// Finishes every queue's requests.
    pub fn drain_all(&self) {
        for q in &self.queues {
            q.drain();
        }
    }

    fn queue(&self, index: u32) -> VuResult<Arc<QueueShared>> {
        self.queues.get(index as usize).cloned().ok_or(VuError::InvalidParam)
    }

    /// The configuration space bytes at `offset..offset+size` (zeros past its end).
    pub fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.geo.config_space(self.wce_chosen);
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = (offset as usize).saturating_add(size as usize).min(CONFIG_SIZE);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    /// A configuration space write: only the write-cache setting is writable.
    pub fn write_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        if offset == WCE_OFFSET && buf.len() == 1 {
            tracing::info!(
                "guest set the write cache to {}",
                if buf[0] != 0 { "write back" } else { "write through" }
            );
            self.wce_chosen = u8::from(buf[0] != 0);
            self.wce.store(self.wce_chosen, Ordering::Relaxed);
            if let Some(path) = &self.wce_file {
                let mut tmp = path.as_os_str().to_owned();
                tmp.push(".tmp");
                let saved = save_setting(std::path::Path::new(&tmp), path, self.wce_chosen);
                if let Err(e) = saved {
                    tracing::warn!(file = %path.display(), "keeping the write cache setting: {e}");
                }
            }
            return Ok(());
        }
        Err(io::Error::other(format!(
            "config space write at {offset} ({} bytes) refused: only wce is writable",
            buf.len()
        )))
    }

    /// The virtio features offered (vhost-user's PROTOCOL_FEATURES bit included).
    pub fn features(&self) -> u64 {
        self.geo.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    /// Puts the ring's kick eventfd in its thread's epoll while the ring is started and
    /// enabled, and takes it out otherwise. Newly registered: the thread runs the queue once
    /// (requests may already be waiting, or to be resubmitted).
    fn update_registration(&mut self, i: usize) -> VuResult<()> {
        let q = self.queues[i].clone();
        let want = {
            let st = q.vring.get_ref();
            if st.get_queue().ready() && st.is_enabled() {
                st.get_kick().as_ref().map(|k| k.as_raw_fd())
            } else {
                None
            }
        };
        if want == self.kick_fds[i] {
            return Ok(());
        }
        self.unregister_kick(i);
        if let Some(fd) = want {
            q.epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, EV_KICK))
                .map_err(VuError::ReqHandlerError)?;
            self.kick_fds[i] = Some(fd);
            q.wake();
        }
        Ok(())
    }

    /// Takes the kick eventfd out of the epoll (before the vring lets go of it).
    fn unregister_kick(&mut self, i: usize) {
        if let Some(fd) = self.kick_fds[i].take() {
            let _ = self.queues[i].epoll.ctl(
                ControlOperation::Delete,
                fd,
                EpollEvent::new(EventSet::IN, EV_KICK),
            );
        }
    }

    /// A ring with a kick eventfd that is not started yet starts: in-flight requests of a
    /// previous backend process are taken back from the inflight region first.
    fn start_ring_if_ready(&mut self, i: usize) -> VuResult<()> {
        let q = self.queues[i].clone();
        {
            // Under the worker lock: the queue thread sees the ring started only once its
            // avail index accounts for the requests to resubmit.
            let mut w = q.control_lock();
            let needs_start = {
                let st = q.vring.get_ref();
                !st.get_queue().ready() && st.get_kick().is_some()
            };
            if !needs_start {
                return Ok(());
            }
            if q.bad_config.load(Ordering::Relaxed) != 0 {
                tracing::error!(queue = i, "not started: the driver configured it wrongly (see above)");
                return Ok(());
            }
            q.vring.set_queue_ready(true);
            let mem = self.mem.memory();
            let mut st = q.vring.get_mut();
            let resubmit = w.start_ring(st.get_queue_mut(), &*mem);
            let queue = st.get_queue();
            tracing::debug!(
                queue = i,
                size = queue.size(),
                next_avail = queue.next_avail(),
                next_used = queue.next_used(),
                resubmit,
                inflight_tracking = w.tracks_inflight(),
                "ring started"
            );
        }
        self.update_registration(i)
    }

    fn vmm_va_to_gpa(&self, va: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| va >= m.vmm_addr && va - m.vmm_addr < m.size)
            .map(|m| va - m.vmm_addr + m.gpa_base)
            .ok_or_else(|| handler_error(format!("ring address {va:#x} is in no guest RAM region")))
    }

    /// Checks a new memory map (every region registrable with nvmed) without touching anything.
    fn check_memory(new: &GuestMemoryMmap) -> VuResult<RegionFiles> {
        region_files(new).map_err(|e| {
            tracing::error!("{e}");
            handler_error(e)
        })
    }

    /// Makes the new memory map current and has every queue use its regions (registered once,
    /// with the VM's session).
    fn apply_memory(&mut self, new: GuestMemoryMmap, files: &RegionFiles) -> VuResult<()> {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).replace(new);
        for q in &self.queues {
            q.control_lock().sync_memory(files).map_err(|e| {
                tracing::error!(queue = q.index, "{e}");
                handler_error(e)
            })?;
        }
        tracing::info!(
            regions = files.len(),
            bytes = files.iter().map(|(s, _)| s.len).sum::<u64>(),
            "guest RAM registered with nvmed"
        );
        Ok(())
    }
}

impl Drop for BlkDevice {
    fn drop(&mut self) {
        self.stop_threads();
    }
}

impl VhostUserBackendReqHandlerMut for BlkDevice {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.owned = false;
        self.acked_features = 0;
        self.acked_protocol_features = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for i in 0..self.queues.len() {
            self.queues[i].vring.set_enabled(false);
            self.queues[i].vring.set_queue_ready(false);
            self.update_registration(i)?;
        }
        self.drain_all();
        // Requests nvmed did not finish within the drain timeout would complete into the new
        // rings' used rings (their heads reused by new requests): not reset then.
        if let Some(q) = self.queues.iter().find(|q| lock(&q.worker).busy() > 0) {
            tracing::error!(queue = q.index, "requests still at nvmed after the drain: device not reset");
            // The frontend resets the rings all the same: nothing more is written into them.
            for q in &self.queues {
                lock(&q.worker).abandon();
            }
            return Err(VuError::InvalidOperation("requests still in flight after the drain timeout"));
        }
        // Back to the initial state, ready to be set up again (vhost-user RESET_DEVICE): each
        // ring stopped with its size, addresses and indexes forgotten, its eventfds let go (the
        // kick's out of the thread's epoll first), so the next SET_VRING_KICK starts it afresh.
        for i in 0..self.queues.len() {
            self.unregister_kick(i);
            let q = self.queues[i].clone();
            {
                let _w = q.control_lock();
                q.vring.get_mut().get_queue_mut().reset();
            }
            q.vring.set_kick(None);
            q.vring.set_call(None);
            q.vring.set_err(None);
        }
        self.acked_features = 0;
        // The write cache mode stays what the guest chose: QEMU keeps showing it that.
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.features())
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.features() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        // Without PROTOCOL_FEATURES the rings start enabled.
        if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            for i in 0..self.queues.len() {
                self.queues[i].vring.set_enabled(true);
                self.update_registration(i)?;
            }
        }
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &self.queues {
            q.vring.set_queue_event_idx(event_idx);
        }
        // As QEMU's virtio-blk: a driver that cannot flush gets write through, one that can
        // flush but not choose gets write back, one that can choose gets what it chose.
        let mode =
            match (features & (1 << VIRTIO_BLK_F_FLUSH) != 0, features & (1 << VIRTIO_BLK_F_CONFIG_WCE) != 0)
            {
                (false, _) => 0,
                (true, false) => 1,
                (true, true) => self.wce_chosen,
            };
        self.wce.store(mode, Ordering::Relaxed);
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy not supported"));
        }
        let mut regions = Vec::new();
        let mut mappings = Vec::new();
        for (region, file) in ctx.iter().zip(files) {
            let r = GuestRegionMmap::new(region.mmap_region(file)?, GuestAddress(region.guest_phys_addr))
                .ok_or_else(|| handler_error("guest RAM region overflows the address space"))?;
            regions.push(r);
            mappings.push(AddrMapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa_base: region.guest_phys_addr,
            });
        }
        let new = GuestMemoryMmap::from_regions(regions).map_err(handler_error)?;
        let files = Self::check_memory(&new)?;
        self.apply_memory(new, &files)?;
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let q = self.queue(index)?;
        if num == 0 || num as usize > MAX_QUEUE_SIZE || !num.is_power_of_two() {
            // (A split ring's size is a power of two: another would put the rings' fields
            // at other offsets than the driver's, and the queue would keep its old size.)
            tracing::error!(
                "vring {index}: queue size {num} is not a power of two up to {MAX_QUEUE_SIZE}: the ring will not start"
            );
            q.bad_config.fetch_or(BAD_SIZE, Ordering::Relaxed);
            return Ok(());
        }
        q.bad_config.fetch_and(!BAD_SIZE, Ordering::Relaxed);
        q.vring.set_queue_size(num as u16);
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let q = self.queue(index)?;
        if self.mappings.is_empty() {
            return Err(VuError::InvalidParam);
        }
        let placed = (|| {
            let desc = self.vmm_va_to_gpa(descriptor)?;
            let avail = self.vmm_va_to_gpa(available)?;
            let used = self.vmm_va_to_gpa(used)?;
            q.vring.set_queue_info(desc, avail, used).map_err(|_| VuError::InvalidParam)
        })();
        if let Err(e) = placed {
            tracing::error!(
                "vring {index}: the driver's ring addresses cannot be served ({e}): the ring will not start"
            );
            q.bad_config.fetch_or(BAD_ADDR, Ordering::Relaxed);
            return Ok(());
        }
        q.bad_config.fetch_and(!BAD_ADDR, Ordering::Relaxed);
        // The used index the driver sees (0 after a driver reset).
        let idx = q.vring.queue_used_idx().map_err(|_| VuError::BackendInternalError)?;
        q.vring.set_queue_next_used(idx);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        let q = self.queue(index)?;
        tracing::debug!(queue = index, base, "SET_VRING_BASE");
        q.vring.set_queue_next_avail(base as u16);
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let q = self.queue(index)?;
        // Stop the ring: no new request is taken, every taken one completes.
        q.vring.set_queue_ready(false);
        self.unregister_kick(index as usize);
        q.drain();
        if lock(&q.worker).busy() > 0 {
            // nvmed did not finish them within the drain timeout: the ring is the frontend's
            // again (a new one may be set up in the same memory), so what they complete is no
            // longer written into guest memory, and the connection ends; the next one waits
            // for nvmed to have finished them and resubmits them from the inflight region.
            lock(&q.worker).abandon();
            tracing::error!(queue = index, "requests still at nvmed after the drain: ending the connection");
            return Err(VuError::InvalidOperation("requests still in flight after the drain timeout"));
        }
        let next_avail = q.vring.queue_next_avail();
        q.vring.set_kick(None);
        q.vring.set_call(None);
        tracing::debug!(queue = index, next_avail, "ring stopped (GET_VRING_BASE)");
        Ok(VhostUserVringState::new(index, u32::from(next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.queue(u32::from(index))?;
        let i = usize::from(index);
        self.unregister_kick(i);
        q.vring.set_kick(fd);
        self.start_ring_if_ready(i)?;
        self.update_registration(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let q = self.queue(u32::from(index))?;
        let signal = fd.is_some();
        q.vring.set_call(fd);
        // QEMU sets the call eventfd after the kick: requests resubmitted and completed in
        // between could not be signalled. One interrupt more is harmless (the driver checks
        // its used ring).
        if signal {
            if let Err(e) = q.vring.signal_used_queue() {
                tracing::debug!(queue = index, "signalling the new call eventfd: {e}");
            }
        }
        self.start_ring_if_ready(usize::from(index))
    }

    fn set_vring_err(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        self.queue(u32::from(index))?.vring.set_err(fd);
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        self.acked_protocol_features = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.queues.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0 {
            return Err(VuError::InactiveFeature(VhostUserVirtioFeatures::PROTOCOL_FEATURES));
        }
        let q = self.queue(index)?;
        q.vring.set_enabled(enable);
        if enable {
            // What the guest queued while the ring was disabled is taken now.
            q.wake();
        }
        self.update_registration(index as usize)
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        Ok(self.config(offset, size))
    }

    fn set_config(&mut self, offset: u32, buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        self.write_config(offset, buf).map_err(VuError::ReqHandlerError)
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(VuError::InvalidOperation("not supported"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(VuError::InvalidOperation("not supported"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        let (n, size) = (inflight.num_queues, inflight.queue_size);
        if usize::from(n) > self.queues.len() || usize::from(size) > MAX_QUEUE_SIZE {
            tracing::error!(
                "GET_INFLIGHT_FD for {n} queues of {size} entries: this backend has {} queues of at most {MAX_QUEUE_SIZE}",
                self.queues.len()
            );
            return Err(VuError::InvalidParam);
        }
        // QEMU keeps the memfd and hands it back with SET_INFLIGHT_FD, now and after every
        // reconnection; the mapping made here only initialised it.
        let (_region, file) = InflightRegion::create(n, size).map_err(|e| {
            tracing::error!("{e}");
            handler_error(e)
        })?;
        tracing::debug!(queues = n, queue_size = size, "inflight region created");
        Ok((VhostUserInflight::new(region_len(n, size) as u64, 0, n, size), file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        let (n, size) = (inflight.num_queues, inflight.queue_size);
        if usize::from(n) > self.queues.len() {
            tracing::error!("SET_INFLIGHT_FD for {n} queues: this backend has {}", self.queues.len());
            return Err(VuError::InvalidParam);
        }
        if usize::from(size) > MAX_QUEUE_SIZE {
            tracing::error!("SET_INFLIGHT_FD for queues of {size} entries: at most {MAX_QUEUE_SIZE}");
            return Err(VuError::InvalidParam);
        }
        for q in &self.queues {
            // The worker's lock first, then the vring's, as the queue thread takes them (the
            // other order, with the vring's guard alive across the condition, could deadlock).
            let busy = q.control_lock().busy() > 0;
            let ready = q.vring.get_ref().get_queue().ready();
            if ready || busy {
                return Err(VuError::InvalidOperation("inflight region replaced while a ring runs"));
            }
        }
        let region =
            InflightRegion::map(&file, inflight.mmap_offset, inflight.mmap_size, n, size).map_err(|e| {
                tracing::error!("{e}");
                handler_error(e)
            })?;
        let region = Arc::new(region);
        for (i, q) in self.queues.iter().enumerate() {
            let tracker = (i < usize::from(n)).then(|| region.queue(i as u16));
            q.control_lock().set_inflight(tracker);
        }
        tracing::info!(
            queues = n,
            queue_size = size,
            "inflight region attached: in-flight requests survive a restart"
        );
        self.inflight = Some(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(VuError::InvalidOperation("postcopy not supported"));
        }
        let r = GuestRegionMmap::new(region.mmap_region(fd)?, GuestAddress(region.guest_phys_addr))
            .ok_or_else(|| handler_error("guest RAM region overflows the address space"))?;
        let new = self.mem.memory().insert_region(Arc::new(r)).map_err(handler_error)?;
        let files = Self::check_memory(&new)?;
        self.apply_memory(new, &files)?;
        self.mappings.push(AddrMapping {
            vmm_addr: region.user_addr,
            size: region.memory_size,
            gpa_base: region.guest_phys_addr,
        });
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        let (new, _) = self
            .mem
            .memory()
            .remove_region(GuestAddress(region.guest_phys_addr), region.memory_size)
            .map_err(handler_error)?;
        let files = Self::check_memory(&new)?;
        self.apply_memory(new, &files)?;
        self.mappings.retain(|m| m.gpa_base != region.guest_phys_addr);
        Ok(())
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(VuError::InvalidOperation("not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(VuError::InvalidOperation("not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(VuError::InvalidOperation("not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(VuError::InvalidOperation("not supported"))
    }
}

#[cfg(test)]
mod setting_file_tests {
    use super::*;

    #[test]
    fn the_write_cache_file_is_never_written_or_read_through_a_link() {
        let dir = std::env::temp_dir().join(format!("nvmed-vhost-wce-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, tmp, victim) = (dir.join("s.wce"), dir.join("s.wce.tmp"), dir.join("victim"));
        std::fs::write(&victim, "keep\n").unwrap();
        // A link planted where the temporary file goes is replaced, its target untouched.
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        save_setting(&tmp, &path, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep\n");
        assert_eq!(read_setting(&path).unwrap(), "0\n");
        // A setting file that is a link is not read.
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(read_setting(&path).is_err());
        // Nor a FIFO, which must not hold the backend up either.
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(read_setting(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
