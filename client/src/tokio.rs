//! I/O from tokio (feature `tokio`): [`AsyncNvmeRing`], whose requests are futures.
//!
//! ```no_run
//! use nvmed_client::tokio::AsyncNvmeRing;
//! # #[tokio::main] async fn main() -> Result<(), nvmed_client::Error> {
//! let ring = AsyncNvmeRing::open("/run/nvmed.sock")?;      // a clonable, Send + Sync handle
//! let nsid = ring.namespaces()[0].nsid;
//! let mut buf = ring.alloc_buffer(4096)?;                  // registered once, reused
//! buf.fill(0xab);
//! let (_, buf) = ring.write(nsid, 0, buf).await?;          // the buffer moves in and back out
//! let (n, buf) = ring.read(nsid, 0, buf).await?;
//! assert_eq!(n, 4096);
//! assert!(buf.iter().all(|&b| b == 0xab));
//! # Ok(()) }
//! ```
//!
//! # How requests complete
//!
//! A request is queued and published when its future is first polled. Its future then looks at
//! the ring's completion queue each time it is polled (a few loads of shared memory), and hands
//! every completion it finds to the future it belongs to (by user data), waking that one's
//! task. Nothing has to be polled for completions to arrive, though: each ring has one
//! *driver* task (spawned on the runtime by [`AsyncNvmeRing::new`]; no thread), which while
//! requests are in flight keeps looking at the completion queue, yielding to the runtime
//! between looks, for up to [`AsyncOptions::spin`] after the last completion. Only when that
//! finds nothing does it arm the ring's completion doorbell ([`NvmeRing::arm_completion_fd`]),
//! registered with tokio's reactor, and sleep until the broker writes it. As in
//! [`NvmeRing::wait`], the spin adapts: a sleep longer than the limit halves it, a shorter one
//! or a completion found while spinning doubles it (up to the limit). A busy ring thus costs no system call per request, an
//! idle one no CPU. The driver also sleeps on the control socket, to learn when the broker is
//! gone.
//!
//! Requests in flight are at most the ring's submission queue entries: a request beyond that
//! waits (in FIFO order) for one to complete before it is queued, so any number of futures may
//! be started at once. Any number of tasks on any threads may share the ring
//! ([`AsyncNvmeRing`] is a cheap [`Clone`] handle); they take turns on one short lock.
//!
//! # Buffers and cancellation
//!
//! Data moves through [`IoBuf`]s: memory registered with the broker, owned like a `Vec<u8>`
//! (one handle, no clones), split into independently owned pieces with [`IoBuf::split_off`] or
//! [`IoBuf::into_chunks`]. A read or write takes the buffer (or an [`IoBufSlice`] of it) by
//! value and gives it back with the result: while the device may touch the memory, nothing
//! else can.
//!
//! Futures are **cancel safe**. A future dropped before its request completed (a `select!`
//! that took another branch, a timeout, an aborted task) cannot take its request back: the
//! device may still write the buffer. The ring keeps that buffer until the request's
//! completion arrives, and only then releases it (its registration goes back to the ring's
//! pool, for [`AsyncNvmeRing::alloc_buffer`] to hand out again). Until then no code can reach
//! the memory, reuse it or unregister it. [`AsyncCounters::abandoned_in_flight`] counts such
//! requests. The request itself still happens: a dropped write may still land.
//!
//! A broker that exits is no failure when the session reconnects ([`crate::Reconnect`], on by
//! default): the driver lets the ring connect again (off the runtime's worker threads; futures
//! polled meanwhile wait as futures, never on a worker thread), the ring
//! sends the requests that had not completed to the new broker, and their futures complete as
//! usual. If the ring fails (the broker faulted it, or exited and the session does not
//! reconnect, or reconnecting failed), every future still waiting ends with that error
//! ([`Error::RingFaulted`], [`Error::BrokerGone`], [`Error::ReconnectFailed`]) and *without*
//! its buffer ([`BufError::buf`] is `None`): nobody can say whether the device is done with it,
//! so it stays held until the ring is dropped. A request the device completed with an error
//! status ends with [`Error::Io`] and gives its buffer back.
//!
//! # Requirements
//!
//! [`AsyncNvmeRing::new`] must be called inside a tokio runtime with its I/O driver enabled
//! (`enable_io`, or `enable_all`; `#[tokio::main]` does), multi-threaded or not; the driver task
//! runs there for as long as the ring lives, so requests complete only while that runtime runs.
//! Setting up ([`AsyncNvmeRing::open`], [`AsyncNvmeRing::alloc_buffer`],
//! [`AsyncNvmeRing::trim_buffers`]) makes blocking round trips to the broker: do it once, not
//! per request. When the last handle is dropped, the driver waits for the requests of dropped
//! futures still in flight, then closes the ring on tokio's blocking pool.

use std::future::{poll_fn, Future};
use std::ops::{Bound, Deref, DerefMut, RangeBounds};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use ::tokio::io::unix::AsyncFd;
use ::tokio::io::Interest;
use ::tokio::sync::{Notify, Semaphore, TryAcquireError};
use nix::poll::{PollFd, PollFlags, PollTimeout};
use slab::Slab;

use crate::error::os;
use crate::{
    BufferId, Completion, Error, Io, MemfdBuffer, NamespaceInfo, NvmeRing, NvmeSession, Result, Status,
};

/// Options of an [`AsyncNvmeRing`].
#[derive(Debug, Clone)]
pub struct AsyncOptions {
    /// Longest time the driver task keeps polling a ring with requests in flight after its last
    /// completion before it arms the completion doorbell and sleeps. It adapts below this limit
    /// as [`crate::RingOptions::spin`] does.
    pub spin: Duration,
}

impl Default for AsyncOptions {
    fn default() -> Self {
        Self { spin: Duration::from_micros(50) }
    }
}

