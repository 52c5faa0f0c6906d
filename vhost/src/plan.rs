//! Turning one virtio-blk request into nvmed requests: the single place that decides how guest
//! memory reaches the device.
//!
//! The data descriptors of an IN/OUT request, split at guest RAM region boundaries (and merged
//! where neighbours are contiguous in one region), become ONE nvmed request naming guest RAM:
//! a plain Read/Write when that is a single dword-aligned piece, else a vectored ReadV/WriteV
//! whose segment list goes in the queue's list slot reserved for this request (a per-queue
//! registered buffer of preallocated slots, one per request in flight). Pieces may have any
//! length and alignment: nvmed moves the data with PRPs when the layout allows, with SGLs when
//! the controller has them, and bounces through its own memory otherwise (counted in the
//! session's `bounced_bytes`). The backend never copies data.

use nvmed_client::{BufferId, Io, IoSegment, MAX_SEGMENTS, SEGMENT_SIZE};
use smallvec::SmallVec;

use crate::config::{DiskGeometry, MAX_DISCARD_BYTES, MAX_WRITE_ZEROES_LBAS};
use crate::regions::{Piece, RegionTable};
use crate::request::{Op, Range, S_IOERR};

/// Bytes of one list slot: room for the longest segment list nvmed takes.
pub const LIST_SLOT_BYTES: u64 = MAX_SEGMENTS as u64 * SEGMENT_SIZE;

/// A queue's registered buffer of segment-list slots, one per vectored request in flight.
#[derive(Debug)]
pub struct ListPool {
    buffer: BufferId,
    free: Vec<u32>,
    slots: u32,
}

impl ListPool {
    /// A pool of `slots` slots of [`LIST_SLOT_BYTES`] in registered buffer `buffer` (at least
    /// `slots * LIST_SLOT_BYTES` bytes).
    pub fn new(buffer: BufferId, slots: u32) -> Self {
        Self { buffer, free: (0..slots).rev().collect(), slots }
    }

    /// The registered buffer.
    pub fn buffer(&self) -> BufferId {
        self.buffer
    }

    /// Takes a slot; `None` while every slot is in use.
    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives back a slot [`ListPool::alloc`] returned.
    pub fn free(&mut self, slot: u32) {
        debug_assert!(slot < self.slots && !self.free.contains(&slot));
        self.free.push(slot);
    }

    /// Byte offset of a slot in the buffer.
    pub fn offset(slot: u32) -> u64 {
        u64::from(slot) * LIST_SLOT_BYTES
    }

    /// Slots in use.
    pub fn in_use(&self) -> usize {
        (self.slots as usize) - self.free.len()
    }
}

/// The nvmed requests for one virtio request (inline: a read or write is one request with at
/// most a few segments, so planning it allocates nothing).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Requests to submit (user data filled in by the caller). A vectored one's list must be
    /// written first: [`Plan::segments`] at [`ListPool::offset`] of [`Plan::list_slot`].
    pub ios: SmallVec<[Io; 1]>,
    /// The segment list of the vectored request (empty for plain ones).
    pub segments: SmallVec<[IoSegment; 4]>,
    /// The list slot the vectored request holds until it completes.
    pub list_slot: Option<u32>,
}

impl Plan {
    /// Gives the list slot back (request finished or abandoned).
    pub fn release(&self, pool: &mut ListPool) {
        if let Some(slot) = self.list_slot {
            pool.free(slot);
        }
    }
}

/// Why a plan could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// Complete the request at once with this status.
    Status(u8, &'static str),
    /// No free list slot right now: retry after completions.
    Busy,
}

