//! Submission and completion entries as they sit in the shared rings.

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

/// Operation requested by a submission entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Opcode {
    /// Complete at once without touching the device (ring round trip only).
    Nop = 0,
    /// Read `len` bytes at `offset` of the namespace into the buffer.
    Read = 1,
    /// Write `len` bytes from the buffer at `offset` of the namespace.
    Write = 2,
    /// Make all completed writes of the namespace durable.
    Flush = 3,
    /// Write zeroes over `len` bytes at `offset` (no buffer).
    WriteZeroes = 4,
    /// Discard (deallocate) `len` bytes at `offset` (no buffer).
    Deallocate = 5,
    /// Vectored read: `len` bytes at `offset` of the namespace scattered into the segments of
    /// a [`Segment`] list (see [`Sqe`] for where the list is).
    ReadV = 6,
    /// Vectored write: `len` bytes gathered from the segments of a [`Segment`] list, written
    /// at `offset` of the namespace.
    WriteV = 7,
}

impl Opcode {
    /// Decodes an opcode byte, `None` for unknown values.
    pub fn from_u8(value: u8) -> Option<Self> {
        Some(match value {
            0 => Self::Nop,
            1 => Self::Read,
            2 => Self::Write,
            3 => Self::Flush,
            4 => Self::WriteZeroes,
            5 => Self::Deallocate,
            6 => Self::ReadV,
            7 => Self::WriteV,
            _ => return None,
        })
    }

    /// Whether the operation moves data through registered buffers.
    pub fn uses_buffer(self) -> bool {
        matches!(self, Self::Read | Self::Write | Self::ReadV | Self::WriteV)
    }

    /// Whether the operation's data is described by a [`Segment`] list.
    pub fn is_vectored(self) -> bool {
        matches!(self, Self::ReadV | Self::WriteV)
    }

    /// Whether the operation moves data from the device into client memory.
    pub fn is_read(self) -> bool {
        matches!(self, Self::Read | Self::ReadV)
    }

    /// Whether the operation changes the namespace's contents.
    pub fn modifies_data(self) -> bool {
        matches!(self, Self::Write | Self::WriteV | Self::WriteZeroes | Self::Deallocate)
    }
}

/// Most segments one vectored request ([`Opcode::ReadV`], [`Opcode::WriteV`]) may have.
pub const MAX_SEGMENTS: u16 = 256;

/// One piece of a vectored request's data: `len` bytes at `offset` of registered buffer
/// `buf_id` (24 bytes, little-endian, 8-byte aligned in the list).
///
/// A segment may have any length of at least one byte and any offset: the broker moves the
/// data with PRPs when the layout allows it, with NVMe SGLs when the controller supports them,
/// and otherwise through its own bounce buffers (see the crate README).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Segment {
    /// Registered buffer id.
    pub buf_id: u32,
    /// Reserved, must be zero.
    pub reserved0: u32,
    /// Byte offset inside the buffer.
    pub offset: u64,
    /// Length in bytes (at least 1).
    pub len: u32,
    /// Reserved, must be zero.
    pub reserved1: u32,
}

const _: () = assert!(core::mem::size_of::<Segment>() == 24);
const _: () = assert!(core::mem::align_of::<Segment>() == 8);

impl Segment {
    /// `len` bytes at `offset` of buffer `buf_id`.
    pub fn new(buf_id: u32, offset: u64, len: u32) -> Self {
        Self { buf_id, offset, len, ..Self::default() }
    }
}

/// Submission flag: force unit access (the write reaches stable media before it completes).
pub const SQE_FLAG_FUA: u8 = 1 << 0;
/// All submission flags the broker understands.
pub const SQE_FLAGS_KNOWN: u8 = SQE_FLAG_FUA;

