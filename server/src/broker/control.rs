//! One thread per client connection: the control protocol.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::Arc;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::sys::time::TimeVal;
use nvmed_proto::control::{decode, encode, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE};
use nvmed_proto::layout::RingLayout;
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::transport::{self, TransportError};
use nvmed_proto::{
    ControlError, ControllerState, HealthSummary, NamespaceInfo, Request, Response, RingFault, Stats,
    PROTOCOL_VERSION,
};
use tracing::{debug, info, warn};

use super::buffer::RegisteredBuffer;
use super::io_thread::IoRequest;
use super::manager::DeviceState;
use super::quota::{Resource, Ticket};
use super::registry::Registered;
use super::session::{RingIo, SessionCounters};
use super::Shared;
use crate::policy::NamespaceAccess;

/// One ring of the session, served by one I/O thread.
/// How long a reply may wait for the client to make room in its socket before the
/// connection is dropped (its session then ends, its I/O drained first).
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

struct RingHandle {
    ring_id: u32,
    thread: usize,
    key: usize,
    counters: Arc<SessionCounters>,
    /// The ring memfd's identity (in `ring_identities` while the ring lives).
    identity: (u64, u64),
    /// The ring's quota unit, given back once the ring is closed.
    _ticket: Ticket,
    /// A copy of the broker's end of the ring's submit doorbell, dropped after the I/O thread
    /// and the reaper dropped theirs: its last close (which closes whatever the client may
    /// have queued in it, see `nvmed_proto::eventfd::Drained::Descriptors`, and may block as
    /// long as that client likes) happens in this client's own thread, never a shared one.
    _submit_end: Option<OwnedFd>,
}

struct Connection {
    shared: Arc<Shared>,
    sock: OwnedFd,
    uid: u32,
    pid: i32,
    id: u64,
    /// An operator (root, the broker's own uid, or a member of `--admin-group`: who may use
    /// the admin socket) sees broker-wide figures (other tenants' activity) in Stats, Health
    /// and IoThreads; other clients see their own session's only.
    operator: bool,
    /// Set by Hello.
    started: bool,
    /// The session's quota unit, held until the session is released.
    session_ticket: Option<Ticket>,
    namespaces: Vec<NamespaceAccess>,
    rings: Vec<RingHandle>,
    next_ring_id: u32,
    /// Registered buffers; the slab key is the buffer id, the same on every ring.
    buffers: IdTable<Arc<RegisteredBuffer>>,
    buffer_bytes: u64,
    /// Identities of the session's ring memfds (they may not come back as buffers).
    ring_identities: Vec<(u64, u64)>,
    /// Its entry in the live-session registry (from Hello until it is released).
    registered: Option<Registered>,
}

/// The longest a control request waits its turn in its uid's pace before it is refused.
const PACE_MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves one client until it leaves, then drains and releases its session.
pub fn serve(shared: Arc<Shared>, sock: OwnedFd, id: u64, uid: u32) {
    let cred = getsockopt(&sock, sockopt::PeerCredentials).ok();
    let pid = cred.map_or(0, |c| c.pid());
    let operator =
        cred.is_some_and(|c| super::admin::authorized(&c, sock.as_fd(), shared.admin_group.as_ref()));
    let mut conn = Connection {
        shared,
        sock,
        uid,
        pid,
        id,
        operator,
        started: false,
        session_ticket: None,
        namespaces: Vec::new(),
        rings: Vec::new(),
        next_ring_id: 0,
        buffers: IdTable::default(),
        buffer_bytes: 0,
        ring_identities: Vec::new(),
        registered: None,
    };
    debug!(session = id, uid, pid, "client connected");
    // Admitted: its requests may carry descriptors now (see `super::refuse_descriptors`); those
    // it sends are closed in this thread, which serves no one else.
    let _ = nvmed_proto::transport::accept_descriptors(conn.sock.as_fd(), true);
    // A connection that never says Hello must not hold its slot forever.
    let deadline = conn.shared.config.hello_timeout;
    if let Err(e) = setsockopt(&conn.sock, sockopt::ReceiveTimeout, &TimeVal::new(deadline.as_secs() as _, 0))
    {
        warn!(session = id, "cannot set the Hello deadline: {e}; dropping connection");
        return;
    }
    // A client that does not read its replies must not hold this thread (and what it would do
    // next, such as ending a withdrawn session) for ever.
    if let Err(e) =
        setsockopt(&conn.sock, sockopt::SendTimeout, &TimeVal::new(REPLY_TIMEOUT.as_secs() as _, 0))
    {
        warn!(session = id, "cannot set the reply deadline: {e}; dropping connection");
        return;
    }
    conn.run();
    if conn.started {
        conn.end_session();
        conn.registered.take();
        conn.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        super::ratelog::limited!(
            info,
            session = id,
            uid,
            pid,
            "session ended; its I/O drained and its memory released"
        );
    }
}

