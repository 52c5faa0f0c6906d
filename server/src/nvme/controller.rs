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
    /// Admin commands that timed out still hold almost every admin queue slot: the controller
    /// stopped answering its admin queue, and only a reset gives it back.
    #[error("the admin queue holds {0} commands the controller never completed; it needs a reset")]
    AdminQueueStuck(u16),
    /// Reads were stopped for a while: the last one led to a reset (the controller did not
    /// answer it, its admin queue was stuck, or it was found fatal).
    #[error("paused for {0} s more: this read led to a controller reset last time")]
    AdminPaused(u64),
    /// After a reset the controller identifies itself with other limits or namespaces than
    /// those the broker serves (a firmware activated, a namespace formatted by another host):
    /// the commands built from the old ones could be wrong.
    #[error("the controller changed across a reset ({0}); restart nvmed to serve it as it is now")]
    Changed(String),
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
    /// Largest Write Zeroes one command may carry, in bytes (WZSL; `None`: no limit beyond
    /// the command's 65536 LBAs).
    pub max_write_zeroes: Option<u64>,
    /// Dataset Management (deallocate) supported.
    pub dsm: bool,
    /// Most LBAs one single-range Dataset Management command may cover (the smaller of DMRSL
    /// and DMSL; `None`: no limit).
    pub max_deallocate_blocks: Option<u32>,
    /// Volatile write cache present (flush is meaningful).
    pub volatile_write_cache: bool,
    /// Active namespaces the driver can serve.
    pub namespaces: Vec<Namespace>,
    /// Active namespaces it cannot serve, each with the reason (also logged at start).
    pub skipped: Vec<(u32, String)>,
    /// Controller's maximum queue entries.
    pub max_queue_entries: u32,
    /// SGL support for I/O commands (Identify SGLS).
    pub sgl: SglSupport,
    /// How long a normal shutdown may take (RTD3E; 0 if not reported).
    pub rtd3e_us: u32,
}

/// The controller and its admin queue.
pub struct Controller {
    device: Arc<dyn NvmeDevice>,
    space: Arc<IovaSpace>,
    cap: Cap,
    admin: QueuePair,
    scratch: DmaMemory,
    /// How long [`Controller::admin_command`] waits.
    admin_timeout: Duration,
    next_cid: u16,
    /// Command ids of admin commands that timed out and have not completed since: they may
    /// still hold admin queue slots (the driver pushes nothing beyond what the queue holds),
    /// their ids are not given to new commands (a late completion must not pass for a new
    /// command's), and a late completion is recognised by its id.
    admin_lost: Vec<u16>,
    /// Scratch pages of admin commands that timed out: the controller may still write them, so
    /// they stay mapped until a reset has stopped it.
    lost_pages: Vec<DmaMemory>,
    io_queues_granted: u16,
    info: ControllerInfo,
    /// The controller did not answer Identify CNS 03h once: not asked again (each unanswered
    /// one costs the wait and an admin queue slot until a reset).
    no_ns_descriptors: bool,
    /// The same for Identify CNS 06h (the I/O command set's limits): its first answer stands.
    no_cs_identify: bool,
}

