//! # nvmed client
//!
//! Talk to the `nvmed` broker: open a session, register memfd buffers once, then submit reads
//! and writes through a shared-memory ring. The device DMAs straight into your buffers and a
//! busy ring needs no system call per I/O.
//!
//! ```no_run
//! use nvmed_client::{Io, NvmeRing};
//! let mut ring = NvmeRing::open("/run/nvmed.sock")?;
//! let ns = ring.namespaces()[0];
//! let buf = ring.alloc_buffer(1 << 20)?;
//! ring.buffer_mut(buf, 0, 4096)?.fill(0xab);
//! ring.write(ns.nsid, 0, buf, 0, 4096)?;
//! ring.read(ns.nsid, 0, buf, 4096, 4096)?;
//! assert_eq!(ring.buffer(buf, 0, 4096)?, ring.buffer(buf, 4096, 4096)?);
//! # Ok::<(), nvmed_client::Error>(())
//! ```
//!
//! Safety model: while a request is in flight the device may write its buffer range at any
//! time, so [`NvmeRing::buffer`] and [`NvmeRing::buffer_mut`] refuse ranges that overlap I/O in
//! flight, and [`NvmeRing::unregister_buffer`] refuses buffers with I/O in flight.
//!
//! ## Vectored (scatter-gather) requests
//!
//! A [`Opcode::ReadV`] or [`Opcode::WriteV`] moves one extent of the namespace to or from up to
//! [`MAX_SEGMENTS`] segments of any length and alignment, in any registered buffers (a VMM's
//! guest RAM regions, say). The segments are listed as [`Segment`]s in a registered buffer the
//! client owns; [`NvmeRing::prep_readv`] / [`NvmeRing::prep_writev`] write that list and queue
//! the request in one call:
//!
//! ```no_run
//! use nvmed_client::{IoSegment, NvmeRing};
//! let mut ring = NvmeRing::open("/run/nvmed.sock")?;
//! let ns = ring.namespaces()[0].nsid;
//! let data = ring.alloc_buffer(1 << 20)?;
//! let lists = ring.alloc_buffer(64 << 10)?;   // segment lists live here
//! let segs = [IoSegment::new(data, 0x200, 1536), IoSegment::new(data, 0x9000, 2560)];
//! ring.writev(ns, 0, &segs, lists, 0)?;       // 4096 bytes at namespace offset 0
//! # Ok::<(), nvmed_client::Error>(())
//! ```
//!
//! Borrow safety covers vectored requests too: until the completion, every segment's range
//! and the list's own range count as in flight ([`NvmeRing::buffer`] refuses them, and a
//! buffer holding any of them cannot be unregistered). [`NvmeRing::prep`] of a hand-made
//! [`Io::readv`] reads the list back from the client's own buffer to learn those ranges, and
//! refuses a list it cannot account for (unknown buffers, ranges outside their buffer, lengths
//! that do not add up).

mod buffer;
mod error;
mod session;
#[cfg(feature = "testkit")]
pub mod testkit;
#[cfg(feature = "tokio")]
pub mod tokio;
mod wait;

use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

pub use buffer::MemfdBuffer;
pub use error::{Error, Result};
use session::{unexpected, SessionInner};
pub use session::{NvmeSession, Reconnect, SessionOptions, SharedBuffer};

use nvmed_proto::layout::{
    RingLayout, BROKER_CQ_WAIT, BROKER_FAULTED, BROKER_FLAGS_OFFSET, BROKER_NEED_WAKEUP, FAULT_OFFSET,
    RING_MAGIC, RING_VERSION,
};
use nvmed_proto::ring::{completion_ring, submission_ring, Consumer, Producer, SharedRing, PREFETCH_MAX};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::wakeup::{peer_flags, SharedFlags};
pub use nvmed_proto::{
    BrokerStatus, ControllerState, HealthSummary, IoThreadInfo, NamespaceInfo, NvmeStatus, Opcode, Segment,
    Sqe, Stats, Status, MAX_SEGMENTS,
};
use nvmed_proto::{Cqe, Request, Response, RingFault, RingHeader};
use slab::Slab;

/// Id of a registered buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BufferId(pub u32);

/// Ring and session options.
#[derive(Debug, Clone)]
pub struct RingOptions {
    /// SQ entries (power of two).
    pub sq_entries: u32,
    /// CQ entries (power of two, at least `sq_entries`).
    pub cq_entries: u32,
    /// Name shown in the broker's logs.
    pub client_name: String,
    /// Longest [`NvmeRing::wait`] spins before sleeping on the completion doorbell. The ring adapts below
    /// it as KVM adapts its halt polling: a wait that ends in a sleep and lasts longer than this
    /// in all (spin and sleep), or whose wakeup brought nothing, halves the spin (to none); a
    /// shorter one (spinning that long would have caught it) doubles it (from 10 µs), and so
    /// does a wait satisfied while spinning; so a client whose broker is busy elsewhere
    /// (more runnable threads than CPUs) stops burning the CPU the broker needs, and one that
    /// slept through a hiccup spins again once its waits are short. Past its first 5 µs (or at once, when the
    /// ring's last yield let another thread run) a spinning wait also yields the CPU every 64
    /// looks (`sched_yield`), and it yields once more before it sleeps; time other threads ran
    /// meanwhile does not count as spinning (up to 16 times the current spin of wall time), so
    /// clients sharing few CPUs with each other and the broker take turns instead of waiting
    /// for doorbell wakeups.
    pub spin: Duration,
    /// The broker I/O thread to serve the ring (`None`: the least loaded).
    pub thread: Option<u16>,
    /// What a session opened with [`NvmeRing::open_with`] does when its broker goes away.
    pub reconnect: Reconnect,
}

impl Default for RingOptions {
    fn default() -> Self {
        Self {
            sq_entries: 256,
            cq_entries: 512,
            client_name: std::env::args().next().unwrap_or_else(|| "nvmed-client".into()),
            spin: Duration::from_micros(50),
            thread: None,
            reconnect: Reconnect::default(),
        }
    }
}

/// One piece of a vectored request: `len` bytes at `offset` of a registered buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoSegment {
    /// The buffer.
    pub buffer: BufferId,
    /// Byte offset inside it (any alignment).
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u32,
}

impl IoSegment {
    /// `len` bytes at `offset` of `buffer`.
    pub fn new(buffer: BufferId, offset: u64, len: u32) -> Self {
        Self { buffer, offset, len }
    }
}

/// Bytes one [`Segment`] takes in a segment list.
pub const SEGMENT_SIZE: u64 = size_of::<Segment>() as u64;

/// How many brokers in a row one recovery tries when each new one goes away while the
/// requests are being sent again (each connect has its own [`Reconnect`] budget).
const RECOVER_ATTEMPTS: u32 = 8;

/// One request to prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Io {
    /// Operation.
    pub op: Opcode,
    /// Namespace id.
    pub nsid: u32,
    /// Byte offset on the namespace.
    pub offset: u64,
    /// Length in bytes (of a vectored request: the sum of its segments' lengths).
    pub len: u32,
    /// Buffer and offset inside it: of the data (reads and writes), or of the [`Segment`] list
    /// (vectored reads and writes).
    pub buffer: Option<(BufferId, u64)>,
    /// Number of segments in the list (vectored requests only, else 0).
    pub segments: u16,
    /// Force unit access (writes, write zeroes).
    pub fua: bool,
    /// Returned in the completion.
    pub user_data: u64,
}

