//! Vectored requests: their segment lists, cut into device-sized pieces, and the bounce
//! buffers for pieces the device cannot reach as they are.
//!
//! When the I/O thread takes a vectored entry it copies the segment list out of client memory
//! once, into a slot of the [`VecPool`] (preallocated: no allocation per request), and checks
//! every segment. The slot lives until the request completes: pieces are built from it as
//! device slots free up, bounced reads are copied back through it, and at completion it says
//! which buffers to release. Each piece goes to the device with PRPs or SGLs pointing straight
//! into client memory when the layout and the controller allow it, else through a slot of the
//! [`BouncePool`] (broker DMA memory): filled before a write is submitted, emptied after a
//! read completes and before its completion is posted.

use nvmed_proto::shm::SharedMemory;
use nvmed_proto::MAX_SEGMENTS;

use crate::device::NvmeDevice;
use crate::iova::{DmaMemory, IovaError, IovaSpace};
use crate::nvme::vector::{self, walk};
use crate::nvme::{Cursor, DmaSeg, IoQueue, RwCommand, SglSupport, Transfer};

use super::split::InFlight;
use crate::broker::session::{bump, BrokerCounters, BufferTable, SessionCounters};

/// Vectored requests one I/O thread keeps in flight at once (all its rings together; each thread
/// has its own pool).
pub const VEC_SLOTS: usize = 256;
/// No segment list: a plain request.
pub const VEC_NONE: u32 = u32::MAX;
/// No bounce slot: the device reaches client memory directly.
pub const NO_BOUNCE: u16 = u16::MAX;
/// Bytes of bounce memory the broker sets aside (at least two device-sized slots).
pub const BOUNCE_BYTES: u64 = 4 << 20;
/// Most bounce slots, whatever the transfer size.
const MAX_BOUNCE_SLOTS: u64 = 64;

/// Segment lists of the vectored requests in flight, in one preallocated array.
pub struct VecPool {
    segs: Box<[DmaSeg]>,
    counts: Box<[u16]>,
    free: Vec<u32>,
}

impl VecPool {
    /// `slots` lists of up to [`MAX_SEGMENTS`] segments each.
    pub fn new(slots: usize) -> Self {
        Self {
            segs: vec![DmaSeg::default(); slots * usize::from(MAX_SEGMENTS)].into_boxed_slice(),
            counts: vec![0; slots].into_boxed_slice(),
            free: (0..slots as u32).rev().collect(),
        }
    }

    /// Slots not in use.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// All slots.
    pub fn capacity(&self) -> usize {
        self.counts.len()
    }

    /// Takes a slot.
    pub fn alloc(&mut self) -> Option<u32> {
        self.free.pop()
    }

    /// Gives a slot back.
    pub fn release(&mut self, slot: u32) {
        self.counts[slot as usize] = 0;
        self.free.push(slot);
    }

    /// The whole slot, to fill (then [`VecPool::set_count`]).
    pub fn slot_mut(&mut self, slot: u32) -> &mut [DmaSeg] {
        let start = slot as usize * usize::from(MAX_SEGMENTS);
        &mut self.segs[start..start + usize::from(MAX_SEGMENTS)]
    }

    /// Records how many segments of the slot are valid.
    pub fn set_count(&mut self, slot: u32, count: u16) {
        self.counts[slot as usize] = count;
    }

    /// The segments of a slot.
    pub fn segs(&self, slot: u32) -> &[DmaSeg] {
        let start = slot as usize * usize::from(MAX_SEGMENTS);
        &self.segs[start..start + usize::from(self.counts[slot as usize])]
    }
}

/// Broker DMA memory for pieces the device cannot reach in client memory: equal slots of one
/// device transfer each, allocated once when the broker starts.
pub struct BouncePool {
    mem: DmaMemory,
    slot_size: u32,
    free: Vec<u16>,
    slots: u16,
}

