//! The live sessions, as the operator sees them (`nvmectl sessions`).
//!
//! Control plane only: a control thread adds its session at Hello, its rings as it creates and
//! closes them, its registration totals as they change, and removes the session once it is
//! released. The I/O threads never touch the registry; a report reads their per-ring counters
//! with relaxed loads, as `Stats` does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use nvmed_proto::admin::{SessionReport, Totals};

use super::session::SessionCounters;

/// A session's grants as resolved now, and its rings (to tell them when the grants change).
#[derive(Debug, Default)]
pub struct Access {
    /// The namespaces it may use.
    pub namespaces: Vec<crate::policy::NamespaceAccess>,
    /// Its rings: ring id, I/O thread, key on that thread.
    pub rings: Vec<(u32, usize, usize)>,
    /// A reload ended it (a namespace it used was withdrawn, or its tenant changed): the session
    /// is being ended and gets no new ring.
    pub withdrawn: bool,
    /// Once withdrawn: the namespaces its rings may still reach (later reloads only narrow it).
    pub still_reached: Vec<u32>,
}

/// One live session.
#[derive(Debug)]
pub struct SessionEntry {
    id: u64,
    uid: u32,
    pid: i32,
    command: String,
    client: String,
    started_unix: u64,
    started: Instant,
    /// Its rings' counters, by ring id.
    rings: Mutex<Vec<(u32, Arc<SessionCounters>)>>,
    /// What its closed rings did (their final counters), so its totals never go down.
    closed: Mutex<Totals>,
    /// What it may use, and where its rings are: what a reload of the grants changes.
    access: Mutex<Access>,
    buffers: AtomicU64,
    buffer_bytes: AtomicU64,
}

impl SessionEntry {
    /// Its session id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Its uid.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// Its grants and rings (held while a ring is created or the grants change).
    pub fn access(&self) -> std::sync::MutexGuard<'_, Access> {
        self.access.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A ring was created.
    pub fn add_ring(&self, ring_id: u32, counters: Arc<SessionCounters>) {
        self.rings.lock().unwrap_or_else(|p| p.into_inner()).push((ring_id, counters));
    }

    /// A ring was closed (and has drained: its counters are final); what it did stays in the
    /// session's totals.
    pub fn remove_ring(&self, ring_id: u32) {
        let mut rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        let Some(i) = rings.iter().position(|(id, _)| *id == ring_id) else { return };
        let (_, c) = rings.swap_remove(i);
        drop(rings);
        add(&mut self.closed.lock().unwrap_or_else(|p| p.into_inner()), &ring_totals(&c));
    }

    /// The session's registered buffers changed.
    pub fn set_buffers(&self, count: u64, bytes: u64) {
        self.buffers.store(count, Ordering::Relaxed);
        self.buffer_bytes.store(bytes, Ordering::Relaxed);
    }

    /// Its counters, summed over its rings (those it closed included).
    pub fn totals(&self) -> Totals {
        let mut t = *self.closed.lock().unwrap_or_else(|p| p.into_inner());
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner());
        for (_, c) in rings.iter() {
            add(&mut t, &ring_totals(c));
        }
        t
    }

    /// The name the client gave at Hello.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// Its open rings.
    pub fn ring_count(&self) -> usize {
        self.rings.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Bytes it registered.
    pub fn buffer_bytes(&self) -> u64 {
        self.buffer_bytes.load(Ordering::Relaxed)
    }

    /// The operator's view of it.
    pub fn report(&self) -> SessionReport {
        // Not inside the literal: the guard would live to its end, and `totals` locks again.
        let rings = self.rings.lock().unwrap_or_else(|p| p.into_inner()).len() as u32;
        SessionReport {
            id: self.id,
            uid: self.uid,
            pid: self.pid,
            command: self.command.clone(),
            client: self.client.clone(),
            started_unix: self.started_unix,
            age_secs: self.started.elapsed().as_secs(),
            rings,
            buffers: self.buffers.load(Ordering::Relaxed),
            registered_bytes: self.buffer_bytes.load(Ordering::Relaxed),
            counters: self.totals(),
        }
    }

    /// Buffers it registered.
    pub fn buffers(&self) -> u64 {
        self.buffers.load(Ordering::Relaxed)
    }
}

