//! One thread per client connection: the control protocol.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::channel;
use std::sync::Arc;

use nix::sys::socket::{getsockopt, setsockopt, sockopt};
use nix::sys::time::TimeVal;
use nvmed_proto::control::{decode, encode, MAX_FDS_PER_MESSAGE, MAX_MESSAGE_SIZE};
use nvmed_proto::layout::RingLayout;
use nvmed_proto::shm::SharedMemory;
use nvmed_proto::transport::{self, TransportError};
use nvmed_proto::{ControlError, NamespaceInfo, Request, Response, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use super::buffer::RegisteredBuffer;
use super::io_thread::IoRequest;
use super::quota::{Resource, Ticket};
use super::session::{RingIo, SessionCounters};
use super::Shared;
use crate::policy::NamespaceAccess;

struct Connection {
    shared: Arc<Shared>,
    sock: OwnedFd,
    uid: u32,
    pid: i32,
    id: u64,
    key: Option<usize>,
    /// The session's quota unit, held until the session is released.
    session_ticket: Option<Ticket>,
    namespaces: Vec<NamespaceAccess>,
    counters: Arc<SessionCounters>,
    /// Identity of the session's ring memfd, once created (it may not come back as a buffer).
    ring_identity: Option<(u64, u64)>,
}

/// Serves one client until it leaves, then drains and releases its session.
pub fn serve(shared: Arc<Shared>, sock: OwnedFd, id: u64, uid: u32) {
    let pid = getsockopt(&sock, sockopt::PeerCredentials).map_or(0, |c| c.pid());
    let mut conn = Connection {
        shared,
        sock,
        uid,
        pid,
        id,
        key: None,
        session_ticket: None,
        namespaces: Vec::new(),
        counters: Arc::new(SessionCounters::default()),
        ring_identity: None,
    };
    debug!(session = id, uid, pid, "client connected");
    // A connection that never says Hello must not hold its slot forever.
    let deadline = conn.shared.config.hello_timeout;
    if let Err(e) = setsockopt(&conn.sock, sockopt::ReceiveTimeout, &TimeVal::new(deadline.as_secs() as _, 0))
    {
        warn!(session = id, "cannot set the Hello deadline: {e}; dropping connection");
        return;
    }
    conn.run();
    if let Some(key) = conn.key {
        let (tx, rx) = channel();
        if conn.shared.io_tx.lock().unwrap().send(IoRequest::CloseSession { key, reply: tx }).is_ok() {
            conn.shared.kick();
            let _ = rx.recv();
        }
        conn.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        info!(session = id, uid, pid, "session ended; its I/O drained and its memory released");
    }
}

impl Connection {
    fn run(&mut self) {
        loop {
            let msg = match transport::recv(self.sock.as_fd()) {
                Ok(m) => m,
                Err(TransportError::Closed) => return,
                Err(TransportError::Io(nix::Error::EAGAIN)) if self.key.is_none() => {
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
                        let r = self.handle(req, msg.fds);
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
            let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
            if transport::send(self.sock.as_fd(), &encode(&resp), &borrowed).is_err() {
                return;
            }
        }
    }

    fn handle(&mut self, req: Request, fds: Vec<OwnedFd>) -> (Response, Vec<OwnedFd>) {
        let wants_fd = matches!(req, Request::RegisterBuffer { .. });
        if !wants_fd && !fds.is_empty() {
            return (Response::Error(ControlError::UnexpectedFd), vec![]);
        }
        let r = match req {
            Request::Hello { version, client_name } => self.hello(version, &client_name),
            _ if self.key.is_none() => Err(ControlError::HelloRequired),
            Request::ListNamespaces => Ok((Response::Namespaces(self.namespace_infos()), vec![])),
            Request::CreateRing { sq_entries, cq_entries } => self.create_ring(sq_entries, cq_entries),
            Request::RegisterBuffer { offset, len } => self.register(offset, len, fds),
            Request::UnregisterBuffer { buffer_id } => self.unregister(buffer_id),
            Request::Stats => {
                let mut s = self.counters.snapshot();
                s.broker_sessions = self.shared.quotas.held(Resource::Session);
                s.broker_buffer_iova_bytes = self.shared.space.used(crate::iova::Area::Buffers);
                s.device_dma_bytes = self.shared.device.dma_data_bytes();
                let c = &self.shared.counters;
                s.broker_bounced_bytes = c.bounced_bytes.load(Ordering::Relaxed);
                s.broker_sgl_commands = c.sgl_commands.load(Ordering::Relaxed);
                s.broker_vectored_prp_commands = c.vectored_prp_commands.load(Ordering::Relaxed);
                Ok((Response::Stats(s), vec![]))
            }
            Request::Goodbye => Ok((Response::Goodbye, vec![])),
        };
        r.unwrap_or_else(|e| (Response::Error(e), vec![]))
    }

    fn hello(&mut self, version: u32, name: &str) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if self.key.is_some() {
            return Err(ControlError::DuplicateHello);
        }
        if version != PROTOCOL_VERSION {
            return Err(ControlError::VersionMismatch { client: version, broker: PROTOCOL_VERSION });
        }
        let ticket = self.shared.quotas.acquire(Resource::Session, self.uid)?;
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        self.namespaces = self.shared.config.policy.access_for(self.uid, &self.shared.namespaces);
        let (tx, rx) = channel();
        let req = IoRequest::AddSession {
            id: self.id,
            namespaces: self.namespaces.clone(),
            counters: self.counters.clone(),
            reply: tx,
        };
        self.shared.request(req);
        let key = rx.recv().map_err(|_| ControlError::Internal("I/O thread stopped".into()));
        let key = match key {
            Ok(k) => k,
            Err(e) => {
                self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
                return Err(e);
            }
        };
        self.key = Some(key);
        self.session_ticket = Some(ticket);
        // Said Hello: no deadline for the next requests.
        if let Err(e) = setsockopt(&self.sock, sockopt::ReceiveTimeout, &TimeVal::new(0, 0)) {
            warn!(session = self.id, "cannot clear the Hello deadline: {e}");
        }
        info!(
            session = self.id,
            uid = self.uid,
            pid = self.pid,
            client = name,
            namespaces = self.namespaces.len(),
            "session started"
        );
        Ok((Response::Hello { version: PROTOCOL_VERSION, session_id: self.id }, vec![]))
    }

    fn namespace_infos(&self) -> Vec<NamespaceInfo> {
        self.namespaces
            .iter()
            .map(|n| NamespaceInfo {
                nsid: n.nsid,
                lba_size: n.lba_size,
                lba_count: n.lba_count,
                max_transfer: self.shared.limits.max_request,
                read_only: n.read_only,
            })
            .collect()
    }

    fn create_ring(&mut self, sq: u32, cq: u32) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if self.ring_identity.is_some() {
            return Err(ControlError::RingExists);
        }
        let layout = RingLayout::new(sq, cq).map_err(|e| ControlError::BadRingSize(e.to_string()))?;
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
        let submit = nvmed_proto::eventfd::new_eventfd().map_err(|e| internal("eventfd", &e))?;
        let complete = nvmed_proto::eventfd::new_eventfd().map_err(|e| internal("eventfd", &e))?;
        let identity = super::buffer::file_identity(memfd.as_file());
        let fds: Vec<OwnedFd> = vec![
            memfd.into_file().into(),
            submit.try_clone().map_err(|e| internal("dup", &e))?,
            complete.try_clone().map_err(|e| internal("dup", &e))?,
        ];
        let (tx, rx) = channel();
        let ring = Box::new(RingIo::new(mem, &layout, submit, complete));
        self.shared.request(IoRequest::AddRing { key: self.key.unwrap(), ring, reply: tx });
        rx.recv().map_err(|_| ControlError::Internal("I/O thread stopped".into()))?;
        self.ring_identity = Some(identity.unwrap_or((u64::MAX, u64::MAX)));
        Ok((Response::RingCreated { sq_entries: sq, cq_entries: cq, size: layout.total_size as u64 }, fds))
    }

    fn register(
        &mut self,
        offset: u64,
        len: u64,
        mut fds: Vec<OwnedFd>,
    ) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        if fds.len() > 1 {
            return Err(ControlError::TooManyFds { limit: 1 });
        }
        let fd = fds.pop().ok_or(ControlError::MissingFd)?;
        let cfg = &self.shared.config;
        let count = self.counters.buffers.load(Ordering::Relaxed);
        if count >= cfg.max_buffers_per_session {
            return Err(ControlError::BufferLimit(format!(
                "at most {} buffers per session",
                cfg.max_buffers_per_session
            )));
        }
        let used = self.counters.buffer_bytes.load(Ordering::Relaxed);
        let left = cfg.max_buffer_bytes_per_session.saturating_sub(used);
        // Each buffer is one mapping in the broker: bounded per uid and in all, well below
        // vm.max_map_count, so mappings can never run out for the broker's own needs.
        let ticket = self.shared.quotas.acquire(Resource::Buffer, self.uid)?;
        let buffer = RegisteredBuffer::register(
            fd,
            offset,
            len,
            left,
            &self.shared.space,
            &self.shared.device,
            ticket,
            self.ring_identity,
        )?;
        let (tx, rx) = channel();
        self.shared.request(IoRequest::AddBuffer { key: self.key.unwrap(), buffer, reply: tx });
        let buffer_id = rx.recv().map_err(|_| ControlError::Internal("I/O thread stopped".into()))?;
        debug!(session = self.id, buffer_id, len, "buffer registered");
        Ok((Response::BufferRegistered { buffer_id }, vec![]))
    }

    fn unregister(&mut self, buffer_id: u32) -> Result<(Response, Vec<OwnedFd>), ControlError> {
        let (tx, rx) = channel();
        self.shared.request(IoRequest::RemoveBuffer { key: self.key.unwrap(), buffer_id, reply: tx });
        rx.recv().map_err(|_| ControlError::Internal("I/O thread stopped".into()))??;
        Ok((Response::BufferUnregistered, vec![]))
    }
}
