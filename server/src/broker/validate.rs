//! Turning a client's submission entry (already copied out of shared memory) into a device
//! command, or into the reason it is refused.

use nvmed_proto::{BrokerStatus, Opcode, Segment, Sqe, MAX_SEGMENTS, SQE_FLAGS_KNOWN, SQE_FLAG_FUA};

use crate::nvme::{DmaSeg, IoCommand, SglSupport};
use crate::policy::NamespaceAccess;

/// Bytes of one [`Segment`] in a segment list.
pub const SEGMENT_SIZE: u64 = size_of::<Segment>() as u64;

/// Largest Write Zeroes in LBAs (NLB is a 16-bit, 0-based field).
pub const MAX_WRITE_ZEROES_BLOCKS: u64 = 1 << 16;

/// Most device commands one Write Zeroes or Deallocate request may become under the
/// controller's size limits (as many as a 16 MiB read becomes at a 4 KiB MDTS): one request
/// cannot make the broker send a device millions of commands.
pub const MAX_PIECES: u64 = 4096;

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
    /// Largest Write Zeroes one device command may carry, in bytes (the controller's WZSL;
    /// `u64::MAX` if it sets none): a larger request becomes several commands.
    pub max_write_zeroes: u64,
    /// Deallocate supported.
    pub deallocate: bool,
    /// Most LBAs one deallocated range may cover (the controller's DMRSL; `u32::MAX` if it
    /// sets none): a larger request becomes several commands.
    pub max_deallocate_blocks: u32,
    /// SGL support for I/O commands.
    pub sgl: SglSupport,
    /// The controller has a volatile write cache (writes are durable only with FUA or after a
    /// Flush).
    pub volatile_write_cache: bool,
}

/// A vectored request whose entry passed validation; its segment list is checked by
/// [`validate_segments`] once copied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VectoredRequest {
    /// Write (else read).
    pub write: bool,
    /// Force unit access.
    pub fua: bool,
    /// The namespace's controller.
    pub controller: u16,
    /// Namespace id on that controller.
    pub nsid: u32,
    /// Starting LBA on the device.
    pub slba: u64,
    /// LBAs.
    pub blocks: u32,
    /// Bytes.
    pub len: u32,
    /// Buffer holding the segment list.
    pub list_buf: u32,
    /// Offset of the list in it (8-byte aligned; the whole list lies inside the buffer).
    pub list_offset: u64,
    /// Segments in the list (1 to [`MAX_SEGMENTS`]).
    pub count: u16,
}

/// A submission that passed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated {
    /// Complete at once with success.
    Nop,
    /// Send to the device.
    Device {
        /// The controller to send it to.
        controller: u16,
        /// The command (with the namespace id of that controller).
        cmd: IoCommand,
        /// The buffer it uses, if any.
        buffer: Option<u32>,
        /// Bytes it moves (reported in the completion).
        len: u32,
    },
    /// A vectored read or write: copy its segment list and check it with [`validate_segments`].
    Vectored(VectoredRequest),
}

