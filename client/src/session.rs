//! A session with the broker: the control connection, shared by every ring of the session.
//!
//! A session owns what the broker grants once: the namespaces, the registered buffers and the
//! limits. It may have several rings ([`NvmeSession::new_ring`]), each served by one of the
//! broker's I/O threads, so the threads of one application each drive their own ring without
//! sharing anything on the I/O path, and all use the same registered memory.

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
use nvmed_proto::control::{decode, encode};
use nvmed_proto::{transport, IoThreadInfo, NamespaceInfo, Request, Response, Stats, PROTOCOL_VERSION};

use crate::buffer::MemfdBuffer;
use crate::error::{Error, Result};
use crate::{BufferId, NvmeRing, RingOptions};

/// Session options.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// Name shown in the broker's logs.
    pub client_name: String,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { client_name: std::env::args().next().unwrap_or_else(|| "nvmed-client".into()) }
    }
}

/// What the session's handles share.
#[derive(Debug)]
pub(crate) struct SessionInner {
    sock: OwnedFd,
    /// One request and its reply at a time on the socket.
    calls: Mutex<()>,
    session_id: u64,
    namespaces: Vec<NamespaceInfo>,
    /// Buffers registered for every ring ([`SharedBuffer`]): id -> length.
    shared: Mutex<HashMap<u32, u64>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionInner {
    /// One control request and its reply.
    pub(crate) fn call(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Response, Vec<OwnedFd>)> {
        let _one_at_a_time = lock(&self.calls);
        call(&self.sock, req, fds)
    }

    pub(crate) fn socket(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    pub(crate) fn session_id(&self) -> u64 {
        self.session_id
    }

    pub(crate) fn namespaces(&self) -> &[NamespaceInfo] {
        &self.namespaces
    }

    /// Length of a shared buffer of this session.
    pub(crate) fn shared_len(&self, id: u32) -> Option<u64> {
        lock(&self.shared).get(&id).copied()
    }

    /// Whether the broker closed the connection (it exited or was killed). Looks only for the
    /// hang-up (POLLHUP: the peer closed; it is always reported), so a reply another thread is
    /// about to read does not count.
    pub(crate) fn broker_gone(&self) -> bool {
        let mut fds = [PollFd::new(self.sock.as_fd(), PollFlags::empty())];
        matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) && hung_up(&fds[0])
    }
}

/// Whether a polled socket reports the peer gone.
pub(crate) fn hung_up(fd: &PollFd<'_>) -> bool {
    fd.revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// A session with the broker. Cheap to clone; every clone is the same session. The session
/// ends when its last handle (this, its rings, its shared buffers) is dropped.
#[derive(Debug, Clone)]
pub struct NvmeSession {
    inner: Arc<SessionInner>,
}

impl NvmeSession {
    pub(crate) fn from_inner(inner: Arc<SessionInner>) -> Self {
        Self { inner }
    }

    /// Connects with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(path, SessionOptions::default())
    }

    /// Connects, says hello and lists the namespaces.
    pub fn open_with(path: impl AsRef<Path>, opts: SessionOptions) -> Result<Self> {
        let path = path.as_ref();
        let cerr = |source| Error::Connect { path: path.display().to_string(), source };
        let sock =
            socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(cerr)?;
        let addr = UnixAddr::new(path).map_err(cerr)?;
        connect(sock.as_raw_fd(), &addr).map_err(cerr)?;
        let (resp, _) =
            call(&sock, &Request::Hello { version: PROTOCOL_VERSION, client_name: opts.client_name }, &[])?;
        let Response::Hello { session_id, .. } = resp else { return Err(unexpected(resp)) };
        let (resp, _) = call(&sock, &Request::ListNamespaces, &[])?;
        let Response::Namespaces(namespaces) = resp else { return Err(unexpected(resp)) };
        let inner = SessionInner {
            sock,
            calls: Mutex::new(()),
            session_id,
            namespaces,
            shared: Mutex::new(HashMap::new()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// A new ring of this session, on the I/O thread the broker picks (the least loaded).
    pub fn new_ring(&self) -> Result<NvmeRing> {
        self.new_ring_with(RingOptions::default())
    }

    /// A new ring of this session with the given sizes, spin time and I/O thread.
    pub fn new_ring_with(&self, opts: RingOptions) -> Result<NvmeRing> {
        NvmeRing::create(self.inner.clone(), opts)
    }

    /// The broker's id for this session.
    pub fn session_id(&self) -> u64 {
        self.inner.session_id
    }

    /// Namespaces this session may use.
    pub fn namespaces(&self) -> &[NamespaceInfo] {
        &self.inner.namespaces
    }

    /// Counters of this session (all its rings) and of the broker.
    pub fn stats(&self) -> Result<Stats> {
        match self.inner.call(&Request::Stats, &[])?.0 {
            Response::Stats(s) => Ok(s),
            r => Err(unexpected(r)),
        }
    }

    /// The broker's I/O threads and their load.
    pub fn io_threads(&self) -> Result<Vec<IoThreadInfo>> {
        match self.inner.call(&Request::IoThreads, &[])?.0 {
            Response::IoThreads(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }

    /// A health summary (model, firmware, SMART log at most a second old) of each controller
    /// holding a namespace this session may use.
    pub fn health(&self) -> Result<Vec<nvmed_proto::HealthSummary>> {
        match self.inner.call(&Request::Health, &[])?.0 {
            Response::Health(h) => Ok(h),
            r => Err(unexpected(r)),
        }
    }

    /// Waits until every other session of this uid whose client is gone (killed, crashed) has
    /// finished at the device and released its memory; returns how many were still doing so.
    /// A process restarted after a crash calls this before resubmitting the dead one's
    /// requests, so an old command cannot land after its resubmitted copy.
    pub fn await_drained(&self, timeout: std::time::Duration) -> Result<u32> {
        let timeout_ms = timeout.as_millis().min(u128::from(u32::MAX)) as u32;
        match self.inner.call(&Request::AwaitDrained { timeout_ms }, &[])?.0 {
            Response::Drained { waited_for } => Ok(waited_for),
            r => Err(unexpected(r)),
        }
    }

    /// Creates a sealed memfd buffer of `len` bytes (rounded up to 4 KiB) and registers it for
    /// every ring of the session.
    pub fn alloc_shared(&self, len: usize) -> Result<SharedBuffer> {
        self.register_shared(MemfdBuffer::new(len)?)
    }

    /// Registers `buf` for every ring of the session (see [`SharedBuffer`]).
    pub fn register_shared(&self, buf: MemfdBuffer) -> Result<SharedBuffer> {
        let id = register(&self.inner, &buf)?;
        lock(&self.inner.shared).insert(id, buf.len() as u64);
        Ok(SharedBuffer { inner: Arc::new(SharedInner { mem: buf, id, session: self.inner.clone() }) })
    }

    /// Sends a raw control request (for testing the broker).
    pub fn control(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response> {
        self.inner.call(req, fds).map(|(r, _)| r)
    }
}

/// Registers a buffer; returns its id.
pub(crate) fn register(session: &SessionInner, buf: &MemfdBuffer) -> Result<u32> {
    let req = Request::RegisterBuffer { offset: buf.offset(), len: buf.len() as u64 };
    let (resp, _) = session.call(&req, &[buf.fd().as_fd()])?;
    let Response::BufferRegistered { buffer_id } = resp else { return Err(unexpected(resp)) };
    if buffer_id >= 1 << 20 {
        return Err(Error::Protocol(format!("implausible buffer id {buffer_id}")));
    }
    Ok(buffer_id)
}

/// A buffer registered for every ring of a session, usable in requests of any of them.
///
/// Its memory is reached only by copying ([`SharedBuffer::read_at`], [`SharedBuffer::write_at`])
/// or through raw pointers: several threads and the device may use it at once, so no Rust
/// reference into it is handed out. It is unregistered when the last clone is dropped (after the
/// I/O using it drains).
#[derive(Debug, Clone)]
pub struct SharedBuffer {
    inner: Arc<SharedInner>,
}

#[derive(Debug)]
struct SharedInner {
    mem: MemfdBuffer,
    id: u32,
    session: Arc<SessionInner>,
}

impl Drop for SharedInner {
    fn drop(&mut self) {
        lock(&self.session.shared).remove(&self.id);
        // Answered once no request uses it any more; a broker gone has released it already.
        let _ = self.session.call(&Request::UnregisterBuffer { buffer_id: self.id }, &[]);
    }
}

impl SharedBuffer {
    /// Its id, for requests of any ring of the session.
    pub fn id(&self) -> BufferId {
        BufferId(self.inner.id)
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.inner.mem.len()
    }

    /// Whether it is empty (never).
    pub fn is_empty(&self) -> bool {
        self.inner.mem.is_empty()
    }

    fn check(&self, offset: u64, len: usize) -> Result<usize> {
        let size = self.len() as u64;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize),
            _ => Err(Error::OutOfBuffer { id: self.inner.id, offset, len: len as u64, size }),
        }
    }

    /// Copies `dst.len()` bytes at `offset` out of the buffer.
    pub fn read_at(&self, offset: u64, dst: &mut [u8]) -> Result<()> {
        let at = self.check(offset, dst.len())?;
        self.inner.mem.copy_out(at, dst);
        Ok(())
    }

    /// Copies `src` into the buffer at `offset`.
    pub fn write_at(&self, offset: u64, src: &[u8]) -> Result<()> {
        let at = self.check(offset, src.len())?;
        self.inner.mem.copy_in(at, src);
        Ok(())
    }

    /// The start of the mapping, for callers that manage their own access (a ring's requests
    /// may have the device read or write any range at any time until they complete).
    pub fn as_ptr(&self) -> *mut u8 {
        self.inner.mem.as_ptr()
    }
}

pub(crate) fn unexpected(r: Response) -> Error {
    match r {
        Response::Error(e) => Error::Refused(e),
        other => Error::Protocol(format!("unexpected reply {other:?}")),
    }
}

fn call(sock: &OwnedFd, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Response, Vec<OwnedFd>)> {
    let sent = transport::send(sock.as_fd(), &encode(req), fds);
    // A broker that refused the connection may have closed it after saying why: read that.
    let msg = transport::recv(sock.as_fd()).map_err(|_| Error::BrokerGone)?;
    if sent.is_err() && !matches!(decode::<Response>(&msg.bytes), Ok(Response::Error(_))) {
        return Err(Error::BrokerGone);
    }
    let resp: Response = decode(&msg.bytes).map_err(|e| Error::Protocol(e.to_string()))?;
    if let Response::Error(e) = resp {
        return Err(Error::Refused(e));
    }
    Ok((resp, msg.fds))
}