impl Connection {
    fn run(&mut self) {
        let connected = std::time::Instant::now();
        let hello_timeout = self.shared.config.hello_timeout;
        loop {
            if !self.started {
                // The Hello deadline counts from the connection, not from the last message.
                let left = hello_timeout.saturating_sub(connected.elapsed());
                let left = TimeVal::new(left.as_secs() as _, left.subsec_micros().max(1) as _);
                if setsockopt(&self.sock, sockopt::ReceiveTimeout, &left).is_err() {
                    return;
                }
            }
            let msg = match transport::recv_at_most_fds(self.sock.as_fd(), MAX_FDS_PER_MESSAGE) {
                Ok(m) => m,
                Err(TransportError::Closed) => return,
                Err(TransportError::Io(nix::Error::EAGAIN)) if !self.started => {
                    let seconds = self.shared.config.hello_timeout.as_secs();
                    info!(
                        session = self.id,
                        uid = self.uid,
                        pid = self.pid,
                        "no Hello within {seconds} s; closing"
                    );
                    let e = Response::Error(ControlError::HelloTimeout { seconds });
                    let _ = transport::send(self.sock.as_fd(), &encode(&e), &[]);
                    return;
                }
                Err(e) => {
                    debug!(session = self.id, "receive failed: {e}");
                    return;
                }
            };
            // Every descriptor in `msg` is owned by it: whatever is refused below, they close.
            let (resp, fds) = if msg.truncated {
                (Response::Error(ControlError::MessageTooLarge { limit: MAX_MESSAGE_SIZE }), vec![])
            } else if msg.fds_truncated || msg.fds.len() > MAX_FDS_PER_MESSAGE {
                (Response::Error(ControlError::TooManyFds { limit: MAX_FDS_PER_MESSAGE }), vec![])
            } else if msg.bytes.is_empty() && msg.fds.is_empty() {
                (Response::Error(ControlError::Malformed("empty message".into())), vec![])
            } else {
                match decode::<Request>(&msg.bytes) {
                    Ok(req) => {
                        let goodbye = req == Request::Goodbye;
                        let r = match self.pace(&req) {
                            Ok(()) => self.handle(req, msg.fds),
                            Err(e) => (Response::Error(e), vec![]),
                        };
                        if goodbye {
                            let _ = transport::send(self.sock.as_fd(), &encode(&Response::Goodbye), &[]);
                            return;
                        }
                        r
                    }
                    Err(e) => (Response::Error(e), vec![]),
                }
            };
            if let Response::Error(e) = &resp {
                debug!(session = self.id, "request refused: {e}");
            }
            let mut bytes = encode(&resp);
            let mut fds = fds;
            if bytes.len() > nvmed_proto::control::MAX_MESSAGE_SIZE {
                // The client's receive buffer is that large: a longer reply would arrive cut.
                warn!(session = self.id, bytes = bytes.len(), "reply too large for a control message");
                let e = ControlError::Internal(format!(
                    "the reply ({} bytes) exceeds the {}-byte control message",
                    bytes.len(),
                    nvmed_proto::control::MAX_MESSAGE_SIZE
                ));
                bytes = encode(&Response::Error(e));
                fds.clear();
            }
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            if transport::send(self.sock.as_fd(), &bytes, &borrowed).is_err() {
                return;
            }
        }
    }

