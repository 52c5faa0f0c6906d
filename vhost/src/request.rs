//! Parsing a virtio-blk descriptor chain into a request, refusing whatever a driver may get
//! wrong (loops, zero-length or out-of-RAM descriptors, wrong directions, short status, sizes).

use smallvec::SmallVec;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::config::{DiskGeometry, MAX_DISCARD_SEGS, SECTOR};

/// IOERR as the status byte.
pub const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// UNSUPP as the status byte.
pub const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;
/// Length of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_LEN: u64 = 16;
/// Length of one discard / write-zeroes segment.
pub const DISCARD_SEG_LEN: u64 = 16;

/// A request's guest memory ranges: inline up to four (a Linux guest's page-aligned I/O is one
/// or two), so parsing a read or write allocates nothing.
pub type Segs = SmallVec<[Seg; 4]>;

/// A guest memory range of the request's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u32,
}

/// A byte range of the namespace (discard, write zeroes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What a well-formed request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Read from the disk into guest memory.
    Read {
        /// Byte offset on the namespace.
        offset: u64,
        /// Guest memory to fill, in order.
        segs: Segs,
    },
    /// Write guest memory to the disk.
    Write {
        /// Byte offset on the namespace.
        offset: u64,
        /// Guest memory to write, in order.
        segs: Segs,
    },
    /// Make completed writes durable.
    Flush,
    /// Return the serial (answered by the backend, no I/O).
    GetId {
        /// Guest memory for the serial.
        segs: Segs,
    },
    /// Deallocate ranges.
    Discard(Vec<Range>),
    /// Write zeroes over ranges.
    WriteZeroes(Vec<Range>),
}

impl Op {
    /// Bytes of data the request moves (reads and writes).
    pub fn data_len(&self) -> u64 {
        match self {
            Op::Read { segs, .. } | Op::Write { segs, .. } => segs.iter().map(|s| u64::from(s.len)).sum(),
            _ => 0,
        }
    }
}

/// A parsed descriptor chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    /// Head descriptor index (for the used ring).
    pub head: u16,
    /// Address of the status byte, `None` when the chain has no usable status descriptor (then
    /// the request can only be returned with used length 0).
    pub status: Option<u64>,
    /// The request, or the status to complete it with at once and why.
    pub op: Result<Op, (u8, &'static str)>,
}

/// Most descriptors of a chain walked: QEMU's limit (it fails a device whose chain is longer).
/// A longer chain (an indirect table may hold 65535) is not walked further: that would cost
/// the backend CPU per descriptor outside the guest's accounting. Chains between `seg_max` + 2
/// and this (old Windows viostor drivers ignore `seg_max` and send up to 515) are still walked
/// to their status byte, so the guest gets a status (success, or IOERR where the request
/// cannot be served), never a request that only seems done.
pub const MAX_CHAIN: usize = 1024;

/// Collects the descriptors of a chain as virtio-queue's `DescriptorChain` iterator yields them
/// (indirect tables followed, one level only; a table length not a multiple of 16, a next index
/// past the table, more links than the table has entries, or more than 4 GiB in all end the
/// walk), at most [`MAX_CHAIN`]. Returns true when the walk stopped on a descriptor that still
/// had NEXT set, or at that limit (the `truncated` argument of [`parse`]).
pub fn collect<I: Iterator<Item = Descriptor>>(chain: I, out: &mut Vec<Descriptor>) -> bool {
    out.clear();
    let mut truncated = false;
    for d in chain {
        if out.len() == MAX_CHAIN {
            return true;
        }
        truncated = d.has_next();
        out.push(d);
    }
    truncated
}

