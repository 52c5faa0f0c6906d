//! Talking to the broker's admin socket.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{connect, setsockopt, socket, sockopt, AddressFamily, SockFlag, SockType, UnixAddr};
use nix::sys::time::TimeVal;
use nvmed_proto::admin::{
    decode, encode, AdminError, AdminRequest, AdminResponse, HealthReport, SessionReport, StatusReport,
    MAX_ADMIN_MESSAGE, SESSIONS_PAGE_MAX,
};
use nvmed_proto::transport::{self, TransportError};

/// Where nvmed puts its admin socket by default.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/nvmed-admin.sock";

/// How long to wait for a connection and a reply unless told otherwise
/// ([`AdminClient::with_timeout`]). A kill waits for the session's I/O to drain, and a health
/// read for a controller's admin queue (which may time out and reset the controller, minutes
/// with a large CAP.TO): those get [`LONG_TIMEOUT`].
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// The default wait for [`AdminClient::kill`] and [`AdminClient::health`].
pub const LONG_TIMEOUT: Duration = Duration::from_secs(120);

/// What can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing listens on the socket.
    #[error("no broker is listening on {path} ({reason}); is nvmed running? (--admin-socket PATH)")]
    NotRunning {
        /// The socket path.
        path: PathBuf,
        /// The connect error.
        reason: String,
    },
    /// The socket file's permissions keep this user out.
    #[error(
        "cannot connect to {path}: permission denied; nvmectl needs root{}{}",
        owner_clause(.owner),
        group_clause(.group)
    )]
    PermissionDenied {
        /// The socket path.
        path: PathBuf,
        /// The user owning the socket file (the user nvmed runs as).
        owner: Option<String>,
        /// The group owning the socket file when it lets its group in.
        group: Option<String>,
    },
    /// The broker refused the request.
    #[error("{0}")]
    Broker(#[from] AdminError),
    /// The broker did not accept the connection or answer within the timeout.
    #[error("admin socket {path}: {reason}")]
    Timeout {
        /// The socket path.
        path: PathBuf,
        /// What did not come in time.
        reason: String,
    },
    /// nvmectl asked for something this broker does not know (an older nvmed).
    #[error("{0}")]
    Unsupported(String),
    /// The connection failed.
    #[error("admin socket {path}: {reason}")]
    Transport {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The broker answered something unexpected.
    #[error("unexpected reply from the broker: {0}")]
    Unexpected(String),
}

fn owner_clause(owner: &Option<String>) -> String {
    match owner {
        Some(o) => format!(", the user nvmed runs as ({o})"),
        None => String::new(),
    }
}

impl CtlError {
    /// nvmectl's exit status for this error: 1 when the broker answered with an error (unknown
    /// session or grant, bad limits, a configuration that does not parse, a kill still draining
    /// at its deadline, a request this broker does not know), 3 when nvmectl could not get an
    /// answer (no broker, permission denied, busy, timed out, connection failed). (2 is
    /// `nvmectl health`'s "a controller is in trouble", 64 a command line that does not parse.)
    pub fn exit_code(&self) -> i32 {
        match self {
            CtlError::NotRunning { .. }
            | CtlError::PermissionDenied { .. }
            | CtlError::Timeout { .. }
            | CtlError::Transport { .. } => 3,
            CtlError::Broker(AdminError::Busy { .. } | AdminError::NotAuthorized { .. }) => 3,
            CtlError::Broker(_) | CtlError::Unexpected(_) | CtlError::Unsupported(_) => 1,
        }
    }

    /// Whether trying again later may succeed (`top` keeps trying): no broker listening (it may
    /// be restarting), busy, no answer in time, a connection that failed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            CtlError::NotRunning { .. }
                | CtlError::Timeout { .. }
                | CtlError::Transport { .. }
                | CtlError::Broker(AdminError::Busy { .. })
        )
    }

    /// A short stable name of the error for `--json` output (`not_running`, `unknown_session`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            CtlError::NotRunning { .. } => "not_running",
            CtlError::PermissionDenied { .. } => "permission_denied",
            CtlError::Timeout { .. } => "timeout",
            CtlError::Unsupported(_) => "unsupported",
            CtlError::Transport { .. } => "transport",
            CtlError::Unexpected(_) => "unexpected_reply",
            CtlError::Broker(e) => match e {
                AdminError::NotAuthorized { .. } => "permission_denied",
                AdminError::Busy { .. } => "busy",
                AdminError::UnknownSession(_) => "unknown_session",
                AdminError::Timeout(_) => "timeout",
                AdminError::UnknownGrant { .. } => "unknown_grant",
                AdminError::Reload(_) => "reload_refused",
                AdminError::Malformed(_) => "malformed_request",
                AdminError::TooLarge { .. } => "too_large",
                AdminError::Internal(_) => "internal",
                AdminError::BadLimits(_) => "bad_limits",
                AdminError::NotThatSession { .. } => "not_that_session",
                AdminError::UnknownController(_) => "unknown_controller",
            },
        }
    }
}

