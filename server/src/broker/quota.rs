//! Per-uid and broker-wide bounds on what clients make the broker hold: connections (a thread
//! and a socket each), sessions, registered buffers (a memory mapping each) and rings (a
//! mapping and two doorbell sockets each).
//!
//! Every unit is taken as a [`Ticket`] that gives it back when dropped, so a count can never
//! drift from what is really held: a buffer's ticket lives inside the buffer and is returned only
//! when its mapping is gone. The last `admin_reserve` connections and sessions are kept for root,
//! so an operator can always connect, whatever other uids do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use nvmed_proto::ControlError;
use tracing::warn;

/// What a ticket holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    /// An accepted connection (a control thread).
    Connection,
    /// A session (after Hello).
    Session,
    /// A registered buffer (a memory mapping in the broker).
    Buffer,
    /// A ring (a mapping and two doorbell sockets in the broker).
    Ring,
}

impl Resource {
    fn index(self) -> usize {
        self as usize
    }

    fn noun(self) -> &'static str {
        match self {
            Resource::Connection => "connections",
            Resource::Session => "sessions",
            Resource::Buffer => "registered buffers",
            Resource::Ring => "rings",
        }
    }
}

/// The bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSettings {
    /// Broker-wide limit per resource (connections, sessions, buffers, rings).
    pub total: [u64; 4],
    /// Per-uid limit per resource.
    pub per_uid: [u64; 4],
    /// Connections and sessions only root may use.
    pub admin_reserve: u64,
    /// Bytes of registered (with VFIO pinned) buffers one uid may hold, all its sessions
    /// together.
    pub bytes_per_uid: u64,
}

/// Mappings the broker keeps for itself (libraries, thread stacks, queues, rings) out of
/// `vm.max_map_count`, beyond the per-connection allowance.
const MAPS_RESERVED: u64 = 4096;
/// Mappings one connection may cost besides its buffers (thread stack, guard, signal stack,
/// its ring).
const MAPS_PER_CONNECTION: u64 = 8;

/// File descriptors the broker keeps for itself (listeners, devices, epoll, logs).
const FDS_RESERVED: u64 = 256;
/// Descriptors one connection may hold: its socket and the copy kept to close it at shutdown,
/// and those of one message being handled (received with room for one more than allowed, so
/// that more are seen as too many; more than the three a new ring's reply holds for a moment).
const FDS_PER_CONNECTION: u64 = 2 + nvmed_proto::control::MAX_FDS_PER_MESSAGE as u64 + 1;
/// Descriptors one ring holds in the broker (its submit and completion doorbells, and the
/// session thread's copy of the submit doorbell).
const FDS_PER_RING: u64 = 3;
/// Default broker-wide ring limit, when the descriptor limit allows more.
const DEFAULT_MAX_RINGS: u64 = 4096;

/// Raises this process's soft limit on open files to its hard limit and returns the limit now
/// in force (descriptors are bounded by the quotas derived from it, not by luck).
pub fn raise_fd_limit() -> u64 {
    nvmed_proto::limits::raise_fd_limit().unwrap_or(1024)
}

fn fd_limit() -> u64 {
    nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft)
}

/// The kernel's per-process mapping limit.
pub fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65530)
}

/// The limits asked for (from the command line or config file); `None` takes the default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QuotaRequest {
    /// Broker-wide sessions.
    pub max_sessions: usize,
    /// Sessions of one uid.
    pub sessions_per_uid: Option<usize>,
    /// Broker-wide connections.
    pub max_connections: Option<usize>,
    /// Connections of one uid.
    pub connections_per_uid: Option<usize>,
    /// Connections and sessions kept for root.
    pub admin_reserve: usize,
    /// Broker-wide registered buffers.
    pub max_buffers: Option<u64>,
    /// Registered buffers of one uid.
    pub buffers_per_uid: Option<u64>,
    /// Broker-wide rings.
    pub max_rings: Option<u64>,
    /// Rings of one uid.
    pub rings_per_uid: Option<u64>,
    /// Registered bytes of one uid.
    pub registered_bytes_per_uid: Option<u64>,
}

impl QuotaSettings {
    /// Lowers the buffer limits (broker-wide, and per uid if above it) to at most `max`.
    pub fn limit_buffers(&mut self, max: u64) {
        let i = Resource::Buffer.index();
        if self.total[i] > max {
            warn!(
                asked = self.total[i],
                allowed = max,
                "too many buffers for the IOMMU's DMA mappings (each buffer is one); lowering the limit"
            );
            self.total[i] = max;
            self.per_uid[i] = self.per_uid[i].min(max);
        }
    }