    /// Waits this request's turn in its uid's pace of control requests, or refuses it when
    /// that would take more than [`PACE_MAX_WAIT`].
    fn pace(&self, req: &Request) -> Result<(), ControlError> {
        let cost = match req {
            Request::RegisterBuffer { len, .. } => super::pacing::register_cost(*len),
            _ => 1,
        };
        match self.shared.pacer.take(self.uid, cost, std::time::Instant::now(), PACE_MAX_WAIT) {
            Ok(wait) => {
                if !wait.is_zero() {
                    std::thread::sleep(wait);
                }
                Ok(())
            }
            Err(wait) => {
                super::ratelog::limited_per!(
                    self.uid,
                    info,
                    uid = self.uid,
                    "control requests beyond the uid's rate: refused"
                );
                Err(ControlError::ResourceExhausted(format!(
                    "uid {} sends control requests faster than --control-rate-per-uid ({} per second): \
                     this one would wait {} ms; try again later",
                    self.uid,
                    self.shared.config.control_rate_per_uid,
                    wait.as_millis()
                )))
            }
        }
    }

    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) {
        let wants_fd = matches!(req, Request::RegisterBuffer { .. });
        if !wants_fd && !fds.is_empty() {
            return (Response::Error(ControlError::UnexpectedFd), vec![]);
        }
        let none = |r: Response| Ok((r, vec![]));
        let r = match req {
            Request::Hello { version, client_name, resumes } => self.hello(version, &client_name, resumes),
            _ if !self.started => Err(ControlError::HelloRequired),
            Request::ListNamespaces => none(Response::Namespaces(self.namespace_infos())),
            Request::CreateRing { sq_entries, cq_entries, thread } => {
                self.create_ring(sq_entries, cq_entries, thread)
            }
            Request::CloseRing { ring_id } => {
                self.close_ring(ring_id).map(|()| (Response::RingClosed, vec![]))
            }
            Request::IoThreads => {
                let mut infos = self.shared.io_thread_infos();
                if !self.operator {
                    // Ring counts guide placement; the device work of others is theirs.
                    infos.iter_mut().for_each(|i| i.device_commands = 0);
                }
                none(Response::IoThreads(infos))
            }
            Request::Health => {
                self.refresh_namespaces();
                let mut controllers: Vec<u16> = self.namespaces.iter().map(|n| n.controller).collect();
                controllers.sort_unstable();
                controllers.dedup();
                let list = controllers
                    .into_iter()
                    .map(|c| {
                        let info = &self.shared.infos[usize::from(c)];
                        HealthSummary {
                            controller: c,
                            model: info.model.clone(),
                            firmware: info.firmware.clone(),
                            smart: self.shared.smart(usize::from(c)).map(|mut s| {
                                if !self.operator {
                                    s.hide_activity();
                                }
                                s
                            }),
                            activity_hidden: !self.operator,
                        }
                    })
                    .collect();
                none(Response::Health(list))
            }
            Request::AwaitDrained { timeout_ms } => {
                let timeout = std::time::Duration::from_millis(u64::from(timeout_ms));
                match self.shared.await_drained(self.uid, self.id, timeout) {
                    Some(waited_for) => none(Response::Drained { waited_for }),
                    None => Err(ControlError::Timeout(format!(
                        "sessions of uid {} still releasing their memory after {timeout_ms} ms",
                        self.uid
                    ))),
                }
            }
            Request::RegisterBuffer { offset, len, id } => self.register(offset, len, id, fds),
            Request::UnregisterBuffer { buffer_id } => self.unregister(buffer_id),
            Request::Stats => none(Response::Stats(self.stats())),
            Request::Goodbye => none(Response::Goodbye),
        };
        r.unwrap_or_else(|e| (Response::Error(e), vec![]))
    }

    fn stats(&self) -> Stats {
        let mut s = Stats::default();
        for r in &self.rings {
            let c = r.counters.snapshot();
            s.submitted += c.submitted;
            s.completed += c.completed;
            s.errors += c.errors;
            s.bytes_read += c.bytes_read;
            s.bytes_written += c.bytes_written;
            s.in_flight += c.in_flight;
            s.bounced_bytes += c.bounced_bytes;
            s.throttled_ns += c.throttled_ns;
        }
        s.rings = self.rings.len() as u64;
        s.buffers = self.buffers.len() as u64;
        s.buffer_bytes = self.buffer_bytes;
        s.broker_io_threads = self.shared.pollers.len() as u64;
        if !self.operator {
            return s; // nothing about other tenants
        }
        s.broker_wide = true;
        s.broker_sessions = self.shared.quotas.held(Resource::Session);
        s.broker_buffer_iova_bytes = self.shared.space.used(crate::iova::Area::Buffers);
        s.device_dma_bytes =
            self.shared.devices.iter().map(|d| d.dma_data_bytes()).try_fold(0u64, |a, b| b.map(|b| a + b));
        for p in &self.shared.pollers {
            let c = &p.counters;
            s.broker_bounced_bytes += c.bounced_bytes.load(Ordering::Relaxed);
            s.broker_sgl_commands += c.sgl_commands.load(Ordering::Relaxed);
            s.broker_vectored_prp_commands += c.vectored_prp_commands.load(Ordering::Relaxed);
            s.broker_aborts += c.aborts.load(Ordering::Relaxed);
            s.broker_retries += c.retries.load(Ordering::Relaxed);
        }
        s.broker_resets = self.shared.ctrls.iter().map(|c| c.generation()).sum();
        s
    }

    fn hello(
        &mut self,
        version: u32,
        name: &str,
        resumes: Option<u64>,
    ) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if self.started {
            return Err(ControlError::DuplicateHello);
        }
        if version != PROTOCOL_VERSION {
            return Err(ControlError::VersionMismatch { client: version, broker: PROTOCOL_VERSION });
        }
        if let Some(old) = resumes {
            if self.shared.killed.lock().unwrap_or_else(|p| p.into_inner()).contains(old) {
                return Err(ControlError::SessionKilled(old));
            }
            super::ratelog::limited_per!(
                self.uid,
                info,
                session = self.id,
                resumes = old,
                "a client reconnects"
            );
        }
        let ticket = self.shared.quotas.acquire(Resource::Session, self.uid)?;
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        // Resolved and registered under the grants' lock: a reload either ran before (and
        // these are its grants) or waits and then finds the session registered.
        let policy = self.shared.policy_read();
        self.namespaces = policy.access_for(self.uid, &self.shared.namespaces);
        #[cfg(test)]
        self.shared.hook(super::HookPoint::HelloResolved);
        self.registered =
            Some(self.shared.registry.add(self.id, self.uid, self.pid, name, self.namespaces.clone()));
        drop(policy);
        self.started = true;
        self.session_ticket = Some(ticket);
        // Said Hello: no deadline for the next requests.
        if let Err(e) = setsockopt(&self.sock, sockopt::ReceiveTimeout, &TimeVal::new(0, 0)) {
            warn!(session = self.id, "cannot clear the Hello deadline: {e}");
        }
        super::ratelog::limited_per!(
            self.uid,
            info,
            session = self.id,
            uid = self.uid,
            pid = self.pid,
            client = %super::registry::printable(name, 64),
            namespaces = self.namespaces.len(),
            "session started"
        );
        Ok((Response::Hello { version: PROTOCOL_VERSION, session_id: self.id }, vec![]))
    }

    /// The namespaces as the grants in force give them (a reload may have changed them).
    fn refresh_namespaces(&mut self) {
        if let Some(r) = &self.registered {
            self.namespaces = r.access().namespaces.clone();
        }
    }

    fn namespace_infos(&mut self) -> Vec<NamespaceInfo> {
        self.refresh_namespaces();
        self.namespaces
            .iter()
            .map(|n| NamespaceInfo {
                nsid: n.nsid,
                lba_size: n.lba_size,
                lba_count: n.lba_count,
                max_transfer: self.shared.limits[usize::from(n.controller)].max_request,
                read_only: n.read_only,
                controller: n.controller,
                controller_nsid: n.device_nsid,
                volatile_write_cache: self.shared.limits[usize::from(n.controller)].volatile_write_cache,
                state: match self.shared.ctrls[usize::from(n.controller)].state() {
                    DeviceState::Running => ControllerState::Running,
                    DeviceState::Gone => ControllerState::Gone,
                    DeviceState::FailedStopped | DeviceState::FailedRunning => ControllerState::Failed,
                },
            })
            .collect()
    }

    fn create_ring(
        &mut self,
        sq: u32,
        cq: u32,
        thread: Option<u16>,
    ) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        let limit = self.shared.config.max_rings_per_session;
        if self.rings.len() as u32 >= limit {
            return Err(ControlError::RingLimit { limit });
        }
        let threads = self.shared.pollers.len();
        let thread = match thread {
            Some(t) if usize::from(t) >= threads => {
                return Err(ControlError::NoSuchThread { thread: t, threads: threads as u16 })
            }
            Some(t) => usize::from(t),
            None => self.shared.least_loaded(),
        };
        let layout = RingLayout::new(sq, cq).map_err(|e| ControlError::BadRingSize(e.to_string()))?;
        // Its descriptors and mapping count against the uid's and the broker's ring limits.
        let ticket = self.shared.quotas.acquire(Resource::Ring, self.uid)?;
        let internal = |what: &str, e: &dyn std::fmt::Display| ControlError::Internal(format!("{what}: {e}"));
        let memfd = memfd::MemfdOptions::new()
            .allow_sealing(true)
            .close_on_exec(true)
            .create("nvmed-ring")
            .map_err(|e| internal("memfd_create", &e))?;
        memfd.as_file().set_len(layout.total_size as u64).map_err(|e| internal("ftruncate", &e))?;
        // The client must not be able to shrink the ring under the broker's mapping.
        memfd
            .add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow, memfd::FileSeal::SealSeal])
            .map_err(|e| internal("sealing the ring", &e))?;
        let mem = Arc::new(
            SharedMemory::map_shared(memfd.as_file().as_fd(), layout.total_size)
                .map_err(|e| internal("mmap", &e))?,
        );
        mem.write(0, layout.header());
        // Doorbells, not eventfds: the client's ends are other open files than the broker's, so
        // nothing the client does to its ends' flags can make the broker's read or write block.
        let (submit, submit_client) = nvmed_proto::eventfd::doorbell().map_err(|e| internal("pipe", &e))?;
        let submit_end = submit.try_clone().map_err(|e| internal("dup", &e))?;
        let (complete_client, complete) =
            nvmed_proto::eventfd::doorbell().map_err(|e| internal("pipe", &e))?;
        let identity = super::buffer::file_identity(memfd.as_file());
        let fds: Vec<OwnedFd> = vec![memfd.into_file().into(), submit_client, complete_client];
        let ring_id = self.next_ring_id;
        let counters = Arc::new(SessionCounters::default());
        // The grants may change (a reload) while the ring is being added: hold them until the
        // ring is listed, so it is told of any later change.
        let entry = self.registered.as_ref().map(|r| r.entry());
        let mut access = entry.as_ref().map(|e| e.access());
        if let Some(a) = access.as_ref() {
            if a.withdrawn {
                // Its grants changed under it: the session is being ended (like a kill).
                return Err(ControlError::SessionKilled(self.id));
            }
            self.namespaces = a.namespaces.clone();
        }
        // The ring's tenants get their limits split over the threads serving them: this one
        // and those already serving them (told their new part).
        // The new parts are sent while the placement is held: each thread takes its requests in
        // order, so concurrent sessions of one tenant cannot deliver an older split after a
        // newer one (a tenant briefly over, or stuck under, its limit).
        let (tx, rx) = channel();
        let poller = &self.shared.pollers[thread];
        {
            let mut placement = self.shared.placement.lock().unwrap_or_else(|p| p.into_inner());
            let mut tenants = Vec::new();
            let mut rescale = Vec::new();
            for (key, qos) in super::tenant::tenants_of(&self.namespaces, self.uid, self.id) {
                let (limits, others) = placement.add(key, qos, thread, threads);
                tenants.push((key, limits));
                rescale.extend(others);
            }
            for (t, key, limits) in rescale {
                self.shared.pollers[t].request(IoRequest::SetTenantLimits { key, limits });
            }
            poller.request(IoRequest::AddRing {
                session: self.id,
                uid: self.uid,
                ring_id,
                namespaces: self.namespaces.clone(),
                counters: counters.clone(),
                ring: Box::new(RingIo::new(mem, &layout, submit, complete)),
                buffers: self.buffers.iter().map(|(id, b)| (id as u32, b.clone())).collect(),
                tenants,
                reply: tx,
            });
        }
        let key = rx.recv().map_err(|_| ControlError::Internal("I/O thread stopped".into()))?;
        poller.rings.fetch_add(1, Ordering::Relaxed);
        // The next id: after 2^32 rings it wraps, skipping the ids of rings still open.
        self.next_ring_id = self.next_ring_id.wrapping_add(1);
        while self.next_ring_id == ring_id || self.rings.iter().any(|r| r.ring_id == self.next_ring_id) {
            self.next_ring_id = self.next_ring_id.wrapping_add(1);
        }
        if let Some(r) = &self.registered {
            r.add_ring(ring_id, counters.clone());
        }
        let identity = identity.unwrap_or((u64::MAX, u64::MAX));
        self.rings.push(RingHandle {
            ring_id,
            thread,
            key,
            counters,
            identity,
            _ticket: ticket,
            _submit_end: Some(submit_end),
        });
        if let Some(a) = access.as_mut() {
            a.rings.push((ring_id, thread, key));
        }
        drop(access);
        self.ring_identities.push(identity);
        debug!(session = self.id, ring_id, thread, "ring created");
        let resp = Response::RingCreated {
            sq_entries: sq,
            cq_entries: cq,
            size: layout.total_size as u64,
            ring_id,
            thread: thread as u16,
        };
        Ok((resp, fds))
    }

    /// Ends one ring: its I/O drains first.
    fn close_ring(&mut self, ring_id: u32) -> Result<(), ControlError> {
        let i =
            self.rings.iter().position(|r| r.ring_id == ring_id).ok_or(ControlError::UnknownRing(ring_id))?;
        let ring = self.rings.swap_remove(i);
        if let Some(j) = self.ring_identities.iter().position(|&id| id == ring.identity) {
            self.ring_identities.swap_remove(j);
        }
        if let Some(r) = &self.registered {
            let mut a = r.access();
            a.rings.retain(|&(id, _, _)| id != ring_id);
            self.namespaces = a.namespaces.clone();
        }
        let (tx, rx) = channel();
        let poller = &self.shared.pollers[ring.thread];
        if poller.request(IoRequest::CloseRing { key: ring.key, fault: RingFault::Closed, reply: tx }) {
            let _ = rx.recv();
        }
        // Drained: its counters are final, and stay in the session's totals.
        if let Some(r) = &self.registered {
            r.remove_ring(ring_id);
        }
        poller.rings.fetch_sub(1, Ordering::Relaxed);
        self.forget_ring_tenants(ring.thread);
        Ok(())
    }

    /// A ring on `thread` is gone: its tenants' limits are split over fewer threads, maybe.
    fn forget_ring_tenants(&self, thread: usize) {
        // Sent while the placement is held (see `create_ring`).
        let mut placement = self.shared.placement.lock().unwrap_or_else(|p| p.into_inner());
        for (key, _) in super::tenant::tenants_of(&self.namespaces, self.uid, self.id) {
            for (t, key, limits) in placement.remove(key, thread) {
                self.shared.pollers[t].request(IoRequest::SetTenantLimits { key, limits });
            }
        }
    }

    /// Ends every ring (draining their I/O), then releases the session's buffers; returns once
    /// they are unmapped.
    fn end_session(&mut self) {
        if let Some(r) = &self.registered {
            let mut a = r.access();
            a.rings.clear();
            self.namespaces = a.namespaces.clone();
        }
        let rings = std::mem::take(&mut self.rings);
        // An operator's kill says so in the rings, so the client does not come back on its own.
        let killed = self.shared.killed.lock().unwrap_or_else(|p| p.into_inner()).contains(self.id);
        let fault = if killed { RingFault::Killed } else { RingFault::Closed };
        let pending: Vec<_> = rings
            .iter()
            .filter_map(|ring| {
                let (tx, rx) = channel();
                let poller = &self.shared.pollers[ring.thread];
                let sent = poller.request(IoRequest::CloseRing { key: ring.key, fault, reply: tx });
                poller.rings.fetch_sub(1, Ordering::Relaxed);
                sent.then_some(rx)
            })
            .collect();
        for rx in pending {
            let _ = rx.recv();
        }
        for ring in &rings {
            self.forget_ring_tenants(ring.thread);
        }
        // Every ring has drained and let go of the buffers: the session holds the last handles.
        // One still shared is held by a ring a failed device may still write through: it stays
        // mapped for good.
        let mut unmap = Vec::new();
        for (id, b) in std::mem::take(&mut self.buffers) {
            match Arc::try_unwrap(b) {
                Ok(b) => unmap.push(b),
                Err(b) => {
                    warn!(
                        session = self.id,
                        buffer_id = id,
                        "buffer kept mapped: a failed device may still use it"
                    );
                    b.release_uid_share();
                    std::mem::forget(b);
                }
            }
        }
        if !unmap.is_empty() {
            let (tx, rx) = channel();
            self.shared.dispose_then_notify(self.uid, unmap, tx);
            let _ = rx.recv();
        }
    }

    fn register(
        &mut self,
        offset: u64,
        len: u64,
        wanted: Option<u32>,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if fds.len() > 1 {
            return Err(ControlError::TooManyFds { limit: 1 });
        }
        let fd = fds.pop().ok_or(ControlError::MissingFd)?;
        // Memory is pinned for I/O: a uid that may reach no namespace has none to do, and must
        // not hold the broker's pinned bytes (or its IOVA space) meanwhile.
        if self.namespaces.is_empty() {
            return Err(ControlError::BufferLimit(format!(
                "uid {} may reach no namespace (no --grant for it, and the default access is none): \
                 it may not register memory",
                self.uid
            )));
        }
        let cfg = &self.shared.config;
        // Ids held for a failed device count: every id handed out stays below the limit.
        if self.buffers.taken() as u64 >= cfg.max_buffers_per_session {
            return Err(ControlError::BufferLimit(format!(
                "at most {} buffers per session",
                cfg.max_buffers_per_session
            )));
        }
        // An id asked for must be free and below the limit (ids the broker hands out always
        // are, so a client registering again after a restart gets the ones it had).
        if let Some(id) = wanted {
            if u64::from(id) >= cfg.max_buffers_per_session || self.buffers.contains(id as usize) {
                return Err(ControlError::BufferIdUnavailable { id, limit: cfg.max_buffers_per_session });
            }
        }
        let left = cfg.max_buffer_bytes_per_session.saturating_sub(self.buffer_bytes);
        // Each buffer is one mapping in the broker: bounded per uid and in all, well below
        // vm.max_map_count, so mappings can never run out for the broker's own needs.
        // Its bytes count against the uid's registered bytes (all its sessions together).
        let ticket = self.shared.quotas.acquire_buffer(self.uid, len)?;
        let buffer = Arc::new(RegisteredBuffer::register(
            fd,
            offset,
            len,
            left,
            &self.shared.space,
            &self.shared.dma,
            ticket,
            &self.ring_identities,
        )?);
        let buffer_id = self.buffers.insert(wanted, buffer.clone());
        self.buffer_bytes += buffer.len();
        self.publish_buffers();
        // Every ring of the session may use it once this returns.
        let pending: Vec<_> = self
            .rings
            .iter()
            .filter_map(|r| {
                let (tx, rx) = channel();
                let req =
                    IoRequest::AddBuffer { key: r.key, id: buffer_id, buffer: buffer.clone(), reply: tx };
                self.shared.pollers[r.thread].request(req).then_some(rx)
            })
            .collect();
        for rx in pending {
            rx.recv().map_err(|_| ControlError::Internal("I/O thread stopped".into()))?;
        }
        debug!(session = self.id, buffer_id, len, "buffer registered");
        Ok((Response::BufferRegistered { buffer_id }, vec![]))
    }

    /// Tells the registry the session's registration totals.
    fn publish_buffers(&self) {
        if let Some(r) = &self.registered {
            r.set_buffers(self.buffers.len() as u64, self.buffer_bytes);
        }
    }

    /// Waits for an I/O thread's answer about this session's rings: `Ok(false)` if the thread
    /// is gone. Such an answer can wait on the client (an unregister is answered once the
    /// completions that freed the buffer are in its CQ, which it may never make room for): a
    /// client that hangs up, or is killed by an operator, meanwhile ends the wait, so its
    /// session ends instead of holding this thread and its resources for good.
    fn await_io_thread(&self, rx: &Receiver<()>) -> Result<bool, ControlError> {
        loop {
            match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                Ok(()) => return Ok(true),
                Err(RecvTimeoutError::Disconnected) => return Ok(false),
                Err(RecvTimeoutError::Timeout) => {}
            }
            // Hung up, killed (the socket shut down both ways) or withdrawn by a reload (its
            // reading side shut down): POLLRDHUP shows all three, queued data or not.
            let gone = transport::peer_closed(self.sock.as_fd());
            if gone {
                return Err(ControlError::Internal("the client went away while its request waited".into()));
            }
        }
    }

    fn unregister(&mut self, buffer_id: u32) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if !self.buffers.has(buffer_id as usize) {
            return Err(ControlError::UnknownBuffer(buffer_id));
        }
        // No ring takes new requests on it; each answers once its commands on it are done.
        let pending: Vec<_> = self
            .rings
            .iter()
            .filter_map(|r| {
                let (tx, rx) = channel();
                let req = IoRequest::RetireBuffer { key: r.key, id: buffer_id, reply: tx };
                self.shared.pollers[r.thread].request(req).then_some(rx)
            })
            .collect();
        let mut drained = true;
        for rx in pending {
            drained &= self.await_io_thread(&rx)?;
        }
        let b = self.buffers.remove(buffer_id as usize);
        self.buffer_bytes -= b.len();
        self.publish_buffers();
        match Arc::try_unwrap(b) {
            Ok(b) if drained => {
                let (tx, rx) = channel();
                self.shared.dispose_then_notify(self.uid, b, tx);
                let _ = rx.recv();
                Ok((Response::BufferUnregistered, vec![]))
            }
            Ok(b) => {
                b.release_uid_share();
                std::mem::forget(b);
                self.buffers.hold(buffer_id as usize);
                Err(ControlError::Internal("an I/O thread stopped; the buffer stays mapped".into()))
            }
            Err(b) => {
                // A ring of a failed device keeps it: it may still be written. Its id is
                // never given again (the ring's table still names the buffer by it).
                b.release_uid_share();
                std::mem::forget(b);
                self.buffers.hold(buffer_id as usize);
                Err(ControlError::ResourceExhausted(
                    "the device failed with I/O on this buffer in flight; it stays mapped".into(),
                ))
            }
        }
    }
}

