//! An in-process, register-level NVMe controller.
//!
//! The driver reaches it only through [`NvmeDevice`]: BAR0 register reads and writes, doorbells,
//! DMA mappings and interrupt eventfds. Commands are fetched from submission queues in DMA
//! memory, PRPs are walked through the [`dma::IovaTable`], and completions are posted with phase
//! tags, exactly as a PCIe controller does.
//!
//! Two modes ([`EmulatorMode`]):
//!
//! * **Synchronous** (the default): a doorbell write processes the new commands in the writer's
//!   thread, in order, data transfer included (the fastest "device" there is); completions of
//!   `delay:` faults are posted later by a timer thread (their data moved at doorbell time).
//! * **Asynchronous**: like hardware. An I/O SQ doorbell write only records the new tail and
//!   wakes the controller's worker thread ("nvme-emu-worker"), which fetches the commands later,
//!   keeps them in flight, and completes them in a pseudo-random order, each after the modelled
//!   latency; a command's data moves (DMA through the IOVA table) when it completes, not when it
//!   is fetched. A command completes only when its CQ has room; a CQ head doorbell lets the
//!   worker go on. The admin queue stays synchronous.
//!
//!   With a performance model ([`EmulatorConfig::model`], `--model`), each command's completion
//!   time comes from [`model::PerfModel`] (channels, service time, IOPS and bandwidth caps)
//!   instead of the fixed latency, so queues build up as on a real SSD. A command then counts
//!   as arrived when its doorbell was written, not when the worker fetched it, so a worker
//!   thread that is scheduled late does not slow the modelled device down.
//!
//! In both modes the state lock is held across every DMA, so once CC.EN=0 (or a function reset)
//! returns, no command fetched before it moves data or completes any more.

pub mod backend;
pub mod dma;
pub mod inject;
pub mod model;

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use backend::Backend;
use dma::{DmaFault, IovaTable};
use inject::{FaultAction, FaultRule};
use model::{ModelSpec, PerfModel, Work};

use crate::device::{DeviceError, Dma, NvmeDevice};
use crate::nvme::spec::*;

/// Most I/O queue pairs the emulated controller grants.
pub const MAX_IO_QUEUES: u16 = 16;
/// CAP.MQES + 1.
pub const MAX_QUEUE_ENTRIES: u32 = 2048;

/// One emulated namespace.
pub struct EmulatedNamespace {
    /// Storage.
    pub backend: Box<dyn Backend>,
    /// LBA size in bytes (512 or 4096).
    pub lba_size: u32,
}

/// How the emulated controller runs I/O commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmulatorMode {
    /// Each I/O command runs inside the SQ doorbell write, in the writer's thread, in
    /// submission order, data transfer included.
    #[default]
    Sync,
    /// Like hardware: a doorbell write only wakes the controller's worker thread, which fetches
    /// the commands, moves their data when it completes them, and completes them out of order.
    Async {
        /// Least time from fetch to completion (and data transfer) of each command; zero means
        /// as soon as the worker gets to it.
        latency: Duration,
    },
}

/// Emulated controller settings.
///
/// `Default` gives no namespace, MDTS 7, two vectors, no faults, SGL support and
/// [`EmulatorMode::Sync`], so
/// a test can write `EmulatorConfig { namespaces, mode: EmulatorMode::Async { latency }, ..Default::default() }`.
pub struct EmulatorConfig {
    /// Namespaces, numbered from 1.
    pub namespaces: Vec<EmulatedNamespace>,
    /// MDTS (maximum transfer = 4 KiB << mdts).
    pub mdts: u8,
    /// Interrupt vectors.
    pub vectors: u16,
    /// Error injection rules.
    pub faults: Vec<FaultRule>,
    /// Testing: make the controller impossible to stop (see [`Wedge`]).
    pub wedge: Wedge,
    /// Synchronous or asynchronous (hardware-like) command processing.
    pub mode: EmulatorMode,
    /// Accept SGLs in I/O commands (reported in Identify SGLS, without alignment rules, as
    /// QEMU's NVMe model does). Off: PRPs only, like many real controllers.
    pub sgl: bool,
    /// No Write Zeroes (ONCS bit 3 clear; the command fails with Invalid Opcode), as on some
    /// controllers.
    pub no_write_zeroes: bool,
    /// Write Zeroes Size Limit reported in the NVM command set's Identify data (a power of two
    /// of 4 KiB pages; 0 = none); a larger Write Zeroes fails with Invalid Field.
    pub wzsl: u8,
    /// Dataset Management Range Size Limit in LBAs (0 = none); a larger range fails with
    /// Invalid Field.
    pub dmrsl: u32,
    /// Which emulated controller of the broker this is (from 0): its serial number and name.
    pub instance: u16,
    /// A performance model: commands complete when it says, not after the fixed latency of
    /// [`EmulatorMode::Async`] (which it replaces). Needs the asynchronous mode:
    /// [`EmulatedController::new`] refuses it in synchronous mode.
    pub model: Option<ModelSpec>,
    /// The NVMe version it reports (VS; default 1.4). Below 1.1 it behaves as NVMe 1.0 did:
    /// Identify's CNS field is one bit (so CNS 02h, the active namespace list, reads as
    /// Identify Namespace of NSID 0, and fails).
    pub version: u32,
}

/// Testing: how badly a controller ignores attempts to stop it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Wedge {
    /// A well-behaved controller.
    #[default]
    None,
    /// CC.EN=0 never brings CSTS.RDY to 0, but a function-level reset works.
    Disable,
    /// CC.EN=0 never brings CSTS.RDY to 0 and the function reset fails; clearing Bus Master
    /// Enable still stops its DMA.
    Reset,
    /// As `reset`, and Bus Master Enable cannot be cleared either: the broker cannot confirm
    /// that the device stopped.
    ResetAndBusMaster,
}

impl Default for EmulatorConfig {
    fn default() -> Self {
        Self {
            namespaces: Vec::new(),
            mdts: 7,
            vectors: 2,
            faults: Vec::new(),
            wedge: Wedge::None,
            mode: EmulatorMode::Sync,
            sgl: true,
            wzsl: 0,
            no_write_zeroes: false,
            dmrsl: 0,
            instance: 0,
            model: None,
            version: 0x0001_0400,
        }
    }
}

/// Counters of what the emulated controller did.
#[derive(Debug, Default)]
pub struct EmulatorCounters {
    /// I/O commands received.
    pub io_commands: AtomicU64,
    /// Data bytes DMA'd into host memory by reads.
    pub bytes_to_host: AtomicU64,
    /// Data bytes DMA'd from host memory by writes.
    pub bytes_from_host: AtomicU64,
    /// DMA faults (accesses to unmapped IOVAs).
    pub dma_faults: AtomicU64,
    /// Read commands completed successfully (SMART host read commands).
    pub read_commands: AtomicU64,
    /// Write commands completed successfully (SMART host write commands).
    pub write_commands: AtomicU64,
}

struct Sq {
    base: u64,
    size: u16,
    head: u16,
    /// Last tail written to the doorbell (asynchronous mode only).
    tail: u16,
    cqid: u16,
    /// With a performance model: the tails written to the doorbell and when, not yet fetched
    /// up to. A command arrives at the device when its doorbell is written, however late the
    /// worker thread gets to fetch it.
    rung: VecDeque<(u16, Instant)>,
}

struct Cq {
    base: u64,
    size: u16,
    head: u16,
    tail: u16,
    phase: bool,
    vector: u16,
    interrupts: bool,
    overflow: VecDeque<NvmeCompletion>,
}

struct Delayed {
    due: Instant,
    generation: u64,
    cqid: u16,
    entry: NvmeCompletion,
}

/// A command the asynchronous worker fetched and has not completed yet.
struct InFlight {
    qid: u16,
    cqid: u16,
    cmd: NvmeCommand,
    /// Not completed (nor its data moved) before this.
    due: Instant,
    /// Injected failure status: complete with it, without executing.
    fail: Option<u16>,
}

/// A command that never completes on its own (`hang:` and `stuck:` faults).
struct Hung {
    qid: u16,
    cqid: u16,
    cid: u16,
    /// An NVMe Abort of it succeeds.
    abortable: bool,
}

struct State {
    cc: u32,
    /// Times the controller was enabled (CC.EN 0 to 1).
    enables: u64,
    /// Hung commands, until aborted or the controller is reset.
    hung: Vec<Hung>,
    /// The device was removed: registers read as all ones, nothing runs any more.
    gone: bool,
    /// Blocks whose reads fail with a media error (namespace id, LBA), until written.
    bad_blocks: std::collections::BTreeSet<(u32, u64)>,
    unmaps_by_thread: std::collections::BTreeMap<String, u64>,
    csts: u32,
    aqa: u32,
    asq: u64,
    acq: u64,
    intms: u32,
    dma: IovaTable,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    granted: u16,
    io_count: u64,
    /// Get Log Page commands received (for `loghang:` faults).
    log_pages: u64,
    /// Create I/O Submission Queue commands received (for `sqfail:` faults).
    sq_creates: u64,
    delayed: Vec<Delayed>,
    generation: u64,
    /// Fetched, not yet completed commands (asynchronous mode).
    in_flight: Vec<InFlight>,
    /// xorshift64* state choosing the completion order (asynchronous mode).
    rng: u64,
    /// The performance model's state (asynchronous mode with a model); its times count from
    /// [`Inner::epoch`].
    model: Option<PerfModel>,
}

struct Inner {
    state: Mutex<State>,
    timer_wake: Condvar,
    worker_wake: Condvar,
    mode: EmulatorMode,
    /// Host-side threads waiting for the state lock (asynchronous mode), so the worker lets
    /// them in between two commands instead of taking the lock again at once.
    host_waiting: AtomicUsize,
    namespaces: Vec<EmulatedNamespace>,
    mdts: u8,
    sgl: bool,
    wzsl: u8,
    no_write_zeroes: bool,
    dmrsl: u32,
    instance: u16,
    /// NVMe version reported (see [`EmulatorConfig::version`]).
    version: u32,
    faults: Vec<FaultRule>,
    wedge: Wedge,
    irq: Vec<OwnedFd>,
    irq_wanted: Vec<AtomicBool>,
    counters: EmulatorCounters,
    stop: AtomicBool,
    /// When the controller was made (its power-on time in the SMART log).
    created: Instant,
    /// Time zero of the performance model.
    epoch: Instant,
}

/// The emulated controller; share it through an `Arc`.
pub struct EmulatedController {
    inner: Arc<Inner>,
    /// The timer thread (synchronous mode) or the worker thread (asynchronous mode).
    thread: Option<JoinHandle<()>>,
}

/// Seed of every controller's completion-order generator (deterministic runs).
const RNG_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Longest a background thread sleeps without looking at its state.
const IDLE_WAIT: Duration = Duration::from_millis(200);

type Outcome = Option<(u16, u32)>; // (status field, result); None = no completion now

/// The FUSE bits of a command's flags byte.
const FUSE_MASK: u8 = 0b11;

/// Namespace Not Ready (generic), DNR clear: the host may try again.
const RETRYABLE_STATUS: u16 = 0x82;
/// Command Abort Requested (generic), DNR clear.
const ABORTED_STATUS: u16 = 0x07;

