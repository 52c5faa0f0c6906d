//! # nvmed wire protocol
//!
//! Everything a client and the broker agree on: the shared-memory ring layout, the entry
//! formats, the completion statuses and the control messages.
//!
//! ## The ring memfd
//!
//! The broker creates one memfd per ring, seals it against shrinking and growing, and sends it
//! to the client with two doorbells: one-way, non-blocking Unix stream socket pairs (see
//! [`eventfd::doorbell`]), the client holding the submit doorbell's ringing end and the completion
//! doorbell's reading end. Layout (ring version 2; all offsets in bytes, little-endian):
//!
//! ```text
//! 0      RingHeader        magic "NVMR", version, entry counts, masks, array offsets, size
//! 64     SQ head   u32     written by the broker  (own cache line)
//! 192    CQ head   u32     written by the client
//! 320    broker flags u32  BROKER_NEED_WAKEUP, BROKER_FAULTED, BROKER_CQ_WAIT
//! 384    client flags u32  CLIENT_CQ_WAITING, CLIENT_CQ_WAKE_AT
//! 388    wake index u32    written by the client (with CLIENT_CQ_WAKE_AT)
//! 448    fault reason u32  RingFault code once BROKER_FAULTED is set
//! 4096   SQ entries        sq_entries x 64-byte Sqe
//! ...    CQ entries        cq_entries x 16-byte Cqe (page aligned)
//! ```
//!
//! Offsets 128 and 256 (ring version 1's tails) are reserved and stay zero: entries carry their
//! own publication tags.
//!
//! ## Memory ordering
//!
//! Indices are free-running `u32`s; slot = index & (entries - 1).
//!
//! * **Submitting** (client): write the SQE's bytes 0..56, then store its tag word (bytes
//!   56..64: `batch`, `seq = index + 1`) with `Release`; in a batch, the first entry's tag last,
//!   carrying the batch's size. Then a `SeqCst` fence and a load of the broker flags; if
//!   `BROKER_NEED_WAKEUP` is set, ring the submit doorbell: `send` any 8 bytes with
//!   `MSG_DONTWAIT | MSG_NOSIGNAL` ([`eventfd::ring_doorbell`] sends `1u64`); a full socket
//!   buffer already rings. The woken side drains it with [`eventfd::drain_doorbell`].
//! * **Taking** (broker): load the next slot's tag with `Acquire`; an entry whose `seq` is not
//!   its index + 1 is not published. Copy each SQE out **once**, validate the copy, then store
//!   the SQ head with `Release`. Before sleeping the broker sets `BROKER_NEED_WAKEUP`, issues a
//!   `SeqCst` fence and looks at the next slot again.
//! * **Completing** (broker): write each CQE whole, its word at 8 (`status` with the phase bit
//!   31, and `result`) with `Release`, the batch's first entry last; then a `SeqCst` fence and a
//!   load of the client flags: if `CLIENT_CQ_WAITING` is set (and, with `CLIENT_CQ_WAKE_AT`, the
//!   published entries reach the wake index), ring the completion doorbell.
//! * **Reaping** (client): load a CQE's word at 8 with `Acquire`; it is published when its phase
//!   bit is 1 in even laps and 0 in odd ones. Copy it out, store the CQ head with `Release`.
//!   Before blocking, set `CLIENT_CQ_WAITING` (any completion wakes), or first store the wake
//!   index (the CQ index one past the last completion waited for: at most `cq_entries` past the
//!   head, and no further than what was submitted) and set `CLIENT_CQ_WAITING |
//!   CLIENT_CQ_WAKE_AT`; then a `SeqCst` fence and a look at the next CQE once more.
//!
//! Each side trusts only the indices it owns; it keeps them privately and never reads them back.
//! The broker never posts more completions than the CQ has room for: it stops taking a client's
//! SQEs instead. A CQ head more than a ring behind, or ahead of, what the broker published faults
//! the ring. The sleep/wake handshake is implemented once, in [`wakeup`], for both sides.
//!
//! ## Vectored requests
//!
//! [`Opcode::ReadV`] and [`Opcode::WriteV`] move one extent of the namespace to or from up to
//! [`MAX_SEGMENTS`] [`Segment`]s (24 bytes each: buffer id, offset, length, any alignment) listed
//! in a registered buffer: the SQE's `buf_id`/`buf_offset` locate the list (8-byte aligned),
//! `segments` counts its entries, and `len` is their total. The broker copies the list once,
//! when it takes the entry, like the entry itself.
//!
//! ## Control socket
//!
//! A SOCK_SEQPACKET Unix socket; see [`control`] for the messages and [`transport`] for how file
//! descriptors travel.

pub mod admin;
pub mod control;
mod entry;
pub mod eventfd;
pub mod layout;
pub mod limits;
pub mod ratelog;
pub mod ring;
pub mod shm;
mod status;
pub mod transport;
pub mod wakeup;

pub use control::{
    ControlError, ControllerState, HealthSummary, IoThreadInfo, NamespaceInfo, Request, Response, Stats,
    PROTOCOL_VERSION,
};
pub use entry::{
    Cqe, Opcode, Segment, Sqe, CQE_PHASE, CQE_TAG_OFFSET, MAX_SEGMENTS, SQE_FLAGS_KNOWN, SQE_FLAG_FUA,
    SQE_SEQ_OFFSET,
};
pub use layout::{RingFault, RingHeader, RingLayout};
pub use status::{BrokerStatus, NvmeStatus, Status};