/// What an [`AsyncNvmeRing`] has done (since it was created) and holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AsyncCounters {
    /// Requests queued.
    pub submitted: u64,
    /// Completions found by the futures themselves while polled.
    pub reaped_by_futures: u64,
    /// Completions found by the driver task.
    pub reaped_by_driver: u64,
    /// Times the driver task armed the completion doorbell and slept on it.
    pub sleeps: u64,
    /// Requests that waited for a free submission queue entry.
    pub waited_for_entry: u64,
    /// Futures dropped before their request completed.
    pub abandoned: u64,
    /// Requests of dropped futures still in flight: each holds its buffer until it completes.
    /// Also counts the requests in flight when the ring failed, whose buffers it keeps.
    pub abandoned_in_flight: u64,
    /// Requests in flight now.
    pub in_flight: u64,
    /// Most requests in flight at once so far.
    pub peak_in_flight: u64,
    /// Registered buffers free for reuse by [`AsyncNvmeRing::alloc_buffer`].
    pub pooled_buffers: u64,
}

/// A ring driven by tokio: each request is a future; see the [module docs](self).
///
/// Cloning gives another handle to the same ring (`Send + Sync`, for any task on any thread).
/// The ring closes when the last handle is dropped and its requests in flight have completed.
#[derive(Debug, Clone)]
pub struct AsyncNvmeRing {
    handle: Arc<Handle>,
}

/// The handles' share: dropping the last one stops the driver task.
#[derive(Debug)]
struct Handle {
    shared: Arc<Shared>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        // No lock: the driver may hold the state through a reconnect.
        self.shared.closed.store(true, Ordering::Release);
        self.shared.notify.notify_one();
    }
}

/// What the handles, the driver task and the buffers share.
#[derive(Debug)]
struct Shared {
    /// First, so that it is dropped before the ring: a ring that is the session's last handle
    /// skips closing itself and unregistering its buffers (the session's end does it all).
    session: NvmeSession,
    state: Mutex<State>,
    /// Registered buffers no [`IoBuf`] uses, for reuse. Its own lock (taken after `state`, if
    /// both): a buffer may be released while `state` is held.
    pool: Mutex<Vec<PoolBuf>>,
    /// One permit per submission queue entry: a request takes one before it is queued and
    /// gives it back when its completion has been taken, so `prep` never finds the SQ full.
    slots: Semaphore,
    /// Wakes the driver task when it is idle (a request was queued) or must exit.
    notify: Notify,
    /// The ring's submission queue entries.
    entries: usize,
    /// The driver is reconnecting the ring on the blocking pool, holding `state` meanwhile
    /// (seconds, if the broker is slow to come back): futures polled then do not wait for the
    /// lock on a worker thread but leave their wakers in `parked`, woken when it is done.
    reconnecting: AtomicBool,
    parked: Mutex<Vec<Waker>>,
    /// Futures dropped while the state's lock was taken (see [`InFlight`]'s drop): handled by
    /// the next holder.
    dropped: Mutex<Vec<(usize, Option<IoBuf>)>>,
    /// Set after a push to `dropped` (so a reap looks at that lock only then).
    any_dropped: AtomicBool,
    /// No handle is left: the driver exits once nothing is in flight.
    closed: AtomicBool,
    /// Requests that waited for a free submission queue entry.
    waited_for_entry: AtomicU64,
}

#[derive(Debug)]
struct State {
    ring: NvmeRing,
    /// Requests in flight, by user data.
    ops: Slab<Op>,
    /// Completions just taken from the ring.
    out: Vec<Completion>,
    /// Why the ring can no longer be used.
    failed: Option<Error>,
    /// The broker went away: the driver reconnects the ring (off the worker threads; the
    /// ring itself never reconnects inside a poll here).
    reconnect_wanted: bool,
    /// The driver waits on `notify` for a request to be queued.
    driver_idle: bool,
    spin: Duration,
    /// The driver's spin now (between zero and `spin`).
    spin_now: Duration,
    counters: AsyncCounters,
}

