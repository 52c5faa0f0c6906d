//! One NVMe controller of the target as the admin queue sees it: properties (CAP, VS, CC,
//! CSTS), Identify, Get Log Page, Set/Get Features, Keep Alive and Asynchronous Event Requests.
//! Pure logic (no sockets), so every answer is unit-tested here.

use nvmed_proto::admin::SmartLog;

use crate::pdu::NvmeCmd;

/// NVMe status codes (status code type in bits 10:8, before the wire's shift by one).
pub mod sc {
    /// Successful completion.
    pub const SUCCESS: u16 = 0x00;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u16 = 0x01;
    /// Invalid field in command.
    pub const INVALID_FIELD: u16 = 0x02;
    /// Command ID conflict.
    pub const CID_CONFLICT: u16 = 0x03;
    /// Internal error.
    pub const INTERNAL: u16 = 0x06;
    /// Invalid namespace or format.
    pub const INVALID_NS: u16 = 0x0B;
    /// Command sequence error.
    pub const CMD_SEQ_ERROR: u16 = 0x0C;
    /// Data SGL length invalid.
    pub const SGL_INVALID_DATA_LEN: u16 = 0x0F;
    /// SGL descriptor type invalid.
    pub const SGL_INVALID_TYPE: u16 = 0x11;
    /// SGL offset invalid.
    pub const SGL_INVALID_OFFSET: u16 = 0x16;
    /// Namespace is write protected.
    pub const NS_WRITE_PROTECTED: u16 = 0x20;
    /// Transient transport error.
    pub const TRANSIENT_TRANSPORT: u16 = 0x22;
    /// LBA out of range.
    pub const LBA_RANGE: u16 = 0x80;
    /// Namespace not ready (with DNR clear: retry later; nvmed-tcp's answer while nvmed is gone).
    pub const NS_NOT_READY: u16 = 0x82;
    /// Asynchronous event request limit exceeded.
    pub const AER_LIMIT: u16 = 0x105;
    /// Invalid log page.
    pub const INVALID_LOG_PAGE: u16 = 0x109;
    /// Connect: incompatible format.
    pub const CONNECT_FORMAT: u16 = 0x180;
    /// Connect: controller busy.
    pub const CONNECT_CTRL_BUSY: u16 = 0x181;
    /// Connect: invalid parameters.
    pub const CONNECT_INVALID_PARAM: u16 = 0x182;
    /// Connect: invalid host.
    pub const CONNECT_INVALID_HOST: u16 = 0x184;
    /// Do not retry.
    pub const DNR: u16 = 0x4000;
}

/// Admin opcodes.
pub mod admin_op {
    /// Get Log Page.
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0A;
    /// Asynchronous Event Request.
    pub const ASYNC_EVENT: u8 = 0x0C;
    /// Keep Alive.
    pub const KEEP_ALIVE: u8 = 0x18;
    /// Fabrics commands (type in byte 4).
    pub const FABRICS: u8 = 0x7F;
}

/// Fabrics command types.
pub mod fctype {
    /// Property Set.
    pub const PROPERTY_SET: u8 = 0x00;
    /// Connect.
    pub const CONNECT: u8 = 0x01;
    /// Property Get.
    pub const PROPERTY_GET: u8 = 0x04;
    /// Disconnect.
    pub const DISCONNECT: u8 = 0x08;
}

/// Property offsets.
pub mod prop {
    /// Controller capabilities (8 bytes).
    pub const CAP: u32 = 0x00;
    /// Version.
    pub const VS: u32 = 0x08;
    /// Controller configuration.
    pub const CC: u32 = 0x14;
    /// Controller status.
    pub const CSTS: u32 = 0x1C;
}

/// The version this target reports (NVMe 1.3).
pub const VERSION: u32 = 0x0001_0300;
/// Keep Alive granularity reported in Identify (KAS, 100 ms units).
pub const KAS: u16 = 10;
/// Most Asynchronous Event Requests held at once (AERL + 1).
pub const MAX_AERS: usize = 4;

/// A namespace as one host sees it through this target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NsView {
    /// Namespace id on the fabric (nvmed's broker-wide id).
    pub nsid: u32,
    /// Logical block size.
    pub lba_size: u32,
    /// Blocks.
    pub lba_count: u64,
    /// Whether this host may only read it.
    pub read_only: bool,
    /// Stable NGUID.
    pub nguid: [u8; 16],
    /// Stable UUID (version 8, derived like the NGUID).
    pub uuid: [u8; 16],
}

