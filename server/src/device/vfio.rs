//! A real PCIe NVMe controller through Linux VFIO (vfio-pci, type-1 IOMMU).
//!
//! BAR0 is mmapped where the kernel allows it (honouring sparse-mmap areas) and reached with
//! volatile 32-bit accesses; anything not mmapped goes through pread/pwrite on the device fd.
//! DMA mappings go through the container; MSI-X vectors are wired to eventfds.
//!
//! Hot unplug: the kernel asks for the device back through the VFIO device request interrupt
//! (an eventfd, [`NvmeDevice::removal_fd`]). Once the broker stopped using it,
//! [`NvmeDevice::release`] swaps every BAR mapping for anonymous memory full of ones (so a late
//! register access reads all ones, as from a removed device, instead of faulting) and closes the
//! device, so the removal completes.

use std::fs;
use std::io;
use std::ops::RangeInclusive;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard};

use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use super::{DeviceError, Dma, NvmeDevice};

const BAR0: u32 = 0;
const CONFIG_REGION: u32 = 7;
const MSIX_IRQ_INDEX: u32 = 2;
/// VFIO_PCI_REQ_IRQ_INDEX: the kernel wants the device back (hot unplug).
const REQ_IRQ_INDEX: u32 = 4;
const REGION_FLAG_MMAP: u32 = 1 << 2;
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;

/// Why the VFIO device could not be opened, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum VfioSetupError {
    /// No such PCI device.
    #[error("no PCI device {0} (see `lspci -D` for addresses)")]
    NoDevice(String),
    /// The device has no IOMMU group.
    #[error("{0} has no IOMMU group: the IOMMU is off. Boot with intel_iommu=on (Intel) or amd_iommu=on (AMD), and enable VT-d/AMD-Vi in the firmware")]
    NoIommu(String),
    /// The device is bound to another driver.
    #[error("{bdf} is bound to {driver:?}, not vfio-pci. Bind it with:\n  modprobe vfio-pci\n  echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override\n  echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind\n  echo {bdf} > /sys/bus/pci/drivers_probe")]
    NotVfio {
        /// Device.
        bdf: String,
        /// Its current driver.
        driver: String,
    },
    /// Another device in the IOMMU group is not bound to vfio-pci.
    #[error("IOMMU group {group} is not viable: {other} (in the same group as {bdf}) is bound to {driver:?}; bind every device of the group to vfio-pci")]
    GroupNotViable {
        /// The group.
        group: String,
        /// Our device.
        bdf: String,
        /// The offending device.
        other: String,
        /// Its driver.
        driver: String,
    },
    /// /dev/vfio is not accessible.
    #[error("cannot open {path}: {source}. Run nvmed as root, or give its user access to {path} (chown/udev rule)")]
    Permission {
        /// Path.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// Locked memory is limited below what the broker's own mappings need.
    #[error("RLIMIT_MEMLOCK is {have} bytes but nvmed needs at least {need} bytes of pinned memory for its queues, plus the bytes clients register. Raise it (`ulimit -l`, systemd LimitMEMLOCK=, /etc/security/limits.conf) or run as root")]
    Memlock {
        /// Current soft limit.
        have: u64,
        /// Minimum needed.
        need: u64,
    },
    /// A VFIO call failed.
    #[error("VFIO: {0}")]
    Vfio(String),
}

/// Pinned memory the broker itself maps: queues, PRP lists, identify data (with room to spare).
pub const BROKER_PINNED_BYTES: u64 = 16 << 20;

fn has_cap_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// Refuses to start when pinned memory is limited below the broker's own needs.
fn check_memlock() -> Result<(), VfioSetupError> {
    if has_cap_ipc_lock() {
        return Ok(());
    }
    let (soft, _) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK)
        .map_err(|e| VfioSetupError::Vfio(format!("getrlimit: {e}")))?;
    if soft < BROKER_PINNED_BYTES {
        return Err(VfioSetupError::Memlock { have: soft, need: BROKER_PINNED_BYTES });
    }
    Ok(())
}

