//! A session with the broker: the control connection, shared by every ring of the session.
//!
//! A session owns what the broker grants once: the namespaces, the registered buffers and the
//! limits. It may have several rings ([`NvmeSession::new_ring`]), each served by one of the
//! broker's I/O threads, so the threads of one application each drive their own ring without
//! sharing anything on the I/O path, and all use the same registered memory.
//!
//! ## Reconnecting
//!
//! When the broker goes away (it crashed, was killed, or is being restarted), the session
//! connects again on its own ([`Reconnect`]): it retries with a growing backoff until a broker
//! answers or its budget runs out, says hello, checks that the namespaces are the same, and
//! registers every buffer again under the same id (it keeps a duplicate of each buffer's memfd
//! for that). Each ring then creates itself again and sends every request that had not
//! completed (see [`crate::NvmeRing`]). Block I/O is idempotent, so a request the old broker
//! had already given the device may run twice; none is lost, and each completes once. A session
//! an operator ended (`nvmectl kill`) does not come back.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{connect as connect_unix, socket, AddressFamily, SockFlag, SockType, UnixAddr};
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
    /// What to do when the broker goes away.
    pub reconnect: Reconnect,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self {
            client_name: std::env::args().next().unwrap_or_else(|| "nvmed-client".into()),
            reconnect: Reconnect::default(),
        }
    }
}

/// How a session connects again when its broker goes away (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reconnect {
    /// Connect again at all. Off: the broker going away fails the session's calls and rings
    /// with [`Error::BrokerGone`]. The environment variable `NVMED_RECONNECT=0` turns it off
    /// for every session of the process.
    pub enabled: bool,
    /// First wait between two attempts (doubling after each, up to `max_backoff`).
    pub backoff: Duration,
    /// Longest wait between two attempts.
    pub max_backoff: Duration,
    /// Give up this long after the broker was found gone: [`Error::ReconnectFailed`].
    pub budget: Duration,
}

impl Default for Reconnect {
    fn default() -> Self {
        let enabled = std::env::var("NVMED_RECONNECT").map_or(true, |v| v != "0");
        Self {
            enabled,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_secs(1),
            budget: Duration::from_secs(30),
        }
    }
}

impl Reconnect {
    /// Never reconnect.
    pub fn off() -> Self {
        Self { enabled: false, ..Self::default() }
    }
}

/// The control connection of the session's current broker.
#[derive(Debug)]
struct Conn {
    sock: Arc<OwnedFd>,
    /// Bumped by each reconnect.
    epoch: u64,
}

/// A registered buffer, as needed to register it again after a reconnect.
#[derive(Debug)]
struct Registration {
    fd: OwnedFd,
    offset: u64,
    len: u64,
}

