//! An in-process, register-level NVMe controller.
//!
//! The driver reaches it only through [`NvmeDevice`]: BAR0 register reads and writes, doorbells,
//! DMA mappings and interrupt eventfds. Commands are fetched from submission queues in DMA
//! memory, PRPs are walked through the [`dma::IovaTable`], and completions are posted with phase
//! tags, exactly as a PCIe controller does. Doorbell writes are processed synchronously in the
//! writer's thread (the fastest "device" there is); delayed completions are posted by a timer
//! thread.

pub mod backend;
pub mod dma;
pub mod inject;

use std::collections::VecDeque;
use std::ops::RangeInclusive;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use backend::Backend;
use dma::{DmaFault, IovaTable};
use inject::{FaultAction, FaultRule};

use crate::device::{DeviceError, NvmeDevice};
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

/// Emulated controller settings.
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
}

/// Testing: how badly a controller ignores attempts to stop it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Wedge {
    /// A well-behaved controller.
    #[default]
    None,
    /// CC.EN=0 never brings CSTS.RDY to 0 and the function reset fails; clearing Bus Master
    /// Enable still stops its DMA.
    Reset,
    /// As `reset`, and Bus Master Enable cannot be cleared either: the broker cannot confirm
    /// that the device stopped.
    ResetAndBusMaster,
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
}

struct Sq {
    base: u64,
    size: u16,
    head: u16,
    cqid: u16,
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

struct State {
    cc: u32,
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
    delayed: Vec<Delayed>,
    generation: u64,
}

struct Inner {
    state: Mutex<State>,
    timer_wake: Condvar,
    namespaces: Vec<EmulatedNamespace>,
    mdts: u8,
    faults: Vec<FaultRule>,
    wedge: Wedge,
    irq: Vec<OwnedFd>,
    irq_wanted: Vec<AtomicBool>,
    counters: EmulatorCounters,
    stop: AtomicBool,
}

/// The emulated controller; cheap to share.
pub struct EmulatedController {
    inner: Arc<Inner>,
}

type Outcome = Option<(u16, u32)>; // (status field, result); None = no completion now

fn ok() -> Outcome {
    Some((0, 0))
}
fn err(sct: u8, sc_: u8) -> Outcome {
    Some((status_field(sct, sc_), 0))
}

impl EmulatedController {
    /// Builds a controller in the reset state (CC.EN=0).
    pub fn new(config: EmulatorConfig) -> std::io::Result<Self> {
        let vectors = config.vectors.max(1);
        let irq = (0..vectors).map(|_| nvmed_proto::eventfd::new_eventfd()).collect::<Result<Vec<_>, _>>()?;
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                cc: 0,
                csts: 0,
                aqa: 0,
                asq: 0,
                acq: 0,
                intms: 0,
                dma: IovaTable::default(),
                sqs: (0..=MAX_IO_QUEUES).map(|_| None).collect(),
                cqs: (0..=MAX_IO_QUEUES).map(|_| None).collect(),
                granted: 0,
                io_count: 0,
                delayed: Vec::new(),
                generation: 0,
            }),
            timer_wake: Condvar::new(),
            namespaces: config.namespaces,
            mdts: config.mdts,
            faults: config.faults,
            wedge: config.wedge,
            irq_wanted: (0..vectors).map(|_| AtomicBool::new(false)).collect(),
            irq,
            counters: EmulatorCounters::default(),
            stop: AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new().name("nvme-emu-timer".into()).spawn(move || timer_thread(weak))?;
        Ok(Self { inner })
    }

    /// What the controller has done so far.
    pub fn counters(&self) -> &EmulatorCounters {
        &self.inner.counters
    }

    /// Live DMA mappings (for leak checks).
    pub fn mapping_count(&self) -> usize {
        self.inner.lock().dma.len()
    }
}

impl Drop for EmulatedController {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        self.inner.timer_wake.notify_all();
    }
}

