//! # nvmed wire protocol
//!
//! Everything a client and the broker agree on: the shared-memory ring layout, the entry
//! formats, the completion statuses and the control messages.
//!
//! ## The ring memfd
//!
//! The broker creates one memfd per ring, seals it against shrinking and growing, and sends it
//! to the client with two eventfds. Layout (all offsets in bytes, little-endian):
//!
//! ```text
//! 0      RingHeader        magic "NVMR", version, entry counts, masks, array offsets, size
//! 64     SQ head   u32     written by the broker  (own cache line)
//! 128    SQ tail   u32     written by the client
//! 192    CQ head   u32     written by the client
//! 256    CQ tail   u32     written by the broker
//! 320    broker flags u32  BROKER_NEED_WAKEUP, BROKER_FAULTED
//! 384    client flags u32  CLIENT_CQ_WAITING
//! 448    fault reason u32  RingFault code once BROKER_FAULTED is set
//! 4096   SQ entries        sq_entries x 64-byte Sqe
//! ...    CQ entries        cq_entries x 16-byte Cqe (page aligned)
//! ```
//!
//! ## Memory ordering
//!
//! Indices are free-running `u32`s; slot = index & (entries - 1).
//!
//! * **Submitting** (client): write SQEs at `sq_tail..`, then store the SQ tail with `Release`.
//!   Then issue a `SeqCst` fence and load the broker flags; if `BROKER_NEED_WAKEUP` is set, write
//!   1 to the submit eventfd.
//! * **Taking** (broker): load the SQ tail with `Acquire`, copy each SQE out **once** and validate
//!   the copy, then store the SQ head with `Release`. Before sleeping the broker sets
//!   `BROKER_NEED_WAKEUP`, issues a `SeqCst` fence and loads the SQ tail again.
//! * **Completing** (broker): write CQEs, store the CQ tail with `Release`, `SeqCst` fence, load
//!   the client flags; if `CLIENT_CQ_WAITING` is set, write the completion eventfd.
//! * **Reaping** (client): load the CQ tail with `Acquire`, copy CQEs out, store the CQ head with
//!   `Release`. Before blocking, set `CLIENT_CQ_WAITING`, `SeqCst` fence, load the CQ tail again.
//!
//! Each side trusts only the indices it owns; it keeps them privately and never reads them back.
//! The broker never posts more completions than the CQ has room for: it stops taking a client's
//! SQEs instead. A peer index claiming more than `entries` outstanding entries faults the ring.
//! The sleep/wake handshake is implemented once, in [`wakeup`], for both sides.
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
