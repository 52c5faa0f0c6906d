//! The broker: control socket, sessions, and the I/O thread.

pub mod admin;
mod buffer;
mod control;
mod io_thread;
pub mod manager;
pub mod metrics;
pub mod pacing;
mod quota;
pub(crate) mod ratelog;
mod reaper;
mod registry;
pub mod sched;
mod session;
mod tenant;
pub mod validate;

pub use quota::{max_map_count, raise_fd_limit, QuotaRequest, QuotaSettings};

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::socket::{accept4, bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
use nvmed_proto::{ControlError, Response};
use tracing::{error, info, warn};

use io_thread::{IoRequest, IoThread, IoThreadSetup};
use quota::{Quotas, Resource};
use reaper::Reaper;
use validate::DeviceLimits;

use crate::device::NvmeDevice;
use crate::iova::IovaSpace;
use crate::nvme::{Controller, DriverError, IoQueue};
use crate::policy::{Policy, ServedNamespace};

/// Broker settings.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// Unix socket path.
    pub socket: PathBuf,
    /// Socket file permission bits.
    pub socket_mode: u32,
    /// Group to own the socket file.
    pub socket_group: Option<String>,
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// Entries of the device I/O queue.
    pub io_queue_depth: u16,
    /// Longest the I/O thread keeps polling without work before it sleeps while commands are at
    /// the device (adaptive below that: see `nvmed_proto::wakeup::adapt_poll`).
    pub poll_idle: Duration,
    /// The same while no command is at the device (waiting for clients only).
    pub poll_clients: Duration,
    /// Access rules.
    pub policy: Policy,
    /// Most buffers one session may register.
    pub max_buffers_per_session: u64,
    /// Most bytes one session may register.
    pub max_buffer_bytes_per_session: u64,
    /// Most bytes all sessions together may register.
    pub max_buffer_bytes_total: u64,
    /// A command the device has not completed after this long is aborted (and its controller
    /// reset if that does not end it).
    pub io_timeout: Duration,
    /// How often a command is sent to the device at most (retryable statuses, resets).
    pub io_tries: u8,
    /// Abort a command that timed out before resetting the controller.
    pub aborts: bool,
    /// Let the I/O queue raise interrupts, so the broker can sleep while I/O is in flight.
    /// Without them the queue is purely polled (fewer interrupts to pay for, e.g. in a VM).
    pub interrupts: bool,
    /// Bounds on connections, sessions and buffers, per uid and broker-wide.
    pub quotas: QuotaSettings,
    /// How long a new connection may take to say Hello.
    pub hello_timeout: Duration,
    /// Control requests per second one uid may send (see [`pacing`]); 0: no limit.
    pub control_rate_per_uid: u64,
    /// I/O threads, each with its own device queue pair (fewer if the controller grants fewer
    /// queues).
    pub io_threads: u16,
    /// CPUs to pin the I/O threads to, one each in turn (none: not pinned).
    pub cpus: Vec<usize>,
    /// Most rings one session may have.
    pub max_rings_per_session: u32,
    /// While tenants contend, the cost all of them together may have at a device (shared by
    /// weight; each may always have one request there), in 512-byte units of the scheduler's
    /// cost; `u64::MAX`: no cap.
    pub contended_cost: u64,
    /// The operators' socket (`nvmectl`); `None`: none.
    pub admin_socket: Option<PathBuf>,
    /// Group whose members may use the admin socket (then mode 0660), besides root.
    pub admin_group: Option<String>,
    /// Permission bits of the admin socket file instead of 0600 / 0660 (tests: let a peer that
    /// is not an operator reach the broker's own check).
    pub admin_socket_mode: Option<u32>,
    /// Where to serve Prometheus metrics over HTTP (`GET /metrics`); `None`: nowhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// A bearer token the metrics endpoint requires (`Authorization: Bearer <token>`).
    pub metrics_token: Option<String>,
    /// A listening socket to serve instead of binding `socket` (systemd socket activation:
    /// [`crate::activation`]); its path is then the service manager's, never removed here.
    pub listener: Option<Arc<OwnedFd>>,
}

impl BrokerConfig {
    /// Defaults with the given socket path.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            socket_mode: 0o660,
            socket_group: None,
            max_sessions: 64,
            io_queue_depth: 1024,
            poll_idle: Duration::from_micros(200),
            poll_clients: Duration::from_micros(50),
            policy: Policy { grants: vec![], default: crate::policy::DefaultAccess::ReadWrite },
            max_buffers_per_session: 1024,
            max_buffer_bytes_per_session: 4 << 30,
            max_buffer_bytes_total: 16 << 30,
            io_timeout: Duration::from_secs(30),
            io_tries: 6,
            aborts: true,
            interrupts: true,
            quotas: QuotaSettings::for_sessions(64),
            hello_timeout: Duration::from_secs(5),
            control_rate_per_uid: 1000,
            io_threads: 1,
            cpus: Vec::new(),
            max_rings_per_session: 64,
            contended_cost: u64::MAX,
            admin_socket: None,
            admin_group: None,
            admin_socket_mode: None,
            metrics_listen: None,
            metrics_token: None,
            listener: None,
        }
    }
}