/// Builds the nvmed requests for a parsed request. `fua` forces writes through the device
/// cache (the guest turned the write cache off).
pub fn build(
    op: &Op,
    geo: &DiskGeometry,
    regions: &RegionTable,
    pool: &mut ListPool,
    fua: bool,
) -> Result<Plan, PlanError> {
    let nsid = geo.nsid;
    let mut plan = Plan::default();
    match op {
        Op::Read { offset, segs } | Op::Write { offset, segs } => {
            let write = matches!(op, Op::Write { .. });
            let mut pieces = SmallVec::<[Piece; 4]>::new();
            for s in segs {
                regions
                    .translate(s.gpa, s.len, &mut pieces)
                    .map_err(|_| PlanError::Status(S_IOERR, "data outside registered guest RAM"))?;
            }
            data_io(&mut plan, &pieces, *offset, write, fua, geo, pool)?;
        }
        Op::Flush => plan.ios.push(Io::flush(nsid)),
        Op::GetId { .. } => {}
        Op::Discard(ranges) => {
            chunks(ranges, MAX_DISCARD_BYTES, |o, l| plan.ios.push(Io::deallocate(nsid, o, l)))
        }
        Op::WriteZeroes(ranges) => {
            let max = MAX_WRITE_ZEROES_LBAS * u64::from(geo.lba_size);
            chunks(ranges, max, |o, l| {
                let io = Io::write_zeroes(nsid, o, l);
                plan.ios.push(if fua { io.fua() } else { io });
            })
        }
    }
    Ok(plan)
}

/// Splits ranges into pieces of at most `max` bytes (and below 4 GiB, nvmed's length field).
fn chunks(ranges: &[Range], max: u64, mut f: impl FnMut(u64, u32)) {
    let max = max.min(u64::from(u32::MAX) / 4096 * 4096);
    for r in ranges {
        let mut at = 0;
        while at < r.len {
            let n = (r.len - at).min(max);
            f(r.offset + at, n as u32);
            at += n;
        }
    }
}

fn data_io(
    plan: &mut Plan,
    pieces: &[Piece],
    disk_offset: u64,
    write: bool,
    fua: bool,
    geo: &DiskGeometry,
    pool: &mut ListPool,
) -> Result<(), PlanError> {
    // Neighbours contiguous in one registered buffer become one segment.
    let mut segs: SmallVec<[IoSegment; 4]> = SmallVec::new();
    for p in pieces {
        match segs.last_mut() {
            Some(last)
                if last.buffer == p.buffer
                    && last.offset + u64::from(last.len) == p.buf_offset
                    && u64::from(last.len) + u64::from(p.len) <= u64::from(u32::MAX) =>
            {
                last.len += p.len
            }
            _ => segs.push(IoSegment::new(p.buffer, p.buf_offset, p.len)),
        }
    }
    let total: u64 = segs.iter().map(|s| u64::from(s.len)).sum();
    if total == 0 {
        return Ok(()); // nothing to move (refused earlier by the parser; kept harmless)
    }
    if !total.is_multiple_of(u64::from(geo.lba_size)) {
        return Err(PlanError::Status(S_IOERR, "data length not a multiple of the logical block size"));
    }
    if total > u64::from(geo.max_request) {
        return Err(PlanError::Status(S_IOERR, "request larger than seg_max * size_max"));
    }
    let len = total as u32;
    let nsid = geo.nsid;
    if let [s] = segs[..] {
        if s.offset.is_multiple_of(4) {
            // One piece, dword aligned: a plain Read/Write.
            let io = if write {
                let io = Io::write(nsid, disk_offset, len, s.buffer, s.offset);
                if fua {
                    io.fua()
                } else {
                    io
                }
            } else {
                Io::read(nsid, disk_offset, len, s.buffer, s.offset)
            };
            plan.ios.push(io);
            return Ok(());
        }
    }
    if segs.len() > usize::from(MAX_SEGMENTS) {
        // seg_max leaves room for region-boundary splits; only a guest ignoring seg_max (or
        // guest RAM cut into many adjacent regions) gets here.
        return Err(PlanError::Status(S_IOERR, "more guest memory pieces than nvmed's MAX_SEGMENTS"));
    }
    let slot = pool.alloc().ok_or(PlanError::Busy)?;
    let (list, at, count) = (pool.buffer(), ListPool::offset(slot), segs.len() as u16);
    let io = if write {
        let io = Io::writev(nsid, disk_offset, len, list, at, count);
        if fua {
            io.fua()
        } else {
            io
        }
    } else {
        Io::readv(nsid, disk_offset, len, list, at, count)
    };
    plan.ios.push(io);
    plan.segments = segs;
    plan.list_slot = Some(slot);
    Ok(())
}

