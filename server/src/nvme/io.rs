//! An I/O queue pair with command ids, per-command PRP list pages and completion dispatch.

use std::sync::Arc;

use slab::Slab;

use crate::device::NvmeDevice;
use crate::iova::{DmaMemory, IovaError, IovaSpace};
use crate::nvme::prp;
use crate::nvme::queue::QueuePair;
use crate::nvme::spec::{io, sgl, NvmeCommand};
use crate::nvme::vector::{self, DmaSeg, Transfer};

/// A read or write whose data is described separately (see [`IoQueue::submit_rw`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RwCommand {
    /// Write (else read).
    pub write: bool,
    /// Namespace.
    pub nsid: u32,
    /// Starting LBA.
    pub slba: u64,
    /// Number of LBAs (1-based).
    pub blocks: u32,
    /// Force unit access (writes).
    pub fua: bool,
}

/// One I/O command, in device terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoCommand {
    /// Read `blocks` LBAs at `slba` into `len` bytes at `iova`.
    Read {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of LBAs (1-based).
        blocks: u32,
        /// Destination.
        iova: u64,
        /// Bytes.
        len: u32,
    },
    /// Write `blocks` LBAs at `slba` from `len` bytes at `iova`.
    Write {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of LBAs (1-based).
        blocks: u32,
        /// Source.
        iova: u64,
        /// Bytes.
        len: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Flush the namespace.
    Flush {
        /// Namespace.
        nsid: u32,
    },
    /// Write zeroes over `blocks` LBAs.
    WriteZeroes {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of LBAs (1-based, at most 65536).
        blocks: u32,
        /// Force unit access.
        fua: bool,
    },
    /// Deallocate `blocks` LBAs (Dataset Management, one range).
    Deallocate {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of LBAs (1-based).
        blocks: u32,
    },
}

impl IoCommand {
    /// How many commands of at most `max_bytes` each this command becomes.
    pub fn piece_count(&self, max_bytes: u32) -> u32 {
        match *self {
            IoCommand::Read { len, .. } | IoCommand::Write { len, .. } => len.div_ceil(max_bytes).max(1),
            _ => 1,
        }
    }

    /// Piece `k` of [`IoCommand::piece_count`]: consecutive blocks, consecutive memory.
    /// `max_bytes` must be a multiple of the block size.
    pub fn piece(&self, k: u32, max_bytes: u32) -> IoCommand {
        let cut = |slba: u64, blocks: u32, iova: u64, len: u32| {
            let block = len / blocks;
            let per = max_bytes / block;
            let first = k * per;
            let n = per.min(blocks - first);
            (slba + u64::from(first), n, iova + u64::from(first) * u64::from(block), n * block)
        };
        match *self {
            IoCommand::Read { nsid, slba, blocks, iova, len } if len > max_bytes => {
                let (slba, blocks, iova, len) = cut(slba, blocks, iova, len);
                IoCommand::Read { nsid, slba, blocks, iova, len }
            }
            IoCommand::Write { nsid, slba, blocks, iova, len, fua } if len > max_bytes => {
                let (slba, blocks, iova, len) = cut(slba, blocks, iova, len);
                IoCommand::Write { nsid, slba, blocks, iova, len, fua }
            }
            other => other,
        }
    }
}

/// An I/O queue pair whose command ids index a slab of per-command context `T`.
pub struct IoQueue<T> {
    qp: QueuePair,
    lists: DmaMemory,
    slots: Slab<T>,
    capacity: usize,
}

impl<T> IoQueue<T> {
    /// Wraps a created queue pair; allocates one PRP list page per command id.
    pub fn new(
        qp: QueuePair,
        device: &Arc<dyn NvmeDevice>,
        space: &Arc<IovaSpace>,
    ) -> Result<Self, IovaError> {
        let capacity = usize::from(qp.depth()) - 1;
        let lists = DmaMemory::new(space, device, capacity * prp::PAGE as usize)?;
        Ok(Self { qp, lists, slots: Slab::with_capacity(capacity), capacity })
    }

    /// Commands that can still be submitted.
    pub fn free_slots(&self) -> usize {
        self.capacity - self.slots.len()
    }

    /// Commands at the device.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Builds and queues `cmd`; gives `ctx` back if the queue is full.
    pub fn submit(&mut self, cmd: &IoCommand, ctx: T) -> Result<(), T> {
        if self.slots.len() >= self.capacity {
            return Err(ctx);
        }
        let cid = self.slots.insert(ctx);
        let list_off = cid * prp::PAGE as usize;
        let list_iova = self.lists.iova() + list_off as u64;
        let mut c = NvmeCommand { cid: cid as u16, ..Default::default() };
        match *cmd {
            IoCommand::Read { nsid, slba, blocks, iova, len }
            | IoCommand::Write { nsid, slba, blocks, iova, len, .. } => {
                let (p1, p2) = prp::build(iova, u64::from(len), self.lists.mem(), list_off, list_iova);
                c.opcode = if matches!(cmd, IoCommand::Read { .. }) { io::READ } else { io::WRITE };
                c.nsid = nsid;
                c.prp1 = p1;
                c.prp2 = p2;
                c.cdw10 = slba as u32;
                c.cdw11 = (slba >> 32) as u32;
                c.cdw12 = blocks - 1;
                if let IoCommand::Write { fua: true, .. } = cmd {
                    c.cdw12 |= io::CDW12_FUA;
                }
            }
            IoCommand::Flush { nsid } => {
                c.opcode = io::FLUSH;
                c.nsid = nsid;
            }
            IoCommand::WriteZeroes { nsid, slba, blocks, fua } => {
                c.opcode = io::WRITE_ZEROES;
                c.nsid = nsid;
                c.cdw10 = slba as u32;
                c.cdw11 = (slba >> 32) as u32;
                c.cdw12 = (blocks - 1) | if fua { io::CDW12_FUA } else { 0 };
            }
            IoCommand::Deallocate { nsid, slba, blocks } => {
                // One range descriptor {context attributes, length in LBAs, starting LBA}.
                self.lists.mem().write::<u32>(list_off, 0);
                self.lists.mem().write::<u32>(list_off + 4, blocks);
                self.lists.mem().write::<u64>(list_off + 8, slba);
                c.opcode = io::DSM;
                c.nsid = nsid;
                c.prp1 = list_iova;
                c.cdw10 = 0;
                c.cdw11 = io::DSM_DEALLOCATE;
            }
        }
        self.qp.push(&c);
        Ok(())
    }