/// Broker start-up and shutdown failures.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The NVMe driver failed.
    #[error("NVMe driver: {0}")]
    Driver(#[from] DriverError),
    /// The controller has no namespace the broker can serve (the refused ones, with reasons).
    #[error("the controller has no usable namespace{}", crate::nvme::controller::skipped_reasons(.0))]
    NoNamespace(Vec<(u32, String)>),
    /// Socket setup failed.
    #[error("socket {path}: {source}")]
    Socket {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics endpoint cannot listen.
    #[error("metrics endpoint {addr}: {source}")]
    Metrics {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Another broker already listens on the socket.
    #[error("another broker is already listening on {0}")]
    SocketInUse(PathBuf),
    /// Thread or eventfd creation failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// IOVA space setup failed.
    #[error("IOVA space: {0}")]
    Iova(#[from] crate::iova::IovaError),
    /// The grants cannot be put in force on these namespaces.
    #[error("refusing the grants: {0}")]
    Policy(#[from] crate::policy::PolicyError),
}

/// The control side's handle on one I/O thread.
pub struct Poller {
    tx: Mutex<Sender<IoRequest>>,
    requests_pending: Arc<session::CachePadded<AtomicBool>>,
    wake: Arc<OwnedFd>,
    /// Rings it serves (placement picks the thread with the fewest).
    rings: AtomicUsize,
    counters: Arc<session::BrokerCounters>,
}

impl Poller {
    /// Sends a request and wakes the thread; false if the thread is gone.
    fn request(&self, req: IoRequest) -> bool {
        let sent = self.tx.lock().unwrap_or_else(|p| p.into_inner()).send(req).is_ok();
        self.requests_pending.store(true, Ordering::Release);
        nvmed_proto::eventfd::signal(self.wake.as_fd());
        sent
    }
}

/// State shared by the control threads.
pub struct Shared {
    config: BrokerConfig,
    devices: Vec<Arc<dyn NvmeDevice>>,
    /// Where client buffers are mapped: every controller.
    dma: Arc<dyn crate::device::Dma>,
    space: Arc<IovaSpace>,
    namespaces: Vec<ServedNamespace>,
    /// Each controller's limits.
    limits: Vec<DeviceLimits>,
    pollers: Vec<Poller>,
    sessions: AtomicU64,
    quotas: Arc<Quotas>,
    /// Each uid's pace of control requests.
    pacer: pacing::Pacer,
    /// Where sessions' buffers go when they end (taken at shutdown).
    reaper: Mutex<Option<Reaper>>,
    /// Live connections (their uid and socket), to close them at shutdown and to tell which
    /// are ending.
    connections: Mutex<std::collections::HashMap<u64, (u32, OwnedFd)>>,
    /// Signalled when a connection ends.
    connection_ended: std::sync::Condvar,
    /// Sessions an operator ended (`nvmectl kill`): their rings say so, and their clients may
    /// not resume them.
    killed: Mutex<KilledSessions>,
    /// Each tenant's rings per I/O thread (to split its limits between those threads).
    placement: Mutex<tenant::Placement>,
    /// The grants in force (replaced by a reload).
    policy: std::sync::RwLock<Policy>,
    /// Reads the grants again from where they came from (the daemon's configuration).
    reloader: Mutex<Option<Reloader>>,
    /// Reloads of the configuration (SIGHUP, `nvmectl reload`): put in force, refused.
    reloads: [std::sync::atomic::AtomicU64; 2],
    /// Whether the last reload of the configuration was put in force (true before any).
    last_reload_ok: AtomicBool,
    /// Each controller's last SMART log and when it was read (clients may ask often; the admin
    /// queue is asked at most once a second).
    smart: Vec<Mutex<Option<SmartRead>>>,
    /// The live sessions, for the operators.
    registry: Arc<registry::Registry>,
    /// The controllers (their admin queues), in broker order.
    ctrls: Vec<Arc<manager::ControllerShared>>,
    /// What Identify told about each controller.
    infos: Vec<crate::nvme::ControllerInfo>,
    /// Entries of each controller's I/O queues, as granted.
    queue_entries: Vec<u32>,
    /// When the broker started.
    started: std::time::Instant,
    /// The admin group (`--admin-group`), whose members are operators like root.
    admin_group: Option<admin::AdminGroup>,
    /// Tests: called where a race with a reload would hurt (see [`HookPoint`]).
    #[cfg(test)]
    hook: Mutex<Option<Hook>>,
}

/// A test hook (see [`HookPoint`]).
#[cfg(test)]
type Hook = Arc<dyn Fn(HookPoint) + Send + Sync>;

/// Where [`Shared::hook`] is called (tests only).
#[cfg(test)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum HookPoint {
    /// Hello resolved the session's access, before the session is registered.
    HelloResolved,
    /// A limits change read the grants in force, before it puts the changed ones in force.
    SetLimitsRead,
}

/// A controller's SMART log (or why it could not be read), and when it was read.
type SmartRead = (std::time::Instant, Result<nvmed_proto::admin::SmartLog, String>);

/// Reads the grants again (e.g. the daemon's command line and configuration file); an error
/// says why the configuration is refused.
pub type Reloader = Box<dyn Fn() -> Result<Policy, String> + Send>;

/// What a reload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Sessions whose grants changed and were updated in place.
    pub updated: usize,
    /// Sessions ended because they lost a namespace or changed tenant.
    pub ended: usize,
}

impl Shared {
    /// Controller `c`'s SMART log, read again if the last one is over a second old.
    /// (One cache entry per controller: a controller slow to answer holds up only its own.)
    fn smart(&self, c: usize) -> Result<nvmed_proto::admin::SmartLog, String> {
        let mut cache = self.smart[c].lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, r)) = &*cache {
            if at.elapsed() < Duration::from_secs(1) {
                return r.clone();
            }
        }
        let ctrl = &self.ctrls[c];
        let r = match ctrl.state() {
            manager::DeviceState::Running => ctrl.smart_log().map_err(|e| e.to_string()),
            s => Err(format!("the controller is {s:?}")),
        };
        *cache = Some((std::time::Instant::now(), r.clone()));
        r
    }

    /// Tests: runs the hook set for this point, if any.
    #[cfg(test)]
    fn hook(&self, at: HookPoint) {
        let hook = self.hook.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(h) = hook {
            h(at);
        }
    }

    /// Reloads through the reloader, if the broker has one. The reloader stays locked until
    /// the grants it read are in force, so two reloads (SIGHUP and `nvmectl reload`) put theirs
    /// in force in the order they read them.
    fn reload_from_source(&self) -> Result<ReloadReport, String> {
        let reloader = self.reloader.lock().unwrap_or_else(|p| p.into_inner());
        let result = match &*reloader {
            Some(r) => r().and_then(|policy| self.reload(policy)),
            None => return Err("this broker was started without a configuration to read again".into()),
        };
        // Counted under the reloader's lock: the last one counted is the last one done.
        self.reloads[usize::from(result.is_err())].fetch_add(1, Ordering::Relaxed);
        self.last_reload_ok.store(result.is_ok(), Ordering::Relaxed);
        result
    }

    /// Reloads of the configuration: (put in force, refused), and whether the last one was
    /// put in force.
    fn reload_counts(&self) -> (u64, u64, bool) {
        (
            self.reloads[0].load(Ordering::Relaxed),
            self.reloads[1].load(Ordering::Relaxed),
            self.last_reload_ok.load(Ordering::Relaxed),
        )
    }

    /// The grants in force, for reading (a session's access is resolved under this lock, and a
    /// reload holds it for writing until every session has its new grants).
    fn policy_read(&self) -> std::sync::RwLockReadGuard<'_, Policy> {
        self.policy.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `policy` and puts it in force; an error says why it is refused (the grants in
    /// force stay).
    fn reload(&self, policy: Policy) -> Result<ReloadReport, String> {
        let mut current = self.policy.write().unwrap_or_else(|p| p.into_inner());
        self.put_in_force(&mut current, policy)
    }

    /// Changes one grant's limits (`nvmectl limits UID NSID LIMITS`): read, changed and put in
    /// force under one write lock, so a reload cannot slip in between and be undone.
    fn set_limits(
        &self,
        uid: u32,
        nsid: u32,
        qos: crate::policy::Qos,
    ) -> Result<ReloadReport, nvmed_proto::admin::AdminError> {
        let mut current = self.policy.write().unwrap_or_else(|p| p.into_inner());
        let mut policy = current.clone();
        #[cfg(test)]
        self.hook(HookPoint::SetLimitsRead);
        let Some(g) = policy.grants.iter_mut().find(|g| g.uid == uid && g.nsid == nsid) else {
            return Err(nvmed_proto::admin::AdminError::UnknownGrant { uid, nsid });
        };
        g.qos = qos;
        self.put_in_force(&mut current, policy).map_err(nvmed_proto::admin::AdminError::Reload)
    }

    /// Puts `policy` in force (the caller holds the write lock, `current`): every registered
    /// session gets its new grants before the lock is let go, and a session saying Hello
    /// meanwhile waits for the lock, so it is either registered before (and updated here) or
    /// resolves its access from the new grants. Nothing on the I/O path takes this lock.
    fn put_in_force(&self, current: &mut Policy, policy: Policy) -> Result<ReloadReport, String> {
        if let Err(e) = policy.check(&self.namespaces) {
            warn!("grants refused, those in force stay: {e}");
            return Err(e.to_string());
        }
        *current = policy.clone();
        let mut report = ReloadReport::default();
        for entry in self.registry.list() {
            let new = policy.access_for(entry.uid(), &self.namespaces);
            let mut access = entry.access();
            if access.withdrawn {
                // An earlier reload ended it: its rings get the new grants, on what they may
                // still reach only (a namespace withdrawn does not come back to a session
                // being ended); it is not counted or ended again.
                access.still_reached.retain(|id| new.iter().any(|n| n.nsid == *id));
                let reach: Vec<_> =
                    new.iter().filter(|n| access.still_reached.contains(&n.nsid)).cloned().collect();
                for &(_, thread, key) in &access.rings {
                    self.pollers[thread].request(IoRequest::UpdateRing { key, namespaces: reach.clone() });
                }
                continue;
            }
            if access.namespaces == new {
                continue;
            }
            let keys = |ns: &[crate::policy::NamespaceAccess]| -> Vec<tenant::TenantKey> {
                tenant::tenants_of(ns, entry.uid(), entry.id()).into_iter().map(|(k, _)| k).collect()
            };
            let lost = access.namespaces.iter().any(|old| !new.iter().any(|n| n.nsid == old.nsid));
            if lost || keys(&access.namespaces) != keys(&new) {
                // Ended like a disconnect, but only its receiving side is shut: its control
                // thread sees the end, drains the rings (their I/O in flight completes into
                // their CQs, then they say Closed) and releases the session; its client sees
                // the connection close only after that, when the broker closes the socket.
                if let Some((_, fd)) =
                    self.connections.lock().unwrap_or_else(|p| p.into_inner()).get(&entry.id())
                {
                    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Read);
                }
                // Until its control thread gets to it (it may be waiting for the client to read
                // a reply, with more requests queued), the session adds no ring, and its rings
                // hold to the new grants at once: nothing to what was withdrawn, and the new
                // rights (a window, read-only) on what is kept.
                access.withdrawn = true;
                let kept: Vec<_> = new
                    .iter()
                    .filter(|n| access.namespaces.iter().any(|o| o.nsid == n.nsid))
                    .cloned()
                    .collect();
                access.still_reached = kept.iter().map(|n| n.nsid).collect();
                for &(_, thread, key) in &access.rings {
                    self.pollers[thread].request(IoRequest::UpdateRing { key, namespaces: kept.clone() });
                }
                // (`access.namespaces` stays as it was: the session's tenants are let go of by
                // the keys its rings were placed under.)
                info!(
                    session = entry.id(),
                    uid = entry.uid(),
                    "grants changed: a namespace was withdrawn or the tenant changed; ending the session"
                );
                report.ended += 1;
                continue;
            }
            for &(_, thread, key) in &access.rings {
                self.pollers[thread].request(IoRequest::UpdateRing { key, namespaces: new.clone() });
            }
            {
                // Sent while the placement is held (see the session's `create_ring`).
                let mut placement = self.placement.lock().unwrap_or_else(|p| p.into_inner());
                for (key, qos) in tenant::tenants_of(&new, entry.uid(), entry.id()) {
                    for (t, key, limits) in placement.update(key, qos) {
                        self.pollers[t].request(IoRequest::SetTenantLimits { key, limits });
                    }
                }
            }
            access.namespaces = new;
            report.updated += 1;
        }
        info!(updated = report.updated, ended = report.ended, "grants reloaded");
        Ok(report)
    }

    /// Each I/O thread's rings and device commands (for clients and operators).
    fn io_thread_infos(&self) -> Vec<nvmed_proto::IoThreadInfo> {
        self.pollers
            .iter()
            .map(|p| nvmed_proto::IoThreadInfo {
                rings: p.rings.load(Ordering::Relaxed) as u64,
                device_commands: p.counters.device_commands.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The I/O thread with the fewest rings.
    fn least_loaded(&self) -> usize {
        (0..self.pollers.len()).min_by_key(|&i| self.pollers[i].rings.load(Ordering::Relaxed)).unwrap_or(0)
    }

    /// A connection's thread is done with it.
    fn connection_done(&self, id: u64) {
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        self.connection_ended.notify_all();
    }

    /// Waits until no other connection of `uid` whose client is gone (its socket hung up) is
    /// still releasing its session; returns how many there were, or `None` on timeout.
    fn await_drained(&self, uid: u32, me: u64, timeout: Duration) -> Option<u32> {
        let deadline = std::time::Instant::now() + timeout;
        let ending = |conns: &std::collections::HashMap<u64, (u32, OwnedFd)>| -> Vec<u64> {
            conns
                .iter()
                .filter(|(&id, (u, fd))| *u == uid && id != me && hung_up(fd))
                .map(|(&id, _)| id)
                .collect()
        };
        let mut conns = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let first = ending(&conns);
        loop {
            // Only those ending when asked are waited for (later ones are not our concern).
            if !first.iter().any(|id| conns.contains_key(id)) {
                return Some(first.len() as u32);
            }
            // The asker's own session ended meanwhile (it hung up, was killed or withdrawn, or
            // the broker is stopping): no one is waiting any more.
            if conns.get(&me).is_none_or(|(_, fd)| nvmed_proto::transport::peer_closed(fd.as_fd())) {
                return None;
            }
            let left = deadline.checked_duration_since(std::time::Instant::now())?;
            let slice = left.min(Duration::from_millis(100));
            conns = self.connection_ended.wait_timeout(conns, slice).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    /// Drops `what` (uid `owner`'s) on the reaper thread (inline once the broker is shutting
    /// down).
    fn dispose_then_notify<T: Send + 'static>(&self, owner: u32, what: T, reply: Sender<()>) {
        let reaper = self.reaper.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match reaper {
            Some(r) => r.dispose_then_notify(owner, what, Some(reply)),
            None => {
                drop(what);
                let _ = reply.send(());
            }
        }
    }
}

/// A running broker.
pub struct Broker {
    shared: Arc<Shared>,
    listener: OwnedFd,
    stopping: Arc<AtomicBool>,
    accept_thread: Option<JoinHandle<()>>,
    io_threads: Vec<JoinHandle<()>>,
    reaper_thread: Option<JoinHandle<()>>,
    ctrls: Vec<Arc<manager::ControllerShared>>,
    admin: Option<admin::AdminServer>,
    metrics: Option<metrics::MetricsServer>,
    /// (device, inode) of the socket file it bound.
    socket_id: Option<(u64, u64)>,
    /// (device, inode) of the admin socket file it bound.
    admin_id: Option<(u64, u64)>,
    /// Threads waiting for a controller's hot unplug.
    unplug_watchers: Vec<JoinHandle<()>>,
}

/// (device, inode) of a file.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Whether `path` is still the file `id` names.
fn same_file(path: &Path, id: Option<(u64, u64)>) -> bool {
    id.is_some() && file_id(path) == id
}

/// Makes a listening socket's connections refuse descriptors (SCM_RIGHTS) until a session's
/// thread takes them on (Linux 6.16+; a no-op before): the accept thread, which closes the
/// connections it refuses, then never closes a descriptor a client sent (closing some files
/// blocks as long as their sender likes: a TCP socket with `SO_LINGER` and unsent data). The
/// admin socket's connections never take any.
fn refuse_descriptors(listener: &OwnedFd) {
    if let Err(e) = nvmed_proto::transport::accept_descriptors(listener.as_fd(), false) {
        tracing::debug!("cannot make connections refuse descriptors (SO_PASSRIGHTS needs Linux 6.16): {e}");
    }
}

/// Binds a listening socket at `path`, atomically: it is bound at a temporary name beside it,
/// given its mode and group, and listening before it is renamed over `path`, so a client never
/// finds a socket file that refuses it or has the wrong permissions (a stale one from a broker
/// that died is replaced in one step; a live broker's is left alone).
fn bind_socket(path: &Path, mode: u32, group: Option<&str>) -> Result<OwnedFd, BrokerError> {
    let err = |source| BrokerError::Socket { path: path.to_path_buf(), source };
    let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
        .map_err(|e| err(e.into()))?;
    // Connections refuse descriptors until they are admitted (inherited; see `refuse_descriptors`).
    refuse_descriptors(&fd);
    if path.exists() {
        // A live broker answers; a stale socket file is replaced below.
        let probe = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| err(e.into()))?;
        let addr = UnixAddr::new(path).map_err(|e| err(e.into()))?;
        if nix::sys::socket::connect(probe.as_raw_fd(), &addr).is_ok() {
            return Err(BrokerError::SocketInUse(path.to_path_buf()));
        }
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".new-{}", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let placed = (|| {
        let addr = UnixAddr::new(&tmp).map_err(|e| err(e.into()))?;
        bind(fd.as_raw_fd(), &addr).map_err(|e| err(e.into()))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        if let Some(name) = group {
            let g = nix::unistd::Group::from_name(name)
                .map_err(|e| err(e.into()))?
                .ok_or_else(|| err(std::io::Error::other(format!("no group named {name:?}"))))?;
            nix::unistd::chown(&tmp, None, Some(g.gid)).map_err(|e| err(e.into()))?;
        }
        listen(&fd, Backlog::new(128).unwrap()).map_err(|e| err(e.into()))?;
        std::fs::rename(&tmp, path).map_err(err)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(fd)
}

/// Binds the admin socket, if configured: mode 0600, or 0660 and owned by the admin group.
fn bind_admin(config: &BrokerConfig) -> Result<Option<(OwnedFd, Option<admin::AdminGroup>)>, BrokerError> {
    let Some(path) = &config.admin_socket else { return Ok(None) };
    let group = match &config.admin_group {
        None => None,
        Some(name) => {
            let g = nix::unistd::Group::from_name(name)
                .map_err(|e| BrokerError::Socket { path: path.clone(), source: e.into() })?
                .ok_or_else(|| BrokerError::Socket {
                    path: path.clone(),
                    source: std::io::Error::other(format!("no group named {name:?} (--admin-group)")),
                })?;
            Some(admin::AdminGroup { name: name.clone(), gid: g.gid.as_raw() })
        }
    };
    let mode = config.admin_socket_mode.unwrap_or(if group.is_some() { 0o660 } else { 0o600 });
    let fd = bind_socket(path, mode, config.admin_group.as_deref())?;
    Ok(Some((fd, group)))
}

impl Broker {
    /// Where the metrics endpoint listens, if it does (the port chosen, if 0 was asked for).
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }

    /// The admin socket path, if it has one.
    pub fn admin_socket(&self) -> Option<&Path> {
        self.shared.config.admin_socket.as_deref()
    }

    /// Brings up the controller, creates the I/O queues, and starts serving on the socket.
    pub fn start(device: Arc<dyn NvmeDevice>, config: BrokerConfig) -> Result<Self, BrokerError> {
        Self::start_many(vec![device], config)
    }

    /// Brings up every controller (their namespaces are numbered broker-wide in this order),
    /// creates each I/O thread's queue on each of them, and starts serving on the socket.
    pub fn start_many(devices: Vec<Arc<dyn NvmeDevice>>, config: BrokerConfig) -> Result<Self, BrokerError> {
        assert!(!devices.is_empty(), "a broker needs a controller");
        // One IOVA space for all: a client buffer is mapped at the same IOVA in every
        // controller's IOMMU, so any thread may send it to any controller.
        let ranges = intersect_ranges(devices.iter().map(|d| d.iova_ranges()));
        let internal = internal_area_bytes(devices.len(), config.io_threads, config.io_queue_depth);
        let space = Arc::new(IovaSpace::with_internal_area(&ranges, internal)?);
        space.set_buffer_limit(config.max_buffer_bytes_total);
        // The socket first: its errors (in use, bad path) are the common ones, and must not
        // leave a controller enabled behind.
        let listener = match &config.listener {
            Some(fd) => {
                let fd = fd
                    .try_clone()
                    .map_err(|source| BrokerError::Socket { path: config.socket.clone(), source })?;
                refuse_descriptors(&fd);
                fd
            }
            None => bind_socket(&config.socket, config.socket_mode, config.socket_group.as_deref())?,
        };
        if !nvmed_proto::transport::descriptors_refusable() {
            info!(
                "this kernel cannot make sockets refuse descriptors (SO_PASSRIGHTS, Linux 6.16+): \
                 a client over its connection limit could hold the accept thread while a descriptor \
                 it sent closes (doorbells are guarded on every kernel)"
            );
        }
        let ours = config.listener.is_none();
        let socket_id = if ours { file_id(&config.socket) } else { None };
        let admin_listener = match bind_admin(&config) {
            Ok(a) => a,
            Err(e) => {
                if ours {
                    let _ = std::fs::remove_file(&config.socket);
                }
                return Err(e);
            }
        };
        let admin_id = match (&admin_listener, &config.admin_socket) {
            (Some(_), Some(p)) => file_id(p),
            _ => None,
        };
        let metrics_listener = match config.metrics_listen {
            None => None,
            Some(addr) => match std::net::TcpListener::bind(addr) {
                Ok(l) => Some(l),
                Err(source) => {
                    if ours {
                        let _ = std::fs::remove_file(&config.socket);
                    }
                    if let Some(p) = &config.admin_socket {
                        let _ = std::fs::remove_file(p);
                    }
                    return Err(BrokerError::Metrics { addr, source });
                }
            },
        };
        let unbind = |e: BrokerError| {
            if ours {
                let _ = std::fs::remove_file(&config.socket);
            }
            if let Some(p) = &config.admin_socket {
                let _ = std::fs::remove_file(p);
            }
            e
        };
        let mut controllers = Vec::new();
        let fail = |controllers: &mut Vec<Controller>, e: BrokerError| {
            // Leave every controller shut down (CC.SHN), whatever went wrong.
            for c in controllers.iter_mut() {
                if let Err(e) = c.shutdown() {
                    error!("controller shutdown failed: {e}");
                }
            }
            unbind(e)
        };
        for d in &devices {
            match Controller::init(d.clone(), space.clone()) {
                Ok(c) => controllers.push(c),
                Err(e) => return Err(fail(&mut controllers, e.into())),
            }
        }
        let namespaces = ServedNamespace::number(
            &controllers.iter().map(|c| c.info().namespaces.clone()).collect::<Vec<_>>(),
        );
        if namespaces.is_empty() {
            let skipped = controllers.iter().flat_map(|c| c.info().skipped.clone()).collect();
            return Err(fail(&mut controllers, BrokerError::NoNamespace(skipped)));
        }
        if let Err(e) = config.policy.check(&namespaces) {
            return Err(fail(&mut controllers, e.into()));
        }
        let queues = match Self::create_queues(&mut controllers, &space, &config) {
            Ok(q) => q,
            Err(e) => return Err(fail(&mut controllers, e)),
        };
        let limits = queues.limits.clone();
        let queue_entries = queues.entries.clone();
        let infos: Vec<_> = controllers.iter().map(|c| c.info().clone()).collect();
        let ctrls: Vec<_> =
            controllers.into_iter().map(|c| manager::ControllerShared::new(c, queues.threads)).collect();
        let (reaper, reaper_thread) = Reaper::start()?;
        let mut pollers = Vec::new();
        let saved_tenants = Arc::new(io_thread::SavedTenants::default());
        let mut threads = Vec::new();
        for (i, thread_queues) in queues.per_thread.into_iter().enumerate() {
            let wake = Arc::new(nvmed_proto::eventfd::new_eventfd()?);
            let (tx, rx) = channel();
            let requests_pending = Arc::new(session::CachePadded(AtomicBool::new(false)));
            let counters = Arc::new(session::BrokerCounters::default());
            let cpus = if config.cpus.is_empty() { vec![] } else { vec![config.cpus[i % config.cpus.len()]] };
            let ports = thread_queues
                .into_iter()
                .zip(&ctrls)
                .map(|(q, ctrl)| io_thread::PortSetup {
                    ctrl: ctrl.clone(),
                    queue: q.queue,
                    vector: q.vector,
                    bounce: q.bounce,
                })
                .collect();
            let io = IoThread::new(IoThreadSetup {
                index: i as u16,
                rx,
                requests_pending: requests_pending.clone(),
                wake: wake.clone(),
                ports,
                qid: i as u16 + 1,
                limits: limits.clone(),
                poll_idle: config.poll_idle,
                poll_clients: config.poll_clients,
                io_timeout: config.io_timeout,
                reaper: reaper.clone(),
                counters: counters.clone(),
                cpus,
                contended_cost: config.contended_cost,
                retry: crate::nvme::io::RetryPolicy { max_tries: config.io_tries, ..Default::default() },
                aborts: config.aborts,
                saved: saved_tenants.clone(),
            })?;
            pollers.push(Poller {
                tx: Mutex::new(tx),
                requests_pending,
                wake,
                rings: AtomicUsize::new(0),
                counters,
            });
            threads.push(io);
        }
        for c in &ctrls {
            c.set_wakes(pollers.iter().map(|p| p.wake.clone()).collect());
        }
        let mut io_threads = Vec::new();
        for (i, io) in threads.into_iter().enumerate() {
            io_threads
                .push(std::thread::Builder::new().name(format!("nvmed-io-{i}")).spawn(move || io.run())?);
        }
        let q = &config.quotas;
        info!(
            connections = q.total[0],
            connections_per_uid = q.per_uid[0],
            sessions = q.total[1],
            sessions_per_uid = q.per_uid[1],
            buffers = q.total[2],
            buffers_per_uid = q.per_uid[2],
            admin_reserve = q.admin_reserve,
            max_map_count = max_map_count(),
            "client limits"
        );
        for ns in &namespaces {
            info!(
                nsid = ns.nsid,
                controller = ns.controller,
                device = %devices[usize::from(ns.controller)].name(),
                device_nsid = ns.device_nsid,
                lba_size = ns.lba_size,
                blocks = ns.lba_count,
                "namespace"
            );
        }
        let dma: Arc<dyn crate::device::Dma> = if devices.len() == 1 {
            devices[0].clone()
        } else {
            Arc::new(crate::device::fanout::Fanout::new(devices.clone()))
        };
        let mut config_quotas = config.quotas;
        // Each buffer is one DMA mapping in every controller's IOMMU: no more buffers than the
        // fullest one allows, beside the broker's own mappings.
        if let Some(avail) = devices.iter().filter_map(|d| d.dma_mappings_available()).min() {
            config_quotas.limit_buffers(u64::from(avail).saturating_sub(INTERNAL_MAPPINGS).max(1));
        }
        let policy = std::sync::RwLock::new(config.policy.clone());
        let pacer = pacing::Pacer::new(config.control_rate_per_uid);
        let shared = Arc::new(Shared {
            config,
            devices,
            dma,
            space,
            namespaces,
            limits,
            pollers,
            sessions: AtomicU64::new(0),
            quotas: Quotas::new(config_quotas),
            pacer,
            reaper: Mutex::new(Some(reaper)),
            connections: Mutex::new(std::collections::HashMap::new()),
            connection_ended: std::sync::Condvar::new(),
            killed: Mutex::new(KilledSessions::default()),
            placement: Mutex::new(tenant::Placement::default()),
            policy,
            reloader: Mutex::new(None),
            reloads: Default::default(),
            last_reload_ok: AtomicBool::new(true),
            smart: ctrls.iter().map(|_| Mutex::new(None)).collect(),
            registry: Arc::default(),
            ctrls: ctrls.clone(),
            infos,
            queue_entries,
            started: std::time::Instant::now(),
            admin_group: admin_listener.as_ref().and_then(|(_, g)| g.clone()),
            #[cfg(test)]
            hook: Mutex::new(None),
        });
        let stopping = Arc::new(AtomicBool::new(false));
        let mut unplug_watchers = Vec::new();
        for c in &ctrls {
            unplug_watchers.extend(c.watch_removal(stopping.clone())?);
        }
        let accept_thread = {
            let shared = shared.clone();
            let stopping = stopping.clone();
            let lfd = listener.try_clone()?;
            std::thread::Builder::new()
                .name("nvmed-accept".into())
                .spawn(move || accept_loop(lfd, shared, stopping))?
        };
        let admin = match admin_listener {
            Some((fd, group)) => {
                info!(
                    socket = %shared.config.admin_socket.as_deref().unwrap_or(Path::new("")).display(),
                    group = group.as_ref().map(|g| g.name.as_str()),
                    "admin socket listening (nvmectl)"
                );
                Some(admin::AdminServer::start(fd, shared.clone(), group, stopping.clone())?)
            }
            None => None,
        };
        let metrics = match metrics_listener {
            Some(l) => Some(metrics::MetricsServer::start(l, shared.clone())?),
            None => None,
        };
        info!(
            socket = %shared.config.socket.display(),
            controllers = ctrls.len(),
            io_threads = shared.pollers.len(),
            "broker listening"
        );
        Ok(Self {
            shared,
            listener,
            stopping,
            accept_thread: Some(accept_thread),
            io_threads,
            reaper_thread: Some(reaper_thread),
            ctrls,
            admin,
            metrics,
            socket_id,
            admin_id,
            unplug_watchers,
        })
    }

    /// Asks each controller for one I/O queue per I/O thread and creates them (as many threads
    /// as every controller grants queues for); derives each controller's request limits from
    /// the queues really created; allocates each thread's bounce buffers on each controller.
    fn create_queues(
        controllers: &mut [Controller],
        space: &Arc<IovaSpace>,
        config: &BrokerConfig,
    ) -> Result<Queues, BrokerError> {
        let wanted = config.io_threads.max(1);
        let mut count = wanted;
        for c in controllers.iter_mut() {
            let granted = c.request_io_queues(wanted)?;
            if granted < wanted {
                warn!(
                    device = %c.device().name(),
                    wanted,
                    granted,
                    "the controller grants fewer I/O queues than I/O threads asked for"
                );
            }
            count = count.min(granted.max(1));
        }
        if count < wanted {
            warn!(
                wanted,
                running = count,
                "running fewer I/O threads: each needs a queue on every controller"
            );
        }
        let mut per_thread: Vec<Vec<ThreadQueue>> = (0..count).map(|_| Vec::new()).collect();
        let mut limits = Vec::new();
        let mut entries_each = Vec::new();
        for c in controllers.iter_mut() {
            let info = c.info().clone();
            let device = c.device().clone();
            let vectors = device.interrupt_vectors();
            let mut entries = u32::MAX;
            for i in 0..count {
                // Vector 0 belongs to the admin queue (polled); each thread gets its own after
                // it. Threads beyond the device's vectors are polled (they sleep at most 1 ms).
                let vector = match vectors {
                    _ if !config.interrupts => None,
                    0 => None,
                    1 if i == 0 => Some(0),
                    v if i + 1 < v => Some(i + 1),
                    _ => {
                        warn!(thread = i, vectors, "no interrupt vector left for this I/O thread; it polls");
                        None
                    }
                };
                let qp = c.create_io_queue(i + 1, config.io_queue_depth, vector)?;
                let queue = IoQueue::new(qp, &device, space).map_err(DriverError::from)?;
                entries = entries.min(queue.free_slots() as u32 + 1);
                let bounce = io_thread::vectored::BouncePool::new(space, &device, info.max_transfer)
                    .map_err(DriverError::from)?;
                per_thread[usize::from(i)].push(ThreadQueue { queue, vector, bounce });
            }
            // Limits follow the queues really created (the controller may grant fewer entries
            // than asked). A request above MDTS is split into device-sized commands that are
            // admitted as slots free up, so any request up to 16 MiB completes even on a tiny
            // queue.
            let max_request = ((16u32 << 20) / info.max_transfer * info.max_transfer).max(info.max_transfer);
            entries_each.push(entries);
            limits.push(DeviceLimits {
                max_transfer: info.max_transfer,
                max_request,
                write_zeroes: info.write_zeroes,
                // Without WZSL (controllers before NVMe 2.0 mostly), at most MDTS per command, as
                // Linux caps it: some firmware enforces MDTS on Write Zeroes too.
                max_write_zeroes: info.max_write_zeroes.unwrap_or(u64::from(info.max_transfer)),
                deallocate: info.dsm,
                max_deallocate_blocks: info.max_deallocate_blocks.unwrap_or(u32::MAX),
                sgl: info.sgl,
                volatile_write_cache: info.volatile_write_cache,
            });
            info!(
                device = %device.name(),
                io_threads = count,
                queue_entries = entries,
                max_transfer = info.max_transfer,
                max_request,
                sgl = ?info.sgl,
                bounce_slots = per_thread[0].last().map_or(0, |q| q.bounce.capacity()),
                "I/O queues created"
            );
        }
        Ok(Queues { per_thread, limits, threads: count, entries: entries_each })
    }

    /// Puts new grants in force. Connected sessions keep going: a session whose namespaces,
    /// windows or limits changed gets them for its next requests; a session that lost a
    /// namespace (or whose tenant changes, e.g. `per=uid` to `per=session`) is ended, after its
    /// I/O drains, as if it had disconnected. Grants naming a namespace the broker does not
    /// serve, or two grants of one uid on one namespace, are refused with the reason (the
    /// grants in force stay).
    pub fn reload(&self, policy: Policy) -> Result<ReloadReport, String> {
        self.shared.reload(policy)
    }

    /// Sets how [`Broker::reload_from_source`] (and `nvmectl reload`) reads the grants again.
    pub fn set_reloader(&self, reloader: Reloader) {
        *self.shared.reloader.lock().unwrap_or_else(|p| p.into_inner()) = Some(reloader);
    }

    /// Reads the grants again through the reloader and puts them in force; an error says why
    /// they were refused (the grants in force stay).
    pub fn reload_from_source(&self) -> Result<ReloadReport, String> {
        self.shared.reload_from_source()
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.shared.config.socket
    }

    /// Stops accepting, ends every session (draining its I/O), deletes the I/O queues and
    /// shuts the controller down.
    pub fn shutdown(mut self) -> Result<(), BrokerError> {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
        for t in std::mem::take(&mut self.unplug_watchers) {
            let _ = t.join();
        }
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        if let Some(a) = self.admin.take() {
            a.stop();
        }
        if let Some(m) = self.metrics.take() {
            m.stop();
        }
        // Close every client connection: their control threads end their sessions (draining
        // their I/O and releasing their buffers) while the I/O threads still run.
        {
            let mut conns = self.shared.connections.lock().unwrap_or_else(|p| p.into_inner());
            for (_, fd) in conns.values() {
                let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
            }
            // A client thread may be held (closing a descriptor its client sent can block as
            // long as that client likes): after the longest a session's drain can take, the
            // broker stops without it; the I/O threads below still drain every ring first.
            let io_timeout = self.shared.config.io_timeout;
            let deadline = Instant::now() + io_timeout + io_timeout + Duration::from_secs(5);
            while !conns.is_empty() {
                let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                    let held: Vec<u64> = conns.keys().copied().collect();
                    error!(sessions = ?held, "client threads did not end; stopping without them");
                    break;
                };
                conns = self
                    .shared
                    .connection_ended
                    .wait_timeout(conns, left)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        let replies: Vec<_> = self
            .shared
            .pollers
            .iter()
            .map(|p| {
                let (tx, rx) = channel();
                p.request(IoRequest::Shutdown { reply: tx });
                rx
            })
            .collect();
        for rx in replies {
            let _ = rx.recv();
        }
        for t in self.io_threads.drain(..) {
            let _ = t.join();
        }
        for c in &self.ctrls {
            if let Err(e) = c.lock().shutdown() {
                error!(device = %c.device().name(), "controller shutdown failed: {e}");
            }
        }
        // The I/O threads held the reaper's other handles: it ends once everything is unmapped.
        self.shared.reaper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = self.reaper_thread.take() {
            let _ = t.join();
        }
        // Only the file this broker bound (not a socket-activated one, nor one a newer broker
        // already put in its place).
        if self.shared.config.listener.is_none() && same_file(&self.shared.config.socket, self.socket_id) {
            let _ = std::fs::remove_file(&self.shared.config.socket);
        }
        // Likewise only the admin socket it bound.
        if let Some(p) = &self.shared.config.admin_socket {
            if same_file(p, self.admin_id) {
                let _ = std::fs::remove_file(p);
            }
        }
        Ok(())
    }
}

/// One I/O thread's queue on one controller, as created at start.
struct ThreadQueue {
    queue: IoQueue<io_thread::split::InFlight>,
    vector: Option<u16>,
    bounce: io_thread::vectored::BouncePool,
}

/// What [`Broker::create_queues`] made.
struct Queues {
    /// Each thread's queue on each controller.
    per_thread: Vec<Vec<ThreadQueue>>,
    /// Each controller's limits.
    limits: Vec<DeviceLimits>,
    threads: u16,
    /// Entries of each controller's queues.
    entries: Vec<u32>,
}

/// The IOVA ranges every device accepts.
fn intersect_ranges(
    mut lists: impl Iterator<Item = Vec<std::ops::RangeInclusive<u64>>>,
) -> Vec<std::ops::RangeInclusive<u64>> {
    let mut acc = lists.next().unwrap_or_default();
    for list in lists {
        let mut next = Vec::new();
        for a in &acc {
            for b in &list {
                let (lo, hi) = ((*a.start()).max(*b.start()), (*a.end()).min(*b.end()));
                if lo <= hi {
                    next.push(lo..=hi);
                }
            }
        }
        acc = next;
    }
    acc
}

fn accept_loop(listener: OwnedFd, shared: Arc<Shared>, stopping: Arc<AtomicBool>) {
    let next_id = AtomicU64::new(1);
    loop {
        let fd = match accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) {
            Ok(fd) => fd,
            Err(nix::Error::EINTR) | Err(nix::Error::ECONNABORTED) => continue,
            Err(e) => {
                if !stopping.load(Ordering::SeqCst) {
                    error!("accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                return;
            }
        };
        if stopping.load(Ordering::SeqCst) {
            return;
        }
        // SAFETY: accept4 returned a new descriptor that nothing else owns.
        let sock = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let uid = match nix::sys::socket::getsockopt(&sock, nix::sys::socket::sockopt::PeerCredentials) {
            Ok(c) => c.uid(),
            Err(e) => {
                warn!("SO_PEERCRED failed: {e}; dropping connection");
                continue;
            }
        };
        // Connections that have not said Hello yet count too, so idle sockets cannot pile up.
        let ticket = match shared.quotas.acquire(Resource::Connection, uid) {
            Ok(t) => t,
            Err(e) => {
                ratelog::limited_per!(uid, warn, uid, "refusing a connection: {e}");
                refuse(&sock, e);
                continue;
            }
        };
        let id = next_id.fetch_add(1, Ordering::Relaxed);
        // Kept so that shutdown can close it.
        match sock.try_clone() {
            Ok(dup) => {
                shared.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(id, (uid, dup));
            }
            Err(e) => {
                warn!(uid, "cannot keep a handle on a connection: {e}; dropping it");
                continue;
            }
        }
        let conn_shared = shared.clone();
        // Kept to explain a refusal if the thread cannot start (the closure owns `sock`).
        let spare = sock.try_clone();
        let spawned = std::thread::Builder::new()
            .name(format!("nvmed-client-{id}"))
            .stack_size(256 << 10)
            .spawn(move || {
                control::serve(conn_shared.clone(), sock, id, uid);
                drop(ticket);
                conn_shared.connection_done(id);
            });
        if let Err(e) = spawned {
            shared.connection_done(id);
            error!(uid, "cannot start a client thread: {e}; refusing that client");
            if let Ok(spare) = spare {
                refuse(
                    &spare,
                    ControlError::ResourceExhausted(format!("the broker cannot start a thread: {e}")),
                );
            }
        }
    }
}

/// Whether the peer of a connected socket is gone (POLLHUP: it closed, or its process died).
fn hung_up(fd: &OwnedFd) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::empty())];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
        && fds[0].revents().is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR))
}

/// Sends a refusal on a connection that will be closed without being served.
fn refuse(sock: &OwnedFd, e: ControlError) {
    let _ =
        nvmed_proto::transport::send(sock.as_fd(), &nvmed_proto::control::encode(&Response::Error(e)), &[]);
    // Consume what the client already sent: closing a Unix socket with unread data resets the
    // connection, and the client would not get to read the refusal. A few messages at most:
    // this is the accept thread, which a client writing without pause must not hold (such a
    // client gets a reset instead of the refusal).
    let mut scratch = [0u8; 64];
    for _ in 0..16 {
        let got =
            nix::sys::socket::recv(sock.as_raw_fd(), &mut scratch, nix::sys::socket::MsgFlags::MSG_DONTWAIT);
        if !got.is_ok_and(|n| n > 0) {
            break;
        }
    }
}

/// The sessions an operator ended, the most recent [`KilledSessions::KEPT`] of them.
#[derive(Debug, Default)]
pub struct KilledSessions {
    ids: std::collections::VecDeque<u64>,
}

impl KilledSessions {
    /// How many are remembered (the oldest is forgotten first).
    pub const KEPT: usize = 4096;

    fn add(&mut self, id: u64) {
        if self.ids.len() == Self::KEPT {
            self.ids.pop_front();
        }
        self.ids.push_back(id);
    }

    fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }
}

/// IOVA the broker's own DMA memory needs: per I/O thread on each controller its queue pair,
/// a PRP list page per queue entry and its bounce slots; per controller its admin queue and
/// scratch page; and room to spare (a scratch page replaced after a timeout, page rounding).
/// DMA mappings kept for the broker's own memory (queues, PRP list pages, bounce slots) out of
/// what an IOMMU allows.
const INTERNAL_MAPPINGS: u64 = 4096;

fn internal_area_bytes(controllers: usize, io_threads: u16, depth: u16) -> u64 {
    let page = crate::iova::IOVA_PAGE;
    let depth = u64::from(depth);
    let queue_pair = (depth * 64).next_multiple_of(page) + (depth * 16).next_multiple_of(page);
    let per_port = queue_pair + depth * page + io_thread::vectored::BOUNCE_BYTES + 4 * page;
    let per_controller = 64 * 64 + 64 * 16 + 16 * page;
    let ports = controllers as u64 * u64::from(io_threads);
    ports * per_port + controllers as u64 * per_controller + (16 << 20)
}

#[cfg(test)]
mod reload_tests {
    //! Reloads against sessions connecting and limits changing at the same time: a hook stops
    //! the other side at the worst moment and starts the reload there.
    use super::*;
    use crate::emulator::backend::MemoryBackend;
    use crate::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig};
    use crate::policy::{DefaultAccess, Policy};

    /// A broker on an emulated controller with two 1 MiB namespaces and these grants.
    fn broker(policy: Policy) -> Result<(Broker, PathBuf), BrokerError> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "nvmed-reload-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let namespaces = (0..2)
            .map(|_| EmulatedNamespace {
                backend: Box::new(MemoryBackend::new(1 << 20).unwrap()),
                lba_size: 512,
            })
            .collect();
        let device = Arc::new(EmulatedController::new(EmulatorConfig {
            namespaces,
            vectors: 2,
            ..Default::default()
        })?);
        let mut config = BrokerConfig::new(dir.join("nvmed.sock"));
        config.policy = policy;
        let socket = config.socket.clone();
        let started = Broker::start(device, config);
        if started.is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        started.map(|b| (b, socket))
    }

    fn stop(broker: Broker, socket: &Path) {
        broker.shutdown().unwrap();
        let _ = std::fs::remove_dir_all(socket.parent().unwrap());
    }

    fn policy(grants: &[String]) -> Policy {
        Policy { grants: grants.iter().map(|g| g.parse().unwrap()).collect(), default: DefaultAccess::None }
    }

    /// Sets a hook that, the first time `at` is reached, starts `reload` on another thread and
    /// gives it 300 ms to finish (it cannot while the lock is held: the fix). Returns the
    /// reload's outcome once joined.
    fn reload_at(
        broker: &Broker,
        at: HookPoint,
        next: Policy,
    ) -> std::sync::mpsc::Receiver<Result<ReloadReport, String>> {
        let (tx, rx) = channel();
        let shared = Arc::downgrade(&broker.shared);
        let fired = AtomicBool::new(false);
        let tx = Mutex::new(Some(tx));
        let hook = move |point: HookPoint| {
            if point != at || fired.swap(true, Ordering::SeqCst) {
                return;
            }
            let shared = shared.upgrade().unwrap();
            let next = next.clone();
            let tx = tx.lock().unwrap().take().unwrap();
            let (done_tx, done_rx) = channel();
            std::thread::spawn(move || {
                let r = shared.reload(next);
                let _ = done_tx.send(());
                tx.send(r).unwrap();
            });
            // Without the lock held across, the reload finishes well within this.
            let _ = done_rx.recv_timeout(Duration::from_millis(300));
        };
        *broker.shared.hook.lock().unwrap() = Some(Arc::new(hook));
        rx
    }

    #[test]
    fn a_reload_during_hello_reaches_the_new_session() {
        let uid = nix::unistd::getuid().as_raw();
        let (broker, socket) = broker(policy(&[format!("{uid}:1:iops=1k")])).unwrap();
        let reloaded = reload_at(&broker, HookPoint::HelloResolved, policy(&[format!("{uid}:1:iops=3k")]));
        // Hello resolves the session's access from the 1k grant; the reload to 3k starts right
        // then.
        let session = nvmed_client::NvmeSession::open(&socket).unwrap();
        let report = reloaded.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        let entry =
            broker.shared.registry.list().into_iter().find(|e| e.id() == session.session_id()).unwrap();
        let iops = entry.access().namespaces[0].qos.iops;
        assert_eq!(iops, Some(3000), "the session kept the grant a reload replaced ({report:?})");
        assert_eq!(report, ReloadReport { updated: 1, ended: 0 });
        // Sessions connecting later get the reloaded grant too.
        let later = nvmed_client::NvmeSession::open(&socket).unwrap();
        let entry = broker.shared.registry.list().into_iter().find(|e| e.id() == later.session_id()).unwrap();
        assert_eq!(entry.access().namespaces[0].qos.iops, Some(3000));
        drop((session, later));
        stop(broker, &socket);
    }

    #[test]
    fn a_reload_during_hello_ends_a_session_whose_grant_it_withdraws() {
        let uid = nix::unistd::getuid().as_raw();
        let (broker, socket) = broker(policy(&[format!("{uid}:1")])).unwrap();
        // Namespace 1 withdrawn (2 granted instead) while the session says Hello.
        let reloaded = reload_at(&broker, HookPoint::HelloResolved, policy(&[format!("{uid}:2")]));
        let opts = nvmed_client::SessionOptions {
            reconnect: nvmed_client::Reconnect::off(),
            ..nvmed_client::SessionOptions::default()
        };
        // It may connect (and be ended right after) or already be refused its namespace list.
        let session = nvmed_client::NvmeSession::open_with(&socket, opts);
        let report = reloaded.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(report.ended, 1, "the reload missed the session saying Hello");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !broker.shared.registry.list().is_empty() {
            assert!(std::time::Instant::now() < deadline, "the session outlived its withdrawn grant");
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(s) = session {
            assert!(s.new_ring().is_err(), "a session whose grant was withdrawn still works");
        }
        stop(broker, &socket);
    }

    #[test]
    fn a_reload_during_a_limits_change_is_not_undone_by_it() {
        let uid = nix::unistd::getuid().as_raw();
        let (broker, socket) = broker(policy(&[format!("{uid}:1:iops=1k")])).unwrap();
        let from_file = policy(&[format!("{uid}:1:iops=1k"), format!("{uid}:2:ro")]);
        let reloaded = reload_at(&broker, HookPoint::SetLimitsRead, from_file.clone());
        let qos = "iops=2k".parse().unwrap();
        broker.shared.set_limits(uid, 1, qos).unwrap();
        reloaded.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        // The limits change went first; the reload after it put the file's grants in force.
        // Without one lock across both, the change would have put back the grants it read
        // before the reload, dropping the reload's second grant.
        assert_eq!(broker.shared.policy_read().grants, from_file.grants);
        stop(broker, &socket);
    }

    #[test]
    fn grants_for_namespaces_not_served_or_twice_are_refused_at_start_and_reload() {
        let uid = nix::unistd::getuid().as_raw();
        match broker(policy(&[format!("{uid}:3")])) {
            Err(e @ BrokerError::Policy(_)) => {
                let msg = e.to_string();
                assert!(msg.contains("names namespace 3") && msg.contains("namespaces 1-2"), "{msg}")
            }
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a grant of namespace 3 was accepted on a broker serving 2"),
        }
        let good = policy(&[format!("{uid}:1:iops=1k")]);
        let (broker, socket) = broker(good.clone()).unwrap();
        let session = nvmed_client::NvmeSession::open(&socket).unwrap();
        for (bad, why) in [
            (policy(&[format!("{uid}:1"), format!("{uid}:9")]), "names namespace 9"),
            (policy(&[format!("{uid}:1:iops=5k"), format!("{uid}:1:ro")]), "one grant per namespace"),
        ] {
            let e = broker.reload(bad).unwrap_err();
            assert!(e.contains(why), "{e}");
            assert_eq!(
                broker.shared.policy_read().grants,
                good.grants,
                "a refused reload changed the grants"
            );
            let entry = broker.shared.registry.list().pop().unwrap();
            assert_eq!(entry.access().namespaces[0].qos.iops, Some(1000));
        }
        // A limits change cannot make them so either (it only changes limits), and an unknown
        // grant is refused with its own error.
        assert!(broker.shared.set_limits(uid, 2, crate::policy::Qos::default()).is_err());
        drop(session);
        stop(broker, &socket);
    }
}
