//! The IOVA space: where the device sees broker memory and client buffers.
//!
//! Two areas, carved out of the ranges the device reports: a small internal area for queues,
//! PRP lists and identify data, and the buffer area for clients' registered buffers. Ranges are
//! returned to the allocator when a mapping is dropped, so registrations can come and go forever
//! (unlike an allocator that only grows).

use std::collections::BTreeMap;
use std::ops::RangeInclusive;
use std::sync::{Arc, Mutex};

use crate::device::{DeviceError, Dma, NvmeDevice};

/// Page size of all DMA mappings.
pub const IOVA_PAGE: u64 = 4096;
/// Size of the internal area.
pub const INTERNAL_AREA_SIZE: u64 = 64 << 20;
/// Lowest IOVA handed out (page zero and the first MiB stay unused to catch stray zero IOVAs).
pub const IOVA_FLOOR: u64 = 1 << 20;

/// Which part of the IOVA space an allocation comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Area {
    /// Broker-internal memory: queues, PRP lists, identify data.
    Internal,
    /// Client buffers.
    Buffers,
}

/// IOVA space errors.
#[derive(Debug, thiserror::Error)]
pub enum IovaError {
    /// No free range of that size.
    #[error("no free IOVA range of {len:#x} bytes in the {area:?} area")]
    Exhausted {
        /// Area asked.
        area: Area,
        /// Length asked.
        len: u64,
    },
    /// The broker-wide limit on registered buffer bytes was reached.
    #[error("registered buffers would exceed the broker-wide limit of {limit} bytes")]
    LimitReached {
        /// The limit.
        limit: u64,
    },
    /// The device reports no usable range large enough.
    #[error("the device reports no usable IOVA range of at least {0:#x} bytes")]
    NoUsableRange(u64),
    /// The device refused the mapping.
    #[error(transparent)]
    Device(#[from] DeviceError),
}

/// A first-fit allocator over a set of free ranges, coalescing on free.
#[derive(Debug, Default)]
pub struct RangeAllocator {
    free: BTreeMap<u64, u64>, // start -> end (exclusive)
    used: u64,
}

impl RangeAllocator {
    /// An allocator owning the given half-open ranges.
    pub fn new(ranges: impl IntoIterator<Item = (u64, u64)>) -> Self {
        let mut a = Self::default();
        for (s, e) in ranges {
            if e > s {
                a.insert(s, e);
            }
        }
        a
    }

    fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&ps, &pe)) = self.free.range(..start).next_back() {
            if pe == start {
                self.free.remove(&ps);
                start = ps;
            }
        }
        if let Some(&ne) = self.free.get(&end) {
            self.free.remove(&end);
            end = ne;
        }
        self.free.insert(start, end);
    }

    /// Takes `len` bytes aligned to `align` (a power of two).
    pub fn alloc(&mut self, len: u64, align: u64) -> Option<u64> {
        let (start, end, at) = self.free.iter().find_map(|(&s, &e)| {
            let at = s.checked_add(align - 1)? & !(align - 1);
            (at.checked_add(len)? <= e).then_some((s, e, at))
        })?;
        self.free.remove(&start);
        if at > start {
            self.free.insert(start, at);
        }
        if at + len < end {
            self.free.insert(at + len, end);
        }
        self.used += len;
        Some(at)
    }

    /// Returns a range taken by [`RangeAllocator::alloc`].
    pub fn free(&mut self, start: u64, len: u64) {
        self.used -= len;
        self.insert(start, start + len);
    }

    /// Bytes currently allocated.
    pub fn used(&self) -> u64 {
        self.used
    }
}

/// The broker's IOVA space, shared by the control and I/O threads.
#[derive(Debug)]
pub struct IovaSpace {
    internal: Mutex<RangeAllocator>,
    buffers: Mutex<RangeAllocator>,
    buffer_limit: std::sync::atomic::AtomicU64,
}

impl IovaSpace {
    /// Splits the device's usable ranges into the two areas, the internal one of
    /// [`INTERNAL_AREA_SIZE`].
    pub fn new(ranges: &[RangeInclusive<u64>]) -> Result<Self, IovaError> {
        Self::with_internal_area(ranges, INTERNAL_AREA_SIZE)
    }