    /// Builds and queues a read or write whose data is `segs`, described with PRPs or SGLs as
    /// `transfer` says (which must fit: [`vector::choose`]); gives `ctx` back if the queue is
    /// full. The PRP or SGL list goes into the command's own list page.
    pub fn submit_rw(
        &mut self,
        cmd: &RwCommand,
        segs: &[DmaSeg],
        transfer: Transfer,
        ctx: T,
    ) -> Result<(), T> {
        debug_assert!(transfer != Transfer::Bounce, "bounce before submitting");
        if self.slots.len() >= self.capacity {
            return Err(ctx);
        }
        let cid = self.slots.insert(ctx);
        let list_off = cid * prp::PAGE as usize;
        let list_iova = self.lists.iova() + list_off as u64;
        let (p1, p2, flags) = match transfer {
            Transfer::Sgl => {
                let (p1, p2) = vector::build_sgl(segs, self.lists.mem(), list_off, list_iova);
                (p1, p2, sgl::PSDT_SGL)
            }
            _ => {
                let (p1, p2) = prp::build_segments(segs, self.lists.mem(), list_off, list_iova);
                (p1, p2, 0)
            }
        };
        let mut c = NvmeCommand {
            opcode: if cmd.write { io::WRITE } else { io::READ },
            flags,
            cid: cid as u16,
            nsid: cmd.nsid,
            prp1: p1,
            prp2: p2,
            cdw10: cmd.slba as u32,
            cdw11: (cmd.slba >> 32) as u32,
            cdw12: cmd.blocks - 1,
            ..Default::default()
        };
        if cmd.write && cmd.fua {
            c.cdw12 |= io::CDW12_FUA;
        }
        self.qp.push(&c);
        Ok(())
    }

    /// Rings the SQ doorbell for everything queued since the last call.
    pub fn ring_doorbell(&mut self) {
        self.qp.ring_doorbell();
    }

    /// Whether a completion waits to be reaped.
    pub fn has_completion(&self) -> bool {
        self.qp.has_completion()
    }

    /// Hands up to `max` completions to `f` as (context, NVMe status field, result dword).
    /// A completion with an unknown command id is logged and dropped.
    pub fn reap(&mut self, max: usize, mut f: impl FnMut(T, u16, u32)) -> usize {
        let slots = &mut self.slots;
        self.qp.reap(max, |c| match slots.try_remove(usize::from(c.cid)) {
            Some(ctx) => f(ctx, c.status_field(), c.result),
            None => tracing::error!(cid = c.cid, "completion for a command id not in flight"),
        })
    }

    /// Removes every in-flight context (after the controller was reset and will never complete them).
    pub fn abandon_all(&mut self) -> Vec<T> {
        self.slots.drain().collect()
    }

    /// Contexts of the commands at the device.
    pub fn in_flight_contexts(&self) -> impl Iterator<Item = &T> {
        self.slots.iter().map(|(_, c)| c)
    }

    /// The queue pair, for deletion.
    pub fn into_queue_pair(self) -> QueuePair {
        self.qp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_command_exactly() {
        let cmd = IoCommand::Read { nsid: 1, slba: 100, blocks: 2500, iova: 0x10_0200, len: 2500 * 512 };
        let max = 512 * 1024;
        assert_eq!(cmd.piece_count(max), 3);
        let pieces: Vec<_> = (0..3).map(|k| cmd.piece(k, max)).collect();
        assert_eq!(
            pieces[0],
            IoCommand::Read { nsid: 1, slba: 100, blocks: 1024, iova: 0x10_0200, len: 512 * 1024 }
        );
        assert_eq!(
            pieces[1],
            IoCommand::Read {
                nsid: 1,
                slba: 1124,
                blocks: 1024,
                iova: 0x10_0200 + 0x8_0000,
                len: 512 * 1024
            }
        );
        assert_eq!(
            pieces[2],
            IoCommand::Read { nsid: 1, slba: 2148, blocks: 452, iova: 0x10_0200 + 0x10_0000, len: 452 * 512 }
        );
        let small = IoCommand::Write { nsid: 1, slba: 0, blocks: 8, iova: 0x1000, len: 4096, fua: true };
        assert_eq!((small.piece_count(max), small.piece(0, max)), (1, small));
        assert_eq!(IoCommand::Flush { nsid: 1 }.piece_count(max), 1);
    }
}