/// Checks everything a client can get wrong. `buffer` maps a buffer id to (IOVA, length);
/// `limits` holds each controller's.
pub fn validate(
    sqe: &Sqe,
    namespaces: &[NamespaceAccess],
    buffer: impl Fn(u32) -> Option<(u64, u64)>,
    limits: &[DeviceLimits],
) -> Result<Validated, BrokerStatus> {
    let op = Opcode::from_u8(sqe.opcode).ok_or(BrokerStatus::InvalidOpcode)?;
    if sqe.flags & !SQE_FLAGS_KNOWN != 0 || sqe.reserved1 != [0; 2] {
        return Err(BrokerStatus::InvalidField);
    }
    if sqe.segments != 0 && !op.is_vectored() {
        return Err(BrokerStatus::InvalidField);
    }
    if sqe.flags & SQE_FLAG_FUA != 0 && !matches!(op, Opcode::Write | Opcode::WriteV | Opcode::WriteZeroes) {
        return Err(BrokerStatus::InvalidField);
    }
    let fua = sqe.flags & SQE_FLAG_FUA != 0;
    if op == Opcode::Nop {
        return Ok(Validated::Nop);
    }
    let ns = namespaces.iter().find(|n| n.nsid == sqe.nsid).ok_or(BrokerStatus::InvalidNamespace)?;
    let controller = ns.controller;
    let limits = *limits.get(usize::from(controller)).ok_or(BrokerStatus::InvalidNamespace)?;
    if op.modifies_data() && ns.read_only {
        return Err(BrokerStatus::NotPermitted);
    }
    let nsid = ns.device_nsid;
    if op == Opcode::Flush {
        return Ok(Validated::Device { controller, cmd: IoCommand::Flush { nsid }, buffer: None, len: 0 });
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
            return Ok(Validated::Device { controller, cmd, buffer: Some(sqe.buf_id), len });
        }
        Opcode::ReadV | Opcode::WriteV => {
            if sqe.len > limits.max_request {
                return Err(BrokerStatus::TooLarge);
            }
            let (_, buf_len) = buffer(sqe.buf_id).ok_or(BrokerStatus::BadBuffer)?;
            if sqe.segments == 0 || sqe.segments > MAX_SEGMENTS {
                return Err(BrokerStatus::BadSegmentCount);
            }
            let list_len = u64::from(sqe.segments) * SEGMENT_SIZE;
            if !sqe.buf_offset.is_multiple_of(8)
                || sqe.buf_offset.checked_add(list_len).is_none_or(|end| end > buf_len)
            {
                return Err(BrokerStatus::SegmentListRange);
            }
            return Ok(Validated::Vectored(VectoredRequest {
                write: op == Opcode::WriteV,
                fua,
                controller,
                nsid,
                slba,
                blocks: blocks as u32,
                len: sqe.len,
                list_buf: sqe.buf_id,
                list_offset: sqe.buf_offset,
                count: sqe.segments,
            }));
        }
        Opcode::WriteZeroes => {
            if !limits.write_zeroes {
                return Err(BrokerStatus::InvalidOpcode);
            }
            if blocks > MAX_WRITE_ZEROES_BLOCKS {
                return Err(BrokerStatus::TooLarge);
            }
            // A controller whose limit is below one block cannot zero this namespace.
            if limits.max_write_zeroes < lba {
                return Err(BrokerStatus::InvalidOpcode);
            }
            let piece_blocks = (limits.max_write_zeroes / lba).min(MAX_WRITE_ZEROES_BLOCKS);
            if blocks.div_ceil(piece_blocks) > MAX_PIECES {
                return Err(BrokerStatus::TooLarge);
            }
            IoCommand::WriteZeroes {
                nsid,
                slba,
                blocks: blocks as u32,
                fua,
                piece_blocks: piece_blocks as u32,
            }
        }
        Opcode::Deallocate => {
            if !limits.deallocate {
                return Err(BrokerStatus::InvalidOpcode);
            }
            let piece_blocks = limits.max_deallocate_blocks.max(1);
            if blocks.div_ceil(u64::from(piece_blocks)) > MAX_PIECES {
                return Err(BrokerStatus::TooLarge);
            }
            IoCommand::Deallocate { nsid, slba, blocks: blocks as u32, piece_blocks }
        }
        Opcode::Nop | Opcode::Flush => unreachable!("handled above"),
    };
    Ok(Validated::Device { controller, cmd, buffer: None, len: sqe.len })
}

