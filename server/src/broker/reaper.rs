//! Releases drained buffers and rings off the I/O thread.
//!
//! Unmapping a registered buffer (VFIO_IOMMU_UNMAP_DMA of up to gigabytes, then munmap) takes
//! tens to hundreds of milliseconds; done on the polling thread it would stall every tenant, and
//! a client looping register/unregister could stall them forever. The I/O thread hands what it
//! no longer needs to this thread, which drops it. Only drained resources come here: the device
//! has no command left that uses them.

use std::sync::mpsc::{channel, Sender};
use std::thread::JoinHandle;

use tracing::warn;

type Garbage = Box<dyn Send>;

/// The handle the I/O thread disposes through.
#[derive(Debug, Clone)]
pub struct Reaper {
    tx: Sender<Garbage>,
}

impl Reaper {
    /// Starts the reaper thread; it ends when every handle is dropped and its queue is empty.
    pub fn start() -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = channel::<Garbage>();
        let thread = std::thread::Builder::new().name("nvmed-reaper".into()).spawn(move || {
            for garbage in rx {
                drop(garbage);
            }
        })?;
        Ok((Self { tx }, thread))
    }

    /// Drops `what` on the reaper thread, then answers `reply` (if any).
    pub fn dispose_then_notify<T: Send + 'static>(
        &self,
        what: T,
        reply: Option<std::sync::mpsc::Sender<()>>,
    ) {
        // A tuple drops its fields in order: `what` first, then the notifier.
        self.dispose((what, Notify(reply)));
    }

    /// Drops `what` on the reaper thread (inline if that thread is gone).
    pub fn dispose<T: Send + 'static>(&self, what: T) {
        if let Err(e) = self.tx.send(Box::new(what)) {
            warn!("reaper thread gone; releasing on the I/O thread");
            drop(e.0);
        }
    }
}

/// Answers its channel when dropped.
struct Notify(Option<std::sync::mpsc::Sender<()>>);

impl Drop for Notify {
    fn drop(&mut self) {
        if let Some(reply) = self.0.take() {
            let _ = reply.send(());
        }
    }
}
