//! The sleep/wake handshake, like io_uring's `IORING_SQ_NEED_WAKEUP`.
//!
//! A side that finds no work announces that it will sleep (sets its bit in a flags word), issues
//! a `SeqCst` fence, looks for work once more, and only then blocks on its doorbell (a socket
//! pair, see [`crate::eventfd::doorbell`]). The other side publishes its entries, issues a
//! `SeqCst` fence, and reads the flags word: if the bit is set, it rings the doorbell. The two
//! fences make it impossible for both to miss each other (a store-buffer/Dekker pattern), so no
//! wakeup is lost and a busy peer makes no system call.
//! `tests/loom_ring.rs` checks this with loom, and checks that it fails without the fences.
//!
//! A sleeper may also name how much work it waits for (a *wake index*, stored before its bit
//! is set, like io_uring's `min_complete`): the waker then signals only once what it published
//! reaches that index ([`wake_due`]), so a client waiting for eight completions is woken once,
//! not eight times. The waker reads the index after seeing the bit (`Acquire`), so it reads the
//! index of that sleep or of a later one.

#[cfg(not(loom))]
use core::sync::atomic::fence;
use core::sync::atomic::Ordering;

#[cfg(loom)]
use loom::sync::atomic::fence;

use crate::layout::{BROKER_FLAGS_OFFSET, CLIENT_FLAGS_OFFSET, CLIENT_WAKE_AT_OFFSET};

/// Where a flags word's wake index sits relative to it (only the client's is used; the
/// broker's would land in its own flags line, unused).
const WAKE_AT_FROM_FLAGS: usize = CLIENT_WAKE_AT_OFFSET - CLIENT_FLAGS_OFFSET;
use crate::shm::SharedMemory;

/// A flags word one side sets before sleeping and the other side reads after publishing.
pub trait FlagWord {
    /// Sets `bits` (`SeqCst`).
    fn set(&self, bits: u32);
    /// Clears `bits` (`SeqCst`).
    fn clear(&self, bits: u32);
    /// Reads the word (ordering provided by the caller's fence).
    fn load(&self) -> u32;
    /// Stores the sleeper's wake index (`Relaxed`: the `SeqCst` set of its bit that follows
    /// publishes it).
    fn set_wake_at(&self, index: u32);
    /// Reads the wake index (`Relaxed`; [`wake_due`] orders it after the flags).
    fn wake_at(&self) -> u32;
}

/// Sleeper: announces the sleep. Look for work once more afterwards; block only if none.
pub fn announce_sleep(flags: &impl FlagWord, bit: u32) {
    flags.set(bit);
    fence(Ordering::SeqCst);
}

/// Sleeper: announces a sleep that only the work up to `index` (a free-running ring index, one
/// past the last entry waited for) should end: stores the index, then sets `bit | wake_at_bit`.
pub fn announce_sleep_until(flags: &impl FlagWord, bit: u32, wake_at_bit: u32, index: u32) {
    flags.set_wake_at(index);
    announce_sleep(flags, bit | wake_at_bit);
}

/// Waker: after publishing entries up to `published` (one past the last), whether to signal:
/// the peer's `bit` is set, and either `wake_at_bit` is not set or `published` reached the
/// peer's wake index (compared as free-running indices: at most 2^31 apart).
pub fn wake_due(flags: &impl FlagWord, bit: u32, wake_at_bit: u32, published: u32) -> bool {
    let f = peer_flags(flags);
    if f & bit == 0 {
        return false;
    }
    if f & wake_at_bit == 0 {
        return true;
    }
    // Pairs with the sleeper's `SeqCst` set of the bits: the index read is the one stored
    // before them (or a newer sleep's).
    fence(Ordering::Acquire);
    published.wrapping_sub(flags.wake_at()) as i32 >= 0
}

/// Sleeper: awake again (or found work after announcing): stop asking for wakeups.
pub fn end_sleep(flags: &impl FlagWord, bit: u32) {
    flags.clear(bit);
}