/// A submission queue entry (64 bytes), written by the client.
///
/// `offset` and `len` are in bytes and must be multiples of the namespace's LBA size.
///
/// * [`Opcode::Read`], [`Opcode::Write`]: `buf_id`/`buf_offset` name the registered buffer and
///   the offset of the data in it; `buf_offset` must be 4-byte aligned; `segments` is zero.
/// * [`Opcode::ReadV`], [`Opcode::WriteV`]: `buf_id`/`buf_offset` name the registered buffer
///   and the offset (8-byte aligned) of a list of `segments` [`Segment`]s (1 to
///   [`MAX_SEGMENTS`]), whose lengths add up to `len`. The broker copies the list once, when
///   it takes the entry; the memory of every segment stays in use until the completion.
/// * Other opcodes: `buf_id`, `buf_offset` and `segments` are ignored, `segments` must be zero.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Sqe {
    /// An [`Opcode`] value.
    pub opcode: u8,
    /// `SQE_FLAG_*` bits.
    pub flags: u8,
    /// Number of [`Segment`]s in the list of a vectored request; zero for every other opcode.
    pub segments: u16,
    /// Namespace id (as listed by the broker).
    pub nsid: u32,
    /// Opaque value returned unchanged in the completion.
    pub user_data: u64,
    /// Byte offset on the namespace.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Registered buffer id: of the data (reads and writes) or of the segment list (vectored).
    pub buf_id: u32,
    /// Byte offset inside the registered buffer: of the data, or of the segment list.
    pub buf_offset: u64,
    /// Reserved, must be zero.
    pub reserved1: [u64; 2],
    /// Written by the ring layer when the entry is published (any value a caller puts here is
    /// ignored): on the first entry of a submit, how many entries that submit published,
    /// counting this one; zero on the others. A hint that lets the broker take a batch without
    /// looking at the slot after it; never trusted beyond that.
    pub batch: u32,
    /// The ring's publication tag ([`Sqe::seq_for`] of the entry's index), written by the ring
    /// layer when the entry is published: any value a caller puts here is ignored.
    pub seq: u32,
}

/// A completion queue entry (16 bytes), written by the broker.
///
/// Bit 31 of `status` is the ring's phase tag ([`CQE_PHASE`]), set by the ring layer; decode
/// [`Cqe::status_word`], not `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Cqe {
    /// The submission's `user_data`.
    pub user_data: u64,
    /// Encoded [`crate::Status`]; zero is success.
    pub status: u32,
    /// Bytes transferred on success.
    pub result: u32,
}

/// Byte offset of [`Sqe::seq`] inside an entry.
pub const SQE_SEQ_OFFSET: usize = 60;
/// Byte offset of the 8-byte word ([`Sqe::batch`] then [`Sqe::seq`]) whose store publishes an
/// [`Sqe`].
pub const SQE_TAG_OFFSET: usize = 56;
/// Byte offset of the 8-byte word (`status` and `result`) whose store publishes a [`Cqe`].
pub const CQE_TAG_OFFSET: usize = 8;
/// The phase bit of a [`Cqe`]'s `status`: set in the ring's even laps, clear in its odd laps.
pub const CQE_PHASE: u32 = 1 << 31;

const _: () = assert!(core::mem::size_of::<Sqe>() == 64);
const _: () = assert!(core::mem::offset_of!(Sqe, seq) == SQE_SEQ_OFFSET);
const _: () = assert!(core::mem::offset_of!(Sqe, batch) == SQE_TAG_OFFSET);
const _: () = assert!(core::mem::offset_of!(Cqe, status) == CQE_TAG_OFFSET);
const _: () = assert!(core::mem::align_of::<Sqe>() == 8);
const _: () = assert!(core::mem::size_of::<Cqe>() == 16);
const _: () = assert!(core::mem::align_of::<Cqe>() == 8);

impl Sqe {
    /// The publication tag of the entry at free-running index `index`: `index + 1`, so that
    /// neither zeroed memory nor the entry a lap earlier (`index + 1 - entries`) matches it.
    #[inline]
    pub const fn seq_for(index: u32) -> u32 {
        index.wrapping_add(1)
    }

    fn with(opcode: Opcode, nsid: u32, offset: u64, len: u32, user_data: u64) -> Self {
        Self { opcode: opcode as u8, nsid, offset, len, user_data, ..Self::default() }
    }

    /// A read of `len` bytes at `offset` into buffer `buf_id` at `buf_offset`.
    pub fn read(nsid: u32, offset: u64, len: u32, buf_id: u32, buf_offset: u64, user_data: u64) -> Self {
        Self { buf_id, buf_offset, ..Self::with(Opcode::Read, nsid, offset, len, user_data) }
    }