fn driver_of(dev: &Path) -> Option<String> {
    fs::read_link(dev.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// Checks binding and group viability before touching VFIO, so errors say what to do.
pub fn preflight(bdf: &str) -> Result<PathBuf, VfioSetupError> {
    let dev = PathBuf::from(format!("/sys/bus/pci/devices/{bdf}"));
    if !dev.exists() {
        return Err(VfioSetupError::NoDevice(bdf.into()));
    }
    let group = fs::read_link(dev.join("iommu_group")).map_err(|_| VfioSetupError::NoIommu(bdf.into()))?;
    let driver = driver_of(&dev).unwrap_or_else(|| "no driver".into());
    if driver != "vfio-pci" {
        return Err(VfioSetupError::NotVfio { bdf: bdf.into(), driver });
    }
    let group_name = group.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if let Ok(members) = fs::read_dir(group.join("devices")) {
        for m in members.flatten() {
            let d = driver_of(&m.path());
            match d.as_deref() {
                None | Some("vfio-pci") | Some("pcieport") => {}
                Some(other) => {
                    return Err(VfioSetupError::GroupNotViable {
                        group: group_name,
                        bdf: bdf.into(),
                        other: m.file_name().to_string_lossy().into_owned(),
                        driver: other.into(),
                    })
                }
            }
        }
    }
    let node = format!("/dev/vfio/{group_name}");
    for path in ["/dev/vfio/vfio", node.as_str()] {
        if let Err(source) = fs::OpenOptions::new().read(true).write(true).open(path) {
            return Err(VfioSetupError::Permission { path: path.into(), source });
        }
    }
    check_memlock()?;
    Ok(dev)
}

/// One mmapped piece of BAR0.
struct BarMapping {
    offset: u64,
    len: u64,
    ptr: NonNull<u8>,
}

/// An NVMe controller behind vfio-pci.
pub struct VfioNvme {
    bdf: String,
    // Declared before the container so the device fd closes first. `None` once released.
    device: RwLock<Option<VfioDevice>>,
    /// Released: BAR accesses go nowhere (all ones).
    released: AtomicBool,
    /// Signalled by the kernel when it wants the device back.
    request: Option<EventFd>,
    container: Arc<VfioContainer>,
    bar: Vec<BarMapping>,
    bar_file_offset: u64,
    irqs: Vec<EventFd>,
    iova_ranges: Vec<RangeInclusive<u64>>,
    /// DMA mappings the container still allowed when opened (VFIO's `dma_entry_limit`,
    /// 65535 by default), if the kernel says (5.10+).
    dma_avail: Option<u32>,
    /// BAR0's size.
    bar0_size: u64,
}

// SAFETY: the BAR mappings are device memory reached only with volatile accesses of whole
// registers; the VFIO handles are thread-safe file descriptors.
unsafe impl Send for VfioNvme {}
// SAFETY: see `Send`; no method hands out references into the mappings.
unsafe impl Sync for VfioNvme {}

impl VfioNvme {
    /// Opens `bdf` (e.g. "0000:00:03.0"), maps BAR0, enables memory space and bus mastering,
    /// reads the usable IOVA ranges and wires up to `vectors` MSI-X vectors.
    pub fn open(bdf: &str, vectors: u16) -> Result<Self, VfioSetupError> {
        let sysfs = preflight(bdf)?;
        let verr = |e: vfio_ioctls::VfioError| VfioSetupError::Vfio(e.to_string());
        let container = Arc::new(VfioContainer::new(None).map_err(verr)?);
        let device = VfioDevice::new(&sysfs, container.clone() as Arc<dyn VfioOps>, false).map_err(verr)?;
        let bar_file_offset = device.get_region_offset(BAR0);
        let bar0_size = device.get_region_size(BAR0);
        let mut me = Self {
            bar0_size,
            bdf: bdf.into(),
            device: RwLock::new(Some(device)),
            released: AtomicBool::new(false),
            request: None,
            container,
            bar: Vec::new(),
            bar_file_offset,
            irqs: Vec::new(),
            iova_ranges: Vec::new(),
            dma_avail: None,
        };
        me.map_bar0()?;
        me.enable_bus_master()?;
        (me.iova_ranges, me.dma_avail) = me.read_iommu_info()?;
        tracing::info!(bdf, ranges = ?me.iova_ranges, dma_avail = ?me.dma_avail, "VFIO device opened");
        let guard = me.device.read().unwrap_or_else(|p| p.into_inner());
        let dev = guard.as_ref().expect("just opened");
        let available = dev.get_irq_info(MSIX_IRQ_INDEX).map_or(0, |i| i.count);
        let n = u32::from(vectors).min(available);
        if n > 0 {
            let fds: Vec<EventFd> = (0..n)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
                .collect::<Result<_, _>>()
                .map_err(|e| VfioSetupError::Vfio(format!("eventfd: {e}")))?;
            dev.enable_msix(fds.iter().collect()).map_err(verr)?;
            me.irqs = fds;
        } else {
            tracing::warn!(
                "no MSI-X vectors: the broker will poll with timeouts instead of sleeping on interrupts"
            );
        }
        let request = if dev.get_irq_info(REQ_IRQ_INDEX).is_some_and(|i| i.count > 0) {
            let fd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| VfioSetupError::Vfio(format!("eventfd: {e}")))?;
            match dev.enable_irq(REQ_IRQ_INDEX, vec![&fd]) {
                Ok(()) => Some(fd),
                Err(e) => {
                    tracing::warn!(
                        "no device request interrupt ({e}): a hot unplug will wait for nvmed to exit"
                    );
                    None
                }
            }
        } else {
            None
        };
        drop(guard);
        me.request = request;
        Ok(me)
    }

    /// The device, unless it was released.
    fn dev(&self) -> Option<DeviceGuard<'_>> {
        let g = self.device.read().unwrap_or_else(|p| p.into_inner());
        g.is_some().then_some(DeviceGuard(g))
    }

    fn map_bar0(&mut self) -> Result<(), VfioSetupError> {
        let guard = self.device.read().unwrap_or_else(|p| p.into_inner());
        let device = guard.as_ref().expect("not released while opening");
        let size = device.get_region_size(BAR0);
        if size < 0x2000 {
            return Err(VfioSetupError::Vfio(format!(
                "BAR0 of {size:#x} bytes is too small for an NVMe controller"
            )));
        }
        if device.get_region_flags(BAR0) & REGION_FLAG_MMAP == 0 {
            tracing::warn!("BAR0 is not mmappable; registers go through pread/pwrite");
            return Ok(());
        }
        let caps = device.get_region_caps(BAR0);
        let areas: Vec<(u64, u64)> = match caps.iter().find_map(|c| match c {
            VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.iter().map(|a| (a.offset, a.size)).collect()),
            _ => None,
        }) {
            Some(areas) if !caps.contains(&VfioRegionInfoCap::MsixMappable) => areas,
            _ => vec![(0, size)],
        };
        let mut bars = Vec::new();
        for (offset, len) in areas.into_iter().filter(|&(_, l)| l > 0) {
            // SAFETY: maps a range of the device fd the kernel declared mmappable; the mapping
            // is owned by `self.bar` and unmapped in Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    device.as_raw_fd(),
                    (self.bar_file_offset + offset) as libc::off_t,
                )
            };
            if p == libc::MAP_FAILED {
                tracing::warn!(
                    offset,
                    len,
                    "BAR0 mmap failed ({}); using pread/pwrite there",
                    io::Error::last_os_error()
                );
                continue;
            }
            bars.push(BarMapping { offset, len, ptr: NonNull::new(p.cast()).unwrap() });
        }
        drop(guard);
        self.bar = bars;
        Ok(())
    }

    /// The device fd as a File (not owned), while `device` keeps it open.
    fn config_file(device: &VfioDevice) -> std::mem::ManuallyDrop<fs::File> {
        use std::os::fd::FromRawFd;
        // SAFETY: borrows the device fd as a File without taking ownership (ManuallyDrop); the
        // caller holds `device` (and so the fd) for as long as it uses the File.
        std::mem::ManuallyDrop::new(unsafe { fs::File::from_raw_fd(device.as_raw_fd()) })
    }

    fn enable_bus_master(&self) -> Result<(), VfioSetupError> {
        self.update_command(PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, 0).map_err(VfioSetupError::Vfio)
    }

    /// Sets `set` and clears `clear` in the PCI COMMAND register, and reads it back to confirm.
    fn update_command(&self, set: u16, clear: u16) -> Result<(), String> {
        let Some(device) = self.dev() else { return Err("the device was released".into()) };
        let base = device.get_region_offset(CONFIG_REGION);
        let f = Self::config_file(&device);
        let read = |f: &fs::File| {
            let mut cmd = [0u8; 2];
            f.read_exact_at(&mut cmd, base + PCI_COMMAND)
                .map(|()| u16::from_le_bytes(cmd))
                .map_err(|e| format!("reading PCI COMMAND: {e}"))
        };
        let v = (read(&f)? | set) & !clear;
        f.write_all_at(&v.to_le_bytes(), base + PCI_COMMAND)
            .map_err(|e| format!("writing PCI COMMAND: {e}"))?;
        let now = read(&f)?;
        if now & (set | clear) != set {
            return Err(format!("PCI COMMAND reads {now:#06x} after writing {v:#06x}"));
        }
        Ok(())
    }

    /// The IOMMU's usable IOVA ranges, and how many DMA mappings it still allows.
    fn read_iommu_info(&self) -> Result<(Vec<RangeInclusive<u64>>, Option<u32>), VfioSetupError> {
        const VFIO_IOMMU_GET_INFO: libc::c_ulong = 0x3b70; // _IO(';', 100 + 12)
        const INFO_CAPS: u32 = 1 << 1;
        const CAP_IOVA_RANGE: u16 = 1;
        const CAP_DMA_AVAIL: u16 = 3;
        let fd = self.container.as_raw_fd();
        let mut buf = vec![0u64; 3];
        for _ in 0..2 {
            let bytes = (buf.len() * 8) as u32;
            buf[0] = u64::from(bytes); // argsz (low half), flags (high half) = 0
                                       // SAFETY: `buf` is a writable, 8-aligned buffer of `argsz` bytes, as the ioctl expects.
            let r = unsafe { libc::ioctl(fd, VFIO_IOMMU_GET_INFO, buf.as_mut_ptr()) };
            if r < 0 {
                return Err(VfioSetupError::Vfio(format!(
                    "VFIO_IOMMU_GET_INFO: {}",
                    io::Error::last_os_error()
                )));
            }
            let need = (buf[0] & 0xffff_ffff) as usize;
            if need <= buf.len() * 8 {
                break;
            }
            buf = vec![0u64; need.div_ceil(8)];
        }
        let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_le_bytes()).collect();
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let flags = u32_at(4);
        let mut ranges = Vec::new();
        let mut dma_avail = None;
        if flags & INFO_CAPS != 0 {
            let mut off = u32_at(16) as usize;
            while off != 0 && off + 8 <= bytes.len() {
                let id = u16::from_le_bytes([bytes[off], bytes[off + 1]]);
                let next = u32_at(off + 4) as usize;
                if id == CAP_DMA_AVAIL && off + 12 <= bytes.len() {
                    dma_avail = Some(u32_at(off + 8));
                }
                if id == CAP_IOVA_RANGE {
                    let n = u32_at(off + 8) as usize;
                    for i in 0..n {
                        let o = off + 16 + i * 16;
                        if o + 16 <= bytes.len() {
                            ranges.push(u64_at(o)..=u64_at(o + 8));
                        }
                    }
                }
                off = next;
            }
        }
        if ranges.is_empty() {
            // Old kernels report no ranges: stay below the MSI window, which every IOMMU reserves.
            ranges.push(0..=0xfedf_ffff);
        }
        Ok((ranges, dma_avail))
    }

    fn mapped(&self, offset: u64) -> Option<*mut u32> {
        self.bar.iter().find(|m| offset >= m.offset && offset + 4 <= m.offset + m.len).map(|m| {
            // SAFETY: offset - m.offset + 4 <= m.len, so the pointer stays inside the mapping.
            unsafe { m.ptr.as_ptr().add((offset - m.offset) as usize).cast::<u32>() }
        })
    }
}

