//! Pacing of control requests per uid: every request a client sends on its control socket
//! (registering and unregistering memory, creating and closing rings, stats, health...) costs
//! the broker CPU, and some of it (pinning and unpinning memory, mapping rings) more; a uid
//! looping on them would take a broker core per connection it may hold. Each uid gets a
//! token bucket (generic cell rate: a theoretical arrival time, no timer): requests within
//! its burst go at once, beyond it each waits its turn at the uid's rate. A waiting request
//! holds only its own connection's thread; other uids are not slowed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Units a registration of `len` bytes costs besides its request: one per 64 MiB (pinning and
/// unpinning cost by the page).
pub fn register_cost(len: u64) -> u64 {
    1 + (len >> 26)
}

/// Most uids tracked at once; beyond that, idle ones are forgotten first (a forgotten uid
/// starts again with a full burst, which is what an idle one has anyway).
const MAX_UIDS: usize = 4096;

/// The pacing of all uids.
#[derive(Debug)]
pub struct Pacer {
    /// Units per second each uid may use (0: no pacing).
    rate: u64,
    /// Units a uid may use at once (at least one request's worth).
    burst: u64,
    /// Each uid's theoretical arrival time: when its bucket is full again.
    tat: Mutex<HashMap<u32, Instant>>,
}

impl Pacer {
    /// `rate` units per second and uid (0: none), a burst of one second's worth.
    pub fn new(rate: u64) -> Self {
        Self { rate, burst: rate.max(1), tat: Mutex::new(HashMap::new()) }
    }

    /// Takes `cost` units for `uid` at `now`: how long the request must wait first (zero
    /// within the burst), or, if that would be longer than `max_wait`, `Err` with it and
    /// nothing taken (the request is refused: a uid far beyond its rate gets an answer, not
    /// a thread parked for minutes).
    pub fn take(&self, uid: u32, cost: u64, now: Instant, max_wait: Duration) -> Result<Duration, Duration> {
        if self.rate == 0 {
            return Ok(Duration::ZERO);
        }
        let per_unit = Duration::from_nanos(1_000_000_000 / self.rate);
        let cost = u32::try_from(cost).unwrap_or(u32::MAX);
        let tau = per_unit * u32::try_from(self.burst).unwrap_or(u32::MAX);
        let mut map = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_UIDS && !map.contains_key(&uid) {
            map.retain(|_, tat| *tat > now);
        }
        let tat = map.get(&uid).copied().filter(|t| *t > now).unwrap_or(now);
        let new_tat = tat + per_unit.saturating_mul(cost);
        // Past the burst: wait until the bucket has room for this request.
        let wait = new_tat.saturating_duration_since(now).saturating_sub(tau);
        if wait > max_wait {
            return Err(wait);
        }
        if map.len() < MAX_UIDS || map.contains_key(&uid) {
            map.insert(uid, new_tat);
        }
        Ok(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_gets_its_burst_at_once_then_its_rate_and_others_are_not_slowed() {
        let p = Pacer::new(100); // 10 ms per unit, a burst of 100
        let t0 = Instant::now();
        let far = Duration::from_secs(60);
        let waits: Vec<Duration> = (0..150).map(|_| p.take(1000, 1, t0, far).unwrap()).collect();
        assert!(waits[..100].iter().all(|w| w.is_zero()), "the burst goes at once");
        // Beyond it, each waits its turn: the 101st one unit's worth, the 150th fifty.
        assert_eq!(waits[100], Duration::from_millis(10));
        assert_eq!(waits[149], Duration::from_millis(500));
        assert_eq!(p.take(1001, 1, t0, far), Ok(Duration::ZERO), "another uid has its own bucket");
        // A wait beyond the most allowed is refused, and takes nothing.
        assert_eq!(p.take(1000, 1, t0, Duration::from_millis(500)), Err(Duration::from_millis(510)));
        assert_eq!(p.take(1000, 1, t0, far), Ok(Duration::from_millis(510)));
        // A second later 100 units have come back: the 50 taken beyond the burst leave room.
        assert_eq!(p.take(1000, 1, t0 + Duration::from_secs(1), far), Ok(Duration::ZERO));
        assert_eq!(p.take(1000, 60, t0 + Duration::from_secs(1), far), Ok(Duration::from_millis(120)));
        // Idle long enough: a full burst again.
        assert_eq!(p.take(1000, 100, t0 + Duration::from_secs(10), far), Ok(Duration::ZERO));
        // A registration of 1 GiB costs 17 units.
        assert_eq!(register_cost(1 << 30), 17);
        assert_eq!(
            Pacer::new(0).take(1000, 1_000_000, t0, Duration::ZERO),
            Ok(Duration::ZERO),
            "0: no pacing"
        );
    }
}