/// One ring's counters (relaxed loads of what its I/O thread writes).
fn ring_totals(c: &SessionCounters) -> Totals {
    let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
    Totals {
        submitted: l(&c.submitted),
        completed: l(&c.completed),
        errors: l(&c.errors),
        bytes_read: l(&c.bytes_read),
        bytes_written: l(&c.bytes_written),
        in_flight: l(&c.in_flight),
        latency_log2_us: std::array::from_fn(|i| l(&c.latency_log2_us[i])),
        latency_sum_us: l(&c.latency_sum_us),
        throttled_ns: l(&c.throttled_ns),
    }
}

/// Adds `b` to `a`.
pub(super) fn add(a: &mut Totals, b: &Totals) {
    a.submitted += b.submitted;
    a.completed += b.completed;
    a.errors += b.errors;
    for (x, y) in a.latency_log2_us.iter_mut().zip(&b.latency_log2_us) {
        *x += y;
    }
    a.latency_sum_us += b.latency_sum_us;
    a.bytes_read += b.bytes_read;
    a.bytes_written += b.bytes_written;
    a.in_flight += b.in_flight;
    a.throttled_ns += b.throttled_ns;
}

/// The live sessions, by id.
#[derive(Debug, Default)]
pub struct Registry {
    sessions: Mutex<BTreeMap<u64, Arc<SessionEntry>>>,
    /// What the sessions that ended did, per uid (their final totals), so that per-uid and
    /// broker-wide figures only ever grow.
    ended: Mutex<BTreeMap<u32, Ended>>,
}

/// Most uids whose ended sessions are summed one by one ([`Registry::ended`]).
pub const MAX_ENDED_UIDS: usize = 4096;

/// The uid under which the ended sessions of uids past [`MAX_ENDED_UIDS`] are summed.
pub const OTHER_UIDS: u32 = u32::MAX;

/// What the ended sessions of one uid did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Ended {
    /// Their counters (`in_flight` is 0: they drained).
    pub totals: Totals,
    /// How many.
    pub sessions: u64,
}

/// Removes its session from the registry when dropped.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Registry>,
    entry: Arc<SessionEntry>,
}

impl std::ops::Deref for Registered {
    type Target = SessionEntry;
    fn deref(&self) -> &SessionEntry {
        &self.entry
    }
}

impl Registered {
    /// The entry itself (to lock its access while the connection changes).
    pub fn entry(&self) -> Arc<SessionEntry> {
        self.entry.clone()
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.registry.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.entry.id);
        // Dropped once the session was released (its rings drained): its counters are final.
        let mut t = self.entry.totals();
        t.in_flight = 0;
        let mut ended = self.registry.ended.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: uids beyond the first MAX_ENDED_UIDS are summed as one (a user with a
        // subordinate uid range could otherwise grow this, and the metrics, without end).
        let uid = if ended.len() < MAX_ENDED_UIDS || ended.contains_key(&self.entry.uid) {
            self.entry.uid
        } else {
            OTHER_UIDS
        };
        let e = ended.entry(uid).or_default();
        add(&mut e.totals, &t);
        e.sessions += 1;
    }
}

impl Registry {
    /// Adds session `id` (at Hello); it stays listed until the handle is dropped.
    pub fn add(
        self: &Arc<Self>,
        id: u64,
        uid: u32,
        pid: i32,
        client: &str,
        namespaces: Vec<crate::policy::NamespaceAccess>,
    ) -> Registered {
        let started_unix =
            SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let entry = Arc::new(SessionEntry {
            id,
            uid,
            pid,
            command: printable(&command_name(pid), 64),
            client: printable(client, 64),
            started_unix,
            started: Instant::now(),
            rings: Mutex::new(Vec::new()),
            closed: Mutex::new(Totals::default()),
            access: Mutex::new(Access {
                namespaces,
                rings: Vec::new(),
                withdrawn: false,
                still_reached: Vec::new(),
            }),
            buffers: AtomicU64::new(0),
            buffer_bytes: AtomicU64::new(0),
        });
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(id, entry.clone());
        Registered { registry: self.clone(), entry }
    }

