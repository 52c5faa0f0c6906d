//! Client buffers every controller of the broker may reach: one IOVA, mapped in each
//! controller's IOMMU.

use std::sync::Arc;

use super::{DeviceError, Dma, NvmeDevice};

/// Maps and unmaps in every device at the same IOVA (the broker allocates IOVAs once, from
/// the ranges all its devices accept).
pub struct Fanout {
    devices: Vec<Arc<dyn NvmeDevice>>,
}

impl Fanout {
    /// Over these devices (at least one).
    pub fn new(devices: Vec<Arc<dyn NvmeDevice>>) -> Self {
        assert!(!devices.is_empty(), "a fanout needs a device");
        Self { devices }
    }
}

impl Dma for Fanout {
    unsafe fn dma_map(&self, iova: u64, host: *mut u8, len: u64) -> Result<(), DeviceError> {
        for (i, d) in self.devices.iter().enumerate() {
            // SAFETY: forwarded from this function's contract (the same range for each device).
            if let Err(e) = unsafe { d.dma_map(iova, host, len) } {
                // Undo the devices done so far; one that cannot be undone keeps its mapping, so
                // the caller (who sees `UndoFailed`) must then never free the memory either.
                for done in &self.devices[..i] {
                    if let Err(u) = done.dma_unmap(iova, len) {
                        return Err(DeviceError::UndoFailed(format!(
                            "{e}; undoing the mapping on {} failed too: {u}",
                            done.name()
                        )));
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Unmaps from every device; fails if any failed (the memory may then still be reached).
    fn dma_unmap(&self, iova: u64, len: u64) -> Result<(), DeviceError> {
        let mut first = None;
        for d in &self.devices {
            if let Err(e) = d.dma_unmap(iova, len) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emulator::{EmulatedController, EmulatorConfig};

    #[test]
    fn maps_in_every_device_and_unmaps_from_all() {
        let a = Arc::new(EmulatedController::new(EmulatorConfig::default()).unwrap());
        let b = Arc::new(EmulatedController::new(EmulatorConfig::default()).unwrap());
        let f = Fanout::new(vec![a.clone(), b.clone()]);
        let mem = nvmed_proto::shm::SharedMemory::anonymous(8192).unwrap();
        // SAFETY: `mem` outlives every mapping made here (all are unmapped below).
        unsafe { f.dma_map(0x10000, mem.as_ptr(), 8192) }.unwrap();
        assert_eq!((a.mapping_count(), b.mapping_count()), (1, 1));
        // A mapping the second device refuses is undone on the first.
        // SAFETY: as above.
        unsafe { b.dma_map(0x40000, mem.as_ptr(), 4096) }.unwrap();
        // SAFETY: as above.
        assert!(unsafe { f.dma_map(0x40000, mem.as_ptr(), 4096) }.is_err());
        assert_eq!((a.mapping_count(), b.mapping_count()), (1, 2));
        b.dma_unmap(0x40000, 4096).unwrap();
        f.dma_unmap(0x10000, 8192).unwrap();
        assert_eq!((a.mapping_count(), b.mapping_count()), (0, 0));
        assert!(f.dma_unmap(0x10000, 8192).is_err(), "unmapping twice must fail");
    }
}
