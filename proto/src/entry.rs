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
            _ => return None,
        })
    }

    /// Whether the operation moves data through a registered buffer.
    pub fn uses_buffer(self) -> bool {
        matches!(self, Self::Read | Self::Write)
    }

    /// Whether the operation changes the namespace's contents.
    pub fn modifies_data(self) -> bool {
        matches!(self, Self::Write | Self::WriteZeroes | Self::Deallocate)
    }
}

/// Submission flag: force unit access (the write reaches stable media before it completes).
pub const SQE_FLAG_FUA: u8 = 1 << 0;
/// All submission flags the broker understands.
pub const SQE_FLAGS_KNOWN: u8 = SQE_FLAG_FUA;

/// A submission queue entry (64 bytes), written by the client.
///
/// `offset` and `len` are in bytes and must be multiples of the namespace's LBA size.
/// `buf_id`/`buf_offset` name the registered buffer for reads and writes; `buf_offset`
/// must be 4-byte aligned.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout)]
#[repr(C)]
pub struct Sqe {
    /// An [`Opcode`] value.
    pub opcode: u8,
    /// `SQE_FLAG_*` bits.
    pub flags: u8,
    /// Reserved, must be zero.
    pub reserved0: u16,
    /// Namespace id (as listed by the broker).
    pub nsid: u32,
    /// Opaque value returned unchanged in the completion.
    pub user_data: u64,
    /// Byte offset on the namespace.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// Registered buffer id (reads and writes).
    pub buf_id: u32,
    /// Byte offset inside the registered buffer.
    pub buf_offset: u64,
    /// Reserved, must be zero.
    pub reserved1: [u64; 3],
}

/// A completion queue entry (16 bytes), written by the broker.
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

const _: () = assert!(core::mem::size_of::<Sqe>() == 64);
const _: () = assert!(core::mem::align_of::<Sqe>() == 8);
const _: () = assert!(core::mem::size_of::<Cqe>() == 16);
const _: () = assert!(core::mem::align_of::<Cqe>() == 8);

impl Sqe {
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
