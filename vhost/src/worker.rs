//! One virtqueue's request engine: its own ring of the VM's nvmed session (and segment list
//! slots), the guest RAM regions it uses (registered once for the VM, [`SharedRegions`]), the
//! requests it has in flight and those waiting for room. Nothing on the request path is shared
//! with another queue.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::BorrowedFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmed_client::{BrokerStatus, BufferId, Completion, NvmeRing, Stats, Status};
use slab::Slab;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::DiskGeometry;
use crate::error::RegionError;
use crate::inflight::QueueInflight;
use crate::plan::{self, ListPool, PlanError, LIST_SLOT_BYTES};
use crate::regions::{Region, RegionSpec, RegionTable, SharedRegions};
use crate::request::{self, scatter, walk_chain, Op, Parsed, S_IOERR, S_UNSUPP};

/// SQ entries of each queue's nvmed ring (a read or write is one nvmed request; a discard or
/// write zeroes at most a few).
pub const SQ_ENTRIES: u32 = 512;

/// Segment-list slots of each queue: vectored requests in flight at once (nvmed takes at most
/// 192 per session anyway; more wait for a slot, in order).
pub const LIST_SLOTS: u32 = 256;

/// Counters of one queue (read by the stats line and by tests).
#[derive(Debug, Default)]
pub struct QueueStats {
    /// virtio requests completed.
    pub requests: AtomicU64,
    /// Data bytes of successful reads and writes.
    pub data_bytes: AtomicU64,
    /// Bytes nvmed copied through its own bounce buffers for this queue's sessions (the
    /// sessions' `bounced_bytes`, as of the last [`Worker::refresh_stats`]; the backend itself
    /// copies no data).
    pub bounced_bytes: AtomicU64,
    /// Requests completed with an error status.
    pub errors: AtomicU64,
    /// Times the queue thread woke for a guest kick.
    pub kicks: AtomicU64,
    /// Times the queue thread woke for nvmed's completion doorbell.
    pub completion_wakeups: AtomicU64,
    /// Notifications (interrupts) sent to the guest.
    pub notifications: AtomicU64,
    /// Microseconds during which at least one request was taken from the virtqueue and not yet
    /// in the used ring (the queue's utilisation, as iostat's `%util`).
    pub busy_us: AtomicU64,
}

impl QueueStats {
    /// Adds `n` to counter `c` (only the queue's own thread writes its counters).
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Guest RAM regions of a memory table, checked, with their files.
pub type RegionFiles = Vec<(RegionSpec, Arc<File>)>;

/// Checks every region of a guest memory map (memfd, sealed, aligned) and describes it.
pub fn region_files<M: GuestMemoryBackend>(mem: &M) -> Result<RegionFiles, RegionError> {
    let mut out = Vec::new();
    for r in mem.iter() {
        let gpa = r.start_addr().0;
        let fo = r.file_offset().ok_or(RegionError::NoFile { gpa })?;
        let spec = RegionSpec::check(fo.file(), gpa, r.len(), fo.start())?;
        out.push((spec, fo.arc().clone()));
    }
    Ok(out)
}

#[derive(Debug)]
struct InFlight {
    head: u16,
    status_addr: u64,
    read: bool,
    data_len: u64,
    remaining: u32,
    status: u8,
    /// The segment-list slot the request holds until it completes.
    list_slot: Option<u32>,
}

/// A request parsed but waiting for SQ space or a list slot.
#[derive(Debug)]
struct Waiting {
    head: u16,
    status_addr: u64,
    op: Op,
}

/// What a call to [`Worker::run`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Used entries were added (the guest may need a notification).
    pub used: bool,
    /// Any request was taken or completed.
    pub any: bool,
}

