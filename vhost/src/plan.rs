//! Turning one virtio-blk request into nvmed requests: the single place that decides how guest
//! memory reaches the device.
//!
//! Data pieces (descriptors split at guest RAM region boundaries) whose length is a multiple of
//! the LBA size become one nvmed Read/Write each, straight into guest RAM (zero copy;
//! neighbouring pieces contiguous in one region are merged). A run of pieces that cannot be
//! expressed that way (a length that is not a multiple of the LBA size, or an address that is
//! not 4-byte aligned as NVMe PRPs require) is bounced: it gets a slice of the queue's own
//! registered bounce buffer, copied from guest RAM before a write and into it after a read.
//!
//! When nvmed gains vectored requests (ReadV/WriteV), `build` is the function to change: one
//! vectored request per virtio request, bounce only where a piece is not dword aligned.

use nvmed_client::{BufferId, Io};

use crate::config::{DiskGeometry, MAX_DISCARD_BYTES, MAX_WRITE_ZEROES_LBAS};
use crate::regions::{Piece, RegionTable};
use crate::request::{Op, Range, Seg, S_IOERR};

/// Granularity of the bounce buffer allocator.
pub const BOUNCE_PAGE: u64 = 4096;

/// A queue's registered bounce buffer, handed out in pages (first fit).
#[derive(Debug)]
pub struct BouncePool {
    buffer: BufferId,
    used: Vec<bool>,
}

impl BouncePool {
    /// A pool over `len` bytes of registered buffer `buffer`.
    pub fn new(buffer: BufferId, len: u64) -> Self {
        Self { buffer, used: vec![false; (len / BOUNCE_PAGE) as usize] }
    }

    /// The registered buffer.
    pub fn buffer(&self) -> BufferId {
        self.buffer
    }

    /// Bytes in the pool.
    pub fn capacity(&self) -> u64 {
        self.used.len() as u64 * BOUNCE_PAGE
    }

    /// Takes `len` bytes; `None` while not enough contiguous pages are free.
    pub fn alloc(&mut self, len: u64) -> Option<u64> {
        let pages = len.div_ceil(BOUNCE_PAGE).max(1) as usize;
        let mut run = 0;
        for i in 0..self.used.len() {
            run = if self.used[i] { 0 } else { run + 1 };
            if run == pages {
                let first = i + 1 - pages;
                self.used[first..=i].iter_mut().for_each(|u| *u = true);
                return Some(first as u64 * BOUNCE_PAGE);
            }
        }
        None
    }

    /// Gives back what [`BouncePool::alloc`] returned.
    pub fn free(&mut self, offset: u64, len: u64) {
        let first = (offset / BOUNCE_PAGE) as usize;
        let pages = len.div_ceil(BOUNCE_PAGE).max(1) as usize;
        self.used[first..first + pages].iter_mut().for_each(|u| *u = false);
    }

    /// Pages in use.
    pub fn in_use(&self) -> usize {
        self.used.iter().filter(|u| **u).count()
    }
}

/// A stretch of the request that goes through the bounce buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    /// Where in the bounce buffer.
    pub pool_offset: u64,
    /// Bytes (a multiple of the LBA size).
    pub len: u64,
    /// The guest memory it stands for, in order (`len` bytes in all).
    pub guest: Vec<Seg>,
}

/// The nvmed requests for one virtio request.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Requests to submit (user data filled in by the caller).
    pub ios: Vec<Io>,
    /// Bounced stretches: copy in before submitting a write, copy out after a read.
    pub bounces: Vec<Bounce>,
}

impl Plan {
    /// Bytes that go through the bounce buffer.
    pub fn bounced_bytes(&self) -> u64 {
        self.bounces.iter().map(|b| b.len).sum()
    }

    /// Gives the bounce space back (request finished or abandoned).
    pub fn release(&self, pool: &mut BouncePool) {
        for b in &self.bounces {
            pool.free(b.pool_offset, b.len);
        }
    }
}

/// Why a plan could not be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanError {
    /// Complete the request at once with this status.
    Status(u8, &'static str),
    /// Not enough free bounce space right now: retry after completions.
    Busy,
}

