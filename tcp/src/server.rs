//! The listener, the connection handshake (ICReq/ICResp, fabrics Connect) and the admin queue.
//! I/O queues continue in the private `ioq` module.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvmed_client::{NvmeSession, SessionOptions};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::{timeout, timeout_at, Instant};
use tracing::{debug, info, warn};
use zerocopy::little_endian::{U16, U64};
use zerocopy::IntoBytes;

use crate::config::{Config, HANDSHAKE_TIMEOUT_MAX};
use crate::ctrl::{
    admin_op, discovery_kato, discovery_log, fctype, sc, Controller, CtrlParams, DiscoveryEntry, NsView,
    Reply, DISCOVERY_NQN,
};
use crate::handshakes::{Handshakes, InHandshake};
use crate::pdu::{self, Digests, Header, Limits, NvmeCmd, NvmeCqe, PduError, Receiver};

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// A socket error.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The host sent a bad PDU (a C2HTermReq was sent).
    #[error("fatal protocol error: {0}")]
    Pdu(#[from] PduError),
    /// The host terminated the connection with an H2CTermReq.
    #[error("host sent H2CTermReq (fatal error status {0:#x})")]
    HostTerminated(u16),
    /// The host closed the connection.
    #[error("host closed the connection")]
    Closed,
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(&'static str),
    /// The broker failed us.
    #[error("nvmed: {0}")]
    Broker(#[from] nvmed_client::Error),
    /// The controller this queue belongs to went away.
    #[error("controller gone")]
    ControllerGone,
    /// The first command was not a valid Connect (it was answered with an error).
    #[error("connect refused: {0}")]
    ConnectRefused(String),
}

/// The shared state of one controller (one association).
#[derive(Debug)]
pub struct CtrlShared {
    /// Controller id.
    pub cntlid: u16,
    /// The host's NQN.
    pub hostnqn: String,
    /// The host identifier of its admin Connect (its I/O queues must carry the same).
    pub hostid: [u8; 16],
    /// Its nvmed session: every I/O queue gets a ring of it (`None` for a discovery
    /// controller, which has no I/O queues).
    pub session: Option<NvmeSession>,
    /// A discovery controller (its host connected to the discovery NQN).
    pub discovery: bool,
    /// Namespaces the host sees.
    pub namespaces: Arc<Vec<NsView>>,
    /// Largest transfer.
    pub max_transfer: u32,
    /// I/O queues: granted count and connected ids.
    pub queues: Mutex<(u16, HashSet<u16>)>,
    /// Becomes false when the controller goes (its I/O queues close).
    pub alive: watch::Sender<bool>,
    /// Whether the host enabled it (CSTS.RDY).
    pub ready: watch::Sender<bool>,
    /// A health read of nvmed is under way (at most one per controller: one that waits for a
    /// restarting nvmed keeps a blocking thread).
    pub health_busy: Arc<std::sync::atomic::AtomicBool>,
}

/// The target: its configuration and live controllers.
#[derive(Debug)]
pub struct Target {
    /// Configuration.
    pub cfg: Config,
    ctrls: Mutex<HashMap<u16, Arc<CtrlShared>>>,
    next_cntlid: Mutex<u16>,
    conns: Arc<Semaphore>,
    /// Open connections per peer IP address.
    per_host: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Controllers being set up (their nvmed session opening), per host NQN.
    starting: Mutex<HashMap<String, usize>>,
    /// Connections whose Connect is not in yet (a full target pushes out the oldest).
    handshakes: Handshakes,
}

/// One connection counted against its peer's [`Config::max_connections_per_host`]; uncounted
/// on drop.
struct HostSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for HostSlot {
    fn drop(&mut self) {
        let mut m = lock(&self.map);
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

impl Target {
    /// A target with no controllers yet.
    pub fn new(cfg: Config) -> Arc<Self> {
        let conns = Arc::new(Semaphore::new(cfg.max_connections));
        Arc::new(Self {
            cfg,
            ctrls: Mutex::new(HashMap::new()),
            next_cntlid: Mutex::new(1),
            conns,
            per_host: Arc::default(),
            starting: Mutex::default(),
            handshakes: Handshakes::default(),
        })
    }

    /// Counts a new connection from `ip`; `None` when that address holds its maximum already.
    /// (Per address: an IPv6 /64 is often a whole subnet of hosts, so it is not one key.)
    fn host_slot(&self, ip: IpAddr) -> Option<HostSlot> {
        let ip = host_key(ip);
        let mut m = lock(&self.per_host);
        let n = m.entry(ip).or_insert(0);
        if *n >= self.cfg.max_connections_per_host {
            return None;
        }
        *n += 1;
        Some(HostSlot { map: self.per_host.clone(), ip })
    }

    /// Live controllers.
    pub fn controllers(&self) -> usize {
        lock(&self.ctrls).len()
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.cfg.max_connections - self.conns.available_permits()
    }

    fn limits(&self) -> Limits {
        Limits {
            max_in_capsule: (self.cfg.in_capsule as usize).max(8192),
            max_data_pdu: MAX_H2C_DATA as usize,
        }
    }

    fn alloc_cntlid(&self) -> Option<u16> {
        self.alloc_cntlid_in(&lock(&self.ctrls))
    }

    /// A free controller id, `ctrls` being the table (locked by the caller).
    fn alloc_cntlid_in(&self, ctrls: &HashMap<u16, Arc<CtrlShared>>) -> Option<u16> {
        let mut next = lock(&self.next_cntlid);
        for _ in 0..0xffef {
            let id = *next;
            *next = if id >= 0xffef { 1 } else { id + 1 };
            if !ctrls.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

/// A controller of `hostnqn` being set up: counted against the host's limit until dropped.
struct Starting {
    target: Arc<Target>,
    hostnqn: String,
}

impl Drop for Starting {
    fn drop(&mut self) {
        let mut m = lock(&self.target.starting);
        if let Some(n) = m.get_mut(&self.hostnqn) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.hostnqn);
            }
        }
    }
}

/// The address a peer is counted under: itself (an IPv4-mapped IPv6 address counts as its
/// IPv4 address).
fn host_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(a) => a.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The key a peer's log lines are budgeted under (its address, an IPv6 one folded to 32 bits).
fn log_key(ip: IpAddr) -> u32 {
    match host_key(ip) {
        IpAddr::V4(a) => u32::from(a),
        IpAddr::V6(a) => {
            let b = a.to_bits();
            (b ^ (b >> 32) ^ (b >> 64) ^ (b >> 96)) as u32
        }
    }
}

/// The pause after a failed `accept` (e.g. no file descriptor left) before the next one.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// MAXH2CDATA announced in ICResp.
pub const MAX_H2C_DATA: u32 = 128 << 10;

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Accepts connections forever, each in its own task. Beyond `max_connections` a new
/// connection pushes out the oldest one whose Connect is not in yet, or, when every one is
/// established, is closed at once.
pub async fn serve(target: Arc<Target>, listener: TcpListener) -> std::io::Result<()> {
    serve_port(target, listener, false).await
}

/// As [`serve`], for a discovery port (`--discovery-listen`): only the discovery subsystem is
/// served there; a Connect to the I/O subsystem is refused.
pub async fn serve_discovery(target: Arc<Target>, listener: TcpListener) -> std::io::Result<()> {
    serve_port(target, listener, true).await
}

/// Keep alive probes on an accepted connection: a host that vanishes without a FIN or RST (a
/// power loss, a partition) is found out even when it asked for no keep alive timeout, and the
/// nvmed session, rings and buffers its controller holds are released.
fn tcp_keepalive(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    let probes = setsockopt(stream, sockopt::KeepAlive, &true)
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepIdle, &30))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepInterval, &10))
        .and_then(|()| setsockopt(stream, sockopt::TcpKeepCount, &6))
        // Data the host does not acknowledge for 90 s: gone.
        .and_then(|()| setsockopt(stream, sockopt::TcpUserTimeout, &90_000));
    if let Err(e) = probes {
        debug!("TCP keep alive options: {e}");
    }
}