/// Waker: after publishing, reads the peer's flags; ring its doorbell if its sleep bit is set.
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

    /// The client's flags word (`CLIENT_*` bits), with its wake index.
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
    fn set_wake_at(&self, index: u32) {
        self.mem.store_u32(self.offset + WAKE_AT_FROM_FLAGS, index, Ordering::Relaxed);
    }
    fn wake_at(&self) -> u32 {
        self.mem.load_u32(self.offset + WAKE_AT_FROM_FLAGS, Ordering::Relaxed)
    }
}

/// How long a waiting side polls before it also offers its CPU to other threads ([`yield_cpu`]):
/// longer than a round trip through an idle peer, so a lone client and its I/O thread never
/// make the system call between two requests.
#[cfg(not(loom))]
pub const YIELD_AFTER: std::time::Duration = std::time::Duration::from_micros(5);

/// Offers the CPU to another runnable thread (`sched_yield`) and returns how long others ran
/// meanwhile (zero when it came straight back: a bare system call, well under 2 us). Clients and
/// I/O threads sharing few CPUs then take turns instead of each burning its spin: the thread
/// that runs next likely has the work this one waits for, and nobody needs a doorbell wakeup.
#[cfg(not(loom))]
pub fn yield_cpu() -> std::time::Duration {
    let t = std::time::Instant::now();
    std::thread::yield_now();
    let d = t.elapsed();
    if d > std::time::Duration::from_micros(2) {
        d
    } else {
        std::time::Duration::ZERO
    }
}

/// Shortest poll once polling grows again from none.
pub const POLL_GROW_START: std::time::Duration = std::time::Duration::from_micros(10);

/// The next poll window (how long a waiting side spins before it sleeps) after a wait that
/// ended in a sleep and lasted `slept` in all, as KVM adapts its halt polling: work that came
/// within `max` (the ceiling) would have been caught by polling that long, so the window
/// doubles (from 10 µs, up to `max`); a longer wait means the poll burnt CPU for nothing, so it
/// halves (to none below 10 µs). Clients pass the whole wait (spin and sleep: with the sleep
/// alone, waits between one and two ceilings would keep the spin at its ceiling and pay for
/// the sleep too), and `Duration::MAX` for a wakeup that brought nothing; the broker's I/O
/// threads pass their sleep. Judging by the wait, not by whether the poll succeeded, matters:
/// a window that only grew when polling caught the work would, once below the usual wait,
/// never grow again (every wait then sleeps, and both sides pay a wakeup per batch).
pub fn adapt_poll(
    window: std::time::Duration,
    slept: std::time::Duration,
    max: std::time::Duration,
) -> std::time::Duration {
    if slept < max {
        (window * 2).max(POLL_GROW_START).min(max)
    } else {
        let w = window / 2;
        if w < POLL_GROW_START {
            std::time::Duration::ZERO
        } else {
            w
        }
    }
}

#[cfg(test)]
mod adapt_tests {
    use super::*;
    use std::time::Duration;

    const MAX: Duration = Duration::from_micros(200);

    #[test]
    fn long_sleeps_shrink_the_poll_to_none_and_short_ones_grow_it_back() {
        let mut w = MAX;
        let mut seen = vec![w];
        while !w.is_zero() {
            w = adapt_poll(w, Duration::from_millis(1), MAX);
            seen.push(w);
        }
        let us: Vec<u128> = seen.iter().map(|d| d.as_micros()).collect();
        assert_eq!(us, [200, 100, 50, 25, 12, 0]);
        // Work coming back 30 us after the sleep began: polling would have caught it.
        for want in [10, 20, 40, 80, 160, 200, 200] {
            w = adapt_poll(w, Duration::from_micros(30), MAX);
            assert_eq!(w.as_micros(), want);
        }
    }

    #[test]
    fn no_ceiling_no_poll() {
        assert_eq!(adapt_poll(Duration::ZERO, Duration::ZERO, Duration::ZERO), Duration::ZERO);
        assert_eq!(adapt_poll(Duration::ZERO, Duration::from_secs(1), Duration::ZERO), Duration::ZERO);
    }
}