#[cfg(test)]
mod tests {
    use nvmed_client::Opcode;

    use smallvec::smallvec;

    use super::*;
    use crate::regions::{Region, RegionSpec};
    use crate::request::Seg;

    fn geo(lba_size: u32) -> DiskGeometry {
        DiskGeometry {
            nsid: 1,
            lba_size,
            size: 1 << 30,
            size_max: 1 << 20,
            seg_max: 16,
            max_request: 1 << 20,
            read_only: false,
            num_queues: 1,
        }
    }

    fn regions() -> RegionTable {
        let mut t = RegionTable::default();
        let spec = |gpa, len| RegionSpec { gpa, len, file_offset: gpa, dev: 0, ino: 0 };
        t.insert(Region { spec: spec(0, 0x10_0000), buffer: BufferId(1) });
        t.insert(Region { spec: spec(0x10_0000, 0x10_0000), buffer: BufferId(2) });
        t
    }

    fn pool() -> ListPool {
        ListPool::new(BufferId(9), 4)
    }

    fn read(offset: u64, segs: &[(u64, u32)]) -> Op {
        Op::Read { offset, segs: segs.iter().map(|&(gpa, len)| Seg { gpa, len }).collect() }
    }

    fn seg(buffer: u32, offset: u64, len: u32) -> IoSegment {
        IoSegment::new(BufferId(buffer), offset, len)
    }

    #[test]
    fn one_contiguous_piece_is_a_plain_request() {
        let mut p = pool();
        // Two descriptors contiguous in guest RAM: merged into one plain read.
        let plan =
            build(&read(4096, &[(0x1000, 4096), (0x2000, 4096)]), &geo(512), &regions(), &mut p, false)
                .unwrap();
        assert_eq!(plan.ios[..], [Io::read(1, 4096, 8192, BufferId(1), 0x1000)]);
        assert!(plan.segments.is_empty() && plan.list_slot.is_none());
        assert_eq!(p.in_use(), 0);
        let w = Op::Write { offset: 0, segs: smallvec![Seg { gpa: 0x10_0200, len: 1024 }] };
        let plan = build(&w, &geo(512), &regions(), &mut p, true).unwrap();
        assert_eq!(plan.ios[..], [Io::write(1, 0, 1024, BufferId(2), 0x200).fua()]);
    }

