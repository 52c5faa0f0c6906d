//! Tenants: whose I/O each I/O thread's scheduler shares a controller between, and with what
//! limits.
//!
//! A tenant is a uid (all its sessions together) or one session (grants with `per=session`) on
//! one controller. Its share and limits come from its grants on that controller's namespaces;
//! several grants on one controller add up (rates and queue depth are summed, the largest
//! weight wins, a grant without a limit lifts it). Each I/O thread schedules its own rings only,
//! so a tenant whose rings are served by `k` threads gets a `k`-th of each rate and queue
//! depth on each of them (the control side rescales them as its rings come and go); the whole
//! stays within the limit without any state shared between threads on the I/O path.

use std::collections::HashMap;

use super::sched::TenantLimits;
use crate::policy::{NamespaceAccess, Qos, QosScope};

/// A tenant on one controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TenantKey {
    /// The uid, or (with the top bit set) the session id.
    pub owner: u64,
    /// The controller.
    pub controller: u16,
}

const SESSION_BIT: u64 = 1 << 63;

impl TenantKey {
    /// The uid, for a tenant that is a uid.
    pub fn uid(&self) -> Option<u32> {
        (self.owner & SESSION_BIT == 0).then_some(self.owner as u32)
    }

    /// The session id, for a tenant that is one session (`per=session`).
    pub fn session(&self) -> Option<u64> {
        (self.owner & SESSION_BIT != 0).then_some(self.owner & !SESSION_BIT)
    }
}

/// The tenants of a session with these namespaces: one per controller it may use, with the
/// share and limits of its grants there.
pub fn tenants_of(namespaces: &[NamespaceAccess], uid: u32, session: u64) -> Vec<(TenantKey, Qos)> {
    let mut by_controller: Vec<(u16, Qos)> = Vec::new();
    for ns in namespaces {
        match by_controller.iter_mut().find(|(c, _)| *c == ns.controller) {
            Some((_, q)) => *q = combine(q, &ns.qos),
            None => by_controller.push((ns.controller, ns.qos)),
        }
    }
    by_controller
        .into_iter()
        .map(|(controller, qos)| {
            let owner = match qos.scope {
                QosScope::Uid => u64::from(uid),
                QosScope::Session => SESSION_BIT | session,
            };
            (TenantKey { owner, controller }, qos)
        })
        .collect()
}

/// Two grants on one controller, as one tenant.
fn combine(a: &Qos, b: &Qos) -> Qos {
    let sum = |x: Option<u64>, y: Option<u64>| Some(x?.saturating_add(y?));
    Qos {
        weight: a.weight.max(b.weight),
        iops: sum(a.iops, b.iops),
        read_bytes_per_s: sum(a.read_bytes_per_s, b.read_bytes_per_s),
        write_bytes_per_s: sum(a.write_bytes_per_s, b.write_bytes_per_s),
        max_in_flight: sum(a.max_in_flight.map(u64::from), b.max_in_flight.map(u64::from))
            .map(|n| n.min(u64::from(u32::MAX)) as u32),
        scope: if a.scope == QosScope::Session || b.scope == QosScope::Session {
            QosScope::Session
        } else {
            QosScope::Uid
        },
    }
}

/// What the I/O thread of rank `rank` (0-based) among the `threads` serving the tenant
/// enforces: each limit split so that the parts add up to it exactly (the first `limit %
/// threads` threads take one more), and never below 1 (a qd of 2 on 3 threads: 1 each, so 3 in
/// all: a ring on a thread must be able to move at all; the README says so).
pub fn limits_for_thread(qos: &Qos, threads: u32, rank: u32) -> TenantLimits {
    let k = u64::from(threads.max(1));
    let r = u64::from(rank);
    let part = |n: u64| (n / k + u64::from(r < n % k)).max(1);
    TenantLimits {
        weight: qos.weight,
        iops: qos.iops.map(part),
        read_bytes_per_s: qos.read_bytes_per_s.map(part),
        write_bytes_per_s: qos.write_bytes_per_s.map(part),
        max_in_flight: qos.max_in_flight.map(|n| part(u64::from(n)) as u32),
    }
}

/// Limits for every thread serving a tenant (`counts`: its rings per thread), by rank.
fn split(key: TenantKey, qos: &Qos, counts: &[u32]) -> Vec<Rescale> {
    let serving: Vec<usize> = (0..counts.len()).filter(|&t| counts[t] > 0).collect();
    let k = serving.len() as u32;
    serving.iter().enumerate().map(|(rank, &t)| (t, key, limits_for_thread(qos, k, rank as u32))).collect()
}

/// The control side's count of each tenant's rings on each I/O thread.
#[derive(Debug, Default)]
pub struct Placement {
    rings: HashMap<TenantKey, (Qos, Vec<u32>)>,
}

/// Limits to send to an I/O thread that already serves the tenant.
pub type Rescale = (usize, TenantKey, TenantLimits);

