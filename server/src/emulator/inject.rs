//! Error injection for tests: make the Nth I/O command fail, complete late, never complete, or
//! make the emulated controller panic.

use std::str::FromStr;
use std::time::Duration;

/// What happens to the chosen command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// Complete with this NVMe status instead of executing.
    Fail {
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
    },
    /// Execute, but post the completion this much later.
    Delay(Duration),
    /// Never complete (until the controller is reset).
    Hang,
    /// Panic in the thread running the emulated controller when it fetches the command: the
    /// doorbell writer's thread in synchronous mode (the broker's I/O thread), the controller's
    /// worker thread in asynchronous mode. For testing what a panicking thread does to the
    /// process.
    Panic,
}

/// Applies `action` to the `nth` I/O command the controller receives (counting from 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// Which I/O command (1-based, over all I/O queues).
    pub nth: u64,
    /// What to do to it.
    pub action: FaultAction,
}

/// A fault rule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("bad fault rule {0:?}: expected fail:N:SCT:SC, delay:N:MILLIS, hang:N or panic:N")]
pub struct BadFaultRule(String);

fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl FromStr for FaultRule {
    type Err = BadFaultRule;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadFaultRule(s.to_string());
        let parts: Vec<&str> = s.split(':').collect();
        let nth = parts.get(1).and_then(|p| num(p)).filter(|&n| n > 0).ok_or_else(bad)?;
        let action = match (parts[0], parts.len()) {
            ("fail", 4) => FaultAction::Fail {
                sct: num(parts[2]).filter(|&v| v < 8).ok_or_else(bad)? as u8,
                sc: num(parts[3]).filter(|&v| v < 256).ok_or_else(bad)? as u8,
            },
            ("delay", 3) => FaultAction::Delay(Duration::from_millis(num(parts[2]).ok_or_else(bad)?)),
            ("hang", 2) => FaultAction::Hang,
            ("panic", 2) => FaultAction::Panic,
            _ => return Err(bad()),
        };
        Ok(FaultRule { nth, action })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        assert_eq!(
            "fail:3:2:0x81".parse::<FaultRule>().unwrap(),
            FaultRule { nth: 3, action: FaultAction::Fail { sct: 2, sc: 0x81 } }
        );
        assert_eq!(
            "delay:1:20".parse::<FaultRule>().unwrap().action,
            FaultAction::Delay(Duration::from_millis(20))
        );
        assert_eq!("hang:9".parse::<FaultRule>().unwrap().action, FaultAction::Hang);
        assert_eq!("panic:4".parse::<FaultRule>().unwrap(), FaultRule { nth: 4, action: FaultAction::Panic });
        for bad in ["fail:0:1:1", "fail:1:9:1", "boom:1", "delay:1", "hang", "panic", "panic:0", "panic:1:2"]
        {
            assert!(bad.parse::<FaultRule>().is_err(), "{bad}");
        }
    }
}
