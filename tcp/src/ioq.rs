//! An I/O queue: one TCP connection, one nvmed ring, one registered buffer cut into one slot of
//! MDTS bytes per queue entry. Write data is read from the socket straight into the command's
//! slot (in-capsule, or H2CData after an R2T) and the device DMAs it from there; read data is
//! DMA'd into the slot and written to the socket from it. The loop never blocks: it reads what
//! the socket has, submits, reaps completions, writes what the socket takes, then sleeps on
//! whichever of socket and completion doorbell it needs.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, IoSlice};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use nvmed_client::{BrokerStatus, BufferId, Completion, Io, NvmeRing, RingOptions, Status};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use crate::ctrl::{admin_op, fctype, sc, NsView};
use crate::outbox::{Outbox, Tx};
use crate::pdu::{self, DataPdu, Digests, Header, Layout, Limits, NvmeCmd, PduError, Receiver, MAX_HEADER};
use crate::server::{cqe, lock, sleep_until_opt, ConnError, ConnParams, CtrlShared, Target, MAX_H2C_DATA};

/// I/O opcodes.
mod io_op {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DSM: u8 = 0x09;
}

/// Most pieces of output gathered into one `writev`.
const MAX_IOV: usize = 64;

/// Largest deallocate sent to the broker at once.
const DEALLOC_CHUNK: u64 = 1 << 30;

/// Most nvmed requests one Dataset Management command becomes. Deallocation is advisory
/// (Identify Namespace promises nothing about deallocated blocks), so what lies beyond is
/// skipped: 256 ranges of a large namespace would otherwise become hundreds of thousands of
/// requests, and their memory, per 4 KiB command.
const MAX_DEALLOC_IOS: usize = 256;

/// The deallocate requests for LBA ranges `[start, end)`: overlapping and touching ranges
/// merged, split into pieces of at most [`DEALLOC_CHUNK`] bytes, at most [`MAX_DEALLOC_IOS`].
fn deallocate_ios(nsid: u32, lba_size: u32, lbas: &mut [(u64, u64)]) -> impl Iterator<Item = Io> + '_ {
    lbas.sort_unstable();
    let mut merged = 0;
    for i in 0..lbas.len() {
        if merged > 0 && lbas[i].0 <= lbas[merged - 1].1 {
            lbas[merged - 1].1 = lbas[merged - 1].1.max(lbas[i].1);
        } else {
            lbas[merged] = lbas[i];
            merged += 1;
        }
    }
    let lba = u64::from(lba_size);
    lbas[..merged]
        .iter()
        .flat_map(move |&(start, end)| {
            let (from, to) = (start * lba, end * lba);
            (from..to).step_by(DEALLOC_CHUNK as usize).map(move |off| (off, (to - off).min(DEALLOC_CHUNK)))
        })
        .take(MAX_DEALLOC_IOS)
        .map(move |(off, n)| Io::deallocate(nsid, off, n as u32))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Kind {
    #[default]
    Read,
    Write,
    Flush,
    WriteZeroes,
    Dsm {
        ranges: u32,
        deallocate: bool,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    busy: bool,
    cid: u16,
    kind: Kind,
    nsid: u32,
    lba_size: u32,
    lba_count: u64,
    offset: u64,
    /// Bytes the command moves (the host's data for writes and DSM).
    len: u32,
    fua: bool,
    /// Host data received so far.
    received: u32,
    awaiting_h2c: bool,
    digest_bad: bool,
    /// Ring requests in flight.
    pending: u32,
    status: u16,
    zero_fallback: bool,
    /// Write Zeroes by writes (the device has none): bytes of the range written or in flight.
    zeroed: u32,
}

#[derive(Debug, Clone, Copy)]
enum DataTarget {
    InCapsule { slot: u16 },
    H2c { slot: u16, len: u32 },
    Discard { slot: Option<u16> },
    TermReq { fes: u16 },
}

#[derive(Debug, Clone, Copy)]
enum Rx {
    Header,
    Data { target: DataTarget, at: u64, remaining: u32, crc: u32 },
    Digest { target: DataTarget, have: usize, buf: [u8; 4], crc: u32 },
}

/// Where the R2T that data from `received` answers ends: R2Ts go out one after the other,
/// each of at most MAXH2CDATA, from the start of the command's `len` bytes.
fn r2t_end(received: u32, len: u32) -> u32 {
    (received - received % MAX_H2C_DATA).saturating_add(MAX_H2C_DATA).min(len)
}

/// The command in `slot` is answered: its command id and slot may serve a new command.
fn free_slot(slots: &mut [Slot], cids: &mut HashMap<u16, u16>, free: &mut Vec<u16>, slot: u16) {
    let s = &mut slots[usize::from(slot)];
    s.busy = false;
    cids.remove(&s.cid);
    free.push(slot);
}

struct Queue {
    stream: TcpStream,
    ring: NvmeRing,
    buf: BufferId,
    dg: Digests,
    hpda: u8,
    qid: u16,
    depth: u16,
    sqhd: u16,
    slot_size: u32,
    ns: Arc<Vec<NsView>>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    cids: HashMap<u16, u16>,
    limits: Limits,
    /// Socket input read ahead of the PDU being parsed.
    staged: Staging,
    hbuf: [u8; MAX_HEADER],
    hhave: usize,
    hlayout: Option<Layout>,
    rx: Rx,
    tx: Outbox,
    backlog: VecDeque<Io>,
    comps: Vec<Completion>,
    scratch: Vec<u8>,
    closing: bool,
    /// The slot of a Disconnect waiting for every other command of the queue to be answered
    /// (their answers go out first; then it is answered and the queue closes).
    disconnect: Option<u16>,
    /// Since when queued output has been waiting for the socket without progress (`None`:
    /// output moved since the last wait). Taken lazily: no clock read per I/O.
    stall_since: Option<Instant>,
}

/// The next completion poll after sleeping `slept` for a completion: one that came within
/// `max` would have been caught by polling longer, so the poll doubles (from 5 µs, up to `max`);
/// a later one means the poll spun for nothing, so it halves (to none below 5 µs). (KVM adapts
/// its halt polling the same way.)
fn adapt_poll(poll: Duration, slept: Duration, max: Duration) -> Duration {
    const START: Duration = Duration::from_micros(5);
    if slept < max {
        (poll * 2).max(START).min(max)
    } else if poll / 2 < START {
        Duration::ZERO
    } else {
        poll / 2
    }
}

/// Socket input is read in large pieces and parsed from here, so a batch of small PDUs costs one
/// `recv`, not two or three each; data of at least [`Staging::DIRECT`] bytes that is not read
/// ahead goes straight from the socket into its slot.
struct Staging {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
    /// The last `recv` returned less than asked: the socket has nothing more now.
    drained: bool,
    /// Whether a short read may clear the socket's readiness without another `recv` (see
    /// [`Staging::read`]).
    skip_eagain: bool,
}

impl Staging {
    const SIZE: usize = 64 << 10;
    const DIRECT: usize = 16 << 10;

    fn new() -> Self {
        // Only on a current-thread runtime: there the I/O driver never runs while this task
        // does, so no readiness event can arrive between the short `recv` and the clearing
        // below. A multi-thread runtime's driver may run on another thread meanwhile; clearing
        // a readiness it just set would lose that wakeup, so there the next `recv` (which
        // returns EAGAIN) clears it, as tokio's `try_read` does safely.
        let skip_eagain = tokio::runtime::Handle::try_current()
            .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread);
        Staging { buf: vec![0; Self::SIZE].into_boxed_slice(), start: 0, end: 0, drained: false, skip_eagain }
    }

    /// Fills (part of) `dest`, which is not empty: from what was read ahead, else from the
    /// socket. `Ok(0)`: the peer closed. `WouldBlock`: nothing to read now (on a current-thread
    /// runtime, after a short read the socket's readiness is cleared without another `recv`).
    fn read(&mut self, stream: &TcpStream, dest: &mut [u8]) -> std::io::Result<usize> {
        if self.start == self.end {
            if self.drained && self.skip_eagain {
                // Tokio keeps the socket readable until it sees WouldBlock: tell it so without
                // a system call.
                return stream.try_io(Interest::READABLE, || Err(ErrorKind::WouldBlock.into()));
            }
            if dest.len() >= Self::DIRECT {
                let n = stream.try_read(dest)?;
                self.drained = n < dest.len();
                return Ok(n);
            }
            let n = stream.try_read(&mut self.buf)?;
            self.drained = n < self.buf.len();
            if n == 0 {
                return Ok(0);
            }
            (self.start, self.end) = (0, n);
        }
        let k = dest.len().min(self.end - self.start);
        dest[..k].copy_from_slice(&self.buf[self.start..self.start + k]);
        self.start += k;
        Ok(k)
    }
}