    #[test]
    fn several_pieces_become_one_vectored_request_with_a_list_slot() {
        let mut p = pool();
        let plan = build(
            &read(4096, &[(0x1000, 4096), (0x2000, 4096), (0x8000, 4096)]),
            &geo(512),
            &regions(),
            &mut p,
            false,
        )
        .unwrap();
        assert_eq!(plan.ios[..], [Io::readv(1, 4096, 12288, BufferId(9), 0, 2)]);
        assert_eq!(plan.segments[..], [seg(1, 0x1000, 8192), seg(1, 0x8000, 4096)]);
        assert_eq!(plan.list_slot, Some(0));
        assert_eq!(p.in_use(), 1);
        // The next request gets the next slot.
        let w = Op::Write {
            offset: 0,
            segs: smallvec![Seg { gpa: 0x1000, len: 512 }, Seg { gpa: 0x3000, len: 512 }],
        };
        let plan2 = build(&w, &geo(512), &regions(), &mut p, true).unwrap();
        assert_eq!(plan2.ios[..], [Io::writev(1, 0, 1024, BufferId(9), LIST_SLOT_BYTES, 2).fua()]);
        assert_eq!(plan2.ios[0].op, Opcode::WriteV);
        plan.release(&mut p);
        plan2.release(&mut p);
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_segment_crossing_regions_is_two_segments_of_one_request() {
        let mut p = pool();
        let plan = build(&read(0, &[(0xff000, 8192)]), &geo(4096), &regions(), &mut p, false).unwrap();
        assert_eq!(plan.ios[..], [Io::readv(1, 0, 8192, BufferId(9), 0, 2)]);
        assert_eq!(plan.segments[..], [seg(1, 0xff000, 4096), seg(2, 0, 4096)]);
    }

    #[test]
    fn odd_lengths_and_alignments_go_to_nvmed_unchanged() {
        let mut p = pool();
        // 4 KiB LBAs: pieces that are not whole blocks, one not even dword aligned.
        let op = Op::Write {
            offset: 0,
            segs: smallvec![
                Seg { gpa: 0x1000, len: 1024 },
                Seg { gpa: 0x3000, len: 3072 },
                Seg { gpa: 0x5000, len: 4096 },
                Seg { gpa: 0x7001, len: 2047 },
                Seg { gpa: 0x9800, len: 2049 },
            ],
        };
        let plan = build(&op, &geo(4096), &regions(), &mut p, false).unwrap();
        assert_eq!(plan.ios[..], [Io::writev(1, 0, 12288, BufferId(9), 0, 5)]);
        assert_eq!(plan.segments[3], seg(1, 0x7001, 2047));
        // A single piece that is not dword aligned: vectored too (plain requests need 4 bytes).
        let plan = build(&read(0, &[(0x1002, 512)]), &geo(512), &regions(), &mut p, false).unwrap();
        assert_eq!(plan.ios[..], [Io::readv(1, 0, 512, BufferId(9), LIST_SLOT_BYTES, 1)]);
        // Total not a multiple of the LBA size.
        assert!(matches!(
            build(&read(0, &[(0x1000, 512)]), &geo(4096), &regions(), &mut p, false),
            Err(PlanError::Status(S_IOERR, _))
        ));
        assert_eq!(p.in_use(), 2);
    }

    #[test]
    fn no_free_slot_is_busy_and_bad_requests_are_errors() {
        let mut p = ListPool::new(BufferId(9), 1);
        let two = read(0, &[(0x1000, 512), (0x3000, 512)]);
        let first = build(&two, &geo(512), &regions(), &mut p, false).unwrap();
        assert_eq!(build(&two, &geo(512), &regions(), &mut p, false), Err(PlanError::Busy));
        // Plain requests need no slot.
        assert!(build(&read(0, &[(0x1000, 512)]), &geo(512), &regions(), &mut p, false).is_ok());
        first.release(&mut p);
        assert!(build(&two, &geo(512), &regions(), &mut p, false).is_ok());
        // More pieces than nvmed takes in one list.
        let many: Vec<(u64, u32)> = (0..257).map(|i| (0x1000 + i * 0x1000, 512)).collect();
        let mut p = pool();
        assert!(matches!(
            build(&read(0, &many), &geo(512), &regions(), &mut p, false),
            Err(PlanError::Status(S_IOERR, _))
        ));
        assert_eq!(p.in_use(), 0);
        // Outside registered RAM.
        assert!(matches!(
            build(&read(0, &[(0x20_0000, 512)]), &geo(512), &regions(), &mut p, false),
            Err(PlanError::Status(..))
        ));
    }

    #[test]
    fn discard_and_write_zeroes_are_split_at_their_limits() {
        let mut p = pool();
        let plan = build(
            &Op::Discard(vec![Range { offset: 0, len: 3 << 30 }]),
            &geo(512),
            &regions(),
            &mut p,
            false,
        )
        .unwrap();
        assert_eq!(plan.ios.len(), 3);
        assert!(plan.ios.iter().all(|io| io.op == Opcode::Deallocate && io.len == 1 << 30));
        let plan = build(
            &Op::WriteZeroes(vec![Range { offset: 512, len: 65537 * 512 }]),
            &geo(512),
            &regions(),
            &mut p,
            false,
        )
        .unwrap();
        assert_eq!(
            plan.ios[..],
            [Io::write_zeroes(1, 512, 65536 * 512), Io::write_zeroes(1, 512 + 65536 * 512, 512)]
        );
        assert_eq!(build(&Op::Flush, &geo(512), &regions(), &mut p, false).unwrap().ios[..], [Io::flush(1)]);
    }
}
