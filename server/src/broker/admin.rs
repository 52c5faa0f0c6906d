//! The admin socket: what `nvmectl` asks (status, sessions, kill, health).
//!
//! A second SOCK_SEQPACKET socket with the client socket's framing (postcard datagrams, see
//! [`nvmed_proto::admin`]). Its file is mode 0600 (0660 with `--admin-group`), and every peer is
//! checked again with SO_PEERCRED: root, the broker's own uid, or a member of the admin group
//! (its gid or one of its supplementary groups from `/proc/PID/status`). Anyone else gets
//! [`AdminError::NotAuthorized`] and is disconnected. At most [`MAX_ADMIN_CONNECTIONS`] are
//! served at once, each on its own thread, and an idle one is closed after [`ADMIN_IDLE`].

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{accept4, getsockopt, setsockopt, sockopt, SockFlag, UnixCredentials};
use nix::sys::time::TimeVal;
use nvmed_proto::admin::{
    decode, encode, AdminError, AdminRequest, AdminResponse, ControllerReport, GrantReport, HealthReport,
    NamespaceReport, SessionReport, StatusReport, Totals, MAX_ADMIN_MESSAGE, SESSIONS_PAGE_MAX,
};
use nvmed_proto::transport::{self, TransportError};
use tracing::{debug, error, info, warn};

use super::manager::DeviceState;
use super::Shared;

/// Most admin connections served at once.
pub const MAX_ADMIN_CONNECTIONS: usize = 8;
/// An admin connection idle this long is closed (`nvmectl` connects for each request).
pub const ADMIN_IDLE: Duration = Duration::from_secs(5);

/// Who may use the admin socket besides root and the broker's own uid.
#[derive(Debug, Clone)]
pub struct AdminGroup {
    /// The group's name (for the refusal message).
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

/// The admin connections being served (to close them at shutdown).
#[derive(Debug, Default)]
struct Live {
    conns: Mutex<HashMap<u64, OwnedFd>>,
    ended: Condvar,
}

/// The running admin socket.
pub struct AdminServer {
    listener: OwnedFd,
    thread: Option<JoinHandle<()>>,
    live: Arc<Live>,
}

impl AdminServer {
    /// Serves `listener` (bound and listening) until [`AdminServer::stop`].
    pub fn start(
        listener: OwnedFd,
        shared: Arc<Shared>,
        group: Option<AdminGroup>,
        stopping: Arc<AtomicBool>,
    ) -> std::io::Result<Self> {
        let live = Arc::new(Live::default());
        let lfd = listener.try_clone()?;
        let l = live.clone();
        let thread = std::thread::Builder::new()
            .name("nvmed-admin".into())
            .spawn(move || accept_loop(lfd, shared, group, stopping, l))?;
        Ok(Self { listener, thread: Some(thread), live })
    }

