//! Controller bring-up, the admin queue, identify, queue creation and shutdown.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, info, warn};

use crate::device::NvmeDevice;
use crate::iova::{DmaMemory, IovaError, IovaSpace};
use crate::nvme::prp;
use crate::nvme::queue::QueuePair;
use crate::nvme::spec::*;
use crate::nvme::vector::SglSupport;

/// Admin queue depth.
const ADMIN_DEPTH: u16 = 32;

/// Driver failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A register did not reach the expected state in time.
    #[error("controller did not {what} within {ms} ms (CAP.TO)")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        ms: u64,
    },
    /// CSTS.CFS is set.
    #[error("controller fatal status (CSTS.CFS) set {0}")]
    Fatal(&'static str),
    /// Registers read as all ones: the device is gone or not responding.
    #[error("controller registers read as all ones: device removed or not responding")]
    DeviceGone,
    /// An admin command failed.
    #[error("admin command {opcode:#04x} failed: {status}")]
    CommandFailed {
        /// Opcode.
        opcode: u8,
        /// Decoded status.
        status: nvmed_proto::Status,
    },
    /// The controller lacks something the driver needs.
    #[error("unsupported controller: {0}")]
    Unsupported(String),
    /// IOVA space or DMA mapping failure.
    #[error(transparent)]
    Iova(#[from] IovaError),
}

/// A namespace as identified on the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace id.
    pub nsid: u32,
    /// LBA size in bytes.
    pub lba_size: u32,
    /// Size in LBAs.
    pub lba_count: u64,
}

/// What Identify told about the controller.
#[derive(Debug, Clone)]
pub struct ControllerInfo {
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// Largest transfer the driver will issue, in bytes (MDTS, capped by one PRP list page).
    pub max_transfer: u32,
    /// Write Zeroes supported.
    pub write_zeroes: bool,
    /// Dataset Management (deallocate) supported.
    pub dsm: bool,
    /// Volatile write cache present (flush is meaningful).
    pub volatile_write_cache: bool,
    /// Active namespaces.
    pub namespaces: Vec<Namespace>,
    /// Controller's maximum queue entries.
    pub max_queue_entries: u32,
    /// SGL support for I/O commands (Identify SGLS).
    pub sgl: SglSupport,
}

/// The controller and its admin queue.
pub struct Controller {
    device: Arc<dyn NvmeDevice>,
    space: Arc<IovaSpace>,
    cap: Cap,
    admin: QueuePair,
    scratch: DmaMemory,
    next_cid: u16,
    io_queues_granted: u16,
    info: ControllerInfo,
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_matches(|c: char| c == ' ' || c == '\0').to_string()
}

impl Controller {
    /// Resets and enables the controller, then identifies it and its namespaces.
    pub fn init(device: Arc<dyn NvmeDevice>, space: Arc<IovaSpace>) -> Result<Self, DriverError> {
        let cap = Cap(device.read64(REG_CAP));
        if cap.0 == u64::MAX {
            return Err(DriverError::DeviceGone);
        }
        debug!(cap = format_args!("{:#x}", cap.0), "controller capabilities");
        if !cap.css_nvm() {
            return Err(DriverError::Unsupported("NVM command set not supported".into()));
        }
        if cap.mps_min() > prp::PAGE || cap.mps_max() < prp::PAGE {
            return Err(DriverError::Unsupported(format!(
                "4 KiB pages unsupported (MPSMIN {} MPSMAX {})",
                cap.mps_min(),
                cap.mps_max()
            )));
        }
        Self::disable(&device, cap)?;
        let dstrd = cap.dstrd();
        let admin_depth = ADMIN_DEPTH.min(cap.mqes().min(u32::from(u16::MAX)) as u16);
        let admin = QueuePair::new(&device, &space, 0, admin_depth, dstrd)?;
        let scratch = DmaMemory::new(&space, &device, 4096)?;
        let aqa = (u32::from(admin_depth - 1) << 16) | u32::from(admin_depth - 1);
        device.write32(REG_AQA, aqa);
        device.write64(REG_ASQ, admin.sq_iova());
        device.write64(REG_ACQ, admin.cq_iova());
        // IOSQES = 6 (64 B), IOCQES = 4 (16 B), MPS = 0 (4 KiB), CSS = NVM, round robin.
        device.write32(REG_CC, (6 << 16) | (4 << 20) | CC_EN);
        wait_csts(&device, cap, CSTS_RDY, CSTS_RDY, "become ready (CSTS.RDY=1)")?;
        let mut ctrl = Self {
            device,
            space,
            cap,
            admin,
            scratch,
            next_cid: 0,
            io_queues_granted: 0,
            info: ControllerInfo {
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                max_transfer: 0,
                write_zeroes: false,
                dsm: false,
                volatile_write_cache: false,
                namespaces: Vec::new(),
                max_queue_entries: cap.mqes(),
                sgl: SglSupport::None,
            },
        };
        ctrl.identify()?;
        info!(
            model = %ctrl.info.model,
            serial = %ctrl.info.serial,
            namespaces = ctrl.info.namespaces.len(),
            max_transfer = ctrl.info.max_transfer,
            sgl = ?ctrl.info.sgl,
            "controller ready"
        );
        Ok(ctrl)
    }