async fn serve_port(target: Arc<Target>, listener: TcpListener, discovery_only: bool) -> std::io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // Out of file descriptors or memory, or a connection reset before it was
                // accepted: the target goes on serving the hosts it has.
                nvmed_proto::log_limited!(warn, "accepting a connection: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Some(host_slot) = target.host_slot(peer.ip()) else {
            nvmed_proto::log_limited_per!(
                log_key(peer.ip()),
                warn,
                %peer,
                max = target.cfg.max_connections_per_host,
                "connection limit of this address reached, closing the new connection"
            );
            drop(stream);
            continue;
        };
        let permit = match target.conns.clone().try_acquire_owned() {
            Ok(p) => p,
            // Every slot taken: the oldest connection still in its handshake makes room (its
            // task ends at its next await, giving its slot back).
            Err(_) if target.handshakes.push_out_oldest() => {
                match timeout(Duration::from_secs(1), target.conns.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => {
                        nvmed_proto::log_limited!(warn, %peer, "no connection slot came free; closing the new connection");
                        continue;
                    }
                }
            }
            Err(_) => {
                nvmed_proto::log_limited!(warn, %peer, max = target.cfg.max_connections, "connection limit reached, closing the new connection");
                drop(stream);
                continue;
            }
        };
        let handshake = target.handshakes.begin();
        let id = handshake.id();
        let task_target = target.clone();
        let task = tokio::spawn(async move {
            let target = task_target;
            let _permit = permit;
            let _host_slot = host_slot;
            let _ = stream.set_nodelay(true);
            tcp_keepalive(&stream);
            match handle(&target, stream, peer, discovery_only, handshake).await {
                Ok(()) | Err(ConnError::Closed) => debug!(%peer, "connection closed"),
                Err(e) => {
                    nvmed_proto::log_limited_per!(log_key(peer.ip()), info, %peer, "connection ended: {e}")
                }
            }
        });
        target.handshakes.started(id, task.abort_handle());
    }
}

