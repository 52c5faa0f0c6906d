//! Client errors.

use nvmed_proto::{ControlError, RingFault, Status};

/// Everything the client library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Connecting to the broker's socket failed.
    #[error("cannot connect to the broker at {path}: {source}")]
    Connect {
        /// Socket path.
        path: String,
        /// Cause.
        source: nix::Error,
    },
    /// The broker refused a control request.
    #[error("broker refused the request: {0}")]
    Refused(#[from] ControlError),
    /// The broker answered something the protocol does not allow here.
    #[error("protocol violation by the broker: {0}")]
    Protocol(String),
    /// The connection to the broker is gone (and reconnecting is off).
    #[error("the broker closed the connection")]
    BrokerGone,
    /// The broker went away and the session could not connect again.
    #[error("the broker went away and reconnecting failed after {after:?}: {reason}")]
    ReconnectFailed {
        /// How long it tried.
        after: std::time::Duration,
        /// The last attempt's error.
        reason: String,
    },
    /// The broker stopped serving this ring.
    #[error("the broker stopped serving this ring: {0:?}")]
    RingFaulted(Option<RingFault>),
    /// A system call failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// The submission queue is full; submit and reap first.
    #[error("submission queue full")]
    SqFull,
    /// No such buffer in this client.
    #[error("unknown buffer id {0}")]
    UnknownBuffer(u32),
    /// The buffer is a shared one this ring uses ([`crate::NvmeRing::use_shared`]): its memory
    /// is reached through its [`crate::SharedBuffer`], and it is released, not unregistered.
    #[error("buffer {0} is shared: reach it through its SharedBuffer, and release it with release_shared")]
    SharedBuffer(u32),
    /// The range lies outside the buffer.
    #[error("range {offset}+{len} is outside buffer {id} of {size} bytes")]
    OutOfBuffer {
        /// Buffer.
        id: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Buffer size.
        size: u64,
    },
    /// The range overlaps I/O in flight; wait for its completion first.
    #[error("buffer {id} range {offset}+{len} is in use by I/O in flight")]
    InFlight {
        /// Buffer.
        id: u32,
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
    },
    /// A read or write names no buffer ([`crate::Io::read`] and [`crate::Io::write`] do).
    #[error("a read or write needs a buffer")]
    NoBuffer,
    /// The shared buffer belongs to another session (buffer ids are per session).
    #[error("buffer {0} belongs to another session")]
    ForeignBuffer(u32),
    /// A wait for more completions than requests are in flight (submitted and not reaped):
    /// it could never end.
    #[error(
        "waiting for {wanted} completions, but only {outstanding} requests are in flight (submit first?)"
    )]
    WaitBeyondOutstanding {
        /// Completions still wanted.
        wanted: usize,
        /// Requests submitted and not yet completed.
        outstanding: usize,
    },
    /// A vectored request's segment list is not one the library can account for.
    #[error("bad segment list: {0}")]
    BadSegments(String),
    /// A synchronous helper's request completed with an error.
    #[error("I/O failed: {0}")]
    Io(Status),
    /// A wait timed out.
    #[error("timed out waiting for completions")]
    Timeout,
    /// A request longer than one ring entry can describe.
    #[error("a request of {len} bytes is longer than one request can be (4 GiB - 1)")]
    TooLong {
        /// The length asked for.
        len: u64,
    },
    /// The ring has requests in flight, and the operation needs an idle ring.
    #[error("the ring has {0} requests in flight; it must be idle")]
    RingBusy(usize),
    /// An `AsyncNvmeRing`'s (feature `tokio`) driver task ended without closing
    /// the ring (its runtime shut down, or it panicked): no completion can arrive any more.
    #[error("the ring's driver task ended (its tokio runtime shut down, or it panicked)")]
    DriverGone,
}

/// Shorthand.
pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn os(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Os { what, source }
}
