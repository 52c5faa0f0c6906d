//! An I/O queue pair with command ids, per-command PRP list pages, completion dispatch, and
//! the driver's retries.
//!
//! The queue keeps a copy of every command at the device (its 64 bytes; its PRP or SGL list
//! stays in the command's own list page until it completes), so it can send it again:
//! - a completion with a retryable status (DNR clear: e.g. Namespace Not Ready, Command Abort
//!   Requested) is not reported; the command goes out again after a backoff (1 ms, doubling),
//!   until it has been sent [`RetryPolicy::max_tries`] times;
//! - after a controller reset, [`IoQueue::restart`] sends every command that was at the device
//!   again on the queue pair created anew at the same addresses, keeping its command id, its
//!   context and its data: the caller sees latency, not an error.
//!
//! Timeouts count in epochs the caller advances ([`IoQueue::set_epoch`]); a command sent again
//! starts a new timeout.

use std::sync::Arc;
use std::time::{Duration, Instant};

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
        /// Most LBAs one device command may zero (the controller's WZSL, at most 65536): a
        /// larger command becomes several ([`IoCommand::piece_count`]). Not sent to the device.
        piece_blocks: u32,
    },
    /// Deallocate `blocks` LBAs (Dataset Management, one range).
    Deallocate {
        /// Namespace.
        nsid: u32,
        /// Starting LBA.
        slba: u64,
        /// Number of LBAs (1-based).
        blocks: u32,
        /// Most LBAs one range may cover (the controller's DMRSL; `u32::MAX` if it sets none):
        /// a larger command becomes several ([`IoCommand::piece_count`]). Not sent to the device.
        piece_blocks: u32,
    },
}

impl IoCommand {
    /// How many commands this command becomes: reads and writes of at most `max_bytes` each,
    /// Write Zeroes and Deallocate of at most their `piece_blocks` LBAs each.
    pub fn piece_count(&self, max_bytes: u32) -> u32 {
        match *self {
            IoCommand::Read { len, .. } | IoCommand::Write { len, .. } => len.div_ceil(max_bytes).max(1),
            IoCommand::WriteZeroes { blocks, piece_blocks, .. }
            | IoCommand::Deallocate { blocks, piece_blocks, .. } => {
                blocks.div_ceil(piece_blocks.max(1)).max(1)
            }
            IoCommand::Flush { .. } => 1,
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
            IoCommand::WriteZeroes { nsid, slba, blocks, fua, piece_blocks }
                if blocks > piece_blocks.max(1) =>
            {
                let (slba, blocks) = cut_blocks(k, slba, blocks, piece_blocks.max(1));
                IoCommand::WriteZeroes { nsid, slba, blocks, fua, piece_blocks }
            }
            IoCommand::Deallocate { nsid, slba, blocks, piece_blocks } if blocks > piece_blocks.max(1) => {
                let (slba, blocks) = cut_blocks(k, slba, blocks, piece_blocks.max(1));
                IoCommand::Deallocate { nsid, slba, blocks, piece_blocks }
            }
            other => other,
        }
    }
}

/// Piece `k` of `blocks` LBAs from `slba` cut every `per` LBAs: (its first LBA, its LBAs).
fn cut_blocks(k: u32, slba: u64, blocks: u32, per: u32) -> (u64, u32) {
    let first = u64::from(k) * u64::from(per);
    (slba + first, per.min(blocks - first as u32))
}

/// How the driver retries commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Most times one command is sent (1: never again).
    pub max_tries: u8,
    /// Wait before the first retry of a retryable status (doubling with each try, at most
    /// [`MAX_BACKOFF`]).
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { max_tries: 6, backoff: Duration::from_millis(1) }
    }
}

/// Longest wait before a retry.
pub const MAX_BACKOFF: Duration = Duration::from_millis(100);

/// Do Not Retry, in a completion's status field.
pub const STATUS_DNR: u16 = 1 << 14;

/// Whether a completion status field is an error the host may try again.
pub fn retryable(status_field: u16) -> bool {
    status_field & 0x7ff != 0 && status_field & STATUS_DNR == 0
}

/// What the queue keeps of a command at the device.
#[derive(Debug, Clone, Copy, Default)]
struct Sent {
    cmd: NvmeCommand,
    /// Times sent.
    tries: u8,
    /// Timeout epoch of the last sending.
    epoch: u32,
    /// An Abort was asked for it (since the last sending).
    abort_sent: bool,
    /// Waiting for its retry (not at the device).
    waiting: bool,
}