/// Holds queue id `qid` of a controller from its Connect until released (or dropped, on any
/// way out): one place frees it, once, so a later connection's claim of the id is never undone.
struct QueueId<'a> {
    ctrl: &'a CtrlShared,
    qid: Option<u16>,
}

impl QueueId<'_> {
    fn release(&mut self) {
        if let Some(qid) = self.qid.take() {
            lock(&self.ctrl.queues).1.remove(&qid);
        }
    }
}

impl Drop for QueueId<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Serves I/O queue `qid` of `ctrl` after its Connect (answered here once the ring exists);
/// frees the queue id when it ends.
pub(crate) async fn run(
    target: &Arc<Target>,
    ctrl: &Arc<CtrlShared>,
    stream: TcpStream,
    params: ConnParams,
    qid: u16,
    sqsize: u16,
    cid: u16,
) -> Result<(), ConnError> {
    let mut held = QueueId { ctrl, qid: Some(qid) };
    let depth = sqsize + 1;
    let slot_size = ctrl.max_transfer;
    // (A discovery controller has no session, and no I/O queues: `connect` refuses them.)
    let Some(session) = ctrl.session.clone() else { return Err(ConnError::ControllerGone) };
    let name = format!("nvmed-tcp cntlid {} q{qid}", ctrl.cntlid);
    let made = tokio::task::spawn_blocking(move || {
        let opts = RingOptions {
            sq_entries: 256,
            cq_entries: 512,
            client_name: name,
            spin: Duration::ZERO,
            thread: None,
            ..RingOptions::default()
        };
        let mut ring = session.new_ring_with(opts)?;
        let buf = ring.alloc_buffer(usize::from(depth) * slot_size as usize)?;
        Ok::<_, nvmed_client::Error>((ring, buf))
    })
    .await
    .map_err(|e| ConnError::Io(std::io::Error::other(e)))?;
    // Answers the Connect with Controller Busy instead of the success prepared.
    let busy = |mut stream: TcpStream| async move {
        let mut out = Vec::new();
        pdu::push_capsule_resp(&mut out, params.dg, cqe(cid, sc::CONNECT_CTRL_BUSY, 0, 1, qid));
        let _ = tokio::io::AsyncWriteExt::write_all(&mut stream, &out).await;
    };
    let (mut ring, buf) = match made {
        Ok(v) => v,
        Err(e) => {
            busy(stream).await;
            return Err(e.into());
        }
    };
    // A gone nvmed is noticed on the control socket and reconnected to off this thread (below).
    ring.set_reconnect_in_poll(false);
    let mut fds = match RingFds::of(&ring) {
        Ok(fds) => fds,
        Err(e) => {
            // (No descriptor left for the ring's doorbells.)
            busy(stream).await;
            return Err(e.into());
        }
    };
    let mut q = Queue {
        stream,
        ring,
        buf,
        dg: params.dg,
        hpda: params.hpda,
        qid,
        depth,
        sqhd: 1,
        slot_size,
        ns: ctrl.namespaces.clone(),
        slots: vec![Slot::default(); usize::from(depth)],
        free: (0..depth).rev().collect(),
        cids: HashMap::new(),
        limits: Limits {
            max_in_capsule: target.cfg.in_capsule as usize,
            max_data_pdu: MAX_H2C_DATA as usize,
        },
        staged: Staging::new(),
        hbuf: [0; MAX_HEADER],
        hhave: 0,
        hlayout: None,
        rx: Rx::Header,
        tx: Outbox::default(),
        backlog: VecDeque::new(),
        comps: Vec::new(),
        scratch: vec![0; 64 << 10],
        closing: false,
        disconnect: None,
        stall_since: None,
    };
    let cntlid = u64::from(ctrl.cntlid);
    q.push_bytes(|out| pdu::push_capsule_resp(out, params.dg, cqe(cid, sc::SUCCESS, cntlid, 1, qid)));
    info!(cntlid = ctrl.cntlid, qid, depth, "I/O queue connected");
    let mut alive = ctrl.alive.subscribe();
    let mut ready = ctrl.ready.subscribe();
    let (io_timeout, spin) = (target.cfg.io_timeout, target.cfg.poll);
    let mut r = q.serve(&fds, &mut alive, &mut ready, io_timeout, spin).await;
    // nvmed went away (killed, crashed, restarted for an upgrade): wait for it, off the async
    // thread (it serves every connection), with the ring moved there and back. The ring sends
    // the requests in flight again to the new nvmed (same buffer ids); the host sees a pause.
    while matches!(&r, Err(ConnError::Broker(e)) if broker_lost(e)) {
        drop(fds);
        let in_flight = q.ring.in_flight();
        warn!(cntlid, qid, in_flight, "nvmed went away: waiting for it to come back");
        let started = Instant::now();
        let (back, reconnected) = tokio::task::spawn_blocking(move || {
            let mut q = q;
            let mut comps = std::mem::take(&mut q.comps);
            let r = q.ring.reconnect(&mut comps);
            q.comps = comps; // handled by the next pump
            (q, r)
        })
        .await
        .map_err(|e| ConnError::Io(std::io::Error::other(e)))?;
        q = back;
        fds = match reconnected.map_err(ConnError::from).and_then(|_| Ok(RingFds::of(&q.ring)?)) {
            Ok(f) => f,
            Err(e) => {
                // Gone for good (or not within the reconnect budget): the commands at nvmed
                // fail with a status the host retries (on this controller once nvmed is back,
                // or on another path), and the queue closes.
                warn!(
                    cntlid,
                    qid, "nvmed did not come back ({e}): failing {in_flight} commands, closing the queue"
                );
                q.fail_in_flight(sc::NS_NOT_READY);
                q.flush().await;
                r = Err(e);
                break;
            }
        };
        info!(cntlid, qid, after = ?started.elapsed(), "reconnected to nvmed; commands in flight sent again");
        r = q.serve(&fds, &mut alive, &mut ready, io_timeout, spin).await;
    }
    if let Err(ConnError::Pdu(e)) = &r {
        q.terminate(e).await;
    }
    // The queue id is free again before the host sees the connection close.
    held.release();
    let ring = q.ring;
    // Dropping a ring waits for its I/O to drain: off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(ring)).await;
    debug!(qid, "I/O queue closed");
    r
}

