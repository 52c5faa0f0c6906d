//! Per-client state: the data-plane part owned by the I/O thread, and shared counters.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use nvmed_proto::layout::{
    RingLayout, BROKER_FAULTED, BROKER_FLAGS_OFFSET, CLIENT_CQ_WAITING, CLIENT_CQ_WAKE_AT, FAULT_OFFSET,
};
use nvmed_proto::ring::{completion_ring, submission_ring, Consumer, Producer, SharedRing};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::wakeup::{wake_due, SharedFlags};
use nvmed_proto::{Cqe, RingFault, Sqe, Stats};

use super::buffer::RegisteredBuffer;
use super::io_thread::split::Partial;
use crate::policy::NamespaceAccess;

/// Counters of one session, written by the I/O thread, read by the control thread.
/// Aligned to its own cache lines so the I/O thread's writes never share a line with anything
/// another thread writes.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct SessionCounters {
    /// SQEs taken.
    pub submitted: AtomicU64,
    /// CQEs posted.
    pub completed: AtomicU64,
    /// CQEs with an error status.
    pub errors: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Commands at the device.
    pub in_flight: AtomicU64,
    /// Buffers registered.
    pub buffers: AtomicU64,
    /// Bytes registered.
    pub buffer_bytes: AtomicU64,
    /// Bytes of vectored requests copied through bounce buffers.
    pub bounced_bytes: AtomicU64,
    /// Completed device requests by latency, log2 microsecond buckets
    /// ([`nvmed_proto::admin::latency_bucket`]).
    pub latency_log2_us: [AtomicU64; nvmed_proto::admin::LATENCY_BUCKETS],
    /// Sum of their latencies, microseconds.
    pub latency_sum_us: AtomicU64,
    /// Time its requests waited for its tenant's rate limits (holds that ended), nanoseconds.
    pub throttled_ns: AtomicU64,
}

/// Data path counters of one I/O thread, written by that thread only (the broker's figures are
/// their sums).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct BrokerCounters {
    /// Device commands this thread's queue completed.
    pub device_commands: AtomicU64,
    /// Bytes of vectored requests copied through bounce buffers.
    pub bounced_bytes: AtomicU64,
    /// Device commands sent with SGLs.
    pub sgl_commands: AtomicU64,
    /// Device commands of vectored requests sent with PRPs.
    pub vectored_prp_commands: AtomicU64,
    /// NVMe Aborts sent for commands that timed out.
    pub aborts: AtomicU64,
    /// Device commands sent again (after a retryable status, or after a controller reset).
    pub retries: AtomicU64,
}

/// Adds to a counter that only one thread writes (no read-modify-write instruction needed).
pub fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl SessionCounters {
    /// Snapshot for a Stats reply.
    pub fn snapshot(&self) -> Stats {
        let l = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            submitted: l(&self.submitted),
            completed: l(&self.completed),
            errors: l(&self.errors),
            bytes_read: l(&self.bytes_read),
            bytes_written: l(&self.bytes_written),
            in_flight: l(&self.in_flight),
            buffers: l(&self.buffers),
            buffer_bytes: l(&self.buffer_bytes),
            bounced_bytes: l(&self.bounced_bytes),
            throttled_ns: l(&self.throttled_ns),
            ..Stats::default()
        }
    }
}

/// A ring as the broker uses it.
pub struct RingIo {
    /// The mapping (also referenced by `sq` and `cq`).
    pub mem: Arc<SharedMemory>,
    /// Submission side (broker consumes).
    pub sq: Consumer<SharedRing<Sqe>>,
    /// Completion side (broker produces).
    pub cq: Producer<SharedRing<Cqe>>,
    /// Client -> broker wakeups.
    pub submit_fd: OwnedFd,
    /// Broker -> client wakeups.
    pub complete_fd: OwnedFd,
    /// Completions that did not fit in the CQ (only if the client moved its head backwards).
    pub overflow: VecDeque<Cqe>,
    /// CQEs pushed this round and not yet published.
    pub dirty: bool,
}