/// The engine of one virtqueue.
#[derive(Debug)]
pub struct Worker {
    index: usize,
    ring: NvmeRing,
    geo: DiskGeometry,
    regions: RegionTable,
    /// The VM's guest RAM registered once for all queues.
    shared_regions: SharedRegions,
    retiring: Vec<BufferId>,
    lists: ListPool,
    /// `stats.bounced_bytes` when this session started (earlier sessions of the queue).
    bounced_base: u64,
    pending: Slab<InFlight>,
    backlog: VecDeque<Waiting>,
    completions: Vec<Completion>,
    descs: Vec<virtio_queue::desc::split::Descriptor>,
    stats: Arc<QueueStats>,
    wce: Arc<AtomicU8>,
    dead: bool,
    /// The ring was handed back to the frontend with requests still at nvmed (their drain
    /// timed out): what completes from now on is not written into guest memory (status byte,
    /// used ring) nor signalled; its inflight entries stay for the next connection to resubmit.
    abandoned: bool,
    /// [`Worker::arm`] asked nvmed to ring the completion doorbell, and no run or
    /// [`Worker::disarm`] has ended that since.
    armed: bool,
    /// Why the nvmed session is lost, noticed where the queue could not fail its requests yet
    /// (they are failed at the next run).
    lost: Option<nvmed_client::Error>,
    inflight: Option<QueueInflight>,
    resubmit: VecDeque<u16>,
    /// Requests taken from the virtqueue and not yet in the used ring.
    open: usize,
    /// The avail ring could not be read although its index said it had entries: nothing is
    /// taken from it until the ring starts again.
    ring_unusable: bool,
    /// Since when `open` is above zero.
    busy_since: Option<Instant>,
}

impl Worker {
    /// A worker for queue `index` on its own ring `ring` of the VM's nvmed session, whose guest
    /// RAM `regions` holds (registered once, shared by the queues). `wce` is the guest's write
    /// cache setting (0: write through, so writes use FUA).
    pub fn new(
        index: usize,
        mut ring: NvmeRing,
        regions: SharedRegions,
        geo: DiskGeometry,
        wce: Arc<AtomicU8>,
        stats: Arc<QueueStats>,
    ) -> Result<Self, nvmed_client::Error> {
        let lists = ring.alloc_buffer((u64::from(LIST_SLOTS) * LIST_SLOT_BYTES) as usize)?;
        let bounced_base = stats.bounced_bytes.load(Ordering::Relaxed);
        Ok(Self {
            index,
            ring,
            geo,
            regions: RegionTable::default(),
            shared_regions: regions,
            retiring: Vec::new(),
            lists: ListPool::new(lists, LIST_SLOTS),
            bounced_base,
            pending: Slab::new(),
            backlog: VecDeque::new(),
            // Room for a whole CQ: reaping never grows it (no allocation on the request path).
            completions: Vec::with_capacity(2 * SQ_ENTRIES as usize),
            descs: Vec::new(),
            stats,
            wce,
            dead: false,
            abandoned: false,
            armed: false,
            lost: None,
            inflight: None,
            resubmit: VecDeque::new(),
            open: 0,
            ring_unusable: false,
            busy_since: None,
        })
    }

    /// This queue's counters.
    pub fn stats(&self) -> Arc<QueueStats> {
        self.stats.clone()
    }

    /// Asks nvmed for this session's counters and updates `bounced_bytes` of the queue's stats
    /// from them (a control-socket round trip: called when a connection ends, when a signal
    /// asks for the stats line, and by tests).
    pub fn refresh_stats(&mut self) -> Result<Stats, nvmed_client::Error> {
        let s = self.ring.stats()?;
        // The session is the VM's, all queues': its bounced bytes are counted on queue 0 (the
        // stats line adds the queues up).
        if self.index == 0 {
            self.stats.bounced_bytes.store(self.bounced_base + s.bounced_bytes, Ordering::Relaxed);
        }
        Ok(s)
    }

    /// Segment-list slots in use.
    pub fn list_slots_in_use(&self) -> usize {
        self.lists.in_use()
    }

    /// Completions nvmed has published to this queue's ring and the queue has not taken yet.
    pub fn ready_completions(&mut self) -> usize {
        self.ring.ready_completions()
    }

    /// Requests submitted to nvmed and not finished, plus those waiting for room or for
    /// resubmission.
    pub fn busy(&self) -> usize {
        self.pending.len() + self.backlog.len() + self.resubmit.len()
    }

    /// The frontend has the ring back although requests are still at nvmed: from now on their
    /// completions touch neither the ring nor the guest's status bytes (see `abandoned`).
    pub fn abandon(&mut self) {
        self.abandoned = true;
        // Requests not at nvmed yet are not sent (their buffers are guest memory the frontend
        // owns again), nor are those waiting for resubmission read from the ring handed back:
        // their inflight entries stay for the next connection to resubmit.
        self.open = self.open.saturating_sub(self.backlog.len());
        self.backlog.clear();
        self.resubmit.clear();
    }