/// Whether a ring error means nvmed went away (and the ring may connect again).
fn broker_lost(e: &nvmed_client::Error) -> bool {
    matches!(
        e,
        nvmed_client::Error::BrokerGone
            | nvmed_client::Error::RingFaulted(Some(nvmed_proto::RingFault::Closed))
    )
}

/// What an I/O queue sleeps on besides its socket: duplicates of its ring's completion doorbell
/// and of its session's control socket (nvmed never writes to that unasked; its hang-up says
/// nvmed went away), registered with the reactor. A ring that connected again has new ones.
struct RingFds {
    completion: AsyncFd<OwnedFd>,
    control: AsyncFd<OwnedFd>,
}

impl RingFds {
    fn of(ring: &NvmeRing) -> std::io::Result<Self> {
        let register = |fd: OwnedFd| {
            // SAFETY: an OwnedFd is open until dropped and always returns the same descriptor;
            // the AsyncFd owns it, so it stays open and unchanged for the AsyncFd's whole life.
            unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) }
                .map_err(|e| std::io::Error::other(e.to_string()))
        };
        Ok(RingFds {
            completion: register(ring.completion_fd().try_clone_to_owned()?)?,
            control: register(ring.control_socket().try_clone_to_owned()?)?,
        })
    }
}

fn map_status(s: Status) -> u16 {
    match s {
        Status::Success => sc::SUCCESS,
        Status::Nvme(n) => (u16::from(n.sct & 7) << 8) | u16::from(n.sc) | if n.dnr { sc::DNR } else { 0 },
        Status::Broker(b) => match b {
            BrokerStatus::OutOfRange => sc::LBA_RANGE | sc::DNR,
            BrokerStatus::NotPermitted => sc::NS_WRITE_PROTECTED | sc::DNR,
            BrokerStatus::InvalidNamespace => sc::INVALID_NS | sc::DNR,
            BrokerStatus::InvalidOpcode => sc::INVALID_OPCODE | sc::DNR,
            BrokerStatus::DeviceReset => sc::INTERNAL,
            BrokerStatus::DeviceFault => sc::INTERNAL | sc::DNR,
            _ => sc::INVALID_FIELD | sc::DNR,
        },
        Status::Unknown(_) => sc::INTERNAL | sc::DNR,
    }
}