#[derive(Debug)]
enum Op {
    /// In flight; the waker of the future waiting for it.
    Waiting(Option<Waker>),
    /// Completed; its future has not taken the result yet.
    Done(Completion),
    /// Its future was dropped: holds the buffer until the completion arrives.
    Abandoned {
        /// Kept for its drop only (it then goes back to the pool).
        _buf: Option<IoBuf>,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A copy of a ring failure, for every future it ends (the same kind, so that callers can
/// match on it: a killed session's `Refused(SessionKilled)` stays that).
fn same_error(e: &Error) -> Error {
    match e {
        Error::RingFaulted(f) => Error::RingFaulted(*f),
        Error::BrokerGone => Error::BrokerGone,
        Error::ReconnectFailed { after, reason } => {
            Error::ReconnectFailed { after: *after, reason: reason.clone() }
        }
        Error::Refused(c) => Error::Refused(c.clone()),
        Error::Os { what, source } => {
            Error::Os { what, source: std::io::Error::new(source.kind(), source.to_string()) }
        }
        Error::Connect { path, source } => Error::Connect { path: path.clone(), source: *source },
        Error::Timeout => Error::Timeout,
        Error::DriverGone => Error::DriverGone,
        other => Error::Protocol(other.to_string()),
    }
}

/// Completion statuses as results.
fn status(c: Completion) -> Result<u32> {
    match c.status {
        Status::Success => Ok(c.result),
        s => Err(Error::Io(s)),
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn owns(&self, buf: &IoBuf) -> bool {
        std::ptr::eq(Weak::as_ptr(&buf.region.ring), self)
    }

    /// Takes the completions the ring has and hands them out: wakers of the futures they
    /// finish are pushed to `wakers` (not woken under the lock), except `me`'s. Returns how many.
    fn reap(&self, st: &mut State, wakers: &mut Vec<Waker>, me: Option<usize>) -> usize {
        self.take_dropped(st);
        if st.failed.is_some() {
            return 0;
        }
        st.out.clear();
        let r = st.ring.poll(&mut st.out);
        self.settle(st, r, wakers, me)
    }

    /// The future of request `key` was dropped before it took its result: a completed request
    /// is forgotten, one in flight keeps `buf` until its completion arrives.
    fn abandon(&self, st: &mut State, key: usize, buf: Option<IoBuf>) {
        match st.ops.get(key) {
            Some(Op::Done(_)) => {
                st.ops.remove(key);
                self.slots.add_permits(1);
            }
            Some(Op::Waiting(_)) => {
                st.ops[key] = Op::Abandoned { _buf: buf };
                st.counters.abandoned += 1;
                st.counters.abandoned_in_flight += 1;
            }
            _ => {}
        }
    }

    /// Abandons the requests of futures dropped while the lock was taken.
    fn take_dropped(&self, st: &mut State) {
        if !self.any_dropped.load(Ordering::Acquire) || !self.any_dropped.swap(false, Ordering::AcqRel) {
            return;
        }
        let dropped = std::mem::take(&mut *lock(&self.dropped));
        for (key, buf) in dropped {
            self.abandon(st, key, buf);
        }
    }

    /// Hands out the completions a ring call put in `st.out`, then fails the ring if the call
    /// failed (what it took before failing, from an old broker's CQ say, still counts).
    fn settle(&self, st: &mut State, r: Result<usize>, wakers: &mut Vec<Waker>, me: Option<usize>) -> usize {
        let n = self.dispatch(st, wakers, me);
        if let Err(e) = r {
            self.broken(st, e, wakers);
        }
        n
    }

    /// A ring call failed with `e`: a broker gone is for the driver to reconnect to, when the
    /// session reconnects; anything else fails the ring.
    fn broken(&self, st: &mut State, e: Error, wakers: &mut Vec<Waker>) {
        if matches!(e, Error::BrokerGone) && st.ring.reconnects_enabled() {
            if !std::mem::replace(&mut st.reconnect_wanted, true) {
                self.notify.notify_one();
            }
        } else {
            self.fail(st, e, wakers);
        }
    }

    /// The state's lock, or (while the driver reconnects the ring, holding it) `Pending` with
    /// the task's waker parked until that is done: a future never waits for a reconnect on a
    /// worker thread.
    fn lock_or_park(&self, cx: &mut Context<'_>) -> Poll<MutexGuard<'_, State>> {
        let mut tries = 0u32;
        loop {
            match self.state.try_lock() {
                Ok(g) => return Poll::Ready(g),
                Err(TryLockError::Poisoned(p)) => return Poll::Ready(p.into_inner()),
                Err(TryLockError::WouldBlock) => {}
            }
            if self.reconnecting.load(Ordering::Acquire) {
                let mut parked = lock(&self.parked);
                if !parked.iter().any(|w| w.will_wake(cx.waker())) {
                    parked.push(cx.waker().clone());
                }
                drop(parked);
                // The reconnect clears the flag before it wakes the parked: if it is still set,
                // this waker will be woken; if not, the lock is free again soon.
                if self.reconnecting.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
            }
            // Another future or the driver holds it for a moment (a reap).
            tries += 1;
            if tries < 64 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Hands out the completions in `st.out`.
    fn dispatch(&self, st: &mut State, wakers: &mut Vec<Waker>, me: Option<usize>) -> usize {
        let n = st.out.len();
        for i in 0..n {
            let c = st.out[i];
            let key = c.user_data as usize;
            match st.ops.get_mut(key) {
                Some(op @ Op::Waiting(_)) => {
                    if let Op::Waiting(Some(w)) = std::mem::replace(op, Op::Done(c)) {
                        if me != Some(key) {
                            wakers.push(w);
                        }
                    }
                }
                Some(Op::Abandoned { .. }) => {
                    // Its future is gone: the buffer it held is free now (back to the pool).
                    drop(st.ops.remove(key));
                    st.counters.abandoned_in_flight -= 1;
                    self.slots.add_permits(1);
                }
                _ => {
                    let e = Error::Protocol(format!("completion for unknown request {key}"));
                    self.fail(st, e, wakers);
                    return n;
                }
            }
        }
        n
    }

    /// The ring failed: every waiting future is woken to end with `e`; no new request starts.
    fn fail(&self, st: &mut State, e: Error, wakers: &mut Vec<Waker>) {
        if st.failed.is_none() {
            // What the broker completed before the failure is a result, not a failure (a
            // broker closing cleanly posts its last completions before its fault word): hand
            // those out first, with their buffers.
            loop {
                st.out.clear();
                match st.ring.poll(&mut st.out) {
                    Ok(n) if n > 0 => {
                        let n = self.dispatch(st, wakers, None);
                        st.counters.reaped_by_driver += n as u64;
                    }
                    _ => break,
                }
            }
            // (A failure found while reaping those stays the one reported.)
            st.failed.get_or_insert(e);
        }
        for (_, op) in st.ops.iter_mut() {
            if let Op::Waiting(w) = op {
                wakers.extend(w.take());
            }
        }
        self.slots.close();
    }
}

/// What the driver sleeps on: duplicates of the ring's completion doorbell and control socket,
/// registered with the reactor. A ring that reconnected to a restarted broker has new ones.
#[derive(Debug)]
struct Fds {
    completion: AsyncFd<OwnedFd>,
    control: AsyncFd<OwnedFd>,
    /// The control socket's inode: whether the ring's socket is still this one.
    socket: u64,
}

/// The inode of a socket (each socket has its own).
fn inode(fd: BorrowedFd<'_>) -> Result<u64> {
    Ok(nix::sys::stat::fstat(fd).map_err(|e| Error::Os { what: "fstat", source: e.into() })?.st_ino)
}

impl Fds {
    /// Registers (duplicates of) the ring's descriptors with the current runtime's reactor.
    fn of(ring: &NvmeRing) -> Result<Self> {
        let socket = inode(ring.control_socket())?;
        let completion =
            ring.completion_fd().try_clone_to_owned().map_err(os("dup the completion doorbell"))?;
        let control = ring.control_socket().try_clone_to_owned().map_err(os("dup the control socket"))?;
        // SAFETY: each `OwnedFd` is a valid descriptor the `AsyncFd` owns: nothing else closes
        // or replaces it while it is registered, and its `as_raw_fd` never changes.
        let completion =
            unsafe { AsyncFd::register_with_interest(completion, Interest::READABLE) }.map_err(|e| {
                Error::Os { what: "registering the completion doorbell with tokio", source: e.into() }
            })?;
        // SAFETY: as above.
        let control = unsafe { AsyncFd::register_with_interest(control, Interest::READABLE) }
            .map_err(|e| Error::Os { what: "registering the control socket with tokio", source: e.into() })?;
        Ok(Self { completion, control, socket })
    }

    /// Whether these are still the ring's (it has not reconnected since).
    fn current(&self, ring: &NvmeRing) -> bool {
        inode(ring.control_socket()).is_ok_and(|i| i == self.socket)
    }

    /// Sleeps until the completion doorbell or the control socket is readable, or `notify`.
    async fn sleep(&self, notify: &Notify) -> Woken {
        let mut notified = pin!(notify.notified());
        poll_fn(|cx| {
            if let Poll::Ready(r) = self.completion.poll_read_ready(cx) {
                if let Ok(mut guard) = r {
                    guard.clear_ready();
                }
                return Poll::Ready(Woken::Completion);
            }
            if let Poll::Ready(r) = self.control.poll_read_ready(cx) {
                if let Ok(mut guard) = r {
                    guard.clear_ready();
                }
                return Poll::Ready(Woken::Control);
            }
            if notified.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woken::Notified);
            }
            Poll::Pending
        })
        .await
    }

    /// Whether the broker hung up the control socket.
    fn broker_gone(&self) -> bool {
        let mut fds = [PollFd::new(self.control.get_ref().as_fd(), PollFlags::empty())];
        matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
            && fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woken {
    Completion,
    Control,
    Notified,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Poll again after yielding to the runtime.
    Spin,
    /// Arm done, nothing there: sleep on the completion doorbell.
    Sleep,
    /// Nothing in flight (or the ring failed): wait for a request or the last handle's drop.
    Idle,
    /// The last handle is gone and nothing is in flight.
    Exit,
    /// The broker went away: connect again (see [`reconnect`]).
    Reconnect,
}

/// The ring connects again if its session does (`Reconnect`), sending its requests again, or
/// fails. A reconnect may take a while (it retries until a broker answers): it runs on the
/// blocking pool, and futures polled meanwhile park instead of waiting for the state's lock
/// (see [`Shared::lock_or_park`]). `socket`: the control socket seen hanging up, if that is
/// why (nothing is done if the ring has connected again since).
async fn reconnect(shared: &Arc<Shared>, socket: Option<u64>, wakers: &mut Vec<Waker>) {
    /// Ends the reconnecting state however the task ends (a panic included), and wakes the
    /// futures that parked meanwhile (here, not in the driver: it may be gone with its runtime).
    struct Reconnecting<'a>(&'a Shared);
    impl Drop for Reconnecting<'_> {
        fn drop(&mut self) {
            self.0.reconnecting.store(false, Ordering::Release);
            for w in std::mem::take(&mut *lock(&self.0.parked)) {
                w.wake();
            }
        }
    }
    let shared2 = shared.clone();
    let recovered = ::tokio::task::spawn_blocking(move || {
        let shared = shared2;
        let mut wakers = Vec::new();
        {
            let _flag = {
                shared.reconnecting.store(true, Ordering::Release);
                Reconnecting(&shared)
            };
            let mut guard = shared.lock();
            let st = &mut *guard;
            // Unless the ring connected again meanwhile (its socket is no longer the one that
            // hung up).
            let same = socket.is_none_or(|s| inode(st.ring.control_socket()).is_ok_and(|i| i == s));
            if st.failed.is_none() && (same || st.reconnect_wanted) {
                st.reconnect_wanted = false;
                st.out.clear();
                let r = st.ring.reconnect(&mut st.out);
                let n = shared.dispatch(st, &mut wakers, None);
                st.counters.reaped_by_driver += n as u64;
                if let Err(e) = r {
                    // Reconnecting itself failed (or the new brokers kept going away): final.
                    shared.fail(st, e, &mut wakers);
                }
            }
        }
        wakers
    })
    .await;
    wakers.extend(recovered.into_iter().flatten());
    // Cleared before this (by the task's end, or because it never ran): a future that parked
    // after that saw the flag clear and took the lock itself.
    wakers.extend(lock(&shared.parked).drain(..));
}

/// Polls the driver makes after the last completion before it may sleep, however short its
/// spin has become (as [`NvmeRing::wait`] polls 64 times before it looks at the clock).
const MIN_SPINS: u32 = 16;

/// Lets the runtime run other tasks, then polls again (a self-wake: the runtime queues the
/// task behind the others, without the reactor poll of `tokio::task::yield_now`).
async fn spin_once() {
    let mut yielded = false;
    poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Fails the ring if its driver ends other than by its own exit (its runtime shut down and
/// dropped the task, or it panicked): the futures wait for the driver to wake them, and would
/// otherwise wait for ever.
struct DriverEnd {
    shared: Arc<Shared>,
    normally: bool,
}

impl Drop for DriverEnd {
    fn drop(&mut self) {
        if self.normally {
            return;
        }
        let mut wakers = Vec::new();
        {
            let mut st = self.shared.lock();
            self.shared.fail(&mut st, Error::DriverGone, &mut wakers);
        }
        for w in wakers {
            w.wake();
        }
    }
}

/// The driver task of one ring: polls while requests are in flight, sleeps on the completion
/// completion doorbell when polling finds nothing for a while.
async fn drive(shared: Arc<Shared>, mut fds: Fds) {
    let mut ended = DriverEnd { shared: shared.clone(), normally: false };
    let mut wakers = Vec::new();
    // Completions taken so far (by the futures or the driver) when the driver last looked:
    // while others take them, the ring is busy even if the driver finds none itself.
    let mut seen = 0u64;
    // When the driver last saw completions taken (or woke up), and its polls since then.
    let mut since = Instant::now();
    let mut spins = 0u32;
    // Whether it slept since: completions taken without sleeping mean spinning pays.
    let mut slept = false;
    loop {
        let step = {
            let mut guard = loop {
                match shared.state.try_lock() {
                    Ok(g) => break g,
                    Err(TryLockError::Poisoned(p)) => break p.into_inner(),
                    // Someone else holds it (and reaps meanwhile): look again soon.
                    Err(TryLockError::WouldBlock) => {}
                }
                spin_once().await;
            };
            let st = &mut *guard;
            let n = shared.reap(st, &mut wakers, None);
            st.counters.reaped_by_driver += n as u64;
            let taken = st.counters.reaped_by_futures + st.counters.reaped_by_driver;
            if taken != seen {
                seen = taken;
                since = Instant::now();
                spins = 0;
                if !slept {
                    st.spin_now = st.spin_now.saturating_mul(2).max(Duration::from_micros(1)).min(st.spin);
                }
                slept = false;
            }
            if st.reconnect_wanted
                && st.failed.is_none()
                && !(shared.closed.load(Ordering::Acquire) && st.ring.in_flight() == 0)
            {
                Step::Reconnect
            } else if st.failed.is_some() || st.ring.in_flight() == 0 {
                if shared.closed.load(Ordering::Acquire) {
                    Step::Exit
                } else {
                    st.driver_idle = true;
                    Step::Idle
                }
            } else if spins < MIN_SPINS || since.elapsed() < st.spin_now {
                spins += 1;
                Step::Spin
            } else {
                st.out.clear();
                match st.ring.arm_completion_fd(&mut st.out) {
                    Ok(0) => {
                        st.counters.sleeps += 1;
                        if fds.current(&st.ring) {
                            Step::Sleep
                        } else {
                            // The ring reconnected to a new broker: sleep on its new descriptors.
                            match Fds::of(&st.ring) {
                                Ok(new) => {
                                    fds = new;
                                    Step::Sleep
                                }
                                Err(e) => {
                                    st.ring.disarm_completion_fd();
                                    shared.fail(st, e, &mut wakers);
                                    Step::Spin
                                }
                            }
                        }
                    }
                    Ok(_) => {
                        let n = shared.dispatch(st, &mut wakers, None);
                        st.counters.reaped_by_driver += n as u64;
                        Step::Spin
                    }
                    Err(e) => {
                        shared.broken(st, e, &mut wakers);
                        Step::Spin
                    }
                }
            }
        };
        for w in wakers.drain(..) {
            w.wake();
        }
        match step {
            Step::Exit => break,
            Step::Idle => {
                shared.notify.notified().await;
                (since, spins) = (Instant::now(), 0);
            }
            Step::Spin => spin_once().await,
            Step::Reconnect => {
                reconnect(&shared, None, &mut wakers).await;
                (since, spins) = (Instant::now(), 0);
                for w in wakers.drain(..) {
                    w.wake();
                }
            }
            Step::Sleep => {
                let woken = fds.sleep(&shared.notify).await;
                let gone = {
                    let mut guard = shared.lock();
                    let st = &mut *guard;
                    st.ring.disarm_completion_fd();
                    slept = true;
                    let n = shared.reap(st, &mut wakers, None);
                    st.counters.reaped_by_driver += n as u64;
                    // Spin longer next time if spinning for the whole wait (since the last
                    // completion) would have caught this one, less if not; a wakeup that brought
                    // nothing counts as a long wait (see `nvmed_proto::wakeup::adapt_poll`).
                    let taken = st.counters.reaped_by_futures + st.counters.reaped_by_driver;
                    let waited = if taken != seen { since.elapsed() } else { Duration::MAX };
                    st.spin_now = nvmed_proto::wakeup::adapt_poll(st.spin_now, waited, st.spin);
                    // The hang-up is seen once (its readiness was cleared): act on it whether
                    // or not this reap found completions or requests are in flight (a broker
                    // stopping cleanly shuts the socket first and drains after).
                    // A ring being closed with nothing left in flight is not worth one.
                    let closing = shared.closed.load(Ordering::Acquire) && st.ring.in_flight() == 0;
                    let hung_up = woken == Woken::Control && fds.broker_gone();
                    !closing && (hung_up || (st.reconnect_wanted && st.failed.is_none()))
                };
                if gone {
                    reconnect(&shared, Some(fds.socket), &mut wakers).await;
                }
                (since, spins) = (Instant::now(), 0);
                for w in wakers.drain(..) {
                    w.wake();
                }
            }
        }
    }
    ended.normally = true;
    drop(ended); // (it holds the ring too)
                 // Closing the ring makes blocking calls to the broker: off the runtime's worker threads.
                 // A buffer being dropped holds the ring for a moment (to give its registration back to
                 // the pool): wait that out rather than leave the close to whatever thread drops it.
    let mut shared = shared;
    for _ in 0..1000 {
        match Arc::try_unwrap(shared) {
            Ok(shared) => {
                ::tokio::task::spawn_blocking(move || drop(shared));
                return;
            }
            Err(again) => {
                shared = again;
                ::tokio::task::yield_now().await;
            }
        }
    }
}

impl AsyncNvmeRing {
    /// Connects with default options ([`NvmeRing::open`]) and wraps the ring.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::new(NvmeRing::open(path)?)
    }

    /// Wraps an idle ring (nothing in flight) with default options.
    pub fn new(ring: NvmeRing) -> Result<Self> {
        Self::with_options(ring, AsyncOptions::default())
    }

    /// Wraps an idle ring: registers its completion doorbell with the current tokio runtime's
    /// reactor and spawns the ring's driver task on it. Fails outside a runtime
    /// ([`Error::Os`]), or when the ring has requests in flight or completions not yet taken
    /// ([`Error::RingBusy`]).
    pub fn with_options(ring: NvmeRing, opts: AsyncOptions) -> Result<Self> {
        let mut ring = ring;
        if ring.in_flight() > 0 {
            return Err(Error::RingBusy(ring.in_flight()));
        }
        if ring.ready_completions() > 0 {
            // Completions not yet taken (a synchronous call held them back): their user data
            // would name this wrapper's requests.
            return Err(Error::RingBusy(ring.ready_completions()));
        }
        let runtime = ::tokio::runtime::Handle::try_current().map_err(|e| Error::Os {
            what: "AsyncNvmeRing needs a tokio runtime",
            source: std::io::Error::other(e),
        })?;
        // Reconnecting blocks (until a broker answers): the driver does it on the blocking
        // pool, never a future's poll on a worker thread.
        ring.set_reconnect_in_poll(false);
        // An idle ring's free entries are all of them.
        let entries = ring.sq_space();
        if entries == 0 {
            return Err(Error::Protocol("the ring has no free submission entry".into()));
        }
        let fds = Fds::of(&ring)?;
        let session = ring.session();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                ops: Slab::with_capacity(entries),
                ring,
                out: Vec::with_capacity(entries),
                failed: None,
                reconnect_wanted: false,
                driver_idle: false,
                spin: opts.spin,
                spin_now: opts.spin,
                counters: AsyncCounters::default(),
            }),
            pool: Mutex::new(Vec::new()),
            slots: Semaphore::new(entries),
            notify: Notify::new(),
            entries,
            session,
            reconnecting: AtomicBool::new(false),
            parked: Mutex::new(Vec::new()),
            dropped: Mutex::new(Vec::new()),
            any_dropped: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            waited_for_entry: AtomicU64::new(0),
        });
        runtime.spawn(drive(shared.clone(), fds));
        Ok(Self { handle: Arc::new(Handle { shared }) })
    }

    fn shared(&self) -> &Arc<Shared> {
        &self.handle.shared
    }

    /// Namespaces this client may use.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        self.shared().session.namespaces()
    }

    /// The session of the ring (stats, health, more rings).
    pub fn session(&self) -> NvmeSession {
        self.shared().session.clone()
    }

    /// Most requests in flight at once (the ring's submission queue entries); more wait.
    pub fn max_in_flight(&self) -> usize {
        self.shared().entries
    }

    /// What the ring has done and holds now. (A short lock: but while the driver reconnects to
    /// a restarted broker, this waits for it, as the blocking setup calls do.)
    pub fn counters(&self) -> AsyncCounters {
        let mut st = self.shared().lock();
        // Futures dropped while another thread held the state are counted here too.
        self.shared().take_dropped(&mut st);
        let mut c = st.counters;
        c.in_flight = st.ring.in_flight() as u64;
        c.waited_for_entry = self.shared().waited_for_entry.load(Ordering::Relaxed);
        drop(st);
        c.pooled_buffers = lock(&self.shared().pool).len() as u64;
        c
    }

    /// A zeroed registered buffer of `len` bytes: one the ring's pool holds (a registration
    /// freed earlier, at most twice as large), or a new sealed memfd registered with the broker
    /// (a blocking round trip). Split it for many requests rather than allocating many.
    pub fn alloc_buffer(&self, len: usize) -> Result<IoBuf> {
        let shared = self.shared();
        let Some(need) = len.max(1).checked_next_multiple_of(4096) else {
            return Err(crate::Error::Os {
                what: "sizing the buffer",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{len} bytes is too large"),
                ),
            });
        };
        let reused = {
            let mut pool = lock(&shared.pool);
            pool.iter()
                .position(|p| p.mem.len() >= need && p.mem.len() / 2 < need)
                .map(|i| pool.swap_remove(i))
        };
        let (id, mem) = match reused {
            Some(p) => {
                // SAFETY: the mapping holds at least `len` bytes, and a pooled buffer is reached
                // by nobody: no IoBuf uses it and no request is in flight on it.
                unsafe { std::ptr::write_bytes(p.mem.as_ptr(), 0, len) };
                (p.id, p.mem)
            }
            None => {
                let registered = MemfdBuffer::new(len)?;
                // Our own mapping of the memfd, so the memory outlives the ring's.
                let fd = registered.fd().try_clone().map_err(os("dup the buffer memfd"))?;
                let mem = MemfdBuffer::from_sealed_memfd(fd, registered.len())?;
                // The round trip (and any reconnect it makes) without the state's lock: requests
                // and the driver go on meanwhile.
                let id = match crate::session::register(shared.session.inner(), &registered) {
                    // At the session's or uid's registration limit: the pool's idle buffers (of
                    // sizes no request took) count against it; give them back and try once more.
                    // (The broker says "bad buffer length: larger than the limit of N bytes" when
                    // what is left of the session's limit is too small.)
                    Err(crate::Error::Refused(
                        nvmed_proto::ControlError::BufferLimit(_)
                        | nvmed_proto::ControlError::UidLimit { .. }
                        | nvmed_proto::ControlError::BadBufferLength { .. },
                    )) if !lock(&shared.pool).is_empty() => {
                        self.trim_buffers()?;
                        crate::session::register(shared.session.inner(), &registered)?
                    }
                    r => r?,
                };
                shared.lock().ring.adopt_buffer(id, registered);
                (BufferId(id), mem)
            }
        };
        let region = Region { id, mem: Some(mem), ring: Arc::downgrade(shared) };
        Ok(IoBuf { region: Arc::new(region), off: 0, len })
    }