/// Walks the chain whose head descriptor is `head` in the descriptor table at `desc_table` of a
/// queue of `queue_size` entries, exactly as virtio-queue's chain iterator does (which cannot be
/// built from a head index outside that crate): used to resubmit requests taken by a previous
/// backend process, whose heads come from the inflight region rather than the avail ring.
pub fn walk_chain<'a, M: GuestMemoryBackend>(
    mem: &'a M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> impl Iterator<Item = Descriptor> + 'a {
    let mut table = desc_table;
    let mut size = queue_size;
    let mut next = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut yielded = 0u32;
    std::iter::from_fn(move || loop {
        if ttl == 0 || next >= size {
            return None;
        }
        let addr = table.checked_add(u64::from(next) * 16)?;
        let d: Descriptor = mem.read_obj(addr).ok()?;
        if d.refers_to_indirect_table() {
            if indirect || !d.len().is_multiple_of(16) || d.len() / 16 > u32::from(u16::MAX) {
                return None;
            }
            table = d.addr();
            size = (d.len() / 16) as u16;
            next = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        yielded = yielded.checked_add(d.len())?;
        if d.has_next() {
            next = d.next();
            ttl -= 1;
        } else {
            ttl = 0;
        }
        return Some(d);
    })
}

/// Parses the descriptors of one chain (as yielded by `DescriptorChain`, indirect tables
/// already followed). `truncated` must be true when the iterator stopped on a descriptor that
/// still had NEXT set (a loop, a bad index, an unreadable or invalid indirect table).
pub fn parse<M: GuestMemoryBackend>(
    head: u16,
    descs: &[Descriptor],
    truncated: bool,
    mem: &M,
    geo: &DiskGeometry,
) -> Parsed {
    // A chain that did not end cleanly has no trustworthy last descriptor: report nothing.
    let last = if truncated { None } else { descs.last() };
    let status = last.filter(|d| d.is_write_only() && d.len() >= 1).and_then(|d| {
        let addr = d.addr().0.checked_add(u64::from(d.len()) - 1)?;
        mem.check_range(GuestAddress(addr), 1).then_some(addr)
    });
    let op = parse_op(descs, truncated, mem, geo);
    let op = match (status, op) {
        (None, Ok(_)) => Err((S_IOERR, "no writable status byte at the end of the chain")),
        (_, op) => op,
    };
    Parsed { head, status, op }
}

fn parse_op<M: GuestMemoryBackend>(
    descs: &[Descriptor],
    truncated: bool,
    mem: &M,
    geo: &DiskGeometry,
) -> Result<Op, (u8, &'static str)> {
    let ioerr = |why| Err((S_IOERR, why));
    if truncated {
        return ioerr("descriptor chain loops, is too long or has a bad next index");
    }
    let mut readable = Segs::new();
    let mut writable = Segs::new();
    for d in descs {
        if d.len() == 0 {
            return ioerr("zero-length descriptor");
        }
        if !mem.check_range(d.addr(), d.len() as usize) {
            return ioerr("descriptor outside guest RAM");
        }
        let seg = Seg { gpa: d.addr().0, len: d.len() };
        if d.is_write_only() {
            writable.push(seg);
        } else if !writable.is_empty() {
            return ioerr("device-readable descriptor after a device-writable one");
        } else {
            readable.push(seg);
        }
    }
    // Header: the first 16 readable bytes; out-data: the readable bytes after it.
    let mut header = [0u8; HEADER_LEN as usize];
    if gather(mem, &readable, 0, &mut header).is_err() {
        return ioerr("request header shorter than 16 bytes");
    }
    let out = sub_segs(&readable, HEADER_LEN, u64::MAX);
    // In-data: the writable bytes before the final status byte.
    let w_total: u64 = writable.iter().map(|s| u64::from(s.len)).sum();
    let in_ = sub_segs(&writable, 0, w_total.saturating_sub(1));
    let kind = u32::from_le_bytes(header[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap());
    let total = |s: &[Seg]| s.iter().map(|s| u64::from(s.len)).sum::<u64>();
    match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let write = kind == VIRTIO_BLK_T_OUT;
            let (data, other) = if write { (out, &in_) } else { (in_, &out) };
            if !other.is_empty() {
                return ioerr(if write {
                    "write request with device-writable data"
                } else {
                    "read request with device-readable data"
                });
            }
            if write && geo.read_only {
                return ioerr("write to a read-only disk");
            }
            let len = total(&data);
            let offset = sector.checked_mul(SECTOR).ok_or((S_IOERR, "sector out of range"))?;
            check_range(geo, offset, len)?;
            if len > u64::from(geo.max_request) {
                return ioerr("request larger than seg_max * size_max");
            }
            Ok(if write { Op::Write { offset, segs: data } } else { Op::Read { offset, segs: data } })
        }
        VIRTIO_BLK_T_FLUSH => Ok(Op::Flush),
        VIRTIO_BLK_T_GET_ID => {
            if in_.is_empty() || !out.is_empty() {
                return ioerr("GET_ID without a writable buffer");
            }
            Ok(Op::GetId { segs: in_ })
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let discard = kind == VIRTIO_BLK_T_DISCARD;
            if geo.read_only {
                return ioerr("discard or write zeroes on a read-only disk");
            }
            if !in_.is_empty() {
                return ioerr("discard or write zeroes with device-writable data");
            }
            let len = total(&out);
            if len == 0 || len % DISCARD_SEG_LEN != 0 {
                return ioerr("discard or write zeroes data is not a whole number of 16-byte segments");
            }
            if len / DISCARD_SEG_LEN > u64::from(MAX_DISCARD_SEGS) {
                return Err((S_UNSUPP, "more discard or write zeroes segments than max_discard_seg"));
            }
            let mut ranges = Vec::new();
            for i in 0..len / DISCARD_SEG_LEN {
                let mut seg = [0u8; DISCARD_SEG_LEN as usize];
                gather(mem, &out, i * DISCARD_SEG_LEN, &mut seg)
                    .map_err(|_| (S_IOERR, "unreadable segment"))?;
                let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
                let num = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
                let flags = u32::from_le_bytes(seg[12..16].try_into().unwrap());
                let allowed = if discard { 0 } else { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return Err((S_UNSUPP, "unsupported discard or write zeroes flags"));
                }
                let max = if discard { geo.max_discard_sectors() } else { geo.max_write_zeroes_sectors() };
                if num > u64::from(max) {
                    return ioerr("discard or write zeroes segment above its advertised maximum");
                }
                let offset = sector.checked_mul(SECTOR).ok_or((S_IOERR, "sector out of range"))?;
                check_range(geo, offset, num * SECTOR)?;
                if num > 0 {
                    ranges.push(Range { offset, len: num * SECTOR });
                }
            }
            Ok(if discard { Op::Discard(ranges) } else { Op::WriteZeroes(ranges) })
        }
        _ => Err((S_UNSUPP, "unsupported request type")),
    }
}