impl NsView {
    /// A view with identifiers derived from the subsystem NQN and the namespace id, so they stay
    /// the same across restarts and differ between namespaces and subsystems.
    pub fn new(subnqn: &str, nsid: u32, lba_size: u32, lba_count: u64, read_only: bool) -> Self {
        let a = fnv64(0xcbf2_9ce4_8422_2325, subnqn.as_bytes(), nsid);
        let b = fnv64(0x6c62_272e_07bb_0142, subnqn.as_bytes(), nsid);
        let mut nguid = [0u8; 16];
        nguid[..8].copy_from_slice(&a.to_be_bytes());
        nguid[8..].copy_from_slice(&b.to_be_bytes());
        let mut uuid = nguid;
        uuid.reverse();
        uuid[6] = (uuid[6] & 0x0f) | 0x80; // version 8 (custom)
        uuid[8] = (uuid[8] & 0x3f) | 0x80; // RFC 4122 variant
        Self { nsid, lba_size, lba_count, read_only, nguid, uuid }
    }
}

fn fnv64(seed: u64, bytes: &[u8], nsid: u32) -> u64 {
    let mut h = seed;
    for b in bytes.iter().chain(&nsid.to_le_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Fixed parameters of a controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrlParams {
    /// Subsystem NQN.
    pub subnqn: String,
    /// Controller id.
    pub cntlid: u16,
    /// Most entries of an I/O queue (CAP.MQES + 1).
    pub queue_size: u16,
    /// Largest transfer in bytes (a power of two of at least 4096): MDTS.
    pub max_transfer: u32,
    /// Most in-capsule data of an I/O command capsule.
    pub in_capsule: u32,
    /// Most I/O queues granted.
    pub max_io_queues: u16,
    /// Serial number.
    pub serial: String,
    /// Whether write zeroes and deallocate are offered (ONCS).
    pub oncs: u16,
    /// A discovery controller: the Discovery log page (LID 70h) it serves; it has no
    /// namespaces and no I/O queues.
    pub discovery: Option<Vec<u8>>,
}

/// What an admin command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Complete with this status (without the wire's shift), result and controller-to-host data.
    Done {
        /// Status (SCT/SC, DNR).
        status: u16,
        /// Completion DW0/DW1.
        result: u64,
        /// Data for the host.
        data: Vec<u8>,
    },
    /// Held (an Asynchronous Event Request): completed when an event happens or never.
    Held,
}

impl Reply {
    fn ok(result: u64) -> Self {
        Reply::Done { status: sc::SUCCESS, result, data: Vec::new() }
    }
    fn data(data: Vec<u8>) -> Self {
        Reply::Done { status: sc::SUCCESS, result: 0, data }
    }
    /// An error status with DNR set.
    pub fn err(status: u16) -> Self {
        Reply::Done { status: status | sc::DNR, result: 0, data: Vec::new() }
    }
}

/// Keep alive timeout of a discovery controller whose host asked for none (as the kernel's
/// target does: a discovery connection may not hold its slot forever).
pub const DISCOVERY_KATO_MS: u32 = 120_000;

/// The keep alive timeout of a discovery controller: `kato_ms` as the host asked, 0 (none)
/// made [`DISCOVERY_KATO_MS`] and at most that (a discovery connection, which any host may
/// open, may not hold its slot for long).
pub fn discovery_kato(kato_ms: u32) -> u32 {
    if kato_ms == 0 {
        DISCOVERY_KATO_MS
    } else {
        kato_ms.min(DISCOVERY_KATO_MS)
    }
}

/// The state of one controller's admin side.
#[derive(Debug)]
pub struct Controller {
    /// Fixed parameters.
    pub params: CtrlParams,
    /// Namespaces the host may see (ascending nsid).
    pub namespaces: Vec<NsView>,
    cc: u32,
    csts: u32,
    /// Keep Alive Timeout in milliseconds (0: none).
    pub kato_ms: u32,
    /// I/O queues granted by Set Features Number of Queues (0 until then).
    pub io_queues: u16,
    features: [u32; 32],
    aers: usize,
    /// The latest SMART log of the namespaces' controller, if the broker gave one.
    pub smart: Option<SmartLog>,
}

impl Controller {
    /// A disabled controller.
    pub fn new(params: CtrlParams, namespaces: Vec<NsView>, kato_ms: u32) -> Self {
        Self {
            params,
            namespaces,
            cc: 0,
            csts: 0,
            kato_ms,
            io_queues: 0,
            features: [0; 32],
            aers: 0,
            smart: None,
        }
    }

    /// CAP: MQES, CQR, TO (7.5 s), CSS NVM, MPSMIN = MPSMAX = 4 KiB.
    pub fn cap(&self) -> u64 {
        u64::from(self.params.queue_size - 1) | (1 << 16) | (15 << 24) | (1 << 37)
    }

    /// Whether the host enabled the controller (CSTS.RDY).
    pub fn ready(&self) -> bool {
        self.csts & 1 != 0
    }

    /// Whether a shutdown was requested (CC.SHN).
    pub fn shutting_down(&self) -> bool {
        (self.cc >> 14) & 3 != 0
    }

    /// Property Get: `(status, value)`.
    pub fn property_get(&self, offset: u32, eight: bool) -> Reply {
        let v = match (offset, eight) {
            (prop::CAP, true) => self.cap(),
            (prop::CAP, false) => self.cap() & 0xffff_ffff,
            (0x04, false) => self.cap() >> 32,
            (prop::VS, false) => u64::from(VERSION),
            (prop::CC, false) => u64::from(self.cc),
            (prop::CSTS, false) => u64::from(self.csts),
            _ => return Reply::err(sc::INVALID_FIELD),
        };
        Reply::ok(v)
    }

    /// Property Set. Returns whether the controller was just disabled (its I/O queues must go).
    pub fn property_set(&mut self, offset: u32, eight: bool, value: u64) -> (Reply, bool) {
        if offset != prop::CC || eight {
            return (Reply::err(sc::INVALID_FIELD), false);
        }
        let new = value as u32;
        let was_en = self.cc & 1 != 0;
        let en = new & 1 != 0;
        let mut disabled = false;
        if en && !was_en {
            // IOSQES 6, IOCQES 4, MPS 0 (4 KiB), CSS NVM, AMS round robin.
            let css = (new >> 4) & 7;
            let mps = (new >> 7) & 0xf;
            let ams = (new >> 11) & 7;
            let iosqes = (new >> 16) & 0xf;
            let iocqes = (new >> 20) & 0xf;
            if css != 0 || mps != 0 || ams != 0 || iosqes != 6 || iocqes != 4 {
                self.csts |= 2; // CFS
            } else {
                self.csts = (self.csts & !2) | 1;
            }
        } else if !en && was_en {
            self.csts &= !1;
            self.csts &= !(3 << 2);
            disabled = true;
        }
        let shn = (new >> 14) & 3;
        if shn != 0 {
            // Every command answered was done at the device; nothing is cached here.
            self.csts = (self.csts & !(3 << 2)) | (2 << 2);
        } else if (self.cc >> 14) & 3 != 0 {
            self.csts &= !(3 << 2);
        }
        self.cc = new;
        (Reply::ok(0), disabled)
    }

    /// Executes an admin command (fabrics commands are handled by the caller).
    pub fn admin(&mut self, cmd: &NvmeCmd) -> Reply {
        if !self.ready() {
            return Reply::err(sc::CMD_SEQ_ERROR);
        }
        match cmd.opcode {
            admin_op::IDENTIFY => self.identify(cmd),
            admin_op::GET_LOG_PAGE => self.get_log_page(cmd),
            admin_op::SET_FEATURES => self.set_features(cmd),
            admin_op::GET_FEATURES => self.get_features(cmd),
            admin_op::KEEP_ALIVE => Reply::ok(0),
            admin_op::ABORT => Reply::ok(1), // not aborted
            admin_op::ASYNC_EVENT => {
                if self.aers >= MAX_AERS {
                    Reply::err(sc::AER_LIMIT)
                } else {
                    self.aers += 1;
                    Reply::Held
                }
            }
            _ => Reply::err(sc::INVALID_OPCODE),
        }
    }

    fn ns(&self, nsid: u32) -> Option<&NsView> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// The highest namespace id (Identify NN; 0 for a discovery controller).
    pub fn nn(&self) -> u32 {
        if self.params.discovery.is_some() {
            return 0;
        }
        self.namespaces.iter().map(|n| n.nsid).max().unwrap_or(0).max(1)
    }

    fn identify(&self, cmd: &NvmeCmd) -> Reply {
        let cns = cmd.cdw(10) as u8;
        let nsid = cmd.nsid.get();
        if self.params.discovery.is_some() && cns != 0x01 {
            return Reply::err(sc::INVALID_FIELD); // a discovery controller has no namespaces
        }
        match cns {
            0x00 => {
                if nsid == 0 || (nsid > self.nn() && nsid != 0xffff_ffff) {
                    return Reply::err(sc::INVALID_NS);
                }
                // An inactive namespace id within NN reads as zeroes.
                Reply::data(self.ns(nsid).map(identify_ns).unwrap_or_else(|| vec![0; 4096]))
            }
            0x01 => Reply::data(self.identify_ctrl()),
            0x02 => {
                if nsid >= 0xffff_fffe {
                    return Reply::err(sc::INVALID_NS);
                }
                let mut d = vec![0u8; 4096];
                for (i, n) in self.namespaces.iter().filter(|n| n.nsid > nsid).take(1024).enumerate() {
                    d[i * 4..i * 4 + 4].copy_from_slice(&n.nsid.to_le_bytes());
                }
                Reply::data(d)
            }
            0x03 => match self.ns(nsid) {
                Some(n) => Reply::data(ns_descriptors(n)),
                None => Reply::err(sc::INVALID_NS),
            },
            _ => Reply::err(sc::INVALID_FIELD),
        }
    }

    /// The Identify Controller data structure.
    pub fn identify_ctrl(&self) -> Vec<u8> {
        let p = &self.params;
        let mut d = vec![0u8; 4096];
        ascii(&mut d[4..24], &p.serial);
        ascii(&mut d[24..64], "nvmed-tcp");
        ascii(&mut d[64..72], env!("CARGO_PKG_VERSION"));
        d[72] = 6; // RAB
        d[76] = 1 << 1; // CMIC: may have several controllers
        d[77] = (p.max_transfer / 4096).trailing_zeros() as u8; // MDTS in 4 KiB pages
        put16(&mut d, 78, p.cntlid);
        put32(&mut d, 80, VERSION);
        d[111] = if p.discovery.is_some() { 2 } else { 1 }; // CNTRLTYPE: discovery or I/O controller
        d[258] = 3; // ACL
        d[259] = (MAX_AERS - 1) as u8; // AERL
        d[261] = 1 << 2; // LPA: extended data for Get Log Page
        d[262] = 0; // ELPE: one error log entry
        put16(&mut d, 320, KAS);
        d[512] = 0x66; // SQES
        d[513] = 0x44; // CQES
        put16(&mut d, 514, p.queue_size); // MAXCMD
        put32(&mut d, 516, self.nn());
        put16(&mut d, 520, p.oncs);
        d[525] = 1; // VWC: flushes go to the device
        put32(&mut d, 536, 1 | (1 << 20)); // SGLS: SGLs, offsets for in-capsule data
        ascii_nul(&mut d[768..1024], &p.subnqn);
        put32(&mut d, 1792, (64 + p.in_capsule) / 16); // IOCCSZ
        put32(&mut d, 1796, 1); // IORCSZ
        put16(&mut d, 1800, 0); // ICDOFF
        d[1802] = 0; // FCATT: dynamic controller model
        d[1803] = 1; // MSDBD
        d
    }

    fn get_log_page(&self, cmd: &NvmeCmd) -> Reply {
        let lid = cmd.cdw(10) as u8;
        let numd = (u64::from(cmd.cdw(10) >> 16) | (u64::from(cmd.cdw(11) & 0xffff) << 16)) + 1;
        let len = numd * 4;
        let offset = u64::from(cmd.cdw(12)) | (u64::from(cmd.cdw(13)) << 32);
        let page = match (lid, &self.params.discovery) {
            (0x70, Some(log)) => log.clone(),
            (0x70, None) | (0x02..=0x04, Some(_)) => return Reply::err(sc::INVALID_LOG_PAGE),
            (lid, _) => match lid {
                0x01 => vec![0u8; 64],
                0x02 => self.smart_log(),
                0x03 => vec![0u8; 512],
                0x04 => vec![0u8; 4096],
                _ => return Reply::err(sc::INVALID_LOG_PAGE),
            },
        };
        if len > 65536 || !offset.is_multiple_of(4) || offset > page.len() as u64 {
            return Reply::err(sc::INVALID_FIELD);
        }
        let mut d = page[offset as usize..].to_vec();
        d.resize(len as usize, 0);
        Reply::data(d)
    }

    fn smart_log(&self) -> Vec<u8> {
        let mut d = vec![0u8; 512];
        if let Some(s) = &self.smart {
            d[0] = s.critical_warning;
            put16(&mut d, 1, s.temperature_kelvin);
            d[3] = s.available_spare;
            d[4] = s.available_spare_threshold;
            d[5] = s.percentage_used;
            for (i, v) in [
                s.data_units_read,
                s.data_units_written,
                s.host_read_commands,
                s.host_write_commands,
                s.controller_busy_minutes,
                s.power_cycles,
                s.power_on_hours,
                s.unsafe_shutdowns,
            ]
            .into_iter()
            .enumerate()
            {
                d[32 + i * 16..40 + i * 16].copy_from_slice(&v.to_le_bytes());
            }
        } else {
            put16(&mut d, 1, 273 + 25);
            d[3] = 100;
        }
        d
    }

    fn set_features(&mut self, cmd: &NvmeCmd) -> Reply {
        let fid = cmd.cdw(10) as u8;
        let v = cmd.cdw(11);
        match fid {
            0x07 => {
                if v & 0xffff == 0xffff || v >> 16 == 0xffff {
                    return Reply::err(sc::INVALID_FIELD);
                }
                if self.io_queues == 0 {
                    let want = (v & 0xffff).max(v >> 16) + 1;
                    self.io_queues = want.min(u32::from(self.params.max_io_queues)) as u16;
                }
                let n = u64::from(self.io_queues - 1);
                Reply::ok(n | (n << 16))
            }
            0x0F => {
                // A discovery controller keeps a timeout: it may not hold its connection forever.
                self.kato_ms = if self.params.discovery.is_some() { discovery_kato(v) } else { v };
                Reply::ok(0)
            }
            0x06 if v & 1 == 0 => Reply::err(sc::INVALID_FIELD), // the cache stays on
            0x01..=0x06 | 0x08..=0x0B => {
                self.features[usize::from(fid)] = v;
                Reply::ok(0)
            }
            _ => Reply::err(sc::INVALID_FIELD),
        }
    }

    fn get_features(&self, cmd: &NvmeCmd) -> Reply {
        let fid = cmd.cdw(10) as u8;
        match fid {
            0x07 if self.io_queues > 0 => {
                let n = u64::from(self.io_queues - 1);
                Reply::ok(n | (n << 16))
            }
            0x07 => {
                let n = u64::from(self.params.max_io_queues - 1);
                Reply::ok(n | (n << 16))
            }
            0x0F => Reply::ok(u64::from(self.kato_ms)),
            0x06 => Reply::ok(1),
            0x01..=0x05 | 0x08..=0x0B => Reply::ok(u64::from(self.features[usize::from(fid)])),
            _ => Reply::err(sc::INVALID_FIELD),
        }
    }
}

/// The well-known NQN of discovery subsystems.
pub const DISCOVERY_NQN: &str = "nqn.2014-08.org.nvmexpress.discovery";

/// One subsystem a discovery log lists: reachable over TCP at `addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveryEntry {
    /// Its NQN.
    pub subnqn: String,
    /// Where its controllers are reached.
    pub addr: std::net::SocketAddr,
}

