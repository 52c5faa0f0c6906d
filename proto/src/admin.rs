//! The operator protocol: what `nvmectl` asks the broker on its admin socket.
//!
//! A separate SOCK_SEQPACKET Unix socket (by default `nvmed-admin.sock` beside the client
//! socket, mode 0600, or 0660 with `--admin-group`), with the client socket's framing: each
//! datagram is one postcard-encoded [`AdminRequest`] or [`AdminResponse`], no file descriptors.
//! Only root (or the broker's own uid) and members of the admin group are served; anyone else
//! gets [`AdminError::NotAuthorized`] and the connection closes. Responses may be larger than
//! client control messages (a session list): at most [`MAX_ADMIN_MESSAGE`] bytes.

use serde::{Deserialize, Serialize};

/// Largest admin datagram (a response listing many sessions); requests are tiny.
pub const MAX_ADMIN_MESSAGE: usize = 1 << 20;

/// A request from `nvmectl` to the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The broker, its controllers, namespaces, I/O threads and totals.
    Status,
    /// Every live session with its counters.
    Sessions,
    /// End a session as if its client had disconnected (its I/O drains, its memory is released).
    Kill {
        /// The session id (as [`SessionReport::id`] and the broker's logs show it).
        session: u64,
    },
    /// Each controller's SMART / Health Information log page.
    Health,
    /// Read the configuration again and put its grants and limits in force (as SIGHUP does).
    Reload,
    /// The grants in force, with their limits.
    Limits,
    /// Change one grant's share and limits now (in memory: the next reload reads the file).
    SetLimits {
        /// The grant's uid.
        uid: u32,
        /// The grant's namespace (broker-wide id).
        nsid: u32,
        /// The new limits, as in `--grant`: `weight=3,iops=20k,read-mbps=100,qd=64,per=uid`.
        limits: String,
    },
    /// One page of the live sessions, in order of id: those with an id above `after` (all if
    /// `None`), at most `max` (the broker may give fewer, to fit [`MAX_ADMIN_MESSAGE`]).
    /// [`AdminRequest::Sessions`] answers in one message, which thousands of sessions overflow.
    SessionsPage {
        /// The last id of the previous page.
        after: Option<u64>,
        /// Most sessions wanted.
        max: u32,
    },
    /// [`AdminRequest::Kill`], only if the session still belongs to this uid and/or pid (an
    /// operator's `nvmectl kill ID --pid PID`: session ids start again at 1 when the broker
    /// restarts, so an id read before a restart may name another tenant's session after it).
    /// A mismatch is refused with [`AdminError::NotThatSession`] and nothing is ended.
    KillIf {
        /// The session id.
        session: u64,
        /// Its client's uid must be this one.
        uid: Option<u32>,
        /// Its client's pid must be this one.
        pid: Option<i32>,
    },
    /// Reset a controller now (as `nvme reset /dev/nvmeX` does): its I/O queues stop, the
    /// controller is disabled and enabled again, the I/O threads create their queues again and
    /// send their commands in flight again (each completes once). Answered with
    /// [`AdminResponse::ControllerReset`] once the reset is done.
    ResetController {
        /// The controller's index ([`ControllerReport::index`]).
        controller: u16,
    },
}

/// Most sessions in one [`AdminResponse::SessionsPage`].
pub const SESSIONS_PAGE_MAX: u32 = 1024;

/// A grant in force, as `nvmectl limits` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReport {
    /// The uid.
    pub uid: u32,
    /// The namespace (broker-wide id).
    pub nsid: u32,
    /// First LBA and LBAs of its window, if it has one.
    pub window: Option<(u64, u64)>,
    /// Reads only.
    pub read_only: bool,
    /// Its share and limits, as in `--grant`.
    pub limits: String,
}

/// A response from the broker to `nvmectl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
// One per operator request, never stored in bulk: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
pub enum AdminResponse {
    /// Reply to [`AdminRequest::Status`].
    Status(StatusReport),
    /// Reply to [`AdminRequest::Sessions`].
    Sessions(Vec<SessionReport>),
    /// Reply to [`AdminRequest::Kill`], once the session is released.
    Killed,
    /// Reply to [`AdminRequest::Health`], one per controller.
    Health(Vec<HealthReport>),
    /// Reply to [`AdminRequest::Limits`]: the grants, and the access of uids without any.
    Limits {
        /// The grants.
        grants: Vec<GrantReport>,
        /// Access of uids without grants (`read-write`, `read-only` or `none`).
        default_access: String,
    },
    /// Reply to [`AdminRequest::Reload`] and [`AdminRequest::SetLimits`].
    Reloaded {
        /// Sessions whose grants changed and were updated in place.
        updated: u64,
        /// Sessions ended because they lost a namespace.
        ended: u64,
    },
    /// The request failed.
    Error(AdminError),
    /// Reply to [`AdminRequest::SessionsPage`].
    SessionsPage {
        /// Sessions in order of id.
        sessions: Vec<SessionReport>,
        /// More sessions follow the last one: ask again with its id.
        more: bool,
    },
    /// Reply to [`AdminRequest::ResetController`].
    ControllerReset {
        /// The controller's state after the reset (`running`, or how it failed).
        state: String,
        /// Resets of this controller since the broker started, this one included.
        resets: u64,
    },
}