/// Bytes and alignment of a range of the disk.
fn check_range(geo: &DiskGeometry, offset: u64, len: u64) -> Result<(), (u8, &'static str)> {
    if offset.checked_add(len).is_none_or(|end| end > geo.size) {
        return Err((S_IOERR, "request past the end of the disk"));
    }
    let lba = u64::from(geo.lba_size);
    if !offset.is_multiple_of(lba) || !len.is_multiple_of(lba) {
        return Err((S_IOERR, "request not aligned to the logical block size"));
    }
    Ok(())
}

/// The part `from..to` (byte positions in the concatenation) of a segment list.
fn sub_segs(segs: &[Seg], from: u64, to: u64) -> Segs {
    let mut out = Segs::new();
    let mut pos = 0u64;
    for s in segs {
        let (start, end) = (pos, pos + u64::from(s.len));
        pos = end;
        let (a, b) = (start.max(from), end.min(to));
        if a < b {
            out.push(Seg { gpa: s.gpa + (a - start), len: (b - a) as u32 });
        }
    }
    out
}

/// Guest memory could not be read or written (outside RAM, or fewer bytes than needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("guest memory access outside RAM or beyond the request's buffers")]
pub struct GuestAccess;

/// Reads `buf.len()` bytes at byte position `at` of the concatenated segments.
pub fn gather<M: GuestMemoryBackend>(
    mem: &M,
    segs: &[Seg],
    at: u64,
    buf: &mut [u8],
) -> Result<(), GuestAccess> {
    let mut done = 0usize;
    for s in sub_segs(segs, at, at + buf.len() as u64) {
        let n = s.len as usize;
        mem.read_slice(&mut buf[done..done + n], GuestAddress(s.gpa)).map_err(|_| GuestAccess)?;
        done += n;
    }
    if done == buf.len() {
        Ok(())
    } else {
        Err(GuestAccess)
    }
}