/// A command at the device longer than the timeout (see [`IoQueue::overdue`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overdue {
    /// Its command id.
    pub cid: u16,
    /// An Abort was already asked for it, a timeout ago or more.
    pub abort_sent: bool,
}

/// An I/O queue pair whose command ids index a slab of per-command context `T`.
pub struct IoQueue<T> {
    qp: QueuePair,
    lists: DmaMemory,
    slots: Slab<T>,
    capacity: usize,
    sent: Box<[Sent]>,
    /// Commands waiting for their retry, and when it is due.
    retries: Vec<(u16, Instant)>,
    policy: RetryPolicy,
    epoch: u32,
    retried: u64,
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
        Ok(Self {
            qp,
            lists,
            slots: Slab::with_capacity(capacity),
            capacity,
            sent: vec![Sent::default(); capacity].into_boxed_slice(),
            retries: Vec::new(),
            policy: RetryPolicy::default(),
            epoch: 0,
            retried: 0,
        })
    }

    /// Sets how commands are retried.
    pub fn set_retry_policy(&mut self, policy: RetryPolicy) {
        self.policy = RetryPolicy { max_tries: policy.max_tries.max(1), ..policy };
    }

    /// Advances the timeout clock (commands sent from now on carry `epoch`).
    pub fn set_epoch(&mut self, epoch: u32) {
        self.epoch = epoch;
    }

    /// Commands sent again so far (retryable statuses and resets).
    pub fn retried(&self) -> u64 {
        self.retried
    }

    /// Records command `cid` as sent for the first time and queues it.
    fn send_first(&mut self, cid: usize, c: &NvmeCommand) {
        self.sent[cid] = Sent { cmd: *c, tries: 1, epoch: self.epoch, abort_sent: false, waiting: false };
        self.qp.push(c);
    }

    /// Queues command `cid` again.
    fn send_again(&mut self, cid: usize) {
        let s = &mut self.sent[cid];
        s.tries = s.tries.saturating_add(1);
        s.epoch = self.epoch;
        s.abort_sent = false;
        s.waiting = false;
        self.retried += 1;
        self.qp.push(&s.cmd);
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
            IoCommand::WriteZeroes { nsid, slba, blocks, fua, .. } => {
                c.opcode = io::WRITE_ZEROES;
                c.nsid = nsid;
                c.cdw10 = slba as u32;
                c.cdw11 = (slba >> 32) as u32;
                c.cdw12 = (blocks - 1) | if fua { io::CDW12_FUA } else { 0 };
            }
            IoCommand::Deallocate { nsid, slba, blocks, .. } => {
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
        self.send_first(cid, &c);
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
        self.send_first(cid, &c);
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
    /// A retryable error of a command that may be sent again is not handed over: the command
    /// waits for its retry (see [`IoQueue::resubmit_due`]). A completion with an unknown
    /// command id is logged and dropped.
    pub fn reap(&mut self, max: usize, mut f: impl FnMut(T, u16, u32)) -> usize {
        let slots = &mut self.slots;
        let sent = &mut self.sent;
        let retries = &mut self.retries;
        let policy = self.policy;
        self.qp.reap(max, |c| {
            let cid = usize::from(c.cid);
            if !slots.contains(cid) || sent[cid].waiting {
                tracing::error!(cid = c.cid, "completion for a command id not in flight");
                return;
            }
            let status = c.status_field();
            let s = &mut sent[cid];
            if retryable(status) && s.tries < policy.max_tries {
                let wait = policy.backoff.saturating_mul(1 << (s.tries - 1).min(16)).min(MAX_BACKOFF);
                tracing::debug!(
                    cid,
                    status = format_args!("{status:#x}"),
                    tries = s.tries,
                    "retryable status; trying again"
                );
                s.waiting = true;
                retries.push((c.cid, Instant::now() + wait));
                return;
            }
            f(slots.remove(cid), status, c.result)
        })
    }

    /// Sends again the commands whose retry is due at `now`; returns how many (ring the
    /// doorbell afterwards).
    pub fn resubmit_due(&mut self, now: Instant) -> usize {
        let mut n = 0;
        let mut i = 0;
        while i < self.retries.len() {
            if self.retries[i].1 <= now {
                let (cid, _) = self.retries.swap_remove(i);
                self.send_again(usize::from(cid));
                n += 1;
            } else {
                i += 1;
            }
        }
        n
    }

    /// Sends none of the commands waiting for their retry, ever (a controller given up without
    /// confirming it stopped gets no more commands); they stay in flight, never completed.
    pub fn drop_retries(&mut self) {
        self.retries.clear();
    }

    /// Whether commands wait for their retry.
    pub fn has_retries(&self) -> bool {
        !self.retries.is_empty()
    }

    /// When the next retry is due, if one waits.
    pub fn next_retry(&self) -> Option<Instant> {
        self.retries.iter().map(|r| r.1).min()
    }

    /// Commands at the device (not waiting for a retry) sent more than `limit` epochs ago.
    pub fn overdue(&self, limit: u32) -> impl Iterator<Item = Overdue> + '_ {
        self.slots.iter().filter_map(move |(cid, _)| {
            let s = &self.sent[cid];
            (!s.waiting && self.epoch.wrapping_sub(s.epoch) > limit)
                .then_some(Overdue { cid: cid as u16, abort_sent: s.abort_sent })
        })
    }

    /// Notes that an Abort was asked for command `cid`: its timeout starts again, and if it is
    /// overdue once more, [`Overdue::abort_sent`] says so.
    pub fn abort_sent(&mut self, cid: u16) {
        if let Some(s) = self.sent.get_mut(usize::from(cid)) {
            s.abort_sent = true;
            s.epoch = self.epoch;
        }
    }

    /// After a controller reset, once the queue pair was created again at the device
    /// ([`IoQueue::queue_pair_mut`], [`crate::nvme::Controller::recreate_io_queue`]): sends every
    /// command that was in flight again (those waiting for a retry too), except the ones sent
    /// [`RetryPolicy::max_tries`] times already, whose contexts are returned (finished: the
    /// device stopped, so it will not touch their memory any more).
    pub fn restart(&mut self) -> Vec<T> {
        self.retries.clear();
        let cids: Vec<usize> = self.slots.iter().map(|(cid, _)| cid).collect();
        let mut given_up = Vec::new();
        for cid in cids {
            if self.sent[cid].tries >= self.policy.max_tries {
                given_up.push(self.slots.remove(cid));
            } else {
                self.send_again(cid);
            }
        }
        self.qp.ring_doorbell();
        given_up
    }

    /// The queue pair (to create it again after a controller reset).
    pub fn queue_pair_mut(&mut self) -> &mut QueuePair {
        &mut self.qp
    }

    /// Removes every in-flight context (after the controller was reset and will never complete
    /// them, or is gone).
    pub fn abandon_all(&mut self) -> Vec<T> {
        self.retries.clear();
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

    #[test]
    fn write_zeroes_and_deallocate_pieces_follow_their_block_limits() {
        let wz = IoCommand::WriteZeroes { nsid: 2, slba: 10, blocks: 40, fua: true, piece_blocks: 16 };
        assert_eq!(wz.piece_count(4096), 3, "bytes do not matter here");
        let cut: Vec<_> = (0..3).map(|k| wz.piece(k, 4096)).collect();
        let at = |slba, blocks| IoCommand::WriteZeroes { nsid: 2, slba, blocks, fua: true, piece_blocks: 16 };
        assert_eq!(cut, [at(10, 16), at(26, 16), at(42, 8)]);
        let dsm = IoCommand::Deallocate { nsid: 1, slba: 0, blocks: u32::MAX, piece_blocks: u32::MAX };
        assert_eq!((dsm.piece_count(4096), dsm.piece(0, 4096)), (1, dsm));
        let dsm = IoCommand::Deallocate { nsid: 1, slba: 5, blocks: 7, piece_blocks: 3 };
        assert_eq!(dsm.piece_count(4096), 3);
        assert_eq!(
            dsm.piece(2, 4096),
            IoCommand::Deallocate { nsid: 1, slba: 11, blocks: 1, piece_blocks: 3 }
        );
        assert_eq!(crate::nvme::spec::id_ctrl_nvm::wzsl_bytes(4096, 0), None);
        assert_eq!(crate::nvme::spec::id_ctrl_nvm::wzsl_bytes(4096, 3), Some(32768));
        // A limit that does not fit in 64 bits is no limit.
        assert_eq!(crate::nvme::spec::id_ctrl_nvm::wzsl_bytes(4096, 52), None);
        assert_eq!(crate::nvme::spec::id_ctrl_nvm::wzsl_bytes(4096, 51), Some(1 << 63));
        assert_eq!(crate::nvme::spec::id_ctrl_nvm::wzsl_bytes(4096, 255), None);
        use crate::nvme::spec::id_ctrl_nvm::deallocate_blocks;
        assert_eq!(deallocate_blocks(0, 0), None);
        assert_eq!(deallocate_blocks(100, 0), Some(100));
        assert_eq!(deallocate_blocks(0, 40), Some(40));
        assert_eq!(deallocate_blocks(100, 40), Some(40));
        assert_eq!(deallocate_blocks(100, u64::MAX), Some(100));
    }
}
