//! Control messages exchanged over the broker's Unix socket (SOCK_SEQPACKET).
//!
//! Each datagram is one postcard-encoded [`Request`] or [`Response`], at most
//! [`MAX_MESSAGE_SIZE`] bytes, with at most [`MAX_FDS_PER_MESSAGE`] file descriptors attached as
//! SCM_RIGHTS. Every request gets exactly one response; failures are [`Response::Error`].

use serde::{Deserialize, Serialize};

/// Version of the control protocol and ring layout a client speaks.
pub const PROTOCOL_VERSION: u32 = 4;
/// Largest control datagram either side accepts.
pub const MAX_MESSAGE_SIZE: usize = 4096;
/// Most file descriptors one datagram may carry.
pub const MAX_FDS_PER_MESSAGE: usize = 3;

/// A request from client to broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// First message of a session.
    Hello {
        /// [`PROTOCOL_VERSION`] of the client.
        version: u32,
        /// Free-form name for logs.
        client_name: String,
        /// The session this one continues, when a client connects again after its broker went
        /// away (refused if an operator ended that session).
        resumes: Option<u64>,
    },
    /// List the namespaces this client may use.
    ListNamespaces,
    /// Create a ring of the session (a session may have several, each served by one of the
    /// broker's I/O threads, all sharing the session's buffers); the reply carries the ring
    /// memfd, the submit doorbell (client -> broker) and the completion doorbell
    /// (broker -> client), in that order.
    CreateRing {
        /// SQ entries (power of two).
        sq_entries: u32,
        /// CQ entries (power of two, at least `sq_entries`).
        cq_entries: u32,
        /// The I/O thread to serve it (0-based); `None` lets the broker pick the least loaded.
        thread: Option<u16>,
    },
    /// End one ring of the session: its in-flight I/O is drained first.
    CloseRing {
        /// Id from [`Response::RingCreated`].
        ring_id: u32,
    },
    /// The broker's I/O threads: how many, and how loaded.
    IoThreads,
    /// A health summary of the controllers holding this session's namespaces (nothing about
    /// other tenants). Answered with [`Response::Health`].
    Health,
    /// Wait until every other session of this uid whose client is gone has released its
    /// memory, so no command of theirs can still reach the device (a backend restarted after a
    /// crash resubmits the dead one's requests only after this). Answered with
    /// [`Response::Drained`], or [`ControlError::Timeout`].
    AwaitDrained {
        /// How long to wait at most, in milliseconds.
        timeout_ms: u32,
    },
    /// Register `len` bytes at `offset` of the memfd attached to this message (sealed with
    /// F_SEAL_SHRINK) as a DMA buffer. A VMM registers each guest RAM region of its memfd this way.
    RegisterBuffer {
        /// Byte offset in the memfd; a multiple of 4096.
        offset: u64,
        /// Bytes to register; a multiple of 4096.
        len: u64,
        /// The id it must get (a client registering its buffers again after reconnecting to a
        /// restarted broker, so requests naming them need no change); `None`: any free id.
        id: Option<u32>,
    },
    /// Unregister a buffer: no new request may use it; answered once no request in flight
    /// uses it any more (so its memory is the client's again).
    UnregisterBuffer {
        /// Id from [`Response::BufferRegistered`].
        buffer_id: u32,
    },
    /// Counters of this session and of the broker.
    Stats,
    /// End the session (in-flight I/O is drained first).
    Goodbye,
}

/// A response from broker to client.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Reply to [`Request::Hello`].
    Hello {
        /// The broker's [`PROTOCOL_VERSION`].
        version: u32,
        /// Id of this session in the broker's logs.
        session_id: u64,
    },
    /// Reply to [`Request::ListNamespaces`].
    Namespaces(Vec<NamespaceInfo>),
    /// Reply to [`Request::CreateRing`]; three fds attached.
    RingCreated {
        /// SQ entries.
        sq_entries: u32,
        /// CQ entries.
        cq_entries: u32,
        /// Size of the ring memfd.
        size: u64,
        /// The ring's id in the session.
        ring_id: u32,
        /// The I/O thread serving it.
        thread: u16,
    },
    /// Reply to [`Request::CloseRing`], once its I/O is drained.
    RingClosed,
    /// Reply to [`Request::IoThreads`].
    IoThreads(Vec<IoThreadInfo>),
    /// Reply to [`Request::Health`]: one per controller this session may use.
    Health(Vec<HealthSummary>),
    /// Reply to [`Request::AwaitDrained`].
    Drained {
        /// Sessions that were still draining when asked.
        waited_for: u32,
    },
    /// Reply to [`Request::RegisterBuffer`].
    BufferRegistered {
        /// Id to put in [`crate::Sqe::buf_id`].
        buffer_id: u32,
    },
    /// Reply to [`Request::UnregisterBuffer`].
    BufferUnregistered,
    /// Reply to [`Request::Stats`].
    Stats(Stats),
    /// Reply to [`Request::Goodbye`].
    Goodbye,
    /// The request failed.
    Error(ControlError),
}

