//! One submission/completion queue pair in broker DMA memory.

use std::sync::Arc;

use crate::device::NvmeDevice;
use crate::iova::{DmaMemory, IovaError, IovaSpace};
use crate::nvme::spec::{doorbell_offset, NvmeCommand, NvmeCompletion};

/// An SQ/CQ pair: the SQ written by the driver, the CQ written by the controller.
pub struct QueuePair {
    device: Arc<dyn NvmeDevice>,
    qid: u16,
    depth: u16,
    sq: DmaMemory,
    cq: DmaMemory,
    sq_tail: u16,
    sq_tail_rung: u16,
    cq_head: u16,
    phase: bool,
    sq_doorbell: u64,
    cq_doorbell: u64,
}

impl QueuePair {
    /// Allocates both queues of `depth` entries in the internal IOVA area.
    pub fn new(
        device: &Arc<dyn NvmeDevice>,
        space: &Arc<IovaSpace>,
        qid: u16,
        depth: u16,
        dstrd: u32,
    ) -> Result<Self, IovaError> {
        let sq = DmaMemory::new(space, device, usize::from(depth) * size_of::<NvmeCommand>())?;
        let cq = DmaMemory::new(space, device, usize::from(depth) * size_of::<NvmeCompletion>())?;
        Ok(Self {
            device: device.clone(),
            qid,
            depth,
            sq,
            cq,
            sq_tail: 0,
            sq_tail_rung: 0,
            cq_head: 0,
            phase: true,
            sq_doorbell: doorbell_offset(qid, false, dstrd),
            cq_doorbell: doorbell_offset(qid, true, dstrd),
        })
    }

    /// Forgets all state after a controller reset: empty queues, phase 1, zeroed CQ.
    pub fn reset(&mut self) {
        self.sq_tail = 0;
        self.sq_tail_rung = 0;
        self.cq_head = 0;
        self.phase = true;
        self.cq.mem().fill(0, self.cq.mem().len(), 0);
    }

    /// Queue id.
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Entries per queue.
    pub fn depth(&self) -> u16 {
        self.depth
    }
    /// Device address of the SQ.
    pub fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }
    /// Device address of the CQ.
    pub fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }

    /// Writes a command into the next SQ slot. The caller keeps at most `depth - 1` commands
    /// outstanding (command ids are limited to that), so the SQ cannot overflow.
    pub fn push(&mut self, cmd: &NvmeCommand) {
        let off = usize::from(self.sq_tail) * size_of::<NvmeCommand>();
        self.sq.mem().write(off, *cmd);
        self.sq_tail = (self.sq_tail + 1) % self.depth;
    }

    /// Tells the controller about pushed commands (one doorbell write for the batch).
    pub fn ring_doorbell(&mut self) {
        if self.sq_tail != self.sq_tail_rung {
            crate::nvme::barrier::dma_wmb();
            self.device.write32(self.sq_doorbell, u32::from(self.sq_tail));
            self.sq_tail_rung = self.sq_tail;
        }
    }

    /// Whether the controller has posted a completion not yet reaped.
    pub fn has_completion(&self) -> bool {
        self.peek().is_some()
    }

    fn peek(&self) -> Option<NvmeCompletion> {
        let off = usize::from(self.cq_head) * size_of::<NvmeCompletion>();
        let c: NvmeCompletion = self.cq.mem().read(off);
        (c.phase() == self.phase).then(|| {
            crate::nvme::barrier::dma_rmb();
            // Re-read after the fence so the whole entry is the one the phase bit vouched for.
            self.cq.mem().read(off)
        })
    }

    /// Hands up to `max` new completions to `f`, then writes the CQ head doorbell once.
    pub fn reap(&mut self, max: usize, mut f: impl FnMut(NvmeCompletion)) -> usize {
        let mut n = 0;
        while n < max {
            let Some(c) = self.peek() else { break };
            self.cq_head += 1;
            if self.cq_head == self.depth {
                self.cq_head = 0;
                self.phase = !self.phase;
            }
            n += 1;
            f(c);
        }
        if n > 0 {
            self.device.write32(self.cq_doorbell, u32::from(self.cq_head));
        }
        n
    }
}