    /// CC.EN=0 and wait for CSTS.RDY=0; falls back to a function-level reset.
    fn disable(device: &Arc<dyn NvmeDevice>, cap: Cap) -> Result<(), DriverError> {
        let cc = device.read32(REG_CC);
        device.write32(REG_CC, cc & !CC_EN);
        match wait_csts(device, cap, CSTS_RDY, 0, "reset (CSTS.RDY=0)") {
            Ok(()) => Ok(()),
            Err(DriverError::Timeout { .. }) => {
                warn!("controller did not reset within CAP.TO; trying a function-level reset");
                device
                    .function_reset()
                    .map_err(|e| DriverError::Unsupported(format!("function reset failed: {e}")))?;
                device.write32(REG_CC, 0);
                wait_csts(device, cap, CSTS_RDY, 0, "reset after function-level reset")
            }
            Err(e) => Err(e),
        }
    }

    /// Resets a controller that stopped answering: CC.EN=0 (so it stops all DMA), then brings
    /// the admin queue back. I/O queues must be created again afterwards.
    pub fn reset(&mut self) -> Result<(), DriverError> {
        Self::disable(&self.device, self.cap)?;
        self.admin.reset();
        let depth = u32::from(self.admin.depth());
        self.device.write32(REG_AQA, ((depth - 1) << 16) | (depth - 1));
        self.device.write64(REG_ASQ, self.admin.sq_iova());
        self.device.write64(REG_ACQ, self.admin.cq_iova());
        self.device.write32(REG_CC, (6 << 16) | (4 << 20) | CC_EN);
        wait_csts(&self.device, self.cap, CSTS_RDY, CSTS_RDY, "become ready after a reset")?;
        self.io_queues_granted = 0;
        Ok(())
    }

    /// Identify results.
    pub fn info(&self) -> &ControllerInfo {
        &self.info
    }

    /// The device.
    pub fn device(&self) -> &Arc<dyn NvmeDevice> {
        &self.device
    }

    /// The IOVA space.
    pub fn iova_space(&self) -> &Arc<IovaSpace> {
        &self.space
    }

    /// Doorbell stride exponent.
    pub fn dstrd(&self) -> u32 {
        self.cap.dstrd()
    }

    fn command_timeout(&self) -> Duration {
        Duration::from_millis(self.cap.timeout_ms().max(1000))
    }