impl BouncePool {
    /// Slots of `max_transfer` bytes, [`BOUNCE_BYTES`] in all (at least two slots).
    pub fn new(
        space: &std::sync::Arc<IovaSpace>,
        device: &std::sync::Arc<dyn NvmeDevice>,
        max_transfer: u32,
    ) -> Result<Self, IovaError> {
        let slot_size = max_transfer.next_multiple_of(crate::nvme::prp::PAGE as u32);
        let slots = (BOUNCE_BYTES / u64::from(slot_size)).clamp(2, MAX_BOUNCE_SLOTS) as u16;
        let mem = DmaMemory::new(space, device, usize::from(slots) * slot_size as usize)?;
        Ok(Self { mem, slot_size, free: (0..slots).rev().collect(), slots })
    }

    /// Slots not in use.
    pub fn available(&self) -> usize {
        self.free.len()
    }

    /// All slots.
    pub fn capacity(&self) -> usize {
        usize::from(self.slots)
    }

    fn alloc(&mut self) -> Option<u16> {
        self.free.pop()
    }

    /// Gives a slot back (its piece completed or was abandoned).
    pub fn release(&mut self, slot: u16) {
        self.free.push(slot);
    }

    fn offset(&self, slot: u16) -> usize {
        usize::from(slot) * self.slot_size as usize
    }
}

/// A vectored request's pieces and what is left to submit.
#[derive(Debug, Clone, Copy)]
pub struct VecWork {
    /// The device command of the whole request (pieces are cut from it).
    pub rw: RwCommand,
    /// Bytes of the whole request.
    pub len: u32,
    /// Where the next piece starts in the segment list.
    pub cursor: Cursor,
}

/// Why a piece was not submitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    /// The device queue is full.
    Queue,
    /// Every bounce slot is in use: wait for a bounced piece to complete.
    Bounce,
}

/// What submitting a vectored piece needs besides the queue.
pub struct VecIo<'a> {
    /// Segment lists.
    pub vecs: &'a mut VecPool,
    /// Bounce buffers.
    pub bounce: &'a mut BouncePool,
    /// The controller's SGL support.
    pub sgl: SglSupport,
    /// Room for one piece's device runs.
    pub scratch: &'a mut [DmaSeg],
    /// Broker-wide counters.
    pub counters: &'a BrokerCounters,
}

/// Host memory of `len` bytes at offset `off` of segment `s`: the buffer mapping, offset, and
/// whether copies must go through the kernel ([`RegisteredBuffer::fault_safe`]).
///
/// [`RegisteredBuffer::fault_safe`]: crate::broker::buffer::RegisteredBuffer::fault_safe
fn host<'b>(buffers: &'b BufferTable, s: &DmaSeg, off: u32) -> Option<(&'b SharedMemory, usize, bool)> {
    let b = &buffers.get(s.tag)?.buffer;
    Some((b.mem(), (s.iova - b.iova() + u64::from(off)) as usize, b.fault_safe()))
}

