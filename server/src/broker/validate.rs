//! Turning a client's submission entry (already copied out of shared memory) into a device
//! command, or into the reason it is refused.

use nvmed_proto::{BrokerStatus, Opcode, Sqe, SQE_FLAGS_KNOWN, SQE_FLAG_FUA};

use crate::nvme::IoCommand;
use crate::policy::NamespaceAccess;

/// Largest Write Zeroes in LBAs (NLB is a 16-bit, 0-based field).
pub const MAX_WRITE_ZEROES_BLOCKS: u64 = 1 << 16;

/// What the controller supports, as far as validation cares.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimits {
    /// Largest read/write one device command carries (MDTS), in bytes.
    pub max_transfer: u32,
    /// Largest read/write a client may ask for; larger than `max_transfer` means the broker
    /// splits it into several device commands.
    pub max_request: u32,
    /// Write Zeroes supported.
    pub write_zeroes: bool,
    /// Deallocate supported.
    pub deallocate: bool,
}

/// A submission that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated {
    /// Complete at once with success.
    Nop,
    /// Send to the device.
    Device {
        /// The command.
        cmd: IoCommand,
        /// The buffer it uses, if any.
        buffer: Option<u32>,
        /// Bytes it moves (reported in the completion).
        len: u32,
    },
}