    /// Unregisters the buffers the pool holds (no [`IoBuf`] uses them); returns how many.
    pub fn trim_buffers(&self) -> Result<usize> {
        let shared = self.shared();
        let mut free = std::mem::take(&mut *lock(&shared.pool));
        let n = free.len();
        while let Some(p) = free.pop() {
            // No request uses a pooled buffer: the broker answers at once. The round trip is
            // made without the state's lock.
            if let Err(e) = crate::session::unregister(shared.session.inner(), p.id.0, true) {
                // Those not unregistered stay in the pool.
                free.push(p);
                lock(&shared.pool).append(&mut free);
                return Err(e);
            }
            // Unmapped after the lock is given back (a large unmap takes milliseconds).
            let mapping = shared.lock().ring.disown_buffer(p.id);
            drop(mapping);
        }
        Ok(n)
    }

    /// Reads `buf.len()` bytes at byte `offset` of namespace `nsid` into `buf`; gives the buffer
    /// back with the bytes transferred.
    pub async fn read<B: IoBuffer>(&self, nsid: u32, offset: u64, buf: B) -> BufResult<u32, B> {
        self.with_buffer(Io::read(nsid, offset, 0, BufferId(0), 0), buf).await
    }

    /// Writes `buf` at byte `offset` of namespace `nsid`; gives the buffer back with the bytes
    /// transferred.
    pub async fn write<B: IoBuffer>(&self, nsid: u32, offset: u64, buf: B) -> BufResult<u32, B> {
        self.with_buffer(Io::write(nsid, offset, 0, BufferId(0), 0), buf).await
    }