/// Why an admin request failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum AdminError {
    /// The peer is neither root nor in the admin group.
    #[error("permission denied for uid {uid}: nvmectl needs root{}", group_clause(.group))]
    NotAuthorized {
        /// The peer's uid.
        uid: u32,
        /// The broker's `--admin-group`, if any.
        group: Option<String>,
    },
    /// Too many admin connections are open.
    #[error("the broker serves at most {limit} admin connections at once; try again")]
    Busy {
        /// The limit.
        limit: usize,
    },
    /// No live session has this id.
    #[error("no session {0} (see `nvmectl sessions`)")]
    UnknownSession(u64),
    /// A wait did not end in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// No grant of that uid on that namespace.
    #[error("no grant for uid {uid} on namespace {nsid} (see `nvmectl limits`)")]
    UnknownGrant {
        /// The uid.
        uid: u32,
        /// The namespace.
        nsid: u32,
    },
    /// The configuration could not be reloaded; the grants in force are unchanged.
    #[error("reload refused, the previous grants stay in force: {0}")]
    Reload(String),
    /// The datagram did not decode as a request.
    #[error("malformed admin request: {0}")]
    Malformed(String),
    /// The reply would be larger than [`MAX_ADMIN_MESSAGE`].
    #[error("the reply would exceed {limit} bytes")]
    TooLarge {
        /// [`MAX_ADMIN_MESSAGE`].
        limit: usize,
    },
    /// The broker failed for its own reasons.
    #[error("broker error: {0}")]
    Internal(String),
    /// [`AdminRequest::SetLimits`] named limits that do not parse; nothing changed.
    #[error("bad limits, nothing changed: {0}")]
    BadLimits(String),
    /// [`AdminRequest::KillIf`]: the session is not the one the operator meant; nothing ended.
    #[error("session {session} is {found}, not {expected}; nothing was ended (see `nvmectl sessions`)")]
    NotThatSession {
        /// The session id.
        session: u64,
        /// What the operator named (`uid 1000, pid 4242`).
        expected: String,
        /// What the session is.
        found: String,
    },
    /// No controller has this index.
    #[error("no controller {0} (see `nvmectl status`)")]
    UnknownController(u16),
}

fn group_clause(group: &Option<String>) -> String {
    match group {
        Some(g) => format!(" or membership in group {g}"),
        None => " (the broker was started without --admin-group)".into(),
    }
}

/// The broker at a glance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// nvmed's version.
    pub version: String,
    /// Seconds since the broker started.
    pub uptime_secs: u64,
    /// Its controllers, in broker order.
    pub controllers: Vec<ControllerReport>,
    /// Namespaces served, with their broker-wide ids.
    pub namespaces: Vec<NamespaceReport>,
    /// Its I/O threads.
    pub io_threads: Vec<crate::IoThreadInfo>,
    /// Entries asked for each device I/O queue (`--queue-depth`).
    pub queue_depth: u32,
    /// Live sessions.
    pub sessions: u64,
    /// Most sessions (`--max-sessions`).
    pub max_sessions: u64,
    /// Counters summed over the live sessions.
    pub totals: Totals,
    /// Buffers registered by the live sessions.
    pub registered_buffers: u64,
    /// Bytes of IOVA space mapped for client buffers.
    pub registered_bytes: u64,
}

/// One controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerReport {
    /// Its index (as [`NamespaceReport::controller`]).
    pub index: u16,
    /// The device (PCI address, or `emulated-N`).
    pub device: String,
    /// Model number (Identify).
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware revision.
    pub firmware: String,
    /// Largest single device transfer in bytes (MDTS).
    pub max_transfer: u32,
    /// Entries of each I/O queue the controller really granted.
    pub queue_entries: u32,
    /// `running`, or how it failed after a reset.
    pub state: String,
}

/// One served namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceReport {
    /// Broker-wide namespace id.
    pub nsid: u32,
    /// Controller index.
    pub controller: u16,
    /// Its id on that controller.
    pub device_nsid: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// LBA size in bytes.
    pub lba_size: u32,
}