    /// Fills in defaults: per-uid limits are a quarter of the totals, connections default to
    /// sessions + 16, buffers to half of `vm.max_map_count`; a buffer limit the map count has
    /// no room for is lowered (with a warning).
    pub fn derive(asked: &QuotaRequest) -> Self {
        Self::derive_with_limits(max_map_count(), fd_limit(), asked)
    }

    fn derive_with_limits(map_count: u64, fds: u64, asked: &QuotaRequest) -> Self {
        let sessions = asked.max_sessions.max(1) as u64;
        let connections = asked.max_connections.map_or(sessions + 16, |c| c as u64).max(sessions);
        // Per uid: a quarter of the total, but small totals are not cut below 4.
        let quarter = |v: u64| (v / 4).max(v.min(4));
        // Rings: what the descriptors left after the connections hold (2 each), at least one
        // per session; a larger limit asked for is lowered (with a warning).
        let fd_room = (fds.saturating_sub(FDS_RESERVED + connections * FDS_PER_CONNECTION) / FDS_PER_RING)
            .max(sessions);
        let mut rings = asked.max_rings.unwrap_or(DEFAULT_MAX_RINGS.min(fd_room)).max(1);
        if rings > fd_room {
            warn!(
                asked = rings,
                allowed = fd_room,
                fd_limit = fds,
                "too many rings for the open-file limit (each holds three doorbell descriptors); lowering the limit"
            );
            rings = fd_room;
        }
        let room = map_count.saturating_sub(MAPS_RESERVED + connections * MAPS_PER_CONNECTION + rings).max(1);
        let mut buffers = asked.max_buffers.unwrap_or(map_count / 2).max(1);
        if buffers > room {
            warn!(
                asked = buffers,
                allowed = room,
                max_map_count = map_count,
                "too many buffers for vm.max_map_count (each is a mapping); lowering the limit"
            );
            buffers = room;
        }
        Self {
            total: [connections, sessions, buffers, rings],
            per_uid: [
                asked.connections_per_uid.map_or(quarter(connections), |v| v as u64),
                asked.sessions_per_uid.map_or(quarter(sessions), |v| v as u64),
                asked.buffers_per_uid.unwrap_or(quarter(buffers)),
                asked.rings_per_uid.unwrap_or(quarter(rings)),
            ],
            // Never so large that other uids get nothing.
            admin_reserve: (asked.admin_reserve as u64).min(sessions / 4),
            // None unless asked for.
            bytes_per_uid: asked.registered_bytes_per_uid.unwrap_or(u64::MAX).max(1),
        }
    }

    /// Defaults for `max_sessions` sessions.
    pub fn for_sessions(max_sessions: usize) -> Self {
        Self::derive(&QuotaRequest { max_sessions, admin_reserve: 4, ..Default::default() })
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: [u64; 4],
    per_uid: HashMap<u32, [u64; 4]>,
    /// Registered bytes per uid.
    bytes: HashMap<u32, u64>,
}

/// Live counts against the settings.
#[derive(Debug)]
pub struct Quotas {
    settings: QuotaSettings,
    counts: Mutex<Counts>,
}

/// One unit of a resource, returned when dropped.
#[derive(Debug)]
pub struct Ticket {
    quotas: Arc<Quotas>,
    resource: Resource,
    uid: u32,
    /// Registered bytes it holds besides its unit (buffers).
    bytes: u64,
    /// Its uid's share was given back early ([`Ticket::release_uid_share`]).
    uid_released: std::sync::atomic::AtomicBool,
}

impl Quotas {
    /// Counts against `settings`.
    pub fn new(settings: QuotaSettings) -> Arc<Self> {
        Arc::new(Self { settings, counts: Mutex::new(Counts::default()) })
    }

    /// Takes one unit of `resource` for `uid`, or says which limit refuses it.
    pub fn acquire(self: &Arc<Self>, resource: Resource, uid: u32) -> Result<Ticket, ControlError> {
        self.acquire_with_bytes(resource, uid, 0)
    }

    /// Takes one buffer of `bytes` registered bytes for `uid` (against its buffer count and its
    /// registered bytes), or says which limit refuses it.
    pub fn acquire_buffer(self: &Arc<Self>, uid: u32, bytes: u64) -> Result<Ticket, ControlError> {
        self.acquire_with_bytes(Resource::Buffer, uid, bytes)
    }