/// A session's buffers by id: the smallest free id, or the one the client asks for.
#[derive(Debug)]
struct IdTable<T> {
    slots: Vec<Option<T>>,
    len: usize,
    /// Ids never given again: a failed device may still use what they named (ring tables
    /// keep those entries for the commands in flight).
    held: Vec<usize>,
}

impl<T> Default for IdTable<T> {
    fn default() -> Self {
        Self { slots: Vec::new(), len: 0, held: Vec::new() }
    }
}

impl<T> IdTable<T> {
    fn len(&self) -> usize {
        self.len
    }

    /// Ids in use: buffers and held ids.
    fn taken(&self) -> usize {
        self.len + self.held.len()
    }

    /// Whether `id` names a buffer.
    fn has(&self, id: usize) -> bool {
        self.slots.get(id).is_some_and(Option::is_some)
    }

    /// Whether `id` is taken (by a buffer, or held).
    fn contains(&self, id: usize) -> bool {
        self.has(id) || self.held.contains(&id)
    }

    /// Never gives `id` (removed) again.
    fn hold(&mut self, id: usize) {
        self.held.push(id);
    }

    /// Stores `v` at `wanted` (which must be free) or at the smallest free id; returns the id.
    fn insert(&mut self, wanted: Option<u32>, v: T) -> u32 {
        let id = match wanted {
            Some(id) => id as usize,
            None => (0..).find(|&i| !self.contains(i)).expect("a free id"),
        };
        if self.slots.len() <= id {
            self.slots.resize_with(id + 1, || None);
        }
        debug_assert!(self.slots[id].is_none());
        self.slots[id] = Some(v);
        self.len += 1;
        id as u32
    }