    /// Stops accepting, closes the admin connections and waits (a little) for their threads.
    pub fn stop(mut self) {
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut conns = self.live.conns.lock().unwrap_or_else(|p| p.into_inner());
        for fd in conns.values() {
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !conns.is_empty() {
            let Some(left) = deadline.checked_duration_since(Instant::now()) else { break };
            conns = self.live.ended.wait_timeout(conns, left).unwrap_or_else(|p| p.into_inner()).0;
        }
    }
}

fn accept_loop(
    listener: OwnedFd,
    shared: Arc<Shared>,
    group: Option<AdminGroup>,
    stopping: Arc<AtomicBool>,
    live: Arc<Live>,
) {
    let next_id = AtomicU64::new(1);
    loop {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::Error::EINTR) | Err(nix::Error::ECONNABORTED) => continue,
            Err(e) => {
                if stopping.load(Ordering::SeqCst) {
                    return;
                }
                error!("admin accept failed: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let cred = match getsockopt(&sock, sockopt::PeerCredentials) {
            Ok(c) => c,
            Err(e) => {
                warn!("admin socket: SO_PEERCRED failed: {e}; dropping connection");
                continue;
            }
        };
        if !authorized(&cred, sock.as_fd(), group.as_ref()) {
            warn!(
                uid = cred.uid(),
                pid = cred.pid(),
                "admin socket: refusing a peer that is not an operator"
            );
            refuse(
                &sock,
                AdminError::NotAuthorized { uid: cred.uid(), group: group.as_ref().map(|g| g.name.clone()) },
            );
            continue;
        }
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut conns = live.conns.lock().unwrap_or_else(|p| p.into_inner());
            if conns.len() >= MAX_ADMIN_CONNECTIONS {
                drop(conns);
                warn!(uid = cred.uid(), "admin socket: too many connections; refusing one");
                refuse(&sock, AdminError::Busy { limit: MAX_ADMIN_CONNECTIONS });
                continue;
            }
            match sock.try_clone() {
                Ok(dup) => {
                    conns.insert(id, dup);
                }
                Err(e) => {
                    warn!("admin socket: cannot keep a handle on a connection: {e}; dropping it");
                    continue;
                }
            }
        }
        let (shared, l) = (shared.clone(), live.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("nvmed-admin-{id}"))
            .stack_size(256 << 10)
            .spawn(move || {
                serve(&shared, sock, cred);
                l.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                l.ended.notify_all();
            });
        if let Err(e) = spawned {
            error!("admin socket: cannot start a thread: {e}");
            live.conns.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }
}

/// Root, the broker's own uid, or a member of the admin group (the peer of `sock`, whose
/// credentials are `cred`).
pub(super) fn authorized(
    cred: &UnixCredentials,
    sock: std::os::fd::BorrowedFd<'_>,
    group: Option<&AdminGroup>,
) -> bool {
    if cred.uid() == 0 || cred.uid() == nix::unistd::geteuid().as_raw() {
        return true;
    }
    let Some(g) = group else { return false };
    cred.gid() == g.gid
        || transport::peer_groups(sock).unwrap_or_else(|| supplementary_groups(cred.pid())).contains(&g.gid)
}

/// A process's supplementary groups (the `Groups:` line of `/proc/PID/status`); empty if it
/// cannot be read (the process is gone: then it is refused). For kernels without
/// SO_PEERGROUPS.
fn supplementary_groups(pid: i32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    parse_groups(&status)
}

fn parse_groups(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Groups:"))
        .map(|g| g.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default()
}

/// Answers a peer that will not be served, then closes.
fn refuse(sock: &OwnedFd, e: AdminError) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let _ = transport::send(sock.as_fd(), &encode(&AdminResponse::Error(e)), &[]);
    // A peer sends its request right after connecting: give it a moment to arrive, so it is
    // consumed below and not left unread.
    let _ = poll(&mut [PollFd::new(sock.as_fd(), PollFlags::POLLIN)], PollTimeout::from(100u8));
    // Consume what the peer already sent: closing with unread data resets the connection and
    // the peer would not read the refusal.
    let mut scratch = [0u8; 64];
    // Bounded: a peer that keeps writing cannot hold the thread here.
    for _ in 0..16 {
        if !nix::sys::socket::recv(sock.as_raw_fd(), &mut scratch, nix::sys::socket::MsgFlags::MSG_DONTWAIT)
            .is_ok_and(|n| n > 0)
        {
            break;
        }
    }
}

/// Serves one operator connection until it closes or idles.
fn serve(shared: &Arc<Shared>, sock: OwnedFd, cred: UnixCredentials) {
    // Idle peers, and peers that never read their replies, give their slot up.
    let idle = TimeVal::new(ADMIN_IDLE.as_secs() as _, 0);
    if let Err(e) = setsockopt(&sock, sockopt::ReceiveTimeout, &idle)
        .and_then(|()| setsockopt(&sock, sockopt::SendTimeout, &idle))
    {
        warn!("admin socket: cannot set the idle timeouts: {e}; dropping connection");
        return;
    }
    // Room for the largest reply in one datagram (root may exceed net.core.wmem_max).
    let room = 2 * MAX_ADMIN_MESSAGE;
    if setsockopt(&sock, sockopt::SndBufForce, &room).is_err() {
        let _ = setsockopt(&sock, sockopt::SndBuf, &room);
    }
    loop {
        let msg = match transport::recv(sock.as_fd()) {
            Ok(m) => m,
            Err(TransportError::Closed) | Err(TransportError::Io(nix::Error::EAGAIN)) => return,
            Err(e) => {
                debug!("admin socket: receive failed: {e}");
                return;
            }
        };
        let resp = if msg.truncated {
            AdminResponse::Error(AdminError::Malformed("request too long".into()))
        } else {
            match decode::<AdminRequest>(&msg.bytes) {
                Ok(req) => {
                    debug!(uid = cred.uid(), pid = cred.pid(), ?req, "admin request");
                    handle(shared, req, &cred)
                }
                Err(e) => AdminResponse::Error(e),
            }
        };
        drop(msg); // any descriptor sent along is closed
        let mut bytes = encode(&resp);
        if bytes.len() > MAX_ADMIN_MESSAGE {
            bytes = encode(&AdminResponse::Error(AdminError::TooLarge { limit: MAX_ADMIN_MESSAGE }));
        }
        match transport::send(sock.as_fd(), &bytes, &[]) {
            Ok(()) => {}
            Err(TransportError::Io(nix::Error::EMSGSIZE)) => {
                let e = AdminResponse::Error(AdminError::TooLarge { limit: bytes.len() - 1 });
                let _ = transport::send(sock.as_fd(), &encode(&e), &[]);
            }
            Err(_) => return,
        }
    }
}

fn handle(shared: &Arc<Shared>, req: AdminRequest, cred: &UnixCredentials) -> AdminResponse {
    match req {
        AdminRequest::Status => AdminResponse::Status(status(shared)),
        AdminRequest::Sessions => {
            AdminResponse::Sessions(shared.registry.list().iter().map(|e| e.report()).collect())
        }
        AdminRequest::SessionsPage { after, max } => {
            let max = max.clamp(1, SESSIONS_PAGE_MAX) as usize;
            let (page, more) = shared.registry.page(after, max);
            let mut sessions: Vec<SessionReport> = page.iter().map(|e| e.report()).collect();
            let mut more = more;
            // Names are bounded, so a full page fits; should it not, fewer go (the rest follow).
            while sessions.len() > 1
                && encode(&AdminResponse::SessionsPage { sessions: sessions.clone(), more }).len()
                    > MAX_ADMIN_MESSAGE
            {
                sessions.truncate(sessions.len() / 2);
                more = true;
            }
            AdminResponse::SessionsPage { sessions, more }
        }
        AdminRequest::KillIf { session, uid, pid } => {
            let Some(entry) = shared.registry.get(session) else {
                return AdminResponse::Error(AdminError::UnknownSession(session));
            };
            let r = entry.report();
            if uid.is_some_and(|u| u != r.uid) || pid.is_some_and(|p| p != r.pid) {
                let named = |u: Option<u32>, p: Option<i32>| {
                    let mut parts = Vec::new();
                    if let Some(u) = u {
                        parts.push(format!("uid {u}"));
                    }
                    if let Some(p) = p {
                        parts.push(format!("pid {p}"));
                    }
                    parts.join(", ")
                };
                return AdminResponse::Error(AdminError::NotThatSession {
                    session,
                    expected: named(uid, pid),
                    found: named(uid.map(|_| r.uid), pid.map(|_| r.pid)),
                });
            }
            handle(shared, AdminRequest::Kill { session }, cred)
        }
        AdminRequest::ResetController { controller } => {
            let Some(c) = shared.ctrls.get(usize::from(controller)) else {
                return AdminResponse::Error(AdminError::UnknownController(controller));
            };
            let state = c.state();
            if !matches!(state, DeviceState::Running | DeviceState::FailedStopped) {
                // One that may still run, or is removed, is beyond a reset (see
                // ControllerShared::reset); one that stopped is tried again.
                return AdminResponse::Error(AdminError::Internal(format!(
                    "controller {controller} is {}: a reset cannot bring it back",
                    state_name(state)
                )));
            }
            warn!(
                controller,
                operator_uid = cred.uid(),
                operator_pid = cred.pid(),
                "controller reset by an operator"
            );
            c.reset(c.generation());
            // (`resets` is the controller's reset generation: removals count too.)
            AdminResponse::ControllerReset { state: state_name(c.state()).into(), resets: c.generation() }
        }
        AdminRequest::Kill { session } => match kill(shared, session) {
            Ok(()) => {
                info!(
                    session,
                    operator_uid = cred.uid(),
                    operator_pid = cred.pid(),
                    "session killed by an operator"
                );
                AdminResponse::Killed
            }
            Err(e) => AdminResponse::Error(e),
        },
        AdminRequest::Health => AdminResponse::Health(health(shared)),
        AdminRequest::Limits => {
            let policy = shared.policy_read().clone();
            AdminResponse::Limits {
                grants: policy
                    .grants
                    .iter()
                    .map(|g| GrantReport {
                        uid: g.uid,
                        nsid: g.nsid,
                        window: g.window,
                        read_only: g.read_only,
                        limits: g.qos.to_string(),
                    })
                    .collect(),
                // As the option spells it (`--default-access read-write`).
                default_access: clap::ValueEnum::to_possible_value(&policy.default)
                    .map_or_else(|| format!("{:?}", policy.default), |v| v.get_name().to_string()),
            }
        }
        AdminRequest::SetLimits { uid, nsid, limits } => {
            let qos: crate::policy::Qos = match limits.parse() {
                Ok(q) => q,
                Err(e) => return AdminResponse::Error(AdminError::BadLimits(e)),
            };
            match shared.set_limits(uid, nsid, qos) {
                Ok(r) => {
                    info!(operator_uid = cred.uid(), uid, nsid, limits = %qos, "limits changed by an operator");
                    AdminResponse::Reloaded { updated: r.updated as u64, ended: r.ended as u64 }
                }
                Err(e) => AdminResponse::Error(e),
            }
        }
        AdminRequest::Reload => match shared.reload_from_source() {
            Ok(r) => {
                info!(operator_uid = cred.uid(), "grants reloaded by an operator");
                AdminResponse::Reloaded { updated: r.updated as u64, ended: r.ended as u64 }
            }
            Err(e) => AdminResponse::Error(AdminError::Reload(e)),
        },
    }
}

fn status(shared: &Shared) -> StatusReport {
    let sessions = shared.registry.list();
    let mut totals = Totals::default();
    let mut registered_buffers = 0;
    for s in &sessions {
        // Every counter, the latency histogram and the throttled time included.
        super::registry::add(&mut totals, &s.totals());
        registered_buffers += s.buffers();
    }
    let controllers = shared
        .ctrls
        .iter()
        .zip(&shared.infos)
        .enumerate()
        .map(|(i, (c, info))| ControllerReport {
            index: i as u16,
            device: c.device().name(),
            model: info.model.clone(),
            serial: info.serial.clone(),
            firmware: info.firmware.clone(),
            max_transfer: info.max_transfer,
            queue_entries: shared.queue_entries.get(i).copied().unwrap_or(0),
            state: state_name(c.state()).into(),
        })
        .collect();
    StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: shared.started.elapsed().as_secs(),
        controllers,
        namespaces: shared
            .namespaces
            .iter()
            .map(|n| NamespaceReport {
                nsid: n.nsid,
                controller: n.controller,
                device_nsid: n.device_nsid,
                size_bytes: n.lba_count * u64::from(n.lba_size),
                lba_size: n.lba_size,
            })
            .collect(),
        io_threads: shared.io_thread_infos(),
        queue_depth: u32::from(shared.config.io_queue_depth),
        sessions: sessions.len() as u64,
        max_sessions: shared.config.max_sessions as u64,
        totals,
        registered_buffers,
        registered_bytes: shared.space.used(crate::iova::Area::Buffers),
    }
}

fn state_name(s: DeviceState) -> &'static str {
    match s {
        DeviceState::Running => "running",
        DeviceState::FailedStopped => "failed (stopped)",
        DeviceState::FailedRunning => "failed (not confirmed stopped)",
        DeviceState::Gone => "gone (removed)",
    }
}