impl Drop for VfioNvme {
    fn drop(&mut self) {
        if let Some(d) = self.dev() {
            let _ = d.disable_msix();
        }
        for m in &self.bar {
            // SAFETY: unmaps exactly what map_bar0 mapped (or what release put in its place);
            // no references into it exist.
            unsafe { libc::munmap(m.ptr.as_ptr().cast(), m.len as usize) };
        }
    }
}

impl Dma for VfioNvme {
    unsafe fn dma_map(&self, iova: u64, host: *mut u8, len: u64) -> Result<(), DeviceError> {
        if self.released.load(Ordering::Acquire) {
            // Gone with its IOMMU domain: nothing can reach this memory through it.
            return Ok(());
        }
        // SAFETY: forwarded from this function's contract.
        unsafe { self.container.vfio_dma_map(iova, len as usize, host) }.map_err(|e| {
            let mut reason = e.to_string();
            if reason.contains("No space left") || reason.contains("ENOSPC") {
                reason.push_str(
                    " (the container's DMA mappings ran out: vfio_iommu_type1's dma_entry_limit module \
                     parameter, 65535 by default)",
                );
            } else if let Ok((soft, _)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_MEMLOCK) {
                reason.push_str(&format!(
                    " (RLIMIT_MEMLOCK is {soft} bytes; DMA mappings are pinned, so raise it with `ulimit -l` or \
                     LimitMEMLOCK= above the registered buffer bytes plus 64 MiB, or run as root)"
                ));
            }
            DeviceError::MapFailed { iova, len, reason }
        })
    }

    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), DeviceError> {
        if self.released.load(Ordering::Acquire) {
            // Its IOMMU domain went with it (the kernel unpinned what it mapped).
            return Ok(());
        }
        self.container.vfio_dma_unmap(iova, len as usize).map_err(|e| DeviceError::MapFailed {
            iova,
            len,
            reason: e.to_string(),
        })
    }
}