    /// Removes id `id` (which must be present).
    fn remove(&mut self, id: usize) -> T {
        let v = self.slots[id].take().expect("present");
        self.len -= 1;
        v
    }

    fn iter(&self) -> impl Iterator<Item = (usize, &T)> {
        self.slots.iter().enumerate().filter_map(|(i, v)| v.as_ref().map(|v| (i, v)))
    }
}

impl<T> IntoIterator for IdTable<T> {
    type Item = (usize, T);
    type IntoIter = std::iter::FilterMap<
        std::iter::Enumerate<std::vec::IntoIter<Option<T>>>,
        fn((usize, Option<T>)) -> Option<(usize, T)>,
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.slots.into_iter().enumerate().filter_map(|(i, v)| v.map(|v| (i, v)))
    }
}

#[cfg(test)]
mod id_table_tests {
    use super::IdTable;

    #[test]
    fn smallest_free_id_or_the_one_asked_for() {
        let mut t = IdTable::default();
        assert_eq!(t.insert(None, 'a'), 0);
        assert_eq!(t.insert(Some(5), 'f'), 5);
        assert_eq!(t.insert(None, 'b'), 1);
        assert!(t.contains(5) && !t.contains(4) && !t.contains(99));
        assert_eq!(t.remove(0), 'a');
        assert_eq!(t.insert(None, 'c'), 0);
        assert_eq!(t.len(), 3);
        // A held id is taken, and never given again.
        t.remove(1);
        t.hold(1);
        assert!(t.contains(1));
        assert_eq!(t.insert(None, 'd'), 2);
        assert_eq!((t.len(), t.taken()), (3, 4));
        let all: Vec<_> = t.into_iter().collect();
        assert_eq!(all, vec![(0, 'c'), (2, 'd'), (5, 'f')]);
    }
}