impl Placement {
    /// A ring of the tenant goes to `thread` (of `threads`). Returns the limits that thread
    /// enforces for it, and those the other threads serving it must now enforce.
    pub fn add(
        &mut self,
        key: TenantKey,
        qos: Qos,
        thread: usize,
        threads: usize,
    ) -> (TenantLimits, Vec<Rescale>) {
        let (qos, counts) = self.rings.entry(key).or_insert_with(|| (qos, vec![0; threads]));
        let before = counts.iter().filter(|&&n| n > 0).count();
        counts[thread] += 1;
        let after = counts.iter().filter(|&&n| n > 0).count();
        let all = split(key, qos, counts);
        let limits = all.iter().find(|(t, _, _)| *t == thread).expect("the thread serves it now").2;
        let rescale = if after != before {
            all.into_iter().filter(|&(t, _, _)| t != thread).collect()
        } else {
            Vec::new()
        };
        (limits, rescale)
    }

    /// The tenant's grants changed: the limits every thread serving it must now enforce.
    pub fn update(&mut self, key: TenantKey, qos: Qos) -> Vec<Rescale> {
        let Some((stored, counts)) = self.rings.get_mut(&key) else { return Vec::new() };
        if *stored == qos {
            return Vec::new();
        }
        *stored = qos;
        split(key, stored, counts)
    }

    /// A ring of the tenant on `thread` closed. Returns the limits the other threads serving
    /// it must now enforce.
    pub fn remove(&mut self, key: TenantKey, thread: usize) -> Vec<Rescale> {
        let Some((qos, counts)) = self.rings.get_mut(&key) else { return Vec::new() };
        counts[thread] = counts[thread].saturating_sub(1);
        let left = counts.iter().filter(|&&n| n > 0).count();
        if left == 0 {
            self.rings.remove(&key);
            return Vec::new();
        }
        if counts[thread] > 0 {
            return Vec::new();
        }
        split(key, qos, counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(nsid: u32, controller: u16, qos: Qos) -> NamespaceAccess {
        NamespaceAccess {
            nsid,
            controller,
            device_nsid: nsid,
            first_lba: 0,
            lba_count: 100,
            lba_size: 512,
            read_only: false,
            qos,
        }
    }

    #[test]
    fn grants_on_one_controller_add_up_and_scopes_key_the_tenant() {
        let a = Qos { iops: Some(1000), weight: 2, ..Qos::DEFAULT };
        let b = Qos { iops: Some(500), weight: 5, max_in_flight: Some(8), ..Qos::DEFAULT };
        let t = tenants_of(&[ns(1, 0, a), ns(2, 0, b), ns(3, 1, Qos::DEFAULT)], 1000, 7);
        assert_eq!(t.len(), 2);
        assert_eq!(t[0].0, TenantKey { owner: 1000, controller: 0 });
        assert_eq!((t[0].1.iops, t[0].1.weight, t[0].1.max_in_flight), (Some(1500), 5, None));
        let s = Qos { scope: QosScope::Session, ..Qos::DEFAULT };
        let t = tenants_of(&[ns(1, 0, s)], 1000, 7);
        assert_eq!(t[0].0.owner, SESSION_BIT | 7);
        assert_eq!((t[0].0.session(), t[0].0.uid()), (Some(7), None));
        assert_eq!(TenantKey { owner: 1000, controller: 0 }.uid(), Some(1000));
    }

    #[test]
    fn a_tenant_on_two_threads_gets_half_on_each_and_all_back_when_one_goes() {
        let key = TenantKey { owner: 1, controller: 0 };
        let qos = Qos { iops: Some(20_000), max_in_flight: Some(5), ..Qos::DEFAULT };
        let mut p = Placement::default();
        let (l, r) = p.add(key, qos, 0, 2);
        assert_eq!((l.iops, l.max_in_flight, r.len()), (Some(20_000), Some(5), 0));
        let (l, r) = p.add(key, qos, 0, 2);
        assert_eq!((l.iops, r.len()), (Some(20_000), 0), "a second ring on the same thread changes nothing");
        let (l, r) = p.add(key, qos, 1, 2);
        // Parts that add up to the limit exactly: qd 5 is 3 + 2.
        assert_eq!((l.iops, l.max_in_flight), (Some(10_000), Some(2)));
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].2.iops, r[0].2.max_in_flight), (0, Some(10_000), Some(3)));
        assert!(p.remove(key, 0).is_empty(), "thread 0 still has a ring");
        let r = p.remove(key, 0);
        assert_eq!(r.len(), 1);
        assert_eq!((r[0].0, r[0].2.iops), (1, Some(20_000)));
        assert!(p.remove(key, 1).is_empty());
        assert!(p.rings.is_empty());
    }

    #[test]
    fn the_parts_of_a_limit_add_up_to_it() {
        let qos = Qos { iops: Some(1000), read_bytes_per_s: Some(7), max_in_flight: Some(5), ..Qos::DEFAULT };
        for k in 1..=8u32 {
            let parts: Vec<TenantLimits> = (0..k).map(|r| limits_for_thread(&qos, k, r)).collect();
            assert_eq!(parts.iter().map(|l| l.iops.unwrap()).sum::<u64>(), 1000, "{k} threads");
            let reads: u64 = parts.iter().map(|l| l.read_bytes_per_s.unwrap()).sum();
            assert_eq!(reads, 7.max(u64::from(k)), "{k} threads: exact, or 1 each when fewer than threads");
            let qd: u32 = parts.iter().map(|l| l.max_in_flight.unwrap()).sum();
            assert_eq!(qd, 5.max(k), "{k} threads");
        }
    }
}
