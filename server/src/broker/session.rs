//! Per-client state: the data-plane part owned by the I/O thread, and shared counters.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use nvmed_proto::layout::{RingLayout, BROKER_FAULTED, BROKER_FLAGS_OFFSET, CLIENT_CQ_WAITING, FAULT_OFFSET};
use nvmed_proto::ring::{completion_ring, submission_ring, Consumer, Producer, SharedRing};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::wakeup::{peer_flags, SharedFlags};
use nvmed_proto::{Cqe, RingFault, Sqe, Stats};
use slab::Slab;

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
}

/// Broker-wide data path counters, written by the I/O thread only.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct BrokerCounters {
    /// Bytes of vectored requests copied through bounce buffers.
    pub bounced_bytes: AtomicU64,
    /// Device commands sent with SGLs.
    pub sgl_commands: AtomicU64,
    /// Device commands of vectored requests sent with PRPs.
    pub vectored_prp_commands: AtomicU64,
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
        nvmed_proto::eventfd::signal(&self.complete_fd);
    }

    /// Publishes pushed CQEs and wakes the client if it sleeps.
    pub fn publish(&mut self) {
        self.dirty = false;
        self.cq.publish();
        if peer_flags(&SharedFlags::client(&self.mem)) & CLIENT_CQ_WAITING != 0 {
            nvmed_proto::eventfd::signal(&self.complete_fd);
        }
    }
}

/// A registered buffer and the commands using it.
pub struct BufferEntry {
    /// The buffer.
    pub buffer: RegisteredBuffer,
    /// Requests at the device that use it (a vectored request counts once per segment in it).
    pub in_flight: u32,
}

/// The I/O thread's view of one client.
pub struct Session {
    /// Session id (for logs).
    pub id: u64,
    /// What the client may reach.
    pub namespaces: Vec<NamespaceAccess>,
    /// The ring, once created.
    pub ring: Option<RingIo>,
    /// Registered buffers; the slab key is the buffer id.
    pub buffers: Slab<BufferEntry>,
    /// Requests taken and not completed (device commands, or pieces of them, outstanding).
    pub in_flight: u32,
    /// Device queue slots this session's commands occupy (bounded by the I/O thread's share).
    pub slots: u32,
    /// Pieces of a split request still waiting for device queue slots (or bounce buffers).
    pub partial: Option<Partial>,
    /// Vectored requests in flight (each holds one of the I/O thread's segment list slots).
    pub vectored: u32,
    /// The ring was faulted; no more SQEs are taken.
    pub faulted: bool,
    /// Set when the session ends: drain, then release and answer.
    pub closing: Option<Option<Sender<()>>>,
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