    /// As [`AsyncNvmeRing::write`], with force unit access (on media when it completes).
    pub async fn write_fua<B: IoBuffer>(&self, nsid: u32, offset: u64, buf: B) -> BufResult<u32, B> {
        self.with_buffer(Io::write(nsid, offset, 0, BufferId(0), 0).fua(), buf).await
    }

    /// Flushes the namespace's volatile write cache.
    pub async fn flush(&self, nsid: u32) -> Result<()> {
        self.run::<IoBuf>(Io::flush(nsid), None).await.0.map(drop)
    }

    /// Writes zeroes over `len` bytes at `offset`.
    pub async fn write_zeroes(&self, nsid: u32, offset: u64, len: u32) -> Result<()> {
        self.run::<IoBuf>(Io::write_zeroes(nsid, offset, len), None).await.0.map(drop)
    }

    /// Discards `len` bytes at `offset`.
    pub async fn deallocate(&self, nsid: u32, offset: u64, len: u32) -> Result<()> {
        self.run::<IoBuf>(Io::deallocate(nsid, offset, len), None).await.0.map(drop)
    }

    /// A round trip through the broker that does not reach the device.
    pub async fn nop(&self) -> Result<()> {
        self.run::<IoBuf>(Io::nop(), None).await.0.map(drop)
    }