/// How a namespace skipped because Identify Namespace was refused for now (Namespace Not Ready,
/// Format In Progress) is described (see [`ControllerInfo::skipped`]).
const IDENTIFY_NS_FAILED: &str = "Identify Namespace refused for now";

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
        Self::disable(&device, cap, true)?;
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
            admin_timeout: ADMIN_TIMEOUT,
            next_cid: 0,
            admin_lost: Vec::new(),
            no_ns_descriptors: false,
            no_cs_identify: false,
            lost_pages: Vec::new(),
            io_queues_granted: 0,
            info: ControllerInfo {
                serial: String::new(),
                model: String::new(),
                firmware: String::new(),
                max_transfer: 0,
                write_zeroes: false,
                max_write_zeroes: None,
                max_deallocate_blocks: None,
                dsm: false,
                volatile_write_cache: false,
                namespaces: Vec::new(),
                skipped: Vec::new(),
                max_queue_entries: cap.mqes(),
                sgl: SglSupport::None,
                rtd3e_us: 0,
            },
        };
        ctrl.identify()?;
        // Serving: admin commands come from the control side and from I/O threads (a reset
        // recreates queues) under the controller's lock, which other threads wait for; a device
        // that takes longer than this is reset rather than waited for.
        ctrl.admin_timeout = Duration::from_millis(cap.timeout_ms()).max(SERVING_ADMIN_TIMEOUT);
        info!(
            model = %ctrl.info.model,
            serial = %ctrl.info.serial,
            namespaces = ctrl.info.namespaces.len(),
            skipped = ctrl.info.skipped.len(),
            max_transfer = ctrl.info.max_transfer,
            sgl = ?ctrl.info.sgl,
            "controller ready"
        );
        Ok(ctrl)
    }

    /// CC.EN=0 and wait for CSTS.RDY=0; falls back to a function-level reset. `bus_master`:
    /// turn Bus Master Enable on once RDY=0 is seen after a function reset (at start; a reset
    /// path that cleared it turns it on itself once the controller is back).
    fn disable(device: &Arc<dyn NvmeDevice>, cap: Cap, bus_master: bool) -> Result<(), DriverError> {
        let cc = device.read32(REG_CC);
        let csts = device.read32(REG_CSTS);
        if csts == u32::MAX {
            return Err(DriverError::DeviceGone);
        }
        if cc & CC_EN != 0 && csts & (CSTS_RDY | CSTS_CFS) == 0 {
            // Still becoming ready (a previous owner, or a reset, left it enabling): clearing
            // CC.EN now has undefined results (NVMe 1.3 3.1.5), so let it finish first, as
            // FreeBSD and SPDK do (bounded by CAP.TO; then cleared anyway).
            if let Err(e) = wait_csts(device, cap, CSTS_RDY, CSTS_RDY, "finish enabling before a reset") {
                debug!("{e}; disabling anyway");
            }
        }
        device.write32(REG_CC, cc & !CC_EN);
        match wait_csts(device, cap, CSTS_RDY, 0, "reset (CSTS.RDY=0)") {
            Ok(()) => Ok(()),
            Err(DriverError::Timeout { .. }) => {
                warn!("controller did not reset within CAP.TO; trying a function-level reset");
                device
                    .function_reset()
                    .map_err(|e| DriverError::Unsupported(format!("function reset failed: {e}")))?;
                device.write32(REG_CC, 0);
                wait_csts(device, cap, CSTS_RDY, 0, "reset after function-level reset")?;
                if bus_master {
                    device
                        .set_bus_master(true)
                        .map_err(|e| DriverError::Unsupported(format!("enabling Bus Master Enable: {e}")))?;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Resets a controller that stopped answering: CC.EN=0 (so it stops all DMA), then brings
    /// the admin queue back. I/O queues must be created again afterwards.
    pub fn reset(&mut self) -> Result<(), DriverError> {
        Self::disable(&self.device, self.cap, false)?;
        // Disabled (RDY=0): nothing it was given can DMA any more.
        self.lost_pages.clear();
        self.admin.reset();
        self.admin_lost.clear();
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

    /// Runs one admin command to completion (polled): waiting up to [`ADMIN_TIMEOUT`] while the
    /// controller is brought up (Linux's admin timeout: CAP.TO bounds the controller's ready
    /// transitions, not how long a command may take), then up to CAP.TO, at least
    /// [`SERVING_ADMIN_TIMEOUT`].
    pub fn admin_command(&mut self, cmd: NvmeCommand) -> Result<NvmeCompletion, DriverError> {
        self.admin_command_within(cmd, self.admin_timeout)
    }

    /// As [`Controller::admin_command`], waiting at most `timeout`. A command that times out
    /// may still complete later and write its data page: the scratch page is then replaced
    /// (the old one stays mapped until a reset stops the controller), so a late transfer cannot corrupt a later result.
    fn admin_command_within(
        &mut self,
        mut cmd: NvmeCommand,
        timeout: Duration,
    ) -> Result<NvmeCompletion, DriverError> {
        // One slot stays free (a full ring reads as empty), and this command needs one.
        let lost = self.admin_lost.len() as u16;
        if lost + 2 > self.admin.depth() {
            return Err(DriverError::AdminQueueStuck(lost));
        }
        // The next id no lost command holds (at most depth - 2 are lost: one is free).
        while self.admin_lost.contains(&self.next_cid) {
            self.next_cid = self.next_cid.wrapping_add(1) % 0x8000;
        }
        cmd.cid = self.next_cid;
        self.next_cid = self.next_cid.wrapping_add(1) % 0x8000;
        self.admin.push(&cmd);
        self.admin.ring_doorbell();
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let mut found = None;
            let lost = &mut self.admin_lost;
            self.admin.reap(usize::MAX, |c| {
                if c.cid == cmd.cid {
                    found = Some(c)
                } else if let Some(i) = lost.iter().position(|&l| l == c.cid) {
                    lost.swap_remove(i); // a command that timed out earlier, done at last
                } else {
                    warn!(cid = c.cid, "a completion for no admin command in flight; ignored");
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
            let now = Instant::now();
            if now > deadline {
                if cmd.prp1 == self.scratch.iova() {
                    match DmaMemory::new(&self.space, &self.device, 4096) {
                        Ok(fresh) => self.lost_pages.push(std::mem::replace(&mut self.scratch, fresh)),
                        Err(e) => warn!("cannot replace the admin scratch page after a timeout: {e}"),
                    }
                }
                self.admin_lost.push(cmd.cid);
                return Err(DriverError::Timeout {
                    what: "complete an admin command",
                    ms: timeout.as_millis() as u64,
                });
            }
            // Most commands complete within microseconds: spin first, then poll gently.
            if now.duration_since(started) < Duration::from_millis(1) {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    fn identify_into_scratch(&mut self, cns: u32, nsid: u32) -> Result<(), DriverError> {
        self.identify_into_scratch_within(cns, nsid, self.admin_timeout)
    }

    fn identify_into_scratch_within(
        &mut self,
        cns: u32,
        nsid: u32,
        timeout: Duration,
    ) -> Result<(), DriverError> {
        self.scratch.mem().fill(0, 4096, 0);
        let cmd = NvmeCommand {
            opcode: admin::IDENTIFY,
            nsid,
            prp1: self.scratch.iova(),
            cdw10: cns,
            ..Default::default()
        };
        self.admin_command_within(cmd, timeout)?;
        Ok(())
    }

    /// Identifies the controller and its namespaces again (after a reset) and checks that what
    /// the broker built its commands from still holds: no smaller transfer limit, no optional
    /// command or SGL support lost, no tighter Write Zeroes or deallocate limit, no volatile
    /// write cache appearing, and every namespace served still there with its LBA size and at
    /// least its size. What changed for the better is not taken: the broker goes on with what
    /// it started with (namespaces attached since are not served either); only names and the
    /// firmware revision are taken. A loss is [`DriverError::Changed`].
    pub fn identify_again(&mut self) -> Result<(), DriverError> {
        let before = self.info.clone();
        self.info.namespaces.clear();
        self.info.skipped.clear();
        let identified = self.identify();
        let now = std::mem::replace(&mut self.info, before);
        identified?;
        let before = &self.info;
        let mut changed = Vec::new();
        let mut lost = |what: &str, was: String, is: String| changed.push(format!("{what} {was} -> {is}"));
        // A limit of `None` is no limit: the loosest.
        let tighter = |was: Option<u64>, is: Option<u64>| match (was, is) {
            (_, None) => false,
            (None, Some(_)) => true,
            (Some(w), Some(i)) => i < w,
        };
        if now.max_transfer < before.max_transfer {
            lost("max transfer", before.max_transfer.to_string(), now.max_transfer.to_string());
        }
        if before.write_zeroes && !now.write_zeroes {
            lost("Write Zeroes", "supported".into(), "not supported".into());
        }
        if tighter(before.max_write_zeroes, now.max_write_zeroes) {
            lost(
                "Write Zeroes limit",
                format!("{:?}", before.max_write_zeroes),
                format!("{:?}", now.max_write_zeroes),
            );
        }
        if before.dsm && !now.dsm {
            lost("Dataset Management", "supported".into(), "not supported".into());
        }
        if tighter(before.max_deallocate_blocks.map(u64::from), now.max_deallocate_blocks.map(u64::from)) {
            lost(
                "deallocate limit",
                format!("{:?}", before.max_deallocate_blocks),
                format!("{:?}", now.max_deallocate_blocks),
            );
        }
        if !before.volatile_write_cache && now.volatile_write_cache {
            lost("volatile write cache", "absent".into(), "present".into());
        }
        if before.sgl != SglSupport::None && now.sgl == SglSupport::None {
            lost("SGL support", format!("{:?}", before.sgl), "none".into());
        }
        for ns in &before.namespaces {
            if now.skipped.iter().any(|(id, why)| *id == ns.nsid && Self::identify_failed(why)) {
                // Refused for now (a format under way, not ready): not known to have changed.
                warn!(
                    nsid = ns.nsid,
                    "Identify Namespace refused for now after the reset; serving the namespace as before"
                );
                continue;
            }
            match now.namespaces.iter().find(|n| n.nsid == ns.nsid) {
                Some(n) if n.lba_size == ns.lba_size && n.lba_count >= ns.lba_count => {}
                Some(n) => lost(
                    &format!("namespace {}", ns.nsid),
                    format!("{} blocks of {} bytes", ns.lba_count, ns.lba_size),
                    format!("{} of {}", n.lba_count, n.lba_size),
                ),
                None => lost(&format!("namespace {}", ns.nsid), "active".into(), "gone".into()),
            }
        }
        if !changed.is_empty() {
            return Err(DriverError::Changed(changed.join(", ")));
        }
        if before.firmware != now.firmware {
            info!(before = %before.firmware, now = %now.firmware, "firmware revision changed across a reset");
        }
        (self.info.serial, self.info.model, self.info.firmware) = (now.serial, now.model, now.firmware);
        Ok(())
    }

    fn identify(&mut self) -> Result<(), DriverError> {
        self.identify_into_scratch(admin::CNS_CONTROLLER, 0)?;
        let mut id = vec![0u8; 4096];
        self.scratch.mem().copy_out(0, &mut id);
        self.info.serial = ascii(&id[id_ctrl::SN..id_ctrl::SN + 20]);
        self.info.model = ascii(&id[id_ctrl::MN..id_ctrl::MN + 40]);
        self.info.firmware = ascii(&id[id_ctrl::FR..id_ctrl::FR + 8]);
        self.info.rtd3e_us =
            u32::from_le_bytes(id[id_ctrl::RTD3E..id_ctrl::RTD3E + 4].try_into().expect("4 bytes"));
        let mdts = id[id_ctrl::MDTS];
        let mdts_bytes = mdts_bytes(self.cap.mps_min(), mdts);
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

        self.identify_command_set_limits()?;

        let nn = u32::from_le_bytes(id[id_ctrl::NN..id_ctrl::NN + 4].try_into().expect("4 bytes"));
        for nsid in self.active_namespace_ids(nn)? {
            match self.identify_namespace(nsid)? {
                Ok(ns) => self.info.namespaces.push(ns),
                Err(reason) => {
                    warn!("namespace {nsid}: {reason}");
                    self.info.skipped.push((nsid, reason));
                }
            }
        }
        Ok(())
    }

    /// The active namespace ids, ascending: the Active Namespace ID list (Identify CNS 02h,
    /// NVMe 1.1 and later), asked again from its last id while a page comes back full. A
    /// controller before 1.1 (whose CNS field was one bit, so 02h reads as Identify Namespace
    /// of NSID 0), or one that refuses the list, has each id up to NN tried instead, as Linux
    /// scans them.
    fn active_namespace_ids(&mut self, nn: u32) -> Result<Vec<u32>, DriverError> {
        if self.device.read32(REG_VS) < 0x0001_0100 {
            return self.scan_namespace_ids(nn);
        }
        let mut nsids = Vec::new();
        let mut after = 0u32;
        loop {
            match self.identify_into_scratch(admin::CNS_ACTIVE_NS_LIST, after) {
                Ok(()) => {}
                Err(DriverError::CommandFailed { status, .. }) if nsids.is_empty() => {
                    warn!(%status, nn, "the controller refused the active namespace list (CNS 02h); trying each namespace id");
                    return self.scan_namespace_ids(nn);
                }
                Err(e) => return Err(e),
            }
            let mut in_page = 0;
            for i in 0..ACTIVE_NS_LIST_ENTRIES {
                let nsid: u32 = self.scratch.mem().read(i * 4);
                // Ascending and above the id asked from; anything else ends the list.
                if nsid == 0 || nsid <= after || nsid == u32::MAX {
                    break;
                }
                nsids.push(nsid);
                after = nsid;
                in_page += 1;
            }
            if in_page < ACTIVE_NS_LIST_ENTRIES || nsids.len() >= MAX_NAMESPACE_IDS {
                return Ok(nsids);
            }
        }
    }

    /// Namespace ids 1 to `nn` (at most [`MAX_NAMESPACE_IDS`]) whose Identify Namespace succeeds
    /// with a non-zero size (a zero NSZE is an inactive id).
    fn scan_namespace_ids(&mut self, nn: u32) -> Result<Vec<u32>, DriverError> {
        if nn as usize > MAX_NAMESPACE_IDS {
            warn!(nn, "the controller reports {nn} namespace ids; trying the first {MAX_NAMESPACE_IDS}");
        }
        let mut nsids = Vec::new();
        for nsid in 1..=nn.min(MAX_NAMESPACE_IDS as u32) {
            match self.identify_into_scratch(admin::CNS_NAMESPACE, nsid) {
                Ok(()) if self.scratch.mem().read::<u64>(id_ns::NSZE) != 0 => nsids.push(nsid),
                Ok(()) | Err(DriverError::CommandFailed { .. }) => {} // inactive, or not a namespace
                Err(e) => return Err(e),
            }
        }
        Ok(nsids)
    }

    /// The NVM command set's own limits (Identify CNS 06h): WZSL and DMRSL. Asked only of
    /// controllers that report command-set specific Identify data (NVMe 2.0, or CAP.CSS bit 6);
    /// a controller that refuses it sets no limits.
    fn identify_command_set_limits(&mut self) -> Result<(), DriverError> {
        if self.device.read32(REG_VS) < 0x0002_0000 && !self.cap.css_iocs() || self.no_cs_identify {
            return Ok(());
        }
        // Optional: a controller that does not answer in OPTIONAL_IDENTIFY_TIMEOUT is taken as
        // one without the data (as one that refuses it), rather than failing the bring-up; it
        // is not asked again (each unanswered one costs the wait, at every reset).
        let timeout = OPTIONAL_IDENTIFY_TIMEOUT.min(self.admin_timeout);
        match self.identify_into_scratch_within(admin::CNS_CS_CONTROLLER, 0, timeout) {
            Ok(()) => {
                let wzsl: u8 = self.scratch.mem().read(id_ctrl_nvm::WZSL);
                let dmrsl: u32 = self.scratch.mem().read(id_ctrl_nvm::DMRSL);
                let dmsl: u64 = self.scratch.mem().read(id_ctrl_nvm::DMSL);
                self.info.max_write_zeroes = id_ctrl_nvm::wzsl_bytes(self.cap.mps_min(), wzsl);
                self.info.max_deallocate_blocks = id_ctrl_nvm::deallocate_blocks(dmrsl, dmsl);
                Ok(())
            }
            Err(DriverError::CommandFailed { status, .. }) => {
                debug!(%status, "no NVM command set Identify data; no Write Zeroes or range size limits");
                Ok(())
            }
            Err(DriverError::Timeout { ms, .. }) => {
                // The lost command keeps its admin queue slot (and its id) until a reset; its
                // late data lands in the replaced scratch page.
                self.no_cs_identify = true;
                warn!(
                    ms,
                    "the controller did not answer Identify I/O Command Set specific Controller \
                     (CNS 06h); going on without Write Zeroes or range size limits"
                );
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Whether `reason` (a skipped namespace's) says only that Identify Namespace was refused
    /// for now (a format under way, the namespace not ready), not what the namespace is.
    fn identify_failed(reason: &str) -> bool {
        reason.starts_with(IDENTIFY_NS_FAILED)
    }

    /// Identifies namespace `nsid`: `Ok(Err(reason))` when the driver cannot serve it.
    fn identify_namespace(&mut self, nsid: u32) -> Result<Result<Namespace, String>, DriverError> {
        // The command set first: Identify Namespace describes an NVM namespace, and a zoned or
        // key-value one takes commands an NVM driver does not issue (a zoned namespace fails
        // random writes).
        // CNS 03h came with NVMe 1.3: an older controller may time out on it rather than
        // refuse it (Linux asks only from 1.3 on); its namespaces are NVM ones.
        // Some that claim 1.3 never answer it (Linux's NVME_QUIRK_NO_NS_DESC_LIST): waited for
        // as long as an optional Identify, then taken as none.
        let descriptors = if self.device.read32(REG_VS) >= 0x0001_0300 && !self.no_ns_descriptors {
            let timeout = OPTIONAL_IDENTIFY_TIMEOUT.min(self.admin_timeout);
            match self.identify_into_scratch_within(admin::CNS_NS_DESCRIPTORS, nsid, timeout) {
                Err(DriverError::Timeout { ms, .. }) => {
                    self.no_ns_descriptors = true;
                    warn!(nsid, ms, "no answer to Identify Namespace Identification Descriptors (CNS 03h); taking the namespace as NVM");
                    Err(DriverError::CommandFailed {
                        opcode: admin::IDENTIFY,
                        status: nvmed_proto::Status::Nvme(nvmed_proto::NvmeStatus::from_status_field(0x2)),
                    })
                }
                other => other,
            }
        } else {
            Err(DriverError::CommandFailed {
                opcode: admin::IDENTIFY,
                status: nvmed_proto::Status::Nvme(nvmed_proto::NvmeStatus::from_status_field(0x2)),
            })
        };
        match descriptors {
            Ok(()) => {
                let mut list = vec![0u8; 4096];
                self.scratch.mem().copy_out(0, &mut list);
                if let Some(csi) = command_set(&list).filter(|&c| c != ns_descriptor::CSI_NVM) {
                    return Ok(Err(format!(
                        "{} namespace (CSI {csi}): not served, nvmed speaks only the NVM command set",
                        command_set_name(csi)
                    )));
                }
            }
            // Older than NVMe 1.3: no descriptor list, and every namespace is an NVM one.
            Err(DriverError::CommandFailed { status, .. }) => {
                debug!(nsid, %status, "no namespace identification descriptors; taking the namespace as NVM")
            }
            Err(e) => return Err(e),
        }
        match self.identify_into_scratch(admin::CNS_NAMESPACE, nsid) {
            Ok(()) => {}
            Err(DriverError::CommandFailed { status, .. }) => {
                // Namespace Not Ready or Format In Progress, retryable: refused for now only.
                let for_now = matches!(
                    status,
                    nvmed_proto::Status::Nvme(n) if n.sct == 0 && matches!(n.sc, 0x82 | 0x84) && !n.dnr
                );
                return Ok(Err(if for_now {
                    format!("{IDENTIFY_NS_FAILED} ({status}): not served")
                } else {
                    format!("Identify Namespace refused ({status}): not served")
                }));
            }
            Err(e) => return Err(e),
        }
        let m = self.scratch.mem();
        let nsze: u64 = m.read(id_ns::NSZE);
        let (flbas, nlbaf) = (m.read::<u8>(id_ns::FLBAS), m.read::<u8>(id_ns::NLBAF));
        let Some(index) = id_ns::lba_format_index(flbas, nlbaf) else {
            return Ok(Err(format!(
                "FLBAS {flbas:#x} names no LBA format of the {} reported",
                u16::from(nlbaf) + 1
            )));
        };
        let lbaf: u32 = m.read(id_ns::LBAF0 + index * 4);
        let format = LbaFormat {
            blocks: nsze,
            lbads: (lbaf >> 16) & 0xff,
            metadata: lbaf & 0xffff,
            pi_type: m.read::<u8>(id_ns::DPS) & 7,
        };
        Ok(format.usable(self.info.max_transfer).map(|lba_size| Namespace {
            nsid,
            lba_size,
            lba_count: nsze,
        }))
    }

    /// Reads `len` bytes (a multiple of 4, at most 4096) of log page `lid` for `nsid`
    /// (Get Log Page, through the admin queue and the scratch page, like Identify).
    pub fn get_log_page(&mut self, lid: u8, nsid: u32, len: usize) -> Result<Vec<u8>, DriverError> {
        if len == 0 || len > 4096 || !len.is_multiple_of(4) {
            return Err(DriverError::Unsupported(format!(
                "log page length {len}: 4 to 4096 bytes, in dwords"
            )));
        }
        self.scratch.mem().fill(0, 4096, 0);
        // NUMD is 0's based and split: its low 16 bits in CDW10[31:16] (NUMDL), its high 16
        // bits in CDW11[15:0] (NUMDU). LSP, RAE, the log specific identifier and the offset
        // (CDW12/13) stay 0.
        let numd = (len / 4 - 1) as u32;
        self.admin_command(NvmeCommand {
            opcode: admin::GET_LOG_PAGE,
            nsid,
            prp1: self.scratch.iova(),
            cdw10: ((numd & 0xffff) << 16) | u32::from(lid),
            cdw11: numd >> 16,
            ..Default::default()
        })?;
        let mut out = vec![0u8; len];
        self.scratch.mem().copy_out(0, &mut out);
        Ok(out)
    }

    /// The SMART / Health Information log page, decoded.
    pub fn smart_log(&mut self) -> Result<nvmed_proto::admin::SmartLog, DriverError> {
        let page = self.get_log_page(admin::LID_SMART, admin::NSID_ALL, crate::nvme::smart::LEN)?;
        Ok(crate::nvme::smart::decode(&page))
    }

    /// Asks for `count` I/O queue pairs; returns how many the controller granted.
    pub fn request_io_queues(&mut self, count: u16) -> Result<u16, DriverError> {
        // Only queues whose doorbells lie inside BAR0 (as Linux's `db_bar_size` check).
        let fit = max_queue_id(self.device.register_space(), self.dstrd());
        if fit == 0 {
            return Err(DriverError::Unsupported(format!(
                "BAR0 of {:#x} bytes holds no I/O queue doorbell (doorbell stride {} bytes)",
                self.device.register_space(),
                4u64 << self.dstrd()
            )));
        }
        if count > fit {
            warn!(asked = count, fit, "BAR0 holds the doorbells of {fit} I/O queues only");
        }
        let count = count.min(fit);
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
        self.register_io_queue(&qp, vector)?;
        Ok(qp)
    }

    /// After a controller reset: creates queue pair `qp` again at the device, at the same
    /// addresses, empty (its commands are then sent again: [`crate::nvme::IoQueue::restart`]).
    pub fn recreate_io_queue(&mut self, qp: &mut QueuePair, vector: Option<u16>) -> Result<(), DriverError> {
        if qp.qid() == 0 || qp.qid() > self.io_queues_granted {
            return Err(DriverError::Unsupported(format!("queue {} not granted", qp.qid())));
        }
        qp.reset();
        self.register_io_queue(qp, vector)
    }

    /// Asks the controller to abort command `cid` of submission queue `sqid`; returns whether
    /// it says it did (the command then completes with Command Abort Requested).
    /// Asked from an I/O thread, so it waits only CAP.TO (at least a second): a controller that
    /// does not answer then is reset.
    pub fn abort(&mut self, sqid: u16, cid: u16) -> Result<bool, DriverError> {
        let timeout = Duration::from_millis(self.cap.timeout_ms().max(1000));
        let cmd = NvmeCommand {
            opcode: admin::ABORT,
            cdw10: (u32::from(cid) << 16) | u32::from(sqid),
            ..Default::default()
        };
        let c = self.admin_command_within(cmd, timeout)?;
        Ok(c.result & 1 == 0)
    }

    /// Create I/O Completion Queue and Create I/O Submission Queue for `qp`.
    fn register_io_queue(&mut self, qp: &QueuePair, vector: Option<u16>) -> Result<(), DriverError> {
        let qid = qp.qid();
        let size = u32::from(qp.depth() - 1) << 16;
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
        Ok(())
    }

    /// Deletes an I/O queue pair (SQ first, then CQ).
    pub fn delete_io_queue(&mut self, qp: QueuePair) -> Result<(), DriverError> {
        let qid = u32::from(qp.qid());
        self.admin_command(NvmeCommand { opcode: admin::DELETE_SQ, cdw10: qid, ..Default::default() })?;
        self.admin_command(NvmeCommand { opcode: admin::DELETE_CQ, cdw10: qid, ..Default::default() })?;
        Ok(())
    }

    /// Normal shutdown (CC.SHN), waiting for CSTS.SHST = complete. A controller that is not
    /// ready or reports a fatal status is left alone (it would never report the shutdown done:
    /// as Linux, no shutdown for a dead controller).
    pub fn shutdown(&mut self) -> Result<(), DriverError> {
        let csts = self.device.read32(REG_CSTS);
        if csts == u32::MAX {
            return Err(DriverError::DeviceGone);
        }
        if csts & CSTS_RDY == 0 || csts & CSTS_CFS != 0 {
            warn!(
                csts = format_args!("{csts:#x}"),
                "controller not ready or failed: no shutdown notification"
            );
            return Ok(());
        }
        let cc = self.device.read32(REG_CC);
        self.device.write32(REG_CC, (cc & !CC_SHN_MASK) | CC_SHN_NORMAL);
        // A drive flushing its volatile cache may take longer than CAP.TO: as Linux, wait what
        // it reports (RTD3E), at least 5 s and at most 60 s.
        let ms = shutdown_timeout_ms(self.info.rtd3e_us);
        wait_csts_within(
            &self.device,
            ms,
            CSTS_SHST_MASK,
            CSTS_SHST_COMPLETE,
            "finish shutdown (CSTS.SHST)",
        )?;
        info!("controller shut down");
        Ok(())
    }
}

/// The namespaces a controller offered but the driver refused, for an error message:
/// ": namespace 1: reason; namespace 2: reason", or a note that there were none at all.
pub fn skipped_reasons(skipped: &[(u32, String)]) -> String {
    if skipped.is_empty() {
        return " (it reports no active namespace)".into();
    }
    let each: Vec<String> = skipped.iter().map(|(nsid, why)| format!("namespace {nsid}: {why}")).collect();
    format!(": {}", each.join("; "))
}

/// The Command Set Identifier in a Namespace Identification Descriptor list, if it has one.
fn command_set(list: &[u8]) -> Option<u8> {
    let mut at = 0;
    while at + ns_descriptor::HEADER <= list.len() {
        let (nidt, nidl) = (list[at], usize::from(list[at + 1]));
        if nidt == 0 {
            return None;
        }
        let id = list.get(at + ns_descriptor::HEADER..at + ns_descriptor::HEADER + nidl)?;
        if nidt == ns_descriptor::NIDT_CSI && nidl >= 1 {
            return Some(id[0]);
        }
        at += ns_descriptor::HEADER + nidl;
    }
    None
}

fn command_set_name(csi: u8) -> &'static str {
    match csi {
        ns_descriptor::CSI_NVM => "NVM",
        ns_descriptor::CSI_KEY_VALUE => "key-value",
        ns_descriptor::CSI_ZONED => "zoned",
        _ => "unknown command set",
    }
}

/// A namespace's current format, from Identify Namespace.
#[derive(Debug, Clone, Copy)]
struct LbaFormat {
    /// NSZE.
    blocks: u64,
    /// LBA data size exponent.
    lbads: u32,
    /// Metadata bytes per block.
    metadata: u32,
    /// Protection information type (DPS bits 0..3; 0 = none).
    pi_type: u8,
}

impl LbaFormat {
    /// The LBA size when the driver can serve this format (with transfers of at most
    /// `max_transfer` bytes), else why not.
    fn usable(self, max_transfer: u32) -> Result<u32, String> {
        let LbaFormat { blocks, lbads, metadata, pi_type } = self;
        if blocks == 0 || !(9..=16).contains(&lbads) {
            return Err(format!("unusable format (NSZE {blocks}, LBADS {lbads}): not served"));
        }
        if metadata != 0 {
            let pi = match pi_type {
                0 => String::new(),
                t => format!(", protection information type {t}"),
            };
            return Err(format!(
                "formatted with {metadata} bytes of metadata per block{pi}: not served, nvmed transfers no metadata"
            ));
        }
        let lba_size = 1u32 << lbads;
        if lba_size > max_transfer {
            return Err(format!(
                "LBA size {lba_size} bytes exceeds the controller's maximum transfer of {max_transfer} bytes \
                 (MDTS): not served, no I/O could complete"
            ));
        }
        Ok(lba_size)
    }
}

/// The highest queue id whose two doorbells lie inside a BAR0 of `bar_size` bytes.
fn max_queue_id(bar_size: u64, dstrd: u32) -> u16 {
    let stride = if dstrd < 61 { 4u64 << dstrd } else { u64::MAX };
    let room = bar_size.saturating_sub(REG_DOORBELL_BASE);
    // Queue q's doorbells: pairs 0..=q, each two strides (the CQ's ends 4 bytes into its own).
    (room / stride.saturating_mul(2)).saturating_sub(1).min(u64::from(u16::MAX)) as u16
}

/// How long a normal shutdown may take: RTD3E, at least 5 s and at most 60 s.
fn shutdown_timeout_ms(rtd3e_us: u32) -> u64 {
    (u64::from(rtd3e_us) / 1000).clamp(5_000, 60_000)
}

fn wait_csts(
    device: &Arc<dyn NvmeDevice>,
    cap: Cap,
    mask: u32,
    want: u32,
    what: &'static str,
) -> Result<(), DriverError> {
    let crto = if cap.crwms() { Some(device.read32(REG_CRTO)) } else { None };
    wait_csts_within(device, ready_timeout_ms(cap, crto), mask, want, what)
}

/// How long CSTS.RDY may take to change: CAP.TO, or CRTO.CRWMT where the controller reports it
/// and it is longer (NVMe 2.0 drives that need long to become ready with their media; CAP.TO
/// stops at 127.5 s), plus half a second, as Linux waits.
fn ready_timeout_ms(cap: Cap, crto: Option<u32>) -> u64 {
    let crwmt_ms = crto.filter(|&c| c != u32::MAX).map_or(0, |c| u64::from(c & 0xffff) * 500);
    cap.timeout_ms().max(crwmt_ms.min(MAX_READY_WAIT_MS)) + 500
}

/// The longest CRTO.CRWMT is believed (CRWMT can say 9 hours; a reset holds an I/O thread and
/// the admin queue while it waits).
const MAX_READY_WAIT_MS: u64 = 600_000;

fn wait_csts_within(
    device: &Arc<dyn NvmeDevice>,
    ms: u64,
    mask: u32,
    want: u32,
    what: &'static str,
) -> Result<(), DriverError> {
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

/// Entries in one page of the Active Namespace ID list (4 KiB of 32-bit ids).
const ACTIVE_NS_LIST_ENTRIES: usize = 1024;

/// Most namespace ids a controller is asked about.
const MAX_NAMESPACE_IDS: usize = 4096;

/// How long an admin command may take while the controller is brought up (as Linux's
/// `NVME_ADMIN_TIMEOUT`).
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long bring-up waits for an optional Identify (CNS 06h) before going on without it.
pub const OPTIONAL_IDENTIFY_TIMEOUT: Duration = Duration::from_secs(5);

/// Least time an admin command may take once the controller serves (see
/// [`Controller::admin_command`]).
pub const SERVING_ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// MDTS (a power of two in units of the minimum page size; 0: no limit) in bytes; a value
/// too large for 64 bits is no limit either (a device's word is not trusted to be sane).
fn mdts_bytes(mps_min: u64, mdts: u8) -> u64 {
    if mdts == 0 {
        return u64::MAX;
    }
    1u64.checked_shl(u32::from(mdts)).and_then(|units| mps_min.checked_mul(units)).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    #[test]
    fn mdts_and_the_lba_format_index_take_what_a_device_reports_without_overflow() {
        assert_eq!(mdts_bytes(4096, 0), u64::MAX);
        assert_eq!(mdts_bytes(4096, 5), 128 << 10);
        // 4 KiB << 52 is 2^64, past u64: no limit, not zero (nor a panic at 64 and above).
        for mdts in [51, 52, 63, 64, 200, 255] {
            let b = mdts_bytes(4096, mdts);
            assert!(b == u64::MAX || b == 4096 << mdts, "MDTS {mdts}: {b}");
        }
        // 8 KiB BAR0, 4-byte stride: (0x1000 / 8) - 1 = 511 I/O queues; a 4 KiB stride: none.
        assert_eq!(max_queue_id(0x2000, 0), 511);
        assert_eq!(max_queue_id(0x4000, 0), 1535);
        assert_eq!(max_queue_id(0x2000, 10), 0);
        assert_eq!(max_queue_id(0x1000 + 2 * 4096 * 3, 10), 2);
        assert_eq!(max_queue_id(u64::MAX, 0), u16::MAX);
        assert_eq!(max_queue_id(0x2000, 62), 0);
        assert_eq!(shutdown_timeout_ms(0), 5_000);
        assert_eq!(shutdown_timeout_ms(8_000_000), 8_000);
        assert_eq!(shutdown_timeout_ms(u32::MAX), 60_000);
        use crate::nvme::spec::id_ns::lba_format_index;
        assert_eq!(lba_format_index(0x01, 1), Some(1));
        // Bits 4 (metadata at the end of the LBA) is not part of the index.
        assert_eq!(lba_format_index(0x11, 1), Some(1));
        // NVMe 2.0: bits 6:5 are the index's bits 5:4 (format 17 of 20).
        assert_eq!(lba_format_index(0x21, 19), Some(17));
        assert_eq!(lba_format_index(0x61, 63), Some(49));
        // An index past the formats reported names none.
        assert_eq!(lba_format_index(0x02, 1), None);
        assert_eq!(lba_format_index(0x21, 15), None);
    }

    use super::*;
    use crate::emulator::backend::MemoryBackend;
    use crate::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig};

    /// An emulated controller (it answers Identify CNS 03h with Invalid Field, like a
    /// controller older than NVMe 1.3) with namespaces of these LBA sizes, 1 MiB each.
    fn emulated(lba_sizes: &[u32], mdts: u8) -> Arc<dyn NvmeDevice> {
        let namespaces = lba_sizes
            .iter()
            .map(|&lba_size| EmulatedNamespace {
                backend: Box::new(MemoryBackend::new(1 << 20).unwrap()),
                lba_size,
            })
            .collect();
        Arc::new(
            EmulatedController::new(EmulatorConfig { namespaces, mdts, vectors: 1, ..Default::default() })
                .unwrap(),
        )
    }

    fn namespaces_of(count: usize, version: u32) -> Vec<Namespace> {
        let namespaces = (0..count)
            .map(|_| EmulatedNamespace {
                backend: Box::new(crate::emulator::backend::NullBackend::new(1 << 20)),
                lba_size: 512,
            })
            .collect();
        let config = EmulatorConfig { namespaces, vectors: 1, version, ..Default::default() };
        let dev: Arc<dyn NvmeDevice> = Arc::new(EmulatedController::new(config).unwrap());
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        Controller::init(dev, space).unwrap().info().namespaces.clone()
    }

    #[test]
    fn namespaces_are_found_on_nvme_1_0_and_past_one_page_of_the_list() {
        // NVMe 1.0: no active namespace list (CNS 02h reads as Identify Namespace 0): each id
        // up to NN is tried.
        let found = namespaces_of(3, 0x0001_0000);
        assert_eq!(found.iter().map(|n| n.nsid).collect::<Vec<_>>(), [1, 2, 3]);
        // More than one page (1024 ids) of the list: asked again from the last id.
        let found = namespaces_of(1030, 0x0001_0400);
        assert_eq!(found.len(), 1030);
        assert_eq!(found.last().map(|n| n.nsid), Some(1030));
    }

    #[test]
    fn namespace_wider_than_the_max_transfer_is_skipped_with_its_reason() {
        // MDTS 1: 8 KiB transfers; namespace 1 has 16 KiB blocks, namespace 2 512-byte ones.
        let dev = emulated(&[16384, 512], 1);
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        let ctrl = Controller::init(dev, space).unwrap();
        let info = ctrl.info();
        assert_eq!(info.max_transfer, 8192);
        assert_eq!(info.namespaces, vec![Namespace { nsid: 2, lba_size: 512, lba_count: 2048 }]);
        assert_eq!(info.skipped.len(), 1);
        assert_eq!(info.skipped[0].0, 1);
        let why = &info.skipped[0].1;
        assert!(
            why.contains("LBA size 16384 bytes exceeds the controller's maximum transfer of 8192 bytes"),
            "{why}"
        );
    }

    /// A controller of one 1 MiB namespace that never answers Identify with this CNS (and
    /// reports WZSL 1), brought up; with how long the bring-up took.
    fn hanging_on_identify(cns: u64) -> (Controller, Duration) {
        use crate::emulator::inject::{FaultAction, FaultRule};
        let namespaces = vec![EmulatedNamespace {
            backend: Box::new(MemoryBackend::new(1 << 20).unwrap()),
            lba_size: 512,
        }];
        let faults = vec![FaultRule {
            nth: cns,
            action: FaultAction::IdentifyHang,
            bad_block: None,
            controller: None,
        }];
        let config = EmulatorConfig { namespaces, vectors: 1, faults, wzsl: 1, ..Default::default() };
        let dev: Arc<dyn NvmeDevice> = Arc::new(EmulatedController::new(config).unwrap());
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        let started = Instant::now();
        let ctrl = Controller::init(dev, space).unwrap();
        (ctrl, started.elapsed())
    }

    #[test]
    fn a_controller_that_never_answers_the_command_set_identify_still_comes_up() {
        let (mut ctrl, waited) = hanging_on_identify(6);
        assert!(waited >= OPTIONAL_IDENTIFY_TIMEOUT && waited < ADMIN_TIMEOUT, "{waited:?}");
        // No limits learnt (the emulator would have said 8 KiB), the namespace served, and the
        // lost command holds its slot and id.
        assert_eq!(ctrl.info().max_write_zeroes, None);
        assert_eq!(ctrl.info().namespaces, vec![Namespace { nsid: 1, lba_size: 512, lba_count: 2048 }]);
        assert_eq!(ctrl.admin_lost.len(), 1);
        // The admin queue still answers.
        assert_eq!(ctrl.smart_log().unwrap().temperature_kelvin, 313);
    }

    #[test]
    fn a_controller_that_never_answers_the_descriptor_list_still_serves_its_namespace() {
        let (ctrl, waited) = hanging_on_identify(3);
        assert!(waited < ADMIN_TIMEOUT, "{waited:?}");
        assert_eq!(ctrl.info().namespaces, vec![Namespace { nsid: 1, lba_size: 512, lba_count: 2048 }]);
    }

    #[test]
    fn ready_waits_follow_crto_where_it_is_longer_plus_half_a_second() {
        let cap = |to: u64, crwms: bool| Cap((to << 24) | (u64::from(crwms) << 59));
        assert_eq!(ready_timeout_ms(cap(20, false), None), 10_500);
        assert_eq!(ready_timeout_ms(cap(20, true), Some(600)), 300_500, "CRWMT 300 s beyond CAP.TO");
        assert_eq!(ready_timeout_ms(cap(20, true), Some(4)), 10_500, "CAP.TO when longer");
        assert_eq!(ready_timeout_ms(cap(20, true), Some(u32::MAX)), 10_500, "a register read as all ones");
        assert_eq!(ready_timeout_ms(cap(0, false), None), 500);
        assert_eq!(ready_timeout_ms(cap(20, true), Some(0xffff)), 600_500, "at most 10 minutes");
    }

    #[test]
    fn broker_refuses_a_controller_without_a_usable_namespace_and_shuts_it_down() {
        let dev = emulated(&[16384], 1);
        let socket = std::env::temp_dir().join(format!("nvmed-nons-{}.sock", std::process::id()));
        let config = crate::broker::BrokerConfig::new(&socket);
        let err = match crate::broker::Broker::start(dev.clone(), config) {
            Err(e) => e,
            Ok(_) => panic!("a controller whose only namespace is unusable was served"),
        };
        let msg = err.to_string();
        assert!(matches!(&err, crate::broker::BrokerError::NoNamespace(s) if s.len() == 1), "{msg}");
        assert!(
            msg.starts_with("the controller has no usable namespace: namespace 1: LBA size 16384"),
            "{msg}"
        );
        assert_eq!(dev.read32(REG_CSTS) & CSTS_SHST_MASK, CSTS_SHST_COMPLETE, "CC.SHN before giving up");
        assert!(!socket.exists());
    }

    #[test]
    fn smart_log_from_the_emulator_and_unknown_pages_refused() {
        let dev = emulated(&[512], 7);
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        let mut ctrl = Controller::init(dev, space).unwrap();
        let s = ctrl.smart_log().unwrap();
        assert_eq!((s.temperature_kelvin, s.temperature_celsius, s.available_spare), (313, 40, 100));
        assert_eq!((s.available_spare_threshold, s.percentage_used, s.power_cycles), (10, 0, 1));
        // A partial read (the first 8 dwords) gets the page's start.
        let head = ctrl.get_log_page(admin::LID_SMART, admin::NSID_ALL, 32).unwrap();
        assert_eq!(u16::from_le_bytes([head[1], head[2]]), 313);
        // The Error Information log (LID 01h) is not emulated: Invalid Field.
        match ctrl.get_log_page(0x01, admin::NSID_ALL, 64) {
            Err(DriverError::CommandFailed { opcode: admin::GET_LOG_PAGE, status }) => {
                assert!(status.to_string().to_lowercase().contains("invalid field"), "{status}")
            }
            other => panic!("{other:?}"),
        }
        assert!(ctrl.get_log_page(admin::LID_SMART, 0, 6).is_err(), "not a whole number of dwords");
        // The admin queue still works.
        assert_eq!(ctrl.smart_log().unwrap().temperature_kelvin, 313);
    }

    #[test]
    fn an_admin_queue_full_of_lost_commands_is_refused_until_a_reset() {
        use crate::emulator::inject::{FaultAction, FaultRule};
        // Every Get Log Page hangs (until the controller is reset).
        let faults = (1..=64)
            .map(|nth| FaultRule { nth, action: FaultAction::LogPageHang, bad_block: None, controller: None })
            .collect();
        let namespaces = vec![EmulatedNamespace {
            backend: Box::new(MemoryBackend::new(1 << 20).unwrap()),
            lba_size: 512,
        }];
        let dev: Arc<dyn NvmeDevice> = Arc::new(
            EmulatedController::new(EmulatorConfig { namespaces, vectors: 1, faults, ..Default::default() })
                .unwrap(),
        );
        let space = Arc::new(IovaSpace::new(&dev.iova_ranges()).unwrap());
        let mut ctrl = Controller::init(dev, space).unwrap();
        ctrl.admin_timeout = Duration::from_millis(1);
        let depth = ctrl.admin.depth();
        // Each lost command holds a slot; one stays free: depth - 1 can be lost.
        for _ in 0..depth - 1 {
            assert!(matches!(ctrl.smart_log(), Err(DriverError::Timeout { .. })));
        }
        match ctrl.smart_log() {
            Err(DriverError::AdminQueueStuck(n)) => assert_eq!(n, depth - 1),
            other => panic!("{other:?}"),
        }
        // A reset empties the admin queue: commands go again (this one hangs too, as asked).
        ctrl.reset().unwrap();
        assert!(matches!(ctrl.smart_log(), Err(DriverError::Timeout { .. })));
        // The lost command's id is not given again when the ids wrap around to it: its late
        // completion must not pass for the new command's.
        let lost = ctrl.admin_lost[0];
        ctrl.next_cid = lost;
        ctrl.admin_timeout = Duration::from_secs(5);
        let c = ctrl
            .admin_command(NvmeCommand {
                opcode: admin::IDENTIFY,
                cdw10: 1,
                prp1: ctrl.scratch.iova(),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.cid, (lost + 1) % 0x8000, "the new command skipped the lost command's id");
        assert_eq!(ctrl.admin_lost, [lost]);
    }

    #[test]
    fn formats_and_their_reasons() {
        let f = LbaFormat { blocks: 100, lbads: 12, metadata: 0, pi_type: 0 };
        assert_eq!(f.usable(4096), Ok(4096));
        assert!(f.usable(2048).unwrap_err().contains("exceeds the controller's maximum transfer of 2048"));
        let meta = LbaFormat { metadata: 8, ..f }.usable(1 << 20).unwrap_err();
        assert!(meta.starts_with("formatted with 8 bytes of metadata per block: not served"), "{meta}");
        let pi = LbaFormat { metadata: 8, pi_type: 1, ..f }.usable(1 << 20).unwrap_err();
        assert!(pi.contains("8 bytes of metadata per block, protection information type 1"), "{pi}");
        assert!(LbaFormat { blocks: 0, ..f }.usable(4096).unwrap_err().contains("NSZE 0"));
        assert!(LbaFormat { lbads: 8, ..f }.usable(4096).unwrap_err().contains("LBADS 8"));
    }

    #[test]
    fn command_set_from_the_descriptor_list() {
        let mut list = vec![0u8; 4096];
        assert_eq!(command_set(&list), None, "empty list: an NVM namespace of NVMe 1.3");
        // EUI-64 (8 bytes), NGUID (16), UUID (16), then CSI 2 as QEMU reports a zoned namespace.
        let mut at = 0;
        for (nidt, nidl) in [(1u8, 8usize), (2, 16), (3, 16)] {
            list[at] = nidt;
            list[at + 1] = nidl as u8;
            list[at + 4..at + 4 + nidl].fill(0xee);
            at += 4 + nidl;
        }
        assert_eq!(command_set(&list), None, "identifiers but no CSI");
        list[at] = ns_descriptor::NIDT_CSI;
        list[at + 1] = 1;
        list[at + 4] = ns_descriptor::CSI_ZONED;
        assert_eq!(command_set(&list), Some(2));
        assert_eq!(command_set_name(2), "zoned");
        // A descriptor running off the end is ignored, not read past.
        assert_eq!(command_set(&list[..at + 4]), None);
        let mut bad = vec![0u8; 8];
        bad[0] = 1;
        bad[1] = 200;
        assert_eq!(command_set(&bad), None);
    }

    #[test]
    fn skipped_reasons_read_as_a_sentence() {
        assert_eq!(skipped_reasons(&[]), " (it reports no active namespace)");
        let s = skipped_reasons(&[(1, "a".into()), (4, "b".into())]);
        assert_eq!(s, ": namespace 1: a; namespace 4: b");
    }
}
