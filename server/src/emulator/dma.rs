//! The emulated controller's view of host memory: an IOVA table, like an IOMMU's.
//!
//! Every DMA goes through [`IovaTable::translate`]; an IOVA not covered by a mapping is a
//! [`DmaFault`], never a host memory access.

use std::collections::BTreeMap;

use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::device::DeviceError;

/// A DMA to an IOVA with no mapping (what an IOMMU fault looks like to the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("DMA fault at IOVA {iova:#x} (+{len:#x})")]
pub struct DmaFault {
    /// Faulting address.
    pub iova: u64,
    /// Access length.
    pub len: u64,
}

#[derive(Debug, Clone, Copy)]
struct Mapping {
    len: u64,
    host: *mut u8,
}

/// IOVA -> host address mappings programmed through the device seam.
#[derive(Debug, Default)]
pub struct IovaTable {
    maps: BTreeMap<u64, Mapping>,
    /// Bus Master Enable is clear: every DMA faults.
    blocked: bool,
}

// SAFETY: the host pointers are only dereferenced under the owner's lock, and `dma_map`'s
// contract keeps them valid until the matching unmap removes them from the table.
unsafe impl Send for IovaTable {}

impl IovaTable {
    /// Adds a mapping; refuses overlaps like VFIO does (EEXIST).
    pub fn insert(&mut self, iova: u64, host: *mut u8, len: u64) -> Result<(), DeviceError> {
        let refuse = |reason: &str| DeviceError::MapFailed { iova, len, reason: reason.into() };
        if len == 0
            || !iova.is_multiple_of(4096)
            || !len.is_multiple_of(4096)
            || !(host as usize).is_multiple_of(4096)
        {
            return Err(refuse("IOVA, host address and length must be page aligned and non-zero"));
        }
        let end = iova.checked_add(len).ok_or_else(|| refuse("range wraps"))?;
        if let Some((&s, m)) = self.maps.range(..end).next_back() {
            if s + m.len > iova {
                return Err(refuse("overlaps an existing mapping"));
            }
        }
        self.maps.insert(iova, Mapping { len, host });
        Ok(())
    }

    /// Removes the mapping that starts at `iova` with exactly `len` bytes.
    pub fn remove(&mut self, iova: u64, len: u64) -> Result<(), DeviceError> {
        match self.maps.get(&iova) {
            Some(m) if m.len == len => {
                self.maps.remove(&iova);
                Ok(())
            }
            _ => Err(DeviceError::NotMapped { iova, len }),
        }
    }

    /// Number of live mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether no mapping is live.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }

    /// Allows or blocks all DMA (PCI Bus Master Enable).
    pub fn set_blocked(&mut self, blocked: bool) {
        self.blocked = blocked;
    }

    /// Host address of `len` bytes at `iova`, which must lie inside one mapping.
    pub fn translate(&self, iova: u64, len: u64) -> Result<*mut u8, DmaFault> {
        let fault = DmaFault { iova, len };
        if self.blocked {
            return Err(fault);
        }
        let (&start, m) = self.maps.range(..=iova).next_back().ok_or(fault)?;
        let end = iova.checked_add(len).ok_or(fault)?;
        if end > start + m.len {
            return Err(fault);
        }
        // SAFETY: iova - start + len <= m.len, so the offset stays within the mapped host range.
        Ok(unsafe { m.host.add((iova - start) as usize) })
    }

    /// Reads a value at `iova`.
    pub fn read<T: FromBytes>(&self, iova: u64) -> Result<T, DmaFault> {
        let p = self.translate(iova, size_of::<T>() as u64)?;
        // SAFETY: `p` covers size_of::<T>() mapped bytes; unaligned read; any bytes form a `T`.
        Ok(unsafe { std::ptr::read_unaligned(p.cast::<T>()) })
    }

    /// Writes a value at `iova`.
    pub fn write<T: IntoBytes + Immutable>(&self, iova: u64, value: &T) -> Result<(), DmaFault> {
        self.write_bytes(iova, value.as_bytes())
    }

    /// Copies `data` to `iova`.
    pub fn write_bytes(&self, iova: u64, data: &[u8]) -> Result<(), DmaFault> {
        let p = self.translate(iova, data.len() as u64)?;
        // SAFETY: `p` covers data.len() mapped bytes, which the mapper lent to the device.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Copies from `iova` into `out`.
    pub fn read_bytes(&self, iova: u64, out: &mut [u8]) -> Result<(), DmaFault> {
        let p = self.translate(iova, out.len() as u64)?;
        // SAFETY: `p` covers out.len() mapped bytes.
        unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), out.len()) };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_access_faults() {
        let mem = nvmed_proto::shm::SharedMemory::anonymous(8192).unwrap();
        let mut t = IovaTable::default();
        t.insert(0x10000, mem.as_ptr(), 8192).unwrap();
        assert!(t.insert(0x11000, mem.as_ptr(), 4096).is_err(), "overlap refused");
        t.write(0x10ff8, &0xdead_beef_u64).unwrap();
        assert_eq!(t.read::<u64>(0x10ff8).unwrap(), 0xdead_beef);
        assert_eq!(mem.read::<u64>(0xff8), 0xdead_beef);
        assert!(t.read::<u64>(0x11ffc).is_err(), "crossing the end faults");
        assert!(t.read::<u32>(0xfffc).is_err());
        t.remove(0x10000, 8192).unwrap();
        assert!(t.read::<u32>(0x10000).is_err(), "unmapped IOVA faults");
    }
}
