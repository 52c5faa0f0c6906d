//! Where everything sits inside the ring memfd.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::{Cqe, Sqe};

/// `"NVMR"` in little-endian, the first word of every ring memfd.
pub const RING_MAGIC: u32 = u32::from_le_bytes(*b"NVMR");
/// Version of the ring layout described here.
pub const RING_VERSION: u32 = 2;
/// Page size used to align the entry arrays and the total size.
pub const PAGE_SIZE: usize = 4096;
/// Largest SQ the broker accepts.
pub const MAX_SQ_ENTRIES: u32 = 4096;
/// Largest CQ the broker accepts.
pub const MAX_CQ_ENTRIES: u32 = 8192;

/// Offset of the SQ head (written by the broker).
pub const SQ_HEAD_OFFSET: usize = 64;
// Offset 128 (the SQ tail of ring version 1) is reserved and stays zero: entries carry their
// own publication tag ([`crate::Sqe::seq`]).
/// Offset of the CQ head (written by the client).
pub const CQ_HEAD_OFFSET: usize = 192;
// Offset 256 (the CQ tail of ring version 1) is reserved and stays zero: each completion
// carries its own phase bit ([`crate::CQE_PHASE`]).
/// Offset of the broker's flags word (`BROKER_*` bits, written by the broker).
pub const BROKER_FLAGS_OFFSET: usize = 320;
/// Offset of the client's flags word (`CLIENT_*` bits, written by the client).
pub const CLIENT_FLAGS_OFFSET: usize = 384;
/// Offset of the client's wake index (u32, written by the client, same cache line as its
/// flags): with [`CLIENT_CQ_WAKE_AT`] set, the broker wakes a sleeping client only once the
/// CQ entries it published reach this index.
pub const CLIENT_WAKE_AT_OFFSET: usize = 388;
// The wake index travels with the client's flags (the broker reads both together), after them.
const _: () = assert!(CLIENT_WAKE_AT_OFFSET / 64 == CLIENT_FLAGS_OFFSET / 64);
const _: () = assert!(CLIENT_WAKE_AT_OFFSET >= CLIENT_FLAGS_OFFSET + 4);
/// Offset of the fault reason word (a [`RingFault`] code, written by the broker).
pub const FAULT_OFFSET: usize = 448;
/// Offset of the SQ entry array.
pub const SQ_ENTRIES_OFFSET: usize = PAGE_SIZE;

/// Broker flag: the broker is going to sleep; write the submit doorbell after publishing SQEs.
pub const BROKER_NEED_WAKEUP: u32 = 1 << 0;
/// Broker flag: the broker stopped serving this ring; the reason is at [`FAULT_OFFSET`].
pub const BROKER_FAULTED: u32 = 1 << 1;
/// Broker flag: the broker has SQEs of this ring it cannot take because the CQ has no room for
/// their completions, and sleeps until the client frees CQ space: after moving the CQ head, the
/// client writes the submit doorbell (same handshake as [`BROKER_NEED_WAKEUP`]).
pub const BROKER_CQ_WAIT: u32 = 1 << 2;
/// Client flag: the client sleeps on the completion doorbell; write it after publishing CQEs.
pub const CLIENT_CQ_WAITING: u32 = 1 << 0;
/// Client flag, set with [`CLIENT_CQ_WAITING`]: the client wants to be woken only once the CQ
/// holds the entries up to its wake index ([`CLIENT_WAKE_AT_OFFSET`]: the index one past the
/// last entry it waits for, at most `cq_entries` past its head: the broker stops at a full CQ),
/// like io_uring's `min_complete`. Without it, any completion wakes it.
pub const CLIENT_CQ_WAKE_AT: u32 = 1 << 1;

/// Why the broker stopped serving a ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum RingFault {
    /// SQ tail moved more than the ring's size past the broker's head (ring version 1 only:
    /// since version 2 an entry with a wrong tag is simply not published, so this is never
    /// raised; the code stays reserved).
    SqTailCorrupt = 1,
    /// CQ head is more than the ring's size behind, or ahead of, the broker's tail.
    CqHeadCorrupt = 2,
    /// The session ended.
    Closed = 3,
    /// The controller failed and the broker could not confirm that it stopped its DMA: the
    /// ring's requests will never complete and its buffers stay pinned until the broker exits.
    DeviceFailed = 4,
    /// An operator ended the session (`nvmectl kill`): a client must not reconnect on its own.
    Killed = 5,
    /// The client broke the ring's protocol: it sent file descriptors on its submit doorbell
    /// (possible on kernels before 6.16, which cannot refuse them). The ring is no longer
    /// served; the session's other rings are not affected.
    ProtocolViolation = 6,
}