    fn acquire_with_bytes(
        self: &Arc<Self>,
        resource: Resource,
        uid: u32,
        bytes: u64,
    ) -> Result<Ticket, ControlError> {
        let i = resource.index();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let held = c.bytes.get(&uid).copied().unwrap_or(0);
        // (A sum past u64::MAX, from a length no buffer can have, is over any limit too.)
        if bytes > 0 && held.checked_add(bytes).is_none_or(|sum| sum > self.settings.bytes_per_uid) {
            return Err(ControlError::UidLimit {
                uid,
                what: format!(
                    "at most {} registered bytes per uid ({held} held, {bytes} more asked)",
                    self.settings.bytes_per_uid
                ),
            });
        }
        let mut total = self.settings.total[i];
        let reserved = matches!(resource, Resource::Connection | Resource::Session);
        if uid != 0 && reserved {
            total = total.saturating_sub(self.settings.admin_reserve);
        }
        if c.total[i] >= total {
            let reserve = if uid != 0 && reserved && self.settings.admin_reserve > 0 {
                format!(" ({} more are kept for root)", self.settings.admin_reserve)
            } else {
                String::new()
            };
            return Err(ControlError::ResourceExhausted(format!(
                "the broker holds at most {total} {} for all clients{reserve}",
                resource.noun()
            )));
        }
        let mine = c.per_uid.entry(uid).or_default();
        if mine[i] >= self.settings.per_uid[i] {
            return Err(ControlError::UidLimit {
                uid,
                what: format!("at most {} {} per uid", self.settings.per_uid[i], resource.noun()),
            });
        }
        mine[i] += 1;
        c.total[i] += 1;
        if bytes > 0 {
            *c.bytes.entry(uid).or_default() = held + bytes; // checked above
        }
        Ok(Ticket { quotas: self.clone(), resource, uid, bytes, uid_released: Default::default() })
    }

    /// Units of `resource` held now (all uids).
    pub fn held(&self, resource: Resource) -> u64 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total[resource.index()]
    }
}