/// Checks a vectored request's segment list: `read(i)` yields segment `i` (the caller's one
/// copy of it out of client memory), `buffer` maps a buffer id to (IOVA, length). Each segment
/// must be non-empty, name a buffer of this client and lie inside it; together they must add
/// up to `len`. Fills `out[..count]` with where the device finds each segment (tagged with its
/// buffer id).
pub fn validate_segments(
    count: u16,
    len: u32,
    mut read: impl FnMut(usize) -> Result<Segment, BrokerStatus>,
    buffer: impl Fn(u32) -> Option<(u64, u64)>,
    out: &mut [DmaSeg],
) -> Result<(), BrokerStatus> {
    let mut total = 0u64;
    for (i, slot) in out.iter_mut().enumerate().take(usize::from(count)) {
        let seg = read(i)?;
        if seg.reserved0 != 0 || seg.reserved1 != 0 {
            return Err(BrokerStatus::InvalidField);
        }
        if seg.len == 0 {
            return Err(BrokerStatus::SegmentLength);
        }
        let (iova, buf_len) = buffer(seg.buf_id).ok_or(BrokerStatus::BadBuffer)?;
        if seg.offset.checked_add(u64::from(seg.len)).is_none_or(|end| end > buf_len) {
            return Err(BrokerStatus::BufferRange);
        }
        total += u64::from(seg.len);
        *slot = DmaSeg { iova: iova + seg.offset, len: seg.len, tag: seg.buf_id };
    }
    if usize::from(count) > out.len() || total != u64::from(len) {
        return Err(BrokerStatus::SegmentLength);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NS: [NamespaceAccess; 2] = [
        NamespaceAccess {
            nsid: 1,
            controller: 0,
            device_nsid: 1,
            first_lba: 0,
            lba_count: 2048,
            lba_size: 512,
            read_only: false,
            qos: crate::policy::Qos::DEFAULT,
        },
        NamespaceAccess {
            nsid: 2,
            controller: 0,
            device_nsid: 2,
            first_lba: 100,
            lba_count: 10,
            lba_size: 4096,
            read_only: true,
            qos: crate::policy::Qos::DEFAULT,
        },
    ];
    const LIMITS: DeviceLimits = DeviceLimits {
        max_transfer: 64 << 10,
        max_request: 128 << 10,
        write_zeroes: true,
        max_write_zeroes: u64::MAX,
        deallocate: true,
        max_deallocate_blocks: u32::MAX,
        sgl: SglSupport::Byte,
        volatile_write_cache: true,
    };

    fn buf(id: u32) -> Option<(u64, u64)> {
        (id == 3).then_some((0x100000, 65536))
    }

    fn check(sqe: Sqe) -> Result<Validated, BrokerStatus> {
        validate(&sqe, &NS, buf, &[LIMITS])
    }

    #[test]
    fn commands_go_to_the_namespace_s_controller_with_its_own_nsid() {
        // Broker namespace 7 is namespace 3 of controller 1, whose MDTS is smaller.
        let ns = [NamespaceAccess { nsid: 7, controller: 1, device_nsid: 3, ..NS[0] }];
        let small = DeviceLimits { max_request: 8192, ..LIMITS };
        let v = validate(&Sqe::read(7, 0, 4096, 3, 0, 1), &ns, buf, &[LIMITS, small]).unwrap();
        assert!(
            matches!(v, Validated::Device { controller: 1, cmd: IoCommand::Read { nsid: 3, .. }, .. }),
            "{v:?}"
        );
        let big = Sqe::read(7, 0, 16384, 3, 0, 1);
        assert_eq!(validate(&big, &ns, buf, &[LIMITS, small]), Err(BrokerStatus::TooLarge));
        // A controller the broker does not know is no namespace at all.
        assert_eq!(validate(&big, &ns, buf, &[LIMITS]), Err(BrokerStatus::InvalidNamespace));
    }

    #[test]
    fn write_zeroes_and_deallocate_follow_the_controller_s_size_limits() {
        let zero = Sqe { opcode: Opcode::WriteZeroes as u8, nsid: 1, len: 1 << 20, ..Sqe::default() };
        let free = Sqe { opcode: Opcode::Deallocate as u8, ..zero };
        let limits = |max_write_zeroes, max_deallocate_blocks| DeviceLimits {
            max_write_zeroes,
            max_deallocate_blocks,
            ..LIMITS
        };
        let with = |sqe: Sqe, l: DeviceLimits| validate(&sqe, &NS, buf, &[l]);
        // 2048 blocks: pieces of 16 blocks (8 KiB) and of 3 blocks.
        let cmd = |v: Result<Validated, BrokerStatus>| match v {
            Ok(Validated::Device { cmd, .. }) => cmd,
            other => panic!("{other:?}"),
        };
        assert_eq!(cmd(with(zero, limits(8192, u32::MAX))).piece_count(4096), 128);
        assert_eq!(cmd(with(free, limits(u64::MAX, 3))).piece_count(4096), 683);
        // No limit: one command each.
        assert_eq!(cmd(with(zero, LIMITS)).piece_count(4096), 1);
        assert_eq!(cmd(with(free, LIMITS)).piece_count(4096), 1);
        // Beyond MAX_PIECES commands: refused, not sent as thousands of commands.
        assert_eq!(cmd(with(free, limits(u64::MAX, 0))).piece_count(4096), 2048, "a limit of 0 is 1");
        let small = NamespaceAccess { lba_count: 1 << 30, ..NS[0] };
        let huge = Sqe { len: 3 << 30, ..free };
        assert_eq!(validate(&huge, &[small], buf, &[limits(u64::MAX, 128)]), Err(BrokerStatus::TooLarge));
        // A Write Zeroes limit below one block: this namespace cannot be zeroed.
        assert_eq!(with(zero, limits(256, u32::MAX)), Err(BrokerStatus::InvalidOpcode));
    }

    #[test]
    fn each_mistake_has_its_status() {
        use BrokerStatus::*;
        let good = Sqe::read(1, 4096, 4096, 3, 512, 9);
        assert!(matches!(check(good), Ok(Validated::Device { buffer: Some(3), len: 4096, .. })));
        assert_eq!(check(Sqe { opcode: 77, ..good }), Err(InvalidOpcode));
        assert_eq!(check(Sqe { flags: 0x80, ..good }), Err(InvalidField));
        assert_eq!(check(good.fua()), Err(InvalidField));
        assert_eq!(check(Sqe { reserved1: [0, 1], ..good }), Err(InvalidField));
        // The ring's tag and batch hint are not the client's to set: any value is ignored.
        assert!(check(Sqe { seq: 0xdead_beef, batch: 7, ..good }).is_ok());
        assert_eq!(check(Sqe { segments: 1, ..good }), Err(InvalidField));
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
        // A read-only grant may flush: one a reload narrowed must still make its writes durable.
        assert!(matches!(
            check(Sqe::flush(2, 0)),
            Ok(Validated::Device { cmd: IoCommand::Flush { .. }, .. })
        ));
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

    #[test]
    fn vectored_entry_mistakes() {
        use BrokerStatus::*;
        let good = Sqe::readv(1, 4096, 4096, 3, 64, 4, 9);
        let v = match check(good) {
            Ok(Validated::Vectored(v)) => v,
            other => panic!("{other:?}"),
        };
        assert_eq!((v.write, v.slba, v.blocks, v.list_buf, v.list_offset, v.count), (false, 8, 8, 3, 64, 4));
        assert!(
            matches!(check(Sqe::writev(1, 0, 512, 3, 0, 1, 0).fua()), Ok(Validated::Vectored(v)) if v.write && v.fua)
        );
        assert_eq!(check(good.fua()), Err(InvalidField));
        assert_eq!(check(Sqe { buf_id: 4, ..good }), Err(BadBuffer));
        assert_eq!(check(Sqe { segments: 0, ..good }), Err(BadSegmentCount));
        assert_eq!(check(Sqe { segments: 257, ..good }), Err(BadSegmentCount));
        assert_eq!(check(Sqe { buf_offset: 60, ..good }), Err(SegmentListRange));
        assert_eq!(check(Sqe { buf_offset: 65536 - 24 * 4 + 8, ..good }), Err(SegmentListRange));
        assert_eq!(check(Sqe { buf_offset: u64::MAX - 7, ..good }), Err(SegmentListRange));
        assert!(check(Sqe { buf_offset: 65536 - 24 * 4, ..good }).is_ok());
        assert_eq!(check(Sqe { len: 0, ..good }), Err(ZeroLength));
        assert_eq!(check(Sqe { len: 1000, ..good }), Err(Misaligned));
        assert_eq!(check(Sqe { len: 256 << 10, offset: 0, ..good }), Err(TooLarge));
        assert_eq!(check(Sqe::writev(2, 0, 4096, 3, 0, 1, 0)), Err(NotPermitted));
        assert!(check(Sqe::readv(2, 0, 4096, 3, 0, 1, 0)).is_ok());
    }

    fn segs(list: &[Segment], len: u32) -> Result<Vec<DmaSeg>, BrokerStatus> {
        let mut out = [DmaSeg::default(); 256];
        let mut reads = 0;
        let r = validate_segments(
            list.len() as u16,
            len,
            |i| {
                reads += 1;
                Ok(list[i])
            },
            buf,
            &mut out,
        );
        r.map(|()| {
            assert_eq!(reads, list.len(), "each segment read exactly once");
            out[..list.len()].to_vec()
        })
    }

    #[test]
    fn segment_list_mistakes() {
        use BrokerStatus::*;
        let a = Segment::new(3, 1, 511);
        let b = Segment::new(3, 65536 - 1, 1);
        let got = segs(&[a, b], 512).unwrap();
        assert_eq!(
            got,
            [DmaSeg { iova: 0x100001, len: 511, tag: 3 }, DmaSeg { iova: 0x10ffff, len: 1, tag: 3 }]
        );
        assert_eq!(segs(&[a, b], 1024), Err(SegmentLength), "total mismatch");
        assert_eq!(segs(&[a, Segment::new(3, 0, 0), b], 512), Err(SegmentLength), "empty segment");
        assert_eq!(segs(&[a, Segment::new(7, 0, 1)], 512), Err(BadBuffer));
        assert_eq!(segs(&[a, Segment::new(3, 65536, 1)], 512), Err(BufferRange));
        assert_eq!(segs(&[a, Segment::new(3, u64::MAX, 1)], 512), Err(BufferRange));
        assert_eq!(segs(&[a, Segment { reserved0: 1, ..b }], 512), Err(InvalidField));
        assert_eq!(segs(&[a, Segment { reserved1: 1, ..b }], 512), Err(InvalidField));
        // Lengths whose sum would overflow a u32 do not wrap around to the request length.
        let big = [Segment::new(3, 0, u32::MAX); 2];
        let mut out = [DmaSeg::default(); 2];
        let wide = |id| (id == 3).then_some((0u64, u64::MAX));
        assert_eq!(validate_segments(2, u32::MAX - 1, |i| Ok(big[i]), wide, &mut out), Err(SegmentLength));
    }

    proptest! {
        /// Whatever segment list a client writes, an accepted one stays inside the buffers it names.
        #[test]
        fn accepted_segments_stay_in_bounds(raw in proptest::collection::vec((0u32..5, any::<u64>(), any::<u32>(), any::<bool>()), 1..8), small in any::<bool>()) {
            let list: Vec<Segment> = raw.iter().map(|&(id, off, len, r)| {
                let (off, len) = if small { (off % 70000, len % 70000) } else { (off, len) };
                Segment { reserved1: u32::from(r && !small), ..Segment::new(id, off, len) }
            }).collect();
            let total: u64 = list.iter().map(|s| u64::from(s.len)).sum();
            if let Ok(out) = segs(&list, total as u32) {
                prop_assert_eq!(out.iter().map(|s| u64::from(s.len)).sum::<u64>(), total);
                for s in out {
                    prop_assert!(s.iova >= 0x100000 && s.iova + u64::from(s.len) <= 0x100000 + 65536);
                }
            }
        }
    }

    proptest! {
        /// Whatever bytes a client writes, an accepted command stays inside its namespace
        /// window and inside the buffer it names.
        #[test]
        fn accepted_commands_stay_in_bounds(bytes in proptest::collection::vec(any::<u8>(), 64), small in any::<bool>()) {
            let mut sqe: Sqe = zerocopy::FromBytes::read_from_bytes(&bytes[..]).unwrap();
            if small {
                sqe.segments = 0; sqe.reserved1 = [0; 2]; sqe.flags &= 1; sqe.opcode %= 6;
                sqe.nsid %= 3; sqe.buf_id %= 5; sqe.len %= 70000; sqe.offset %= 1 << 21; sqe.buf_offset %= 70000;
            }
            if let Ok(Validated::Device { cmd, .. }) = check(sqe) {
                let (nsid, slba, blocks, data) = match cmd {
                    IoCommand::Read { nsid, slba, blocks, iova, len } => (nsid, slba, u64::from(blocks), Some((iova, len))),
                    IoCommand::Write { nsid, slba, blocks, iova, len, .. } => (nsid, slba, u64::from(blocks), Some((iova, len))),
                    IoCommand::WriteZeroes { nsid, slba, blocks, .. } | IoCommand::Deallocate { nsid, slba, blocks, .. } => (nsid, slba, u64::from(blocks), None),
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