    /// Tracks this queue's requests in QEMU's inflight region from now on (SET_INFLIGHT_FD), or
    /// stops tracking. Only while the queue has nothing in flight.
    pub fn set_inflight(&mut self, tracker: Option<QueueInflight>) {
        debug_assert_eq!(self.busy(), 0);
        self.inflight = tracker;
        self.resubmit.clear();
    }

    /// Whether requests are tracked in an inflight region.
    pub fn tracks_inflight(&self) -> bool {
        self.inflight.is_some()
    }

    /// The ring starts (its kick fd arrived): with an inflight region, takes back the requests
    /// a previous backend process had taken and not put in the used ring, oldest first, and
    /// points the queue past them (`used idx + their number`: every request taken from the
    /// avail ring is either used or in flight). They are submitted again, before any new
    /// request, by the next [`Worker::run`]. Returns their number.
    pub fn start_ring<M: GuestMemoryBackend>(&mut self, q: &mut Queue, mem: &M) -> usize {
        self.ring_unusable = false;
        if self.busy() > 0 {
            // This process still has requests from before the ring stopped (nvmed did not
            // finish them within the drain timeout): they are its own, not to be taken again.
            tracing::warn!(
                queue = self.index,
                busy = self.busy(),
                "ring restarted with requests still in flight"
            );
            return 0;
        }
        let Some(t) = self.inflight.as_mut() else { return 0 };
        let used = match q.used_idx(mem, Ordering::Acquire) {
            Ok(u) => u.0,
            Err(e) => {
                tracing::error!(
                    queue = self.index,
                    "reading the used index to recover in-flight requests: {e}"
                );
                return 0;
            }
        };
        let mut heads = t.recover(used);
        // The region may describe a larger ring than this one (QEMU set its size): a head
        // outside this ring is no request of it.
        let all = heads.len();
        heads.retain(|&h| h < q.size());
        if heads.len() < all {
            tracing::warn!(
                queue = self.index,
                ignored = all - heads.len(),
                size = q.size(),
                "inflight heads outside the ring ignored"
            );
        }
        let next_avail = used.wrapping_add(heads.len() as u16);
        if next_avail != q.next_avail() {
            tracing::debug!(
                queue = self.index,
                vring_base = q.next_avail(),
                next_avail,
                "next avail index taken from the inflight region"
            );
        }
        q.set_next_used(used);
        q.set_next_avail(next_avail);
        if !heads.is_empty() {
            tracing::info!(
                queue = self.index,
                requests = heads.len(),
                "resubmitting requests a previous backend process had in flight"
            );
        }
        let n = heads.len();
        self.resubmit = heads.into();
        n
    }

    /// Guest RAM regions this queue's ring uses.
    pub fn regions(&self) -> &RegionTable {
        &self.regions
    }

    /// Buffers of removed regions still waiting for their I/O to finish.
    pub fn retiring(&self) -> &[BufferId] {
        &self.retiring
    }