/// The Discovery log page (LID 70h): a 1024-byte header (generation counter, number of
/// records, record format 0) and one 1024-byte record per entry: TCP, IPv4 or IPv6, an NVM
/// subsystem, no secure channel (TLS is not offered), port 1, dynamic controllers, admin queue of 32,
/// service id (port) and address as ASCII, no TCP security (TSAS.SECTYPE 0).
pub fn discovery_log(entries: &[DiscoveryEntry], genctr: u64) -> Vec<u8> {
    let mut d = vec![0u8; 1024 * (1 + entries.len())];
    put64(&mut d, 0, genctr);
    put64(&mut d, 8, entries.len() as u64);
    for (i, e) in entries.iter().enumerate() {
        let r = &mut d[1024 * (i + 1)..1024 * (i + 2)];
        r[0] = 3; // TRTYPE: TCP
        r[1] = if e.addr.is_ipv4() { 1 } else { 2 }; // ADRFAM
        r[2] = 2; // SUBTYPE: NVM subsystem
                  // TREQ 0: secure channel not specified (10b, "not required", would say TLS is offered,
                  // and hosts would ask for it).
        r[3] = 0;
        put16(r, 4, 1); // PORTID
        put16(r, 6, 0xffff); // CNTLID: dynamic
        put16(r, 8, 32); // ASQSZ
        ascii_nul(&mut r[32..64], &e.addr.port().to_string()); // TRSVCID
        ascii_nul(&mut r[256..512], &e.subnqn);
        ascii_nul(&mut r[512..768], &e.addr.ip().to_string()); // TRADDR
    }
    d
}