/// Sends a C2HTermReq for `e` (best effort, the connection ends anyway).
pub(crate) async fn term_req<W: AsyncWrite + Unpin>(
    w: &mut W,
    peer: Option<std::net::SocketAddr>,
    e: &PduError,
    offending: &[u8],
) {
    match peer {
        Some(peer) => {
            nvmed_proto::log_limited_per!(log_key(peer.ip()), warn, %peer, "terminating the connection: {e}")
        }
        None => nvmed_proto::log_limited!(warn, "terminating the connection: {e}"),
    }
    let mut out = Vec::new();
    pdu::push_term_req(&mut out, true, e.fes(), e.fei(), offending);
    let _ = timeout(Duration::from_secs(1), w.write_all(&out)).await;
    let _ = timeout(Duration::from_secs(1), w.shutdown()).await;
}

/// One whole PDU read into memory.
pub(crate) struct WholePdu {
    pub header: Header,
    pub head: Vec<u8>,
    pub data: Vec<u8>,
    pub data_digest_ok: bool,
}

/// Reads one PDU (header and data into memory, bounded by `limits`).
pub(crate) async fn read_pdu<R: AsyncRead + Unpin>(
    r: &mut R,
    dg: Option<Digests>,
    limits: &Limits,
) -> Result<WholePdu, (ConnError, Vec<u8>)> {
    let mut head = vec![0u8; pdu::COMMON_LEN];
    match r.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err((ConnError::Closed, head)),
        Err(e) => return Err((e.into(), head)),
    }
    let layout = match pdu::check_common(head[..8].try_into().unwrap(), Receiver::Controller, dg, limits) {
        Ok(l) => l,
        Err(e) => return Err((e.into(), head)),
    };
    head.resize(layout.data_offset, 0);
    if let Err(e) = r.read_exact(&mut head[pdu::COMMON_LEN..]).await {
        return Err((e.into(), head));
    }
    let header = match pdu::decode_header(&head, &layout) {
        Ok(h) => h,
        Err(e) => return Err((e.into(), head)),
    };
    let mut data = vec![0u8; layout.data_len];
    if let Err(e) = r.read_exact(&mut data).await {
        return Err((e.into(), head));
    }
    let mut data_digest_ok = true;
    if layout.data_digest {
        let mut d = [0u8; 4];
        if let Err(e) = r.read_exact(&mut d).await {
            return Err((e.into(), head));
        }
        data_digest_ok = u32::from_le_bytes(d) == pdu::crc(&data);
    }
    Ok(WholePdu { header, head, data, data_digest_ok })
}

/// A completion for command `cid`.
pub(crate) fn cqe(cid: u16, status: u16, result: u64, sqhd: u16, sqid: u16) -> NvmeCqe {
    NvmeCqe {
        result: U64::new(result),
        sqhd: U16::new(sqhd),
        sqid: U16::new(sqid),
        cid: U16::new(cid),
        status: U16::new(status << 1),
    }
}

/// The negotiated connection parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnParams {
    pub dg: Digests,
    pub hpda: u8,
}