impl NvmeDevice for VfioNvme {
    fn name(&self) -> String {
        self.bdf.clone()
    }

    fn register_space(&self) -> u64 {
        self.bar0_size
    }

    fn read32(&self, offset: u64) -> u32 {
        match self.mapped(offset) {
            // SAFETY: an aligned register inside the BAR mapping; device memory is read volatile.
            Some(p) => unsafe { std::ptr::read_volatile(p) },
            None => {
                let Some(device) = self.dev() else { return u32::MAX };
                let mut b = [0u8; 4];
                match Self::config_file(&device).read_exact_at(&mut b, self.bar_file_offset + offset) {
                    Ok(()) => u32::from_le_bytes(b),
                    Err(_) => u32::MAX,
                }
            }
        }
    }

    fn write32(&self, offset: u64, value: u32) {
        match self.mapped(offset) {
            // SAFETY: an aligned register inside the BAR mapping; device memory is written volatile.
            Some(p) => unsafe { std::ptr::write_volatile(p, value) },
            None => {
                let Some(device) = self.dev() else { return };
                if let Err(e) = Self::config_file(&device)
                    .write_all_at(&value.to_le_bytes(), self.bar_file_offset + offset)
                {
                    tracing::error!(offset, "BAR0 write failed: {e}");
                }
            }
        }
    }