impl RingFault {
    /// Decodes a fault word.
    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1 => Some(Self::SqTailCorrupt),
            2 => Some(Self::CqHeadCorrupt),
            3 => Some(Self::Closed),
            4 => Some(Self::DeviceFailed),
            5 => Some(Self::Killed),
            6 => Some(Self::ProtocolViolation),
            _ => None,
        }
    }
}

/// The header at offset 0, written once by the broker before the fd is sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct RingHeader {
    /// [`RING_MAGIC`].
    pub magic: u32,
    /// [`RING_VERSION`].
    pub version: u32,
    /// Number of SQ entries (power of two).
    pub sq_entries: u32,
    /// Number of CQ entries (power of two).
    pub cq_entries: u32,
    /// `sq_entries - 1`.
    pub sq_mask: u32,
    /// `cq_entries - 1`.
    pub cq_mask: u32,
    /// Byte offset of the SQ entry array.
    pub sq_entries_offset: u32,
    /// Byte offset of the CQ entry array.
    pub cq_entries_offset: u32,
    /// Total size of the memfd in bytes.
    pub total_size: u64,
}

const _: () = assert!(core::mem::size_of::<RingHeader>() == 40);
const _: () = assert!(core::mem::size_of::<RingHeader>() <= SQ_HEAD_OFFSET);

/// A ring size the layout rules refuse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ring sizes must be powers of two with 2 <= sq <= {MAX_SQ_ENTRIES} and sq <= cq <= {MAX_CQ_ENTRIES} (got sq {sq}, cq {cq})")]
pub struct BadRingSize {
    /// Requested SQ entries.
    pub sq: u32,
    /// Requested CQ entries.
    pub cq: u32,
}

/// Offsets and sizes of one ring memfd, computed from the entry counts alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Number of SQ entries.
    pub sq_entries: u32,
    /// Number of CQ entries.
    pub cq_entries: u32,
    /// Offset of the CQ entry array.
    pub cq_entries_offset: usize,
    /// Total size of the memfd.
    pub total_size: usize,
}

fn round_up(v: usize, to: usize) -> usize {
    v.div_ceil(to) * to
}

impl RingLayout {
    /// Computes the layout, refusing sizes outside the rules of [`BadRingSize`].
    pub fn new(sq_entries: u32, cq_entries: u32) -> Result<Self, BadRingSize> {
        let ok = sq_entries.is_power_of_two()
            && cq_entries.is_power_of_two()
            && (2..=MAX_SQ_ENTRIES).contains(&sq_entries)
            && (sq_entries..=MAX_CQ_ENTRIES).contains(&cq_entries);
        if !ok {
            return Err(BadRingSize { sq: sq_entries, cq: cq_entries });
        }
        let cq_entries_offset =
            round_up(SQ_ENTRIES_OFFSET + sq_entries as usize * core::mem::size_of::<Sqe>(), PAGE_SIZE);
        let total_size =
            round_up(cq_entries_offset + cq_entries as usize * core::mem::size_of::<Cqe>(), PAGE_SIZE);
        Ok(Self { sq_entries, cq_entries, cq_entries_offset, total_size })
    }

    /// The header the broker writes for this layout.
    pub fn header(&self) -> RingHeader {
        RingHeader {
            magic: RING_MAGIC,
            version: RING_VERSION,
            sq_entries: self.sq_entries,
            cq_entries: self.cq_entries,
            sq_mask: self.sq_entries - 1,
            cq_mask: self.cq_entries - 1,
            sq_entries_offset: SQ_ENTRIES_OFFSET as u32,
            cq_entries_offset: self.cq_entries_offset as u32,
            total_size: self.total_size as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_page_aligned_and_disjoint() {
        let l = RingLayout::new(256, 512).unwrap();
        assert_eq!(l.cq_entries_offset, 4096 + 256 * 64);
        assert_eq!(l.total_size, l.cq_entries_offset + 512 * 16);
        assert_eq!(l.total_size % PAGE_SIZE, 0);
        let offsets =
            [SQ_HEAD_OFFSET, CQ_HEAD_OFFSET, BROKER_FLAGS_OFFSET, CLIENT_FLAGS_OFFSET, FAULT_OFFSET];
        for w in offsets.windows(2) {
            assert!(w[1] - w[0] >= 64, "index words share a cache line");
        }
    }

    #[test]
    fn bad_sizes_refused() {
        assert!(RingLayout::new(3, 4).is_err());
        assert!(RingLayout::new(8, 4).is_err());
        assert!(RingLayout::new(1, 1).is_err());
        assert!(RingLayout::new(8192, 8192).is_err());
        assert!(RingLayout::new(4096, 8192).is_ok());
    }
}