async fn handle(
    target: &Arc<Target>,
    mut stream: TcpStream,
    peer: std::net::SocketAddr,
    discovery_only: bool,
    handshake: InHandshake,
) -> Result<(), ConnError> {
    // ICReq, Connect and its data must all arrive by one deadline.
    let deadline = Instant::now() + target.cfg.io_timeout.min(HANDSHAKE_TIMEOUT_MAX);
    let limits = target.limits();
    // ICReq -> ICResp.
    let ic = match timeout_at(deadline, read_pdu(&mut stream, None, &limits)).await {
        Err(_) => return Err(ConnError::Timeout("ICReq")),
        Ok(Err((ConnError::Pdu(e), head))) => {
            term_req(&mut stream, Some(peer), &e, &head).await;
            return Err(e.into());
        }
        Ok(Err((e, _))) => return Err(e),
        Ok(Ok(p)) => p,
    };
    let req = match ic.header {
        Header::IcReq(r) => r,
        Header::H2cTermReq(t) => return Err(ConnError::HostTerminated(t.fes.get())),
        _ => unreachable!("check_common allows only ICReq and TermReq first"),
    };
    let dg = Digests::from_bits(req.digest);
    let params = ConnParams { dg, hpda: req.hpda_cpda };
    let resp = pdu::ic_resp(dg, 0, MAX_H2C_DATA);
    stream.write_all(resp.as_bytes()).await?;
    debug!(?dg, hpda = req.hpda_cpda, "connection initialised");

    // The first capsule must be a Connect with its data in the capsule.
    let first = match timeout_at(deadline, read_pdu(&mut stream, Some(dg), &limits)).await {
        Err(_) => return Err(ConnError::Timeout("Connect")),
        Ok(Err((ConnError::Pdu(e), head))) => {
            term_req(&mut stream, Some(peer), &e, &head).await;
            return Err(e.into());
        }
        Ok(Err((e, _))) => return Err(e),
        Ok(Ok(p)) => p,
    };
    let cmd = match first.header {
        Header::CapsuleCmd(c) => c.cmd,
        Header::H2cTermReq(t) => return Err(ConnError::HostTerminated(t.fes.get())),
        _ => {
            let e = PduError::Sequence("expected a Connect command capsule");
            term_req(&mut stream, Some(peer), &e, &first.head).await;
            return Err(e.into());
        }
    };
    let cid = cmd.cid.get();
    let is_connect = cmd.opcode == admin_op::FABRICS && cmd.nsid.as_bytes()[0] == fctype::CONNECT;
    let mut data = first.data;
    let mut digest_ok = first.data_digest_ok;
    if is_connect && data.is_empty() && cmd.sgl_type == pdu::sgl::TRANSPORT && cmd.sgl_len.get() == 1024 {
        // The host did not put the Connect data in the capsule: ask for it.
        match timeout_at(deadline, connect_data_by_r2t(&mut stream, dg, cid, &limits)).await {
            Err(_) => return Err(ConnError::Timeout("Connect data")),
            Ok(Err((ConnError::Pdu(e), head))) => {
                term_req(&mut stream, Some(peer), &e, &head).await;
                return Err(e.into());
            }
            Ok(Err((e, _))) => return Err(e),
            Ok(Ok((d, ok))) => (data, digest_ok) = (d, ok),
        }
    }
    // The whole Connect is in: from here on the connection is not pushed out for a new one
    // (its nvmed session may be opening), unless it was just now.
    if !handshake.finish() {
        return Err(ConnError::Closed);
    }
    let outcome = if !is_connect {
        Err((sc::CMD_SEQ_ERROR | sc::DNR, 0, "first command is not Connect".into()))
    } else if !digest_ok {
        Err((sc::TRANSIENT_TRANSPORT, 0, "Connect data digest mismatch".into()))
    } else {
        connect(target, &cmd, &data, discovery_only).await
    };
    let (ctrl, qid, sqsize) = match outcome {
        Ok(v) => v,
        Err((status, result, why)) => {
            nvmed_proto::log_limited_per!(log_key(peer.ip()), warn, %peer, "Connect refused: {why}");
            let mut out = Vec::new();
            pdu::push_capsule_resp(&mut out, dg, cqe(cid, status, result, 1, 0));
            stream.write_all(&out).await?;
            let _ = stream.shutdown().await;
            return Err(ConnError::ConnectRefused(why));
        }
    };
    if qid == 0 {
        let mut out = Vec::new();
        pdu::push_capsule_resp(&mut out, dg, cqe(cid, 0, u64::from(ctrl.cntlid), 1, qid));
        stream.write_all(&out).await?;
        // (Any peer may open a discovery controller: those are not worth a line each.)
        if ctrl.discovery {
            debug!(cntlid = ctrl.cntlid, host = ?ctrl.hostnqn, %peer, "discovery controller created");
        } else {
            info!(cntlid = ctrl.cntlid, host = ?ctrl.hostnqn, %peer, "controller created");
        }
        let mut kato = u32::from_le_bytes(cmd.as_bytes()[48..52].try_into().unwrap());
        if ctrl.discovery {
            kato = discovery_kato(kato);
        }
        let r = admin_queue(target, &ctrl, stream, params, sqsize, kato).await;
        lock(&target.ctrls).remove(&ctrl.cntlid);
        ctrl.alive.send_replace(false);
        if ctrl.discovery {
            debug!(cntlid = ctrl.cntlid, "discovery controller removed");
        } else {
            info!(cntlid = ctrl.cntlid, "controller removed");
        }
        r
    } else {
        // It frees the queue id (once: the host may have connected that queue again while
        // this connection's I/O drained).
        crate::ioq::run(target, &ctrl, stream, params, qid, sqsize, cid).await
    }
}