    fn iova_ranges(&self) -> Vec<RangeInclusive<u64>> {
        self.iova_ranges.clone()
    }

    fn dma_mappings_available(&self) -> Option<u32> {
        self.dma_avail
    }

    fn interrupt_vectors(&self) -> u16 {
        self.irqs.len() as u16
    }

    fn interrupt_fd(&self, vector: u16) -> Option<BorrowedFd<'_>> {
        self.irqs.get(usize::from(vector)).map(|e| {
            // SAFETY: the eventfd is owned by `self` and outlives the returned borrow.
            unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
        })
    }

    fn function_reset(&self) -> Result<(), DeviceError> {
        // vfio-ioctls' reset() neither says whether the device supports a reset nor whether it
        // worked, so the ioctl is issued here and its result checked.
        const VFIO_DEVICE_RESET: libc::c_ulong = 0x3b6f; // _IO(';', 100 + 11)
                                                         // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is the open VFIO device.
        let Some(device) = self.dev() else {
            return Err(DeviceError::Other("the device was released".into()));
        };
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is the open VFIO device.
        let r = unsafe { libc::ioctl(device.as_raw_fd(), VFIO_DEVICE_RESET as _) };
        drop(device);
        if r != 0 {
            return Err(DeviceError::Other(format!(
                "VFIO_DEVICE_RESET failed: {}",
                io::Error::last_os_error()
            )));
        }
        // vfio-pci restores the command register after the reset: Bus Master Enable is as it
        // was (off, when a reset path cleared it); the driver turns it on once RDY=0 is seen.
        Ok(())
    }

    fn set_bus_master(&self, enabled: bool) -> Result<(), DeviceError> {
        let r = if enabled {
            self.update_command(PCI_COMMAND_MASTER, 0)
        } else {
            self.update_command(0, PCI_COMMAND_MASTER)
        };
        r.map_err(DeviceError::Other)
    }

    fn removal_fd(&self) -> Option<BorrowedFd<'_>> {
        self.request.as_ref().map(|e| {
            // SAFETY: the eventfd is owned by `self` and outlives the returned borrow.
            unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
        })
    }

    fn release(&self) {
        let mut device = self.device.write().unwrap_or_else(|p| p.into_inner());
        if device.is_none() {
            return;
        }
        for m in &self.bar {
            if let Err(e) = bar::replace_with_ones(m.ptr, m.len as usize) {
                tracing::error!(bdf = %self.bdf, "cannot swap out a BAR mapping ({e}); the removal waits for nvmed to exit");
                return;
            }
        }
        self.released.store(true, Ordering::Release);
        if let Some(d) = device.as_ref() {
            let _ = d.disable_msix();
            let _ = d.disable_irq(REQ_IRQ_INDEX);
        }
        if let Some(d) = device.take() {
            // Close the device fd (the kernel may then complete the removal) without dropping
            // the VfioDevice: its Drop looks the device's IOMMU group up in sysfs, which a device
            // being removed may no longer have (vfio-ioctls then panics), and cannot give the
            // group back to the container in that state anyway. The group stays open.
            // SAFETY: the fd is the device's own, closed once here; `d` is forgotten right
            // after, so nothing uses or closes it again.
            unsafe { libc::close(d.as_raw_fd()) };
            std::mem::forget(d);
        }
        tracing::warn!(bdf = %self.bdf, "device released to the kernel (hot unplug)");
    }
}

