//! Requests carried by several device commands, and admission of their pieces as the device
//! queue has room.
//!
//! A request above the controller's MDTS becomes `pieces` commands. They are admitted one by
//! one while the device queue has a free slot and the session is under its share of slots; what
//! does not fit waits in the session's [`Partial`] and is admitted in later rounds as slots
//! free up, so a request larger than the whole queue still completes, and never hogs it.

use nvmed_proto::{Opcode, Status};
use slab::Slab;

use crate::nvme::{IoCommand, IoQueue};

/// Per-command context kept while the device works.
#[derive(Debug, Clone, Copy)]
pub struct InFlight {
    /// Session key.
    pub session: u32,
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

/// The pieces of a request not yet admitted to the device queue.
#[derive(Debug, Clone, Copy)]
pub struct Partial {
    /// The whole command.
    pub cmd: IoCommand,
    /// Next piece to submit.
    pub next: u32,
    /// Pieces in all.
    pub pieces: u32,
    /// Context shared by its pieces.
    pub ctx: InFlight,
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

/// Submits pieces `partial.next..` while the queue has room and `slots` is under `cap`.
/// Returns whether every piece is now at the device.
pub fn admit(
    queue: &mut IoQueue<InFlight>,
    partial: &mut Partial,
    max_transfer: u32,
    slots: &mut u32,
    cap: u32,
) -> bool {
    while partial.next < partial.pieces && queue.free_slots() > 0 && *slots < cap {
        let piece = partial.cmd.piece(partial.next, max_transfer);
        if queue.submit(&piece, partial.ctx).is_err() {
            break;
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
        InFlight { session: 0, buffer: 0, user_data: 7, len: 0, op: Opcode::Read, epoch: 0, split }
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