    /// As [`IovaSpace::new`], with an internal area of `internal` bytes (queues, PRP list
    /// pages, bounce slots: it grows with controllers times I/O threads).
    pub fn with_internal_area(ranges: &[RangeInclusive<u64>], internal: u64) -> Result<Self, IovaError> {
        let internal = internal.max(INTERNAL_AREA_SIZE).next_multiple_of(IOVA_PAGE);
        let mut usable: Vec<(u64, u64)> = ranges
            .iter()
            .filter_map(|r| {
                let s = (*r.start()).max(IOVA_FLOOR).next_multiple_of(IOVA_PAGE);
                let e = r.end().saturating_add(1) & !(IOVA_PAGE - 1);
                (e > s).then_some((s, e))
            })
            .collect();
        usable.sort();
        let idx =
            usable.iter().position(|(s, e)| e - s > internal).ok_or(IovaError::NoUsableRange(internal))?;
        let (s, e) = usable[idx];
        usable[idx] = (s + internal, e);
        Ok(Self {
            internal: Mutex::new(RangeAllocator::new([(s, s + internal)])),
            buffers: Mutex::new(RangeAllocator::new(usable)),
            buffer_limit: std::sync::atomic::AtomicU64::new(u64::MAX),
        })
    }

    /// Caps the bytes mapped in the buffer area, for all clients together (pinned memory with
    /// VFIO, so one client cannot pin the host's RAM).
    pub fn set_buffer_limit(&self, bytes: u64) {
        self.buffer_limit.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    fn area(&self, area: Area) -> &Mutex<RangeAllocator> {
        match area {
            Area::Internal => &self.internal,
            Area::Buffers => &self.buffers,
        }
    }

    /// Bytes allocated in `area`.
    pub fn used(&self, area: Area) -> u64 {
        self.area(area).lock().unwrap().used()
    }

    /// Allocates IOVA space in `area` and maps `host..host+len` there.
    ///
    /// # Safety
    /// As [`Dma::dma_map`]: the host memory must outlive the returned mapping.
    pub unsafe fn map(
        self: &Arc<Self>,
        device: &Arc<dyn Dma>,
        area: Area,
        host: *mut u8,
        len: u64,
    ) -> Result<DmaMapping, IovaError> {
        let len = len.next_multiple_of(IOVA_PAGE);
        let align = if len >= (2 << 20) { 2 << 20 } else { IOVA_PAGE };
        let iova = {
            let mut alloc = self.area(area).lock().unwrap();
            let limit = self.buffer_limit.load(std::sync::atomic::Ordering::Relaxed);
            if area == Area::Buffers && alloc.used().saturating_add(len) > limit {
                return Err(IovaError::LimitReached { limit });
            }
            alloc.alloc(len, align).ok_or(IovaError::Exhausted { area, len })?
        };
        // SAFETY: forwarded from this function's contract.
        if let Err(e) = unsafe { device.dma_map(iova, host, len) } {
            // A mapping some device could not undo still holds the range: it is never given
            // out again (and the caller keeps the memory).
            if !matches!(e, DeviceError::UndoFailed(_)) {
                self.area(area).lock().unwrap().free(iova, len);
            }
            return Err(e.into());
        }
        Ok(DmaMapping { device: device.clone(), space: self.clone(), area, iova, len, released: false })
    }
}

/// A live DMA mapping; unmapped from the device and returned to the allocator on drop.
pub struct DmaMapping {
    device: Arc<dyn Dma>,
    space: Arc<IovaSpace>,
    area: Area,
    iova: u64,
    len: u64,
    released: bool,
}

impl DmaMapping {
    /// Where the device sees the memory.
    pub fn iova(&self) -> u64 {
        self.iova
    }

    /// Mapped length (page multiple).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the mapping is empty (never).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl std::fmt::Debug for DmaMapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DmaMapping({:?} {:#x}+{:#x})", self.area, self.iova, self.len)
    }
}

impl DmaMapping {
    /// Removes the device's access. On failure the IOVA range stays reserved (reusing an IOVA
    /// the device may still reach is worse than leaking it) and the caller must not free the
    /// memory behind it either.
    pub fn unmap(mut self) -> Result<(), DeviceError> {
        self.released = true;
        self.release()
    }

    fn release(&self) -> Result<(), DeviceError> {
        if let Err(e) = self.device.dma_unmap(self.iova, self.len) {
            tracing::error!(iova = self.iova, len = self.len, "DMA unmap failed, IOVA range leaked: {e}");
            return Err(e);
        }
        self.space.area(self.area).lock().unwrap_or_else(|p| p.into_inner()).free(self.iova, self.len);
        Ok(())
    }
}

