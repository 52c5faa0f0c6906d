//! The controller manager: the admin queue, and controller resets coordinated across the I/O
//! threads.
//!
//! Each I/O thread owns its own I/O queue pair; only the admin queue is shared, behind a lock
//! that the data path never takes (queue creation and deletion, aborts, resets). A command that
//! times out is first aborted (NVMe Abort); if that fails, or the controller reports a fatal
//! status, the controller is reset, once, by the first thread that decides to: it stops the
//! device's DMA (Bus Master Enable off, then CC.EN=0), which stops every thread's queue at
//! once, brings the controller back, then advances the reset generation and wakes every thread.
//! Each thread, seeing a new generation, creates its queue again at the same addresses and sends
//! every command it had in flight again (see [`crate::nvme::IoQueue::restart`]): clients see
//! latency, not errors; only a command that has used up its tries fails, with `DeviceReset`.
//! A controller whose registers read as all ones is gone (surprise removal): everything fails
//! with `DeviceGone`. The generation is read once per polling round, a load of a line written
//! only by resets.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::io_thread::split::InFlight;
use crate::device::NvmeDevice;
use crate::nvme::{Controller, DriverError, IoQueue};

/// Where the controller stands after the last reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Working.
    Running,
    /// It could not be brought back, but it was seen to stop its DMA: commands fail with
    /// `DeviceFault`, and what was in flight may be reported finished.
    FailedStopped,
    /// It could not be confirmed to have stopped: commands it held never complete, and their
    /// sessions' buffers stay mapped.
    FailedRunning,
    /// It is gone (surprise removal, or VFIO asked for it back): commands fail with
    /// `DeviceGone`; it can no longer reach memory.
    Gone,
}

/// The controller, shared by its I/O threads.
pub struct ControllerShared {
    controller: Mutex<Controller>,
    device: Arc<dyn NvmeDevice>,
    /// Bumped after every reset (successful or not).
    generation: AtomicU64,
    state: AtomicU8,
    /// I/O queues the controller was asked for after a reset.
    io_queues: u16,
    /// The I/O threads' wakeup eventfds, set once they exist.
    wakes: OnceLock<Vec<Arc<OwnedFd>>>,
    /// I/O threads that have failed their commands at a gone controller and stopped using it.
    gone_acks: AtomicUsize,
    /// SMART reads held back after one that led to a reset (unanswered, a stuck admin queue or
    /// a fatal controller): until when, and the next pause (doubling), so health requests do
    /// not reset the controller at will.
    smart_pause: Mutex<(Option<Instant>, Duration)>,
}

/// The first pause of SMART reads after one that led to a reset; it doubles up to an hour.
const SMART_PAUSE: Duration = Duration::from_secs(60);

impl std::fmt::Debug for ControllerShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerShared").field("generation", &self.generation()).finish()
    }
}

impl ControllerShared {
    /// Shares `controller`, which has granted `io_queues` I/O queues.
    pub fn new(controller: Controller, io_queues: u16) -> Arc<Self> {
        Arc::new(Self {
            device: controller.device().clone(),
            controller: Mutex::new(controller),
            generation: AtomicU64::new(0),
            state: AtomicU8::new(DeviceState::Running as u8),
            io_queues,
            wakes: OnceLock::new(),
            gone_acks: AtomicUsize::new(0),
            smart_pause: Mutex::new((None, SMART_PAUSE)),
        })
    }