/// Builds the nvmed requests for a parsed request. `fua` forces writes through the device
/// cache (the guest turned the write cache off).
pub fn build(
    op: &Op,
    geo: &DiskGeometry,
    regions: &RegionTable,
    pool: &mut BouncePool,
    fua: bool,
) -> Result<Plan, PlanError> {
    let nsid = geo.nsid;
    let mut plan = Plan::default();
    match op {
        Op::Read { offset, segs } | Op::Write { offset, segs } => {
            let write = matches!(op, Op::Write { .. });
            let mut pieces = Vec::with_capacity(segs.len());
            for s in segs {
                regions
                    .translate(s.gpa, s.len, &mut pieces)
                    .map_err(|_| PlanError::Status(S_IOERR, "data outside registered guest RAM"))?;
            }
            if let Err(e) = data_ios(&mut plan, &pieces, *offset, write, fua, geo, pool) {
                plan.release(pool);
                return Err(e);
            }
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

fn data_ios(
    plan: &mut Plan,
    pieces: &[Piece],
    disk_offset: u64,
    write: bool,
    fua: bool,
    geo: &DiskGeometry,
    pool: &mut BouncePool,
) -> Result<(), PlanError> {
    let lba = u64::from(geo.lba_size);
    let nsid = geo.nsid;
    let make = |off: u64, len: u32, buf: BufferId, buf_off: u64| {
        if write {
            let io = Io::write(nsid, off, len, buf, buf_off);
            if fua {
                io.fua()
            } else {
                io
            }
        } else {
            Io::read(nsid, off, len, buf, buf_off)
        }
    };
    let mut pos = 0u64; // bytes of the request done so far
    let mut i = 0;
    while i < pieces.len() {
        let p = pieces[i];
        let direct = u64::from(p.len).is_multiple_of(lba) && p.buf_offset.is_multiple_of(4);
        if direct {
            // Merge with the previous request when contiguous in the same buffer.
            let merged = match plan.ios.last_mut() {
                Some(last)
                    if last.buffer == Some((p.buffer, p.buf_offset.wrapping_sub(u64::from(last.len))))
                        && last.offset + u64::from(last.len) == disk_offset + pos
                        && u64::from(last.len) + u64::from(p.len) <= u64::from(geo.max_request) =>
                {
                    last.len += p.len;
                    true
                }
                _ => false,
            };
            if !merged {
                plan.ios.push(make(disk_offset + pos, p.len, p.buffer, p.buf_offset));
            }
            pos += u64::from(p.len);
            i += 1;
            continue;
        }
        // A bounced stretch: take pieces until the stretch ends on an LBA boundary.
        let start = pos;
        let mut guest = Vec::new();
        while i < pieces.len() {
            guest.push(Seg { gpa: pieces[i].gpa, len: pieces[i].len });
            pos += u64::from(pieces[i].len);
            i += 1;
            if pos.is_multiple_of(lba) {
                break;
            }
        }
        let len = pos - start;
        if !len.is_multiple_of(lba) {
            return Err(PlanError::Status(S_IOERR, "data length not a multiple of the logical block size"));
        }
        if len > pool.capacity() {
            return Err(PlanError::Status(S_IOERR, "unaligned stretch larger than the bounce buffer"));
        }
        let pool_offset = pool.alloc(len).ok_or(PlanError::Busy)?;
        plan.bounces.push(Bounce { pool_offset, len, guest });
        plan.ios.push(make(disk_offset + start, len as u32, pool.buffer(), pool_offset));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use nvmed_client::Opcode;

    use super::*;
    use crate::regions::{Region, RegionSpec};

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

    fn pool() -> BouncePool {
        BouncePool::new(BufferId(9), 64 << 10)
    }

    fn read(offset: u64, segs: &[(u64, u32)]) -> Op {
        Op::Read { offset, segs: segs.iter().map(|&(gpa, len)| Seg { gpa, len }).collect() }
    }

    #[test]
    fn page_aligned_io_is_zero_copy_and_merged_when_contiguous() {
        let mut p = pool();
        let plan = build(
            &read(4096, &[(0x1000, 4096), (0x2000, 4096), (0x8000, 4096)]),
            &geo(512),
            &regions(),
            &mut p,
            false,
        )
        .unwrap();
        assert!(plan.bounces.is_empty());
        assert_eq!(
            plan.ios,
            vec![
                Io::read(1, 4096, 8192, BufferId(1), 0x1000),
                Io::read(1, 4096 + 8192, 4096, BufferId(1), 0x8000)
            ]
        );
        assert_eq!(p.in_use(), 0);
    }

    #[test]
    fn a_segment_crossing_regions_becomes_one_request_per_region() {
        let mut p = pool();
        let plan = build(&read(0, &[(0xff000, 8192)]), &geo(4096), &regions(), &mut p, false).unwrap();
        assert_eq!(
            plan.ios,
            vec![Io::read(1, 0, 4096, BufferId(1), 0xff000), Io::read(1, 4096, 4096, BufferId(2), 0)]
        );
    }

    #[test]
    fn unaligned_segments_bounce_until_an_lba_boundary() {
        let mut p = pool();
        // 4 KiB LBAs: 1 KiB + 3 KiB (bounced together), then a whole page (direct), then 2+2 KiB.
        let op = Op::Write {
            offset: 0,
            segs: vec![
                Seg { gpa: 0x1000, len: 1024 },
                Seg { gpa: 0x3000, len: 3072 },
                Seg { gpa: 0x5000, len: 4096 },
                Seg { gpa: 0x7000, len: 2048 },
                Seg { gpa: 0x9800, len: 2048 },
            ],
        };
        let plan = build(&op, &geo(4096), &regions(), &mut p, true).unwrap();
        assert_eq!(plan.ios.len(), 3);
        assert_eq!(plan.ios[0], Io::write(1, 0, 4096, BufferId(9), 0).fua());
        assert_eq!(plan.ios[1], Io::write(1, 4096, 4096, BufferId(1), 0x5000).fua());
        assert_eq!(plan.ios[2], Io::write(1, 8192, 4096, BufferId(9), 4096).fua());
        assert_eq!(plan.bounced_bytes(), 8192);
        assert_eq!(
            plan.bounces[0].guest,
            vec![Seg { gpa: 0x1000, len: 1024 }, Seg { gpa: 0x3000, len: 3072 }]
        );
        assert_eq!(p.in_use(), 2);
        plan.release(&mut p);
        assert_eq!(p.in_use(), 0);
        // 512-byte LBAs: the same layout is all direct.
        let plan = build(&op, &geo(512), &regions(), &mut p, false).unwrap();
        assert!(plan.bounces.is_empty());
        // Not dword aligned: bounced even with 512-byte LBAs.
        let plan = build(&read(0, &[(0x1002, 512)]), &geo(512), &regions(), &mut p, false).unwrap();
        assert_eq!(plan.bounced_bytes(), 512);
        assert_eq!(plan.ios[0].op, Opcode::Read);
    }

    #[test]
    fn bounce_space_exhausted_is_busy_and_too_big_is_an_error() {
        let mut p = BouncePool::new(BufferId(9), 8192);
        let first = build(&read(0, &[(0x1000, 1024), (0x3000, 7168)]), &geo(4096), &regions(), &mut p, false)
            .unwrap();
        assert_eq!(first.bounced_bytes(), 8192);
        assert_eq!(
            build(&read(0, &[(0x1000, 1024), (0x3000, 3072)]), &geo(4096), &regions(), &mut p, false),
            Err(PlanError::Busy)
        );
        first.release(&mut p);
        assert!(matches!(
            build(&read(0, &[(0x1000, 1024), (0x3000, 11264)]), &geo(4096), &regions(), &mut p, false),
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
            plan.ios,
            vec![Io::write_zeroes(1, 512, 65536 * 512), Io::write_zeroes(1, 512 + 65536 * 512, 512)]
        );
        assert_eq!(build(&Op::Flush, &geo(512), &regions(), &mut p, false).unwrap().ios, vec![Io::flush(1)]);
    }
}
