//! The sleep/wake handshake, like io_uring's `IORING_SQ_NEED_WAKEUP`.
//!
//! A side that finds no work announces that it will sleep (sets its bit in a flags word), issues
//! a `SeqCst` fence, looks for work once more, and only then blocks on its eventfd. The other
//! side publishes its entries, issues a `SeqCst` fence, and reads the flags word: if the bit is
//! set, it writes the eventfd. The two fences make it impossible for both to miss each other (a
//! store-buffer/Dekker pattern), so no wakeup is lost and a busy peer makes no system call.
//! `tests/loom_ring.rs` checks this with loom, and checks that it fails without the fences.

#[cfg(not(loom))]
use core::sync::atomic::fence;
use core::sync::atomic::Ordering;

#[cfg(loom)]
use loom::sync::atomic::fence;

use crate::layout::{BROKER_FLAGS_OFFSET, CLIENT_FLAGS_OFFSET};
use crate::shm::SharedMemory;

/// A flags word one side sets before sleeping and the other side reads after publishing.
pub trait FlagWord {
    /// Sets `bits` (`SeqCst`).
    fn set(&self, bits: u32);
    /// Clears `bits` (`SeqCst`).
    fn clear(&self, bits: u32);
    /// Reads the word (ordering provided by the caller's fence).
    fn load(&self) -> u32;
}

/// Sleeper: announces the sleep. Look for work once more afterwards; block only if none.
pub fn announce_sleep(flags: &impl FlagWord, bit: u32) {
    flags.set(bit);
    fence(Ordering::SeqCst);
}

/// Sleeper: awake again (or found work after announcing): stop asking for wakeups.
pub fn end_sleep(flags: &impl FlagWord, bit: u32) {
    flags.clear(bit);
}

/// Waker: after publishing, reads the peer's flags; signal its eventfd if its sleep bit is set.
pub fn peer_flags(flags: &impl FlagWord) -> u32 {
    fence(Ordering::SeqCst);
    flags.load()
}

/// A flags word inside a ring mapping.
#[derive(Debug, Clone, Copy)]
pub struct SharedFlags<'a> {
    mem: &'a SharedMemory,
    offset: usize,
}

impl<'a> SharedFlags<'a> {
    /// The broker's flags word (`BROKER_*` bits).
    pub fn broker(mem: &'a SharedMemory) -> Self {
        Self { mem, offset: BROKER_FLAGS_OFFSET }
    }

    /// The client's flags word (`CLIENT_*` bits).
    pub fn client(mem: &'a SharedMemory) -> Self {
        Self { mem, offset: CLIENT_FLAGS_OFFSET }
    }
}

impl FlagWord for SharedFlags<'_> {
    fn set(&self, bits: u32) {
        self.mem.fetch_or_u32(self.offset, bits, Ordering::SeqCst);
    }
    fn clear(&self, bits: u32) {
        self.mem.fetch_and_not_u32(self.offset, bits, Ordering::SeqCst);
    }
    fn load(&self) -> u32 {
        self.mem.load_u32(self.offset, Ordering::Relaxed)
    }
}