impl RingIo {
    /// Wraps a freshly created ring mapping.
    pub fn new(
        mem: Arc<SharedMemory>,
        layout: &RingLayout,
        submit_fd: OwnedFd,
        complete_fd: OwnedFd,
    ) -> Self {
        Self {
            sq: Consumer::new(submission_ring(mem.clone(), layout), 0),
            cq: Producer::new(completion_ring(mem.clone(), layout), 0),
            mem,
            submit_fd,
            complete_fd,
            overflow: VecDeque::new(),
            dirty: false,
        }
    }

    /// Marks the ring faulted and wakes the client so it notices.
    pub fn fault(&self, why: RingFault) {
        // The reason first (Release), then the flag: a client that sees the flag (Acquire)
        // reads this reason, not an older one.
        self.mem.store_u32(FAULT_OFFSET, why as u32, Ordering::Release);
        self.mem.fetch_or_u32(BROKER_FLAGS_OFFSET, BROKER_FAULTED, Ordering::SeqCst);
        nvmed_proto::eventfd::ring_doorbell(&self.complete_fd);
    }

    /// Publishes pushed CQEs and wakes the client if it sleeps (and, when it named a wake
    /// index, once the CQ reaches it).
    pub fn publish(&mut self) {
        self.dirty = false;
        self.cq.publish();
        if wake_due(&SharedFlags::client(&self.mem), CLIENT_CQ_WAITING, CLIENT_CQ_WAKE_AT, self.cq.tail()) {
            nvmed_proto::eventfd::ring_doorbell(&self.complete_fd);
        }
    }
}

/// A registered buffer as one ring's I/O thread sees it, and the commands of that ring using it.
pub struct BufferEntry {
    /// The buffer (the session holds it too; every ring of the session may use it).
    pub buffer: Arc<RegisteredBuffer>,
    /// Requests of this ring at the device that use it (a vectored request counts once per
    /// segment in it).
    pub in_flight: u32,
    /// Set once the client unregistered it: no new request may use it; answered (and the entry
    /// dropped) when the last command using it is done.
    retired: bool,
    /// Answered when the last command using a retired buffer is done.
    waiter: Option<Sender<()>>,
}

/// One ring's view of its session's registered buffers, indexed by buffer id (ids are given by
/// the session, the same on every ring).
#[derive(Default)]
pub struct BufferTable {
    entries: Vec<Option<BufferEntry>>,
    /// Unregister requests whose buffer became unused, answered by [`BufferTable::send_ready`]
    /// once the completions that released it are published (a client sees them first).
    ready: Vec<Sender<()>>,
}

impl BufferTable {
    /// The buffer with this id, if requests may still use it (not being unregistered).
    pub fn lookup(&self, id: u32) -> Option<&BufferEntry> {
        self.get(id).filter(|b| !b.retired)
    }

    /// The buffer with this id, also while it is being unregistered (for commands in flight).
    pub fn get(&self, id: u32) -> Option<&BufferEntry> {
        self.entries.get(id as usize)?.as_ref()
    }

    /// Adds a buffer under the id its session gave it.
    pub fn insert(&mut self, id: u32, buffer: Arc<RegisteredBuffer>) {
        let i = id as usize;
        if self.entries.len() <= i {
            self.entries.resize_with(i + 1, || None);
        }
        self.entries[i] = Some(BufferEntry { buffer, in_flight: 0, retired: false, waiter: None });
    }

    /// One more command uses the buffer.
    pub fn acquire(&mut self, id: u32) {
        if let Some(Some(b)) = self.entries.get_mut(id as usize) {
            b.in_flight += 1;
        }
    }

    /// A command using the buffer is done; a buffer being unregistered goes once unused.
    pub fn release(&mut self, id: u32) {
        let Some(slot) = self.entries.get_mut(id as usize) else { return };
        let Some(b) = slot.as_mut() else { return };
        b.in_flight -= 1;
        if b.in_flight == 0 && b.retired {
            if let Some(reply) = slot.take().and_then(|b| b.waiter) {
                self.ready.push(reply);
            }
        }
    }