impl Drop for DmaMapping {
    fn drop(&mut self) {
        // Owners of the memory call `unmap` to learn the result; this is the fallback.
        if !self.released {
            let _ = self.release();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_coalesces() {
        let mut a = RangeAllocator::new([(0x10000, 0x20000)]);
        let x = a.alloc(0x4000, 0x1000).unwrap();
        let y = a.alloc(0x4000, 0x1000).unwrap();
        let z = a.alloc(0x8000, 0x1000).unwrap();
        assert_eq!((x, y, z), (0x10000, 0x14000, 0x18000));
        assert!(a.alloc(0x1000, 0x1000).is_none());
        a.free(y, 0x4000);
        a.free(x, 0x4000);
        assert_eq!(a.alloc(0x8000, 0x1000), Some(0x10000));
        a.free(0x10000, 0x8000);
        a.free(z, 0x8000);
        assert_eq!(a.used(), 0);
        assert_eq!(a.alloc(0x10000, 0x10000), Some(0x10000));
    }

    /// A device whose DMA unmap always fails, and that refuses every mapping too if asked.
    struct MockIommu {
        refuses_maps: bool,
    }

    /// Maps, but never unmaps.
    const STUCK: MockIommu = MockIommu { refuses_maps: false };
    /// Refuses every mapping.
    const REFUSING: MockIommu = MockIommu { refuses_maps: true };

    impl Dma for MockIommu {
        unsafe fn dma_map(&self, iova: u64, _: *mut u8, len: u64) -> Result<(), DeviceError> {
            if self.refuses_maps {
                return Err(DeviceError::MapFailed { iova, len, reason: "refused".into() });
            }
            Ok(())
        }
        fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), DeviceError> {
            Err(DeviceError::NotMapped { iova, len })
        }
    }

    impl NvmeDevice for MockIommu {
        fn name(&self) -> String {
            "mock".into()
        }
        fn read32(&self, _: u64) -> u32 {
            0
        }
        fn write32(&self, _: u64, _: u32) {}
        fn iova_ranges(&self) -> Vec<RangeInclusive<u64>> {
            vec![0..=(1 << 40) - 1]
        }
        fn interrupt_vectors(&self) -> u16 {
            0
        }
        fn interrupt_fd(&self, _: u16) -> Option<std::os::fd::BorrowedFd<'_>> {
            None
        }
        fn function_reset(&self) -> Result<(), DeviceError> {
            Ok(())
        }
        fn set_bus_master(&self, _: bool) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    fn is_mapped(addr: usize) -> bool {
        std::fs::read_to_string("/proc/self/maps").unwrap().lines().any(|l| {
            let range = l.split(' ').next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            let (a, b) = (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap());
            (a..b).contains(&addr)
        })
    }

    #[test]
    fn memory_the_device_may_still_reach_is_never_freed() {
        let device: Arc<dyn NvmeDevice> = Arc::new(STUCK);
        let space = Arc::new(IovaSpace::new(&device.iova_ranges()).unwrap());
        let mem = DmaMemory::new(&space, &device, 3 * 4096).unwrap();
        let addr = mem.mem().as_ptr() as usize;
        let leaked_before = LEAKED_DMA_BYTES.load(std::sync::atomic::Ordering::Relaxed);
        drop(mem);
        // The unmap failed: the memory stays mapped (leaked on purpose) and the IOVA range
        // stays reserved.
        assert!(is_mapped(addr), "memory the device may still write was unmapped");
        assert_eq!(space.used(Area::Internal), 3 * 4096);
        assert!(LEAKED_DMA_BYTES.load(std::sync::atomic::Ordering::Relaxed) >= leaked_before + 3 * 4096);
    }

    #[test]
    fn a_range_a_device_could_not_unmap_after_another_refused_is_never_given_out_again() {
        use crate::device::fanout::Fanout;
        let space = Arc::new(IovaSpace::new(&[0..=(1u64 << 40) - 1]).unwrap());
        let mem = nvmed_proto::shm::SharedMemory::anonymous(8192).unwrap();
        // One device refuses: the range is free again.
        let refusing: Arc<dyn Dma> = Arc::new(Fanout::new(vec![Arc::new(REFUSING)]));
        // SAFETY: nothing is mapped (the device refuses).
        let e = unsafe { space.map(&refusing, Area::Buffers, mem.as_ptr(), 8192) }.err().unwrap();
        assert!(matches!(e, IovaError::Device(DeviceError::MapFailed { .. })), "{e}");
        assert_eq!(space.used(Area::Buffers), 0);
        // The first device maps, the second refuses, and the first cannot undo its mapping: it
        // may still reach the memory, so the range stays taken (and the caller keeps `mem`).
        let stuck: Arc<dyn Dma> = Arc::new(Fanout::new(vec![Arc::new(STUCK), Arc::new(REFUSING)]));
        // SAFETY: `mem` is leaked below, as the error asks.
        let e = unsafe { space.map(&stuck, Area::Buffers, mem.as_ptr(), 8192) }.err().unwrap();
        assert!(matches!(e, IovaError::Device(DeviceError::UndoFailed(_))), "{e}");
        assert_eq!(space.used(Area::Buffers), 8192);
        std::mem::forget(mem);
    }

    #[test]
    fn areas_respect_device_ranges() {
        // A hole where an MSI window would be, and a limit at 2^39.
        let s = IovaSpace::new(&[0..=0xfedf_ffff, 0xfef0_0000..=(1u64 << 39) - 1]).unwrap();
        let a = s.internal.lock().unwrap().alloc(IOVA_PAGE, IOVA_PAGE).unwrap();
        assert_eq!(a, IOVA_FLOOR);
        let mut b = s.buffers.lock().unwrap();
        let big = b.alloc(0xfc00_0000, 2 << 20).unwrap();
        assert!(big >= 0xfef0_0000, "allocation must skip the hole");
        assert!(big + 0xfc00_0000 <= 1 << 39);
    }
}

/// Broker-owned memory mapped for the device in the internal area (queues, PRP lists).
#[derive(Debug)]
pub struct DmaMemory {
    mapping: std::mem::ManuallyDrop<DmaMapping>,
    mem: std::mem::ManuallyDrop<nvmed_proto::shm::SharedMemory>,
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        // SAFETY: both fields are taken exactly once, here, and never used again.
        let (mapping, mem) = unsafe {
            (std::mem::ManuallyDrop::take(&mut self.mapping), std::mem::ManuallyDrop::take(&mut self.mem))
        };
        release_dma(mapping, mem);
    }
}

