//! # nvmed-vhost
//!
//! A vhost-user-blk backend that serves one nvmed namespace to QEMU. It is an ordinary,
//! unprivileged nvmed client: guest RAM regions arrive from QEMU as memfds, the VM's nvmed
//! session registers each once (every virtqueue's ring uses it), and guest reads and writes
//! become nvmed requests that
//! name (guest RAM buffer, offset) so the device DMAs straight into guest memory.
//!
//! * [`config`]: virtio features and configuration space from the namespace.
//! * [`regions`]: guest physical address → (nvmed buffer, offset).
//! * [`request`]: descriptor chain → request, with every malformation refused.
//! * [`plan`]: request → nvmed requests (one plain or vectored request per read or write).
//! * [`worker`]: one virtqueue's engine and nvmed ring.
//! * [`inflight`]: the inflight region shared with QEMU, so a restarted backend resubmits
//!   what the previous one had in flight.
//! * [`backend`]: the vhost-user protocol (this crate's own request handler) and the queue
//!   threads.

pub mod backend;
pub mod config;
pub mod error;
pub mod inflight;
pub mod plan;
pub mod regions;
pub mod request;
pub mod worker;

use std::sync::atomic::Ordering;
use std::sync::Arc;

pub use error::{Error, RegionError};
use worker::QueueStats;

/// Sum of the per-queue counters, as printed on SIGUSR1 and at exit.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StatsSummary {
    /// Requests completed.
    pub requests: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// Data bytes of successful reads and writes (all moved by the device straight to or from
    /// guest RAM, except `bounced_bytes`).
    pub data_bytes: u64,
    /// Bytes nvmed bounced through its own memory (its sessions' `bounced_bytes`): segment
    /// layouts the controller could take neither as PRPs nor as SGLs.
    pub bounced_bytes: u64,
    /// Queue thread wakeups by a guest kick.
    pub kicks: u64,
    /// Queue thread wakeups by nvmed's completion doorbell.
    pub completion_wakeups: u64,
    /// Notifications (interrupts) sent to the guest.
    pub notifications: u64,
    /// Microseconds with at least one request taken and not yet used, summed over queues.
    pub busy_us: u64,
}

impl StatsSummary {
    /// Adds up queue counters.
    pub fn of(queues: &[Arc<QueueStats>]) -> Self {
        let mut s = Self::default();
        for q in queues {
            s.requests += q.requests.load(Ordering::Relaxed);
            s.errors += q.errors.load(Ordering::Relaxed);
            s.data_bytes += q.data_bytes.load(Ordering::Relaxed);
            s.bounced_bytes += q.bounced_bytes.load(Ordering::Relaxed);
            s.kicks += q.kicks.load(Ordering::Relaxed);
            s.completion_wakeups += q.completion_wakeups.load(Ordering::Relaxed);
            s.notifications += q.notifications.load(Ordering::Relaxed);
            s.busy_us += q.busy_us.load(Ordering::Relaxed);
        }
        s
    }
}

impl std::fmt::Display for StatsSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "nvmed-vhost stats: requests={} errors={} data_bytes={} bounced_bytes={} kicks={} \
             completion_wakeups={} notifications={} busy_us={}",
            self.requests,
            self.errors,
            self.data_bytes,
            self.bounced_bytes,
            self.kicks,
            self.completion_wakeups,
            self.notifications,
            self.busy_us
        )
    }
}