/// The Identify Namespace data structure.
pub fn identify_ns(n: &NsView) -> Vec<u8> {
    let mut d = vec![0u8; 4096];
    put64(&mut d, 0, n.lba_count); // NSZE
    put64(&mut d, 8, n.lba_count); // NCAP
    put64(&mut d, 16, n.lba_count); // NUSE
    d[25] = 0; // NLBAF: one format
    d[26] = 0; // FLBAS
    d[30] = 1; // NMIC: may be shared
    d[99] = u8::from(n.read_only); // NSATTR: write protected
    d[104..120].copy_from_slice(&n.nguid);
    d[128 + 2] = n.lba_size.trailing_zeros() as u8; // LBAF0.LBADS
    d
}

/// The Namespace Identification Descriptor list: NGUID and UUID.
pub fn ns_descriptors(n: &NsView) -> Vec<u8> {
    let mut d = vec![0u8; 4096];
    d[0] = 2; // NIDT NGUID
    d[1] = 16;
    d[4..20].copy_from_slice(&n.nguid);
    d[20] = 3; // NIDT UUID
    d[21] = 16;
    d[24..40].copy_from_slice(&n.uuid);
    d
}

fn ascii(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let b = s.as_bytes();
    let n = b.len().min(dst.len());
    dst[..n].copy_from_slice(&b[..n]);
}