impl Ticket {
    /// Gives the uid's share back now, keeping the broker-wide unit: for a resource the broker
    /// must keep for good through no fault of the client (a buffer a failed device may still
    /// write stays mapped until exit), which must not count against that uid's limits.
    pub fn release_uid_share(&self) {
        if self.uid_released.swap(true, std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        let mut c = self.quotas.counts.lock().unwrap_or_else(|p| p.into_inner());
        self.release_uid_locked(&mut c);
    }

    fn release_uid_locked(&self, c: &mut Counts) {
        let i = self.resource.index();
        if let Some(mine) = c.per_uid.get_mut(&self.uid) {
            mine[i] -= 1;
            if mine.iter().all(|&n| n == 0) {
                c.per_uid.remove(&self.uid);
            }
        }
        if self.bytes > 0 {
            if let Some(b) = c.bytes.get_mut(&self.uid) {
                *b -= self.bytes;
                if *b == 0 {
                    c.bytes.remove(&self.uid);
                }
            }
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut c = self.quotas.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total[self.resource.index()] -= 1;
        if !self.uid_released.load(std::sync::atomic::Ordering::Relaxed) {
            self.release_uid_locked(&mut c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> QuotaSettings {
        let asked = QuotaRequest {
            max_sessions: 8,
            sessions_per_uid: Some(3),
            max_connections: Some(10),
            connections_per_uid: Some(4),
            admin_reserve: 2,
            max_buffers: Some(100),
            buffers_per_uid: Some(40),
            max_rings: Some(20),
            rings_per_uid: Some(6),
            registered_bytes_per_uid: Some(1 << 20),
        };
        QuotaSettings::derive_with_limits(65530, 1 << 20, &asked)
    }

    #[test]
    fn a_buffer_kept_for_good_gives_its_uids_share_back_not_the_brokers() {
        let q = Quotas::new(settings());
        let kept = q.acquire_buffer(1000, 1 << 20).unwrap();
        // The uid's bytes are all used: another buffer of that uid is refused.
        assert!(matches!(q.acquire_buffer(1000, 4096), Err(ControlError::UidLimit { .. })));
        kept.release_uid_share();
        kept.release_uid_share(); // once only
        let again = q.acquire_buffer(1000, 1 << 20).expect("the uid's share came back");
        // The broker still counts the kept one.
        assert_eq!(q.held(Resource::Buffer), 2);
        drop(again);
        std::mem::forget(kept);
        assert_eq!(q.held(Resource::Buffer), 1);
        let c = q.counts.lock().unwrap();
        assert!(c.per_uid.is_empty() && c.bytes.is_empty(), "nothing left on the uid: {c:?}");
    }

    #[test]
    fn per_uid_and_total_limits_and_the_root_reserve() {
        let q = Quotas::new(settings());
        let a: Vec<_> = (0..3).map(|_| q.acquire(Resource::Session, 1000).unwrap()).collect();
        assert!(matches!(q.acquire(Resource::Session, 1000), Err(ControlError::UidLimit { uid: 1000, .. })));
        let b: Vec<_> = (0..3).map(|_| q.acquire(Resource::Session, 1001).unwrap()).collect();
        // 6 of 8 held, 2 reserved for root: uid 1002 is refused, root is not.
        let e = q.acquire(Resource::Session, 1002).unwrap_err();
        assert!(e.to_string().contains("kept for root"), "{e}");
        let r1 = q.acquire(Resource::Session, 0).unwrap();
        let r2 = q.acquire(Resource::Session, 0).unwrap();
        assert!(q.acquire(Resource::Session, 0).is_err());
        drop((r1, r2));
        drop(a);
        assert_eq!(q.held(Resource::Session), 3);
        let _c = q.acquire(Resource::Session, 1002).unwrap();
        drop(b);
        assert_eq!(q.held(Resource::Session), 1);
    }

    #[test]
    fn buffer_limit_follows_the_map_count() {
        let asked = QuotaRequest { max_sessions: 64, admin_reserve: 4, ..Default::default() };
        let s = QuotaSettings::derive_with_limits(65530, 1 << 20, &asked);
        assert_eq!(s.total, [80, 64, 32765, 4096]);
        assert_eq!(s.per_uid, [20, 16, 8191, 1024]);
        // Asking for more mappings than the kernel allows is lowered to what fits.
        let s = QuotaSettings::derive_with_limits(
            65530,
            1 << 20,
            &QuotaRequest { max_buffers: Some(1 << 20), ..asked },
        );
        assert_eq!(s.total[2], 65530 - 4096 - 80 * 8 - 4096);
    }

    #[test]
    fn registered_bytes_are_bounded_per_uid() {
        let q = Quotas::new(settings());
        let a = q.acquire_buffer(1000, 512 << 10).unwrap();
        let b = q.acquire_buffer(1000, 512 << 10).unwrap();
        let e = q.acquire_buffer(1000, 4096).unwrap_err();
        assert!(e.to_string().contains("registered bytes per uid"), "{e}");
        // Another uid is not touched; a buffer let go gives its bytes back.
        let _c = q.acquire_buffer(1001, 1 << 20).unwrap();
        drop(a);
        let _d = q.acquire_buffer(1000, 512 << 10).unwrap();
        drop(b);
        assert_eq!(
            QuotaSettings::derive_with_limits(65530, 1 << 20, &QuotaRequest::default()).bytes_per_uid,
            u64::MAX,
            "no per-uid byte limit unless asked for"
        );
    }

    #[test]
    fn buffers_follow_the_iommus_mapping_limit() {
        let mut s = settings();
        s.limit_buffers(30);
        assert_eq!((s.total[2], s.per_uid[2]), (30, 30));
        s.limit_buffers(1000);
        assert_eq!((s.total[2], s.per_uid[2]), (30, 30), "never raised");
    }

    #[test]
    fn a_length_whose_sum_overflows_is_refused_not_wrapped() {
        // No per-uid byte limit (u64::MAX): a client asking for a buffer of ~2^64 bytes on top
        // of what it holds overflowed the sum (a panic in a debug build).
        let q = Quotas::new(QuotaSettings { bytes_per_uid: u64::MAX, ..settings() });
        let _held = q.acquire_buffer(1000, 4096).unwrap();
        assert!(matches!(q.acquire_buffer(1000, u64::MAX), Err(ControlError::UidLimit { uid: 1000, .. })));
        assert!(q.acquire_buffer(1000, 4096).is_ok());
    }

    #[test]
    fn rings_follow_the_open_file_limit() {
        let asked = QuotaRequest { max_sessions: 64, admin_reserve: 4, ..Default::default() };
        // 1024 descriptors: 256 kept, 80 connections x 6, the rest three per ring.
        let s = QuotaSettings::derive_with_limits(65530, 1024, &asked);
        assert_eq!(s.total[3], (1024 - 256 - 80 * 6) / 3);
        assert_eq!(s.per_uid[3], (1024 - 256 - 80 * 6) / 3 / 4);
        // Asking for more is lowered; never below one ring per session.
        let s =
            QuotaSettings::derive_with_limits(65530, 1024, &QuotaRequest { max_rings: Some(5000), ..asked });
        assert_eq!(s.total[3], 96);
        assert_eq!(QuotaSettings::derive_with_limits(65530, 300, &asked).total[3], 64);
        // A uid at its ring limit is refused; rings are not kept for root.
        let q = Quotas::new(settings());
        let held: Vec<_> = (0..6).map(|_| q.acquire(Resource::Ring, 1000).unwrap()).collect();
        assert!(matches!(q.acquire(Resource::Ring, 1000), Err(ControlError::UidLimit { uid: 1000, .. })));
        drop(held);
        assert!(q.acquire(Resource::Ring, 1000).is_ok());
    }
}