    /// Runs one admin command to completion (polled).
    pub fn admin_command(&mut self, mut cmd: NvmeCommand) -> Result<NvmeCompletion, DriverError> {
        cmd.cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1) % 0x8000;
        self.admin.push(&cmd);
        self.admin.ring_doorbell();
        let deadline = Instant::now() + self.command_timeout();
        loop {
            let mut found = None;
            self.admin.reap(usize::MAX, |c| {
                if c.cid == cmd.cid {
                    found = Some(c)
                }
            });
            if let Some(c) = found {
                if c.status_field() & 0x7ff != 0 {
                    return Err(DriverError::CommandFailed {
                        opcode: cmd.opcode,
                        status: nvmed_proto::Status::Nvme(nvmed_proto::NvmeStatus::from_status_field(
                            c.status_field(),
                        )),
                    });
                }
                return Ok(c);
            }
            let csts = self.device.read32(REG_CSTS);
            if csts == u32::MAX {
                return Err(DriverError::DeviceGone);
            }
            if csts & CSTS_CFS != 0 {
                return Err(DriverError::Fatal("during an admin command"));
            }
            if Instant::now() > deadline {
                return Err(DriverError::Timeout {
                    what: "complete an admin command",
                    ms: self.command_timeout().as_millis() as u64,
                });
            }
            std::hint::spin_loop();
        }
    }

    fn identify_into_scratch(&mut self, cns: u32, nsid: u32) -> Result<(), DriverError> {
        self.scratch.mem().fill(0, 4096, 0);
        self.admin_command(NvmeCommand {
            opcode: admin::IDENTIFY,
            nsid,
            prp1: self.scratch.iova(),
            cdw10: cns,
            ..Default::default()
        })?;
        Ok(())
    }

    fn identify(&mut self) -> Result<(), DriverError> {
        self.identify_into_scratch(admin::CNS_CONTROLLER, 0)?;
        let mut id = vec![0u8; 4096];
        self.scratch.mem().copy_out(0, &mut id);
        self.info.serial = ascii(&id[id_ctrl::SN..id_ctrl::SN + 20]);
        self.info.model = ascii(&id[id_ctrl::MN..id_ctrl::MN + 40]);
        self.info.firmware = ascii(&id[id_ctrl::FR..id_ctrl::FR + 8]);
        let mdts = id[id_ctrl::MDTS];
        let mdts_bytes = if mdts == 0 { u64::MAX } else { self.cap.mps_min() << mdts };
        self.info.max_transfer = mdts_bytes.min(prp::MAX_TRANSFER_ONE_LIST) as u32;
        let oncs = u16::from_le_bytes([id[id_ctrl::ONCS], id[id_ctrl::ONCS + 1]]);
        self.info.write_zeroes = oncs & id_ctrl::ONCS_WRITE_ZEROES != 0;
        self.info.dsm = oncs & id_ctrl::ONCS_DSM != 0;
        self.info.volatile_write_cache = id[id_ctrl::VWC] & 1 != 0;
        let sgls = u32::from_le_bytes(id[id_ctrl::SGLS..id_ctrl::SGLS + 4].try_into().expect("4 bytes"));
        self.info.sgl = SglSupport::from_sgls(sgls);
        let (sqes, cqes) = (id[id_ctrl::SQES], id[id_ctrl::CQES]);
        if sqes & 0xf > 6 || sqes >> 4 < 6 || cqes & 0xf > 4 || cqes >> 4 < 4 {
            return Err(DriverError::Unsupported(format!("queue entry sizes SQES {sqes:#x} CQES {cqes:#x}")));
        }

        self.identify_into_scratch(admin::CNS_ACTIVE_NS_LIST, 0)?;
        let mut nsids = Vec::new();
        for i in 0..1024 {
            let nsid: u32 = self.scratch.mem().read(i * 4);
            if nsid == 0 {
                break;
            }
            nsids.push(nsid);
        }
        for nsid in nsids {
            self.identify_into_scratch(admin::CNS_NAMESPACE, nsid)?;
            let m = self.scratch.mem();
            let nsze: u64 = m.read(id_ns::NSZE);
            let flbas = m.read::<u8>(id_ns::FLBAS) & 0xf;
            let lbaf: u32 = m.read(id_ns::LBAF0 + usize::from(flbas) * 4);
            let lbads = (lbaf >> 16) & 0xff;
            let ms = lbaf & 0xffff;
            if nsze == 0 || !(9..=16).contains(&lbads) {
                warn!(nsid, nsze, lbads, "skipping namespace with unusable format");
                continue;
            }
            if ms != 0 {
                warn!(nsid, ms, "skipping namespace formatted with metadata");
                continue;
            }
            self.info.namespaces.push(Namespace { nsid, lba_size: 1 << lbads, lba_count: nsze });
        }
        Ok(())
    }

    /// Asks for `count` I/O queue pairs; returns how many the controller granted.
    pub fn request_io_queues(&mut self, count: u16) -> Result<u16, DriverError> {
        let n = u32::from(count.max(1) - 1);
        let c = self.admin_command(NvmeCommand {
            opcode: admin::SET_FEATURES,
            cdw10: admin::FEAT_NUM_QUEUES,
            cdw11: (n << 16) | n,
            ..Default::default()
        })?;
        let granted = ((c.result & 0xffff).min(c.result >> 16) + 1).min(u32::from(count)) as u16;
        self.io_queues_granted = granted;
        Ok(granted)
    }

    /// Creates I/O queue pair `qid` of `depth` entries, completions raising `vector` (or no
    /// interrupt at all with `None`: a purely polled queue).
    pub fn create_io_queue(
        &mut self,
        qid: u16,
        depth: u16,
        vector: Option<u16>,
    ) -> Result<QueuePair, DriverError> {
        if qid == 0 || qid > self.io_queues_granted {
            return Err(DriverError::Unsupported(format!("queue {qid} not granted")));
        }
        let depth = depth.min(self.cap.mqes().min(u32::from(u16::MAX)) as u16).max(2);
        let qp = QueuePair::new(&self.device, &self.space, qid, depth, self.dstrd())?;
        let size = u32::from(depth - 1) << 16;
        self.admin_command(NvmeCommand {
            opcode: admin::CREATE_CQ,
            prp1: qp.cq_iova(),
            cdw10: size | u32::from(qid),
            cdw11: match vector {
                Some(v) => (u32::from(v) << 16) | 0b11, // IV, IEN | PC
                None => 0b01,                           // PC, no interrupts
            },
            ..Default::default()
        })?;
        self.admin_command(NvmeCommand {
            opcode: admin::CREATE_SQ,
            prp1: qp.sq_iova(),
            cdw10: size | u32::from(qid),
            cdw11: (u32::from(qid) << 16) | 1, // CQID | PC
            ..Default::default()
        })?;
        Ok(qp)
    }

    /// Deletes an I/O queue pair (SQ first, then CQ).
    pub fn delete_io_queue(&mut self, qp: QueuePair) -> Result<(), DriverError> {
        let qid = u32::from(qp.qid());
        self.admin_command(NvmeCommand { opcode: admin::DELETE_SQ, cdw10: qid, ..Default::default() })?;
        self.admin_command(NvmeCommand { opcode: admin::DELETE_CQ, cdw10: qid, ..Default::default() })?;
        Ok(())
    }

    /// Normal shutdown (CC.SHN), waiting for CSTS.SHST = complete.
    pub fn shutdown(&mut self) -> Result<(), DriverError> {
        let cc = self.device.read32(REG_CC);
        self.device.write32(REG_CC, (cc & !CC_SHN_MASK) | CC_SHN_NORMAL);
        wait_csts(&self.device, self.cap, CSTS_SHST_MASK, CSTS_SHST_COMPLETE, "finish shutdown (CSTS.SHST)")?;
        info!("controller shut down");
        Ok(())
    }
}

fn wait_csts(
    device: &Arc<dyn NvmeDevice>,
    cap: Cap,
    mask: u32,
    want: u32,
    what: &'static str,
) -> Result<(), DriverError> {
    let ms = cap.timeout_ms().max(500);
    let deadline = Instant::now() + Duration::from_millis(ms);
    loop {
        let csts = device.read32(REG_CSTS);
        if csts == u32::MAX {
            return Err(DriverError::DeviceGone);
        }
        if csts & mask == want {
            return Ok(());
        }
        if want & CSTS_RDY != 0 && csts & CSTS_CFS != 0 {
            return Err(DriverError::Fatal("while enabling"));
        }
        if Instant::now() > deadline {
            return Err(DriverError::Timeout { what, ms });
        }
        std::thread::sleep(Duration::from_micros(100));
    }
}