impl VecIo<'_> {
    /// Submits piece `k` (of `max_transfer` bytes, the last one shorter) of a vectored request,
    /// with PRPs or SGLs into client memory if possible, else through a bounce slot (filled
    /// first for a write). Advances the work's cursor once the piece is at the device.
    #[allow(clippy::too_many_arguments)]
    pub fn submit_piece(
        &mut self,
        queue: &mut IoQueue<InFlight>,
        work: &mut VecWork,
        k: u32,
        max_transfer: u32,
        ctx: InFlight,
        buffers: &BufferTable,
        session: &SessionCounters,
    ) -> Result<(), Blocked> {
        if queue.free_slots() == 0 {
            return Err(Blocked::Queue);
        }
        let first = k * max_transfer;
        let piece_len = max_transfer.min(work.len - first);
        let block = work.len / work.rw.blocks;
        let rw =
            RwCommand { slba: work.rw.slba + u64::from(first / block), blocks: piece_len / block, ..work.rw };
        let segs = self.vecs.segs(ctx.vec);
        let runs = vector::gather(segs, work.cursor, piece_len, self.scratch);
        let transfer = runs.map_or(Transfer::Bounce, |n| vector::choose(&self.scratch[..n], self.sgl));
        let ctx = InFlight { at: work.cursor, piece_len, ..ctx };
        match transfer {
            Transfer::Prp | Transfer::Sgl => {
                let n = runs.unwrap_or(0);
                queue.submit_rw(&rw, &self.scratch[..n], transfer, ctx).map_err(|_| Blocked::Queue)?;
                let counter = if transfer == Transfer::Sgl {
                    &self.counters.sgl_commands
                } else {
                    &self.counters.vectored_prp_commands
                };
                bump(counter, 1);
            }
            Transfer::Bounce => {
                let slot = self.bounce.alloc().ok_or(Blocked::Bounce)?;
                let base = self.bounce.offset(slot);
                if rw.write {
                    let mut pos = base;
                    let slot_mem = self.bounce.mem.mem();
                    walk(segs, work.cursor, piece_len, |s, off, n| {
                        if let Some((mem, at, fault_safe)) = host(buffers, s, off) {
                            if !fault_safe {
                                mem.copy_to(at, slot_mem, pos, n as usize);
                            } else if mem.copy_to_fault_safe(at, slot_mem, pos, n as usize).is_err() {
                                // A hole in the client's hugetlb buffer: zeros are written, never
                                // what an earlier request (maybe another tenant's) left here.
                                slot_mem.fill(pos, n as usize, 0);
                            }
                        }
                        pos += n as usize;
                    });
                }
                let run =
                    [DmaSeg { iova: self.bounce.mem.iova() + base as u64, len: piece_len, tag: u32::MAX }];
                if queue.submit_rw(&rw, &run, Transfer::Prp, InFlight { bounce: slot, ..ctx }).is_err() {
                    self.bounce.release(slot);
                    return Err(Blocked::Queue);
                }
                bump(&self.counters.bounced_bytes, u64::from(piece_len));
                bump(&session.bounced_bytes, u64::from(piece_len));
            }
        }
        work.cursor = walk(segs, work.cursor, piece_len, |_, _, _| {});
        Ok(())
    }
}

/// A bounced piece is finished: for a successful read, copies its data from the bounce slot
/// into the client's segments (before the completion is posted); then frees the slot. Returns
/// false when the data could not be copied (a hole in a hugetlb buffer).
pub fn finish_bounce(
    ctx: &InFlight,
    success: bool,
    vecs: &VecPool,
    bounce: &mut BouncePool,
    buffers: Option<&BufferTable>,
) -> bool {
    if ctx.bounce == NO_BOUNCE {
        return true;
    }
    let mut copied = true;
    if let (true, true, Some(buffers)) = (success, ctx.op.is_read(), buffers) {
        let mut pos = bounce.offset(ctx.bounce);
        let slot_mem = bounce.mem.mem();
        walk(vecs.segs(ctx.vec), ctx.at, ctx.piece_len, |s, off, n| {
            if let Some((mem, at, fault_safe)) = host(buffers, s, off) {
                if !fault_safe {
                    slot_mem.copy_to(pos, mem, at, n as usize);
                } else if slot_mem.copy_to_fault_safe(pos, mem, at, n as usize).is_err() {
                    copied = false;
                }
            }
            pos += n as usize;
        });
    }
    bounce.release(ctx.bounce);
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_slots_come_and_go() {
        let mut p = VecPool::new(3);
        let a = p.alloc().unwrap();
        let b = p.alloc().unwrap();
        p.slot_mut(a)[..2].copy_from_slice(&[DmaSeg { iova: 1, len: 2, tag: 3 }; 2]);
        p.set_count(a, 2);
        assert_eq!(p.segs(a).len(), 2);
        assert_eq!(p.segs(b).len(), 0);
        assert_eq!(p.available(), 1);
        p.release(a);
        assert_eq!(p.segs(a).len(), 0);
        assert_eq!((p.available(), p.capacity()), (2, 3));
    }
}