impl Queue {
    /// Serves the queue until it ends, or until nvmed goes away (`ConnError::Broker` with an
    /// error [`broker_lost`] accepts: the caller reconnects and serves again).
    async fn serve(
        &mut self,
        fds: &RingFds,
        alive: &mut tokio::sync::watch::Receiver<bool>,
        ready: &mut tokio::sync::watch::Receiver<bool>,
        io_timeout: Duration,
        spin: Duration,
    ) -> Result<(), ConnError> {
        // The completion poll before sleeping: adapted to how long completions take, at most
        // `spin` (`--poll-us`).
        let mut poll = spin;
        loop {
            self.read_some()?;
            self.pump()?;
            self.write_some()?;
            if let Some(slot) = self.disconnect.filter(|_| self.cids.len() == 1) {
                // Every other command answered and its answer written: now the Disconnect.
                self.disconnect = None;
                self.closing = true;
                self.respond(slot, sc::SUCCESS);
                self.write_some()?;
            }
            if self.closing && self.tx.is_empty() {
                return Ok(());
            }
            if !*alive.borrow() || !*ready.borrow() {
                return Err(ConnError::ControllerGone);
            }
            let armed = self.ring.in_flight() > 0;
            if armed && !poll.is_zero() && self.tx.is_empty() {
                // Poll the ring a little before sleeping: a fast device answers within it, and
                // a completion seen here costs no eventfd round trip and no sleep.
                // The clock is read every 64 polls only (in some VMs each read is a system call).
                let until = std::time::Instant::now() + poll;
                let mut got = 0;
                let mut polls = 0u32;
                while got == 0 && (!polls.is_multiple_of(64) || std::time::Instant::now() < until) {
                    std::hint::spin_loop();
                    got = self.pump()?;
                    polls = polls.wrapping_add(1);
                }
                if got > 0 {
                    continue;
                }
            }
            if armed {
                let mut comps = std::mem::take(&mut self.comps);
                let n = self.ring.arm_completion_fd(&mut comps)?;
                self.comps = comps;
                if n > 0 {
                    self.handle_completions()?;
                    continue;
                }
            }
            let want_write = !self.tx.is_empty();
            let stall = want_write.then(|| *self.stall_since.get_or_insert_with(Instant::now) + io_timeout);
            let asleep = (armed && !spin.is_zero()).then(std::time::Instant::now);
            let mut completed = false;
            let mut broker_gone = false;
            let stalled = tokio::select! {
                r = self.stream.readable() => { r?; false }
                r = self.stream.writable(), if want_write => { r?; false }
                g = fds.completion.readable(), if armed => { g?.clear_ready(); completed = true; false }
                g = fds.control.readable() => {
                    // Readable also when a control call of another task got its reply.
                    let mut g = g?;
                    broker_gone = g.ready().is_read_closed();
                    if !broker_gone {
                        g.clear_ready();
                    }
                    false
                }
                _ = alive.changed() => false,
                _ = ready.changed() => false,
                _ = sleep_until_opt(stall), if want_write => true,
            };
            if let (Some(t), true) = (asleep, completed) {
                poll = adapt_poll(poll, t.elapsed(), spin);
            }
            if armed {
                self.ring.disarm_completion_fd();
            }
            if broker_gone {
                return Err(nvmed_client::Error::BrokerGone.into());
            }
            if stalled {
                warn!(qid = self.qid, "host stopped reading for {io_timeout:?}: closing the queue");
                return Err(ConnError::Timeout("host not reading"));
            }
        }
    }

    /// Answers every command at nvmed with `status` (nvmed is gone: nothing of them will
    /// complete) and forgets what was not sent to it yet.
    fn fail_in_flight(&mut self, status: u16) {
        self.backlog.clear();
        for slot in 0..self.depth {
            let s = &mut self.slots[usize::from(slot)];
            if s.busy && s.pending > 0 {
                s.pending = 0;
                self.respond(slot, status);
            }
        }
    }