    /// A write of `len` bytes at `offset` from buffer `buf_id` at `buf_offset`.
    pub fn write(nsid: u32, offset: u64, len: u32, buf_id: u32, buf_offset: u64, user_data: u64) -> Self {
        Self { buf_id, buf_offset, ..Self::with(Opcode::Write, nsid, offset, len, user_data) }
    }

    /// A vectored read of `len` bytes at `offset` into the `segments` segments listed at
    /// `list_offset` of buffer `list_buf`.
    pub fn readv(
        nsid: u32,
        offset: u64,
        len: u32,
        list_buf: u32,
        list_offset: u64,
        segments: u16,
        user_data: u64,
    ) -> Self {
        Self {
            buf_id: list_buf,
            buf_offset: list_offset,
            segments,
            ..Self::with(Opcode::ReadV, nsid, offset, len, user_data)
        }
    }

    /// A vectored write of `len` bytes at `offset` from the `segments` segments listed at
    /// `list_offset` of buffer `list_buf`.
    pub fn writev(
        nsid: u32,
        offset: u64,
        len: u32,
        list_buf: u32,
        list_offset: u64,
        segments: u16,
        user_data: u64,
    ) -> Self {
        Self {
            opcode: Opcode::WriteV as u8,
            ..Self::readv(nsid, offset, len, list_buf, list_offset, segments, user_data)
        }
    }

    /// A flush of the namespace.
    pub fn flush(nsid: u32, user_data: u64) -> Self {
        Self::with(Opcode::Flush, nsid, 0, 0, user_data)
    }

    /// Write zeroes over `len` bytes at `offset`.
    pub fn write_zeroes(nsid: u32, offset: u64, len: u32, user_data: u64) -> Self {
        Self::with(Opcode::WriteZeroes, nsid, offset, len, user_data)
    }

    /// Deallocate (discard) `len` bytes at `offset`.
    pub fn deallocate(nsid: u32, offset: u64, len: u32, user_data: u64) -> Self {
        Self::with(Opcode::Deallocate, nsid, offset, len, user_data)
    }

    /// A no-op that completes without touching the device.
    pub fn nop(user_data: u64) -> Self {
        Self::with(Opcode::Nop, 0, 0, 0, user_data)
    }

    /// Returns the entry with force-unit-access set.
    pub fn fua(mut self) -> Self {
        self.flags |= SQE_FLAG_FUA;
        self
    }
}

impl Cqe {
    /// The phase a published entry at free-running index `index` of a ring of `entries`
    /// (a power of two) carries: [`CQE_PHASE`] in even laps, 0 in odd ones. Zeroed memory is
    /// therefore unpublished for the first lap, and the entry of the previous lap is stale. The
    /// parity stays consistent across the u32 wrap because `2^32 / entries` is even.
    #[inline]
    pub const fn phase_for(index: u32, entries: u32) -> u32 {
        if index & entries == 0 {
            CQE_PHASE
        } else {
            0
        }
    }

    /// The status word without the ring's phase bit: what [`crate::Status::decode`] takes.
    #[inline]
    pub const fn status_word(&self) -> u32 {
        self.status & !CQE_PHASE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_differ_between_laps_across_the_u32_wrap() {
        for entries in [2u32, 8, 8192] {
            for start in [0u32, 1, entries - 1, u32::MAX - 2 * entries, u32::MAX - entries + 1] {
                for k in 0..2 * entries {
                    let i = start.wrapping_add(k);
                    let next_lap = i.wrapping_add(entries);
                    assert_ne!(Sqe::seq_for(i), Sqe::seq_for(next_lap));
                    assert_ne!(Cqe::phase_for(i, entries), Cqe::phase_for(next_lap, entries));
                    // Constant within a lap: the slot-0 entry of a lap decides it.
                    let lap_start = i & !(entries - 1);
                    assert_eq!(Cqe::phase_for(i, entries), Cqe::phase_for(lap_start, entries));
                }
            }
            // Zeroed memory is never a published first-lap entry.
            for i in 0..entries {
                assert_ne!(Sqe::seq_for(i), 0);
                assert_eq!(Cqe::phase_for(i, entries), CQE_PHASE);
            }
        }
    }

    #[test]
    fn status_word_strips_the_phase() {
        let c = Cqe { user_data: 1, status: CQE_PHASE | 0x0102_0304, result: 9 };
        assert_eq!(c.status_word(), 0x0102_0304);
    }
}