/// Checks everything a client can get wrong. `buffer` maps a buffer id to (IOVA, length).
pub fn validate(
    sqe: &Sqe,
    namespaces: &[NamespaceAccess],
    buffer: impl Fn(u32) -> Option<(u64, u64)>,
    limits: DeviceLimits,
) -> Result<Validated, BrokerStatus> {
    let op = Opcode::from_u8(sqe.opcode).ok_or(BrokerStatus::InvalidOpcode)?;
    if sqe.flags & !SQE_FLAGS_KNOWN != 0 || sqe.reserved0 != 0 || sqe.reserved1 != [0; 3] {
        return Err(BrokerStatus::InvalidField);
    }
    if sqe.flags & SQE_FLAG_FUA != 0 && !matches!(op, Opcode::Write | Opcode::WriteZeroes) {
        return Err(BrokerStatus::InvalidField);
    }
    let fua = sqe.flags & SQE_FLAG_FUA != 0;
    if op == Opcode::Nop {
        return Ok(Validated::Nop);
    }
    let ns = namespaces.iter().find(|n| n.nsid == sqe.nsid).ok_or(BrokerStatus::InvalidNamespace)?;
    if op.modifies_data() && ns.read_only {
        return Err(BrokerStatus::NotPermitted);
    }
    if op == Opcode::Flush {
        return Ok(Validated::Device { cmd: IoCommand::Flush { nsid: ns.nsid }, buffer: None, len: 0 });
    }
    if sqe.len == 0 {
        return Err(BrokerStatus::ZeroLength);
    }
    let lba = u64::from(ns.lba_size);
    if !sqe.offset.is_multiple_of(lba) || u64::from(sqe.len) % lba != 0 {
        return Err(BrokerStatus::Misaligned);
    }
    let first = sqe.offset / lba;
    let blocks = u64::from(sqe.len) / lba;
    if first.checked_add(blocks).is_none_or(|end| end > ns.lba_count) {
        return Err(BrokerStatus::OutOfRange);
    }
    let slba = ns.first_lba + first;
    let nsid = ns.nsid;
    let cmd = match op {
        Opcode::Read | Opcode::Write => {
            if sqe.len > limits.max_request {
                return Err(BrokerStatus::TooLarge);
            }
            let (iova, buf_len) = buffer(sqe.buf_id).ok_or(BrokerStatus::BadBuffer)?;
            if !sqe.buf_offset.is_multiple_of(4) {
                return Err(BrokerStatus::Misaligned);
            }
            if sqe.buf_offset.checked_add(u64::from(sqe.len)).is_none_or(|end| end > buf_len) {
                return Err(BrokerStatus::BufferRange);
            }
            let (iova, len, blocks) = (iova + sqe.buf_offset, sqe.len, blocks as u32);
            let cmd = if op == Opcode::Read {
                IoCommand::Read { nsid, slba, blocks, iova, len }
            } else {
                IoCommand::Write { nsid, slba, blocks, iova, len, fua }
            };
            return Ok(Validated::Device { cmd, buffer: Some(sqe.buf_id), len });
        }
        Opcode::WriteZeroes => {
            if !limits.write_zeroes {
                return Err(BrokerStatus::InvalidOpcode);
            }
            if blocks > MAX_WRITE_ZEROES_BLOCKS {
                return Err(BrokerStatus::TooLarge);
            }
            IoCommand::WriteZeroes { nsid, slba, blocks: blocks as u32, fua }
        }
        Opcode::Deallocate => {
            if !limits.deallocate {
                return Err(BrokerStatus::InvalidOpcode);
            }
            IoCommand::Deallocate { nsid, slba, blocks: blocks as u32 }
        }
        Opcode::Nop | Opcode::Flush => unreachable!("handled above"),
    };
    Ok(Validated::Device { cmd, buffer: None, len: sqe.len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: [NamespaceAccess; 2] = [
        NamespaceAccess { nsid: 1, first_lba: 0, lba_count: 2048, lba_size: 512, read_only: false },
        NamespaceAccess { nsid: 2, first_lba: 100, lba_count: 10, lba_size: 4096, read_only: true },
    ];
    const LIMITS: DeviceLimits =
        DeviceLimits { max_transfer: 64 << 10, max_request: 128 << 10, write_zeroes: true, deallocate: true };

    fn buf(id: u32) -> Option<(u64, u64)> {
        (id == 3).then_some((0x100000, 65536))
    }

    fn check(sqe: Sqe) -> Result<Validated, BrokerStatus> {
        validate(&sqe, &NS, buf, LIMITS)
    }

    #[test]
    fn each_mistake_has_its_status() {
        use BrokerStatus::*;
        let good = Sqe::read(1, 4096, 4096, 3, 512, 9);
        assert!(matches!(check(good), Ok(Validated::Device { buffer: Some(3), len: 4096, .. })));
        assert_eq!(check(Sqe { opcode: 77, ..good }), Err(InvalidOpcode));
        assert_eq!(check(Sqe { flags: 0x80, ..good }), Err(InvalidField));
        assert_eq!(check(good.fua()), Err(InvalidField));
        assert_eq!(check(Sqe { reserved1: [0, 1, 0], ..good }), Err(InvalidField));
        assert_eq!(check(Sqe { nsid: 9, ..good }), Err(InvalidNamespace));
        assert_eq!(check(Sqe { buf_id: 4, ..good }), Err(BadBuffer));
        assert_eq!(check(Sqe { buf_offset: 65536 - 2048, ..good }), Err(BufferRange));
        assert_eq!(check(Sqe { buf_offset: 2, ..good }), Err(Misaligned));
        assert_eq!(check(Sqe { offset: 100, ..good }), Err(Misaligned));
        assert_eq!(check(Sqe { len: 1000, ..good }), Err(Misaligned));
        assert_eq!(check(Sqe { len: 0, ..good }), Err(ZeroLength));
        assert_eq!(check(Sqe { offset: 2048 * 512 - 512, len: 1024, ..good }), Err(OutOfRange));
        assert_eq!(check(Sqe { offset: u64::MAX - 511, ..good }), Err(OutOfRange));
        assert_eq!(check(Sqe { len: 256 << 10, offset: 0, ..good }), Err(TooLarge));
        assert_eq!(check(Sqe::write(2, 0, 4096, 3, 0, 0)), Err(NotPermitted));
        assert_eq!(check(Sqe::deallocate(2, 0, 4096, 0)), Err(NotPermitted));
        assert!(check(Sqe::read(2, 0, 4096, 3, 0, 0)).is_ok());
        assert_eq!(check(Sqe::nop(1)), Ok(Validated::Nop));
    }

    #[test]
    fn window_translates_lbas() {
        match check(Sqe::read(2, 8192, 4096, 3, 0, 0)).unwrap() {
            Validated::Device { cmd: IoCommand::Read { slba, blocks, iova, .. }, .. } => {
                assert_eq!((slba, blocks, iova), (102, 1, 0x100000));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(check(Sqe::read(2, 10 * 4096, 4096, 3, 0, 0)), Err(BrokerStatus::OutOfRange));
    }

    proptest! {
        /// Whatever bytes a client writes, an accepted command stays inside its namespace
        /// window and inside the buffer it names.
        #[test]
        fn accepted_commands_stay_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 64), small in any::<bool>()) {
            let mut sqe: Sqe = zerocopy::FromBytes::read_from_bytes(&bytes[..]).unwrap();
            if small {
                sqe.reserved0 = 0; sqe.reserved1 = [0; 3]; sqe.flags &= 1; sqe.opcode %= 6;
                sqe.nsid %= 3; sqe.buf_id %= 5; sqe.len %= 70000; sqe.offset %= 1 << 21; sqe.buf_offset %= 70000;
            }
            if let Ok(Validated::Device { cmd, .. }) = check(sqe) {
                let (nsid, slba, blocks, data) = match cmd {
                    IoCommand::Read { nsid, slba, blocks, iova, len } => (nsid, slba, u64::from(blocks), Some((iova, len))),
                    IoCommand::Write { nsid, slba, blocks, iova, len, .. } => (nsid, slba, u64::from(blocks), Some((iova, len))),
                    IoCommand::WriteZeroes { nsid, slba, blocks, .. } | IoCommand::Deallocate { nsid, slba, blocks } => (nsid, slba, u64::from(blocks), None),
                    IoCommand::Flush { .. } => return Ok(()),
                };
                let ns = NS.iter().find(|n| n.nsid == nsid).unwrap();
                prop_assert!(slba >= ns.first_lba && slba + blocks <= ns.first_lba + ns.lba_count);
                if let Some((iova, len)) = data {
                    prop_assert!(iova >= 0x100000 && iova + u64::from(len) <= 0x100000 + 65536);
                }
            }
        }
    }
}