/// Adds to a counter written only under the state lock (one writer at a time: no read-modify-
/// write instruction needed; readers may see it at any time).
fn bump_locked(c: &std::sync::atomic::AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

fn ok() -> Outcome {
    Some((0, 0))
}
fn err(sct: u8, sc_: u8) -> Outcome {
    Some((status_field(sct, sc_), 0))
}

impl EmulatedController {
    /// Builds a controller in the reset state (CC.EN=0).
    pub fn new(config: EmulatorConfig) -> std::io::Result<Self> {
        if config.model.is_some() && config.mode == EmulatorMode::Sync {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "the emulated controller's performance model needs the asynchronous mode",
            ));
        }
        let vectors = config.vectors.max(1);
        let irq = (0..vectors).map(|_| nvmed_proto::eventfd::new_eventfd()).collect::<Result<Vec<_>, _>>()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                cc: 0,
                enables: 0,
                hung: Vec::new(),
                gone: false,
                bad_blocks: config.faults.iter().filter_map(|r| r.bad_block).collect(),
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                intms: 0,
                dma: IovaTable::default(),
                unmaps_by_thread: Default::default(),
                sqs: (0..=MAX_IO_QUEUES).map(|_| None).collect(),
                cqs: (0..=MAX_IO_QUEUES).map(|_| None).collect(),
                granted: 0,
                io_count: 0,
                log_pages: 0,
                sq_creates: 0,
                delayed: Vec::new(),
                generation: 0,
                in_flight: Vec::new(),
                rng: RNG_SEED,
                model: config.model.map(PerfModel::new),
            }),
            timer_wake: Condvar::new(),
            worker_wake: Condvar::new(),
            mode: config.mode,
            host_waiting: AtomicUsize::new(0),
            namespaces: config.namespaces,
            mdts: config.mdts,
            instance: config.instance,
            sgl: config.sgl,
            wzsl: config.wzsl,
            no_write_zeroes: config.no_write_zeroes,
            dmrsl: config.dmrsl,
            version: config.version,
            faults: config.faults,
            wedge: config.wedge,
            irq_wanted: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            irq,
            counters: EmulatorCounters::default(),
            stop: AtomicBool::new(false),
            created: Instant::now(),
            epoch: Instant::now(),
        });
        let weak = Arc::downgrade(&inner);
        let thread = match config.mode {
            EmulatorMode::Sync => {
                std::thread::Builder::new().name("nvme-emu-timer".into()).spawn(move || timer_thread(weak))?
            }
            EmulatorMode::Async { .. } => std::thread::Builder::new()
                .name("nvme-emu-worker".into())
                .spawn(move || worker_thread(weak))?,
        };
        Ok(Self { inner, thread: Some(thread) })
    }

    /// The mode the controller runs in.
    pub fn mode(&self) -> EmulatorMode {
        self.inner.mode
    }

    /// The performance model, if any.
    pub fn model(&self) -> Option<ModelSpec> {
        self.inner.lock().model.as_ref().map(|m| *m.spec())
    }

    /// Commands fetched and not completed yet (asynchronous mode; always 0 in synchronous mode,
    /// where hung and delayed commands are not counted).
    pub fn commands_in_flight(&self) -> usize {
        self.inner.lock().in_flight.len()
    }

    /// What the controller has done so far.
    pub fn counters(&self) -> &EmulatorCounters {
        &self.inner.counters
    }

    /// Live DMA mappings (for leak checks).
    pub fn mapping_count(&self) -> usize {
        self.inner.lock().dma.len()
    }

    /// DMA unmaps so far, by the name of the thread that asked (to check which thread pays
    /// for unmapping).
    pub fn unmaps_by_thread(&self) -> std::collections::BTreeMap<String, u64> {
        self.inner.lock().unmaps_by_thread.clone()
    }
}

impl Drop for EmulatedController {
    fn drop(&mut self) {
        {
            // Set under the lock: the thread looks at `stop` under it before it waits, so the
            // wakeup below cannot be lost.
            let _st = self.inner.lock();
            self.inner.stop.store(true, Ordering::Release);
        }
        self.inner.timer_wake.notify_all();
        self.inner.worker_wake.notify_all();
        if let Some(t) = self.thread.take() {
            // A thread that panicked (injected `panic:` fault) already reported it.
            let _ = t.join();
        }
    }
}

fn timer_thread(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let mut st = inner.lock();
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        let mut i = 0;
        while i < st.delayed.len() {
            if st.delayed[i].due <= now {
                let d = st.delayed.swap_remove(i);
                if d.generation == st.generation {
                    inner.post(&mut st, d.cqid, d.entry);
                }
            } else {
                i += 1;
            }
        }
        let wait = st.delayed.iter().map(|d| d.due.saturating_duration_since(now)).min().unwrap_or(IDLE_WAIT);
        let _ = inner.timer_wake.wait_timeout(st, wait.min(IDLE_WAIT));
    }
}

/// The asynchronous controller: fetches commands, then completes one due command at a time,
/// chosen at random among those whose CQ has room, its DMA done under the state lock.
fn worker_thread(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        let mut st = inner.worker_lock();
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        inner.fetch(&mut st);
        match inner.complete_one(&mut st) {
            Ok(()) => {
                drop(st);
                // Let a register access that waited for this command in before the next one.
                for _ in 0..1000 {
                    if inner.host_waiting.load(Ordering::Relaxed) == 0 {
                        break;
                    }
                    std::thread::yield_now();
                }
            }
            Err(next_due) => {
                let wait = next_due.map_or(IDLE_WAIT, |t| t.saturating_duration_since(Instant::now()));
                let _ = inner.worker_wake.wait_timeout(st, wait.min(IDLE_WAIT));
            }
        }
    }
}

/// xorshift64*: a small deterministic generator for the completion order.
fn next_random(state: &mut u64) -> u64 {
    let mut x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    x.wrapping_mul(0x2545_f491_4f6c_dd1d)
}