    /// The live sessions, in id order.
    pub fn list(&self) -> Vec<Arc<SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// At most `max` live sessions with ids above `after`, in order of id, and whether more
    /// follow.
    pub fn page(&self, after: Option<u64>, max: usize) -> (Vec<Arc<SessionEntry>>, bool) {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let from = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        let mut it = sessions.range((from, std::ops::Bound::Unbounded)).map(|(_, e)| e.clone());
        let page: Vec<_> = it.by_ref().take(max).collect();
        (page, it.next().is_some())
    }

    /// What the ended sessions did, per uid (past [`MAX_ENDED_UIDS`] uids, the others summed
    /// under [`OTHER_UIDS`]).
    pub fn ended(&self) -> BTreeMap<u32, Ended> {
        self.ended.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Session `id`, if it is live.
    pub fn get(&self, id: u64) -> Option<Arc<SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// Whether session `id` is live.
    pub fn contains(&self, id: u64) -> bool {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&id)
    }
}

/// At most `max` characters of a name a client chose (its Hello's client name, its process
/// name), without control characters or bidirectional overrides: it is shown to operators
/// (`nvmectl sessions`, `top`), whose terminal must not run what a tenant wrote.
pub fn printable(name: &str, max: usize) -> String {
    name.chars()
        .map(|c| {
            let bidi = ('\u{202A}'..='\u{202E}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c);
            if c.is_control() || bidi {
                '?'
            } else {
                c
            }
        })
        .take(max)
        .collect()
}

/// A process's command name (`/proc/PID/comm`), best effort: empty if it cannot be read.
fn command_name(pid: i32) -> String {
    if pid <= 0 {
        return String::new();
    }
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim_end().to_string()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_shown_to_operators_carry_no_control_characters() {
        assert_eq!(printable("fio job 1", 64), "fio job 1");
        assert_eq!(printable("x\x1b[1A\x1b[2K\n  7  0  fake", 64), "x?[1A?[2K?  7  0  fake");
        assert_eq!(printable("\u{202E}txt.exe", 64), "?txt.exe");
        assert_eq!(printable(&"é".repeat(100), 64).chars().count(), 64);
    }

    #[test]
    fn sessions_are_listed_until_released_with_their_rings_summed() {
        let reg = Arc::new(Registry::default());
        let a = reg.add(3, 1000, std::process::id() as i32, "test", vec![]);
        let b = reg.add(1, 0, 0, "other", vec![]);
        assert_eq!(reg.list().iter().map(|e| e.id).collect::<Vec<_>>(), vec![1, 3]);
        assert!(!a.command.is_empty(), "this process's command name");
        let (r0, r1) = (Arc::new(SessionCounters::default()), Arc::new(SessionCounters::default()));
        r0.completed.store(5, Ordering::Relaxed);
        r1.completed.store(7, Ordering::Relaxed);
        r1.bytes_written.store(4096, Ordering::Relaxed);
        a.add_ring(0, r0);
        a.add_ring(1, r1);
        a.set_buffers(2, 8192);
        let rep = a.report();
        assert_eq!((rep.rings, rep.buffers, rep.registered_bytes), (2, 2, 8192));
        assert_eq!((rep.counters.completed, rep.counters.bytes_written), (12, 4096));
        a.remove_ring(0);
        assert_eq!(a.report().rings, 1);
        assert_eq!(a.report().counters.completed, 12, "a closed ring's work stays counted");
        drop(a);
        assert!(!reg.contains(3));
        let ended = reg.ended();
        assert_eq!((ended[&1000].sessions, ended[&1000].totals.completed), (1, 12));
        assert!(reg.contains(1));
        drop(b);
        assert!(reg.list().is_empty());
    }

    #[test]
    fn ended_sessions_of_too_many_uids_are_summed_as_one() {
        let reg = Arc::new(Registry::default());
        let n = MAX_ENDED_UIDS as u32 + 10;
        for uid in 0..n {
            drop(reg.add(u64::from(uid), uid, 1, "c", vec![]));
        }
        // A known uid still adds up under its own.
        drop(reg.add(u64::from(n), 5, 1, "c", vec![]));
        let ended = reg.ended();
        assert_eq!(ended.len(), MAX_ENDED_UIDS + 1);
        assert_eq!(ended[&OTHER_UIDS].sessions, 10);
        assert_eq!(ended[&5].sessions, 2);
        assert_eq!(ended.values().map(|e| e.sessions).sum::<u64>(), u64::from(n) + 1);
    }
}