    /// Writes what is queued (for at most a second), before the queue closes.
    async fn flush(&mut self) {
        let _ = timeout(Duration::from_secs(1), async {
            while !self.tx.is_empty() {
                if self.write_some().is_err() || self.stream.writable().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    /// Sends a C2HTermReq after what is queued (never inside a half-sent PDU), then closes.
    async fn terminate(&mut self, e: &PduError) {
        nvmed_proto::log_limited!(warn, qid = self.qid, "terminating the connection: {e}");
        let mut out = Vec::new();
        pdu::push_term_req(&mut out, true, e.fes(), e.fei(), &self.hbuf[..self.hhave]);
        self.tx.push_bytes(|v| v.extend_from_slice(&out), None);
        let _ = timeout(Duration::from_secs(1), async {
            while !self.tx.is_empty() {
                if self.write_some().is_err() || self.stream.writable().await.is_err() {
                    return;
                }
            }
        })
        .await;
    }

    fn slot_at(&self, slot: u16) -> u64 {
        u64::from(slot) * u64::from(self.slot_size)
    }

    // ---- receiving ----

    fn read_some(&mut self) -> Result<(), ConnError> {
        self.staged.drained = false;
        for _ in 0..256 {
            match self.rx {
                Rx::Header => {
                    // Until the common header is known, ask for the shortest header a host sends
                    // here (24 bytes and its digest): an H2CData header then comes in one call.
                    let shortest = pdu::SHORT_HLEN + if self.dg.header { pdu::DIGEST_LEN } else { 0 };
                    let need = self.hlayout.map_or(shortest, |l| l.data_offset);
                    let n = match self.staged.read(&self.stream, &mut self.hbuf[self.hhave..need]) {
                        Ok(0) => return Err(ConnError::Closed),
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) => return Err(e.into()),
                    };
                    self.hhave += n;
                    if self.hlayout.is_none() && self.hhave >= pdu::COMMON_LEN {
                        let common = self.hbuf[..pdu::COMMON_LEN].try_into().unwrap();
                        self.hlayout = Some(pdu::check_common(
                            common,
                            Receiver::Controller,
                            Some(self.dg),
                            &self.limits,
                        )?);
                    }
                    if let Some(layout) = self.hlayout {
                        if layout.pdu_type == pdu::pdu_type::H2C_TERM_REQ {
                            // (Read past its header, maybe: it ends the connection anyway.)
                            let fes = u16::from_le_bytes([self.hbuf[8], self.hbuf[9]]);
                            if self.hhave >= 10 {
                                return Err(ConnError::HostTerminated(fes));
                            }
                        } else if self.hhave == layout.data_offset {
                            let header = pdu::decode_header(&self.hbuf[..self.hhave], &layout)?;
                            self.on_pdu(header, layout)?;
                            if matches!(self.rx, Rx::Header) {
                                self.hhave = 0;
                                self.hlayout = None;
                            }
                        }
                    }
                }
                Rx::Data { target, at, remaining, crc } => {
                    let dest: &mut [u8] = match target {
                        DataTarget::InCapsule { .. } | DataTarget::H2c { .. } => {
                            self.ring.buffer_mut(self.buf, at, u64::from(remaining))?
                        }
                        _ => {
                            let n = (remaining as usize).min(self.scratch.len());
                            &mut self.scratch[..n]
                        }
                    };
                    let n = match self.staged.read(&self.stream, dest) {
                        Ok(0) => return Err(ConnError::Closed),
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) => return Err(e.into()),
                    };
                    let crc = if self.dg.data { pdu::crc_append(crc, &dest[..n]) } else { 0 };
                    let remaining = remaining - n as u32;
                    if remaining > 0 {
                        self.rx = Rx::Data { target, at: at + n as u64, remaining, crc };
                    } else if self.dg.data && !matches!(target, DataTarget::TermReq { .. }) {
                        self.rx = Rx::Digest { target, have: 0, buf: [0; 4], crc };
                    } else {
                        self.data_done(target, true)?;
                    }
                }
                Rx::Digest { target, mut have, mut buf, crc } => {
                    let n = match self.staged.read(&self.stream, &mut buf[have..]) {
                        Ok(0) => return Err(ConnError::Closed),
                        Ok(n) => n,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                        Err(e) => return Err(e.into()),
                    };
                    have += n;
                    if have < 4 {
                        self.rx = Rx::Digest { target, have, buf, crc };
                    } else {
                        let ok = u32::from_le_bytes(buf) == crc;
                        if !ok {
                            nvmed_proto::log_limited!(
                                warn,
                                qid = self.qid,
                                "data digest mismatch: the command fails with a transient transport error"
                            );
                        }
                        self.data_done(target, ok)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Data of the current PDU fully received (digest checked).
    fn data_done(&mut self, target: DataTarget, digest_ok: bool) -> Result<(), ConnError> {
        self.rx = Rx::Header;
        self.hhave = 0;
        self.hlayout = None;
        match target {
            DataTarget::InCapsule { slot } => {
                let s = &mut self.slots[usize::from(slot)];
                s.received = s.len;
                if digest_ok {
                    self.execute(slot)?;
                } else {
                    self.respond(slot, sc::TRANSIENT_TRANSPORT);
                }
            }
            DataTarget::H2c { slot, len } => {
                let s = &mut self.slots[usize::from(slot)];
                let r2t_done = s.received + len == r2t_end(s.received, s.len);
                s.received += len;
                s.digest_bad |= !digest_ok;
                if s.received == s.len {
                    s.awaiting_h2c = false;
                    if s.digest_bad {
                        self.respond(slot, sc::TRANSIENT_TRANSPORT);
                    } else {
                        self.execute(slot)?;
                    }
                } else if r2t_done {
                    self.request_data(slot); // the next R2T, from where this one ended
                }
            }
            DataTarget::Discard { slot: Some(slot) } => {
                let status = self.slots[usize::from(slot)].status;
                self.respond(slot, status);
            }
            DataTarget::Discard { slot: None } => {}
            DataTarget::TermReq { fes } => return Err(ConnError::HostTerminated(fes)),
        }
        Ok(())
    }

    fn start_data(&mut self, target: DataTarget, at: u64, len: usize) -> Result<(), ConnError> {
        if len == 0 {
            return self.data_done(target, true);
        }
        self.rx = Rx::Data { target, at, remaining: len as u32, crc: 0 };
        Ok(())
    }

    fn on_pdu(&mut self, header: Header, layout: Layout) -> Result<(), ConnError> {
        match header {
            Header::CapsuleCmd(c) => self.on_command(c.cmd, layout),
            Header::H2cData(d) => self.on_h2c(d),
            Header::H2cTermReq(t) => {
                self.start_data(DataTarget::TermReq { fes: t.fes.get() }, 0, layout.data_len)
            }
            _ => Err(PduError::Sequence("unexpected PDU on an I/O queue").into()),
        }
    }

    fn on_h2c(&mut self, d: DataPdu) -> Result<(), ConnError> {
        let slot = d.ttag.get();
        let s = self.slots.get(usize::from(slot)).copied().unwrap_or_default();
        if !s.busy || !s.awaiting_h2c {
            return Err(PduError::HeaderField { offset: 10, what: "H2CData for no outstanding R2T" }.into());
        }
        if s.cid != d.cccid.get() {
            return Err(PduError::HeaderField {
                offset: 8,
                what: "H2CData command id does not match the R2T",
            }
            .into());
        }
        let (datao, datal) = (d.datao.get(), d.datal.get());
        if datao != s.received {
            return Err(PduError::DataOutOfRange("H2CData offset is not where the last one ended").into());
        }
        if u64::from(datao) + u64::from(datal) > u64::from(s.len) {
            return Err(PduError::DataOutOfRange("H2CData beyond the command's length").into());
        }
        if u64::from(datao) + u64::from(datal) > u64::from(r2t_end(s.received, s.len)) {
            return Err(PduError::DataOutOfRange("H2CData beyond the R2T it answers").into());
        }
        let at = self.slot_at(slot) + u64::from(datao);
        self.start_data(DataTarget::H2c { slot, len: datal }, at, datal as usize)
    }

    fn on_command(&mut self, cmd: NvmeCmd, layout: Layout) -> Result<(), ConnError> {
        self.sqhd = (self.sqhd + 1) % self.depth;
        let cid = cmd.cid.get();
        if self.cids.contains_key(&cid) {
            return Err(PduError::HeaderField { offset: 10, what: "command id already in use" }.into());
        }
        // Every command holds a slot until its answer is written, fabrics ones too: a host
        // that sends and never reads cannot make the queue hold more than its depth in answers.
        let Some(slot) = self.free.pop() else {
            return Err(PduError::Sequence("more commands outstanding than the queue size").into());
        };
        self.cids.insert(cid, slot);
        self.slots[usize::from(slot)] = Slot { busy: true, cid, ..Slot::default() };
        if cmd.opcode == admin_op::FABRICS {
            let status = if cmd.nsid.get() as u8 != fctype::DISCONNECT {
                sc::INVALID_OPCODE | sc::DNR
            } else if layout.data_len > 0 {
                // Disconnect carries no data.
                sc::INVALID_FIELD | sc::DNR
            } else if self.disconnect.is_none() {
                // Answered once every other command is (see `serve`); the queue then closes.
                self.disconnect = Some(slot);
                return Ok(());
            } else {
                sc::CMD_SEQ_ERROR | sc::DNR // a second Disconnect
            };
            self.slots[usize::from(slot)].status = status;
            return if layout.data_len > 0 {
                self.start_data(DataTarget::Discard { slot: Some(slot) }, 0, layout.data_len)
            } else {
                self.respond(slot, status);
                Ok(())
            };
        }
        match self.plan(&cmd, layout.data_len, slot) {
            Err(status) => {
                self.slots[usize::from(slot)].status = status;
                if layout.data_len > 0 {
                    self.start_data(DataTarget::Discard { slot: Some(slot) }, 0, layout.data_len)
                } else {
                    self.respond(slot, status);
                    Ok(())
                }
            }
            Ok(()) => {
                let s = self.slots[usize::from(slot)];
                let host_data = matches!(s.kind, Kind::Write | Kind::Dsm { .. });
                if host_data && layout.data_len > 0 {
                    self.start_data(DataTarget::InCapsule { slot }, self.slot_at(slot), layout.data_len)
                } else if host_data {
                    self.slots[usize::from(slot)].awaiting_h2c = true;
                    self.request_data(slot);
                    Ok(())
                } else {
                    self.execute(slot)
                }
            }
        }
    }

    /// Checks a command and fills its slot; `Err(status)` to refuse it.
    fn plan(&mut self, cmd: &NvmeCmd, in_capsule: usize, slot: u16) -> Result<(), u16> {
        let nsid = cmd.nsid.get();
        let op = cmd.opcode;
        if !matches!(op, io_op::FLUSH | io_op::WRITE | io_op::READ | io_op::WRITE_ZEROES | io_op::DSM) {
            return Err(sc::INVALID_OPCODE | sc::DNR);
        }
        let s = &mut self.slots[usize::from(slot)];
        s.nsid = nsid;
        if op == io_op::FLUSH && nsid == 0xffff_ffff {
            s.kind = Kind::Flush;
            return if in_capsule > 0 { Err(sc::INVALID_FIELD | sc::DNR) } else { Ok(()) };
        }
        let ns = self.ns.iter().find(|n| n.nsid == nsid).ok_or(sc::INVALID_NS | sc::DNR)?;
        s.lba_size = ns.lba_size;
        s.lba_count = ns.lba_count;
        let slba = u64::from(cmd.cdw(10)) | (u64::from(cmd.cdw(11)) << 32);
        let nlb = u64::from(cmd.cdw(12) & 0xffff) + 1;
        s.fua = cmd.cdw(12) & (1 << 30) != 0;
        let sgl_type = cmd.sgl_type;
        let sgl_len = cmd.sgl_len.get();
        let host_data = |len: u32| -> Result<(), u16> {
            if in_capsule > 0 {
                if sgl_type != pdu::sgl::IN_CAPSULE {
                    return Err(sc::SGL_INVALID_TYPE | sc::DNR);
                }
                if cmd.sgl_addr.get() != 0 {
                    return Err(sc::SGL_INVALID_OFFSET | sc::DNR);
                }
                if sgl_len != len || in_capsule != len as usize {
                    return Err(sc::SGL_INVALID_DATA_LEN | sc::DNR);
                }
            } else {
                if sgl_type != pdu::sgl::TRANSPORT {
                    return Err(sc::SGL_INVALID_TYPE | sc::DNR);
                }
                if sgl_len != len {
                    return Err(sc::SGL_INVALID_DATA_LEN | sc::DNR);
                }
            }
            Ok(())
        };
        // `moves_data`: the command's data passes through its slot, so MDTS bounds it (it does
        // not bound Write Zeroes: Linux 5.4 to 5.12 send one block more than MDTS).
        let range = |s: &mut Slot, moves_data: bool| -> Result<u32, u16> {
            if slba.checked_add(nlb).is_none_or(|end| end > ns.lba_count) {
                return Err(sc::LBA_RANGE | sc::DNR);
            }
            let len = nlb * u64::from(ns.lba_size);
            if moves_data && len > u64::from(self.slot_size) {
                return Err(sc::INVALID_FIELD | sc::DNR);
            }
            s.offset = slba * u64::from(ns.lba_size);
            s.len = len as u32;
            Ok(len as u32)
        };
        match op {
            io_op::FLUSH => {
                s.kind = Kind::Flush;
                if in_capsule > 0 {
                    return Err(sc::INVALID_FIELD | sc::DNR);
                }
            }
            io_op::READ => {
                s.kind = Kind::Read;
                let len = range(s, true)?;
                if in_capsule > 0 || sgl_type != pdu::sgl::TRANSPORT {
                    return Err(sc::SGL_INVALID_TYPE | sc::DNR);
                }
                if sgl_len != len {
                    return Err(sc::SGL_INVALID_DATA_LEN | sc::DNR);
                }
            }
            io_op::WRITE => {
                s.kind = Kind::Write;
                if ns.read_only {
                    return Err(sc::NS_WRITE_PROTECTED | sc::DNR);
                }
                let len = range(s, true)?;
                host_data(len)?;
            }
            io_op::WRITE_ZEROES => {
                s.kind = Kind::WriteZeroes;
                if ns.read_only {
                    return Err(sc::NS_WRITE_PROTECTED | sc::DNR);
                }
                range(s, false)?;
                if in_capsule > 0 {
                    return Err(sc::INVALID_FIELD | sc::DNR);
                }
            }
            _ => {
                let ranges = (cmd.cdw(10) & 0xff) + 1;
                let deallocate = cmd.cdw(11) & (1 << 2) != 0;
                s.kind = Kind::Dsm { ranges, deallocate };
                if deallocate && ns.read_only {
                    return Err(sc::NS_WRITE_PROTECTED | sc::DNR);
                }
                // The host may send more than the ranges (a whole page, say): up to 4 KiB.
                if sgl_len < ranges * 16 || sgl_len > 4096 {
                    return Err(sc::SGL_INVALID_DATA_LEN | sc::DNR);
                }
                s.len = sgl_len;
                host_data(sgl_len)?;
            }
        }
        Ok(())
    }

    // ---- executing ----

    fn submit_io(&mut self, io: Io) -> Result<(), ConnError> {
        if self.backlog.is_empty() {
            match self.ring.prep(io) {
                Ok(()) => return Ok(()),
                Err(nvmed_client::Error::SqFull) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.backlog.push_back(io);
        Ok(())
    }

    fn execute(&mut self, slot: u16) -> Result<(), ConnError> {
        let s = self.slots[usize::from(slot)];
        let (buf, at, ud) = (self.buf, self.slot_at(slot), u64::from(slot));
        let mut ios: Vec<Io> = Vec::new();
        match s.kind {
            Kind::Read => ios.push(Io::read(s.nsid, s.offset, s.len, buf, at)),
            Kind::Write => {
                let io = Io::write(s.nsid, s.offset, s.len, buf, at);
                ios.push(if s.fua { io.fua() } else { io });
            }
            Kind::Flush if s.nsid == 0xffff_ffff => ios.extend(self.ns.iter().map(|n| Io::flush(n.nsid))),
            Kind::Flush => ios.push(Io::flush(s.nsid)),
            Kind::WriteZeroes => {
                let io = Io::write_zeroes(s.nsid, s.offset, s.len);
                ios.push(if s.fua { io.fua() } else { io });
            }
            Kind::Dsm { ranges, deallocate } => {
                if deallocate {
                    // Copied out of the buffer once (the host's data), then checked.
                    let list = self.ring.buffer(buf, at, u64::from(ranges) * 16)?.to_vec();
                    let mut lbas: Vec<(u64, u64)> = Vec::with_capacity(list.len() / 16);
                    for r in list.chunks_exact(16) {
                        let nlb = u64::from(u32::from_le_bytes(r[4..8].try_into().unwrap()));
                        let slba = u64::from_le_bytes(r[8..16].try_into().unwrap());
                        if nlb == 0 {
                            continue;
                        }
                        if slba.checked_add(nlb).is_none_or(|end| end > s.lba_count) {
                            self.respond(slot, sc::LBA_RANGE | sc::DNR);
                            return Ok(());
                        }
                        lbas.push((slba, slba + nlb));
                    }
                    ios.extend(deallocate_ios(s.nsid, s.lba_size, &mut lbas));
                }
            }
        }
        if ios.is_empty() {
            self.respond(slot, sc::SUCCESS);
            return Ok(());
        }
        self.slots[usize::from(slot)].pending = ios.len() as u32;
        for io in ios {
            self.submit_io(io.user_data(ud))?;
        }
        Ok(())
    }

    /// Submits, reaps and refills until nothing moves.
    /// Returns how many completions it handled.
    fn pump(&mut self) -> Result<usize, ConnError> {
        let mut handled = 0;
        loop {
            self.ring.submit()?;
            let mut comps = std::mem::take(&mut self.comps);
            let n = self.ring.poll(&mut comps)?;
            self.comps = comps;
            self.handle_completions()?;
            handled += n;
            let mut moved = false;
            while let Some(io) = self.backlog.front().copied() {
                match self.ring.prep(io) {
                    Ok(()) => {
                        self.backlog.pop_front();
                        moved = true;
                    }
                    Err(nvmed_client::Error::SqFull) => break,
                    Err(e) => return Err(e.into()),
                }
            }
            if n == 0 && !moved {
                return Ok(handled);
            }
        }
    }

    fn handle_completions(&mut self) -> Result<(), ConnError> {
        let comps = std::mem::take(&mut self.comps);
        for c in &comps {
            self.on_completion(c)?;
        }
        self.comps = comps;
        self.comps.clear();
        Ok(())
    }

    fn on_completion(&mut self, c: &Completion) -> Result<(), ConnError> {
        let slot = c.user_data as u16;
        let s = self.slots[usize::from(slot)];
        let unsupported = c.status == Status::Broker(BrokerStatus::InvalidOpcode);
        let mut pending = s.pending - 1;
        let mut status = s.status;
        let zero_more = s.zero_fallback && c.status == Status::Success && s.zeroed < s.len;
        if (unsupported && s.kind == Kind::WriteZeroes && !s.zero_fallback) || zero_more {
            // The device has no Write Zeroes: write the zeroed slot over the range instead (Write
            // Zeroes is not bound by MDTS), one piece at a time, the next when one completes (a
            // host's 64-byte command must not queue thousands of writes at once).
            let at = self.slot_at(slot);
            let chunk = s.len.min(self.slot_size);
            if !s.zero_fallback {
                self.ring.buffer_mut(self.buf, at, u64::from(chunk))?.fill(0);
            }
            let n = chunk.min(s.len - s.zeroed);
            let io =
                Io::write(s.nsid, s.offset + u64::from(s.zeroed), n, self.buf, at).user_data(u64::from(slot));
            let sl = &mut self.slots[usize::from(slot)];
            sl.zero_fallback = true;
            sl.zeroed += n;
            pending += 1;
            self.submit_io(if s.fua { io.fua() } else { io })?;
        } else if unsupported && matches!(s.kind, Kind::Dsm { .. }) {
            // Deallocate is advisory.
        } else if c.status != Status::Success && status == sc::SUCCESS {
            status = map_status(c.status);
            debug!(qid = self.qid, cid = s.cid, ?c.status, "command failed");
        }
        let sl = &mut self.slots[usize::from(slot)];
        sl.pending = pending;
        sl.status = status;
        if pending == 0 {
            if status == sc::SUCCESS && s.kind == Kind::Read {
                let at = self.slot_at(slot);
                let (dg, hpda, cid, len) = (self.dg, self.hpda, s.cid, s.len);
                self.push_bytes(|out| pdu::push_data_header(out, dg, hpda, true, cid, 0, 0, len, true));
                self.tx.push_data(at, len);
                if dg.data {
                    let crc = pdu::crc(self.ring.buffer(self.buf, at, u64::from(len))?);
                    self.tx.push_bytes(|v| v.extend_from_slice(&crc.to_le_bytes()), None);
                }
            }
            self.respond(slot, status);
        }
        Ok(())
    }

    // ---- sending ----

    fn push_bytes(&mut self, f: impl FnOnce(&mut Vec<u8>)) {
        self.tx.push_bytes(f, None);
    }

    /// Sends the R2T for the write data of `slot` from what it received so far: R2Ts of at most
    /// MAXH2CDATA, one after the other (a host that answers an R2T with one H2CData PDU, as
    /// Linux before 5.16, stays within MAXH2CDATA).
    fn request_data(&mut self, slot: u16) {
        let s = self.slots[usize::from(slot)];
        let (dg, at) = (self.dg, s.received);
        let len = r2t_end(at, s.len) - at;
        self.push_bytes(|out| pdu::push_r2t(out, dg, s.cid, slot, at, len));
    }

    /// Answers the command in `slot` and frees the slot once the answer is written.
    fn respond(&mut self, slot: u16, status: u16) {
        let cid = self.slots[usize::from(slot)].cid;
        let (dg, c) = (self.dg, cqe(cid, status, 0, self.sqhd, self.qid));
        self.tx.push_bytes(|out| pdu::push_capsule_resp(out, dg, c), Some(slot));
    }

    fn write_some(&mut self) -> Result<(), ConnError> {
        loop {
            if self.tx.is_empty() {
                self.stall_since = None;
                return Ok(());
            }
            // Everything queued in one writev.
            let mut iov: [IoSlice<'_>; MAX_IOV] = [IoSlice::new(&[]); MAX_IOV];
            let mut n = 0;
            for item in self.tx.iter() {
                if n == MAX_IOV {
                    break;
                }
                iov[n] = match item {
                    Tx::Bytes(v, sent) => IoSlice::new(&v[*sent..]),
                    Tx::Data { at, len, sent } => IoSlice::new(self.ring.buffer(
                        self.buf,
                        at + u64::from(*sent),
                        u64::from(len - sent),
                    )?),
                };
                n += 1;
            }
            let wrote = match self.stream.try_write_vectored(&iov[..n]) {
                Ok(0) => return Err(ConnError::Closed),
                Ok(w) => w,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e.into()),
            };
            self.stall_since = None;
            let (slots, cids, free) = (&mut self.slots, &mut self.cids, &mut self.free);
            self.tx.advance(wrote, |slot| free_slot(slots, cids, free, slot));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deallocate_ranges_are_merged_split_and_capped() {
        let pieces = |lbas: &mut [(u64, u64)]| -> Vec<(u64, u32)> {
            deallocate_ios(1, 512, lbas).map(|io| (io.offset, io.len)).collect()
        };
        // Overlapping and touching ranges become one; separate ones stay apart, in order.
        assert_eq!(
            pieces(&mut [(100, 200), (8, 16), (150, 300), (300, 310)]),
            [(4096, 4096), (51200, 107520)]
        );
        // A range longer than a chunk is split at chunk boundaries.
        let gib = 1 << 30;
        let lbas = (gib + 4096) / 512;
        assert_eq!(pieces(&mut [(0, lbas)]), [(0, gib as u32), (gib, 4096)]);
        // 256 ranges of a whole 1 TiB namespace: one merged range, its first 256 chunks only.
        let tib = (1u64 << 40) / 512;
        let mut all = vec![(0, tib); 256];
        let out = pieces(&mut all);
        assert_eq!(out.len(), MAX_DEALLOC_IOS);
        assert_eq!(out[255], (255 << 30, 1 << 30));
    }

    #[test]
    fn the_completion_poll_follows_how_long_completions_take() {
        let max = Duration::from_micros(50);
        let mut p = max;
        for want in [25, 12, 6, 0, 0] {
            p = adapt_poll(p, Duration::from_micros(400), max);
            assert_eq!(p.as_micros(), want, "slow completions: poll less");
        }
        for want in [5, 10, 20, 40, 50, 50] {
            p = adapt_poll(p, Duration::from_micros(30), max);
            assert_eq!(p.as_micros(), want, "quick ones: poll more");
        }
        assert_eq!(adapt_poll(Duration::ZERO, Duration::ZERO, Duration::ZERO), Duration::ZERO);
    }
}
