//! Rate limits for log lines that peers can cause (a client looping on a refused connect, a
//! guest publishing malformed requests, a host sending bad digests): they must not fill the
//! disk or crowd other tenants' and operators' messages out of the journal. Each call site gets
//! a budget of lines per second; lines over it are counted, and the next line logged says how
//! many were dropped. [`log_limited!`](crate::log_limited) is `tracing`'s macro with such a
//! budget (the broker, nvmed-vhost and nvmed-tcp use it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines per second one call site may log.
pub const LINES_PER_SECOND: u64 = 20;

/// One call site's budget (a `static`).
#[derive(Debug, Default)]
pub struct LogBudget {
    /// The second (since the first use in the process) and the lines logged in it, packed as
    /// `second << 20 | lines`.
    window: AtomicU64,
    /// Lines dropped since the last one logged.
    dropped: AtomicU64,
}

fn second() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

impl LogBudget {
    /// A budget, for a `static`.
    pub const fn new() -> Self {
        Self { window: AtomicU64::new(0), dropped: AtomicU64::new(0) }
    }

    /// Whether a line may be logged now: `Some(dropped)` with the lines dropped since the last
    /// one logged (to say so in it), or `None` (count it as dropped).
    pub fn allow(&self) -> Option<u64> {
        let now = second();
        let allowed = self
            .window
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |w| {
                let (sec, n) = (w >> 20, w & 0xf_ffff);
                if sec != now {
                    Some(now << 20 | 1)
                } else if n < LINES_PER_SECOND {
                    Some(w + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if allowed {
            Some(self.dropped.swap(0, Ordering::Relaxed))
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Budgets of one call site per key (a uid): one uid's flood does not silence the others'
/// lines. At most [`MAX_KEYS`] keys get their own; the rest share one.
#[derive(Debug, Default)]
pub struct KeyedLogBudget {
    keys: std::sync::Mutex<std::collections::BTreeMap<u32, std::sync::Arc<LogBudget>>>,
    rest: LogBudget,
}

/// Keys with a budget of their own per call site.
pub const MAX_KEYS: usize = 1024;

impl KeyedLogBudget {
    /// A budget per key, for a `static`.
    pub const fn new() -> Self {
        Self { keys: std::sync::Mutex::new(std::collections::BTreeMap::new()), rest: LogBudget::new() }
    }

    /// As [`LogBudget::allow`], for `key`'s budget.
    pub fn allow(&self, key: u32) -> Option<u64> {
        let budget = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(b) = keys.get(&key) {
                Some(b.clone())
            } else if keys.len() < MAX_KEYS {
                let b = std::sync::Arc::new(LogBudget::new());
                keys.insert(key, b.clone());
                Some(b)
            } else {
                None
            }
        };
        match budget {
            Some(b) => b.allow(),
            None => self.rest.allow(),
        }
    }
}

/// `tracing`'s macro `$level!` with the call site's [`LogBudget`], adding `dropped = N` (lines
/// over the budget since the last one logged). The calling crate needs `tracing`.
#[macro_export]
macro_rules! log_limited {
    ($level:ident, $($arg:tt)+) => {{
        static BUDGET: $crate::ratelog::LogBudget = $crate::ratelog::LogBudget::new();
        if let Some(dropped) = BUDGET.allow() {
            ::tracing::$level!(dropped, $($arg)+);
        }
    }};
}

/// As [`log_limited!`](crate::log_limited), with a budget per `key` (a `u32`: a uid, a peer's
/// address) at the call site: one peer's flood does not silence the lines of the others.
#[macro_export]
macro_rules! log_limited_per {
    ($key:expr, $level:ident, $($arg:tt)+) => {{
        static BUDGET: $crate::ratelog::KeyedLogBudget = $crate::ratelog::KeyedLogBudget::new();
        if let Some(dropped) = BUDGET.allow($key) {
            ::tracing::$level!(dropped, $($arg)+);
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_flooding_does_not_use_up_another_key_s_budget() {
        let b = KeyedLogBudget::new();
        let flood = (0..1000).filter_map(|_| b.allow(1000)).count() as u64;
        assert!(flood <= 2 * LINES_PER_SECOND, "{flood}");
        assert!(b.allow(1001).is_some(), "another uid still logs");
    }

    #[test]
    fn a_call_site_logs_its_budget_per_second_and_counts_the_rest() {
        let b = LogBudget::new();
        let allowed = (0..1000).filter_map(|_| b.allow()).count() as u64;
        // All in one second, or (rarely) across a second boundary: at most two budgets.
        assert!((LINES_PER_SECOND..=2 * LINES_PER_SECOND).contains(&allowed), "{allowed}");
        assert!(b.dropped.load(Ordering::Relaxed) > 0);
        // The next second: the line logged says how many were dropped.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let dropped = b.allow().expect("a new second");
        assert!(dropped >= 1000 - 2 * LINES_PER_SECOND, "{dropped}");
        assert_eq!(b.dropped.load(Ordering::Relaxed), 0);
    }
}