/// Sends an R2T for a Connect's 1024 bytes of data and collects them from H2CData PDUs:
/// the data and whether every data digest matched.
async fn connect_data_by_r2t(
    stream: &mut TcpStream,
    dg: Digests,
    cid: u16,
    limits: &Limits,
) -> Result<(Vec<u8>, bool), (ConnError, Vec<u8>)> {
    let mut out = Vec::new();
    pdu::push_r2t(&mut out, dg, cid, 0, 0, 1024);
    stream.write_all(&out).await.map_err(|e| (e.into(), Vec::new()))?;
    let mut data = Vec::with_capacity(1024);
    let mut ok = true;
    while data.len() < 1024 {
        let p = read_pdu(stream, Some(dg), limits).await?;
        let Header::H2cData(d) = p.header else {
            return Err((PduError::Sequence("expected H2CData for the Connect's R2T").into(), p.head));
        };
        if d.cccid.get() != cid || d.ttag.get() != 0 {
            return Err((
                PduError::HeaderField { offset: 8, what: "H2CData for no outstanding R2T" }.into(),
                p.head,
            ));
        }
        if d.datao.get() as usize != data.len() || data.len() + p.data.len() > 1024 {
            return Err((PduError::DataOutOfRange("H2CData outside the Connect's data").into(), p.head));
        }
        ok &= p.data_digest_ok;
        data.extend_from_slice(&p.data);
    }
    Ok((data, ok))
}

type Refusal = (u16, u64, String);

/// Connect invalid parameters: the offending byte offset (IPO, bits 15:0) and IATTR (bit 16;
/// 1: in the Connect data), as Linux's nvmf_log_connect_error reads them.
fn invalid_param(in_data: bool, offset: u16, why: String) -> Refusal {
    let result = u64::from(in_data) << 16 | u64::from(offset);
    (sc::CONNECT_INVALID_PARAM | sc::DNR, result, why)
}