    async fn with_buffer<B: IoBuffer>(&self, io: Io, buf: B) -> BufResult<u32, B> {
        match self.run(io, Some(buf)).await {
            (Ok(n), Some(buf)) => Ok((n, buf)),
            (Ok(_), None) => unreachable!("a request that completed gives its buffer back"),
            (Err(error), buf) => Err(BufError { error, buf }),
        }
    }

    /// Runs one request to its completion: the data range of `buf`, if any, goes into `io`.
    /// Gives the buffer back unless the ring failed with the request in flight.
    async fn run<B: IoBuffer>(&self, mut io: Io, buf: Option<B>) -> (Result<u32>, Option<B>) {
        let shared = self.shared();
        if let Some(b) = &buf {
            let whole = b.io_buf();
            if !shared.owns(whole) {
                return (Err(Error::UnknownBuffer(whole.region.id.0)), buf);
            }
            let (off, len) = b.io_range();
            let Ok(len) = u32::try_from(len) else {
                return (Err(Error::TooLong { len: len as u64 }), buf);
            };
            io.len = len;
            io.buffer = Some((whole.region.id, (whole.off + off) as u64));
        }
        // An SQ entry: FIFO among the requests waiting; cancel safe (nothing is held yet).
        let acquired = match shared.slots.try_acquire() {
            Ok(p) => Ok(p),
            Err(TryAcquireError::NoPermits) => {
                shared.waited_for_entry.fetch_add(1, Ordering::Relaxed);
                shared.slots.acquire().await.map_err(drop)
            }
            Err(TryAcquireError::Closed) => Err(()),
        };
        // Held (given back if this future is dropped or fails before the request is queued)
        // until the request is queued; then given back by hand once its completion is taken (or
        // the abandoned request completes).
        let permit = match acquired {
            Ok(permit) => permit,
            Err(()) => {
                let st = poll_fn(|cx| shared.lock_or_park(cx)).await;
                let e = st.failed.as_ref().map_or(Error::BrokerGone, same_error);
                return (Err(e), buf);
            }
        };
        let mut wakers = Vec::new();
        let key = {
            // May wait (as a future) for a reconnect in progress.
            let mut guard = poll_fn(|cx| shared.lock_or_park(cx)).await;
            let st = &mut *guard;
            if let Some(e) = &st.failed {
                return (Err(same_error(e)), buf);
            }
            let key = st.ops.vacant_key();
            if let Err(e) = st.ring.prep(io.user_data(key as u64)) {
                return (Err(e), buf);
            }
            st.ops.insert(Op::Waiting(None));
            permit.forget();
            st.counters.submitted += 1;
            st.counters.peak_in_flight = st.counters.peak_in_flight.max(st.ring.in_flight() as u64);
            if let Err(e) = st.ring.submit() {
                shared.fail(st, e, &mut wakers);
            }
            if std::mem::take(&mut st.driver_idle) {
                shared.notify.notify_one();
            }
            key
        };
        for w in wakers {
            w.wake();
        }
        let mut flight = InFlight { shared, key, buf, finished: false };
        let result = poll_fn(|cx| flight.poll_completion(cx)).await;
        (result, flight.buf.take())
    }
}