impl Io {
    /// Read `len` bytes at `offset` into `buffer` at `buf_offset`.
    pub fn read(nsid: u32, offset: u64, len: u32, buffer: BufferId, buf_offset: u64) -> Self {
        Self {
            op: Opcode::Read,
            nsid,
            offset,
            len,
            buffer: Some((buffer, buf_offset)),
            segments: 0,
            fua: false,
            user_data: 0,
        }
    }
    /// Vectored read of `len` bytes at `offset` into the `count` [`Segment`]s listed at
    /// `list_offset` of buffer `list` (see [`NvmeRing::write_segments`]).
    pub fn readv(nsid: u32, offset: u64, len: u32, list: BufferId, list_offset: u64, count: u16) -> Self {
        Self { op: Opcode::ReadV, segments: count, ..Self::read(nsid, offset, len, list, list_offset) }
    }
    /// Vectored write of `len` bytes at `offset` from the `count` [`Segment`]s listed at
    /// `list_offset` of buffer `list`.
    pub fn writev(nsid: u32, offset: u64, len: u32, list: BufferId, list_offset: u64, count: u16) -> Self {
        Self { op: Opcode::WriteV, ..Self::readv(nsid, offset, len, list, list_offset, count) }
    }
    /// Write `len` bytes at `offset` from `buffer` at `buf_offset`.
    pub fn write(nsid: u32, offset: u64, len: u32, buffer: BufferId, buf_offset: u64) -> Self {
        Self { op: Opcode::Write, ..Self::read(nsid, offset, len, buffer, buf_offset) }
    }
    /// Flush the namespace.
    pub fn flush(nsid: u32) -> Self {
        Self {
            op: Opcode::Flush,
            nsid,
            offset: 0,
            len: 0,
            buffer: None,
            segments: 0,
            fua: false,
            user_data: 0,
        }
    }
    /// Write zeroes over `len` bytes at `offset`.
    pub fn write_zeroes(nsid: u32, offset: u64, len: u32) -> Self {
        Self { op: Opcode::WriteZeroes, offset, len, ..Self::flush(nsid) }
    }
    /// Discard `len` bytes at `offset`.
    pub fn deallocate(nsid: u32, offset: u64, len: u32) -> Self {
        Self { op: Opcode::Deallocate, offset, len, ..Self::flush(nsid) }
    }
    /// A no-op round trip through the broker.
    pub fn nop() -> Self {
        Self { op: Opcode::Nop, ..Self::flush(0) }
    }
    /// Sets the user data.
    pub fn user_data(mut self, v: u64) -> Self {
        self.user_data = v;
        self
    }
    /// Sets force unit access.
    pub fn fua(mut self) -> Self {
        self.fua = true;
        self
    }
}

/// A finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's user data.
    pub user_data: u64,
    /// How it ended.
    pub status: Status,
    /// Bytes transferred.
    pub result: u32,
}

/// A buffer range a request uses: buffer id, offset, len.
type Range = (u32, u64, u64);

/// The buffer ranges of a request in flight.
#[derive(Debug)]
enum Ranges {
    None,
    One(Range),
    /// A vectored request: its segment list and each segment.
    Many(Vec<Range>),
}

impl Ranges {
    fn as_slice(&self) -> &[Range] {
        match self {
            Ranges::None => &[],
            Ranges::One(r) => std::slice::from_ref(r),
            Ranges::Many(v) => v,
        }
    }
}

#[derive(Debug)]
struct Pending {
    /// The entry as submitted (its `user_data` is the library's tag), to send it again after
    /// a reconnect.
    sqe: Sqe,
    user_data: u64,
    /// The SQ index its entry was written at: once it completes, the broker has consumed every
    /// SQ entry up to this one.
    sq_index: u32,
    ranges: Ranges,
}

/// Registered buffers by id. Ids are small dense integers the broker hands out, so a vector
/// indexed by id beats hashing on the per-I/O path.
#[derive(Debug, Default)]
struct BufferTable(Vec<Option<ClientBuffer>>);

impl BufferTable {
    fn get(&self, id: &u32) -> Option<&ClientBuffer> {
        self.0.get(*id as usize).and_then(Option::as_ref)
    }
    fn get_mut(&mut self, id: &u32) -> Option<&mut ClientBuffer> {
        self.0.get_mut(*id as usize).and_then(Option::as_mut)
    }
    fn insert(&mut self, id: u32, b: ClientBuffer) {
        let i = id as usize;
        if self.0.len() <= i {
            self.0.resize_with(i + 1, || None);
        }
        self.0[i] = Some(b);
    }
    fn remove(&mut self, id: &u32) -> Option<ClientBuffer> {
        self.0.get_mut(*id as usize).and_then(Option::take)
    }
    /// Ids of the buffers this ring registered itself (not shared ones it uses).
    fn own_ids(&self) -> Vec<u32> {
        (0..self.0.len() as u32)
            .filter(|id| self.get(id).is_some_and(|b| matches!(b.mem, Held::Own(_))))
            .collect()
    }
}

/// Polls in a row that find no completion before [`NvmeRing::poll`] checks whether the ring
/// faulted or the broker went away (a `poll(2)` of the control socket: cheap, but not free).
pub const EMPTY_POLLS_BEFORE_CHECK: u32 = 4096;

#[derive(Debug)]
struct ClientBuffer {
    mem: Held,
    in_flight: u32,
}

/// A buffer in a ring's table: its own, or a session's shared one it uses
/// ([`NvmeRing::use_shared`]).
#[derive(Debug)]
enum Held {
    Own(MemfdBuffer),
    Shared(SharedBuffer),
}

impl Held {
    fn len(&self) -> usize {
        match self {
            Held::Own(m) => m.len(),
            Held::Shared(b) => b.len(),
        }
    }

    /// The ring's own buffer (views and segment lists need one), or why not.
    fn own(&self, id: u32) -> Result<&MemfdBuffer> {
        match self {
            Held::Own(m) => Ok(m),
            Held::Shared(_) => Err(Error::SharedBuffer(id)),
        }
    }
}

/// One ring of a session: submissions and completions through shared memory, served by one
/// of the broker's I/O threads. Not shared between threads: give each thread its own ring
/// ([`NvmeSession::new_ring`]); all rings of a session share its registered buffers.
#[derive(Debug)]
pub struct NvmeRing {
    session: Arc<SessionInner>,
    /// The control connection this ring was created on, and its epoch (see
    /// [`NvmeRing::reconnects`]).
    sock: Arc<OwnedFd>,
    epoch: u64,
    /// What it was created with, to create it again after a reconnect.
    sq_entries: u32,
    thread_wanted: Option<u16>,
    ring_id: u32,
    thread: u16,
    mem: Arc<SharedMemory>,
    sq: Producer<SharedRing<Sqe>>,
    cq: Consumer<SharedRing<Cqe>>,
    submit_fd: OwnedFd,
    complete_fd: OwnedFd,
    buffers: BufferTable,
    pending: Slab<Pending>,
    /// Range lists of finished vectored requests, reused so steady-state I/O allocates nothing.
    spare_ranges: Vec<Vec<Range>>,
    spin: Duration,
    /// The spin of the next wait (adapts between zero and `spin`).
    spin_now: Duration,
    /// Consecutive polls that found nothing (see [`NvmeRing::poll`]).
    empty_polls: u32,
    /// The last yield of a wait gave the CPU to another thread: the next wait yields at its
    /// first chance instead of after `YIELD_AFTER`.
    yield_early: bool,
    /// CQ entries.
    cq_entries: u32,
    /// Whether the broker may be holding SQEs back for want of CQ room (see [`NvmeRing::poll`]).
    cq_wait_possible: bool,
    /// The session's count of shared buffers the caller let go of, when this ring last looked
    /// (see `let_go_of_orphans`).
    orphans_seen: u64,
    /// Whether [`NvmeRing::poll`] reconnects itself (see [`NvmeRing::set_reconnect_in_poll`]).
    reconnect_in_poll: bool,
    /// The tag of the request a synchronous call ([`NvmeRing::read`] and the like) waits for
    /// (`usize::MAX`: none); its completion goes to `sync_done`, not to the caller's `out`.
    sync_tag: usize,
    sync_done: Option<Completion>,
    /// Completions of other requests a synchronous call reaped while it waited: handed out by
    /// the next [`NvmeRing::poll`] (or wait), none lost.
    held: Vec<Completion>,
}