/// A namespace as the client sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    /// Namespace id to put in [`crate::Sqe::nsid`].
    pub nsid: u32,
    /// Logical block size in bytes.
    pub lba_size: u32,
    /// Number of logical blocks.
    pub lba_count: u64,
    /// Largest single read or write in bytes (the broker splits it into device-sized commands).
    pub max_transfer: u32,
    /// Whether this client may only read.
    pub read_only: bool,
    /// Index of the controller it lives on (in the broker's order of controllers).
    pub controller: u16,
    /// Its namespace id on that controller (`nsid` is broker-wide).
    pub controller_nsid: u32,
    /// The controller has a volatile write cache: a write is durable (survives a power cut)
    /// once it completed with FUA, or once a Flush submitted after its completion completed.
    /// Without one, every completed write is durable.
    pub volatile_write_cache: bool,
    /// Whether its controller works.
    pub state: ControllerState,
}

/// How a namespace's controller stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerState {
    /// Working (commands that time out are aborted or the controller reset, and sent again).
    Running,
    /// It failed and could not be brought back: I/O fails with `DeviceFault`.
    Failed,
    /// It was removed: I/O fails with `DeviceGone`.
    Gone,
}

impl NamespaceInfo {
    /// Capacity in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.lba_count * u64::from(self.lba_size)
    }
}

/// A controller's health, as any client of it may see it (`nvmectl health` has the whole log).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSummary {
    /// Controller index (as [`NamespaceInfo::controller`]).
    pub controller: u16,
    /// Model number.
    pub model: String,
    /// Firmware revision.
    pub firmware: String,
    /// The SMART / Health Information log (at most about a second old), or why it could not be
    /// read. For clients other than operators (root, the broker's uid, its admin group) the
    /// counters of the device's whole activity, which include other tenants', are 0: see
    /// [`crate::admin::SmartLog::hide_activity`].
    pub smart: Result<crate::admin::SmartLog, String>,
    /// Whether those counters were hidden.
    pub activity_hidden: bool,
}

/// One of the broker's I/O threads, as [`Request::IoThreads`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoThreadInfo {
    /// Rings it serves (of all sessions).
    pub rings: u64,
    /// Device commands its queue completed since the broker started (0 for clients other than
    /// operators: other tenants' work).
    pub device_commands: u64,
}

/// Counters returned by [`Request::Stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Requests this session submitted (taken off its SQ).
    pub submitted: u64,
    /// Completions posted to this session.
    pub completed: u64,
    /// Completions with a non-success status.
    pub errors: u64,
    /// Bytes read by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes.
    pub bytes_written: u64,
    /// Requests of this session currently at the device.
    pub in_flight: u64,
    /// Buffers registered by this session.
    pub buffers: u64,
    /// Bytes registered by this session.
    pub buffer_bytes: u64,
    /// Bytes of this session's vectored requests the broker copied through its bounce buffers
    /// (segment layouts the device could take neither as PRPs nor as SGLs).
    pub bounced_bytes: u64,
    /// Time this session's requests waited for its grant's rate limits, nanoseconds.
    pub throttled_ns: u64,
    /// Whether the broker-wide figures below (`device_dma_bytes` and the `broker_*` counters
    /// but `broker_io_threads`) were filled: only for operators (root, the uid the broker runs
    /// as, members of its `--admin-group`); other clients learn nothing of other tenants and
    /// see them as 0 / `None`.
    pub broker_wide: bool,
    /// Data bytes the device moved by DMA to or from host memory, for all clients, when the
    /// device counts them (the emulated controller does). Equal to the bytes read and written:
    /// the device reaches client buffers directly (or, for bounced vectored requests, the
    /// broker's bounce buffers: see `bounced_bytes`).
    pub device_dma_bytes: Option<u64>,
    /// Sessions connected to the broker.
    pub broker_sessions: u64,
    /// Bytes of IOVA space the broker has mapped for client buffers.
    pub broker_buffer_iova_bytes: u64,
    /// Bytes of all sessions' vectored requests copied through bounce buffers.
    pub broker_bounced_bytes: u64,
    /// Device commands the broker sent with SGLs (for all sessions).
    pub broker_sgl_commands: u64,
    /// Device commands of vectored requests the broker sent with PRPs (for all sessions).
    pub broker_vectored_prp_commands: u64,
    /// Rings of this session.
    pub rings: u64,
    /// The broker's I/O threads.
    pub broker_io_threads: u64,
    /// Controller resets (and devices found gone) since the broker started.
    pub broker_resets: u64,
    /// NVMe Aborts the broker sent for commands that timed out.
    pub broker_aborts: u64,
    /// Device commands sent again (after a retryable status or a reset).
    pub broker_retries: u64,
}