impl Inner {
    /// The state lock, for the host side (register accesses, DMA mappings).
    fn lock(&self) -> MutexGuard<'_, State> {
        if self.is_async() {
            self.host_waiting.fetch_add(1, Ordering::Relaxed);
            let st = self.worker_lock();
            self.host_waiting.fetch_sub(1, Ordering::Relaxed);
            st
        } else {
            self.worker_lock()
        }
    }

    /// The state lock, for the controller's own threads.
    fn worker_lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn is_async(&self) -> bool {
        matches!(self.mode, EmulatorMode::Async { .. })
    }

    fn cap(&self) -> u64 {
        (u64::from(MAX_QUEUE_ENTRIES) - 1) // MQES
            | (1 << 16) // CQR
            | (if self.wedge == Wedge::None && !self.faults.iter().any(|f| f.action == FaultAction::ReadyFail) {
                15
            } else {
                1
            } << 24) // TO = 7.5 s (0.5 s wedged, or set to fail a ready wait)
            | (1 << 37) // CSS: NVM
            | (1 << 43) // CSS: I/O command sets (command-set specific Identify data)
            | (4 << 52) // MPSMAX = 64 KiB, MPSMIN = 4 KiB
    }

    fn fault(&self, st: &mut State, f: DmaFault, what: &str) {
        self.counters.dma_faults.fetch_add(1, Ordering::Relaxed);
        tracing::warn!("emulated controller: {f} while {what}; controller fatal");
        st.csts |= CSTS_CFS;
    }

    fn reset(&self, st: &mut State) {
        for q in st.sqs.iter_mut() {
            *q = None;
        }
        for q in st.cqs.iter_mut() {
            *q = None;
        }
        st.delayed.clear();
        st.hung.clear();
        // Fetched commands are dropped: never completed, their data never moved.
        st.in_flight.clear();
        if let Some(m) = st.model.as_mut() {
            m.reset(); // the commands it had scheduled are gone
        }
        st.generation += 1;
        st.granted = 0;
        st.csts = 0;
    }

    fn enable(&self, st: &mut State) {
        let asqs = (st.aqa & 0xfff) as u16 + 1;
        let acqs = ((st.aqa >> 16) & 0xfff) as u16 + 1;
        let aligned =
            st.asq.is_multiple_of(4096) && st.acq.is_multiple_of(4096) && st.asq != 0 && st.acq != 0;
        let iosqes = (st.cc >> 16) & 0xf;
        let iocqes = (st.cc >> 20) & 0xf;
        let mps = (st.cc >> 7) & 0xf;
        if !aligned || asqs < 2 || acqs < 2 || iosqes != 6 || iocqes != 4 || mps != 0 {
            tracing::warn!("emulated controller: bad admin queue or CC settings; controller fatal");
            st.csts |= CSTS_CFS;
            return;
        }
        st.enables += 1;
        if self.faults.iter().any(|f| f.action == FaultAction::ReadyFail && f.nth == st.enables) {
            tracing::warn!(enable = st.enables, "emulated controller: injected failure to become ready");
            return;
        }
        st.sqs[0] = Some(Sq { base: st.asq, size: asqs, head: 0, tail: 0, cqid: 0, rung: VecDeque::new() });
        st.cqs[0] = Some(Cq {
            base: st.acq,
            size: acqs,
            head: 0,
            tail: 0,
            phase: true,
            vector: 0,
            interrupts: true,
            overflow: VecDeque::new(),
        });
        st.csts = CSTS_RDY;
    }

    /// Posts a completion to `cqid`, raising its interrupt if wanted.
    fn post(&self, st: &mut State, cqid: u16, mut entry: NvmeCompletion) {
        let Some(cq) = st.cqs.get_mut(usize::from(cqid)).and_then(|c| c.as_mut()) else { return };
        if (cq.tail + 1) % cq.size == cq.head {
            cq.overflow.push_back(entry);
            return;
        }
        entry.status = (entry.status << 1) | u16::from(cq.phase);
        let addr = cq.base + u64::from(cq.tail) * 16;
        let (vector, interrupts) = (cq.vector, cq.interrupts);
        cq.tail += 1;
        if cq.tail == cq.size {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        if let Err(f) = st.dma.write(addr, &entry) {
            self.fault(st, f, "posting a completion");
            return;
        }
        if interrupts && st.intms & (1 << vector) == 0 {
            if let Some(w) = self.irq_wanted.get(usize::from(vector)) {
                if w.load(Ordering::Acquire) {
                    nvmed_proto::eventfd::signal(&self.irq[usize::from(vector)]);
                }
            }
        }
    }

    fn sq_doorbell(&self, st: &mut State, qid: u16, tail: u16) {
        loop {
            if st.gone || st.csts & (CSTS_RDY | CSTS_CFS) != CSTS_RDY {
                return;
            }
            let Some(sq) = st.sqs.get_mut(usize::from(qid)).and_then(|q| q.as_mut()) else { return };
            if tail >= sq.size || sq.head == tail {
                return;
            }
            let addr = sq.base + u64::from(sq.head) * 64;
            sq.head = (sq.head + 1) % sq.size;
            let (sq_head, cqid) = (sq.head, sq.cqid);
            let cmd: NvmeCommand = match st.dma.read(addr) {
                Ok(c) => c,
                Err(f) => return self.fault(st, f, "fetching a command"),
            };
            let outcome = if qid == 0 { self.admin(st, &cmd) } else { self.io(st, &cmd, qid, cqid) };
            if let Some((status, result)) = outcome {
                let entry = NvmeCompletion { result, reserved: 0, sq_head, sq_id: qid, cid: cmd.cid, status };
                self.post(st, cqid, entry);
            }
        }
    }

    /// Asynchronous mode, I/O queue: records the tail; the worker fetches the commands.
    fn sq_doorbell_async(&self, st: &mut State, qid: u16, tail: u16) {
        if st.csts & (CSTS_RDY | CSTS_CFS) != CSTS_RDY {
            return;
        }
        let Some(sq) = st.sqs.get_mut(usize::from(qid)).and_then(|q| q.as_mut()) else { return };
        if tail >= sq.size || sq.tail == tail {
            return;
        }
        sq.tail = tail;
        if st.model.is_some() {
            if sq.rung.len() >= usize::from(sq.size) {
                sq.rung.pop_front(); // only a driver moving the tail backwards gets here
            }
            sq.rung.push_back((tail, Instant::now()));
        }
        self.worker_wake.notify_one();
    }

    /// Asynchronous mode: moves every command the host published from the I/O SQs into the
    /// in-flight set, applying the fault rules.
    fn fetch(&self, st: &mut State) {
        let EmulatorMode::Async { latency } = self.mode else { return };
        let now = Instant::now();
        for qid in 1..st.sqs.len() {
            loop {
                if st.gone || st.csts & (CSTS_RDY | CSTS_CFS) != CSTS_RDY {
                    return;
                }
                let Some(sq) = st.sqs[qid].as_mut() else { break };
                if sq.head == sq.tail {
                    break;
                }
                let addr = sq.base + u64::from(sq.head) * 64;
                sq.head = (sq.head + 1) % sq.size;
                let cqid = sq.cqid;
                // When its doorbell was written (the oldest one not fetched up to covers it).
                let arrived = sq.rung.front().map_or(now, |&(_, at)| at);
                if sq.rung.front().is_some_and(|&(tail, _)| tail == sq.head) {
                    sq.rung.pop_front();
                }
                let cmd: NvmeCommand = match st.dma.read(addr) {
                    Ok(c) => c,
                    Err(f) => return self.fault(st, f, "fetching a command"),
                };
                let rule = self.io_rule(st);
                if let Some(outcome) = Self::fault_before_run(st, rule, qid as u16, cqid, cmd.cid) {
                    if let Some((status, result)) = outcome {
                        let sq_head = st.sqs[qid].as_ref().map_or(0, |s| s.head);
                        let entry = NvmeCompletion {
                            result,
                            reserved: 0,
                            sq_head,
                            sq_id: qid as u16,
                            cid: cmd.cid,
                            status,
                        };
                        self.post(st, cqid, entry);
                    }
                    continue;
                }
                let mut due = match st.model.as_mut() {
                    Some(m) => {
                        self.epoch
                            + m.schedule(arrived.saturating_duration_since(self.epoch), self.work(&cmd))
                    }
                    None => now + latency,
                };
                let mut fail = None;
                match rule {
                    Some(FaultAction::Fail { sct, sc: code }) => fail = Some(status_field(sct, code)),
                    Some(FaultAction::Delay(d)) => due += d,
                    Some(_) | None => {}
                }
                st.in_flight.push(InFlight { qid: qid as u16, cqid, cmd, due, fail });
            }
        }
    }

    /// What an I/O command asks of the performance model: its data bytes for a read or write
    /// (0 for an unknown namespace, which fails anyway), nothing for the others.
    fn work(&self, cmd: &NvmeCommand) -> Work {
        let bytes = || {
            let blocks = u64::from(cmd.cdw12 & 0xffff) + 1;
            self.namespace(cmd.nsid).map_or(0, |ns| blocks * u64::from(ns.lba_size))
        };
        match cmd.opcode {
            io::READ => Work::Read(bytes()),
            io::WRITE => Work::Write(bytes()),
            _ => Work::Other,
        }
    }

    /// Whether a completion can be posted to `cqid` now (true for a CQ that no longer exists:
    /// the completion is then dropped).
    fn cq_has_room(st: &State, cqid: u16) -> bool {
        match st.cqs.get(usize::from(cqid)).and_then(|c| c.as_ref()) {
            Some(cq) => cq.overflow.is_empty() && (cq.tail + 1) % cq.size != cq.head,
            None => true,
        }
    }

    /// Asynchronous mode: executes (data transfer included) and completes one due command whose
    /// CQ has room, chosen at random. Otherwise returns when the next one is due, if known (a
    /// command waiting for CQ room waits for a CQ head doorbell).
    fn complete_one(&self, st: &mut State) -> Result<(), Option<Instant>> {
        if st.csts & (CSTS_RDY | CSTS_CFS) != CSTS_RDY || st.in_flight.is_empty() {
            return Err(None);
        }
        let now = Instant::now();
        let mut ready = 0u64;
        let mut next_due: Option<Instant> = None;
        for c in &st.in_flight {
            if !Self::cq_has_room(st, c.cqid) {
                continue;
            }
            if c.due <= now {
                ready += 1;
            } else {
                next_due = Some(next_due.map_or(c.due, |t| t.min(c.due)));
            }
        }
        if ready == 0 {
            return Err(next_due);
        }
        let mut pick = next_random(&mut st.rng) % ready;
        let mut index = 0;
        for (i, c) in st.in_flight.iter().enumerate() {
            if c.due <= now && Self::cq_has_room(st, c.cqid) {
                if pick == 0 {
                    index = i;
                    break;
                }
                pick -= 1;
            }
        }
        let c = st.in_flight.swap_remove(index);
        let outcome = match c.fail {
            Some(status) => Some((status, 0)),
            None => match self.media_error(st, &c.cmd) {
                Some(e) => e,
                None => self.execute_io(st, &c.cmd),
            },
        };
        if let Some((status, result)) = outcome {
            let sq_head = st.sqs[usize::from(c.qid)].as_ref().map_or(0, |s| s.head);
            let entry = NvmeCompletion { result, reserved: 0, sq_head, sq_id: c.qid, cid: c.cmd.cid, status };
            self.post(st, c.cqid, entry);
        }
        Ok(())
    }

    fn cq_doorbell(&self, st: &mut State, qid: u16, head: u16) {
        let Some(cq) = st.cqs.get_mut(usize::from(qid)).and_then(|q| q.as_mut()) else { return };
        if head >= cq.size {
            return;
        }
        cq.head = head;
        while let Some(e) = st.cqs[usize::from(qid)]
            .as_mut()
            .and_then(|cq| ((cq.tail + 1) % cq.size != cq.head).then(|| cq.overflow.pop_front()).flatten())
        {
            self.post(st, qid, e);
        }
        if !st.in_flight.is_empty() {
            self.worker_wake.notify_one(); // a command may have waited for room in this CQ
        }
    }

    /// Calls `f(iova, len)` for each PRP segment of a `len`-byte transfer.
    fn walk_prps(
        &self,
        st: &State,
        prp1: u64,
        prp2: u64,
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), DmaFault>,
    ) -> Result<(), Outcome> {
        let page = 4096u64;
        let dma_err = |_| err(0, sc::DATA_TRANSFER_ERROR);
        if !prp1.is_multiple_of(4) {
            return Err(err(0, sc::INVALID_FIELD));
        }
        let first = len.min(page - prp1 % page);
        f(prp1, first).map_err(dma_err)?;
        let mut left = len - first;
        if left == 0 {
            return Ok(());
        }
        if left <= page {
            if !prp2.is_multiple_of(page) {
                return Err(err(0, sc::INVALID_FIELD));
            }
            return f(prp2, left).map_err(dma_err);
        }
        let mut list = prp2;
        if !list.is_multiple_of(8) {
            return Err(err(0, sc::INVALID_FIELD));
        }
        while left > 0 {
            let last_in_page = list % page == page - 8;
            let entry: u64 = st.dma.read(list).map_err(dma_err)?;
            if last_in_page && left > page {
                list = entry; // chained list
                if !list.is_multiple_of(8) {
                    return Err(err(0, sc::INVALID_FIELD));
                }
                continue;
            }
            if !entry.is_multiple_of(page) {
                return Err(err(0, sc::INVALID_FIELD));
            }
            let n = left.min(page);
            f(entry, n).map_err(dma_err)?;
            left -= n;
            list += 8;
        }
        Ok(())
    }

    /// Calls `f(iova, len)` for each piece of a `len`-byte transfer described by the command's
    /// PRPs or, if PSDT says so (and SGLs are enabled), its SGL.
    fn walk_data(
        &self,
        st: &State,
        cmd: &NvmeCommand,
        len: u64,
        f: impl FnMut(u64, u64) -> Result<(), DmaFault>,
    ) -> Result<(), Outcome> {
        match cmd.flags & sgl::PSDT_MASK {
            0 => self.walk_prps(st, cmd.prp1, cmd.prp2, len, f),
            // PSDT 10b only says where the metadata SGL is; there is no metadata here.
            psdt if self.sgl && psdt != sgl::PSDT_MASK => self.walk_sgl(st, (cmd.prp1, cmd.prp2), len, f),
            _ => Err(err(0, sc::INVALID_FIELD)),
        }
    }

    /// Calls `f(iova, len)` for the first `len` bytes an SGL describes (SGL1 given as the
    /// command's two words): Data Block descriptors, directly in SGL1 or in lists reached
    /// through Segment and Last Segment descriptors. Each data block is handed over in pieces
    /// that do not cross a page boundary (as an IOMMU translates it). Its data blocks must add
    /// up to the transfer exactly: shorter or longer is "data SGL length invalid" (Identify
    /// SGLS does not say that longer ones are allowed, as QEMU's model refuses them too).
    fn walk_sgl(
        &self,
        st: &State,
        sgl1: (u64, u64),
        len: u64,
        mut f: impl FnMut(u64, u64) -> Result<(), DmaFault>,
    ) -> Result<(), Outcome> {
        /// Longest chain of segment lists followed (a list pointing back at itself must end).
        const MAX_LISTS: u32 = 4096;
        let dma_err = |_| err(0, sc::DATA_TRANSFER_ERROR);
        let mut left = len;
        let mut data = |address: u64, length: u32, left: &mut u64| -> Result<(), Outcome> {
            if u64::from(length) > *left {
                return Err(err(0, sc::DATA_SGL_LENGTH_INVALID));
            }
            let mut n = u64::from(length);
            let mut a = address;
            while n > 0 {
                let chunk = n.min(4096 - a % 4096);
                f(a, chunk).map_err(dma_err)?;
                a += chunk;
                n -= chunk;
                *left -= chunk;
            }
            Ok(())
        };
        let (address, length, kind, subtype) = sgl::parse(sgl1);
        if subtype != 0 {
            return Err(err(0, sc::SGL_DESCRIPTOR_TYPE_INVALID));
        }
        match kind {
            sgl::DATA_BLOCK => data(address, length, &mut left)?,
            sgl::SEGMENT | sgl::LAST_SEGMENT => {
                let (mut list, mut list_len, mut last) = (address, length, kind == sgl::LAST_SEGMENT);
                let mut lists = 0u32;
                loop {
                    if list_len == 0 || u64::from(list_len) % sgl::DESCRIPTOR_SIZE != 0 {
                        return Err(err(0, sc::INVALID_SGL_SEGMENT));
                    }
                    lists += 1;
                    if lists > MAX_LISTS {
                        return Err(err(0, sc::INVALID_SGL_COUNT));
                    }
                    let n = u64::from(list_len) / sgl::DESCRIPTOR_SIZE;
                    let mut next = None;
                    for i in 0..n {
                        let at = list + i * sgl::DESCRIPTOR_SIZE;
                        let words = (
                            st.dma.read::<u64>(at).map_err(dma_err)?,
                            st.dma.read::<u64>(at + 8).map_err(dma_err)?,
                        );
                        let (a, l, k, sub) = sgl::parse(words);
                        if sub != 0 {
                            return Err(err(0, sc::SGL_DESCRIPTOR_TYPE_INVALID));
                        }
                        match k {
                            sgl::DATA_BLOCK => data(a, l, &mut left)?,
                            // Only the last descriptor of a (non-last) segment may chain on.
                            sgl::SEGMENT | sgl::LAST_SEGMENT if !last && i == n - 1 => {
                                next = Some((a, l, k == sgl::LAST_SEGMENT))
                            }
                            sgl::SEGMENT | sgl::LAST_SEGMENT => return Err(err(0, sc::INVALID_SGL_SEGMENT)),
                            _ => return Err(err(0, sc::SGL_DESCRIPTOR_TYPE_INVALID)),
                        }
                    }
                    match next {
                        Some((a, l, k)) => (list, list_len, last) = (a, l, k),
                        None => break,
                    }
                }
            }
            _ => return Err(err(0, sc::SGL_DESCRIPTOR_TYPE_INVALID)),
        }
        if left > 0 {
            return Err(err(0, sc::DATA_SGL_LENGTH_INVALID));
        }
        Ok(())
    }

    fn write_data(&self, st: &State, cmd: &NvmeCommand, data: &[u8]) -> Outcome {
        let mut off = 0usize;
        let r = self.walk_prps(st, cmd.prp1, cmd.prp2, data.len() as u64, |iova, n| {
            st.dma.write_bytes(iova, &data[off..off + n as usize])?;
            off += n as usize;
            Ok(())
        });
        match r {
            Ok(()) => ok(),
            Err(o) => o,
        }
    }

    fn admin(&self, st: &mut State, cmd: &NvmeCommand) -> Outcome {
        // Admin commands use PRPs (PSDT 00b) and are never fused.
        if cmd.flags != 0 {
            return err(0, sc::INVALID_FIELD);
        }
        match cmd.opcode {
            admin::IDENTIFY => {
                let cns = u64::from(cmd.cdw10 & 0xff);
                if self.faults.iter().any(|r| r.action == FaultAction::IdentifyHang && r.nth == cns) {
                    tracing::warn!("emulated controller: injected hang of Identify CNS {cns:#04x}");
                    return None; // never completes (a reset empties the admin queue)
                }
                let mut d = vec![0u8; 4096];
                let cns = if self.version < 0x0001_0100 { cmd.cdw10 & 1 } else { cmd.cdw10 & 0xff };
                match cns {
                    admin::CNS_CONTROLLER => {
                        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        put_ascii(
                            &mut d[id_ctrl::SN..id_ctrl::SN + 20],
                            &format!("NVMED-EMU-{:04}", u32::from(self.instance) + 1),
                        );
                        put_ascii(&mut d[id_ctrl::MN..id_ctrl::MN + 40], "nvmed emulated NVMe controller");
                        put_ascii(&mut d[id_ctrl::FR..id_ctrl::FR + 8], env!("CARGO_PKG_VERSION"));
                        d[id_ctrl::MDTS] = self.mdts;
                        d[80..84].copy_from_slice(&self.version.to_le_bytes());
                        d[id_ctrl::SQES] = 0x66;
                        d[id_ctrl::CQES] = 0x44;
                        d[id_ctrl::NN..id_ctrl::NN + 4]
                            .copy_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
                        let oncs = if self.no_write_zeroes {
                            id_ctrl::ONCS_DSM
                        } else {
                            id_ctrl::ONCS_DSM | id_ctrl::ONCS_WRITE_ZEROES
                        };
                        d[id_ctrl::ONCS..id_ctrl::ONCS + 2].copy_from_slice(&oncs.to_le_bytes());
                        d[id_ctrl::VWC] = 1;
                        let sgls: u32 = if self.sgl { 1 } else { 0 };
                        d[id_ctrl::SGLS..id_ctrl::SGLS + 4].copy_from_slice(&sgls.to_le_bytes());
                    }
                    admin::CNS_NAMESPACE => {
                        let Some(ns) = self.namespace(cmd.nsid) else { return err(0, sc::INVALID_NAMESPACE) };
                        let mut blocks = ns.backend.size() / u64::from(ns.lba_size);
                        if self.faults.iter().any(|f| f.action == FaultAction::Shrink && st.enables >= f.nth)
                        {
                            blocks /= 2;
                        }
                        for off in [id_ns::NSZE, id_ns::NCAP, id_ns::NUSE] {
                            d[off..off + 8].copy_from_slice(&blocks.to_le_bytes());
                        }
                        d[id_ns::NLBAF] = 0;
                        d[id_ns::FLBAS] = 0;
                        let lbads = ns.lba_size.trailing_zeros();
                        d[id_ns::LBAF0..id_ns::LBAF0 + 4].copy_from_slice(&(lbads << 16).to_le_bytes());
                    }
                    admin::CNS_CS_CONTROLLER if cmd.cdw11 >> 24 == 0 => {
                        d[id_ctrl_nvm::WZSL] = self.wzsl;
                        d[id_ctrl_nvm::DMRSL..id_ctrl_nvm::DMRSL + 4]
                            .copy_from_slice(&self.dmrsl.to_le_bytes());
                    }
                    admin::CNS_ACTIVE_NS_LIST => {
                        let ids = (1..=self.namespaces.len() as u32).filter(|&id| id > cmd.nsid);
                        for (i, id) in ids.take(1024).enumerate() {
                            d[i * 4..i * 4 + 4].copy_from_slice(&id.to_le_bytes());
                        }
                    }
                    _ => return err(0, sc::INVALID_FIELD),
                }
                self.write_data(st, cmd, &d)
            }
            admin::SET_FEATURES | admin::GET_FEATURES => match cmd.cdw10 & 0xff {
                admin::FEAT_NUM_QUEUES => {
                    if cmd.opcode == admin::SET_FEATURES && st.granted == 0 {
                        let want = ((cmd.cdw11 & 0xffff).min(cmd.cdw11 >> 16) + 1) as u16;
                        st.granted = want.min(MAX_IO_QUEUES);
                    }
                    let n = u32::from(st.granted.max(1) - 1);
                    Some((0, n | (n << 16)))
                }
                0x06 => ok(), // volatile write cache: always on
                _ => err(0, sc::INVALID_FIELD),
            },
            admin::CREATE_CQ => {
                let qid = (cmd.cdw10 & 0xffff) as u16;
                let size = (cmd.cdw10 >> 16) + 1;
                let vector = (cmd.cdw11 >> 16) as u16;
                if qid == 0 || qid > st.granted || st.cqs[usize::from(qid)].is_some() {
                    return err(1, sc::CS_INVALID_QID);
                }
                if !(2..=MAX_QUEUE_ENTRIES).contains(&size) {
                    return err(1, sc::CS_INVALID_QSIZE);
                }
                if cmd.cdw11 & 1 == 0
                    || !cmd.prp1.is_multiple_of(4096)
                    || usize::from(vector) >= self.irq.len()
                {
                    return err(0, sc::INVALID_FIELD);
                }
                st.cqs[usize::from(qid)] = Some(Cq {
                    base: cmd.prp1,
                    size: size as u16,
                    head: 0,
                    tail: 0,
                    phase: true,
                    vector,
                    interrupts: cmd.cdw11 & 2 != 0,
                    overflow: VecDeque::new(),
                });
                ok()
            }
            admin::CREATE_SQ => {
                st.sq_creates += 1;
                let n = st.sq_creates;
                if self.faults.iter().any(|r| r.action == FaultAction::CreateSqFail && r.nth == n) {
                    tracing::warn!("emulated controller: injected failure of Create I/O SQ {n}");
                    return err(0, sc::INTERNAL);
                }
                let qid = (cmd.cdw10 & 0xffff) as u16;
                let size = (cmd.cdw10 >> 16) + 1;
                let cqid = (cmd.cdw11 >> 16) as u16;
                if qid == 0 || qid > st.granted || st.sqs[usize::from(qid)].is_some() {
                    return err(1, sc::CS_INVALID_QID);
                }
                if cqid == 0 || st.cqs.get(usize::from(cqid)).is_none_or(|c| c.is_none()) {
                    return err(1, sc::CS_INVALID_CQ);
                }
                if !(2..=MAX_QUEUE_ENTRIES).contains(&size) {
                    return err(1, sc::CS_INVALID_QSIZE);
                }
                if cmd.cdw11 & 1 == 0 || !cmd.prp1.is_multiple_of(4096) {
                    return err(0, sc::INVALID_FIELD);
                }
                st.sqs[usize::from(qid)] = Some(Sq {
                    base: cmd.prp1,
                    size: size as u16,
                    head: 0,
                    tail: 0,
                    cqid,
                    rung: VecDeque::new(),
                });
                ok()
            }
            admin::DELETE_SQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                if qid == 0 || st.sqs.get(qid).is_none_or(|s| s.is_none()) {
                    return err(1, sc::CS_INVALID_QID);
                }
                st.sqs[qid] = None;
                // Commands of this queue still waiting (delayed or hung) are dropped with it.
                let sqid = qid as u16;
                st.delayed.retain(|d| d.entry.sq_id != sqid);
                st.hung.retain(|h| h.qid != sqid);
                st.in_flight.retain(|c| c.qid != sqid);
                ok()
            }
            admin::DELETE_CQ => {
                let qid = (cmd.cdw10 & 0xffff) as u16;
                if qid == 0 || st.cqs.get(usize::from(qid)).is_none_or(|c| c.is_none()) {
                    return err(1, sc::CS_INVALID_QID);
                }
                if st.sqs.iter().flatten().any(|s| s.cqid == qid) {
                    return err(1, sc::CS_INVALID_QUEUE_DELETION);
                }
                st.cqs[usize::from(qid)] = None;
                ok()
            }
            admin::ABORT => {
                let (sqid, cid) = ((cmd.cdw10 & 0xffff) as u16, (cmd.cdw10 >> 16) as u16);
                let found = st.hung.iter().position(|h| h.qid == sqid && h.cid == cid && h.abortable);
                let Some(i) = found else { return Some((0, 1)) }; // "command not aborted"
                let h = st.hung.swap_remove(i);
                let sq_head = st.sqs[usize::from(h.qid)].as_ref().map_or(0, |s| s.head);
                let entry = NvmeCompletion {
                    result: 0,
                    reserved: 0,
                    sq_head,
                    sq_id: h.qid,
                    cid: h.cid,
                    status: ABORTED_STATUS,
                };
                self.post(st, h.cqid, entry);
                Some((0, 0)) // aborted
            }
            admin::GET_LOG_PAGE => {
                st.log_pages += 1;
                let n = st.log_pages;
                if self.faults.iter().any(|r| r.action == FaultAction::LogPageHang && r.nth == n) {
                    tracing::warn!("emulated controller: injected hang of Get Log Page {n}");
                    return None; // never completes (a reset empties the admin queue)
                }
                self.get_log_page(st, cmd)
            }
            _ => err(0, sc::INVALID_OPCODE),
        }
    }

    /// Get Log Page: only the SMART / Health Information page (synthetic, but consistent with
    /// what the controller did); other pages are an invalid field.
    fn get_log_page(&self, st: &State, cmd: &NvmeCommand) -> Outcome {
        let lid = (cmd.cdw10 & 0xff) as u8;
        let numd = (u64::from(cmd.cdw11 & 0xffff) << 16 | u64::from(cmd.cdw10 >> 16)) + 1;
        let offset = u64::from(cmd.cdw12) | u64::from(cmd.cdw13) << 32;
        let len = numd * 4;
        if lid != admin::LID_SMART
            || len > 4096
            || offset % 4 != 0
            || offset >= crate::nvme::smart::LEN as u64
        {
            return err(0, sc::INVALID_FIELD);
        }
        let c = &self.counters;
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let log = nvmed_proto::admin::SmartLog {
            temperature_kelvin: 313,
            available_spare: 100,
            available_spare_threshold: 10,
            data_units_read: nvmed_proto::admin::SmartLog::data_units(l(&c.bytes_to_host)),
            data_units_written: nvmed_proto::admin::SmartLog::data_units(l(&c.bytes_from_host)),
            host_read_commands: l(&c.read_commands),
            host_write_commands: l(&c.write_commands),
            power_cycles: 1,
            power_on_hours: self.created.elapsed().as_secs() / 3600,
            ..Default::default()
        };
        let page = crate::nvme::smart::encode(&log);
        // Beyond the page's 512 bytes the transfer reads as zeroes.
        let mut data = vec![0u8; len as usize];
        let from = &page[offset as usize..];
        let n = from.len().min(data.len());
        data[..n].copy_from_slice(&from[..n]);
        self.write_data(st, cmd, &data)
    }

    fn namespace(&self, nsid: u32) -> Option<&EmulatedNamespace> {
        nsid.checked_sub(1).and_then(|i| self.namespaces.get(i as usize))
    }

    /// Counts a fetched I/O command and returns the fault rule for it (panicking for `panic:`).
    fn io_rule(&self, st: &mut State) -> Option<FaultAction> {
        st.io_count += 1;
        bump_locked(&self.counters.io_commands, 1);
        let rule = self
            .faults
            .iter()
            .find(|r| {
                r.nth == st.io_count
                    && !matches!(
                        r.action,
                        FaultAction::LogPageHang
                            | FaultAction::CreateSqFail
                            | FaultAction::IdentifyHang
                            | FaultAction::ReadyFail
                            | FaultAction::Shrink
                    )
            })
            .map(|r| r.action);
        if rule == Some(FaultAction::Panic) {
            panic!("emulated controller: injected panic on I/O command {}", st.io_count);
        }
        rule
    }

    fn io(&self, st: &mut State, cmd: &NvmeCommand, qid: u16, cqid: u16) -> Outcome {
        let rule = self.io_rule(st);
        if let Some(FaultAction::Fail { sct, sc: code }) = rule {
            return err(sct, code);
        }
        if let Some(outcome) = Self::fault_before_run(st, rule, qid, cqid, cmd.cid) {
            return outcome;
        }
        let outcome = match self.media_error(st, cmd) {
            Some(e) => e,
            None => self.execute_io(st, cmd),
        };
        if let (Some(FaultAction::Delay(d)), Some((status, result))) = (rule, outcome) {
            let entry = NvmeCompletion {
                result,
                reserved: 0,
                sq_head: st.sqs[usize::from(qid)].as_ref().map_or(0, |s| s.head),
                sq_id: qid,
                cid: cmd.cid,
                status,
            };
            let generation = st.generation;
            st.delayed.push(Delayed { due: Instant::now() + d, generation, cqid, entry });
            self.timer_wake.notify_all();
            return None;
        }
        outcome
    }

    /// What the faults that stop a command before it runs do with it: `Some(outcome)` if it
    /// does not run (`Some(None)`: it never completes).
    fn fault_before_run(
        st: &mut State,
        rule: Option<FaultAction>,
        qid: u16,
        cqid: u16,
        cid: u16,
    ) -> Option<Outcome> {
        match rule? {
            FaultAction::Hang | FaultAction::Stuck => {
                let abortable = rule == Some(FaultAction::Hang);
                st.hung.push(Hung { qid, cqid, cid, abortable });
                Some(None)
            }
            FaultAction::Retry => Some(Some((RETRYABLE_STATUS, 0))),
            FaultAction::Fatal => {
                tracing::warn!("emulated controller: injected fatal status (CSTS.CFS)");
                st.csts |= CSTS_CFS;
                Some(None)
            }
            FaultAction::Gone => {
                tracing::warn!("emulated controller: injected surprise removal");
                st.gone = true;
                st.in_flight.clear();
                st.delayed.clear();
                st.hung.clear();
                Some(None)
            }
            FaultAction::Fail { .. } | FaultAction::Delay(_) | FaultAction::Panic => None,
            // Admin faults: never chosen for I/O.
            FaultAction::LogPageHang
            | FaultAction::CreateSqFail
            | FaultAction::IdentifyHang
            | FaultAction::ReadyFail
            | FaultAction::Shrink => None,
        }
    }

    /// A read covering a bad block fails with an unrecovered read error (DNR set); a write or
    /// write zeroes covering one repairs it (as a drive remaps a block on write).
    fn media_error(&self, st: &mut State, cmd: &NvmeCommand) -> Option<Outcome> {
        if st.bad_blocks.is_empty() {
            return None;
        }
        let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
        let end = slba.saturating_add(u64::from(cmd.cdw12 & 0xffff) + 1);
        let range = (cmd.nsid, slba)..(cmd.nsid, end);
        match cmd.opcode {
            io::READ => st.bad_blocks.range(range).next().map(|_| err(2, 0x81)),
            io::WRITE | io::WRITE_ZEROES => {
                let hit: Vec<_> = st.bad_blocks.range(range).copied().collect();
                for b in hit {
                    st.bad_blocks.remove(&b);
                }
                None
            }
            _ => None,
        }
    }

    fn execute_io(&self, st: &State, cmd: &NvmeCommand) -> Outcome {
        // Fused operations are not supported (Identify FUSES = 0).
        if cmd.flags & FUSE_MASK != 0 {
            return err(0, sc::INVALID_FIELD);
        }
        let Some(ns) = self.namespace(cmd.nsid) else { return err(0, sc::INVALID_NAMESPACE) };
        let lba = u64::from(ns.lba_size);
        let blocks = ns.backend.size() / lba;
        let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
        let nlb = u64::from(cmd.cdw12 & 0xffff) + 1;
        let in_range = || slba.checked_add(nlb).is_some_and(|end| end <= blocks);
        let io_err = |e: std::io::Error| {
            tracing::error!("emulated namespace I/O failed: {e}");
            err(2, if cmd.opcode == io::READ { 0x81 } else { 0x80 })
        };
        match cmd.opcode {
            io::READ | io::WRITE => {
                if !in_range() {
                    return err(0, sc::LBA_OUT_OF_RANGE);
                }
                let len = nlb * lba;
                if self.mdts != 0 && len > 4096u64 << self.mdts {
                    return err(0, sc::INVALID_FIELD);
                }
                let mut pos = slba * lba;
                let read = cmd.opcode == io::READ;
                let mut io_failure = None;
                let r = self.walk_data(st, cmd, len, |iova, n| {
                    let host = st.dma.translate(iova, n).inspect_err(|_| {
                        self.counters.dma_faults.fetch_add(1, Ordering::Relaxed);
                    })?;
                    // SAFETY: `host` covers `n` bytes the driver mapped for device access.
                    let res = unsafe {
                        if read {
                            ns.backend.read_into(pos, host, n as usize)
                        } else {
                            ns.backend.write_from(pos, host, n as usize)
                        }
                    };
                    if let Err(e) = res {
                        io_failure.get_or_insert(e);
                    }
                    pos += n;
                    Ok(())
                });
                if let Err(o) = r {
                    return o;
                }
                if let Some(e) = io_failure {
                    return io_err(e);
                }
                let counter =
                    if read { &self.counters.bytes_to_host } else { &self.counters.bytes_from_host };
                bump_locked(counter, len);
                let commands =
                    if read { &self.counters.read_commands } else { &self.counters.write_commands };
                bump_locked(commands, 1);
                if !read && cmd.cdw12 & io::CDW12_FUA != 0 {
                    if let Err(e) = ns.backend.flush() {
                        return io_err(e);
                    }
                }
                ok()
            }
            io::FLUSH => ns.backend.flush().map_or_else(io_err, |_| ok()),
            io::WRITE_ZEROES => {
                if self.no_write_zeroes {
                    return err(0, sc::INVALID_OPCODE);
                }
                if !in_range() {
                    return err(0, sc::LBA_OUT_OF_RANGE);
                }
                if id_ctrl_nvm::wzsl_bytes(4096, self.wzsl).is_some_and(|max| nlb * lba > max) {
                    return err(0, sc::INVALID_FIELD);
                }
                let r = ns.backend.write_zeroes(slba * lba, nlb * lba);
                let r =
                    r.and_then(|_| if cmd.cdw12 & io::CDW12_FUA != 0 { ns.backend.flush() } else { Ok(()) });
                r.map_or_else(io_err, |_| ok())
            }
            io::DSM => {
                let nr = (cmd.cdw10 & 0xff) as usize + 1;
                let mut ranges = vec![0u8; nr * 16];
                let mut off = 0usize;
                if let Err(o) = self.walk_data(st, cmd, ranges.len() as u64, |iova, n| {
                    st.dma.read_bytes(iova, &mut ranges[off..off + n as usize])?;
                    off += n as usize;
                    Ok(())
                }) {
                    return o;
                }
                if cmd.cdw11 & io::DSM_DEALLOCATE == 0 {
                    return ok();
                }
                for r in ranges.chunks_exact(16) {
                    let n = u64::from(u32::from_le_bytes(r[4..8].try_into().unwrap()));
                    let s = u64::from_le_bytes(r[8..16].try_into().unwrap());
                    if s.checked_add(n).is_none_or(|e| e > blocks) {
                        return err(0, sc::LBA_OUT_OF_RANGE);
                    }
                    if self.dmrsl != 0 && n > u64::from(self.dmrsl) {
                        return err(0, sc::INVALID_FIELD);
                    }
                    if let Err(e) = ns.backend.deallocate(s * lba, n * lba) {
                        return io_err(e);
                    }
                }
                ok()
            }
            _ => err(0, sc::INVALID_OPCODE),
        }
    }
}

