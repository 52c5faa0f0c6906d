//! Client buffers: a sealed memfd, mapped once by the broker and once for the device.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::ControlError;

use crate::device::NvmeDevice;
use crate::iova::{Area, DmaMapping, IovaSpace, IOVA_PAGE};

/// A registered buffer. Dropping it unmaps it from the device first, then from the broker.
#[derive(Debug)]
pub struct RegisteredBuffer {
    // Field order matters: the device mapping goes before the memory it points at.
    mapping: DmaMapping,
    _mem: SharedMemory,
    len: u64,
}

impl RegisteredBuffer {
    /// Checks the memfd (sealed against shrinking, large enough), maps it and maps it for DMA.
    pub fn register(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        max_len: u64,
        space: &Arc<IovaSpace>,
        device: &Arc<dyn NvmeDevice>,
    ) -> Result<Self, ControlError> {
        let bad = |reason: &str| ControlError::BadBufferLength { len, reason: reason.to_string() };
        let seals = match fcntl(&fd, FcntlArg::F_GET_SEALS) {
            Ok(s) => SealFlag::from_bits_truncate(s),
            Err(_) => return Err(ControlError::NotMemfd),
        };
        if !seals.contains(SealFlag::F_SEAL_SHRINK) {
            return Err(ControlError::NotSealed);
        }
        if seals.intersects(SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_FUTURE_WRITE) {
            return Err(ControlError::NotWritable);
        }
        if len == 0 || !len.is_multiple_of(IOVA_PAGE) {
            return Err(bad("must be a non-zero multiple of 4096"));
        }
        if !offset.is_multiple_of(IOVA_PAGE) {
            return Err(bad(&format!("offset {offset} is not a multiple of 4096")));
        }
        if len > max_len {
            return Err(bad(&format!("larger than the limit of {max_len} bytes")));
        }
        let size = nix::sys::stat::fstat(&fd)
            .map_err(|e| ControlError::Internal(format!("fstat: {e}")))?
            .st_size as u64;
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(bad(&format!("offset {offset} + length is past the memfd's {size} bytes")));
        }
        // The memfd cannot shrink (sealed), so the mapping can never SIGBUS.
        let mem = SharedMemory::map_shared_at(std::os::fd::AsFd::as_fd(&fd), offset, len as usize)
            .map_err(|e| ControlError::Internal(format!("mmap of the buffer failed: {e}")))?;
        // SAFETY: `mem` is stored next to the mapping and outlives it (field order).
        let mapping =
            unsafe { space.map(device, Area::Buffers, mem.as_ptr(), len) }.map_err(|e| match e {
                crate::iova::IovaError::LimitReached { limit } => ControlError::BufferLimit(format!(
                    "the broker maps at most {limit} bytes for all clients"
                )),
                e => ControlError::ResourceExhausted(e.to_string()),
            })?;
        Ok(Self { mapping, _mem: mem, len })
    }

    /// Device address of byte 0.
    pub fn iova(&self) -> u64 {
        self.mapping.iova()
    }

    /// Registered length.
    pub fn len(&self) -> u64 {
        self.len
    }
}