/// What the session's handles share.
#[derive(Debug)]
pub(crate) struct SessionInner {
    path: PathBuf,
    client_name: String,
    pub(crate) reconnect: Reconnect,
    /// The connection; held for a request and its reply (one at a time on the socket), and
    /// while reconnecting.
    conn: Mutex<Conn>,
    session_id: AtomicU64,
    reconnects: AtomicU64,
    /// The connection's epoch, readable without waiting for a call in progress.
    epoch: AtomicU64,
    namespaces: Vec<NamespaceInfo>,
    /// Buffers registered for every ring ([`SharedBuffer`]), by id. A ring whose request
    /// names one takes a clone (see `NvmeRing::prep`), so its id is not given to another
    /// buffer while that ring may still use it.
    shared: Mutex<HashMap<u32, Weak<SharedInner>>>,
    /// Bumped when a shared buffer's last caller handle goes (see [`SharedBuffer`]).
    orphaned: AtomicU64,
    /// Every buffer registered (shared and rings' own), by id.
    registrations: Mutex<BTreeMap<u32, Registration>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SessionInner {
    /// One control request and its reply; if the broker is gone, connects again (when
    /// allowed) and sends it to the new broker.
    pub(crate) fn call(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<(Response, Vec<OwnedFd>)> {
        self.call_then(req, fds, |resp, fds, _| Ok((resp, fds)))
    }

    /// As [`SessionInner::call`], also giving the socket the reply came on: a ring
    /// created by the request belongs to that connection, whatever another thread reconnects
    /// right after.
    pub(crate) fn call_on_connection(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>, Arc<OwnedFd>, u64)> {
        self.call_then(req, fds, |resp, fds, conn| Ok((resp, fds, conn.sock.clone(), conn.epoch)))
    }

    /// As [`SessionInner::call`], then `then` on the reply while the connection is still held:
    /// no reconnect comes between the broker's answer and what `then` records of it.
    fn call_then<T>(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
        then: impl FnOnce(Response, Vec<OwnedFd>, &Conn) -> Result<T>,
    ) -> Result<T> {
        let mut conn = lock(&self.conn);
        let r = match call(&conn.sock, req, fds) {
            Err(Error::BrokerGone) if self.reconnect.enabled => {
                let epoch = conn.epoch;
                self.reconnect_locked(&mut conn, epoch)?;
                call(&conn.sock, req, fds)
            }
            r => r,
        };
        let (resp, fds) = r?;
        then(resp, fds, &conn)
    }

    /// One control request on connection `epoch`, if the session is still on it (a request
    /// about a ring of an older connection must not reach the broker of a newer one, whose
    /// rings reuse the ids). Never reconnects.
    pub(crate) fn call_on_epoch(
        &self,
        epoch: u64,
        req: &Request,
    ) -> Option<Result<(Response, Vec<OwnedFd>)>> {
        let conn = lock(&self.conn);
        (conn.epoch == epoch).then(|| call(&conn.sock, req, &[]))
    }

    /// One control request and its reply, never reconnecting (for releasing things: a gone
    /// broker has released them already).
    pub(crate) fn call_once(
        &self,
        req: &Request,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(Response, Vec<OwnedFd>)> {
        let conn = lock(&self.conn);
        call(&conn.sock, req, fds)
    }

    /// Makes sure the session is connected to a broker newer than connection `epoch` (the one
    /// a ring found gone): connects again unless another handle already did.
    pub(crate) fn reconnect(&self, epoch: u64) -> Result<()> {
        let mut conn = lock(&self.conn);
        self.reconnect_locked(&mut conn, epoch)
    }

    fn reconnect_locked(&self, conn: &mut Conn, epoch: u64) -> Result<()> {
        if conn.epoch != epoch {
            return Ok(()); // another handle already connected again
        }
        if !self.reconnect.enabled {
            return Err(Error::BrokerGone);
        }
        let started = Instant::now();
        let mut wait = self.reconnect.backoff;
        loop {
            match self.connect_again() {
                Ok((sock, session_id)) => {
                    conn.sock = Arc::new(sock);
                    conn.epoch += 1;
                    self.epoch.store(conn.epoch, Ordering::Release);
                    self.session_id.store(session_id, Ordering::Relaxed);
                    self.reconnects.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e @ (Error::Connect { .. } | Error::BrokerGone)) => {
                    if started.elapsed() + wait > self.reconnect.budget {
                        return Err(Error::ReconnectFailed {
                            after: started.elapsed(),
                            reason: e.to_string(),
                        });
                    }
                    std::thread::sleep(wait);
                    wait = (wait * 2).min(self.reconnect.max_backoff);
                }
                // An operator ended this session: that is the answer.
                Err(e @ Error::Refused(nvmed_proto::ControlError::SessionKilled(_))) => return Err(e),
                // A broker answered, but this session cannot go on there.
                Err(e) => {
                    return Err(Error::ReconnectFailed { after: started.elapsed(), reason: e.to_string() })
                }
            }
        }
    }

    /// One attempt: connect, hello, the same namespaces, every buffer registered again under
    /// its id.
    fn connect_again(&self) -> Result<(OwnedFd, u64)> {
        let (sock, session_id, namespaces) = connect(&self.path, &self.client_name, Some(self.session_id()))?;
        let key = |n: &NamespaceInfo| (n.nsid, n.lba_size, n.lba_count);
        if !namespaces.iter().map(key).eq(self.namespaces.iter().map(key)) {
            return Err(Error::Protocol(format!(
                "the broker serves other namespaces now: {:?}, was {:?}",
                namespaces.iter().map(key).collect::<Vec<_>>(),
                self.namespaces.iter().map(key).collect::<Vec<_>>()
            )));
        }
        for (&id, r) in lock(&self.registrations).iter() {
            let req = Request::RegisterBuffer { offset: r.offset, len: r.len, id: Some(id) };
            let (resp, _) = call(&sock, &req, &[r.fd.as_fd()])?;
            if !matches!(resp, Response::BufferRegistered { buffer_id } if buffer_id == id) {
                return Err(unexpected(resp));
            }
        }
        Ok((sock, session_id))
    }

    pub(crate) fn session_id(&self) -> u64 {
        self.session_id.load(Ordering::Relaxed)
    }

    /// The current connection's epoch (without waiting for a call in progress).
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Times the session connected again.
    pub(crate) fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }

    pub(crate) fn namespaces(&self) -> &[NamespaceInfo] {
        &self.namespaces
    }

    /// A ring's hold on shared buffer `id` of this session, if it has one the caller still
    /// holds (one whose handles are all dropped is on its way out).
    pub(crate) fn hold_shared(&self, id: u32) -> Option<SharedBuffer> {
        let inner = lock(&self.shared).get(&id).and_then(Weak::upgrade)?;
        (inner.handles.load(Ordering::Acquire) > 0).then_some(SharedBuffer { inner, counted: false })
    }

    /// Bumped whenever a shared buffer's last caller handle is dropped.
    pub(crate) fn orphaned(&self) -> u64 {
        self.orphaned.load(Ordering::Acquire)
    }
}

/// Whether the broker closed connection `sock` (it exited or was killed). Looks only for the
/// hang-up (POLLHUP: the peer closed; it is always reported), so a reply another thread is
/// about to read does not count.
pub(crate) fn closed(sock: BorrowedFd<'_>) -> bool {
    let mut fds = [PollFd::new(sock, PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0) && hung_up(&fds[0])
}

/// Connects to the broker at `path`, says hello and lists the namespaces.
fn connect(
    path: &Path,
    client_name: &str,
    resumes: Option<u64>,
) -> Result<(OwnedFd, u64, Vec<NamespaceInfo>)> {
    let cerr = |source| Error::Connect { path: path.display().to_string(), source };
    let sock =
        socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).map_err(cerr)?;
    let addr = UnixAddr::new(path).map_err(cerr)?;
    connect_unix(sock.as_raw_fd(), &addr).map_err(cerr)?;
    let hello = Request::Hello { version: PROTOCOL_VERSION, client_name: client_name.to_string(), resumes };
    let (resp, _) = call(&sock, &hello, &[])?;
    let Response::Hello { session_id, .. } = resp else { return Err(unexpected(resp)) };
    let (resp, _) = call(&sock, &Request::ListNamespaces, &[])?;
    let Response::Namespaces(namespaces) = resp else { return Err(unexpected(resp)) };
    Ok((sock, session_id, namespaces))
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
    #[cfg(feature = "tokio")]
    pub(crate) fn inner(&self) -> &Arc<SessionInner> {
        &self.inner
    }

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
        let (sock, session_id, namespaces) = connect(path, &opts.client_name, None)?;
        let inner = SessionInner {
            path: path.to_path_buf(),
            client_name: opts.client_name,
            reconnect: opts.reconnect,
            conn: Mutex::new(Conn { sock: Arc::new(sock), epoch: 0 }),
            session_id: AtomicU64::new(session_id),
            reconnects: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            namespaces,
            shared: Mutex::new(HashMap::new()),
            orphaned: AtomicU64::new(0),
            registrations: Mutex::new(BTreeMap::new()),
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Times this session connected again after its broker went away.
    pub fn reconnects(&self) -> u64 {
        self.inner.reconnects()
    }

    /// A new ring of this session, on the I/O thread the broker picks (the least loaded).
    pub fn new_ring(&self) -> Result<NvmeRing> {
        self.new_ring_with(RingOptions::default())
    }

    /// A new ring of this session with the given sizes, spin time and I/O thread.
    pub fn new_ring_with(&self, opts: RingOptions) -> Result<NvmeRing> {
        NvmeRing::create(self.inner.clone(), opts)
    }

    /// The broker's id for this session (a new one after each reconnect).
    pub fn session_id(&self) -> u64 {
        self.inner.session_id()
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
        let inner =
            Arc::new(SharedInner { mem: buf, id, session: self.inner.clone(), handles: AtomicUsize::new(1) });
        lock(&self.inner.shared).insert(id, Arc::downgrade(&inner));
        Ok(SharedBuffer { inner, counted: true })
    }

    /// Sends a raw control request (for testing the broker).
    pub fn control(&self, req: &Request, fds: &[BorrowedFd<'_>]) -> Result<Response> {
        self.inner.call(req, fds).map(|(r, _)| r)
    }
}

/// Registers a buffer; returns its id.
pub(crate) fn register(session: &SessionInner, buf: &MemfdBuffer) -> Result<u32> {
    let (offset, len) = (buf.offset(), buf.len() as u64);
    // Kept to register it again after a reconnect.
    let fd = buf.fd().try_clone().map_err(crate::error::os("dup buffer memfd"))?;
    let req = Request::RegisterBuffer { offset, len, id: None };
    // Recorded before the connection is let go: a reconnect (which registers every recorded
    // buffer again under its id) cannot come between the answer and the record, when the new
    // broker could give the id to another buffer first.
    session.call_then(&req, &[buf.fd().as_fd()], |resp, _, _| {
        let Response::BufferRegistered { buffer_id } = resp else { return Err(unexpected(resp)) };
        if buffer_id >= 1 << 20 {
            return Err(Error::Protocol(format!("implausible buffer id {buffer_id}")));
        }
        lock(&session.registrations).insert(buffer_id, Registration { fd, offset, len });
        Ok(buffer_id)
    })
}

/// Unregisters buffer `id` (answered once no request uses it). A broker gone has released it
/// already: `reconnect` says whether to connect again for it.
pub(crate) fn unregister(session: &SessionInner, id: u32, reconnect: bool) -> Result<()> {
    let req = Request::UnregisterBuffer { buffer_id: id };
    let r = if reconnect { session.call(&req, &[]) } else { session.call_once(&req, &[]) };
    let r = match r {
        Ok((Response::BufferUnregistered, _)) => Ok(()),
        // Not registered again after a reconnect (it was being unregistered): it is gone.
        Err(Error::Refused(nvmed_proto::ControlError::UnknownBuffer(_))) if session.reconnects() > 0 => {
            Ok(())
        }
        Ok((resp, _)) => Err(unexpected(resp)),
        Err(e) => Err(e),
    };
    // Forgotten once gone. A buffer its ring keeps (the unregister failed: the broker kept it
    // for a failed device, or the broker is unreachable) stays on record, so a reconnect
    // registers it again under its id instead of giving that id to another buffer. (A shared
    // buffer's last handle, `reconnect == false`, is gone either way.)
    if r.is_ok() || !reconnect {
        lock(&session.registrations).remove(&id);
    }
    r
}

/// A buffer registered for every ring of a session, usable in requests of any of them.
///
/// Its memory is reached only by copying ([`SharedBuffer::read_at`], [`SharedBuffer::write_at`])
/// or through raw pointers: several threads and the device may use it at once, so no Rust
/// reference into it is handed out. It is unregistered when the last clone is dropped, once no
/// request of any ring names it any more (a ring whose request names it keeps it until that
/// request completes, so its id is never given to another buffer while a request may still
/// name it; [`crate::NvmeRing::use_shared`] keeps it for a ring until
/// [`crate::NvmeRing::release_shared`]).
#[derive(Debug)]
pub struct SharedBuffer {
    inner: Arc<SharedInner>,
    /// A handle of the caller's (counted in `handles`), or a ring's hold on a buffer its
    /// requests named (not counted: the buffer goes once the caller's handles are gone and no
    /// request names it).
    counted: bool,
}

impl Clone for SharedBuffer {
    fn clone(&self) -> Self {
        self.inner.handles.fetch_add(1, Ordering::Relaxed);
        Self { inner: self.inner.clone(), counted: true }
    }
}

impl Drop for SharedBuffer {
    fn drop(&mut self) {
        if self.counted && self.inner.handles.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The caller let go: rings holding it only for their requests let go too, once
            // those complete (they look at this at their next poll).
            self.inner.session.orphaned.fetch_add(1, Ordering::Release);
        }
    }
}

#[derive(Debug)]
struct SharedInner {
    mem: MemfdBuffer,
    id: u32,
    session: Arc<SessionInner>,
    /// The caller's handles ([`SharedBuffer`] clones, and rings' [`crate::NvmeRing::use_shared`]).
    handles: AtomicUsize,
}

impl Drop for SharedInner {
    fn drop(&mut self) {
        {
            let mut shared = lock(&self.session.shared);
            // (Unless a buffer registered since took the id: not before the unregister below.)
            if shared.get(&self.id).is_some_and(|w| w.strong_count() == 0) {
                shared.remove(&self.id);
            }
        }
        // Answered once no request uses it any more; a broker gone has released it already.
        let _ = unregister(&self.session, self.id, false);
    }
}

impl SharedBuffer {
    /// Whether it is a buffer of `session`.
    pub(crate) fn of_session(&self, session: &Arc<SessionInner>) -> bool {
        Arc::ptr_eq(&self.inner.session, session)
    }

    /// Whether this is a ring's hold for its requests (not a handle of the caller's) on a buffer
    /// whose caller handles are all dropped: the ring lets go once its requests on it are done.
    pub(crate) fn orphaned_hold(&self) -> bool {
        !self.counted && self.inner.handles.load(Ordering::Acquire) == 0
    }

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
    if let Err(transport::TransportError::Io(e)) = sent {
        // Not sent (too large, no buffer space): no reply will come.
        return Err(Error::Os { what: "sending a control request", source: e.into() });
    }
    // A broker that refused the connection may have closed it after saying why: read that.
    let msg = match transport::recv(sock.as_fd()) {
        Ok(m) => m,
        Err(transport::TransportError::Closed) => return Err(Error::BrokerGone),
        // Not a hang-up: the broker (and this session there) may well be alive, so this is no
        // reason to connect again (a second session would run the same requests).
        Err(transport::TransportError::Io(e)) => {
            return Err(Error::Os { what: "receiving a control reply", source: e.into() })
        }
    };
    if msg.truncated {
        return Err(Error::Protocol(format!(
            "a reply longer than {} bytes",
            nvmed_proto::control::MAX_MESSAGE_SIZE
        )));
    }
    if sent.is_err() && !matches!(decode::<Response>(&msg.bytes), Ok(Response::Error(_))) {
        return Err(Error::BrokerGone);
    }
    let resp: Response = decode(&msg.bytes).map_err(|e| Error::Protocol(e.to_string()))?;
    if let Response::Error(e) = resp {
        return Err(Error::Refused(e));
    }
    Ok((resp, msg.fds))
}