impl NvmeRing {
    /// Connects with default options: a new session with one ring.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, RingOptions::default())
    }

    /// Connects, says hello, lists namespaces and creates the session's first ring. More rings
    /// of the same session: [`NvmeRing::session`], then [`NvmeSession::new_ring`].
    pub fn open_with(path: impl AsRef<Path>, opts: RingOptions) -> Result<Self> {
        let session = NvmeSession::open_with(
            path,
            SessionOptions { client_name: opts.client_name.clone(), reconnect: opts.reconnect },
        )?;
        session.new_ring_with(opts)
    }

    pub(crate) fn create(session: Arc<SessionInner>, opts: RingOptions) -> Result<Self> {
        let a = Attached::create(&session, opts.sq_entries, opts.cq_entries, opts.thread)?;
        let (sock, epoch) = (a.sock.clone(), a.epoch);
        Ok(Self {
            session,
            sock,
            epoch,
            sq_entries: opts.sq_entries,
            thread_wanted: opts.thread,
            ring_id: a.ring_id,
            thread: a.thread,
            sq: a.sq,
            cq: a.cq,
            mem: a.mem,
            submit_fd: a.submit_fd,
            complete_fd: a.complete_fd,
            buffers: BufferTable::default(),
            pending: Slab::with_capacity(a.sq_entries as usize),
            spare_ranges: Vec::new(),
            spin: opts.spin,
            spin_now: opts.spin,
            empty_polls: 0,
            yield_early: false,
            cq_entries: a.cq_entries,
            cq_wait_possible: false,
            reconnect_in_poll: true,
            sync_tag: usize::MAX,
            orphans_seen: 0,
            sync_done: None,
            held: Vec::new(),
        })
    }

    /// Times this ring's session connected again after its broker went away (see
    /// [`Reconnect`]); the ring then created itself again and sent its requests again.
    pub fn reconnects(&self) -> u64 {
        self.session.reconnects()
    }

    /// The broker went away (or another handle of the session already connected to a new one):
    /// takes what the old broker completed, makes sure the session is connected again, creates
    /// the ring again, and sends every request that had not completed, in the order they were
    /// first sent. Completions gathered meanwhile go to `out`; returns how many.
    fn recover(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        // A ring an operator ended, or that broke, does not come back.
        if self.faulted() {
            let fault = RingFault::from_code(self.mem.load_u32(FAULT_OFFSET, Ordering::Acquire));
            if fault != Some(RingFault::Closed) {
                return Err(Error::RingFaulted(fault));
            }
        }
        // Nothing to do on a ring already on the session's current, live connection (asked by a
        // caller who saw an old connection hang up, which other rings may still hold open):
        // connecting again would open a second session.
        if self.epoch == self.session.epoch() && !self.broker_gone() {
            return Ok(0);
        }
        if !self.session.reconnect.enabled {
            self.end_pending(out)?;
            return Err(Error::BrokerGone);
        }
        let mut got = 0;
        // The requests to send again, oldest first (kept if a new broker goes away too).
        let mut order: Option<Vec<usize>> = None;
        for attempt in 0.. {
            // What the old broker finished is in the old CQ: those must not be sent again.
            got += self.take_completions(out)?;
            if let Err(e) = self.session.reconnect(self.epoch) {
                self.end_pending(out)?;
                return Err(e);
            }
            let tags: Vec<usize> = match order.take() {
                Some(prev) => prev.into_iter().filter(|&t| self.pending.contains(t)).collect(),
                None => {
                    // The old ring's tail orders the requests by age (the new ring starts at 0).
                    let old_tail = self.sq.tail();
                    let mut by_age: Vec<(u32, usize)> = self
                        .pending
                        .iter()
                        .map(|(tag, p)| (old_tail.wrapping_sub(p.sq_index), tag))
                        .collect();
                    by_age.sort_unstable_by_key(|&(age, _)| std::cmp::Reverse(age));
                    by_age.into_iter().map(|(_, tag)| tag).collect()
                }
            };
            let a = Attached::create(&self.session, self.sq_entries, self.cq_entries, self.thread_wanted)?;
            (self.sock, self.epoch) = (a.sock.clone(), a.epoch);
            self.ring_id = a.ring_id;
            self.thread = a.thread;
            self.sq = a.sq;
            self.cq = a.cq;
            self.mem = a.mem;
            self.submit_fd = a.submit_fd;
            self.complete_fd = a.complete_fd;
            self.cq_entries = a.cq_entries;
            self.cq_wait_possible = true;
            self.empty_polls = 0;
            match self.send_again(&tags, out, &mut got) {
                Ok(()) => return Ok(got),
                // The new broker went away too: start over with a newer one (what it finished
                // is taken first; the rest goes again, in the same order).
                Err(Error::BrokerGone) if attempt < RECOVER_ATTEMPTS => order = Some(tags),
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// Sends the requests `tags` (oldest first) again on the ring just created; completions
    /// taken meanwhile go to `out` (counted in `got`).
    fn send_again(&mut self, tags: &[usize], out: &mut Vec<Completion>, got: &mut usize) -> Result<()> {
        for &tag in tags {
            while self.sq.free().map_err(|_| Error::RingFaulted(None))? == 0 {
                // More requests than the new SQ holds: let the broker take some (a broker that
                // faults the ring or goes away meanwhile ends this, it does not spin for ever).
                self.submit()?;
                *got += self.take_completions(out)?;
                if self.broker_gone() {
                    return Err(Error::BrokerGone);
                }
                if let Some(e) = self.fault_error() {
                    return Err(e);
                }
                std::thread::yield_now();
            }
            // Completed meanwhile? (Only requests sent again can complete here.)
            let Some(p) = self.pending.get_mut(tag) else { continue };
            p.sq_index = self.sq.tail();
            let sqe = p.sqe;
            self.sq.push_unchecked(sqe);
        }
        self.submit()?;
        Ok(())
    }

    /// For a caller that watches [`NvmeRing::control_socket`] in its own event loop: when it
    /// reports a hang-up (the broker went away), this reconnects as [`NvmeRing::poll`] would
    /// ([`Reconnect`]): the session connects again, the ring is created again and the requests
    /// not completed are sent again; completions taken meanwhile go to `out`. Afterwards
    /// [`NvmeRing::completion_fd`] and [`NvmeRing::control_socket`] are new descriptors (the old
    /// ones are closed): register those again.
    pub fn reconnect(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        self.recover(out)
    }

    /// Whether [`NvmeRing::poll`] (and so [`NvmeRing::arm_completion_fd`]) connects again
    /// itself when it finds the broker gone (on, the default), blocking until a broker answers
    /// or the [`Reconnect`] budget runs out. An event loop that must not block (one thread
    /// serving many rings and sockets) turns it off: `poll` then fails with
    /// [`Error::BrokerGone`] instead, leaving the ring as it was (nothing completed is lost),
    /// and the caller runs [`NvmeRing::reconnect`] where blocking is fine, such as a blocking
    /// thread pool.
    pub fn set_reconnect_in_poll(&mut self, on: bool) {
        self.reconnect_in_poll = on;
    }

    /// Whether this ring's session connects again when its broker goes away ([`Reconnect`]).
    #[cfg(feature = "tokio")]
    pub(crate) fn reconnects_enabled(&self) -> bool {
        self.session.reconnect.enabled
    }

    /// Moves every completion in the CQ into `out`.
    fn take_completions(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let mut got = 0;
        loop {
            let n = self.reap(out)?;
            if n == 0 {
                return Ok(got);
            }
            got += n;
        }
    }
}

/// A ring as the broker created it.
struct Attached {
    ring_id: u32,
    thread: u16,
    sq_entries: u32,
    cq_entries: u32,
    mem: Arc<SharedMemory>,
    sq: Producer<SharedRing<Sqe>>,
    cq: Consumer<SharedRing<Cqe>>,
    submit_fd: OwnedFd,
    complete_fd: OwnedFd,
    /// The connection the ring was created on.
    sock: Arc<OwnedFd>,
    epoch: u64,
}

impl Attached {
    /// Asks the broker for a ring and maps it.
    fn create(session: &SessionInner, sq_entries: u32, cq_entries: u32, thread: Option<u16>) -> Result<Self> {
        let req = Request::CreateRing { sq_entries, cq_entries, thread };
        let (resp, fds, sock, epoch) = session.call_on_connection(&req, &[])?;
        let Response::RingCreated { sq_entries, cq_entries, size, ring_id, thread } = resp else {
            return Err(unexpected(resp));
        };
        let (mem, submit_fd, complete_fd) = match Self::attach(fds, sq_entries, cq_entries, size) {
            Ok(a) => a,
            Err(e) => {
                // The broker made it: closed there too, not left to the session's end.
                let _ = session.call_on_epoch(epoch, &Request::CloseRing { ring_id });
                return Err(e);
            }
        };
        let layout = RingLayout::new(sq_entries, cq_entries).map_err(|e| Error::Protocol(e.to_string()))?;
        Ok(Self {
            sock,
            epoch,
            ring_id,
            thread,
            sq_entries,
            cq_entries,
            sq: Producer::new(submission_ring(mem.clone(), &layout), 0),
            cq: Consumer::new(completion_ring(mem.clone(), &layout), 0),
            mem,
            submit_fd,
            complete_fd,
        })
    }

    /// Checks and maps what a ring's creation handed over: (memory, submit doorbell,
    /// completion doorbell).
    fn attach(
        mut fds: Vec<OwnedFd>,
        sq_entries: u32,
        cq_entries: u32,
        size: u64,
    ) -> Result<(Arc<SharedMemory>, OwnedFd, OwnedFd)> {
        if fds.len() != 3 {
            return Err(Error::Protocol(format!(
                "ring reply carried {} fds, expected 3 (fewer: was this process out of file descriptors?)",
                fds.len()
            )));
        }
        let layout = RingLayout::new(sq_entries, cq_entries).map_err(|e| Error::Protocol(e.to_string()))?;
        if size as usize != layout.total_size {
            return Err(Error::Protocol("ring size does not match its layout".into()));
        }
        let complete_fd = fds.pop().unwrap();
        let submit_fd = fds.pop().unwrap();
        let ring_fd = fds.pop().unwrap();
        // Mapped only if it cannot shrink under the mapping (a bad broker would otherwise make
        // this process fault on access).
        let sealed = nix::fcntl::fcntl(&ring_fd, nix::fcntl::FcntlArg::F_GET_SEALS)
            .is_ok_and(|s| s & libc::F_SEAL_SHRINK != 0);
        let size = nix::sys::stat::fstat(&ring_fd).map(|st| st.st_size as u64).unwrap_or(0);
        if !sealed || size < layout.total_size as u64 {
            return Err(Error::Protocol(format!(
                "the ring memory is not sealed against shrinking or too small ({size} bytes, sealed: {sealed})"
            )));
        }
        let mem = Arc::new(
            SharedMemory::map_shared(ring_fd.as_fd(), layout.total_size).map_err(error::os("mmap ring"))?,
        );
        let header: RingHeader = mem.read(0);
        if header != layout.header() || header.magic != RING_MAGIC || header.version != RING_VERSION {
            return Err(Error::Protocol(format!("bad ring header {header:?}")));
        }
        Ok((mem, submit_fd, complete_fd))
    }
}

impl NvmeRing {
    /// The session this ring belongs to (for more rings, shared buffers, stats).
    pub fn session(&self) -> NvmeSession {
        NvmeSession::from_inner(self.session.clone())
    }

    /// The broker's id for this session.
    pub fn session_id(&self) -> u64 {
        self.session.session_id()
    }

    /// This ring's id in its session.
    pub fn ring_id(&self) -> u32 {
        self.ring_id
    }

    /// The broker I/O thread serving this ring.
    pub fn io_thread(&self) -> u16 {
        self.thread
    }

    /// Namespaces this client may use.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        self.session.namespaces()
    }

    /// Requests prepared or submitted and not yet completed.
    pub fn in_flight(&self) -> usize {
        self.pending.len()
    }

    /// Free SQ slots.
    pub fn sq_space(&mut self) -> usize {
        self.sq.free().map_or(0, |f| f as usize)
    }

    /// Creates a sealed memfd buffer of `len` bytes (rounded up to 4 KiB) and registers it.
    pub fn alloc_buffer(&mut self, len: usize) -> Result<BufferId> {
        self.register_buffer(MemfdBuffer::new(len)?)
    }

    /// Registers a buffer (for example guest RAM from [`MemfdBuffer::from_sealed_memfd`]).
    /// This ring owns it: [`NvmeRing::buffer`] and [`NvmeRing::buffer_mut`] reach it, checked
    /// against this ring's I/O in flight. (A buffer for several rings: [`SharedBuffer`].)
    pub fn register_buffer(&mut self, buf: MemfdBuffer) -> Result<BufferId> {
        let buffer_id = session::register(&self.session, &buf)?;
        self.buffers.insert(buffer_id, ClientBuffer { mem: Held::Own(buf), in_flight: 0 });
        Ok(BufferId(buffer_id))
    }

    /// Uses a buffer of the session's ([`NvmeSession::register_shared`]) as if it were this
    /// ring's own for accounting: the ring keeps it alive (a clone) and counts its requests on
    /// it, so [`NvmeRing::release_shared`] can say when none is left, and keeps it until then.
    /// (Without this, a request naming a shared buffer makes the ring hold it only until its
    /// requests on it are done and the caller dropped every handle: its id is never given to
    /// another buffer while a request may name it.) Its memory is still reached only through
    /// the [`SharedBuffer`]: [`NvmeRing::buffer`] refuses it. A buffer of another session is
    /// refused ([`Error::ForeignBuffer`]).
    pub fn use_shared(&mut self, buf: &SharedBuffer) -> Result<BufferId> {
        let id = buf.id();
        if !buf.of_session(&self.session) {
            return Err(Error::ForeignBuffer(id.0));
        }
        match self.buffers.get_mut(&id.0) {
            // Held for requests since one named it: now kept until `release_shared`.
            Some(b) => {
                if matches!(b.mem, Held::Shared(_)) {
                    b.mem = Held::Shared(buf.clone());
                }
            }
            None => self.buffers.insert(id.0, ClientBuffer { mem: Held::Shared(buf.clone()), in_flight: 0 }),
        }
        Ok(id)
    }

    /// Stops using a shared buffer taken with [`NvmeRing::use_shared`] (or held since a request
    /// named it), once none of this ring's requests uses it ([`Error::InFlight`] until then):
    /// the ring's clone is dropped, and the buffer is unregistered when its last clone is.
    pub fn release_shared(&mut self, id: BufferId) -> Result<()> {
        let b = self.buffers.get(&id.0).ok_or(Error::UnknownBuffer(id.0))?;
        if !matches!(b.mem, Held::Shared(_)) {
            return Err(Error::UnknownBuffer(id.0));
        }
        if b.in_flight > 0 {
            return Err(Error::InFlight { id: id.0, offset: 0, len: b.mem.len() as u64 });
        }
        self.buffers.remove(&id.0);
        Ok(())
    }

    /// Takes `buf`, registered by the caller as `id`, as this ring's own.
    #[cfg(feature = "tokio")]
    pub(crate) fn adopt_buffer(&mut self, id: u32, buf: MemfdBuffer) {
        self.buffers.insert(id, ClientBuffer { mem: Held::Own(buf), in_flight: 0 });
    }

    /// Drops this ring's record of buffer `id`, which the caller unregistered.
    #[cfg(feature = "tokio")]
    pub(crate) fn disown_buffer(&mut self, id: BufferId) -> Option<MemfdBuffer> {
        self.buffers.remove(&id.0).and_then(|b| match b.mem {
            Held::Own(m) => Some(m),
            Held::Shared(_) => None,
        })
    }

    /// Unregisters a buffer with no I/O in flight and gives it back.
    pub fn unregister_buffer(&mut self, id: BufferId) -> Result<MemfdBuffer> {
        let b = self.buffers.get(&id.0).ok_or(Error::UnknownBuffer(id.0))?;
        b.mem.own(id.0)?;
        if b.in_flight > 0 {
            return Err(Error::InFlight { id: id.0, offset: 0, len: b.mem.len() as u64 });
        }
        session::unregister(&self.session, id.0, true)?;
        match self.buffers.remove(&id.0).unwrap().mem {
            Held::Own(m) => Ok(m),
            Held::Shared(_) => unreachable!("checked above"),
        }
    }

    fn check_range(&self, id: BufferId, offset: u64, len: u64) -> Result<&ClientBuffer> {
        let b = self.buffers.get(&id.0).ok_or(Error::UnknownBuffer(id.0))?;
        let size = b.mem.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfBuffer { id: id.0, offset, len, size });
        }
        if b.in_flight > 0 {
            let overlaps = self.pending.iter().any(|(_, p)| {
                p.ranges
                    .as_slice()
                    .iter()
                    .any(|&(bid, o, l)| bid == id.0 && o < offset + len && offset < o + l)
            });
            if overlaps {
                return Err(Error::InFlight { id: id.0, offset, len });
            }
        }
        Ok(b)
    }

    /// Reads `len` bytes of a buffer; refused while I/O in flight overlaps the range.
    pub fn buffer(&self, id: BufferId, offset: u64, len: u64) -> Result<&[u8]> {
        let b = self.check_range(id, offset, len)?.mem.own(id.0)?;
        // SAFETY: no request in flight overlaps the range (checked), and new requests need
        // `&mut self`, which cannot be had while this borrow lives.
        Ok(unsafe { b.slice(offset as usize, len as usize) })
    }

    /// Writes into `len` bytes of a buffer; refused while I/O in flight overlaps the range.
    pub fn buffer_mut(&mut self, id: BufferId, offset: u64, len: u64) -> Result<&mut [u8]> {
        self.check_range(id, offset, len)?.mem.own(id.0)?;
        let Held::Own(m) = &mut self.buffers.get_mut(&id.0).unwrap().mem else {
            unreachable!("checked above")
        };
        // SAFETY: as in `buffer`; `&mut self` makes the view exclusive within this process.
        Ok(unsafe { m.slice_mut(offset as usize, len as usize) })
    }

    /// Checks that `offset + len` lies inside buffer `id` (this ring's, or the session's
    /// shared ones).
    fn in_buffer(&mut self, id: u32, offset: u64, len: u64) -> Result<()> {
        let size = match self.buffers.get(&id) {
            Some(b) => b.mem.len() as u64,
            None => {
                // A shared buffer's first use on this ring: held while this ring's requests name
                // it (let go once they are done and the caller dropped it), so its id is not
                // given to another buffer meanwhile.
                let hold = self.session.hold_shared(id).ok_or(Error::UnknownBuffer(id))?;
                let len = hold.len() as u64;
                self.buffers.insert(id, ClientBuffer { mem: Held::Shared(hold), in_flight: 0 });
                len
            }
        };
        if offset.checked_add(len).is_none_or(|e| e > size) {
            return Err(Error::OutOfBuffer { id, offset, len, size });
        }
        Ok(())
    }

    /// Queues a request (not yet visible to the broker until [`NvmeRing::submit`]).
    ///
    /// For a vectored request ([`Io::readv`], [`Io::writev`]) the segment list must already be
    /// in the named buffer ([`NvmeRing::write_segments`]); it is read back here to account for
    /// the ranges the request uses, and refused if it is not sound.
    pub fn prep(&mut self, io: Io) -> Result<()> {
        if self.session.orphaned() != self.orphans_seen {
            self.let_go_of_orphans();
        }
        let mut ranges = Ranges::None;
        let (buf_id, buf_offset) = match io.buffer {
            Some((id, off)) if io.op.is_vectored() => {
                ranges = Ranges::Many(self.segment_ranges(id, off, io.segments, io.len)?);
                (id.0, off)
            }
            Some((id, off)) => {
                // Only the range check: overlapping requests on one buffer are the caller's business.
                self.in_buffer(id.0, off, u64::from(io.len))?;
                ranges = Ranges::One((id.0, off, u64::from(io.len)));
                (id.0, off)
            }
            None if io.op.is_vectored() => {
                return Err(Error::BadSegments("a vectored request needs a segment list".into()))
            }
            // (Buffer 0 is a buffer like any other: it must be named, and is then accounted.)
            None if io.op.uses_buffer() => return Err(Error::NoBuffer),
            None => (0, 0),
        };
        let sqe = Sqe {
            opcode: io.op as u8,
            flags: if io.fua { nvmed_proto::SQE_FLAG_FUA } else { 0 },
            segments: if io.op.is_vectored() { io.segments } else { 0 },
            nsid: io.nsid,
            offset: io.offset,
            len: io.len,
            buf_id,
            buf_offset,
            user_data: io.user_data,
            ..Sqe::default()
        };
        self.push(sqe, ranges)
    }

    /// The ranges a vectored request uses: its list, then each segment (read back from the
    /// list in this client's own buffer), checked as the broker will check them.
    fn segment_ranges(
        &mut self,
        list: BufferId,
        list_offset: u64,
        count: u16,
        len: u32,
    ) -> Result<Vec<Range>> {
        if count == 0 || count > MAX_SEGMENTS {
            return Err(Error::BadSegments(format!("{count} segments (1 to {MAX_SEGMENTS} allowed)")));
        }
        if !list_offset.is_multiple_of(8) {
            return Err(Error::BadSegments(format!("list offset {list_offset} is not 8-byte aligned")));
        }
        let list_len = u64::from(count) * SEGMENT_SIZE;
        // The list is read here from this ring's own memory: a shared buffer is refused before
        // `in_buffer` could take it on.
        if self.buffers.get(&list.0).is_none() && self.session.hold_shared(list.0).is_some() {
            return Err(Error::BadSegments(format!(
                "the segment list must be in a buffer this ring registered, not in shared buffer {}",
                list.0
            )));
        }
        self.in_buffer(list.0, list_offset, list_len)?;
        // Range lists of finished requests are reused, each made large enough for any request
        // (about 6 KiB), so segment counts that vary never make one grow: no allocation once
        // warmed up.
        let mut ranges =
            self.spare_ranges.pop().unwrap_or_else(|| Vec::with_capacity(usize::from(MAX_SEGMENTS) + 1));
        ranges.clear();
        ranges.push((list.0, list_offset, list_len));
        match self.read_segments(list, list_offset, count, len, &mut ranges) {
            Ok(()) => Ok(ranges),
            Err(e) => {
                self.spare_ranges.push(ranges);
                Err(e)
            }
        }
    }

    fn read_segments(
        &mut self,
        list: BufferId,
        list_offset: u64,
        count: u16,
        len: u32,
        ranges: &mut Vec<Range>,
    ) -> Result<()> {
        let mut total = 0u64;
        for i in 0..u64::from(count) {
            // (Looked up per segment: `in_buffer` below needs the ring mutably.)
            let Some(list_buf) = self.buffers.get(&list.0) else {
                return Err(Error::BadSegments(format!(
                    "the segment list must be in a buffer this ring registered, not in buffer {}",
                    list.0
                )));
            };
            let Held::Own(list_mem) = &list_buf.mem else {
                return Err(Error::BadSegments(format!(
                    "the segment list must be in a buffer this ring registered, not in shared buffer {}",
                    list.0
                )));
            };
            let seg = list_mem.read_segment((list_offset + i * SEGMENT_SIZE) as usize);
            if seg.len == 0 || seg.reserved0 != 0 || seg.reserved1 != 0 {
                return Err(Error::BadSegments(format!("segment {i} is empty or has reserved bits set")));
            }
            self.in_buffer(seg.buf_id, seg.offset, u64::from(seg.len))?;
            total += u64::from(seg.len);
            ranges.push((seg.buf_id, seg.offset, u64::from(seg.len)));
        }
        if total != u64::from(len) {
            return Err(Error::BadSegments(format!(
                "segments add up to {total} bytes, the request is {len}"
            )));
        }
        Ok(())
    }

    /// Writes `segments` as a [`Segment`] list at `list_offset` (8-byte aligned) of buffer
    /// `list`; returns their total length. Refused while I/O in flight uses that range.
    pub fn write_segments(
        &mut self,
        list: BufferId,
        list_offset: u64,
        segments: &[IoSegment],
    ) -> Result<u32> {
        if segments.is_empty() || segments.len() > usize::from(MAX_SEGMENTS) {
            return Err(Error::BadSegments(format!(
                "{} segments (1 to {MAX_SEGMENTS} allowed)",
                segments.len()
            )));
        }
        if !list_offset.is_multiple_of(8) {
            return Err(Error::BadSegments(format!("list offset {list_offset} is not 8-byte aligned")));
        }
        let mut total = 0u64;
        for s in segments {
            self.in_buffer(s.buffer.0, s.offset, u64::from(s.len))?;
            total += u64::from(s.len);
        }
        let total = u32::try_from(total)
            .map_err(|_| Error::BadSegments(format!("segments add up to {total} bytes, above 4 GiB")))?;
        let list_len = segments.len() as u64 * SEGMENT_SIZE;
        // The list must not lie over the data: writing it would change a write's data (or a
        // read would land on it), with nothing to say so.
        if let Some(s) = segments.iter().find(|s| {
            s.buffer == list
                && s.offset < list_offset.saturating_add(list_len)
                && list_offset < s.offset.saturating_add(u64::from(s.len))
        }) {
            return Err(Error::BadSegments(format!(
                "the segment list (bytes {list_offset}..{} of buffer {}: {SEGMENT_SIZE} bytes per segment) \
                 overlaps segment {}+{} of the request",
                list_offset.saturating_add(list_len),
                list.0,
                s.offset,
                s.len
            )));
        }
        let mem = self.check_range(list, list_offset, list_len)?.mem.own(list.0)?;
        for (i, s) in segments.iter().enumerate() {
            let seg = Segment::new(s.buffer.0, s.offset, s.len);
            mem.write_segment((list_offset + i as u64 * SEGMENT_SIZE) as usize, seg);
        }
        Ok(total)
    }

    /// Writes the segment list and builds the vectored request (`op` is ReadV or WriteV).
    fn vectored(
        &mut self,
        op: Opcode,
        nsid: u32,
        offset: u64,
        segments: &[IoSegment],
        list: BufferId,
        list_offset: u64,
    ) -> Result<Io> {
        let len = self.write_segments(list, list_offset, segments)?;
        let io = Io::readv(nsid, offset, len, list, list_offset, segments.len() as u16);
        Ok(Io { op, ..io })
    }

    /// Writes the segment list (see [`NvmeRing::write_segments`]) and queues a vectored read
    /// of the segments' total length at `offset` of the namespace into them.
    pub fn prep_readv(
        &mut self,
        nsid: u32,
        offset: u64,
        segments: &[IoSegment],
        list: BufferId,
        list_offset: u64,
        user_data: u64,
    ) -> Result<()> {
        let io = self.vectored(Opcode::ReadV, nsid, offset, segments, list, list_offset)?;
        self.prep(io.user_data(user_data))
    }

    /// As [`NvmeRing::prep_readv`], for a vectored write from the segments.
    pub fn prep_writev(
        &mut self,
        nsid: u32,
        offset: u64,
        segments: &[IoSegment],
        list: BufferId,
        list_offset: u64,
        user_data: u64,
    ) -> Result<()> {
        let io = self.vectored(Opcode::WriteV, nsid, offset, segments, list, list_offset)?;
        self.prep(io.user_data(user_data))
    }

    /// Queues a raw entry, bypassing the library's checks (for testing the broker).
    ///
    /// # Safety
    /// The entry may make the device write any buffer of this client at any offset; the
    /// caller must not hold or take views ([`NvmeRing::buffer`]) of memory it may touch until it
    /// completes.
    pub unsafe fn prep_raw(&mut self, sqe: Sqe) -> Result<()> {
        self.push(sqe, Ranges::None)
    }

    // Inlined into `prep`: the entry is then built where it is copied, not assembled on the
    // stack field by field and read back whole (a store-forwarding stall per request).
    #[inline(always)]
    fn push(&mut self, mut sqe: Sqe, ranges: Ranges) -> Result<()> {
        if self.sq.free_cached() == 0 {
            // The broker's head is read only when the cached view says full; the slots it
            // freed are then fetched for writing together (one overlapped wait, not one each).
            if self.sq.free().map_err(|_| Error::RingFaulted(None))? == 0 {
                return Err(Error::SqFull);
            }
            self.sq.prefetch_free(PREFETCH_MAX);
        }
        for &(id, _, _) in ranges.as_slice() {
            // Shared buffers are not this ring's to borrow-check.
            if let Some(b) = self.buffers.get_mut(&id) {
                b.in_flight += 1;
            }
        }
        let sq_index = self.sq.tail();
        let entry = self.pending.vacant_entry();
        let user_data = std::mem::replace(&mut sqe.user_data, entry.key() as u64);
        entry.insert(Pending { sqe, user_data, sq_index, ranges });
        self.sq.push_unchecked(sqe);
        Ok(())
    }

    /// Publishes prepared requests and wakes the broker if it sleeps. Returns how many.
    pub fn submit(&mut self) -> Result<u32> {
        let n = self.sq.unpublished();
        if n == 0 {
            return Ok(0);
        }
        self.sq.publish();
        if self.pending.len() > self.cq_entries as usize {
            // More requests outstanding than the CQ holds: the broker may wait for CQ room.
            self.cq_wait_possible = true;
        }
        let flags = peer_flags(&SharedFlags::broker(&self.mem));
        if flags & BROKER_FAULTED != 0 {
            if let Some(e) = self.fault_error() {
                return Err(e);
            }
        }
        if flags & BROKER_NEED_WAKEUP != 0 {
            nvmed_proto::eventfd::ring_doorbell(&self.submit_fd);
        }
        Ok(n)
    }

    fn fault(&self) -> Error {
        // Pairs with the broker's Release store of the reason (made before it sets the flag).
        Error::RingFaulted(RingFault::from_code(self.mem.load_u32(FAULT_OFFSET, Ordering::Acquire)))
    }

    /// The error a faulted ring fails with, if it is faulted. A ring closed by a broker shutting
    /// down is not an error when the session reconnects: its requests are sent again to the
    /// next broker once this one is gone.
    fn fault_error(&self) -> Option<Error> {
        if !self.faulted() {
            return None;
        }
        match self.fault() {
            Error::RingFaulted(Some(RingFault::Closed)) if self.session.reconnect.enabled => None,
            e => Some(e),
        }
    }

    fn faulted(&self) -> bool {
        self.mem.load_u32(BROKER_FLAGS_OFFSET, Ordering::Acquire) & BROKER_FAULTED != 0
    }

    /// Whether the broker closed this ring's control connection (it exited or was killed).
    fn broker_gone(&self) -> bool {
        session::closed(self.sock.as_fd())
    }

    /// Completions ready to be moved out by [`NvmeRing::poll`] (or [`NvmeRing::wait`]): those
    /// in the CQ, and those a synchronous call ([`NvmeRing::read`] and the like) took from it
    /// while it waited for its own.
    pub fn ready_completions(&mut self) -> usize {
        self.cq_ready() + self.held.len()
    }

    /// Completions waiting in the CQ. Looks no further than this ring's requests in flight:
    /// the entries past those are not written yet, and reading their cache line would only
    /// take it away from the broker that is about to write it.
    fn cq_ready(&mut self) -> usize {
        let max = self.pending.len().min(self.cq_entries as usize) as u32;
        self.cq.ready(max) as usize
    }

    /// Moves finished requests into `out` without blocking. Returns how many.
    ///
    /// A client that only polls still learns that the ring is gone: every
    /// [`EMPTY_POLLS_BEFORE_CHECK`] polls in a row that find nothing, `poll` looks at the ring's
    /// fault flag ([`Error::RingFaulted`]) and at the control socket (the broker never writes to
    /// it unasked). A broker gone is reconnected to ([`Reconnect`], the requests not completed
    /// are sent again), or is [`Error::BrokerGone`].
    pub fn poll(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        if !self.held.is_empty() {
            // Taken by a synchronous call while it waited: these first (the CQ next time).
            let n = self.held.len();
            out.append(&mut self.held);
            return Ok(n);
        }
        if self.cq_ready() == 0 {
            self.empty_polls += 1;
            if self.empty_polls >= EMPTY_POLLS_BEFORE_CHECK {
                self.empty_polls = 0;
                if self.broker_gone() || self.epoch != self.session.epoch() {
                    if !self.reconnect_in_poll {
                        return Err(Error::BrokerGone);
                    }
                    return self.recover(out);
                }
                if let Some(e) = self.fault_error() {
                    return Err(e);
                }
                if self.session.orphaned() != self.orphans_seen {
                    self.let_go_of_orphans();
                }
            }
            return Ok(0);
        }
        self.reap(out)
    }

    /// Drops this ring's holds on shared buffers the caller let go of and no request of this
    /// ring names any more (the last one unregisters the buffer).
    fn let_go_of_orphans(&mut self) {
        self.orphans_seen = self.session.orphaned();
        for slot in &mut self.buffers.0 {
            if slot
                .as_ref()
                .is_some_and(|b| b.in_flight == 0 && matches!(&b.mem, Held::Shared(s) if s.orphaned_hold()))
            {
                *slot = None;
            }
        }
    }

    /// The session is over for good (no reconnecting): what the old broker finished goes to
    /// `out`, and every request still outstanding is answered, on the next poll, with
    /// [`BrokerStatus::SessionEnded`], so its buffers are free again. Safe because the broker
    /// closes a session's connection only once its I/O drained, or exits (and the device is cut
    /// off from memory with it); a ring a failed device may still write through (faulted
    /// `DeviceFailed`) never gets here.
    fn end_pending(&mut self, out: &mut Vec<Completion>) -> Result<()> {
        self.take_completions(out)?;
        let status = Status::Broker(BrokerStatus::SessionEnded);
        let tags: Vec<usize> = self.pending.iter().map(|(tag, _)| tag).collect();
        for tag in tags {
            let p = self.pending.remove(tag);
            for &(id, _, _) in p.ranges.as_slice() {
                if let Some(b) = self.buffers.get_mut(&id) {
                    b.in_flight -= 1;
                }
            }
            if let Ranges::Many(v) = p.ranges {
                self.spare_ranges.push(v);
            }
            let c = Completion { user_data: p.user_data, status, result: 0 };
            if tag == self.sync_tag {
                self.sync_done = Some(c);
            } else {
                self.held.push(c);
            }
        }
        Ok(())
    }

    /// Whether the broker closed this ring's control connection (it exited, was killed, or
    /// ended the session): a `poll(2)` of the control socket, no wait. An event loop that
    /// sleeps on [`NvmeRing::completion_fd`] without watching [`NvmeRing::control_socket`]
    /// asks before it sleeps (nothing else would end that sleep), then calls
    /// [`NvmeRing::reconnect`].
    pub fn broker_closed(&self) -> bool {
        self.broker_gone() || self.epoch != self.session.epoch()
    }

    /// The control connection this ring is attached through: it changes when the ring
    /// reconnects to a restarted broker, and with it [`NvmeRing::completion_fd`] and
    /// [`NvmeRing::control_socket`] (callers that watch those descriptors register them again).
    pub fn connection_epoch(&self) -> u64 {
        self.epoch
    }

    /// Moves the completions in the CQ now into `out`; returns how many.
    fn reap(&mut self, out: &mut Vec<Completion>) -> Result<usize> {
        let avail = self.cq_ready() as u32;
        if avail == 0 {
            return Ok(0);
        }
        self.empty_polls = 0;
        let mut orphans = false;
        for i in 0..avail {
            let cqe = self.cq.read(i);
            let Some(p) = self.pending.try_remove(cqe.user_data as usize) else {
                // What was taken before it stays taken (those requests are out of `pending`):
                // consumed, so the next reap does not read them again.
                self.cq.consume(i);
                return Err(Error::Protocol(format!("completion for unknown tag {}", cqe.user_data)));
            };
            // The broker copies an entry out (and consumes the SQ in order) before it completes
            // it: the SQ slots up to this one are free, learnt without reading its head line.
            self.sq.observe_head(p.sq_index.wrapping_add(1));
            for &(id, _, _) in p.ranges.as_slice() {
                if let Some(b) = self.buffers.get_mut(&id) {
                    b.in_flight -= 1;
                    if b.in_flight == 0 && matches!(&b.mem, Held::Shared(s) if s.orphaned_hold()) {
                        orphans = true;
                    }
                }
            }
            if let Ranges::Many(v) = p.ranges {
                self.spare_ranges.push(v);
            }
            let c = Completion {
                user_data: p.user_data,
                status: Status::decode(cqe.status_word()),
                result: cqe.result,
            };
            if cqe.user_data as usize == self.sync_tag {
                // Counted in what this returns, so that the synchronous call's wait ends.
                self.sync_done = Some(c);
            } else {
                out.push(c);
            }
        }
        self.cq.consume(avail);
        if orphans {
            self.let_go_of_orphans();
        }
        // As many new requests are likely to follow: fetch their SQ slots for writing now.
        self.sq.prefetch_free(avail);
        // The broker may be holding SQEs back until the CQ has room: tell it there is some now.
        // It can only be when requests beyond the CQ's size were once published: the broker
        // counts the SQEs it saw published plus those in flight as needing CQ room, and it reads
        // the CQ head after the newest SQE's tag (Acquire), so it sees at least the head stored
        // before that SQE was published; what it counts is then at most the requests
        // outstanding at that publish.
        // So the fence and the look at the broker's flags are skipped while the ring never had
        // more requests outstanding than CQ entries (`tests/loom_ring.rs` checks the ordering).
        if self.cq_wait_possible {
            if peer_flags(&SharedFlags::broker(&self.mem)) & BROKER_CQ_WAIT != 0 {
                nvmed_proto::eventfd::ring_doorbell(&self.submit_fd);
            }
            // The broker re-reads the head after announcing CQ_WAIT; the fence above pairs
            // with its fence: either it was seen here, or it sees this head and finds room.
            if self.pending.len() <= self.cq_entries as usize {
                self.cq_wait_possible = false;
            }
        }
        Ok(avail as usize)
    }

    /// Runs one request to completion (submitting anything else prepared too). Completions of
    /// other requests it reaps meanwhile are kept for the next [`NvmeRing::poll`] or
    /// [`NvmeRing::wait`]. If it fails (the ring faulted, the broker went away and could not
    /// be reconnected to), its request may still be in flight; should it complete, `poll` hands
    /// it out with user data `u64::MAX - 7`.
    fn run_one(&mut self, io: Io) -> Result<Completion> {
        // Recognisable should it complete after this call failed (it then goes to `poll`).
        const SYNC_USER_DATA: u64 = u64::MAX - 7;
        let tag = self.pending.vacant_key();
        self.prep(io.user_data(SYNC_USER_DATA))?;
        self.sync_tag = tag;
        self.sync_done = None;
        // What an earlier synchronous call held back stays first in line.
        let mut others = std::mem::take(&mut self.held);
        let r = self.submit().and_then(|_| {
            while self.sync_done.is_none() {
                self.wait(1, &mut others, None)?;
            }
            Ok(())
        });
        self.sync_tag = usize::MAX;
        // (Requests answered meanwhile because the session ended are behind those.)
        others.append(&mut self.held);
        self.held = others;
        // Its completion may have been taken before the wait failed (say, out of an old
        // broker's CQ before reconnecting failed): the request is done, whatever came after.
        let c = match (self.sync_done.take(), r) {
            // Answered only because the session ended: the reason it ended says more.
            (Some(c), Err(e)) if c.status == Status::Broker(BrokerStatus::SessionEnded) => return Err(e),
            (Some(c), _) => c,
            (None, Err(e)) => return Err(e),
            (None, Ok(())) => unreachable!("the loop ends once it is there"),
        };
        match c.status {
            Status::Success => Ok(c),
            s => Err(Error::Io(s)),
        }
    }

    /// Synchronous read.
    pub fn read(&mut self, nsid: u32, offset: u64, buf: BufferId, buf_offset: u64, len: u32) -> Result<()> {
        self.run_one(Io::read(nsid, offset, len, buf, buf_offset)).map(drop)
    }

    /// Synchronous write.
    pub fn write(&mut self, nsid: u32, offset: u64, buf: BufferId, buf_offset: u64, len: u32) -> Result<()> {
        self.run_one(Io::write(nsid, offset, len, buf, buf_offset)).map(drop)
    }

    /// Synchronous vectored read into `segments`, whose list is written at `list_offset` of
    /// buffer `list`.
    pub fn readv(
        &mut self,
        nsid: u32,
        offset: u64,
        segments: &[IoSegment],
        list: BufferId,
        list_offset: u64,
    ) -> Result<()> {
        let io = self.vectored(Opcode::ReadV, nsid, offset, segments, list, list_offset)?;
        self.run_one(io).map(drop)
    }

    /// Synchronous vectored write from `segments` (list written as for [`NvmeRing::readv`]).
    pub fn writev(
        &mut self,
        nsid: u32,
        offset: u64,
        segments: &[IoSegment],
        list: BufferId,
        list_offset: u64,
    ) -> Result<()> {
        let io = self.vectored(Opcode::WriteV, nsid, offset, segments, list, list_offset)?;
        self.run_one(io).map(drop)
    }

    /// Synchronous flush.
    pub fn flush(&mut self, nsid: u32) -> Result<()> {
        self.run_one(Io::flush(nsid)).map(drop)
    }

    /// Session and broker counters (all rings of the session together).
    pub fn stats(&mut self) -> Result<Stats> {
        self.session().stats()
    }

    /// A health summary of the controllers holding this session's namespaces.
    pub fn health(&mut self) -> Result<Vec<nvmed_proto::HealthSummary>> {
        self.session().health()
    }

    /// Sends a raw control request (for testing the broker).
    pub fn control(&mut self, req: &Request, fds: &[std::os::fd::BorrowedFd<'_>]) -> Result<Response> {
        self.session.call(req, fds).map(|(r, _)| r)
    }

    /// The control socket (for testing the broker with hand-made datagrams).
    pub fn control_socket(&self) -> std::os::fd::BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Raw access to the ring mapping (for testing the broker against a hostile client).
    pub fn ring_memory(&self) -> &SharedMemory {
        &self.mem
    }
}

impl Drop for NvmeRing {
    /// Ends the ring (its I/O drains first: when this returns the device no longer uses the
    /// ring's buffers, a caller's guest RAM included) and unregisters the buffers it owns,
    /// unless the session ends with it anyway (the broker then releases everything; it is
    /// still drained first if requests are in flight).
    fn drop(&mut self) {
        if Arc::strong_count(&self.session) == 1 {
            if !self.pending.is_empty() {
                let _ = self.session.call_on_epoch(self.epoch, &Request::CloseRing { ring_id: self.ring_id });
            }
            return;
        }
        // (Never reconnecting for that: a broker gone has released them already; and only on
        // this ring's own connection, checked under its lock: a newer broker reuses ring ids.)
        let _ = self.session.call_on_epoch(self.epoch, &Request::CloseRing { ring_id: self.ring_id });
        for id in self.buffers.own_ids() {
            let _ = session::unregister(&self.session, id, false);
        }
    }
}