/// Why a control request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ControlError {
    /// The client speaks another protocol version.
    #[error("protocol version mismatch: client {client}, broker {broker}")]
    VersionMismatch {
        /// Client's version.
        client: u32,
        /// Broker's version.
        broker: u32,
    },
    /// A request other than Hello came first.
    #[error("the first request of a session must be Hello")]
    HelloRequired,
    /// Hello was sent twice.
    #[error("Hello was already received")]
    DuplicateHello,
    /// The datagram did not decode as a request.
    #[error("malformed request: {0}")]
    Malformed(String),
    /// The datagram was longer than the limit.
    #[error("message longer than {limit} bytes")]
    MessageTooLarge {
        /// [`MAX_MESSAGE_SIZE`].
        limit: usize,
    },
    /// More file descriptors than the limit were attached.
    #[error("more than {limit} file descriptors in one message")]
    TooManyFds {
        /// The largest number accepted.
        limit: usize,
    },
    /// The request needs a file descriptor and none was attached.
    #[error("this request needs a file descriptor attached")]
    MissingFd,
    /// A file descriptor was attached to a request that takes none.
    #[error("this request takes no file descriptor")]
    UnexpectedFd,
    /// The fd is not a memfd (F_GET_SEALS failed).
    #[error("the buffer fd is not a memfd")]
    NotMemfd,
    /// The memfd lacks F_SEAL_SHRINK.
    #[error("the buffer memfd must be sealed with F_SEAL_SHRINK (fcntl F_ADD_SEALS) before registering")]
    NotSealed,
    /// The memfd is sealed against writes, so reads could not land in it.
    #[error("the buffer memfd is sealed against writing (F_SEAL_WRITE or F_SEAL_FUTURE_WRITE); the device must be able to write it")]
    NotWritable,
    /// The buffer length is zero, not page-aligned, or larger than the memfd.
    #[error("bad buffer length {len}: {reason}")]
    BadBufferLength {
        /// Requested length.
        len: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// The session reached its registration limits.
    #[error("buffer limit reached: {0}")]
    BufferLimit(String),
    /// The session a client tried to resume was ended by an operator (`nvmectl kill`).
    #[error("session {0} was ended by an operator; not resuming it")]
    SessionKilled(u64),
    /// A buffer id asked for is in use, or too large.
    #[error("buffer id {id} is taken, or not below the session's buffer limit {limit}")]
    BufferIdUnavailable {
        /// The id asked for.
        id: u32,
        /// Ids must be below this.
        limit: u64,
    },
    /// The buffer id is not registered by this session.
    #[error("unknown buffer id {0}")]
    UnknownBuffer(u32),
    /// The session has as many rings as it may.
    #[error("at most {limit} rings per session")]
    RingLimit {
        /// The limit.
        limit: u32,
    },
    /// The ring id is not one of this session's rings.
    #[error("unknown ring id {0}")]
    UnknownRing(u32),
    /// A wait did not end in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The I/O thread asked for does not exist.
    #[error("no I/O thread {thread}: the broker runs {threads}")]
    NoSuchThread {
        /// The thread asked for.
        thread: u16,
        /// How many there are.
        threads: u16,
    },
    /// Ring sizes refused.
    #[error("{0}")]
    BadRingSize(String),
    /// No IOVA space or memory left for the request.
    #[error("out of resources: {0}")]
    ResourceExhausted(String),
    /// The broker failed for its own reasons.
    #[error("broker error: {0}")]
    Internal(String),
    /// The connection did not say Hello in time.
    #[error("no Hello within {seconds} s of connecting; connection closed")]
    HelloTimeout {
        /// The deadline in seconds.
        seconds: u64,
    },
    /// A per-uid limit was reached (connections, sessions, buffers); other uids are unaffected.
    #[error("limit for uid {uid} reached: {what}")]
    UidLimit {
        /// The client's uid.
        uid: u32,
        /// Which limit, with its value.
        what: String,
    },
}

/// Encodes a message for the socket.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("control messages always serialize")
}

/// Decodes a message, mapping failures to [`ControlError::Malformed`].
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ControlError> {
    postcard::from_bytes(bytes).map_err(|e| ControlError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Hello { version: 1, client_name: "t".into(), resumes: Some(4) },
            Request::CreateRing { sq_entries: 64, cq_entries: 128, thread: Some(1) },
            Request::CloseRing { ring_id: 3 },
            Request::IoThreads,
            Request::RegisterBuffer { offset: 4096, len: 1 << 20, id: Some(3) },
            Request::UnregisterBuffer { buffer_id: 7 },
            Request::Stats,
        ];
        for r in reqs {
            let b = encode(&r);
            assert!(b.len() < MAX_MESSAGE_SIZE);
            assert_eq!(decode::<Request>(&b).unwrap(), r);
        }
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(decode::<Request>(&[0xff, 0xff, 0xff]), Err(ControlError::Malformed(_))));
        assert!(matches!(decode::<Request>(&[]), Err(ControlError::Malformed(_))));
    }
}