    /// Answers the unregister requests whose buffers became unused (call after publishing the
    /// completions that released them).
    pub fn send_ready(&mut self) {
        for reply in self.ready.drain(..) {
            let _ = reply.send(());
        }
    }

    /// No new request may use the buffer; `reply` is answered once no command of this ring
    /// uses it any more (at once if none does).
    pub fn retire(&mut self, id: u32, reply: Sender<()>) {
        let Some(slot) = self.entries.get_mut(id as usize) else {
            let _ = reply.send(());
            return;
        };
        match slot {
            Some(b) if b.in_flight > 0 => {
                b.retired = true;
                b.waiter = Some(reply);
            }
            _ => {
                *slot = None;
                let _ = reply.send(());
            }
        }
    }

    /// Answers the waiter of buffer `id` being unregistered, if any, although commands still
    /// use it (a failed device's: they never end; the entry, and the buffer, stay for good).
    pub fn give_up_retiring_one(&mut self, id: u32) {
        if let Some(Some(b)) = self.entries.get_mut(id as usize) {
            if let Some(reply) = b.waiter.take() {
                let _ = reply.send(());
            }
        }
    }

    /// Drops the buffers no command of this ring uses (a ring kept for a failed device's
    /// commands holds only what those use).
    pub fn drop_unused(&mut self) {
        self.send_ready();
        for slot in &mut self.entries {
            if slot.as_ref().is_some_and(|b| b.in_flight == 0) {
                if let Some(reply) = slot.take().and_then(|b| b.waiter) {
                    let _ = reply.send(());
                }
            }
        }
    }
}

/// One ring of a client's session, as the I/O thread serving it sees it.
pub struct Session {
    /// Session id (for logs).
    pub id: u64,
    /// The client's uid.
    pub uid: u32,
    /// Released by its client while a failed device may still execute its commands: kept (its
    /// key never reused, its buffers mapped), faulted, not polled.
    pub zombie: bool,
    /// What the client may reach.
    pub namespaces: Vec<NamespaceAccess>,
    /// The ring, once created.
    pub ring: Option<RingIo>,
    /// The session's registered buffers.
    pub buffers: BufferTable,
    /// Requests taken and not completed (device commands, or pieces of them, outstanding).
    pub in_flight: u32,
    /// Device queue slots this ring's commands occupy on each controller (each bounded by the
    /// ring's share of this thread's queue there).
    pub slots: Vec<u32>,
    /// Its tenant on each controller (by controller index), for the schedulers.
    pub tenants: Vec<Option<(super::tenant::TenantKey, super::sched::TenantId)>>,
    /// Pieces of a split request still waiting for device queue slots (or bounce buffers).
    pub partial: Option<Partial>,
    /// This ring's id in its session (for logs).
    pub ring_id: u32,
    /// Vectored requests in flight (each holds one of the I/O thread's segment list slots).
    pub vectored: u32,
    /// The ring was faulted; no more SQEs are taken.
    pub faulted: bool,
    /// Set when the session ends: drain, then release and answer.
    pub closing: Option<Option<Sender<()>>>,
    /// What the ring's fault word says once it is closed.
    pub close_fault: nvmed_proto::RingFault,
    /// Since when (schedulers' clock) its next request has been held by its tenant's rate
    /// limits; the hold ends, and counts in `counters.throttled_ns`, when a request goes.
    pub held_since: Option<u64>,
    /// The controller the ring's next entry waits for (a device slot, its tenant's turn, a
    /// segment-list slot), as found by the last submission round; `None` when that round took
    /// all it could. The I/O thread sleeps unless that controller could take it.
    pub blocked_on: Option<u16>,
    /// Whether that entry is a vectored request (it also needs a segment-list slot within its
    /// tenant's share there).
    pub blocked_vectored: bool,
    /// Counters.
    pub counters: Arc<SessionCounters>,
}

/// A value alone on its cache lines (128 bytes: adjacent-line prefetch pairs lines).
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct CachePadded<T>(pub T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