fn put_ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}

impl Dma for EmulatedController {
    unsafe fn dma_map(&self, iova: u64, host: *mut u8, len: u64) -> Result<(), DeviceError> {
        self.inner.lock().dma.insert(iova, host, len)
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), DeviceError> {
        let thread = std::thread::current().name().unwrap_or("unnamed").to_string();
        let mut st = self.inner.lock();
        *st.unmaps_by_thread.entry(thread).or_default() += 1;
        st.dma.remove(iova, len)
    }
}

impl NvmeDevice for EmulatedController {
    fn set_bus_master(&self, enabled: bool) -> Result<(), DeviceError> {
        if self.inner.wedge == Wedge::ResetAndBusMaster {
            return Err(DeviceError::Other("emulated controller wedged: Bus Master Enable stuck".into()));
        }
        self.inner.lock().dma.set_blocked(!enabled);
        Ok(())
    }

    fn name(&self) -> String {
        format!("emulated-{}", self.inner.instance)
    }

    fn read32(&self, offset: u64) -> u32 {
        let st = self.inner.lock();
        if st.gone {
            return u32::MAX;
        }
        let cap = self.inner.cap();
        match offset {
            o if o == REG_CAP => cap as u32,
            o if o == REG_CAP + 4 => (cap >> 32) as u32,
            o if o == REG_VS => self.inner.version,
            o if o == REG_INTMS || o == REG_INTMC => st.intms,
            o if o == REG_CC => st.cc,
            o if o == REG_CSTS => st.csts,
            o if o == REG_AQA => st.aqa,
            o if o == REG_ASQ => st.asq as u32,
            o if o == REG_ASQ + 4 => (st.asq >> 32) as u32,
            o if o == REG_ACQ => st.acq as u32,
            o if o == REG_ACQ + 4 => (st.acq >> 32) as u32,
            _ => 0,
        }
    }