/// Unmaps `mapping` from the device, then frees `mem`, unless the unmap failed: then the
/// device may still reach the memory, so it is deliberately leaked (and said so, loudly).
pub fn release_dma(mapping: DmaMapping, mem: nvmed_proto::shm::SharedMemory) {
    let (iova, len) = (mapping.iova(), mapping.len());
    match mapping.unmap() {
        Ok(()) => {
            if let Err(e) = mem.unmap() {
                tracing::error!(iova, len, "munmap failed, mapping leaked: {e}");
            }
        }
        Err(e) => {
            tracing::error!(
                iova,
                len,
                "DMA unmap failed ({e}): the device may still reach this memory, so it is never freed"
            );
            LEAKED_DMA_BYTES.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            std::mem::forget(mem);
        }
    }
}

/// Bytes deliberately leaked because the device could not be cut off from them.
pub static LEAKED_DMA_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl DmaMemory {
    /// Allocates `len` zeroed bytes and maps them in the internal area.
    pub fn new(space: &Arc<IovaSpace>, device: &Arc<dyn NvmeDevice>, len: usize) -> Result<Self, IovaError> {
        let len = len.next_multiple_of(IOVA_PAGE as usize);
        let mem = nvmed_proto::shm::SharedMemory::anonymous(len)
            .map_err(|e| IovaError::Device(DeviceError::Other(format!("allocating DMA memory: {e}"))))?;
        let device: Arc<dyn Dma> = device.clone();
        // SAFETY: `mem` is owned by the returned value and dropped after `mapping`.
        let mapping = unsafe { space.map(&device, Area::Internal, mem.as_ptr(), len as u64)? };
        Ok(Self { mapping: std::mem::ManuallyDrop::new(mapping), mem: std::mem::ManuallyDrop::new(mem) })
    }

    /// Device address of byte 0.
    pub fn iova(&self) -> u64 {
        self.mapping.iova()
    }

    /// The memory, for volatile access.
    pub fn mem(&self) -> &nvmed_proto::shm::SharedMemory {
        &self.mem
    }
}