fn group_clause(group: &Option<String>) -> String {
    match group {
        Some(g) => format!(" or membership in group {g}"),
        None => String::new(),
    }
}

/// A client of the admin socket (one connection per request: the broker closes idle ones).
#[derive(Debug, Clone)]
pub struct AdminClient {
    path: PathBuf,
    timeout: Option<Duration>,
}

impl AdminClient {
    /// A client of the admin socket at `path`.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), timeout: None }
    }

    /// The same client, waiting at most `timeout` to connect and for each reply (by default
    /// [`REPLY_TIMEOUT`], [`LONG_TIMEOUT`] for kills and health reads).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn transport(&self, reason: impl std::fmt::Display) -> CtlError {
        CtlError::Transport { path: self.path.clone(), reason: reason.to_string() }
    }

    fn connect(&self, timeout: Duration) -> Result<OwnedFd, CtlError> {
        let fd = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
            .map_err(|e| self.transport(e))?;
        let addr = UnixAddr::new(&self.path).map_err(|e| self.transport(e))?;
        let t = TimeVal::new(timeout.as_secs() as _, timeout.subsec_micros() as _);
        // A Unix connect waits for room in a full listen backlog (a broker that stopped
        // accepting) up to the send timeout; sends and receives are bounded the same way.
        setsockopt(&fd, sockopt::SendTimeout, &t).map_err(|e| self.transport(e))?;
        setsockopt(&fd, sockopt::ReceiveTimeout, &t).map_err(|e| self.transport(e))?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {}
            Err(nix::Error::EACCES) | Err(nix::Error::EPERM) => {
                return Err(CtlError::PermissionDenied {
                    path: self.path.clone(),
                    owner: socket_owner(&self.path),
                    group: socket_group(&self.path),
                })
            }
            Err(nix::Error::EAGAIN) | Err(nix::Error::EINPROGRESS) => {
                return Err(CtlError::Timeout {
                    path: self.path.clone(),
                    reason: format!(
                    "the broker did not accept the connection within {:.1} s (--timeout SECS to wait longer)",
                    timeout.as_secs_f64()
                ),
                })
            }
            Err(e @ (nix::Error::ENOENT | nix::Error::ECONNREFUSED | nix::Error::ENOTDIR)) => {
                return Err(CtlError::NotRunning { path: self.path.clone(), reason: e.desc().to_lowercase() })
            }
            Err(e) => return Err(self.transport(e)),
        }
        Ok(fd)
    }

    /// Sends one request and returns the reply (`AdminResponse::Error` as [`CtlError::Broker`]).
    pub fn request(&self, req: &AdminRequest) -> Result<AdminResponse, CtlError> {
        let default = match req {
            AdminRequest::Kill { .. }
            | AdminRequest::KillIf { .. }
            | AdminRequest::Health
            | AdminRequest::ResetController { .. } => LONG_TIMEOUT,
            _ => REPLY_TIMEOUT,
        };
        let timeout = self.timeout.unwrap_or(default).max(Duration::from_millis(1));
        let fd = self.connect(timeout)?;
        // A refused peer is answered and disconnected at once: its send may fail, and the
        // refusal still waits to be read.
        let sent = transport::send(fd.as_fd(), &encode(req), &[]);
        let mut got = transport::recv_sized(fd.as_fd(), MAX_ADMIN_MESSAGE);
        if matches!(got, Err(TransportError::Closed)) {
            // A reset reported first; what was queued before it may still be there.
            got = transport::recv_sized(fd.as_fd(), MAX_ADMIN_MESSAGE);
        }
        let msg = match got {
            Ok(m) => m,
            Err(TransportError::Io(nix::Error::EAGAIN)) => {
                return Err(CtlError::Timeout {
                    path: self.path.clone(),
                    reason: format!(
                        "no reply within {:.1} s (--timeout SECS to wait longer)",
                        timeout.as_secs_f64()
                    ),
                })
            }
            Err(e) => {
                return Err(match sent {
                    Err(s) => self.transport(format!("sending the request: {s}")),
                    Ok(()) => self.transport(format!("the broker closed the connection ({e})")),
                })
            }
        };
        if msg.truncated {
            return Err(self.transport(format!("reply longer than {MAX_ADMIN_MESSAGE} bytes")));
        }
        match decode::<AdminResponse>(&msg.bytes) {
            Ok(AdminResponse::Error(e)) => Err(CtlError::Broker(e)),
            Ok(r) => Ok(r),
            Err(e) => Err(self.transport(format!("undecodable reply (another nvmed version?): {e}"))),
        }
    }

    /// The broker's status.
    pub fn status(&self) -> Result<StatusReport, CtlError> {
        match self.request(&AdminRequest::Status)? {
            AdminResponse::Status(s) => Ok(s),
            other => Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The live sessions, in order of id (asked page by page: any number fits).
    pub fn sessions(&self) -> Result<Vec<SessionReport>, CtlError> {
        let mut all = Vec::new();
        let mut after = None;
        loop {
            let page = match self.request(&AdminRequest::SessionsPage { after, max: SESSIONS_PAGE_MAX }) {
                // A broker from before SessionsPage does not know the request: one list then.
                Err(CtlError::Broker(AdminError::Malformed(_))) if after.is_none() => {
                    return match self.request(&AdminRequest::Sessions)? {
                        AdminResponse::Sessions(s) => Ok(s),
                        other => Err(CtlError::Unexpected(format!("{other:?}"))),
                    };
                }
                r => r?,
            };
            match page {
                AdminResponse::SessionsPage { sessions, more } => {
                    after = sessions.last().map(|s| s.id).or(after);
                    let empty = sessions.is_empty();
                    all.extend(sessions);
                    if !more || empty {
                        return Ok(all);
                    }
                }
                other => return Err(CtlError::Unexpected(format!("{other:?}"))),
            }
        }
    }

    /// Ends a session; returns once the broker has released it.
    pub fn kill(&self, session: u64) -> Result<(), CtlError> {
        match self.request(&AdminRequest::Kill { session })? {
            AdminResponse::Killed => Ok(()),
            other => Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Ends a session only if its client still has this uid and/or pid (see
    /// [`AdminRequest::KillIf`]); returns once the broker has released it.
    pub fn kill_if(&self, session: u64, uid: Option<u32>, pid: Option<i32>) -> Result<(), CtlError> {
        let req = if uid.is_none() && pid.is_none() {
            AdminRequest::Kill { session }
        } else {
            AdminRequest::KillIf { session, uid, pid }
        };
        match self.request(&req) {
            Ok(AdminResponse::Killed) => Ok(()),
            // A broker from before KillIf does not know the request: nothing was ended.
            Err(CtlError::Broker(AdminError::Malformed(_))) if matches!(req, AdminRequest::KillIf { .. }) => {
                Err(CtlError::Unsupported(
                    "this nvmed predates kill --pid/--uid: nothing was ended (check `nvmectl sessions`, then kill without them)"
                        .into(),
                ))
            }
            Ok(other) => Err(CtlError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// Resets controller `controller` now; returns (its state after, its resets so far).
    pub fn reset_controller(&self, controller: u16) -> Result<(String, u64), CtlError> {
        match self.request(&AdminRequest::ResetController { controller }) {
            Ok(AdminResponse::ControllerReset { state, resets }) => Ok((state, resets)),
            Err(CtlError::Broker(AdminError::Malformed(_))) => {
                Err(CtlError::Unsupported("this nvmed predates nvmectl reset: nothing was reset".into()))
            }
            Ok(other) => Err(CtlError::Unexpected(format!("{other:?}"))),
            Err(e) => Err(e),
        }
    }

    /// Makes the broker read its configuration again; returns (sessions updated, ended).
    pub fn reload(&self) -> Result<(u64, u64), CtlError> {
        match self.request(&AdminRequest::Reload)? {
            AdminResponse::Reloaded { updated, ended } => Ok((updated, ended)),
            other => Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// The grants in force: (grants, access of uids without grants).
    pub fn limits(&self) -> Result<(Vec<nvmed_proto::admin::GrantReport>, String), CtlError> {
        match self.request(&AdminRequest::Limits)? {
            AdminResponse::Limits { grants, default_access } => Ok((grants, default_access)),
            other => Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Changes one grant's limits now; returns (sessions updated, ended).
    pub fn set_limits(&self, uid: u32, nsid: u32, limits: &str) -> Result<(u64, u64), CtlError> {
        match self.request(&AdminRequest::SetLimits { uid, nsid, limits: limits.to_string() })? {
            AdminResponse::Reloaded { updated, ended } => Ok((updated, ended)),
            other => Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Each controller's SMART / health data.
    pub fn health(&self) -> Result<Vec<HealthReport>, CtlError> {
        match self.request(&AdminRequest::Health)? {
            AdminResponse::Health(h) => Ok(h),
            other => Err(CtlError::Unexpected(format!("{other:?}"))),
        }
    }
}

/// The user owning the socket file (nvmed creates it as the user it runs as).
fn socket_owner(path: &Path) -> Option<String> {
    let uid = nix::unistd::Uid::from_raw(std::fs::metadata(path).ok()?.uid());
    Some(match nix::unistd::User::from_uid(uid).ok().flatten() {
        Some(u) => format!("{}, uid {uid}", u.name),
        None => format!("uid {uid}"),
    })
}

/// The group owning the socket file, when its permissions let that group in.
fn socket_group(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if meta.mode() & 0o060 != 0o060 {
        return None;
    }
    let gid = nix::unistd::Gid::from_raw(meta.gid());
    Some(nix::unistd::Group::from_gid(gid).ok().flatten().map_or_else(|| gid.to_string(), |g| g.name))
}