    /// Records the I/O threads' wakeup eventfds (once).
    pub fn set_wakes(&self, wakes: Vec<Arc<OwnedFd>>) {
        let _ = self.wakes.set(wakes);
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn NvmeDevice> {
        &self.device
    }

    /// The admin side, for the rare commands (never on the data path).
    pub fn lock(&self) -> MutexGuard<'_, Controller> {
        // A panic aborts the broker (panic = "abort"), so the lock is never poisoned in use.
        self.controller.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reset generation (see the module docs).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The controller's state after the last reset.
    pub fn state(&self) -> DeviceState {
        match self.state.load(Ordering::Acquire) {
            0 => DeviceState::Running,
            1 => DeviceState::FailedStopped,
            2 => DeviceState::FailedRunning,
            _ => DeviceState::Gone,
        }
    }

    /// Resets the controller unless another thread already did after generation `seen`.
    /// Returns once the new generation is published.
    pub fn reset(&self, seen: u64) {
        self.reset_locked(self.lock(), seen);
    }

    /// As [`ControllerShared::reset`], with the controller's lock already held (so nothing
    /// else uses the admin queue between the caller's finding and the reset).
    fn reset_locked(&self, mut ctrl: MutexGuard<'_, Controller>, seen: u64) {
        // A controller that stopped (its DMA did) but did not come back may be tried again (an
        // operator's reset); one that may still run, or is gone, is beyond help.
        let state = self.state();
        if self.generation.load(Ordering::Acquire) != seen
            || !matches!(state, DeviceState::Running | DeviceState::FailedStopped)
        {
            return; // someone reset it meanwhile (or it is beyond help)
        }
        if self.csts() == u32::MAX {
            drop(ctrl);
            return self.gone(seen);
        }
        let bus_master_off = self.device.set_bus_master(false);
        if let Err(e) = &bus_master_off {
            error!("clearing Bus Master Enable failed: {e}");
        }
        let reset = ctrl.reset();
        if let Err(e) = &reset {
            error!("controller reset failed: {e}");
        }
        let state = if reset.is_err() && bus_master_off.is_err() {
            error!(
                "cannot confirm that the controller stopped its DMA: its commands never complete, \
                 their sessions are faulted and their buffers stay pinned until nvmed exits"
            );
            DeviceState::FailedRunning
        } else {
            let restored = reset.and_then(|()| {
                self.device
                    .set_bus_master(true)
                    .map_err(|e| DriverError::Unsupported(format!("re-enabling Bus Master Enable: {e}")))?;
                ctrl.request_io_queues(self.io_queues)?;
                // What the I/O threads build commands from must still hold. A controller that
                // cannot say (its Identify failed) is served as before: its commands show
                // whether it works.
                match ctrl.identify_again() {
                    // An Identify unanswered or refused: its commands show whether it works.
                    Err(e @ (DriverError::Timeout { .. } | DriverError::CommandFailed { .. })) => {
                        warn!("could not identify the controller again after the reset: {e}; serving it as before");
                        Ok(())
                    }
                    r => r,
                }
            });
            match restored {
                Ok(()) => {
                    info!("controller reset; the I/O threads create their queues again");
                    DeviceState::Running
                }
                Err(e) => {
                    error!("the controller did not come back after a reset: {e}; failing all I/O");
                    DeviceState::FailedStopped
                }
            }
        };
        self.state.store(state as u8, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(ctrl);
        for w in self.wakes.get().into_iter().flatten() {
            nvmed_proto::eventfd::signal(w);
        }
    }

    /// The controller's status register (all ones: the device is gone).
    pub fn csts(&self) -> u32 {
        self.device.read32(crate::nvme::spec::REG_CSTS)
    }

    /// The controller's SMART / Health Information log. A controller that does not answer it in
    /// time (or whose admin queue is held by earlier commands that never completed) is reset,
    /// as Linux resets on an admin timeout: its admin queue works again afterwards, and the I/O
    /// threads send their commands again.
    ///
    /// After such a reset SMART reads pause (a minute, doubling up to an hour while they keep
    /// failing), so a log page the controller never answers does not stall every tenant's I/O
    /// with a reset at each health request. A controller found fatal is reset too (and the
    /// reads pause the same way), one found gone given up.
    pub fn smart_log(&self) -> Result<nvmed_proto::admin::SmartLog, DriverError> {
        let mut pause = self.smart_pause.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(left) = pause.0.and_then(|until| until.checked_duration_since(Instant::now())) {
            return Err(DriverError::AdminPaused(left.as_secs() + 1));
        }
        let mut ctrl = self.lock();
        let seen = self.generation();
        let r = ctrl.smart_log();
        match &r {
            Ok(_) => *pause = (None, SMART_PAUSE),
            Err(
                e @ (DriverError::Timeout { .. } | DriverError::AdminQueueStuck(_) | DriverError::Fatal(_)),
            ) => {
                error!("Get Log Page: {e}; resetting the controller");
                // Every reset a SMART read led to pauses the next ones, whatever the cause (any
                // client may ask for health: it must not reset every tenant's controller at
                // will). The I/O path still resets a controller that fails its commands.
                *pause = (Some(Instant::now() + pause.1), (pause.1 * 2).min(Duration::from_secs(3600)));
                drop(pause);
                self.reset_locked(ctrl, seen);
            }
            Err(DriverError::DeviceGone) => {
                drop(ctrl);
                self.gone(seen);
            }
            Err(_) => {}
        }
        r
    }

    /// Asks the controller to abort command `cid` of queue `qid`; returns whether it did.
    pub fn abort(&self, qid: u16, cid: u16) -> Result<bool, DriverError> {
        self.lock().abort(qid, cid)
    }

    /// The device is gone (unless already known, or reset since generation `seen`): stops
    /// what can be stopped, records it, advances the generation and wakes every thread.
    pub fn gone(&self, seen: u64) {
        let _ctrl = self.lock();
        if self.generation.load(Ordering::Acquire) != seen || self.state() == DeviceState::Gone {
            return;
        }
        // A device the platform asks back (or that read as all ones once, which a transient
        // error can also do) may still be alive with commands in its queues: stop it as far as
        // it can be stopped. Its commands fail only if its DMA is seen to stop (Bus Master
        // Enable cleared) or it is really off the bus (all ones still); otherwise they stay
        // outstanding and their buffers pinned, as for a controller that cannot be reset.
        let cc = self.device.read32(crate::nvme::spec::REG_CC);
        if cc != u32::MAX {
            self.device.write32(crate::nvme::spec::REG_CC, cc & !crate::nvme::spec::CC_EN);
        }
        let state = match self.device.set_bus_master(false) {
            Ok(()) => DeviceState::Gone,
            Err(_) if self.csts() == u32::MAX => DeviceState::Gone,
            Err(e) => {
                error!(
                    device = %self.device.name(),
                    "clearing Bus Master Enable of a controller being given up failed ({e}): its \
                     commands never complete and their buffers stay pinned until nvmed exits"
                );
                DeviceState::FailedRunning
            }
        };
        if state == DeviceState::Gone {
            error!(device = %self.device.name(), "the controller is gone; failing all of its I/O");
        }
        self.state.store(state as u8, Ordering::Release);
        self.generation.fetch_add(1, Ordering::AcqRel);
        drop(_ctrl);
        for w in self.wakes.get().into_iter().flatten() {
            nvmed_proto::eventfd::signal(w);
        }
    }

    /// An I/O thread has failed what it had at this gone controller and no longer uses it.
    pub fn ack_gone(&self) {
        self.gone_acks.fetch_add(1, Ordering::AcqRel);
    }

    /// Watches for the platform asking for the device back (a hot unplug), if it can: then the
    /// controller is gone for the broker ([`ControllerShared::gone`]), and once every I/O
    /// thread has stopped using it (or after 10 s), the device is released so the removal can
    /// complete. Ends when `stop` is set.
    pub fn watch_removal(
        self: &Arc<Self>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<Option<std::thread::JoinHandle<()>>> {
        if self.device.removal_fd().is_none() {
            return Ok(None);
        }
        let me = self.clone();
        std::thread::Builder::new()
            .name("nvmed-unplug".into())
            .spawn(move || me.removal_watch(&stop))
            .map(Some)
    }

    fn removal_watch(&self, stop: &AtomicBool) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        let Some(fd) = self.device.removal_fd() else { return };
        loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            if !matches!(poll(&mut fds, PollTimeout::from(500u16)), Ok(n) if n > 0) {
                continue;
            }
            nvmed_proto::eventfd::drain(fd);
            break;
        }
        error!(device = %self.device.name(), "the platform asks for the controller back (hot unplug)");
        self.gone(self.generation());
        let threads = self.wakes.get().map_or(0, Vec::len);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.gone_acks.load(Ordering::Acquire) < threads && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        // No admin command in progress either.
        let _admin = self.lock();
        self.device.release();
    }

    /// After a reset: creates an I/O thread's queue again at the same addresses (its commands
    /// are then sent again with [`IoQueue::restart`]).
    /// Returns the generation the queue was created in (read under the controller's lock: a
    /// reset another thread made just before is the one this queue lives in).
    pub fn recreate_queue(
        &self,
        queue: &mut IoQueue<InFlight>,
        vector: Option<u16>,
    ) -> Result<u64, DriverError> {
        let mut ctrl = self.lock();
        ctrl.recreate_io_queue(queue.queue_pair_mut(), vector)?;
        Ok(self.generation())
    }

    /// Creates I/O queue `qid` for an I/O thread.
    pub fn create_queue(
        &self,
        qid: u16,
        depth: u16,
        vector: Option<u16>,
    ) -> Result<IoQueue<InFlight>, DriverError> {
        let mut ctrl = self.lock();
        let qp = ctrl.create_io_queue(qid, depth, vector)?;
        IoQueue::new(qp, ctrl.device(), ctrl.iova_space()).map_err(Into::into)
    }

    /// Deletes an I/O thread's queue (at shutdown).
    pub fn delete_queue(&self, queue: IoQueue<InFlight>) -> Result<(), DriverError> {
        self.lock().delete_io_queue(queue.into_queue_pair())
    }
}
