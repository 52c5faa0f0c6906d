//! Per-uid and broker-wide bounds on what clients make the broker hold: connections (a thread
//! each), sessions, and registered buffers (a memory mapping each).
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
        }
    }
}

/// The bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaSettings {
    /// Broker-wide limit per resource (connections, sessions, buffers).
    pub total: [u64; 3],
    /// Per-uid limit per resource.
    pub per_uid: [u64; 3],
    /// Connections and sessions only root may use.
    pub admin_reserve: u64,
}

/// Mappings the broker keeps for itself (libraries, thread stacks, queues, rings) out of
/// `vm.max_map_count`, beyond the per-connection allowance.
const MAPS_RESERVED: u64 = 4096;
/// Mappings one connection may cost besides its buffers (thread stack, guard, signal stack,
/// its ring).
const MAPS_PER_CONNECTION: u64 = 8;

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
}

impl QuotaSettings {
    /// Fills in defaults: per-uid limits are a quarter of the totals, connections default to
    /// sessions + 16, buffers to half of `vm.max_map_count`; a buffer limit the map count has
    /// no room for is lowered (with a warning).
    pub fn derive(asked: &QuotaRequest) -> Self {
        Self::derive_with_map_count(max_map_count(), asked)
    }

    fn derive_with_map_count(map_count: u64, asked: &QuotaRequest) -> Self {
        let sessions = asked.max_sessions.max(1) as u64;
        let connections = asked.max_connections.map_or(sessions + 16, |c| c as u64).max(sessions);
        // Per uid: a quarter of the total, but small totals are not cut below 4.
        let quarter = |v: u64| (v / 4).max(v.min(4));
        let room = map_count.saturating_sub(MAPS_RESERVED + connections * MAPS_PER_CONNECTION).max(1);
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
            total: [connections, sessions, buffers],
            per_uid: [
                asked.connections_per_uid.map_or(quarter(connections), |v| v as u64),
                asked.sessions_per_uid.map_or(quarter(sessions), |v| v as u64),
                asked.buffers_per_uid.unwrap_or(quarter(buffers)),
            ],
            // Never so large that other uids get nothing.
            admin_reserve: (asked.admin_reserve as u64).min(sessions / 4),
        }
    }

    /// Defaults for `max_sessions` sessions.
    pub fn for_sessions(max_sessions: usize) -> Self {
        Self::derive(&QuotaRequest { max_sessions, admin_reserve: 4, ..Default::default() })
    }
}

#[derive(Debug, Default)]
struct Counts {
    total: [u64; 3],
    per_uid: HashMap<u32, [u64; 3]>,
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
}

impl Quotas {
    /// Counts against `settings`.
    pub fn new(settings: QuotaSettings) -> Arc<Self> {
        Arc::new(Self { settings, counts: Mutex::new(Counts::default()) })
    }

    /// Takes one unit of `resource` for `uid`, or says which limit refuses it.
    pub fn acquire(self: &Arc<Self>, resource: Resource, uid: u32) -> Result<Ticket, ControlError> {
        let i = resource.index();
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = self.settings.total[i];
        if uid != 0 && resource != Resource::Buffer {
            total = total.saturating_sub(self.settings.admin_reserve);
        }
        if c.total[i] >= total {
            let reserve = if uid != 0 && resource != Resource::Buffer && self.settings.admin_reserve > 0 {
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
        Ok(Ticket { quotas: self.clone(), resource, uid })
    }

    /// Units of `resource` held now (all uids).
    pub fn held(&self, resource: Resource) -> u64 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).total[resource.index()]
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let i = self.resource.index();
        let mut c = self.quotas.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total[i] -= 1;
        if let Some(mine) = c.per_uid.get_mut(&self.uid) {
            mine[i] -= 1;
            if mine.iter().all(|&n| n == 0) {
                c.per_uid.remove(&self.uid);
            }
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
        };
        QuotaSettings::derive_with_map_count(65530, &asked)
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
        let s = QuotaSettings::derive_with_map_count(65530, &asked);
        assert_eq!(s.total, [80, 64, 32765]);
        assert_eq!(s.per_uid, [20, 16, 8191]);
        // Asking for more mappings than the kernel allows is lowered to what fits.
        let s = QuotaSettings::derive_with_map_count(
            65530,
            &QuotaRequest { max_buffers: Some(1 << 20), ..asked },
        );
        assert_eq!(s.total[2], 65530 - 4096 - 80 * 8);
    }
}
