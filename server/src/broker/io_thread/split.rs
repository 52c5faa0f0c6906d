//! Requests carried by several device commands, and admission of their pieces as the device
//! queue has room.
//!
//! A request above the controller's MDTS becomes `pieces` commands. They are admitted one by
//! one while the device queue has a free slot and the session is under its share of slots; what
//! does not fit waits in the session's [`Partial`] and is admitted in later rounds as slots
//! free up, so a request larger than the whole queue still completes, and never hogs it.
//!
//! Vectored requests are cut the same way (pieces of `max_transfer` bytes of the request, so a
//! segment may be cut between two pieces); each piece's data is described on its own (see
//! [`super::vectored`]), and a piece that needs a bounce slot while none is free waits here too.

use nvmed_proto::{Opcode, Status};
use slab::Slab;

use super::vectored::{Blocked, VecIo, VecWork, NO_BOUNCE, VEC_NONE};
use crate::broker::session::{BufferTable, SessionCounters};
use crate::nvme::{Cursor, IoCommand, IoQueue};

/// Per-command context kept while the device works.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    /// Ring key.
    pub session: u32,
    /// The controller the command went to.
    pub ctrl: u16,
    /// When the request was taken (microseconds on the thread's clock, wrapping).
    pub start_us: u32,
    /// The scheduler tenant charged for the request (its slot is given back when the whole
    /// request completes).
    pub tenant: Option<crate::broker::sched::TenantId>,
    /// Buffer id, or `u32::MAX` for commands without data.
    pub buffer: u32,
    /// The client's tag.
    pub user_data: u64,
    /// Bytes of the whole request.
    pub len: u32,
    /// The request's opcode.
    pub op: Opcode,
    /// Timeout epoch at submission.
    pub epoch: u32,
    /// Index in the splits slab when this command is one piece of a split request.
    pub split: u32,
    /// The vectored request's segment list slot, or [`VEC_NONE`].
    pub vec: u32,
    /// The bounce slot holding this piece's data, or [`NO_BOUNCE`].
    pub bounce: u16,
    /// Where this piece starts in the request's segment list (vectored requests).
    pub at: Cursor,
    /// Bytes of this piece (vectored requests).
    pub piece_len: u32,
}

impl InFlight {
    /// Context of a request that is not (yet) a piece of anything.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        session: u32,
        buffer: u32,
        user_data: u64,
        len: u32,
        op: Opcode,
        epoch: u32,
        split: u32,
    ) -> Self {
        Self {
            session,
            ctrl: 0,
            start_us: 0,
            tenant: None,
            buffer,
            user_data,
            len,
            op,
            epoch,
            split,
            vec: VEC_NONE,
            bounce: NO_BOUNCE,
            at: Cursor::default(),
            piece_len: len,
        }
    }
}

/// No split: the command is the whole request.
pub const WHOLE: u32 = u32::MAX;

/// A client request carried by several device commands.
#[derive(Debug)]
pub struct Split {
    /// Pieces not finished yet (submitted or not).
    pub remaining: u32,
    /// The request's status so far (the first error wins).
    pub status: Status,
}

/// What a request's pieces are cut from.
#[derive(Debug, Clone, Copy)]
pub enum Work {
    /// A command on contiguous memory (or none).
    Plain(IoCommand),
    /// A vectored request (its segments are in the I/O thread's segment list slot `ctx.vec`).
    Vectored(VecWork),
}

/// The pieces of a request not yet admitted to the device queue.
#[derive(Debug, Clone, Copy)]
pub struct Partial {
    /// The whole request.
    pub work: Work,
    /// Next piece to submit.
    pub next: u32,
    /// Pieces in all.
    pub pieces: u32,
    /// Context shared by its pieces.
    pub ctx: InFlight,
    /// The next piece waits for a bounce slot (not for a device queue slot).
    pub waits_bounce: bool,
}

/// Accounts one finished piece; returns the request's status once its last piece finished.
pub fn piece_done(splits: &mut Slab<Split>, ctx: &InFlight, status: Status) -> Option<Status> {
    pieces_done(splits, ctx, 1, status)
}

/// Accounts `n` finished (or abandoned) pieces at once.
pub fn pieces_done(splits: &mut Slab<Split>, ctx: &InFlight, n: u32, status: Status) -> Option<Status> {
    if ctx.split == WHOLE {
        return Some(status);
    }
    let sp = splits.get_mut(ctx.split as usize)?;
    sp.remaining -= n;
    if sp.status.is_success() && !status.is_success() {
        sp.status = status;
    }
    (sp.remaining == 0).then(|| splits.remove(ctx.split as usize).status)
}

/// Where pieces go, and the limits on admitting them.
pub struct Admission<'a> {
    /// The device queue.
    pub queue: &'a mut IoQueue<InFlight>,
    /// Largest device command, in bytes.
    pub max_transfer: u32,
    /// Most device slots one session may hold.
    pub cap: u32,
    /// What vectored pieces need.
    pub vec: VecIo<'a>,
}

/// Submits pieces `partial.next..` while the queue has room and `slots` is under `cap` (and,
/// for bounced vectored pieces, a bounce slot is free). `buffers` and `counters` are the
/// session's. Returns whether every piece is now at the device.
pub fn admit(
    a: &mut Admission<'_>,
    partial: &mut Partial,
    slots: &mut u32,
    buffers: &BufferTable,
    counters: &SessionCounters,
) -> bool {
    partial.waits_bounce = false;
    while partial.next < partial.pieces && a.queue.free_slots() > 0 && *slots < a.cap {
        let submitted = match &mut partial.work {
            Work::Plain(cmd) => {
                let piece = cmd.piece(partial.next, a.max_transfer);
                a.queue.submit(&piece, partial.ctx).map_err(|_| Blocked::Queue)
            }
            Work::Vectored(work) => a.vec.submit_piece(
                a.queue,
                work,
                partial.next,
                a.max_transfer,
                partial.ctx,
                buffers,
                counters,
            ),
        };
        match submitted {
            Ok(()) => {}
            Err(why) => {
                partial.waits_bounce = why == Blocked::Bounce;
                break;
            }
        }
        *slots += 1;
        partial.next += 1;
    }
    partial.next == partial.pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(split: u32) -> InFlight {
        InFlight::new(0, 0, 7, 0, Opcode::Read, 0, split)
    }

    #[test]
    fn first_error_wins_and_abandoned_pieces_count() {
        let mut splits = Slab::new();
        let k = splits.insert(Split { remaining: 5, status: Status::Success }) as u32;
        assert_eq!(piece_done(&mut splits, &ctx(k), Status::Success), None);
        let err = Status::Broker(nvmed_proto::BrokerStatus::DeviceReset);
        assert_eq!(piece_done(&mut splits, &ctx(k), err), None);
        assert_eq!(piece_done(&mut splits, &ctx(k), Status::Success), None);
        // The two pieces never submitted are abandoned together.
        assert_eq!(pieces_done(&mut splits, &ctx(k), 2, Status::Success), Some(err));
        assert!(splits.is_empty());
        assert_eq!(piece_done(&mut splits, &ctx(WHOLE), Status::Success), Some(Status::Success));
    }
}
