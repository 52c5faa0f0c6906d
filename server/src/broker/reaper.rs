//! Releases drained buffers and rings off the I/O thread.
//!
//! Unmapping a registered buffer (VFIO_IOMMU_UNMAP_DMA of up to gigabytes, then munmap) takes
//! tens to hundreds of milliseconds; done on the polling thread it would stall every tenant, and
//! a client looping register/unregister could stall them forever. The I/O thread hands what it
//! no longer needs to this thread, which drops it. Only drained resources come here: the device
//! has no command left that uses them. Each item names its owner (a uid) and owners take turns,
//! so one tenant releasing many large buffers delays another's release by one item at most.

use std::collections::VecDeque;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::thread::JoinHandle;

use tracing::warn;

type Garbage = Box<dyn Send>;

/// What to drop, and whose it was (a uid): the reaper takes turns between owners.
struct Item {
    owner: u32,
    garbage: Garbage,
}

/// The handle the I/O thread disposes through.
#[derive(Debug, Clone)]
pub struct Reaper {
    tx: Sender<Item>,
}

impl Reaper {
    /// Starts the reaper thread; it ends when every handle is dropped and its queue is empty.
    pub fn start() -> std::io::Result<(Self, JoinHandle<()>)> {
        let (tx, rx) = channel::<Item>();
        let thread = std::thread::Builder::new().name("nvmed-reaper".into()).spawn(move || reap(rx))?;
        Ok((Self { tx }, thread))
    }

    /// Drops `what` (`owner`'s) on the reaper thread, then answers `reply` (if any).
    pub fn dispose_then_notify<T: Send + 'static>(
        &self,
        owner: u32,
        what: T,
        reply: Option<std::sync::mpsc::Sender<()>>,
    ) {
        // A tuple drops its fields in order: `what` first, then the notifier.
        self.dispose(owner, (what, Notify(reply)));
    }

    /// Drops `what` (`owner`'s) on the reaper thread (inline if that thread is gone).
    pub fn dispose<T: Send + 'static>(&self, owner: u32, what: T) {
        if let Err(e) = self.tx.send(Item { owner, garbage: Box::new(what) }) {
            warn!("reaper thread gone; releasing on the I/O thread");
            drop(e.0);
        }
    }
}

/// The reaper thread: drops what it is sent, one item per owner in turn, so that an owner
/// unmapping many large buffers (each unmap can take a tenth of a second) delays another's
/// release by at most one of its items, not by its whole queue.
fn reap(rx: Receiver<Item>) {
    // Owners with something queued, in turn order (few: a linear search is fine).
    let mut turns: VecDeque<(u32, VecDeque<Garbage>)> = VecDeque::new();
    fn queue(turns: &mut VecDeque<(u32, VecDeque<Garbage>)>, item: Item) {
        match turns.iter_mut().find(|(o, _)| *o == item.owner) {
            Some((_, q)) => q.push_back(item.garbage),
            None => turns.push_back((item.owner, VecDeque::from([item.garbage]))),
        }
    }
    loop {
        if turns.is_empty() {
            match rx.recv() {
                Ok(item) => queue(&mut turns, item),
                Err(_) => return, // every handle dropped, nothing left
            }
        }
        while let Ok(item) = rx.try_recv() {
            queue(&mut turns, item);
        }
        let Some((owner, mut q)) = turns.pop_front() else { continue };
        let garbage = q.pop_front();
        if !q.is_empty() {
            turns.push_back((owner, q));
        }
        drop(garbage);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Records its name when dropped, after waiting for `wait` (if any).
    struct Slow {
        name: &'static str,
        log: Arc<Mutex<Vec<&'static str>>>,
        wait: Option<Receiver<()>>,
    }

    impl Drop for Slow {
        fn drop(&mut self) {
            if let Some(w) = self.wait.take() {
                let _ = w.recv();
            }
            self.log.lock().unwrap().push(self.name);
        }
    }

    #[test]
    fn owners_take_turns_so_one_owners_queue_does_not_hold_up_another() {
        let (reaper, thread) = Reaper::start().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (go, wait) = channel();
        let slow = |name, wait| Slow { name, log: log.clone(), wait };
        // Uid 1's first release is under way (blocked) while it queues three more and uid 2
        // queues one.
        reaper.dispose(1, slow("a1", Some(wait)));
        for name in ["a2", "a3", "a4"] {
            reaper.dispose(1, slow(name, None));
        }
        let (tx, rx) = channel();
        reaper.dispose_then_notify(2, slow("b1", None), Some(tx));
        go.send(()).unwrap();
        rx.recv().unwrap();
        drop(reaper);
        thread.join().unwrap();
        // b1 waited for one more of uid 1's releases at most (none if it was queued before a1
        // was taken), not for all of them; each owner's come in order.
        let log = log.lock().unwrap().clone();
        assert!(log == ["a1", "b1", "a2", "a3", "a4"] || log == ["a1", "a2", "b1", "a3", "a4"], "{log:?}");
    }
}