/// A read guard on a device that was not released.
struct DeviceGuard<'a>(RwLockReadGuard<'a, Option<VfioDevice>>);

impl std::ops::Deref for DeviceGuard<'_> {
    type Target = VfioDevice;
    fn deref(&self) -> &VfioDevice {
        self.0.as_ref().expect("checked when made")
    }
}

/// Swapping a BAR mapping for memory that reads as a removed device.
mod bar {
    use std::ptr::NonNull;

    /// Replaces the `len` bytes mapped at `at` with anonymous memory full of ones, in one step
    /// (other threads see either the BAR or the ones, never a hole).
    pub fn replace_with_ones(at: NonNull<u8>, len: usize) -> std::io::Result<()> {
        // SAFETY: a new private anonymous mapping, owned here until moved below.
        let tmp = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if tmp == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `tmp` is `len` writable bytes just mapped, referenced by nothing else.
        unsafe { std::ptr::write_bytes(tmp.cast::<u8>(), 0xff, len) };
        // SAFETY: moves the filled pages over the BAR mapping at `at` (same length), which
        // mremap unmaps atomically; only volatile register accesses ever reach that range.
        let moved = unsafe {
            libc::mremap(
                tmp,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                at.as_ptr().cast::<libc::c_void>(),
            )
        };
        if moved == libc::MAP_FAILED {
            let e = std::io::Error::last_os_error();
            // SAFETY: `tmp` is still ours: unmap it.
            unsafe { libc::munmap(tmp, len) };
            return Err(e);
        }
        Ok(())
    }
}