    /// The nvmed completion doorbell, for the queue thread's epoll.
    pub fn completion_fd(&self) -> BorrowedFd<'_> {
        self.ring.completion_fd()
    }

    /// Which connection of the session the ring is on: it changes when the ring reconnects (then
    /// [`Worker::completion_fd`] and [`Worker::control_fd`] are new descriptors).
    pub fn connection_epoch(&self) -> u64 {
        self.ring.connection_epoch()
    }

    /// The nvmed control socket (readable or hung up when nvmed exits).
    pub fn control_fd(&self) -> BorrowedFd<'_> {
        self.ring.control_socket()
    }

    /// Makes the regions this queue uses match a new memory table: new regions are registered
    /// with the VM's session (once, by whichever queue comes first), and removed ones retired
    /// (let go as soon as none of this queue's I/O uses them; unregistered once no queue does).
    pub fn sync_memory(&mut self, wanted: &RegionFiles) -> Result<(), RegionError> {
        let specs: Vec<RegionSpec> = wanted.iter().map(|(s, _)| *s).collect();
        let (gone, new) = self.regions.diff(&specs);
        for r in &gone {
            self.shared_regions.forget(&r.spec);
        }
        self.retiring.extend(gone.iter().map(|r| r.buffer));
        for spec in new {
            let file = &wanted.iter().find(|(s, _)| *s == spec).expect("from wanted").1;
            let err = |source| RegionError::Register { gpa: spec.gpa, len: spec.len, source };
            let shared =
                self.shared_regions.get_or_register(&spec, file, &self.ring.session()).map_err(err)?;
            let buffer = self.ring.use_shared(&shared).map_err(err)?;
            tracing::debug!(
                queue = self.index,
                gpa = spec.gpa,
                len = spec.len,
                buffer = buffer.0,
                "registered guest RAM"
            );
            self.regions.insert(Region { spec, buffer });
        }
        self.unregister_retired();
        Ok(())
    }

    fn unregister_retired(&mut self) {
        let ring = &mut self.ring;
        let index = self.index;
        self.retiring.retain(|&id| match ring.release_shared(id) {
            Ok(_) => {
                tracing::debug!(queue = index, buffer = id.0, "unregistered removed guest RAM");
                false
            }
            Err(nvmed_client::Error::InFlight { .. }) => true,
            Err(e) => {
                tracing::warn!(queue = index, buffer = id.0, "unregistering removed guest RAM: {e}");
                false
            }
        });
    }

    /// Reaps completions, retries waiting requests, and takes new requests from the virtqueue.
    /// With `notify` it ends with guest notifications enabled (looping while requests keep
    /// arriving); without, it leaves them disabled (busy polling).
    /// `take_new`: whether the ring is enabled (SET_VRING_ENABLE): a disabled ring that is still
    /// started only completes and resubmits what it took; it takes no new request.
    pub fn run<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        notify: bool,
        take_new: bool,
    ) -> Progress {
        // Awake for any reason (a kick, a wakeup, a reconnect), the queue reaps by itself:
        // nvmed need not ring the doorbell for what it completes meanwhile (it would, once per
        // batch it publishes, and each ring would wake the thread again for nothing).
        self.end_armed_sleep();
        let mut p = Progress::default();
        self.reap(q, mem, &mut p);
        self.retry_backlog(q, mem, &mut p);
        // Requests a previous process took come first, in the order it took them.
        while self.backlog.is_empty() {
            let Some(head) = self.resubmit.pop_front() else { break };
            p.any = true;
            let truncated = request::collect(
                walk_chain(mem, GuestAddress(q.desc_table()), q.size(), head),
                &mut self.descs,
            );
            let parsed = request::parse(head, &self.descs, truncated, mem, &self.geo);
            self.start(parsed, q, mem, &mut p);
        }
        // A stopped ring (GET_VRING_BASE) or a disabled one takes nothing new; its requests
        // still complete.
        if self.backlog.is_empty() && !self.ring_unusable && q.ready() && take_new {
            // Passes in a row that took nothing although the avail index said there was more.
            let mut empty_passes = 0;
            loop {
                let before = q.next_avail();
                let _ = q.disable_notification(mem);
                while self.backlog.is_empty() {
                    let Some(chain) = q.pop_descriptor_chain(mem) else { break };
                    p.any = true;
                    let head = chain.head_index();
                    // Recorded before anything is done for it: a restarted backend finds it.
                    if let Some(t) = self.inflight.as_mut() {
                        if !t.begin(head) {
                            nvmed_proto::log_limited!(
                                warn,
                                queue = self.index,
                                head,
                                desc_num = t.desc_num(),
                                "head index outside the inflight region: not tracked"
                            );
                        }
                    }
                    let truncated = request::collect(chain, &mut self.descs);
                    let parsed = request::parse(head, &self.descs, truncated, mem, &self.geo);
                    self.start(parsed, q, mem, &mut p);
                }
                // Blocked on room: the completions that free it wake this queue again.
                if !notify || !self.backlog.is_empty() {
                    break;
                }
                match q.enable_notification(mem) {
                    // The ring is being stopped (GET_VRING_BASE): its requests wait for it.
                    Ok(true) if !q.ready() => break,
                    Ok(true) if q.next_avail() != before => empty_passes = 0,
                    // One such pass: a request arrived after the last pop looked. Two: the
                    // avail ring cannot be read (an index more than the queue size ahead, a
                    // ring outside guest RAM): nothing is taken from it until it starts again,
                    // instead of spinning on it.
                    Ok(true) if empty_passes == 0 => empty_passes = 1,
                    Ok(true) => {
                        tracing::error!(
                            queue = self.index,
                            next_avail = q.next_avail(),
                            "the avail ring's entries cannot be taken: the queue stops until the ring restarts"
                        );
                        self.ring_unusable = true;
                        break;
                    }
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(queue = self.index, "enabling notifications: {e}");
                        break;
                    }
                }
            }
        }
        if let Err(e) = self.ring.submit() {
            self.fail_all(q, mem, &e, &mut p);
        }
        p
    }

    /// Before the queue thread sleeps: asks nvmed to signal the completion doorbell if requests
    /// are in flight. Returns true when completions were already there (run again instead of
    /// sleeping).
    pub fn arm(&mut self) -> bool {
        if self.pending.is_empty() || self.dead {
            return false;
        }
        match self.ring.arm_completion_fd(&mut self.completions) {
            Ok(n) => {
                self.armed = n == 0;
                n > 0
            }
            Err(e) => {
                // Run again: that run fails every request (nothing more will complete).
                self.lost = Some(e);
                true
            }
        }
    }

    /// nvmed closed the session's control socket (it exited, or an operator ended the
    /// session): nothing in flight will complete; the next run fails every request.
    pub fn broker_gone(&mut self) {
        if !self.dead {
            self.lost.get_or_insert(nvmed_client::Error::BrokerGone);
        }
    }

    /// nvmed closed the session's control socket: connect to the broker again (a restarted
    /// nvmed), create the ring again and send again what was in flight. Afterwards the
    /// completion doorbell and the control socket are new: the queue thread registers them again.
    pub fn reconnect(&mut self) -> Result<(), nvmed_client::Error> {
        if self.dead {
            return Err(nvmed_client::Error::BrokerGone);
        }
        self.armed = false; // a new ring is not armed
        self.ring.reconnect(&mut self.completions).map(drop)
    }

    /// After the completion doorbell woke the queue thread: empties the doorbell and stops
    /// nvmed's wakeups, whether or not this thread still counts itself armed (nvmed may have
    /// rung after an arm that found completions, or after a run ended the sleep: a byte left
    /// there would keep a level-triggered epoll reporting the doorbell for good).
    pub fn disarm(&mut self) {
        self.armed = false;
        self.ring.disarm_completion_fd();
    }

    /// A run ends the sleep [`Worker::arm`] armed, if it did: nvmed stops ringing.
    fn end_armed_sleep(&mut self) {
        if std::mem::take(&mut self.armed) {
            self.ring.disarm_completion_fd();
        }
    }

    /// Waits (up to `timeout`) until every request taken from the queue has completed and is in
    /// the used ring: before the ring stops (GET_VRING_BASE), resets, or the frontend goes away.
    pub fn drain<M: GuestMemoryBackend>(&mut self, q: &mut Queue, mem: &M, timeout: Duration) -> Progress {
        let start = Instant::now();
        let mut p = Progress::default();
        while self.busy() > 0 {
            let r = self.run(q, mem, false, false);
            p.used |= r.used;
            p.any |= r.any;
            if self.pending.is_empty() {
                continue;
            }
            let Some(left) = timeout.checked_sub(start.elapsed()) else {
                tracing::error!(
                    queue = self.index,
                    in_flight = self.pending.len(),
                    "requests still in flight at nvmed after {timeout:?}"
                );
                break;
            };
            if let Err(e) = self.ring.wait(1, &mut self.completions, Some(left)) {
                if !matches!(e, nvmed_client::Error::Timeout) {
                    self.fail_all(q, mem, &e, &mut p);
                }
            }
        }
        p
    }

    /// Parsed request: answer at once, or plan and submit it.
    fn start<M: GuestMemoryBackend>(&mut self, parsed: Parsed, q: &mut Queue, mem: &M, p: &mut Progress) {
        if self.open == 0 {
            self.busy_since = Some(Instant::now());
        }
        self.open += 1;
        let Parsed { head, status, op } = parsed;
        let Some(status_addr) = status else {
            nvmed_proto::log_limited!(
                warn,
                queue = self.index,
                head,
                "request without a usable status byte: {:?}",
                op.err()
            );
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            self.put_used(q, mem, head, 0);
            p.used = true;
            return;
        };
        match op {
            Err((status, why)) => {
                tracing::debug!(queue = self.index, head, status, "refused request: {why}");
                self.complete(q, mem, head, status_addr, status, 1, p);
            }
            Ok(Op::GetId { segs }) => {
                let id = self.geo.serial();
                let n = scatter(mem, &segs, &id).unwrap_or(0);
                self.complete(q, mem, head, status_addr, 0, n as u32 + 1, p);
            }
            Ok(op) if self.dead => {
                let _ = op;
                self.complete(q, mem, head, status_addr, S_IOERR, 1, p);
            }
            Ok(op) => {
                let w = Waiting { head, status_addr, op };
                if let Err(w) = self.submit(w, q, mem, p) {
                    self.backlog.push_back(w);
                }
            }
        }
    }

    fn retry_backlog<M: GuestMemoryBackend>(&mut self, q: &mut Queue, mem: &M, p: &mut Progress) {
        while let Some(w) = self.backlog.pop_front() {
            if let Err(w) = self.submit(w, q, mem, p) {
                self.backlog.push_front(w);
                break;
            }
            p.any = true;
        }
    }

    /// Plans and submits; gives the request back when there is no room for it yet.
    fn submit<M: GuestMemoryBackend>(
        &mut self,
        w: Waiting,
        q: &mut Queue,
        mem: &M,
        p: &mut Progress,
    ) -> Result<(), Waiting> {
        if self.dead {
            self.complete(q, mem, w.head, w.status_addr, S_IOERR, 1, p);
            return Ok(());
        }
        let fua = self.wce.load(Ordering::Relaxed) == 0;
        let plan = match plan::build(&w.op, &self.geo, &self.regions, &mut self.lists, fua) {
            Ok(plan) => plan,
            Err(PlanError::Busy) => return Err(w),
            Err(PlanError::Status(s, why)) => {
                tracing::debug!(queue = self.index, head = w.head, "refused request: {why}");
                self.complete(q, mem, w.head, w.status_addr, s, 1, p);
                return Ok(());
            }
        };
        if plan.ios.len() > SQ_ENTRIES as usize {
            plan.release(&mut self.lists);
            self.complete(q, mem, w.head, w.status_addr, S_IOERR, 1, p);
            return Ok(());
        }
        if plan.ios.len() > self.ring.sq_space() {
            plan.release(&mut self.lists);
            return Err(w);
        }
        let read = matches!(w.op, Op::Read { .. });
        if let Some(slot) = plan.list_slot {
            // The vectored request's segment list, in the slot it holds until it completes.
            if let Err(e) =
                self.ring.write_segments(self.lists.buffer(), ListPool::offset(slot), &plan.segments)
            {
                tracing::error!(queue = self.index, "writing a segment list: {e}");
                plan.release(&mut self.lists);
                self.complete(q, mem, w.head, w.status_addr, S_IOERR, 1, p);
                return Ok(());
            }
        }
        if plan.ios.is_empty() {
            plan.release(&mut self.lists);
            let used = if read { w.op.data_len() as u32 + 1 } else { 1 };
            self.complete(q, mem, w.head, w.status_addr, 0, used, p);
            return Ok(());
        }
        let key = self.pending.insert(InFlight {
            head: w.head,
            status_addr: w.status_addr,
            read,
            data_len: w.op.data_len(),
            remaining: 0,
            status: 0,
            list_slot: plan.list_slot,
        });
        for &io in &plan.ios {
            match self.ring.prep(io.user_data(key as u64)) {
                Ok(()) => self.pending[key].remaining += 1,
                Err(e) => {
                    tracing::error!(queue = self.index, "queueing an nvmed request: {e}");
                    self.pending[key].status = S_IOERR;
                    break;
                }
            }
        }
        if self.pending[key].remaining == 0 {
            let f = self.pending.remove(key);
            release(&mut self.lists, f.list_slot);
            self.complete(q, mem, f.head, f.status_addr, S_IOERR, 1, p);
        }
        Ok(())
    }

    fn reap<M: GuestMemoryBackend>(&mut self, q: &mut Queue, mem: &M, p: &mut Progress) {
        if !self.dead {
            if let Err(e) = self.ring.poll(&mut self.completions) {
                self.fail_all(q, mem, &e, p);
                return;
            }
        }
        self.take_completions(q, mem, p);
        // The session is lost: what completed above is done; nothing else will complete.
        if let Some(e) = self.lost.take() {
            self.fail_all(q, mem, &e, p);
        }
    }

    fn take_completions<M: GuestMemoryBackend>(&mut self, q: &mut Queue, mem: &M, p: &mut Progress) {
        if self.completions.is_empty() {
            return;
        }
        p.any = true;
        let done = std::mem::take(&mut self.completions);
        for c in &done {
            let key = c.user_data as usize;
            let Some(f) = self.pending.get_mut(key) else {
                tracing::error!(queue = self.index, key, "completion for an unknown request");
                continue;
            };
            f.remaining -= 1;
            if !c.status.is_success() && f.status == 0 {
                tracing::debug!(queue = self.index, head = f.head, "nvmed request failed: {}", c.status);
                f.status = virtio_status(c.status);
            }
            if f.remaining == 0 {
                let f = self.pending.remove(key);
                self.finish(f, q, mem, p);
            }
        }
        self.completions = done;
        self.completions.clear();
        self.unregister_retired();
    }

    fn finish<M: GuestMemoryBackend>(&mut self, f: InFlight, q: &mut Queue, mem: &M, p: &mut Progress) {
        let status = f.status;
        if status == 0 {
            QueueStats::add(&self.stats.data_bytes, f.data_len);
        }
        release(&mut self.lists, f.list_slot);
        let used = if f.read && status == 0 { f.data_len as u32 + 1 } else { 1 };
        self.complete(q, mem, f.head, f.status_addr, status, used, p);
    }

    #[allow(clippy::too_many_arguments)]
    fn complete<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        head: u16,
        status_addr: u64,
        status: u8,
        used_len: u32,
        p: &mut Progress,
    ) {
        QueueStats::add(&self.stats.requests, 1);
        if status != 0 {
            QueueStats::add(&self.stats.errors, 1);
        }
        if self.abandoned {
            // Neither the status byte nor the used ring are this backend's to write any more.
            self.open = self.open.saturating_sub(1);
            return;
        }
        if let Err(e) = mem.write_obj(status, GuestAddress(status_addr)) {
            tracing::warn!(queue = self.index, head, "writing the status byte: {e}");
        }
        self.put_used(q, mem, head, used_len);
        p.used = true;
        p.any = true;
    }

    /// Puts a request in the used ring (a batch of one), tracked in the inflight region: linked
    /// as the last batch first, cleared once the used index is published.
    fn put_used<M: GuestMemoryBackend>(&mut self, q: &mut Queue, mem: &M, head: u16, used_len: u32) {
        self.open = self.open.saturating_sub(1);
        if self.open == 0 {
            if let Some(t) = self.busy_since.take() {
                QueueStats::add(&self.stats.busy_us, t.elapsed().as_micros() as u64);
            }
        }
        if let Some(t) = self.inflight.as_mut() {
            t.put_begin(head);
        }
        if let Err(e) = q.add_used(mem, head, used_len) {
            nvmed_proto::log_limited!(warn, queue = self.index, head, "add_used: {e}");
        }
        if let Some(t) = self.inflight.as_mut() {
            t.put_end(head, q.next_used());
        }
    }

    /// nvmed is gone or faulted this ring: nothing in flight will complete (the broker waited
    /// for or reset the device before letting go of the memory), so fail every request.
    fn fail_all<M: GuestMemoryBackend>(
        &mut self,
        q: &mut Queue,
        mem: &M,
        e: &nvmed_client::Error,
        p: &mut Progress,
    ) {
        if !self.dead {
            tracing::error!(
                queue = self.index,
                "nvmed session lost, failing every request of this queue: {e}"
            );
        }
        self.dead = true;
        self.completions.clear();
        let keys: Vec<usize> = self.pending.iter().map(|(k, _)| k).collect();
        for k in keys {
            let f = self.pending.remove(k);
            release(&mut self.lists, f.list_slot);
            self.complete(q, mem, f.head, f.status_addr, S_IOERR, 1, p);
        }
        while let Some(w) = self.backlog.pop_front() {
            self.complete(q, mem, w.head, w.status_addr, S_IOERR, 1, p);
        }
    }
}

/// Gives a finished request's segment-list slot back.
fn release(lists: &mut ListPool, slot: Option<u32>) {
    if let Some(slot) = slot {
        lists.free(slot);
    }
}

/// The virtio status for a failed nvmed request: UNSUPP when the device or broker does not
/// know the operation, IOERR otherwise.
pub fn virtio_status(s: Status) -> u8 {
    match s {
        Status::Success => 0,
        Status::Broker(BrokerStatus::InvalidOpcode) => S_UNSUPP,
        Status::Nvme(n) if n.sct == 0 && n.sc == 1 => S_UNSUPP,
        _ => S_IOERR,
    }
}
