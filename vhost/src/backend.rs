//! The vhost-user-blk device: vhost-user-backend drives the protocol and runs one worker
//! thread per virtqueue; each thread owns its queue's [`Worker`] (behind a mutex only the
//! vhost-user control thread ever contends for, on memory-table changes and ring stops).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringEpollHandler, VringMutex, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier};

use crate::config::{DiskGeometry, CONFIG_SIZE};
use crate::worker::{region_files, Worker};

/// Guest memory as vhost-user-backend keeps it (no dirty-page bitmap: no live migration).
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap>;
/// The per-queue vring type.
pub type Vring = VringMutex<GuestMem>;

/// Largest virtqueue size accepted.
pub const MAX_QUEUE_SIZE: usize = 1024;
/// How long a stopping ring waits for nvmed to finish its requests.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);
/// Offset of `wce` in the configuration space.
const WCE_OFFSET: u32 = 32;

struct QueueSlot {
    worker: Mutex<Worker>,
    vring: OnceLock<Vring>,
}

/// The device for one frontend connection.
pub struct BlkBackend {
    geo: DiskGeometry,
    queues: Vec<QueueSlot>,
    mem: GuestMem,
    wce: Arc<AtomicU8>,
    poll: Duration,
}

impl BlkBackend {
    /// A device over one worker per queue. `wce` must be the cell the workers read.
    pub fn new(
        geo: DiskGeometry,
        workers: Vec<Worker>,
        mem: GuestMem,
        wce: Arc<AtomicU8>,
        poll: Duration,
    ) -> Self {
        let queues = workers
            .into_iter()
            .map(|w| QueueSlot { worker: Mutex::new(w), vring: OnceLock::new() })
            .collect();
        Self { geo, queues, mem, wce, poll }
    }

    /// Event id of queue thread `i`'s nvmed completion eventfd (above the ids vhost-user-backend
    /// reserves for vrings and its exit event).
    pub fn completion_event(&self) -> u16 {
        self.geo.num_queues + 1
    }

    /// Puts each queue's nvmed completion eventfd into its thread's epoll.
    pub fn register_completion_fds(&self, handlers: &[Arc<VringEpollHandler<Arc<Self>>>]) -> io::Result<()> {
        for (slot, h) in self.queues.iter().zip(handlers) {
            let fd = lock(&slot.worker).completion_fd().as_raw_fd();
            h.register_listener(fd, EventSet::IN, u64::from(self.completion_event()))?;
        }
        Ok(())
    }

    /// Finishes every queue's requests (the frontend went away or reset the device).
    pub fn drain_all(&self) {
        for (i, slot) in self.queues.iter().enumerate() {
            self.drain(i, slot);
        }
    }

    fn drain(&self, index: usize, slot: &QueueSlot) {
        let mut w = lock(&slot.worker);
        if w.busy() == 0 {
            return;
        }
        let Some(vring) = slot.vring.get() else { return };
        let mem = self.mem.memory();
        tracing::debug!(queue = index, busy = w.busy(), "draining");
        let p = {
            let mut g = vring.get_mut();
            w.drain(g.get_queue_mut(), &*mem, DRAIN_TIMEOUT)
        };
        if p.used {
            notify(vring);
        }
    }

    fn run_queue(&self, w: &mut Worker, vring: &Vring) {
        let mem = self.mem.memory();
        loop {
            if !self.poll.is_zero() {
                // Busy-poll the virtqueue (guest notifications off) and nvmed's CQ.
                let mut deadline = Instant::now() + self.poll;
                loop {
                    let p = w.run(vring.get_mut().get_queue_mut(), &*mem, false);
                    if p.used {
                        notify(vring);
                    }
                    let now = Instant::now();
                    if p.any {
                        deadline = now + self.poll;
                    } else if now >= deadline {
                        break;
                    }
                    std::hint::spin_loop();
                }
            }
            let p = w.run(vring.get_mut().get_queue_mut(), &*mem, true);
            if p.used {
                notify(vring);
            }
            if !w.arm() {
                break;
            }
        }
    }
}

fn notify(vring: &Vring) {
    if vring.needs_notification().unwrap_or(true) {
        if let Err(e) = vring.signal_used_queue() {
            tracing::debug!("signalling the guest: {e}");
        }
    }
}

fn lock(m: &Mutex<Worker>) -> MutexGuard<'_, Worker> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        self.geo.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::RESET_DEVICE
    }

    fn reset_device(&self) {
        self.drain_all();
        self.wce.store(1, Ordering::Relaxed);
    }

    fn set_event_idx(&self, _enabled: bool) {
        // vhost-user-backend sets it on each vring's queue.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let space = self.geo.config_space(self.wce.load(Ordering::Relaxed));
        let mut out = vec![0u8; size as usize];
        let start = (offset as usize).min(CONFIG_SIZE);
        let end = (offset as usize).saturating_add(size as usize).min(CONFIG_SIZE);
        out[..end - start].copy_from_slice(&space[start..end]);
        out
    }

    fn set_config(&self, offset: u32, buf: &[u8]) -> io::Result<()> {
        // Only the write-cache setting is writable.
        if offset == WCE_OFFSET && buf.len() == 1 {
            tracing::info!(
                "guest set the write cache to {}",
                if buf[0] != 0 { "write back" } else { "write through" }
            );
            self.wce.store(u8::from(buf[0] != 0), Ordering::Relaxed);
            return Ok(());
        }
        Err(io::Error::other(format!(
            "config space write at {offset} ({} bytes) refused: only wce is writable",
            buf.len()
        )))
    }

    fn update_memory(&self, mem: GuestMem) -> io::Result<()> {
        let snapshot = mem.memory();
        let files = region_files(&*snapshot).map_err(|e| {
            tracing::error!("{e}");
            io::Error::other(e)
        })?;
        for (i, slot) in self.queues.iter().enumerate() {
            lock(&slot.worker).sync_memory(&files).map_err(|e| {
                tracing::error!(queue = i, "{e}");
                io::Error::other(e)
            })?;
        }
        tracing::info!(
            regions = files.len(),
            bytes = files.iter().map(|(s, _)| s.len).sum::<u64>(),
            "guest RAM registered with nvmed"
        );
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(slot) = self.queues.get(queue_index as usize) {
            self.drain(queue_index as usize, slot);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        let (Some(slot), Some(vring)) = (self.queues.get(thread_id), vrings.first()) else {
            return Ok(());
        };
        if evset != EventSet::IN {
            tracing::warn!(queue = thread_id, ?evset, "unexpected event");
        }
        let _ = slot.vring.set(vring.clone());
        let mut w = lock(&slot.worker);
        if device_event == self.completion_event() {
            w.disarm();
        }
        self.run_queue(&mut w, vring);
        Ok(())
    }
}