/// A request queued by [`AsyncNvmeRing::run`]: its future's part, which abandons the request
/// (keeping the buffer in the ring) if dropped before the completion.
struct InFlight<'a, B: IoBuffer> {
    shared: &'a Shared,
    key: usize,
    buf: Option<B>,
    finished: bool,
}

impl<B: IoBuffer> InFlight<'_, B> {
    fn poll_completion(&mut self, cx: &mut Context<'_>) -> Poll<Result<u32>> {
        let mut wakers = Vec::new();
        let Poll::Ready(mut guard) = self.shared.lock_or_park(cx) else { return Poll::Pending };
        let st = &mut *guard;
        let n = self.shared.reap(st, &mut wakers, Some(self.key));
        st.counters.reaped_by_futures += n as u64;
        let result = match &mut st.ops[self.key] {
            Op::Done(c) => {
                let c = *c;
                st.ops.remove(self.key);
                self.shared.slots.add_permits(1);
                Poll::Ready(status(c))
            }
            Op::Waiting(w) => match &st.failed {
                Some(e) => {
                    // The device may still use the buffer: the ring keeps it.
                    let e = same_error(e);
                    st.ops[self.key] =
                        Op::Abandoned { _buf: self.buf.take().map(sealed::Sealed::into_io_buf) };
                    st.counters.abandoned_in_flight += 1;
                    Poll::Ready(Err(e))
                }
                None => {
                    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                        *w = Some(cx.waker().clone());
                    }
                    Poll::Pending
                }
            },
            Op::Abandoned { .. } => unreachable!("only a dropped future abandons its request"),
        };
        self.finished = result.is_ready();
        drop(guard);
        for w in wakers {
            w.wake();
        }
        result
    }
}

impl<B: IoBuffer> Drop for InFlight<'_, B> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let buf = self.buf.take().map(sealed::Sealed::into_io_buf);
        match self.shared.state.try_lock() {
            Ok(mut st) => self.shared.abandon(&mut st, self.key, buf),
            Err(TryLockError::Poisoned(p)) => self.shared.abandon(&mut p.into_inner(), self.key, buf),
            Err(TryLockError::WouldBlock) => {
                // Held (by another future's reap, or by the driver through a reconnect): a drop
                // must not wait for it. The next holder, or the driver woken here, abandons it.
                lock(&self.shared.dropped).push((self.key, buf));
                self.shared.any_dropped.store(true, Ordering::Release);
                self.shared.notify.notify_one();
            }
        }
    }
}

/// The result of a request that moves a buffer: the bytes transferred and the buffer, or a
/// [`BufError`].
pub type BufResult<T, B> = std::result::Result<(T, B), BufError<B>>;

/// A failed request that moved a buffer: why, and the buffer when the ring can give it back.
///
/// `buf` is `None` only when the ring failed with the request in flight (see the [module
/// docs](self)); it converts into [`Error`] (dropping the buffer) for `?`.
pub struct BufError<B> {
    /// Why it failed.
    pub error: Error,
    /// The buffer, unless the device may still be using it.
    pub buf: Option<B>,
}

