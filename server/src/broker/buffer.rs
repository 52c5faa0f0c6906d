//! Client buffers: a sealed memfd, mapped once by the broker and once for the device.

use std::mem::ManuallyDrop;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::ControlError;

use super::quota::Ticket;
use crate::device::Dma;
use crate::iova::{release_dma, Area, DmaMapping, IovaSpace, IOVA_PAGE};

/// A registered buffer. Dropping it unmaps it from the device first, then from the broker (or,
/// if the device could not be cut off, leaks the memory on purpose); the mapping's quota ticket
/// is returned last.
#[derive(Debug)]
pub struct RegisteredBuffer {
    mapping: ManuallyDrop<DmaMapping>,
    mem: ManuallyDrop<SharedMemory>,
    len: u64,
    /// A hugetlb memfd: a hole punched in it (sealing cannot forbid that) is filled on the
    /// next access only if a free huge page exists, else the access raises SIGBUS. The broker
    /// reads and writes such a buffer only through the kernel (`*_fault_safe`).
    fault_safe: bool,
    ticket: Ticket,
}

impl Drop for RegisteredBuffer {
    fn drop(&mut self) {
        // SAFETY: both fields are taken exactly once, here, and never used again.
        let (mapping, mem) =
            unsafe { (ManuallyDrop::take(&mut self.mapping), ManuallyDrop::take(&mut self.mem)) };
        release_dma(mapping, mem);
    }
}

/// `statfs` magic of hugetlbfs (memfds made with MFD_HUGETLB live there).
const HUGETLBFS_MAGIC: i64 = 0x9584_58f6;

/// Whether this process may copy its own memory through the kernel (`process_vm_readv`, which
/// a seccomp filter or a kernel without it refuses): the broker copies to and from hugetlb
/// buffers only that way. Asked once.
fn fault_safe_copies_work() -> bool {
    static WORKS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WORKS.get_or_init(|| {
        let Ok(a) = SharedMemory::anonymous(4096) else { return false };
        let mut out = [0u8; 8];
        a.copy_out_fault_safe(0, &mut out).is_ok()
    })
}

/// Page size of the memfd's memory: its huge page size for a hugetlb memfd, else 4096.
fn memfd_page_size(fd: &OwnedFd) -> Result<u64, ControlError> {
    let st = nix::sys::statfs::fstatfs(fd).map_err(|e| ControlError::Internal(format!("fstatfs: {e}")))?;
    if st.filesystem_type().0 as i64 == HUGETLBFS_MAGIC {
        Ok((st.block_size() as u64).max(IOVA_PAGE))
    } else {
        Ok(IOVA_PAGE)
    }
}

/// Identity of a file (device, inode), to recognise a memfd passed back to the broker.
pub fn file_identity(fd: impl std::os::fd::AsFd) -> Option<(u64, u64)> {
    nix::sys::stat::fstat(fd).ok().map(|st| (st.st_dev, st.st_ino))
}

impl RegisteredBuffer {
    /// Called when the buffer is to stay mapped for good (a failed device may still write it,
    /// so it is leaked on purpose): its uid's quota share is given back, the broker-wide count
    /// keeps it.
    pub fn release_uid_share(&self) {
        self.ticket.release_uid_share();
    }

    /// Checks the memfd (sealed against shrinking, large enough), maps it and maps it for DMA.
    #[allow(clippy::too_many_arguments)]
    pub fn register(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        max_len: u64,
        space: &Arc<IovaSpace>,
        device: &Arc<dyn Dma>,
        ticket: Ticket,
        rings: &[(u64, u64)],
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
        if file_identity(&fd).is_some_and(|id| rings.contains(&id)) {
            return Err(ControlError::Malformed(
                "this memfd is the session's own ring, which cannot be a DMA buffer".into(),
            ));
        }
        // A hugetlb memfd maps in whole huge pages: a range that is not made of them could
        // neither be mapped nor unmapped exactly.
        let page = memfd_page_size(&fd)?;
        if page > 4096 && !fault_safe_copies_work() {
            return Err(bad(
                "a hugetlb memfd needs process_vm_readv, which this broker may not use (seccomp?)",
            ));
        }
        if len == 0 || !len.is_multiple_of(page) {
            return Err(bad(&format!("must be a non-zero multiple of the memfd's page size {page}")));
        }
        if !offset.is_multiple_of(page) {
            return Err(bad(&format!("offset {offset} is not a multiple of the memfd's page size {page}")));
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
        // The memfd cannot shrink (sealed); a hole punched in a shmem memfd reads as zeros. A
        // hole in a hugetlb memfd may raise SIGBUS: those are copied through the kernel.
        let mem = SharedMemory::map_shared_at(std::os::fd::AsFd::as_fd(&fd), offset, len as usize)
            .map_err(|e| ControlError::ResourceExhausted(format!("mmap of the buffer failed: {e}")))?;
        // SAFETY: `mem` is stored next to the mapping and freed only after a successful unmap.
        let mapping = match unsafe { space.map(device, Area::Buffers, mem.as_ptr(), len) } {
            Ok(m) => m,
            Err(crate::iova::IovaError::Device(e @ crate::device::DeviceError::UndoFailed(_))) => {
                // A device may still reach the memory: it stays mapped until nvmed exits, and
                // its unit stays counted broker-wide (not against the client's uid).
                tracing::error!("{e}; the memory stays mapped until nvmed exits");
                ticket.release_uid_share();
                std::mem::forget(ticket);
                std::mem::forget(mem);
                return Err(ControlError::ResourceExhausted(e.to_string()));
            }
            Err(e) => {
                return Err(match e {
                    crate::iova::IovaError::LimitReached { limit } => ControlError::BufferLimit(format!(
                        "the broker maps at most {limit} bytes for all clients"
                    )),
                    e => ControlError::ResourceExhausted(e.to_string()),
                })
            }
        };
        Ok(Self {
            mapping: ManuallyDrop::new(mapping),
            mem: ManuallyDrop::new(mem),
            len,
            fault_safe: page > 4096,
            ticket,
        })
    }

    /// Device address of byte 0.
    pub fn iova(&self) -> u64 {
        self.mapping.iova()
    }

    /// Registered length.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether the broker must copy to and from this buffer through the kernel (a hugetlb
    /// memfd, which may have holes no page can fill).
    pub fn fault_safe(&self) -> bool {
        self.fault_safe
    }

    /// The broker's mapping of the buffer (client memory: copy through it, never reference it).
    pub fn mem(&self) -> &SharedMemory {
        &self.mem
    }
}
