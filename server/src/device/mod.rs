//! The device seam: what the NVMe driver needs from "a PCIe NVMe controller".
//!
//! Implemented by the in-process [`crate::emulator::EmulatedController`] and by the VFIO
//! backend. The driver never learns which one it talks to.

use std::ops::RangeInclusive;
use std::os::fd::BorrowedFd;

pub mod fanout;
pub mod vfio;

/// Errors of device access.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A DMA mapping was refused (overlap, outside the usable IOVA ranges, out of memory).
    #[error("DMA map of {len:#x} bytes at IOVA {iova:#x} failed: {reason}")]
    MapFailed {
        /// IOVA requested.
        iova: u64,
        /// Length requested.
        len: u64,
        /// Why.
        reason: String,
    },
    /// No mapping exists at that IOVA.
    #[error("no DMA mapping of {len:#x} bytes at IOVA {iova:#x}")]
    NotMapped {
        /// IOVA given.
        iova: u64,
        /// Length given.
        len: u64,
    },
    /// A mapping failed on one device and could not be undone on another that had made it:
    /// that device may still reach the memory, which must therefore stay mapped (never freed)
    /// and its IOVA range stay taken.
    #[error("{0}")]
    UndoFailed(String),
    /// A backend-specific failure.
    #[error("{0}")]
    Other(String),
}

/// Where DMA mappings are made: one device's IOMMU, or several devices' at the same IOVA
/// ([`fanout::Fanout`], for client buffers every controller of the broker may reach).
pub trait Dma: Send + Sync {
    /// Makes `len` bytes at `host` reachable by the device at `iova`.
    ///
    /// # Safety
    /// `host..host+len` must stay mapped and must not be freed until [`Dma::dma_unmap`]
    /// of the same range returns. The device may read and write it at any time until then.
    unsafe fn dma_map(&self, iova: u64, host: *mut u8, len: u64) -> Result<(), DeviceError>;

    /// Removes a mapping made by [`Dma::dma_map`]. After it returns the device can no
    /// longer reach that memory.
    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), DeviceError>;
}

/// A PCIe NVMe controller: BAR0 registers, DMA through an IOMMU, interrupts as eventfds.
pub trait NvmeDevice: Dma {
    /// A human-readable name ("emulated-0", "0000:00:03.0").
    fn name(&self) -> String;

    /// Reads a 32-bit BAR0 register.
    fn read32(&self, offset: u64) -> u32;

    /// Size of BAR0 in bytes: the doorbells of the queues the driver creates must lie inside
    /// (a large doorbell stride leaves room for few queues). Unknown: no limit.
    fn register_space(&self) -> u64 {
        u64::MAX
    }

    /// Writes a 32-bit BAR0 register (doorbells included).
    fn write32(&self, offset: u64, value: u32);

    /// Reads a 64-bit register as two 32-bit halves, low first.
    fn read64(&self, offset: u64) -> u64 {
        let lo = u64::from(self.read32(offset));
        let hi = u64::from(self.read32(offset + 4));
        lo | (hi << 32)
    }

    /// Writes a 64-bit register as two 32-bit halves, low first.
    fn write64(&self, offset: u64, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// IOVA ranges the device (and its IOMMU) accepts for mappings.
    fn iova_ranges(&self) -> Vec<RangeInclusive<u64>>;

    /// How many more DMA mappings the device's IOMMU allows, if it limits them (VFIO's
    /// `dma_entry_limit`): every registered buffer is one.
    fn dma_mappings_available(&self) -> Option<u32> {
        None
    }

    /// Number of interrupt vectors wired to eventfds.
    fn interrupt_vectors(&self) -> u16;

    /// The eventfd signalled when `vector` fires.
    fn interrupt_fd(&self, vector: u16) -> Option<BorrowedFd<'_>>;

    /// Hint that the driver is (or is no longer) sleeping on `vector`'s eventfd. Backends
    /// whose interrupts cost the driver nothing ignore it.
    fn interrupt_hint(&self, _vector: u16, _wanted: bool) {}

    /// Data bytes moved by DMA so far, if the device counts them.
    fn dma_data_bytes(&self) -> Option<u64> {
        None
    }

    /// Function-level reset of the device, used when the controller does not come back
    /// from CC.EN=0 in time. Leaves Bus Master Enable as it was before: the driver enables it
    /// again only once the controller is seen to be disabled (CSTS.RDY=0).
    fn function_reset(&self) -> Result<(), DeviceError>;

    /// Sets or clears Bus Master Enable in the PCI COMMAND register. With it clear the device
    /// cannot start any DMA: the broker clears it before it declares the commands of a failed
    /// controller dead (as Linux disables the PCI device first), so no completion is reported
    /// while the device could still write to that memory.
    fn set_bus_master(&self, enabled: bool) -> Result<(), DeviceError>;

    /// An eventfd the platform signals when it wants the device back (a hot unplug: VFIO's
    /// device request). `None`: it never asks.
    fn removal_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// Gives the device back to the platform, once its DMA is stopped and no thread uses it
    /// any more: from then on every register reads as all ones and writes go nowhere, and the
    /// device's file descriptors are closed, so the removal can complete.
    fn release(&self) {}
}