/// Ends session `id` as a disconnect does, and returns once it is released.
fn kill(shared: &Shared, id: u64) -> Result<(), AdminError> {
    if !shared.registry.contains(id) {
        return Err(AdminError::UnknownSession(id));
    }
    // Its I/O may take up to the command timeout (and a reset) to drain.
    let limit = shared.config.io_timeout + Duration::from_secs(10);
    let deadline = Instant::now() + limit;
    let mut conns = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
    match conns.get(&id) {
        Some((_, fd)) => {
            shared.killed.lock().unwrap_or_else(|p| p.into_inner()).add(id);
            let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        }
        None => return Ok(()), // released meanwhile
    }
    while conns.contains_key(&id) {
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return Err(AdminError::Timeout(format!(
                "session {id} is still releasing its memory after {} s",
                limit.as_secs()
            )));
        };
        conns = shared.connection_ended.wait_timeout(conns, left).unwrap_or_else(|p| p.into_inner()).0;
    }
    Ok(())
}

fn health(shared: &Shared) -> Vec<HealthReport> {
    shared
        .ctrls
        .iter()
        .zip(&shared.infos)
        .enumerate()
        .map(|(i, (c, info))| {
            // Read now (an operator asking wants the figures as they are, not the metrics'
            // cached ones).
            let (smart, error) = match c.state() {
                DeviceState::Running => match c.smart_log() {
                    Ok(s) => (Some(s), None),
                    Err(e) => (None, Some(format!("Get Log Page (SMART / Health Information): {e}"))),
                },
                s => (None, Some(format!("controller {}", state_name(s)))),
            };
            HealthReport {
                controller: i as u16,
                device: c.device().name(),
                model: info.model.clone(),
                serial: info.serial.clone(),
                smart,
                error,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn supplementary_groups_from_proc_status() {
        let status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1001 \nVmPeak:\t1 kB\n";
        assert_eq!(parse_groups(status), vec![4, 24, 27, 1001]);
        assert_eq!(parse_groups("Groups:\t\n"), Vec::<u32>::new());
        assert_eq!(parse_groups(""), Vec::<u32>::new());
        // This process's own line parses.
        let _ = supplementary_groups(std::process::id() as i32);
    }
}