/// Writes `data` at the start of the concatenated segments (as much as fits). Returns bytes written.
pub fn scatter<M: GuestMemoryBackend>(mem: &M, segs: &[Seg], data: &[u8]) -> Result<usize, GuestAccess> {
    let mut done = 0usize;
    for s in sub_segs(segs, 0, data.len() as u64) {
        let n = s.len as usize;
        mem.write_slice(&data[done..done + n], GuestAddress(s.gpa)).map_err(|_| GuestAccess)?;
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueOwnedT, QueueT};
    use vm_memory::GuestMemoryMmap;

    use smallvec::smallvec;

    use super::*;

    const W: u16 = VRING_DESC_F_WRITE as u16;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;

    fn geo() -> DiskGeometry {
        DiskGeometry {
            nsid: 1,
            lba_size: 512,
            size: 1 << 20,
            size_max: 65536,
            seg_max: 16,
            max_request: 1 << 20,
            read_only: false,
            num_queues: 1,
        }
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn header(mem: &GuestMemoryMmap, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    /// Builds the chain with the mock queue and parses what the real chain iterator yields.
    fn run(mem: &GuestMemoryMmap, descs: &[RawDescriptor], geo: &DiskGeometry) -> Parsed {
        let vq = MockSplitQueue::new(mem, 16);
        vq.build_desc_chain(descs).unwrap();
        parse_first(mem, &vq, geo)
    }

    fn parse_first(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
        geo: &DiskGeometry,
    ) -> Parsed {
        let mut q: Queue = vq.create_queue().unwrap();
        let (table, size) = (GuestAddress(q.desc_table()), q.size());
        let chain = q.iter(mem).unwrap().next().unwrap();
        let head = chain.head_index();
        let mut v = Vec::new();
        let truncated = collect(chain, &mut v);
        // Walking from the head index alone (resubmission) yields the very same descriptors.
        let mut w = Vec::new();
        let w_truncated = collect(walk_chain(mem, table, size, head), &mut w);
        let key = |d: &Descriptor| (d.addr().0, d.len(), d.flags(), d.next());
        assert_eq!(
            (w.iter().map(key).collect::<Vec<_>>(), w_truncated),
            (v.iter().map(key).collect::<Vec<_>>(), truncated),
            "walk_chain differs from the chain iterator"
        );
        parse(head, &v, truncated, mem, geo)
    }

    #[test]
    fn a_chain_longer_than_any_request_is_not_walked_to_its_end() {
        use std::cell::Cell;
        let yielded = Cell::new(0usize);
        let chain = (0..65535u32).map(|i| {
            yielded.set(yielded.get() + 1);
            Descriptor::new(0x1000 + u64::from(i) * 16, 16, VRING_DESC_F_NEXT as u16, 0)
        });
        let mut v = Vec::new();
        assert!(collect(chain, &mut v), "a chain cut at the limit is reported truncated");
        assert_eq!(v.len(), MAX_CHAIN);
        assert!(yielded.get() <= MAX_CHAIN + 1, "walked {} descriptors", yielded.get());
        // One that fits is collected whole.
        let fits = (0..MAX_CHAIN as u32).map(|i| {
            let flags = if i + 1 < MAX_CHAIN as u32 { VRING_DESC_F_NEXT as u16 } else { 0 };
            Descriptor::new(0x1000 + u64::from(i) * 16, 16, flags, 0)
        });
        assert!(!collect(fits, &mut v));
        assert_eq!(v.len(), MAX_CHAIN);
    }

    fn status_of(p: &Parsed) -> u8 {
        match &p.op {
            Ok(_) => 0,
            Err((s, _)) => *s,
        }
    }

    #[test]
    fn well_formed_read_and_write() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 8);
        let p = run(
            &m,
            &[desc(HDR, 16, 0), desc(DATA, 4096, W), desc(DATA + 8192, 512, W), desc(STATUS, 1, W)],
            &geo(),
        );
        assert_eq!(p.status, Some(STATUS));
        assert_eq!(
            p.op,
            Ok(Op::Read {
                offset: 4096,
                segs: smallvec![Seg { gpa: DATA, len: 4096 }, Seg { gpa: DATA + 8192, len: 512 }]
            })
        );
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let p = run(&m, &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)], &geo());
        assert_eq!(p.op, Ok(Op::Write { offset: 0, segs: smallvec![Seg { gpa: DATA, len: 1024 }] }));
    }

    #[test]
    fn any_layout_header_data_and_status_sharing_descriptors() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 2);
        // Header and data in one descriptor.
        let p = run(&m, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)], &geo());
        assert_eq!(p.op, Ok(Op::Write { offset: 1024, segs: smallvec![Seg { gpa: HDR + 16, len: 512 }] }));
        // Read data and status byte in one writable descriptor.
        header(&m, VIRTIO_BLK_T_IN, 0);
        let p = run(&m, &[desc(HDR, 16, 0), desc(DATA, 513, W)], &geo());
        assert_eq!(p.status, Some(DATA + 512));
        assert_eq!(p.op, Ok(Op::Read { offset: 0, segs: smallvec![Seg { gpa: DATA, len: 512 }] }));
    }

    #[test]
    fn bad_chains_get_ioerr_or_unsupp() {
        let m = mem();
        let g = geo();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let cases: Vec<(&str, Vec<RawDescriptor>, u8)> = vec![
            ("zero-length data", vec![desc(HDR, 16, 0), desc(DATA, 0, W), desc(STATUS, 1, W)], S_IOERR),
            (
                "data outside RAM",
                vec![desc(HDR, 16, 0), desc(0x3f_ff00, 512, W), desc(STATUS, 1, W)],
                S_IOERR,
            ),
            ("short header", vec![desc(HDR, 8, 0), desc(DATA, 512, W), desc(STATUS, 1, W)], S_IOERR),
            (
                "readable after writable",
                vec![desc(HDR, 16, 0), desc(DATA, 512, W), desc(DATA, 512, 0), desc(STATUS, 1, W)],
                S_IOERR,
            ),
            (
                "read with readable data",
                vec![desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
                S_IOERR,
            ),
            (
                "not a multiple of 512",
                vec![desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)],
                S_IOERR,
            ),
            (
                "oversized",
                vec![desc(HDR, 16, 0), desc(DATA, (1 << 20) + 512, W), desc(STATUS, 1, W)],
                S_IOERR,
            ),
        ];
        for (what, descs, want) in cases {
            let p = run(&m, &descs, &g);
            assert_eq!(status_of(&p), want, "{what}: {p:?}");
            assert_eq!(p.status, Some(STATUS), "{what}");
        }
        // Write that the status descriptor is readable: no status can be written.
        let p = run(&m, &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, 0)], &g);
        assert_eq!(p.status, None);
        assert!(p.op.is_err());
        // Status descriptor outside RAM.
        let p = run(&m, &[desc(HDR, 16, 0), desc(0x40_0000, 1, W)], &g);
        assert_eq!(p.status, None);
        // Past the end of the disk, and unknown type.
        header(&m, VIRTIO_BLK_T_IN, (1 << 20) / 512);
        assert_eq!(
            status_of(&run(&m, &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)], &g)),
            S_IOERR
        );
        header(&m, 99, 0);
        assert_eq!(status_of(&run(&m, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], &g)), S_UNSUPP);
        // Write on a read-only disk.
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let ro = DiskGeometry { read_only: true, ..g };
        assert_eq!(
            status_of(&run(&m, &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)], &ro)),
            S_IOERR
        );
        // 4 KiB LBAs: a 512-byte aligned but not 4 KiB aligned read.
        header(&m, VIRTIO_BLK_T_IN, 1);
        let g4k = DiskGeometry { lba_size: 4096, ..g };
        assert_eq!(
            status_of(&run(&m, &[desc(HDR, 16, 0), desc(DATA, 4096, W), desc(STATUS, 1, W)], &g4k)),
            S_IOERR
        );
    }

    #[test]
    fn descriptor_loop_is_refused() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&m, 16);
        // 0 -> 1 -> 2 -> 1 -> ...
        let n = VRING_DESC_F_NEXT as u16;
        let descs = [
            RawDescriptor::from(Descriptor::new(HDR, 16, n, 1)),
            RawDescriptor::from(Descriptor::new(DATA, 512, n | W, 2)),
            RawDescriptor::from(Descriptor::new(DATA + 512, 512, n | W, 1)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let p = parse_first(&m, &vq, &geo());
        assert_eq!(status_of(&p), S_IOERR);
        // Next index past the table.
        let vq = MockSplitQueue::new(&m, 16);
        let descs = [RawDescriptor::from(Descriptor::new(HDR, 16, n, 40))];
        vq.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(status_of(&parse_first(&m, &vq, &geo())), S_IOERR);
    }

    #[test]
    fn indirect_table_is_followed_and_nested_indirect_refused() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 0);
        let table = 0x38_0000u64;
        let n = VRING_DESC_F_NEXT as u16;
        let inner = [
            Descriptor::new(HDR, 16, n, 1),
            Descriptor::new(DATA, 512, n | W, 2),
            Descriptor::new(STATUS, 1, W, 0),
        ];
        for (i, d) in inner.iter().enumerate() {
            m.write_obj(RawDescriptor::from(*d), GuestAddress(table + 16 * i as u64)).unwrap();
        }
        let vq = MockSplitQueue::new(&m, 16);
        vq.add_desc_chains(
            &[RawDescriptor::from(Descriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0))],
            0,
        )
        .unwrap();
        let p = parse_first(&m, &vq, &geo());
        assert_eq!(p.op, Ok(Op::Read { offset: 0, segs: smallvec![Seg { gpa: DATA, len: 512 }] }));
        // An indirect descriptor inside the indirect table.
        m.write_obj(
            RawDescriptor::from(Descriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16 | n, 2)),
            GuestAddress(table + 16),
        )
        .unwrap();
        let p = parse_first(&m, &vq, &geo());
        assert!(p.op.is_err(), "{p:?}");
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let m = mem();
        let g = geo();
        let seg = |sector: u64, num: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&num.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            s
        };
        m.write_slice(&seg(8, 16, 0), GuestAddress(DATA)).unwrap();
        m.write_slice(&seg(100, 8, 0), GuestAddress(DATA + 16)).unwrap();
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        let p = run(&m, &[desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)], &g);
        assert_eq!(
            p.op,
            Ok(Op::Discard(vec![Range { offset: 4096, len: 8192 }, Range { offset: 51200, len: 4096 }]))
        );
        header(&m, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        m.write_slice(&seg(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), GuestAddress(DATA)).unwrap();
        let p = run(&m, &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)], &g);
        assert_eq!(p.op, Ok(Op::WriteZeroes(vec![Range { offset: 0, len: 512 }])));
        // Discard with the unmap flag: UNSUPP. Partial segment: IOERR.
        header(&m, VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(
            status_of(&run(&m, &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)], &g)),
            S_UNSUPP
        );
        assert_eq!(
            status_of(&run(&m, &[desc(HDR, 16, 0), desc(DATA, 24, 0), desc(STATUS, 1, W)], &g)),
            S_IOERR
        );
        // Past the end of the disk.
        m.write_slice(&seg(2047, 2, 0), GuestAddress(DATA)).unwrap();
        assert_eq!(
            status_of(&run(&m, &[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)], &g)),
            S_IOERR
        );
    }

    #[test]
    fn gather_and_scatter_across_segments() {
        let m = mem();
        let segs = [Seg { gpa: 0x1000, len: 3 }, Seg { gpa: 0x5000, len: 5 }];
        assert_eq!(scatter(&m, &segs, b"abcdefgh"), Ok(8));
        let mut b = [0u8; 4];
        gather(&m, &segs, 2, &mut b).unwrap();
        assert_eq!(&b, b"cdef");
        assert!(gather(&m, &segs, 6, &mut b).is_err());
    }
}