fn nqn_field(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Handles a fabrics Connect: `(controller, qid, sqsize)` or the refusal to answer.
async fn connect(
    target: &Arc<Target>,
    cmd: &NvmeCmd,
    data: &[u8],
    discovery_only: bool,
) -> Result<(Arc<CtrlShared>, u16, u16), Refusal> {
    let b = cmd.as_bytes();
    let recfmt = u16::from_le_bytes([b[40], b[41]]);
    let qid = u16::from_le_bytes([b[42], b[43]]);
    let sqsize = u16::from_le_bytes([b[44], b[45]]);
    let kato = u32::from_le_bytes(b[48..52].try_into().unwrap());
    if recfmt != 0 {
        return Err((sc::CONNECT_FORMAT | sc::DNR, 0, format!("record format {recfmt}")));
    }
    if data.len() != 1024 {
        return Err(invalid_param(false, 24, format!("Connect data of {} bytes in the capsule", data.len())));
    }
    let hostid: [u8; 16] = data[..16].try_into().unwrap();
    let cntlid = u16::from_le_bytes([data[16], data[17]]);
    let subnqn = nqn_field(&data[256..512]);
    let hostnqn = nqn_field(&data[512..768]);
    if subnqn == DISCOVERY_NQN {
        // Any host may ask what it can reach (the log lists only what it may use).
        if qid != 0 {
            return Err(invalid_param(false, 42, "a discovery controller has no I/O queues".into()));
        }
        if cntlid != 0xffff && cntlid != 0xfffe {
            return Err(invalid_param(true, 16, format!("static controller id {cntlid} asked")));
        }
        if !(31..=max_sq_of(target).max(31)).contains(&sqsize) {
            return Err(invalid_param(false, 44, format!("admin SQSIZE {sqsize}")));
        }
        // Any host may connect here, and keep its controller with keep alives: discovery
        // controllers get a part of the connections only, so that hosts (allowed or not) that
        // hold many cannot leave none for the subsystem's own.
        // Counted, given an id and added under one lock: parallel Connects cannot all pass.
        let discovery_limit = discovery_controllers_max(target.cfg.max_connections);
        let mut ctrls = lock(&target.ctrls);
        if ctrls.values().filter(|c| c.discovery).count() >= discovery_limit {
            return Err((
                sc::CONNECT_CTRL_BUSY,
                0,
                format!("{discovery_limit} discovery controllers already (a part of --max-connections)"),
            ));
        }
        let cntlid = target.alloc_cntlid_in(&ctrls).ok_or((
            sc::CONNECT_CTRL_BUSY,
            0,
            "no controller id free".into(),
        ))?;
        let ctrl = Arc::new(CtrlShared {
            cntlid,
            hostnqn,
            hostid,
            session: None,
            discovery: true,
            namespaces: Arc::new(Vec::new()),
            max_transfer: target.cfg.max_transfer,
            queues: Mutex::new((0, HashSet::new())),
            alive: watch::channel(true).0,
            ready: watch::channel(false).0,
            health_busy: Arc::default(),
        });
        ctrls.insert(cntlid, ctrl.clone());
        return Ok((ctrl, 0, sqsize));
    }
    if discovery_only {
        return Err(invalid_param(true, 256, format!("this port serves discovery only, not {subnqn:?}")));
    }
    if subnqn != target.cfg.subnqn {
        return Err(invalid_param(true, 256, format!("unknown subsystem {subnqn:?}")));
    }
    let Some((allowed, read_only)) = target.cfg.access(&hostnqn) else {
        return Err((sc::CONNECT_INVALID_HOST | sc::DNR, 0, format!("host {hostnqn:?} is not allowed")));
    };
    let max_sq = max_sq_of(target);
    if qid == 0 {
        if !(31..=max_sq.max(31)).contains(&sqsize) {
            return Err(invalid_param(false, 44, format!("admin SQSIZE {sqsize}")));
        }
        if cntlid != 0xffff && cntlid != 0xfffe {
            return Err(invalid_param(true, 16, format!("static controller id {cntlid} asked")));
        }
        let _ = kato;
        // Counted with the Connects of this host still being set up (they wait for nvmed),
        // under one lock: parallel Connects cannot all pass the check.
        let _reserved = {
            let ctrls = lock(&target.ctrls);
            let mut starting = lock(&target.starting);
            let held = ctrls.values().filter(|c| !c.discovery && c.hostnqn == hostnqn).count()
                + starting.get(&hostnqn).copied().unwrap_or(0);
            if held >= target.cfg.max_controllers_per_host {
                return Err((
                    sc::CONNECT_CTRL_BUSY,
                    0,
                    format!("host {hostnqn:?} holds {held} controllers, the most one host may"),
                ));
            }
            *starting.entry(hostnqn.clone()).or_insert(0) += 1;
            Starting { target: target.clone(), hostnqn: hostnqn.clone() }
        };
        let ctrl = create_controller(target, hostnqn, hostid, allowed.map(<[u32]>::to_vec), read_only)
            .await
            .map_err(|e| (sc::CONNECT_CTRL_BUSY, 0, e))?;
        Ok((ctrl, 0, sqsize))
    } else {
        if sqsize == 0 || sqsize > max_sq {
            return Err(invalid_param(false, 44, format!("I/O SQSIZE {sqsize}")));
        }
        let ctrl = lock(&target.ctrls).get(&cntlid).cloned();
        let Some(ctrl) = ctrl else {
            return Err(invalid_param(true, 16, format!("no controller {cntlid}")));
        };
        if ctrl.hostnqn != hostnqn {
            return Err(invalid_param(true, 512, "host NQN differs from the controller's".into()));
        }
        if ctrl.hostid != hostid {
            return Err(invalid_param(true, 0, "host identifier differs from the controller's".into()));
        }
        if ctrl.discovery {
            return Err(invalid_param(true, 16, format!("controller {cntlid} is a discovery controller")));
        }
        if !*ctrl.ready.borrow() {
            return Err((sc::CMD_SEQ_ERROR | sc::DNR, 0, "controller not enabled".into()));
        }
        let mut q = lock(&ctrl.queues);
        if qid > q.0 {
            return Err(invalid_param(false, 42, format!("queue {qid} beyond the {} granted", q.0)));
        }
        if !q.1.insert(qid) {
            return Err(invalid_param(false, 42, format!("queue {qid} already connected")));
        }
        drop(q);
        Ok((ctrl, qid, sqsize))
    }
}

/// Discovery controllers at once: an eighth of the connections, at least 4.
pub fn discovery_controllers_max(max_connections: usize) -> usize {
    (max_connections / 8).max(4)
}

fn max_sq_of(target: &Target) -> u16 {
    target.cfg.queue_size - 1
}

async fn create_controller(
    target: &Arc<Target>,
    hostnqn: String,
    hostid: [u8; 16],
    allowed: Option<Vec<u32>>,
    read_only: bool,
) -> Result<Arc<CtrlShared>, String> {
    let path = target.cfg.nvmed_socket.clone();
    let name = format!("nvmed-tcp {hostnqn}");
    let reconnect = target.cfg.reconnect;
    let session = tokio::task::spawn_blocking(move || {
        NvmeSession::open_with(path, SessionOptions { client_name: name, reconnect })
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("nvmed session: {e}"))?;
    let mut namespaces = Vec::new();
    let mut max_transfer = target.cfg.max_transfer;
    for n in session.namespaces() {
        if target.cfg.namespaces.as_ref().is_some_and(|l| !l.contains(&n.nsid)) {
            continue;
        }
        if allowed.as_ref().is_some_and(|l| !l.contains(&n.nsid)) {
            continue;
        }
        let mt = n.max_transfer.max(4096);
        max_transfer = max_transfer.min(1 << (31 - mt.leading_zeros()));
        namespaces.push(NsView::new(
            &target.cfg.subnqn,
            n.nsid,
            n.lba_size,
            n.lba_count,
            read_only || n.read_only,
        ));
    }
    namespaces.sort_by_key(|n| n.nsid);
    let cntlid = target.alloc_cntlid().ok_or("no controller id free")?;
    let ctrl = Arc::new(CtrlShared {
        cntlid,
        hostnqn,
        hostid,
        session: Some(session),
        discovery: false,
        namespaces: Arc::new(namespaces),
        max_transfer,
        queues: Mutex::new((0, HashSet::new())),
        alive: watch::channel(true).0,
        ready: watch::channel(false).0,
        health_busy: Arc::default(),
    });
    lock(&target.ctrls).insert(cntlid, ctrl.clone());
    Ok(ctrl)
}

enum AdminEvent {
    Pdu(WholePdu),
    Fatal(ConnError, Vec<u8>),
}

async fn admin_reader<R: AsyncRead + Unpin>(
    mut r: R,
    dg: Digests,
    limits: Limits,
    tx: mpsc::Sender<AdminEvent>,
) {
    loop {
        let ev = match read_pdu(&mut r, Some(dg), &limits).await {
            Ok(p) => AdminEvent::Pdu(p),
            Err((e, head)) => AdminEvent::Fatal(e, head),
        };
        let end = matches!(ev, AdminEvent::Fatal(..));
        if tx.send(ev).await.is_err() || end {
            return;
        }
    }
}

async fn admin_queue(
    target: &Arc<Target>,
    shared: &Arc<CtrlShared>,
    stream: TcpStream,
    params: ConnParams,
    sqsize: u16,
    kato_ms: u32,
) -> Result<(), ConnError> {
    let local = stream.local_addr()?;
    let (rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel(4);
    let reader = tokio::spawn(admin_reader(rd, params.dg, target.limits(), tx));
    let _abort = AbortOnDrop(reader);
    let cfg = &target.cfg;
    // A discovery controller lists the subsystem if its host may use it.
    let discovery = shared.discovery.then(|| {
        let mut addr = cfg.io_addr.unwrap_or(local);
        if addr.ip().is_unspecified() {
            addr.set_ip(local.ip());
        }
        let entries: Vec<DiscoveryEntry> = cfg
            .access(&shared.hostnqn)
            .map(|_| DiscoveryEntry { subnqn: cfg.subnqn.clone(), addr })
            .into_iter()
            .collect();
        discovery_log(&entries, 1)
    });
    let ctrl_params = CtrlParams {
        subnqn: if shared.discovery { DISCOVERY_NQN.to_string() } else { cfg.subnqn.clone() },
        cntlid: shared.cntlid,
        queue_size: cfg.queue_size,
        max_transfer: shared.max_transfer,
        in_capsule: cfg.in_capsule,
        max_io_queues: cfg.max_io_queues,
        // The subsystem's, the same on every controller (and path): udev's by-id names and
        // multipath compare it.
        serial: format!("{:08x}", pdu::crc(cfg.subnqn.as_bytes())),
        oncs: if shared.discovery { 0 } else { (1 << 2) | (1 << 3) },
        discovery,
    };
    let mut ctrl = Controller::new(ctrl_params, shared.namespaces.to_vec(), kato_ms);
    let mut sqhd: u16 = 1;
    let mut last_heard = Instant::now();
    let mut out = Vec::new();
    let send_to = cfg.io_timeout;
    loop {
        // The keep alive timeout, with the slack the spec allows for the host's timer.
        let ka = (ctrl.kato_ms > 0)
            .then(|| last_heard + Duration::from_millis(u64::from(ctrl.kato_ms) * 3 / 2 + 1000));
        let ev = tokio::select! {
            ev = rx.recv() => ev,
            _ = sleep_until_opt(ka) => {
                warn!(cntlid = shared.cntlid, kato_ms = ctrl.kato_ms, "keep alive timeout: removing the controller");
                return Err(ConnError::Timeout("keep alive"));
            }
        };
        let p = match ev {
            None => return Err(ConnError::Closed),
            Some(AdminEvent::Fatal(ConnError::Pdu(e), head)) => {
                term_req(&mut wr, None, &e, &head).await;
                return Err(e.into());
            }
            Some(AdminEvent::Fatal(e, _)) => return Err(e),
            Some(AdminEvent::Pdu(p)) => p,
        };
        last_heard = Instant::now();
        let cmd = match p.header {
            Header::CapsuleCmd(c) => c.cmd,
            Header::H2cTermReq(t) => return Err(ConnError::HostTerminated(t.fes.get())),
            _ => {
                let e = PduError::Sequence("H2CData on the admin queue, which sends no R2T");
                term_req(&mut wr, None, &e, &p.head).await;
                return Err(e.into());
            }
        };
        sqhd = (sqhd + 1) % (sqsize + 1);
        let cid = cmd.cid.get();
        let reply = if !p.data_digest_ok {
            Reply::Done { status: sc::TRANSIENT_TRANSPORT, result: 0, data: Vec::new() }
        } else if cmd.opcode == admin_op::FABRICS {
            let b = cmd.as_bytes();
            let eight = b[40] & 1 != 0;
            let offset = u32::from_le_bytes(b[44..48].try_into().unwrap());
            match b[4] {
                fctype::PROPERTY_GET => ctrl.property_get(offset, eight),
                fctype::PROPERTY_SET => {
                    let value = u64::from_le_bytes(b[48..56].try_into().unwrap());
                    let (r, disabled) = ctrl.property_set(offset, eight, value);
                    shared.ready.send_replace(ctrl.ready());
                    if disabled {
                        // A controller reset: its I/O queues go; the host connects them again.
                        lock(&shared.queues).0 = 0;
                        ctrl.io_queues = 0;
                    }
                    r
                }
                fctype::CONNECT => Reply::err(sc::CMD_SEQ_ERROR),
                _ => Reply::err(sc::INVALID_FIELD),
            }
        } else if !p.data.is_empty() {
            // No admin command this target supports takes data from the host.
            Reply::err(sc::INVALID_FIELD)
        } else {
            if cmd.opcode == admin_op::GET_LOG_PAGE && cmd.cdw(10) as u8 == 0x02 {
                ctrl.smart = smart_of(shared).await;
            }
            let r = ctrl.admin(&cmd);
            if cmd.opcode == admin_op::SET_FEATURES && cmd.cdw(10) as u8 == 0x07 {
                lock(&shared.queues).0 = ctrl.io_queues;
            }
            r
        };
        let Reply::Done { status, result, data } = reply else { continue };
        out.clear();
        let mut status = status;
        let sgl_len = cmd.sgl_len.get() as usize;
        if !data.is_empty() && status == 0 {
            if cmd.sgl_type != pdu::sgl::TRANSPORT {
                status = sc::SGL_INVALID_TYPE | sc::DNR;
            } else {
                let n = data.len().min(sgl_len);
                if n > 0 {
                    pdu::push_data_header(&mut out, params.dg, params.hpda, true, cid, 0, 0, n as u32, true);
                    out.extend_from_slice(&data[..n]);
                    if params.dg.data {
                        out.extend_from_slice(&pdu::crc(&data[..n]).to_le_bytes());
                    }
                }
            }
        }
        pdu::push_capsule_resp(&mut out, params.dg, cqe(cid, status, result, sqhd, 0));
        match timeout(send_to, wr.write_all(&out)).await {
            Err(_) => return Err(ConnError::Timeout("host not reading")),
            Ok(r) => r?,
        }
    }
}

async fn smart_of(shared: &Arc<CtrlShared>) -> Option<nvmed_proto::admin::SmartLog> {
    let session = shared.session.clone()?;
    let controller =
        session.namespaces().iter().find(|n| shared.namespaces.iter().any(|v| v.nsid == n.nsid))?;
    let c = controller.controller;
    // While nvmed is away (restarting) the session waits for it: answer without the log
    // instead of holding up the admin queue (and its keep alives).
    // One read at a time: a host asking in a loop while nvmed is away would otherwise leave a
    // blocked thread behind per request.
    let busy = shared.health_busy.clone();
    if busy.swap(true, std::sync::atomic::Ordering::AcqRel) {
        return None;
    }
    let health = tokio::task::spawn_blocking(move || {
        let h = session.health();
        busy.store(false, std::sync::atomic::Ordering::Release);
        h
    });
    let h = timeout(Duration::from_secs(1), health).await.ok()?.ok()?.ok()?;
    h.into_iter().find(|h| h.controller == c)?.smart.ok()
}

pub(crate) async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);
impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_invalid_parameter_result_is_ipo_then_iattr() {
        // Offset 42 (QID) in the command: IATTR 0; the host identifier (offset 0 of the
        // data): IATTR 1 in bit 16.
        assert_eq!(invalid_param(false, 42, String::new()).1, 42);
        assert_eq!(invalid_param(true, 0, String::new()).1, 1 << 16);
        assert_eq!(invalid_param(true, 256, String::new()).1, (1 << 16) | 256);
    }

    #[test]
    fn peers_count_per_address() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::7".parse().unwrap();
        assert_ne!(host_key(a), host_key(b), "two hosts of one subnet");
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(host_key(v4), v4);
        assert_eq!(host_key("::ffff:10.0.0.1".parse().unwrap()), v4);
    }
}