impl<B> std::fmt::Debug for BufError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufError").field("error", &self.error).field("buf", &self.buf.is_some()).finish()
    }
}

impl<B> std::fmt::Display for BufError<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl<B> std::error::Error for BufError<B> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl<B> From<BufError<B>> for Error {
    fn from(e: BufError<B>) -> Self {
        e.error
    }
}

/// A buffer registered with the broker by [`AsyncNvmeRing::alloc_buffer`], owned like a
/// `Vec<u8>`: it dereferences to its bytes, moves into a request and comes back with the
/// result. Pieces split off it are owned separately; the registration is reused (the ring's
/// pool) once every piece is dropped.
pub struct IoBuf {
    region: Arc<Region>,
    /// Where this piece starts in the region.
    off: usize,
    len: usize,
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf")
            .field("buffer", &self.region.id)
            .field("offset", &self.off)
            .field("len", &self.len)
            .finish()
    }
}

/// One registration: its id in the ring and this process's own mapping of the memfd (so the
/// memory stays mapped whatever the ring does). Goes back to the ring's pool when dropped.
#[derive(Debug)]
struct Region {
    id: BufferId,
    mem: Option<MemfdBuffer>,
    ring: Weak<Shared>,
}

impl Region {
    fn ptr(&self) -> *mut u8 {
        self.mem.as_ref().expect("mapped until dropped").as_ptr()
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        if let (Some(shared), Some(mem)) = (self.ring.upgrade(), self.mem.take()) {
            lock(&shared.pool).push(PoolBuf { id: self.id, mem });
        }
        // Otherwise the ring is gone (and unregistered it): the mapping just goes.
    }
}

/// A registered buffer no [`IoBuf`] uses.
#[derive(Debug)]
struct PoolBuf {
    id: BufferId,
    mem: MemfdBuffer,
}

impl IoBuf {
    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The registered buffer it is a piece of.
    pub fn buffer_id(&self) -> BufferId {
        self.region.id
    }

    /// Where it starts in the registered buffer.
    pub fn buffer_offset(&self) -> u64 {
        self.off as u64
    }

    /// Splits the bytes from `at` on into a new buffer; `self` keeps the first `at`.
    ///
    /// # Panics
    /// If `at > self.len()`.
    pub fn split_off(&mut self, at: usize) -> IoBuf {
        assert!(at <= self.len, "split_off at {at} of a buffer of {} bytes", self.len);
        let tail = IoBuf { region: self.region.clone(), off: self.off + at, len: self.len - at };
        self.len = at;
        tail
    }

    /// Cuts the buffer into pieces of `size` bytes (the last may be shorter), each owned on
    /// its own: one registration for many requests in flight at once.
    ///
    /// # Panics
    /// If `size` is zero.
    pub fn into_chunks(self, size: usize) -> Vec<IoBuf> {
        assert!(size > 0, "chunks of zero bytes");
        (0..self.len)
            .step_by(size)
            .map(|at| IoBuf { region: self.region.clone(), off: self.off + at, len: size.min(self.len - at) })
            .collect()
    }

    /// A range of the buffer, for a request smaller than it; [`IoBufSlice::into_inner`] gives
    /// the whole buffer back.
    ///
    /// # Panics
    /// If the range is not inside the buffer.
    pub fn slice(self, range: impl RangeBounds<usize>) -> IoBufSlice {
        let begin = match range.start_bound() {
            Bound::Included(&b) => b,
            Bound::Excluded(&b) => b + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e + 1,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => self.len,
        };
        assert!(begin <= end && end <= self.len, "range {begin}..{end} of a buffer of {} bytes", self.len);
        IoBufSlice { buf: self, begin, end }
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // The pieces of a region never overlap and are not clonable, so no other reference
        // reaches these bytes; the device touches them only while a request owns this buffer
        // (moved into its future, or into the ring if the future was dropped), never while the
        // caller holds it.
        // SAFETY: `off + len` lies inside the region's mapping, which lives as long as the
        // region; no one else reaches these bytes now (above).
        unsafe { std::slice::from_raw_parts(self.region.ptr().add(self.off), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes the view exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.region.ptr().add(self.off), self.len) }
    }
}

/// A range of an [`IoBuf`], for a request that uses only part of it.
#[derive(Debug)]
pub struct IoBufSlice {
    buf: IoBuf,
    begin: usize,
    end: usize,
}

impl IoBufSlice {
    /// The whole buffer.
    pub fn into_inner(self) -> IoBuf {
        self.buf
    }

    /// Where the range starts in the buffer.
    pub fn begin(&self) -> usize {
        self.begin
    }

    /// Where the range ends in the buffer.
    pub fn end(&self) -> usize {
        self.end
    }
}

impl Deref for IoBufSlice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.buf[self.begin..self.end]
    }
}

impl DerefMut for IoBufSlice {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.begin..self.end]
    }
}

mod sealed {
    /// What a request needs of a buffer (not implementable outside the crate).
    pub trait Sealed {
        /// The whole buffer.
        fn io_buf(&self) -> &super::IoBuf;
        /// The range of it the request uses: offset in the buffer and length.
        fn io_range(&self) -> (usize, usize);
        /// The whole buffer, for the ring to hold if the request is abandoned.
        fn into_io_buf(self) -> super::IoBuf;
    }
}

/// A buffer a request can move in and out: [`IoBuf`] (all of it) or [`IoBufSlice`] (its range).
pub trait IoBuffer: sealed::Sealed + Send + 'static {}

impl sealed::Sealed for IoBuf {
    fn io_buf(&self) -> &IoBuf {
        self
    }
    fn io_range(&self) -> (usize, usize) {
        (0, self.len)
    }
    fn into_io_buf(self) -> IoBuf {
        self
    }
}

impl IoBuffer for IoBuf {}

impl sealed::Sealed for IoBufSlice {
    fn io_buf(&self) -> &IoBuf {
        &self.buf
    }
    fn io_range(&self) -> (usize, usize) {
        (self.begin, self.end - self.begin)
    }
    fn into_io_buf(self) -> IoBuf {
        self.buf
    }
}

impl IoBuffer for IoBufSlice {}