/// Counters of one session or all of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Requests taken off the SQs.
    pub submitted: u64,
    /// Completions posted.
    pub completed: u64,
    /// Completions with an error status.
    pub errors: u64,
    /// Bytes read by successful reads.
    pub bytes_read: u64,
    /// Bytes written by successful writes.
    pub bytes_written: u64,
    /// Requests at the device now.
    pub in_flight: u64,
    /// Completed device requests by latency (taken to posted): bucket `i` counts those that
    /// took from `2^i` to `2^(i+1)` microseconds (bucket 0 also below 1 µs, the last one
    /// everything above). See [`latency_percentile`].
    pub latency_log2_us: [u64; LATENCY_BUCKETS],
    /// Sum of those requests' latencies, microseconds.
    pub latency_sum_us: u64,
    /// Time requests waited for rate limits (a grant's IOPS or MB/s), nanoseconds: for a
    /// session, the time its rings had a request held back by its tenant's limits.
    pub throttled_ns: u64,
}

/// Buckets of [`Totals::latency_log2_us`].
pub const LATENCY_BUCKETS: usize = 24;

/// The bucket of a latency of `us` microseconds.
pub fn latency_bucket(us: u32) -> usize {
    (31 - us.max(1).leading_zeros() as usize).min(LATENCY_BUCKETS - 1)
}

/// The latency (upper bound of its bucket, in microseconds) below which fraction `p` (0 to 1)
/// of the requests counted in `buckets` completed; `None` if none were counted.
pub fn latency_percentile(buckets: &[u64], p: f64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let want = ((total as f64) * p).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, &n) in buckets.iter().enumerate() {
        seen += n;
        if seen >= want {
            return Some(2u64 << i);
        }
    }
    Some(2u64 << (buckets.len() - 1))
}

/// One live session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReport {
    /// Session id (the connection id in the broker's logs).
    pub id: u64,
    /// The client's uid.
    pub uid: u32,
    /// The client's pid (at connect).
    pub pid: i32,
    /// Its command name (`/proc/PID/comm` at Hello; empty if unknown).
    pub command: String,
    /// The name the client gave in Hello.
    pub client: String,
    /// When the session started, in seconds since the Unix epoch.
    pub started_unix: u64,
    /// Seconds since it started.
    pub age_secs: u64,
    /// Its rings.
    pub rings: u32,
    /// Its registered buffers.
    pub buffers: u64,
    /// Bytes it registered.
    pub registered_bytes: u64,
    /// Its counters, summed over its rings.
    pub counters: Totals,
}

/// One controller's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    /// Controller index.
    pub controller: u16,
    /// The device.
    pub device: String,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// The decoded log page (`None` if it could not be read: see `error`).
    pub smart: Option<SmartLog>,
    /// Why the log page could not be read.
    pub error: Option<String>,
}

/// The SMART / Health Information log page (Get Log Page, LID 02h), decoded. The 128-bit
/// counters of the page are reported saturated to 64 bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmartLog {
    /// Critical Warning bits (0: spare below threshold, 1: temperature, 2: reliability
    /// degraded, 3: read-only, 4: volatile memory backup failed, 5: persistent memory read-only).
    pub critical_warning: u8,
    /// Composite temperature in kelvin.
    pub temperature_kelvin: u16,
    /// Composite temperature in degrees Celsius.
    pub temperature_celsius: i32,
    /// Available spare, percent.
    pub available_spare: u8,
    /// Available spare threshold, percent.
    pub available_spare_threshold: u8,
    /// Percentage of the rated endurance used (may exceed 100).
    pub percentage_used: u8,
    /// Data read by hosts, in units of 1000 × 512 bytes, rounded up.
    pub data_units_read: u64,
    /// Data written by hosts, in units of 1000 × 512 bytes, rounded up.
    pub data_units_written: u64,
    /// Read commands completed.
    pub host_read_commands: u64,
    /// Write commands completed.
    pub host_write_commands: u64,
    /// Minutes the controller was busy with I/O.
    pub controller_busy_minutes: u64,
    /// Power cycles.
    pub power_cycles: u64,
    /// Power-on hours.
    pub power_on_hours: u64,
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: u64,
    /// Unrecovered data integrity errors.
    pub media_errors: u64,
    /// Error Information log entries over the controller's life.
    pub error_log_entries: u64,
}

/// Bytes in one SMART data unit (1000 units of 512 bytes).
pub const SMART_DATA_UNIT: u64 = 512_000;

impl SmartLog {
    /// Zeroes the counters of the device's activity (data units and commands read and
    /// written, busy minutes), which tell one tenant what the others do; the health figures
    /// (warnings, temperature, spare, wear, errors, power) stay.
    pub fn hide_activity(&mut self) {
        self.data_units_read = 0;
        self.data_units_written = 0;
        self.host_read_commands = 0;
        self.host_write_commands = 0;
        self.controller_busy_minutes = 0;
    }

    /// Data units for `bytes` (rounded up, as the log page counts them).
    pub fn data_units(bytes: u64) -> u64 {
        bytes.div_ceil(SMART_DATA_UNIT)
    }

