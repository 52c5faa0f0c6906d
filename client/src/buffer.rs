//! Memfd-backed buffers the client creates, seals and maps.

use std::os::fd::{AsFd, OwnedFd};

use nvmed_proto::shm::SharedMemory;

use crate::error::{os, Result};

/// A memfd sealed against shrinking, mapped into this process.
#[derive(Debug)]
pub struct MemfdBuffer {
    mem: SharedMemory,
    fd: OwnedFd,
    offset: u64,
}

impl MemfdBuffer {
    /// Creates a zeroed buffer of `len` bytes (rounded up to 4 KiB) and seals it.
    pub fn new(len: usize) -> Result<Self> {
        let len = len.max(1).checked_next_multiple_of(4096).ok_or_else(|| crate::Error::Os {
            what: "sizing the buffer",
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{len} bytes is too large"),
            ),
        })?;
        let memfd = memfd::MemfdOptions::new()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("nvmed-buffer")
            .map_err(|e| crate::Error::Os { what: "memfd_create", source: std::io::Error::other(e) })?;
        memfd.as_file().set_len(len as u64).map_err(os("ftruncate"))?;
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink])
            .map_err(|e| crate::Error::Os { what: "sealing the buffer", source: std::io::Error::other(e) })?;
        let fd: OwnedFd = memfd.into_file().into();
        Self::from_sealed_memfd(fd, len)
    }

    /// Maps an existing memfd (e.g. guest RAM) that the caller sealed with F_SEAL_SHRINK.
    ///
    /// The views [`crate::NvmeRing::buffer`] and [`crate::NvmeRing::buffer_mut`] hand out assume
    /// that, besides the device, only this process writes the memory while they live; a VMM
    /// whose guest writes the same RAM should copy through raw pointers instead.
    pub fn from_sealed_memfd(fd: OwnedFd, len: usize) -> Result<Self> {
        Self::from_sealed_memfd_range(fd, 0, len)
    }

    /// Maps `len` bytes at `offset` (a multiple of 4096) of a sealed memfd: one region of guest
    /// RAM when a VMM keeps several regions in one memfd. Use `fd.try_clone()` per region.
    pub fn from_sealed_memfd_range(fd: OwnedFd, offset: u64, len: usize) -> Result<Self> {
        let mem = SharedMemory::map_shared_at(fd.as_fd(), offset, len).map_err(os("mmap"))?;
        Ok(Self { mem, fd, offset })
    }

    /// Where this buffer starts in its memfd.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.mem.len()
    }

    /// Whether the buffer is empty (never).
    pub fn is_empty(&self) -> bool {
        self.mem.is_empty()
    }

    /// The memfd.
    pub fn fd(&self) -> &OwnedFd {
        &self.fd
    }

    /// Copies bytes at `offset` out (bounds checked by the caller).
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        self.mem.copy_out(offset, dst)
    }

    /// Copies bytes in at `offset` (bounds checked by the caller).
    pub(crate) fn copy_in(&self, offset: usize, src: &[u8]) {
        self.mem.copy_in(offset, src)
    }

    /// The start of the mapping, for callers that cannot take the checked views (the C library
    /// hands it to C code). The address stays valid while the buffer lives, also after it moved
    /// into a ring by [`crate::NvmeRing::register_buffer`] (until it is unregistered or the ring
    /// is dropped). Whoever writes or reads through it must keep away from ranges the device may
    /// be using (requests in flight), which the ring cannot check for them.
    pub fn as_ptr(&self) -> *mut u8 {
        self.mem.as_ptr()
    }

    /// Volatile read of a segment list entry at `offset` (8-byte aligned).
    pub(crate) fn read_segment(&self, offset: usize) -> nvmed_proto::Segment {
        self.mem.read(offset)
    }

    /// Volatile write of a segment list entry at `offset` (8-byte aligned).
    pub(crate) fn write_segment(&self, offset: usize, seg: nvmed_proto::Segment) {
        self.mem.write(offset, seg)
    }

    /// A shared view of `offset..offset+len`.
    ///
    /// # Safety
    /// No device transfer may write the range while the slice lives (the ring tracks this).
    pub(crate) unsafe fn slice(&self, offset: usize, len: usize) -> &[u8] {
        assert!(offset + len <= self.mem.len());
        // SAFETY: in bounds (asserted); the caller guarantees no DMA writes the range meanwhile,
        // and this process's own writes need `&mut self` (see `slice_mut`).
        unsafe { std::slice::from_raw_parts(self.mem.as_ptr().add(offset), len) }
    }

    /// An exclusive view of `offset..offset+len`.
    ///
    /// # Safety
    /// No device transfer may read or write the range while the slice lives.
    pub(crate) unsafe fn slice_mut(&mut self, offset: usize, len: usize) -> &mut [u8] {
        assert!(offset + len <= self.mem.len());
        // SAFETY: in bounds (asserted); `&mut self` excludes other views in this process and
        // the caller guarantees the device is not using the range.
        unsafe { std::slice::from_raw_parts_mut(self.mem.as_ptr().add(offset), len) }
    }
}