fn ascii_nul(dst: &mut [u8], s: &str) {
    let b = s.as_bytes();
    let n = b.len().min(dst.len() - 1);
    dst[..n].copy_from_slice(&b[..n]);
}

fn put16(d: &mut [u8], at: usize, v: u16) {
    d[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(d: &mut [u8], at: usize, v: u32) {
    d[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(d: &mut [u8], at: usize, v: u64) {
    d[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use zerocopy::little_endian::{U16, U32};
    use zerocopy::FromZeros;

    fn ctrl() -> Controller {
        let p = CtrlParams {
            subnqn: "nqn.2026-01.io.nvmed:test".into(),
            cntlid: 3,
            queue_size: 128,
            max_transfer: 128 << 10,
            in_capsule: 8192,
            max_io_queues: 8,
            serial: "abc".into(),
            oncs: 0x0c,
            discovery: None,
        };
        let ns =
            vec![NsView::new(&p.subnqn, 1, 512, 1 << 20, false), NsView::new(&p.subnqn, 4, 4096, 100, true)];
        Controller::new(p, ns, 5000)
    }

    fn cmd(opcode: u8, nsid: u32, cdw10: u32, cdw11: u32) -> NvmeCmd {
        let mut c = NvmeCmd::new_zeroed();
        c.opcode = opcode;
        c.cid = U16::new(1);
        c.nsid = U32::new(nsid);
        c.cdw[0] = U32::new(cdw10);
        c.cdw[1] = U32::new(cdw11);
        c
    }

    fn data(r: Reply) -> Vec<u8> {
        match r {
            Reply::Done { status: 0, data, .. } => data,
            r => panic!("{r:?}"),
        }
    }

    fn enable(c: &mut Controller) {
        let cc = 1 | (6 << 16) | (4 << 20);
        assert!(!c.property_set(prop::CC, false, cc).1);
        assert!(c.ready());
    }

    #[test]
    fn registers_enable_and_shutdown() {
        let mut c = ctrl();
        assert_eq!(c.property_get(prop::CAP, true), Reply::ok(127 | (1 << 16) | (15 << 24) | (1 << 37)));
        assert_eq!(c.property_get(prop::VS, false), Reply::ok(0x10300));
        assert_eq!(c.property_get(0x44, false), Reply::err(sc::INVALID_FIELD));
        // Commands before CC.EN are a sequence error.
        assert_eq!(c.admin(&cmd(admin_op::IDENTIFY, 0, 1, 0)), Reply::err(sc::CMD_SEQ_ERROR));
        // A bad queue entry size sets CFS instead of RDY.
        let mut bad = ctrl();
        bad.property_set(prop::CC, false, 1 | (7 << 16) | (4 << 20));
        assert_eq!(bad.property_get(prop::CSTS, false), Reply::ok(2));
        enable(&mut c);
        assert_eq!(c.property_get(prop::CSTS, false), Reply::ok(1));
        // Normal shutdown: SHST complete.
        let cc = 1 | (6 << 16) | (4 << 20) | (1 << 14);
        c.property_set(prop::CC, false, cc);
        assert_eq!(c.property_get(prop::CSTS, false), Reply::ok(1 | (2 << 2)));
        assert!(c.shutting_down());
        // Disable: RDY clears, the caller learns the I/O queues must go.
        assert!(c.property_set(prop::CC, false, 0).1);
        assert_eq!(c.property_get(prop::CSTS, false), Reply::ok(0));
    }

    #[test]
    fn identify_controller_passes_the_linux_fabrics_checks() {
        let mut c = ctrl();
        enable(&mut c);
        let d = data(c.admin(&cmd(admin_op::IDENTIFY, 0, 1, 0)));
        assert_eq!(d.len(), 4096);
        assert_eq!(u16::from_le_bytes([d[78], d[79]]), 3, "cntlid matches Connect");
        assert_ne!(u16::from_le_bytes([d[320], d[321]]), 0, "KAS");
        assert!(u32::from_le_bytes(d[1792..1796].try_into().unwrap()) >= 4, "IOCCSZ");
        assert!(u32::from_le_bytes(d[1796..1800].try_into().unwrap()) >= 1, "IORCSZ");
        assert_ne!(u16::from_le_bytes([d[514], d[515]]), 0, "MAXCMD");
        assert_eq!(u16::from_le_bytes([d[1800], d[1801]]), 0, "ICDOFF");
        assert_ne!(u32::from_le_bytes(d[536..540].try_into().unwrap()) & 3, 0, "SGLS");
        assert_eq!(d[77], 5, "MDTS 128 KiB");
        assert_eq!(&d[768..793], b"nqn.2026-01.io.nvmed:test");
        assert_eq!(d[793], 0);
        assert_eq!(u32::from_le_bytes(d[516..520].try_into().unwrap()), 4, "NN");
    }

    #[test]
    fn identify_namespaces_lists_and_descriptors() {
        let mut c = ctrl();
        enable(&mut c);
        let d = data(c.admin(&cmd(admin_op::IDENTIFY, 1, 0, 0)));
        assert_eq!(u64::from_le_bytes(d[0..8].try_into().unwrap()), 1 << 20);
        assert_eq!(d[130], 9);
        assert_eq!(d[99], 0);
        let d4 = data(c.admin(&cmd(admin_op::IDENTIFY, 4, 0, 0)));
        assert_eq!((d4[130], d4[99]), (12, 1), "4 KiB blocks, write protected");
        assert_eq!(data(c.admin(&cmd(admin_op::IDENTIFY, 2, 0, 0))), vec![0; 4096], "inactive");
        assert_eq!(c.admin(&cmd(admin_op::IDENTIFY, 5, 0, 0)), Reply::err(sc::INVALID_NS));
        let l = data(c.admin(&cmd(admin_op::IDENTIFY, 0, 2, 0)));
        assert_eq!(&l[..12], &[1, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0]);
        let l = data(c.admin(&cmd(admin_op::IDENTIFY, 1, 2, 0)));
        assert_eq!(&l[..8], &[4, 0, 0, 0, 0, 0, 0, 0]);
        let desc = data(c.admin(&cmd(admin_op::IDENTIFY, 1, 3, 0)));
        assert_eq!((desc[0], desc[1]), (2, 16));
        assert_eq!(&desc[4..20], &d[104..120], "NGUID as in Identify Namespace");
        assert_eq!((desc[20], desc[21]), (3, 16));
        assert_eq!(desc[40], 0, "list ends");
        // Stable and unique.
        let again = NsView::new("nqn.2026-01.io.nvmed:test", 1, 512, 1, false);
        assert_eq!(&again.nguid[..], &d[104..120]);
        assert_ne!(NsView::new("nqn.2026-01.io.nvmed:test", 4, 512, 1, false).nguid, again.nguid);
        assert_ne!(NsView::new("nqn.2026-01.io.nvmed:other", 1, 512, 1, false).nguid, again.nguid);
        for cns in [0x04u32, 0x05, 0x06, 0x10, 0x13, 0xff] {
            assert_eq!(
                c.admin(&cmd(admin_op::IDENTIFY, 1, cns, 0)),
                Reply::err(sc::INVALID_FIELD),
                "CNS {cns}"
            );
        }
    }

    #[test]
    fn log_pages_features_aers() {
        let mut c = ctrl();
        enable(&mut c);
        // SMART, 512 bytes (NUMDL 127).
        let d = data(c.admin(&cmd(admin_op::GET_LOG_PAGE, 0xffff_ffff, 0x02 | (127 << 16), 0)));
        assert_eq!(d.len(), 512);
        let d = data(c.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x04 | (1023 << 16), 0)));
        assert_eq!(d, vec![0; 4096]);
        let d = data(c.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x01 | (15 << 16), 0)));
        assert_eq!(d.len(), 64);
        assert_eq!(
            c.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x05 | (15 << 16), 0)),
            Reply::err(sc::INVALID_LOG_PAGE)
        );
        // Number of queues: 0-based, capped at the maximum, fixed once granted.
        assert_eq!(c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x07, 3 | (3 << 16))), Reply::ok(3 | (3 << 16)));
        assert_eq!(c.io_queues, 4);
        assert_eq!(
            c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x07, 100 | (100 << 16))),
            Reply::ok(3 | (3 << 16))
        );
        let mut c2 = ctrl();
        enable(&mut c2);
        assert_eq!(
            c2.admin(&cmd(admin_op::SET_FEATURES, 0, 0x07, 100 | (100 << 16))),
            Reply::ok(7 | (7 << 16))
        );
        // Async event config and keep alive timer are remembered.
        assert_eq!(c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x0B, 0x100)), Reply::ok(0));
        assert_eq!(c.admin(&cmd(admin_op::GET_FEATURES, 0, 0x0B, 0)), Reply::ok(0x100));
        assert_eq!(c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x0F, 15000)), Reply::ok(0));
        assert_eq!(c.admin(&cmd(admin_op::GET_FEATURES, 0, 0x0F, 0)), Reply::ok(15000));
        assert_eq!(c.kato_ms, 15000);
        // An I/O controller's host may turn the timer off; a discovery controller keeps one.
        assert_eq!(c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x0F, 0)), Reply::ok(0));
        assert_eq!(c.kato_ms, 0);
        let mut d = ctrl();
        d.params.discovery = Some(Vec::new());
        enable(&mut d);
        assert_eq!(d.admin(&cmd(admin_op::SET_FEATURES, 0, 0x0F, 0)), Reply::ok(0));
        assert_eq!(d.kato_ms, DISCOVERY_KATO_MS);
        assert_eq!(c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x0F, 15000)), Reply::ok(0));
        assert_eq!(c.admin(&cmd(admin_op::SET_FEATURES, 0, 0x7f, 0)), Reply::err(sc::INVALID_FIELD));
        for _ in 0..MAX_AERS {
            assert_eq!(c.admin(&cmd(admin_op::ASYNC_EVENT, 0, 0, 0)), Reply::Held);
        }
        assert_eq!(c.admin(&cmd(admin_op::ASYNC_EVENT, 0, 0, 0)), Reply::err(sc::AER_LIMIT));
        assert_eq!(c.admin(&cmd(admin_op::KEEP_ALIVE, 0, 0, 0)), Reply::ok(0));
        assert_eq!(c.admin(&cmd(0xC0, 0, 0, 0)), Reply::err(sc::INVALID_OPCODE));
    }

    #[test]
    fn a_discovery_controller_lists_the_subsystem() {
        let addr: std::net::SocketAddr = "10.0.2.15:4420".parse().unwrap();
        let entries = [DiscoveryEntry { subnqn: "nqn.2026-01.io.nvmed:test".into(), addr }];
        let log = discovery_log(&entries, 7);
        let mut c = ctrl();
        c.params.discovery = Some(log.clone());
        c.params.subnqn = DISCOVERY_NQN.into();
        enable(&mut c);
        let id = data(c.admin(&cmd(admin_op::IDENTIFY, 0, 1, 0)));
        assert_eq!(id[111], 2, "CNTRLTYPE: discovery");
        assert_eq!(u32::from_le_bytes(id[516..520].try_into().unwrap()), 0, "no namespaces");
        assert!(id[768..].starts_with(DISCOVERY_NQN.as_bytes()));
        assert_eq!(c.admin(&cmd(admin_op::IDENTIFY, 1, 0, 0)), Reply::err(sc::INVALID_FIELD));
        // Header, then one record: read in two pieces as hosts do (header first, then all).
        let numd = |bytes: u32| (bytes / 4 - 1) << 16;
        let head = data(c.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x70 | numd(1024), 0)));
        assert_eq!(u64::from_le_bytes(head[0..8].try_into().unwrap()), 7, "GENCTR");
        assert_eq!(u64::from_le_bytes(head[8..16].try_into().unwrap()), 1, "NUMREC");
        let all = data(c.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x70 | numd(2048), 0)));
        assert_eq!(all, log);
        let r = &all[1024..];
        assert_eq!((r[0], r[1], r[2]), (3, 1, 2), "TCP, IPv4, NVM subsystem");
        assert_eq!(r[3], 0, "TREQ: no secure channel (\"not required\" would offer TLS)");
        assert_eq!(u16::from_le_bytes([r[6], r[7]]), 0xffff, "dynamic controllers");
        let text = |b: &[u8]| String::from_utf8(b.iter().copied().take_while(|&c| c != 0).collect()).unwrap();
        assert_eq!(text(&r[32..64]), "4420");
        assert_eq!(text(&r[256..512]), "nqn.2026-01.io.nvmed:test");
        assert_eq!(text(&r[512..768]), "10.0.2.15");
        // The second record alone, by offset.
        let mut at = cmd(admin_op::GET_LOG_PAGE, 0, 0x70 | numd(1024), 0);
        at.cdw[2] = 1024.into();
        assert_eq!(data(c.admin(&at)), log[1024..]);
        // Not the I/O controller's pages.
        assert_eq!(
            c.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x02 | numd(512), 0)),
            Reply::err(sc::INVALID_LOG_PAGE)
        );
        // And an I/O controller has no discovery log.
        let mut io = ctrl();
        enable(&mut io);
        assert_eq!(
            io.admin(&cmd(admin_op::GET_LOG_PAGE, 0, 0x70 | numd(1024), 0)),
            Reply::err(sc::INVALID_LOG_PAGE)
        );
    }
}