    /// Bytes the data units stand for (upper bound).
    pub fn bytes(units: u64) -> u64 {
        units.saturating_mul(SMART_DATA_UNIT)
    }
}

/// Encodes an admin message.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    postcard::to_stdvec(msg).expect("admin messages always serialize")
}

/// Decodes an admin message, mapping failures to [`AdminError::Malformed`].
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, AdminError> {
    postcard::from_bytes(bytes).map_err(|e| AdminError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// postcard sends an enum variant as its position: a variant inserted before others
    /// changes what older and newer peers read. New variants go at the end.
    #[test]
    fn variant_positions_stay() {
        let pos = |bytes: Vec<u8>| bytes[0];
        assert_eq!(pos(encode(&AdminRequest::SessionsPage { after: None, max: 1 })), 7);
        assert_eq!(pos(encode(&AdminRequest::KillIf { session: 1, uid: None, pid: None })), 8);
        assert_eq!(pos(encode(&AdminRequest::ResetController { controller: 0 })), 9);
        assert_eq!(pos(encode(&AdminResponse::SessionsPage { sessions: vec![], more: false })), 7);
        assert_eq!(pos(encode(&AdminResponse::ControllerReset { state: String::new(), resets: 0 })), 8);
        let err = |e: AdminError| pos(encode(&AdminResponse::Error(e)).split_off(1));
        assert_eq!(err(AdminError::Internal(String::new())), 8);
        assert_eq!(err(AdminError::BadLimits(String::new())), 9);
        assert_eq!(
            err(AdminError::NotThatSession { session: 0, expected: String::new(), found: String::new() }),
            10
        );
        assert_eq!(err(AdminError::UnknownController(0)), 11);
    }

    #[test]
    fn latency_buckets_and_percentiles() {
        assert_eq!(
            (latency_bucket(0), latency_bucket(1), latency_bucket(3), latency_bucket(1024)),
            (0, 0, 1, 10)
        );
        assert_eq!(latency_bucket(u32::MAX), LATENCY_BUCKETS - 1);
        let mut b = [0u64; LATENCY_BUCKETS];
        b[latency_bucket(200)] = 98; // 128-255 us
        b[latency_bucket(9000)] = 2; // 8192-16383 us
        assert_eq!(latency_percentile(&b, 0.5), Some(256));
        assert_eq!(latency_percentile(&b, 0.99), Some(16384));
        assert_eq!(latency_percentile(&[0; LATENCY_BUCKETS], 0.5), None);
    }

    #[test]
    fn messages_round_trip() {
        for r in [
            AdminRequest::Status,
            AdminRequest::Sessions,
            AdminRequest::Kill { session: 7 },
            AdminRequest::Health,
            AdminRequest::SessionsPage { after: Some(9), max: 100 },
        ] {
            assert_eq!(decode::<AdminRequest>(&encode(&r)).unwrap(), r);
        }
        let s = SessionReport {
            id: 3,
            uid: 1000,
            pid: 42,
            command: "fio".into(),
            client: "ringbench".into(),
            started_unix: 1,
            age_secs: 2,
            rings: 2,
            buffers: 1,
            registered_bytes: 4096,
            counters: Totals { submitted: 9, completed: 8, ..Totals::default() },
        };
        let h = HealthReport {
            controller: 0,
            device: "emulated-0".into(),
            model: "m".into(),
            serial: "s".into(),
            smart: Some(SmartLog { temperature_kelvin: 313, temperature_celsius: 40, ..SmartLog::default() }),
            error: None,
        };
        for r in [
            AdminResponse::Sessions(vec![s.clone()]),
            AdminResponse::SessionsPage { sessions: vec![s], more: true },
            AdminResponse::Killed,
            AdminResponse::Health(vec![h]),
            AdminResponse::Error(AdminError::NotAuthorized { uid: 1000, group: Some("adm".into()) }),
        ] {
            assert_eq!(decode::<AdminResponse>(&encode(&r)).unwrap(), r);
        }
    }

    #[test]
    fn refusal_names_the_group() {
        let e = AdminError::NotAuthorized { uid: 1000, group: Some("nvmed-admin".into()) };
        assert_eq!(
            e.to_string(),
            "permission denied for uid 1000: nvmectl needs root or membership in group nvmed-admin"
        );
        let e = AdminError::NotAuthorized { uid: 1000, group: None };
        assert!(e.to_string().contains("nvmectl needs root (the broker was started without --admin-group)"));
    }

    #[test]
    fn data_units_round_up() {
        assert_eq!(SmartLog::data_units(0), 0);
        assert_eq!(SmartLog::data_units(1), 1);
        assert_eq!(SmartLog::data_units(512_000), 1);
        assert_eq!(SmartLog::data_units(512_001), 2);
    }
}