    fn write32(&self, offset: u64, value: u32) {
        let inner = &self.inner;
        let mut st = inner.lock();
        let st = &mut *st;
        if st.gone {
            return;
        }
        match offset {
            o if o >= REG_DOORBELL_BASE => {
                let idx = (o - REG_DOORBELL_BASE) / 4;
                let qid = (idx / 2) as u16;
                if (idx % 2) == 1 {
                    inner.cq_doorbell(st, qid, value as u16);
                } else if qid != 0 && inner.is_async() {
                    inner.sq_doorbell_async(st, qid, value as u16);
                } else {
                    inner.sq_doorbell(st, qid, value as u16);
                }
            }
            o if o == REG_CC => {
                let was = st.cc;
                st.cc = value;
                if was & CC_EN == 0 && value & CC_EN != 0 {
                    inner.enable(st);
                } else if was & CC_EN != 0 && value & CC_EN == 0 && inner.wedge != Wedge::None {
                    st.cc = was; // wedged: ignores the reset, keeps CSTS.RDY
                } else if was & CC_EN != 0 && value & CC_EN == 0 {
                    inner.reset(st);
                }
                if value & CC_SHN_MASK != 0 && st.csts & CSTS_SHST_MASK == 0 {
                    for ns in &inner.namespaces {
                        let _ = ns.backend.flush();
                    }
                    st.csts |= CSTS_SHST_COMPLETE;
                }
            }
            o if o == REG_INTMS => st.intms |= value,
            o if o == REG_INTMC => st.intms &= !value,
            o if o == REG_AQA => st.aqa = value,
            o if o == REG_ASQ => st.asq = (st.asq & !0xffff_ffff) | u64::from(value),
            o if o == REG_ASQ + 4 => st.asq = (st.asq & 0xffff_ffff) | (u64::from(value) << 32),
            o if o == REG_ACQ => st.acq = (st.acq & !0xffff_ffff) | u64::from(value),
            o if o == REG_ACQ + 4 => st.acq = (st.acq & 0xffff_ffff) | (u64::from(value) << 32),
            _ => {}
        }
    }

    fn iova_ranges(&self) -> Vec<RangeInclusive<u64>> {
        vec![0..=(1u64 << 48) - 1]
    }

    fn interrupt_vectors(&self) -> u16 {
        self.inner.irq.len() as u16
    }