fn timer_thread(weak: Weak<Inner>) {
    loop {
        let Some(inner) = weak.upgrade() else { return };
        if inner.stop.load(Ordering::Acquire) {
            return;
        }
        let mut st = inner.lock();
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
        let wait = st
            .delayed
            .iter()
            .map(|d| d.due.saturating_duration_since(now))
            .min()
            .unwrap_or(Duration::from_millis(200));
        let _ = inner.timer_wake.wait_timeout(st, wait.min(Duration::from_millis(200)));
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cap(&self) -> u64 {
        (u64::from(MAX_QUEUE_ENTRIES) - 1) // MQES
            | (1 << 16) // CQR
            | (if self.wedge == Wedge::None { 15 } else { 1 } << 24) // TO = 7.5 s (0.5 s wedged)
            | (1 << 37) // CSS: NVM
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
        st.sqs[0] = Some(Sq { base: st.asq, size: asqs, head: 0, cqid: 0 });
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
            if st.csts & (CSTS_RDY | CSTS_CFS) != CSTS_RDY {
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
        match cmd.opcode {
            admin::IDENTIFY => {
                let mut d = vec![0u8; 4096];
                match cmd.cdw10 & 0xff {
                    admin::CNS_CONTROLLER => {
                        d[0..2].copy_from_slice(&0x1b36u16.to_le_bytes());
                        put_ascii(&mut d[id_ctrl::SN..id_ctrl::SN + 20], "NVMED-EMU-0001");
                        put_ascii(&mut d[id_ctrl::MN..id_ctrl::MN + 40], "nvmed emulated NVMe controller");
                        put_ascii(&mut d[id_ctrl::FR..id_ctrl::FR + 8], env!("CARGO_PKG_VERSION"));
                        d[id_ctrl::MDTS] = self.mdts;
                        d[80..84].copy_from_slice(&0x0001_0400u32.to_le_bytes());
                        d[id_ctrl::SQES] = 0x66;
                        d[id_ctrl::CQES] = 0x44;
                        d[id_ctrl::NN..id_ctrl::NN + 4]
                            .copy_from_slice(&(self.namespaces.len() as u32).to_le_bytes());
                        let oncs = id_ctrl::ONCS_DSM | id_ctrl::ONCS_WRITE_ZEROES;
                        d[id_ctrl::ONCS..id_ctrl::ONCS + 2].copy_from_slice(&oncs.to_le_bytes());
                        d[id_ctrl::VWC] = 1;
                    }
                    admin::CNS_NAMESPACE => {
                        let Some(ns) = self.namespace(cmd.nsid) else { return err(0, sc::INVALID_NAMESPACE) };
                        let blocks = ns.backend.size() / u64::from(ns.lba_size);
                        for off in [id_ns::NSZE, id_ns::NCAP, id_ns::NUSE] {
                            d[off..off + 8].copy_from_slice(&blocks.to_le_bytes());
                        }
                        d[id_ns::NLBAF] = 0;
                        d[id_ns::FLBAS] = 0;
                        let lbads = ns.lba_size.trailing_zeros();
                        d[id_ns::LBAF0..id_ns::LBAF0 + 4].copy_from_slice(&(lbads << 16).to_le_bytes());
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
                st.sqs[usize::from(qid)] = Some(Sq { base: cmd.prp1, size: size as u16, head: 0, cqid });
                ok()
            }
            admin::DELETE_SQ => {
                let qid = (cmd.cdw10 & 0xffff) as usize;
                if qid == 0 || st.sqs.get(qid).is_none_or(|s| s.is_none()) {
                    return err(1, sc::CS_INVALID_QID);
                }
                st.sqs[qid] = None;
                // Commands of this queue still waiting (delayed or hung) are dropped with it.
                let cqid = qid as u16;
                st.delayed.retain(|d| d.entry.sq_id != cqid);
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
            admin::ABORT => Some((0, 1)), // "command not aborted"
            _ => err(0, sc::INVALID_OPCODE),
        }
    }

    fn namespace(&self, nsid: u32) -> Option<&EmulatedNamespace> {
        nsid.checked_sub(1).and_then(|i| self.namespaces.get(i as usize))
    }

    fn io(&self, st: &mut State, cmd: &NvmeCommand, qid: u16, cqid: u16) -> Outcome {
        st.io_count += 1;
        self.counters.io_commands.fetch_add(1, Ordering::Relaxed);
        let rule = self.faults.iter().find(|r| r.nth == st.io_count).map(|r| r.action);
        if let Some(FaultAction::Fail { sct, sc: code }) = rule {
            return err(sct, code);
        }
        if rule == Some(FaultAction::Hang) {
            return None;
        }
        let outcome = self.execute_io(st, cmd);
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

    fn execute_io(&self, st: &State, cmd: &NvmeCommand) -> Outcome {
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
                if cmd.flags >> 6 != 0 {
                    return err(0, sc::INVALID_FIELD); // SGLs not supported
                }
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
                let r = self.walk_prps(st, cmd.prp1, cmd.prp2, len, |iova, n| {
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
                counter.fetch_add(len, Ordering::Relaxed);
                if !read && cmd.cdw12 & io::CDW12_FUA != 0 {
                    if let Err(e) = ns.backend.flush() {
                        return io_err(e);
                    }
                }
                ok()
            }
            io::FLUSH => ns.backend.flush().map_or_else(io_err, |_| ok()),
            io::WRITE_ZEROES => {
                if !in_range() {
                    return err(0, sc::LBA_OUT_OF_RANGE);
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
                if let Err(o) = self.walk_prps(st, cmd.prp1, cmd.prp2, ranges.len() as u64, |iova, n| {
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

impl NvmeDevice for EmulatedController {
    fn set_bus_master(&self, enabled: bool) -> Result<(), DeviceError> {
        if self.inner.wedge == Wedge::ResetAndBusMaster {
            return Err(DeviceError::Other("emulated controller wedged: Bus Master Enable stuck".into()));
        }
        self.inner.lock().dma.set_blocked(!enabled);
        Ok(())
    }

    fn name(&self) -> String {
        "emulated".into()
    }

    fn read32(&self, offset: u64) -> u32 {
        let st = self.inner.lock();
        let cap = self.inner.cap();
        match offset {
            o if o == REG_CAP => cap as u32,
            o if o == REG_CAP + 4 => (cap >> 32) as u32,
            o if o == REG_VS => 0x0001_0400,
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
        match offset {
            o if o >= REG_DOORBELL_BASE => {
                let idx = (o - REG_DOORBELL_BASE) / 4;
                let qid = (idx / 2) as u16;
                if (idx % 2) == 1 {
                    inner.cq_doorbell(st, qid, value as u16);
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

    unsafe fn dma_map(&self, iova: u64, host: *mut u8, len: u64) -> Result<(), DeviceError> {
        self.inner.lock().dma.insert(iova, host, len)
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), DeviceError> {
        self.inner.lock().dma.remove(iova, len)
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
        if self.inner.wedge != Wedge::None {
            return Err(DeviceError::Other("emulated controller wedged: function reset failed".into()));
        }
        let mut st = self.inner.lock();
        st.dma.set_blocked(false);
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
    use crate::nvme::{Controller, IoCommand, IoQueue};

    fn setup(faults: Vec<FaultRule>) -> (Arc<dyn NvmeDevice>, Arc<IovaSpace>, Controller, IoQueue<u32>) {
        let dev: Arc<dyn NvmeDevice> = Arc::new(
            EmulatedController::new(EmulatorConfig {
                namespaces: vec![EmulatedNamespace {
                    backend: Box::new(MemoryBackend::new(1 << 20).unwrap()),
                    lba_size: 512,
                }],
                mdts: 5,
                vectors: 2,
                faults,
                wedge: Default::default(),
            })
            .unwrap(),
        );
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        let mut ctrl = Controller::init(dev.clone(), space.clone()).unwrap();
        assert_eq!(ctrl.info().namespaces[0].lba_count, 2048);
        assert_eq!(ctrl.info().max_transfer, 128 << 10);
        assert_eq!(ctrl.request_io_queues(2).unwrap(), 2);
        let qp = ctrl.create_io_queue(1, 64, Some(1)).unwrap();
        let q = IoQueue::new(qp, &dev, &space).unwrap();
        (dev, space, ctrl, q)
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
        let rule = FaultRule { nth: 2, action: FaultAction::Fail { sct: 2, sc: 0x80 } };
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
}
