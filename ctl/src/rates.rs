//! Rates from two samples of the session list.

use std::time::Duration;

use nvmed_proto::admin::{latency_percentile, SessionReport};
use serde::Serialize;

/// A session with its rates over the last interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionRate {
    /// The session as the broker reported it (at the end of the interval).
    #[serde(flatten)]
    pub session: SessionReport,
    /// Completions per second.
    pub iops: f64,
    /// Megabytes (10^6 bytes) read per second.
    pub read_mb_s: f64,
    /// Megabytes written per second.
    pub write_mb_s: f64,
    /// Median latency of the requests completed in the interval, microseconds (upper bound
    /// of its power-of-two bucket); `None` if none completed.
    pub p50_us: Option<u64>,
    /// 99th percentile, likewise.
    pub p99_us: Option<u64>,
    /// Share of the interval its requests waited for rate limits (throttled time over elapsed
    /// time; a session with several rings can exceed 1).
    pub throttled_share: f64,
}

/// The sessions of `after` with their rates since `before`, `elapsed` apart. A session absent
/// from `before` started within the interval: all its I/O counts. A session of `before` is the
/// same one only if its id, pid and start time match (ids start again at 1 when the broker
/// restarts). With no elapsed time the rates are 0.
pub fn session_rates(
    before: &[SessionReport],
    after: &[SessionReport],
    elapsed: Duration,
) -> Vec<SessionRate> {
    let secs = elapsed.as_secs_f64();
    let per_sec = |d: u64| if secs > 0.0 { d as f64 / secs } else { 0.0 };
    after
        .iter()
        .map(|s| {
            let prev = before
                .iter()
                .find(|b| b.id == s.id && b.pid == s.pid && b.started_unix == s.started_unix)
                .map(|b| b.counters)
                .unwrap_or_default();
            let c = s.counters;
            let window: Vec<u64> = c
                .latency_log2_us
                .iter()
                .zip(&prev.latency_log2_us)
                .map(|(a, b)| a.saturating_sub(*b))
                .collect();
            SessionRate {
                session: s.clone(),
                p50_us: latency_percentile(&window, 0.5),
                p99_us: latency_percentile(&window, 0.99),
                iops: per_sec(c.completed.saturating_sub(prev.completed)),
                read_mb_s: per_sec(c.bytes_read.saturating_sub(prev.bytes_read)) / 1e6,
                write_mb_s: per_sec(c.bytes_written.saturating_sub(prev.bytes_written)) / 1e6,
                throttled_share: per_sec(c.throttled_ns.saturating_sub(prev.throttled_ns)) / 1e9,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmed_proto::admin::Totals;

    fn session(id: u64, completed: u64, bytes_read: u64) -> SessionReport {
        throttled(id, completed, bytes_read, 0)
    }

    fn throttled(id: u64, completed: u64, bytes_read: u64, throttled_ns: u64) -> SessionReport {
        SessionReport {
            id,
            uid: 0,
            pid: 1,
            command: "x".into(),
            client: "y".into(),
            started_unix: 0,
            age_secs: 0,
            rings: 1,
            buffers: 0,
            registered_bytes: 0,
            counters: Totals { completed, bytes_read, throttled_ns, ..Totals::default() },
        }
    }

    #[test]
    fn rates_from_two_samples() {
        let before = [session(1, 100, 1_000_000), session(2, 5, 0)];
        let after = [session(1, 300, 5_000_000), session(3, 50, 0)];
        let r = session_rates(&before, &after, Duration::from_secs(2));
        assert_eq!(r.len(), 2);
        assert_eq!((r[0].iops, r[0].read_mb_s), (100.0, 2.0));
        assert_eq!(r[1].iops, 25.0, "a new session's I/O all happened in the interval");
        assert_eq!(session_rates(&before, &after, Duration::ZERO)[0].iops, 0.0);
    }

    #[test]
    fn a_session_of_a_restarted_broker_with_a_known_id_is_a_new_one() {
        let before = [session(1, 1000, 0)];
        let mut after = [session(1, 30, 0)];
        after[0].pid = 2;
        let r = session_rates(&before, &after, Duration::from_secs(1));
        assert_eq!(r[0].iops, 30.0, "not 0 (1000 completions 'before' are another session's)");
    }

    #[test]
    fn throttled_share_of_the_interval() {
        let before = [throttled(1, 0, 0, 250_000_000)];
        let after = [throttled(1, 0, 0, 1_250_000_000)];
        let r = session_rates(&before, &after, Duration::from_secs(2));
        assert_eq!(r[0].throttled_share, 0.5, "1 s held in 2 s");
    }
}