    fn interrupt_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.inner.irq.get(usize::from(vector)).map(|f| f.as_fd())
    }

    fn interrupt_hint(&self, vector: u16, wanted: bool) {
        if let Some(w) = self.inner.irq_wanted.get(usize::from(vector)) {
            w.store(wanted, Ordering::Release);
        }
    }

    fn dma_data_bytes(&self) -> Option<u64> {
        let c = &self.inner.counters;
        Some(c.bytes_to_host.load(Ordering::Relaxed) + c.bytes_from_host.load(Ordering::Relaxed))
    }

    fn function_reset(&self) -> Result<(), DeviceError> {
        if matches!(self.inner.wedge, Wedge::Reset | Wedge::ResetAndBusMaster) {
            return Err(DeviceError::Other("emulated controller wedged: function reset failed".into()));
        }
        if self.inner.lock().gone {
            return Err(DeviceError::Other("emulated controller removed: function reset failed".into()));
        }
        // Bus Master Enable stays as it was (vfio-pci restores the command register).
        let mut st = self.inner.lock();
        self.inner.reset(&mut st);
        st.cc = 0;
        st.intms = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::backend::MemoryBackend;
    use super::*;
    use crate::iova::{DmaMemory, IovaSpace};
    use crate::nvme::{Controller, DmaSeg, IoCommand, IoQueue, RwCommand, SglSupport, Transfer};

    type Setup = (Arc<dyn NvmeDevice>, Arc<IovaSpace>, Controller, IoQueue<u32>);

    fn setup(faults: Vec<FaultRule>) -> Setup {
        setup_with(faults, EmulatorMode::Sync, Box::new(MemoryBackend::new(1 << 20).unwrap()))
    }

    fn setup_async(faults: Vec<FaultRule>, latency: Duration) -> Setup {
        let backend = Box::new(MemoryBackend::new(1 << 20).unwrap());
        setup_with(faults, EmulatorMode::Async { latency }, backend)
    }

    fn setup_with(faults: Vec<FaultRule>, mode: EmulatorMode, backend: Box<dyn Backend>) -> Setup {
        setup_emulator(faults, mode, backend).1
    }

    /// Also returns the controller itself.
    fn setup_emulator(
        faults: Vec<FaultRule>,
        mode: EmulatorMode,
        backend: Box<dyn Backend>,
    ) -> (Arc<EmulatedController>, Setup) {
        setup_emulator_sgl(faults, mode, backend, true)
    }

    fn setup_emulator_sgl(
        faults: Vec<FaultRule>,
        mode: EmulatorMode,
        backend: Box<dyn Backend>,
        sgl: bool,
    ) -> (Arc<EmulatedController>, Setup) {
        setup_from(EmulatorConfig {
            namespaces: vec![EmulatedNamespace { backend, lba_size: 512 }],
            mdts: 5,
            vectors: 2,
            faults,
            mode,
            wedge: Default::default(),
            sgl,
            wzsl: 0,
            dmrsl: 0,
            instance: 0,
            model: None,
            ..Default::default()
        })
    }

    /// A controller with one 1 MiB namespace of 512-byte blocks and MDTS 5, initialized, with
    /// I/O queue 1 (64 entries).
    fn setup_from(config: EmulatorConfig) -> (Arc<EmulatedController>, Setup) {
        let emu = Arc::new(EmulatedController::new(config).unwrap());
        let dev: Arc<dyn NvmeDevice> = emu.clone();
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        let mut ctrl = Controller::init(dev.clone(), space.clone()).unwrap();
        assert_eq!(ctrl.info().namespaces[0].lba_count, 2048);
        assert_eq!(ctrl.info().max_transfer, 128 << 10);
        assert_eq!(ctrl.request_io_queues(2).unwrap(), 2);
        let qp = ctrl.create_io_queue(1, 64, Some(1)).unwrap();
        let q = IoQueue::new(qp, &dev, &space).unwrap();
        (emu, (dev, space, ctrl, q))
    }

    fn run(q: &mut IoQueue<u32>, cmd: IoCommand) -> u16 {
        q.submit(&cmd, 7).unwrap();
        q.ring_doorbell();
        let mut status = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while status.is_none() && Instant::now() < deadline {
            q.reap(1, |ctx, s, _| {
                assert_eq!(ctx, 7);
                status = Some(s)
            });
        }
        status.expect("command completed")
    }

    #[test]
    fn dma_to_an_unmapped_iova_is_a_data_transfer_error() {
        let (dev, space, _ctrl, mut q) = setup(vec![]);
        let buf = DmaMemory::new(&space, &dev, 64 << 10).unwrap();
        buf.mem().fill(0, 64 << 10, 0x3c);
        let w =
            IoCommand::Write { nsid: 1, slba: 0, blocks: 128, iova: buf.iova(), len: 64 << 10, fua: true };
        assert_eq!(run(&mut q, w), 0);
        // The same transfer from an IOVA nobody mapped: refused by the "IOMMU", no host access.
        let stray = buf.iova() + (32 << 20);
        let r = IoCommand::Read { nsid: 1, slba: 0, blocks: 128, iova: stray, len: 64 << 10 };
        let s = run(&mut q, r);
        assert_eq!(s & 0x7ff, u16::from(sc::DATA_TRANSFER_ERROR), "status {s:#x}");
        // Past the namespace: LBA out of range.
        let r = IoCommand::Read { nsid: 1, slba: 2047, blocks: 2, iova: buf.iova(), len: 1024 };
        assert_eq!(run(&mut q, r) & 0xff, u16::from(sc::LBA_OUT_OF_RANGE));
        // Data went through PRP lists and came back intact.
        buf.mem().fill(0, 64 << 10, 0);
        let r = IoCommand::Read { nsid: 1, slba: 0, blocks: 128, iova: buf.iova(), len: 64 << 10 };
        assert_eq!(run(&mut q, r), 0);
        let mut out = vec![0u8; 64 << 10];
        buf.mem().copy_out(0, &mut out);
        assert!(out.iter().all(|&b| b == 0x3c));
    }

    #[test]
    fn injected_status_and_shutdown() {
        let rule = FaultRule {
            nth: 2,
            action: FaultAction::Fail { sct: 2, sc: 0x80 },
            bad_block: None,
            controller: None,
        };
        let (dev, space, mut ctrl, mut q) = setup(vec![rule]);
        let buf = DmaMemory::new(&space, &dev, 4096).unwrap();
        let w = IoCommand::Write { nsid: 1, slba: 8, blocks: 8, iova: buf.iova(), len: 4096, fua: false };
        assert_eq!(run(&mut q, w), 0);
        let s = run(&mut q, w);
        assert_eq!((s >> 8) & 7, 2);
        assert_eq!(s & 0xff, 0x80);
        assert_eq!(run(&mut q, w), 0);
        assert_eq!(run(&mut q, IoCommand::Flush { nsid: 1 }), 0);
        ctrl.delete_io_queue(q.into_queue_pair()).unwrap();
        ctrl.shutdown().unwrap();
        assert_eq!(dev.read32(REG_CSTS) & CSTS_SHST_MASK, CSTS_SHST_COMPLETE);
    }

    fn raw(qp: &mut crate::nvme::queue::QueuePair, cmd: NvmeCommand) -> u16 {
        qp.push(&cmd);
        qp.ring_doorbell();
        let mut status = None;
        let deadline = Instant::now() + Duration::from_secs(5);
        while status.is_none() && Instant::now() < deadline {
            qp.reap(1, |c| status = Some(c.status_field()));
        }
        status.expect("command completed")
    }

    #[test]
    fn chained_prp_lists_and_multi_range_deallocate() {
        let (dev, space, mut ctrl, _q) = setup(vec![]);
        let mut qp = ctrl.create_io_queue(2, 16, None).unwrap();
        // Four data pages and two list pages: the first list starts 16 bytes before the end of
        // its page, so its last entry must chain to the second list.
        let data = DmaMemory::new(&space, &dev, 4 * 4096).unwrap();
        let lists = DmaMemory::new(&space, &dev, 2 * 4096).unwrap();
        let (d, l) = (data.iova(), lists.iova());
        lists.mem().write::<u64>(4096 - 16, d + 4096);
        lists.mem().write::<u64>(4096 - 8, l + 4096);
        lists.mem().write::<u64>(4096, d + 2 * 4096);
        lists.mem().write::<u64>(4096 + 8, d + 3 * 4096);
        for i in 0..4 {
            data.mem().fill(i * 4096, 4096, i as u8 + 1);
        }
        let rw = |opcode, slba: u64| NvmeCommand {
            opcode,
            nsid: 1,
            prp1: d,
            prp2: l + 4096 - 16,
            cdw10: slba as u32,
            cdw12: 32 - 1,
            ..Default::default()
        };
        assert_eq!(raw(&mut qp, rw(io::WRITE, 64)), 0);
        data.mem().fill(0, 4 * 4096, 0);
        assert_eq!(raw(&mut qp, rw(io::READ, 64)), 0);
        for i in 0..4 {
            assert_eq!(data.mem().read::<u8>(i * 4096 + 100), i as u8 + 1, "page {i} through the chain");
        }
        // Deallocate two ranges at once, then read zeroes there and data between them.
        lists.mem().write::<u32>(0, 0);
        lists.mem().write::<u32>(4, 8);
        lists.mem().write::<u64>(8, 64);
        lists.mem().write::<u32>(16, 0);
        lists.mem().write::<u32>(20, 8);
        lists.mem().write::<u64>(24, 80);
        let dsm = NvmeCommand {
            opcode: io::DSM,
            nsid: 1,
            prp1: l,
            cdw10: 1,
            cdw11: io::DSM_DEALLOCATE,
            ..Default::default()
        };
        assert_eq!(raw(&mut qp, dsm), 0);
        assert_eq!(raw(&mut qp, rw(io::READ, 64)), 0);
        assert_eq!(data.mem().read::<u8>(100), 0, "first range deallocated");
        assert_eq!(data.mem().read::<u8>(4096 + 100), 2, "between the ranges");
        assert_eq!(data.mem().read::<u8>(2 * 4096 + 100), 0, "second range deallocated");
        // A PRP entry that is not page aligned is an invalid field, not a silent misread.
        lists.mem().write::<u64>(4096 - 16, d + 4096 + 8);
        assert_eq!(raw(&mut qp, rw(io::READ, 64)) & 0xff, u16::from(sc::INVALID_FIELD));
        // An unknown opcode and a bad namespace get their spec statuses.
        assert_eq!(raw(&mut qp, NvmeCommand { opcode: 0x7f, nsid: 1, ..Default::default() }) & 0xff, 1);
        assert_eq!(raw(&mut qp, rw(io::READ, 64)) & 0xff, u16::from(sc::INVALID_FIELD));
        let bad_ns = NvmeCommand { nsid: 9, ..rw(io::READ, 0) };
        assert_eq!(raw(&mut qp, bad_ns) & 0xff, u16::from(sc::INVALID_NAMESPACE));
    }

    #[test]
    #[should_panic(expected = "emulated controller: injected panic on I/O command 2")]
    fn injected_panic_in_the_doorbell_writer() {
        let rule = FaultRule { nth: 2, action: FaultAction::Panic, bad_block: None, controller: None };
        let (dev, space, _ctrl, mut q) = setup(vec![rule]);
        let buf = DmaMemory::new(&space, &dev, 4096).unwrap();
        let r = IoCommand::Read { nsid: 1, slba: 0, blocks: 8, iova: buf.iova(), len: 4096 };
        assert_eq!(run(&mut q, r), 0);
        run(&mut q, r); // synchronous mode: panics in this thread, inside the doorbell write
    }

    #[test]
    fn async_injected_panic_ends_the_worker_thread() {
        let rule = FaultRule { nth: 1, action: FaultAction::Panic, bad_block: None, controller: None };
        let backend = Box::new(MemoryBackend::new(1 << 20).unwrap());
        let mode = EmulatorMode::Async { latency: Duration::ZERO };
        let (emu, (dev, space, _ctrl, mut q)) = setup_emulator(vec![rule], mode, backend);
        let buf = DmaMemory::new(&space, &dev, 4096).unwrap();
        let r = IoCommand::Read { nsid: 1, slba: 0, blocks: 8, iova: buf.iova(), len: 4096 };
        q.submit(&r, 0).unwrap();
        q.ring_doorbell(); // returns: the worker fetches the command, and panics
        let deadline = Instant::now() + Duration::from_secs(5);
        while !emu.thread.as_ref().is_some_and(|t| t.is_finished()) {
            assert!(Instant::now() < deadline, "the worker thread did not panic");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(!q.has_completion());
        assert_eq!(emu.counters().io_commands.load(Ordering::Relaxed), 1);
    }

    /// Submits `cmds` (contexts 0..n) with one doorbell; returns (context, status) in completion
    /// order.
    fn run_batch(q: &mut IoQueue<u32>, cmds: &[IoCommand]) -> Vec<(u32, u16)> {
        for (i, c) in cmds.iter().enumerate() {
            q.submit(c, i as u32).unwrap();
        }
        q.ring_doorbell();
        wait_for(q, cmds.len())
    }

    fn wait_for(q: &mut IoQueue<u32>, n: usize) -> Vec<(u32, u16)> {
        let mut done = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.len() < n {
            assert!(Instant::now() < deadline, "only {} of {n} commands completed", done.len());
            if q.reap(usize::MAX, |ctx, s, _| done.push((ctx, s))) == 0 {
                std::thread::yield_now();
            }
        }
        done
    }

    fn in_order(done: &[(u32, u16)]) -> bool {
        done.windows(2).all(|w| w[0].0 < w[1].0)
    }

    #[test]
    fn async_batch_completes_out_of_order_with_data_intact() {
        let (dev, space, _ctrl, mut q) = setup_async(vec![], Duration::ZERO);
        let src = DmaMemory::new(&space, &dev, 16 * 4096).unwrap();
        let dst = DmaMemory::new(&space, &dev, 16 * 4096).unwrap();
        for i in 0..16 {
            src.mem().fill(i * 4096, 4096, 0x10 + i as u8);
        }
        dst.mem().fill(0, 16 * 4096, 0);
        let at = |i: u64| (i * 24, i * 4096); // (slba, buffer offset): scattered LBAs
        let writes: Vec<_> = (0..16)
            .map(|i| {
                let (slba, off) = at(i);
                IoCommand::Write { nsid: 1, slba, blocks: 8, iova: src.iova() + off, len: 4096, fua: false }
            })
            .collect();
        let reads: Vec<_> = (0..16)
            .map(|i| {
                let (slba, off) = at(i);
                IoCommand::Read { nsid: 1, slba, blocks: 8, iova: dst.iova() + off, len: 4096 }
            })
            .collect();
        let w = run_batch(&mut q, &writes);
        let r = run_batch(&mut q, &reads);
        for done in [&w, &r] {
            assert!(done.iter().all(|&(_, s)| s == 0), "{done:?}");
            let mut ids: Vec<u32> = done.iter().map(|&(c, _)| c).collect();
            ids.sort_unstable();
            assert_eq!(ids, (0..16).collect::<Vec<_>>(), "each command completed once");
        }
        assert!(!in_order(&w) || !in_order(&r), "completions in submission order: {w:?} {r:?}");
        let mut out = vec![0u8; 4096];
        for i in 0..16 {
            dst.mem().copy_out(i * 4096, &mut out);
            assert!(out.iter().all(|&b| b == 0x10 + i as u8), "block {i}");
        }
        assert_eq!(dev.dma_data_bytes(), Some(2 * 16 * 4096));
    }

    #[test]
    fn async_dma_happens_at_completion_time() {
        let faults = vec!["delay:1:150".parse().unwrap(), "delay:3:150".parse().unwrap()];
        let (dev, space, _ctrl, mut q) = setup_async(faults, Duration::ZERO);
        let buf = DmaMemory::new(&space, &dev, 3 * 4096).unwrap();
        let (a, b, c) = (buf.iova(), buf.iova() + 4096, buf.iova() + 8192);
        // A write (delayed): the data the host puts there after the doorbell is what the device
        // stores, since it reads the buffer only when it completes the command.
        buf.mem().fill(0, 4096, 0xaa);
        q.submit(&IoCommand::Write { nsid: 1, slba: 40, blocks: 8, iova: a, len: 4096, fua: false }, 1)
            .unwrap();
        q.ring_doorbell();
        buf.mem().fill(0, 4096, 0xbb);
        assert_eq!(dev.dma_data_bytes(), Some(0), "no data moved at doorbell time");
        assert_eq!(wait_for(&mut q, 1), [(1, 0)]);
        assert_eq!(dev.dma_data_bytes(), Some(4096));
        let read = |iova| IoCommand::Read { nsid: 1, slba: 40, blocks: 8, iova, len: 4096 };
        assert_eq!(run_batch(&mut q, &[read(b)]), [(0, 0)]);
        let mut out = vec![0u8; 4096];
        buf.mem().copy_out(4096, &mut out);
        assert!(out.iter().all(|&x| x == 0xbb), "the device saw the data written after the doorbell");
        // A read (delayed): the host buffer stays untouched until the completion is posted.
        buf.mem().fill(8192, 4096, 0x11);
        q.submit(&read(c), 3).unwrap();
        q.ring_doorbell();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!q.has_completion());
        buf.mem().copy_out(8192, &mut out);
        assert!(out.iter().all(|&x| x == 0x11), "no DMA before the completion");
        assert_eq!(wait_for(&mut q, 1), [(3, 0)]);
        buf.mem().copy_out(8192, &mut out);
        assert!(out.iter().all(|&x| x == 0xbb));
    }

    #[test]
    fn async_faults_fail_and_hang() {
        let faults = vec!["fail:1:2:0x80".parse().unwrap(), "hang:2".parse().unwrap()];
        let (dev, space, _ctrl, mut q) = setup_async(faults, Duration::from_millis(2));
        let buf = DmaMemory::new(&space, &dev, 4096).unwrap();
        let r = IoCommand::Read { nsid: 1, slba: 0, blocks: 8, iova: buf.iova(), len: 4096 };
        for (i, c) in [r, r, r].iter().enumerate() {
            q.submit(c, i as u32).unwrap();
        }
        q.ring_doorbell();
        let mut done = wait_for(&mut q, 2);
        done.sort_unstable();
        assert_eq!(done, [(0, status_field(2, 0x80)), (2, 0)]);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!q.has_completion(), "the hung command never completes");
        assert_eq!(dev.dma_data_bytes(), Some(4096), "only the successful read moved data");
    }

    #[test]
    fn async_small_queue_completes_everything_once() {
        let (dev, space, mut ctrl, _q) = setup_async(vec![], Duration::ZERO);
        let qp = ctrl.create_io_queue(2, 4, None).unwrap();
        let mut q = IoQueue::<u32>::new(qp, &dev, &space).unwrap();
        const N: usize = 64;
        let src = DmaMemory::new(&space, &dev, N * 4096).unwrap();
        let dst = DmaMemory::new(&space, &dev, N * 4096).unwrap();
        for i in 0..N {
            src.mem().fill(i * 4096, 4096, i as u8 ^ 0x5a);
        }
        dst.mem().fill(0, N * 4096, 0);
        let off = |i: usize| (i * 4096) as u64;
        let writes = (0..N).map(|i| IoCommand::Write {
            nsid: 1,
            slba: i as u64 * 8,
            blocks: 8,
            iova: src.iova() + off(i),
            len: 4096,
            fua: false,
        });
        let reads = (0..N).map(|i| IoCommand::Read {
            nsid: 1,
            slba: i as u64 * 8,
            blocks: 8,
            iova: dst.iova() + off(i),
            len: 4096,
        });
        // All writes, then all reads (no read overtakes the write of its blocks).
        for cmds in [writes.collect::<Vec<_>>(), reads.collect()] {
            let mut seen = [0u32; N];
            let (mut next, mut done, mut reordered, mut last) = (0, 0, false, None);
            let deadline = Instant::now() + Duration::from_secs(5);
            while done < N {
                assert!(Instant::now() < deadline, "{done} of {N} completed");
                while next < N && q.free_slots() > 0 {
                    q.submit(&cmds[next], next as u32).unwrap();
                    next += 1;
                }
                assert!(q.in_flight() <= 3, "depth 4 holds at most 3 commands");
                q.ring_doorbell();
                let n = q.reap(usize::MAX, |ctx, s, _| {
                    assert_eq!(s, 0);
                    seen[ctx as usize] += 1;
                    reordered |= last.is_some_and(|l| l > ctx);
                    last = Some(ctx);
                });
                done += n;
                if n == 0 {
                    std::thread::yield_now();
                }
            }
            assert!(seen.iter().all(|&n| n == 1), "each command completed exactly once: {seen:?}");
            assert!(reordered, "some completions out of order");
        }
        std::thread::sleep(Duration::from_millis(10));
        assert!(!q.has_completion(), "no extra completion");
        let mut out = vec![0u8; 4096];
        for i in 0..N {
            dst.mem().copy_out(i * 4096, &mut out);
            assert!(out.iter().all(|&b| b == i as u8 ^ 0x5a), "block {i}");
        }
    }

    #[test]
    fn async_full_cq_waits_for_the_head_doorbell() {
        let (dev, space, mut ctrl, _q) = setup_async(vec![], Duration::ZERO);
        // CQ 2 has 2 entries (room for one completion), SQ 2 has 8.
        let cq = DmaMemory::new(&space, &dev, 4096).unwrap();
        let sq = DmaMemory::new(&space, &dev, 4096).unwrap();
        let data = DmaMemory::new(&space, &dev, 4096).unwrap();
        let create = |opcode, prp1, size: u32, cdw11| NvmeCommand {
            opcode,
            prp1,
            cdw10: ((size - 1) << 16) | 2,
            cdw11,
            ..Default::default()
        };
        ctrl.admin_command(create(admin::CREATE_CQ, cq.iova(), 2, 1)).unwrap();
        ctrl.admin_command(create(admin::CREATE_SQ, sq.iova(), 8, (2 << 16) | 1)).unwrap();
        for cid in 0..5u16 {
            let cmd = NvmeCommand {
                opcode: io::READ,
                cid,
                nsid: 1,
                prp1: data.iova() + u64::from(cid) * 512,
                cdw10: u32::from(cid),
                ..Default::default()
            };
            sq.mem().write(usize::from(cid) * 64, cmd);
        }
        dev.write32(doorbell_offset(2, false, ctrl.dstrd()), 5);
        let (mut head, mut phase, mut cids) = (0usize, true, Vec::new());
        while cids.len() < 5 {
            let deadline = Instant::now() + Duration::from_secs(5);
            let c = loop {
                let c: NvmeCompletion = cq.mem().read(head * 16);
                if c.phase() == phase {
                    break c;
                }
                assert!(Instant::now() < deadline, "completion {} missing", cids.len());
                std::thread::yield_now();
            };
            assert_eq!(c.status_field(), 0);
            cids.push(c.cid);
            // The CQ is full: nothing more is posted, and no more data moves, until the head moves.
            std::thread::sleep(Duration::from_millis(5));
            assert_eq!(dev.dma_data_bytes(), Some(cids.len() as u64 * 512));
            let other: NvmeCompletion = cq.mem().read((1 - head) * 16);
            assert_ne!(other.phase(), if head == 0 { phase } else { !phase }, "posted into a full CQ");
            head = (head + 1) % 2;
            if head == 0 {
                phase = !phase;
            }
            dev.write32(doorbell_offset(2, true, ctrl.dstrd()), head as u32);
        }
        cids.sort_unstable();
        assert_eq!(cids, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn a_performance_model_sets_the_completion_times() {
        let spec: ModelSpec = "latency-us=3000,channels=1".parse().unwrap();
        let config = |mode| EmulatorConfig {
            namespaces: vec![EmulatedNamespace {
                backend: Box::new(MemoryBackend::new(1 << 20).unwrap()),
                lba_size: 512,
            }],
            mdts: 5,
            mode,
            model: Some(spec),
            ..Default::default()
        };
        let e = EmulatedController::new(config(EmulatorMode::Sync)).err().expect("sync mode with a model");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let (emu, (dev, space, _ctrl, mut q)) =
            setup_from(config(EmulatorMode::Async { latency: Duration::from_secs(100) }));
        assert_eq!(emu.model(), Some(spec));
        let buf = DmaMemory::new(&space, &dev, 4 * 4096).unwrap();
        let reads: Vec<_> = (0..4u64)
            .map(|i| IoCommand::Read {
                nsid: 1,
                slba: i * 8,
                blocks: 8,
                iova: buf.iova() + i * 4096,
                len: 4096,
            })
            .collect();
        // One channel: the four reads complete one after the other, 3 ms apart (the model,
        // not the 100 s latency of the mode, decides).
        let start = Instant::now();
        for (i, r) in reads.iter().enumerate() {
            q.submit(r, i as u32).unwrap();
        }
        q.ring_doorbell();
        let mut at = Vec::new();
        let deadline = start + Duration::from_secs(5);
        while at.len() < 4 {
            assert!(Instant::now() < deadline, "{} of 4 completed", at.len());
            q.reap(usize::MAX, |_, s, _| {
                assert_eq!(s, 0);
                at.push(start.elapsed());
            });
        }
        for (i, t) in at.iter().enumerate() {
            assert!(*t >= Duration::from_millis(3 * (i as u64 + 1)), "completion {i} after {t:?}");
        }
    }

    /// Memory storage whose data transfers take `delay` each, counting them.
    struct SlowBackend {
        mem: MemoryBackend,
        delay: Duration,
        transfers: Arc<AtomicU64>,
    }

    impl Backend for SlowBackend {
        fn size(&self) -> u64 {
            self.mem.size()
        }
        unsafe fn read_into(&self, offset: u64, dst: *mut u8, len: usize) -> std::io::Result<()> {
            self.transfers.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            // SAFETY: forwarded with the caller's guarantee for `dst`.
            unsafe { self.mem.read_into(offset, dst, len) }
        }
        unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> std::io::Result<()> {
            self.transfers.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(self.delay);
            // SAFETY: forwarded with the caller's guarantee for `src`.
            unsafe { self.mem.write_from(offset, src, len) }
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, len: u64) -> std::io::Result<()> {
            self.mem.write_zeroes(offset, len)
        }
    }

    #[test]
    fn async_reset_drops_fetched_commands_and_stops_their_dma() {
        let transfers = Arc::new(AtomicU64::new(0));
        let backend = SlowBackend {
            mem: MemoryBackend::new(1 << 20).unwrap(),
            delay: Duration::from_millis(15),
            transfers: transfers.clone(),
        };
        let mode = EmulatorMode::Async { latency: Duration::ZERO };
        let (dev, space, mut ctrl, mut q) = setup_with(vec![], mode, Box::new(backend));
        let buf = DmaMemory::new(&space, &dev, 8 * 4096).unwrap();
        for i in 0..8u64 {
            let r =
                IoCommand::Read { nsid: 1, slba: i * 8, blocks: 8, iova: buf.iova() + i * 4096, len: 4096 };
            q.submit(&r, i as u32).unwrap();
        }
        q.ring_doorbell();
        // Reset while the worker is inside a data transfer: the reset waits for it.
        let deadline = Instant::now() + Duration::from_secs(5);
        while transfers.load(Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        ctrl.reset().unwrap();
        let (bytes, moved) = (dev.dma_data_bytes().unwrap(), transfers.load(Ordering::SeqCst));
        // Completions posted before the reset are still in the CQ; each matches its data.
        let posted = q.reap(usize::MAX, |_, s, _| assert_eq!(s, 0)) as u64;
        assert!((1..8).contains(&posted), "{posted} completed before the reset");
        assert_eq!(bytes, posted * 4096, "data moved only for completed commands");
        std::thread::sleep(Duration::from_millis(50));
        assert!(!q.has_completion(), "a command fetched before the reset completed after it");
        assert_eq!(dev.dma_data_bytes(), Some(bytes), "DMA after the reset");
        assert_eq!(transfers.load(Ordering::SeqCst), moved);
        drop(q.abandon_all());
        // The controller works again after the reset, on a new queue.
        assert_eq!(ctrl.request_io_queues(2).unwrap(), 2);
        let qp = ctrl.create_io_queue(1, 8, None).unwrap();
        let mut q = IoQueue::<u32>::new(qp, &dev, &space).unwrap();
        let r = IoCommand::Read { nsid: 1, slba: 0, blocks: 8, iova: buf.iova(), len: 4096 };
        assert_eq!(run_batch(&mut q, &[r]), [(0, 0)]);
    }

    fn run_rw(q: &mut IoQueue<u32>, rw: RwCommand, segs: &[DmaSeg], transfer: Transfer) -> u16 {
        q.submit_rw(&rw, segs, transfer, 7).unwrap();
        q.ring_doorbell();
        wait_for(q, 1)[0].1
    }

    #[test]
    fn sgl_data_blocks_through_the_driver() {
        let (dev, space, ctrl, mut q) = setup(vec![]);
        assert_eq!(ctrl.info().sgl, SglSupport::Byte, "Identify reports SGLs without alignment rules");
        let a = DmaMemory::new(&space, &dev, 4 * 4096).unwrap();
        let b = DmaMemory::new(&space, &dev, 4 * 4096).unwrap();
        // 2048 bytes in odd places of two mappings, one run crossing a page boundary.
        let runs = [(&a, 1usize, 3u32), (&b, 4093, 1000), (&a, 8191, 1), (&b, 9000, 1044)];
        let segs: Vec<DmaSeg> = runs
            .iter()
            .enumerate()
            .map(|(i, &(m, off, len))| DmaSeg { iova: m.iova() + off as u64, len, tag: i as u32 })
            .collect();
        let mut expect = vec![0u8; 2048];
        fill_pattern(&mut expect);
        let mut pos = 0;
        for &(m, off, len) in &runs {
            m.mem().copy_in(off, &expect[pos..pos + len as usize]);
            pos += len as usize;
        }
        let rw = RwCommand { write: true, nsid: 1, slba: 16, blocks: 4, fua: false };
        assert_eq!(run_rw(&mut q, rw, &segs, Transfer::Sgl), 0);
        // Read back contiguously, then scattered again through SGLs into cleared memory.
        let dst = DmaMemory::new(&space, &dev, 4096).unwrap();
        let r = IoCommand::Read { nsid: 1, slba: 16, blocks: 4, iova: dst.iova(), len: 2048 };
        assert_eq!(run(&mut q, r), 0);
        let mut got = vec![0u8; 2048];
        dst.mem().copy_out(0, &mut got);
        assert_eq!(got, expect);
        a.mem().fill(0, 4 * 4096, 0);
        b.mem().fill(0, 4 * 4096, 0);
        assert_eq!(run_rw(&mut q, RwCommand { write: false, ..rw }, &segs, Transfer::Sgl), 0);
        let mut pos = 0;
        for &(m, off, len) in &runs {
            let mut part = vec![0u8; len as usize];
            m.mem().copy_out(off, &mut part);
            assert_eq!(part, &expect[pos..pos + len as usize], "run at {off}");
            pos += len as usize;
        }
        assert_eq!(a.mem().read::<u8>(0), 0, "nothing outside the runs was written");
        // One run: a data block descriptor directly in SGL1.
        let one = [DmaSeg { iova: a.iova() + 5, len: 512, tag: 0 }];
        assert_eq!(run_rw(&mut q, RwCommand { blocks: 1, ..rw }, &one, Transfer::Sgl), 0);
    }

    pub(super) fn fill_pattern(buf: &mut [u8]) {
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (i * 7 + i / 251) as u8;
        }
    }

    #[test]
    fn sgl_segment_chains_and_bad_descriptors() {
        let (dev, space, mut ctrl, _q) = setup(vec![]);
        let mut qp = ctrl.create_io_queue(2, 16, None).unwrap();
        let data = DmaMemory::new(&space, &dev, 2 * 4096).unwrap();
        let lists = DmaMemory::new(&space, &dev, 2 * 4096).unwrap();
        let (d, l) = (data.iova(), lists.iova());
        let put = |at: usize, (w0, w1): (u64, u64)| {
            lists.mem().write::<u64>(at, w0);
            lists.mem().write::<u64>(at + 8, w1);
        };
        // SGL1: Segment (2 descriptors at l) -> [data 256 @ d+1, Last Segment (2 at l+4096)]
        //   -> [data 512 @ d+4096+3, data 256 @ d+600]: 1024 bytes, two blocks.
        put(0, sgl::descriptor(d + 1, 256, sgl::DATA_BLOCK));
        put(16, sgl::descriptor(l + 4096, 32, sgl::LAST_SEGMENT));
        put(4096, sgl::descriptor(d + 4096 + 3, 512, sgl::DATA_BLOCK));
        put(4096 + 16, sgl::descriptor(d + 600, 256, sgl::DATA_BLOCK));
        let mut pattern = vec![0u8; 1024];
        fill_pattern(&mut pattern);
        data.mem().copy_in(1, &pattern[..256]);
        data.mem().copy_in(4096 + 3, &pattern[256..768]);
        data.mem().copy_in(600, &pattern[768..]);
        let cmd = |opcode, sgl1: (u64, u64)| NvmeCommand {
            opcode,
            flags: sgl::PSDT_SGL,
            nsid: 1,
            prp1: sgl1.0,
            prp2: sgl1.1,
            cdw10: 100,
            cdw12: 2 - 1,
            ..Default::default()
        };
        let chain = sgl::descriptor(l, 32, sgl::SEGMENT);
        assert_eq!(raw(&mut qp, cmd(io::WRITE, chain)), 0);
        let out = DmaMemory::new(&space, &dev, 4096).unwrap();
        let read_back = cmd(io::READ, sgl::descriptor(out.iova(), 1024, sgl::DATA_BLOCK));
        assert_eq!(raw(&mut qp, read_back), 0);
        let mut got = vec![0u8; 1024];
        out.mem().copy_out(0, &mut got);
        assert_eq!(got, pattern, "data went through the chained lists in order");
        // An SGL longer or shorter than the transfer is refused.
        let long = cmd(io::READ, sgl::descriptor(out.iova(), 4096, sgl::DATA_BLOCK));
        assert_eq!(raw(&mut qp, long) & 0xff, u16::from(sc::DATA_SGL_LENGTH_INVALID));
        let short = cmd(io::READ, sgl::descriptor(out.iova(), 1000, sgl::DATA_BLOCK));
        assert_eq!(raw(&mut qp, short) & 0xff, u16::from(sc::DATA_SGL_LENGTH_INVALID));
        // A fused command (not supported).
        let fused = NvmeCommand {
            flags: sgl::PSDT_SGL | 1,
            ..cmd(io::READ, sgl::descriptor(out.iova(), 1024, sgl::DATA_BLOCK))
        };
        assert_eq!(raw(&mut qp, fused) & 0xff, u16::from(sc::INVALID_FIELD));
        // Types that are not supported, and sub types other than "address".
        let bucket = cmd(io::READ, sgl::descriptor(out.iova(), 1024, sgl::BIT_BUCKET));
        assert_eq!(raw(&mut qp, bucket) & 0xff, u16::from(sc::SGL_DESCRIPTOR_TYPE_INVALID));
        let (w0, w1) = sgl::descriptor(out.iova(), 1024, sgl::DATA_BLOCK);
        assert_eq!(
            raw(&mut qp, cmd(io::READ, (w0, w1 | 1 << 56))) & 0xff,
            u16::from(sc::SGL_DESCRIPTOR_TYPE_INVALID)
        );
        // A segment descriptor inside a last segment's list.
        put(4096 + 16, sgl::descriptor(l, 32, sgl::SEGMENT));
        assert_eq!(raw(&mut qp, cmd(io::READ, chain)) & 0xff, u16::from(sc::INVALID_SGL_SEGMENT));
        // A list length that is not whole descriptors.
        assert_eq!(
            raw(&mut qp, cmd(io::READ, sgl::descriptor(l, 24, sgl::LAST_SEGMENT))) & 0xff,
            u16::from(sc::INVALID_SGL_SEGMENT)
        );
        // A segment list that chains to itself forever.
        put(2048, sgl::descriptor(l + 2048, 16, sgl::SEGMENT));
        let forever = cmd(io::READ, sgl::descriptor(l + 2048, 16, sgl::SEGMENT));
        assert_eq!(raw(&mut qp, forever) & 0xff, u16::from(sc::INVALID_SGL_COUNT));
        // A list the controller cannot reach: a data transfer error, no host access.
        let stray = cmd(io::READ, sgl::descriptor(l + (64 << 20), 32, sgl::LAST_SEGMENT));
        assert_eq!(raw(&mut qp, stray) & 0xff, u16::from(sc::DATA_TRANSFER_ERROR));
        // PSDT 11b is reserved.
        let reserved = NvmeCommand { flags: sgl::PSDT_MASK, ..read_back };
        assert_eq!(raw(&mut qp, reserved) & 0xff, u16::from(sc::INVALID_FIELD));
    }

    #[test]
    fn without_sgl_support_sgl_commands_are_refused() {
        let backend = Box::new(MemoryBackend::new(1 << 20).unwrap());
        let (_emu, (dev, space, ctrl, mut q)) =
            setup_emulator_sgl(vec![], EmulatorMode::Sync, backend, false);
        assert_eq!(ctrl.info().sgl, SglSupport::None);
        let buf = DmaMemory::new(&space, &dev, 4096).unwrap();
        let rw = RwCommand { write: false, nsid: 1, slba: 0, blocks: 1, fua: false };
        let seg = [DmaSeg { iova: buf.iova() + 1, len: 512, tag: 0 }];
        assert_eq!(run_rw(&mut q, rw, &seg, Transfer::Sgl) & 0xff, u16::from(sc::INVALID_FIELD));
        // PRPs from segments still work.
        let segs = [DmaSeg { iova: buf.iova() + 3584, len: 512, tag: 0 }];
        assert_eq!(run_rw(&mut q, RwCommand { blocks: 1, ..rw }, &segs, Transfer::Prp), 0);
    }
}
