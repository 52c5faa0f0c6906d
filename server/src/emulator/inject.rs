//! Error injection for tests: make the Nth I/O command fail (for good or retryably), complete
//! late, never complete (abortable or not), make the controller fatal or disappear, make reads of
//! chosen LBAs fail with a media error, or make the emulated controller panic.

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
    /// Never complete (until the controller is reset), but an NVMe Abort of it succeeds: it
    /// then completes with "Command Abort Requested".
    Hang,
    /// Never complete, and refuse to abort it ("not aborted"): only a reset ends it.
    Stuck,
    /// Fail with a retryable status (Namespace Not Ready, DNR clear): a retry succeeds.
    Retry,
    /// The controller becomes fatal (CSTS.CFS) on fetching it, and never completes it.
    Fatal,
    /// The device disappears (surprise removal): every register reads as all ones, nothing
    /// completes any more, and its DMA stops.
    Gone,
    /// Panic in the thread running the emulated controller when it fetches the command: the
    /// doorbell writer's thread in synchronous mode (the broker's I/O thread), the controller's
    /// worker thread in asynchronous mode. For testing what a panicking thread does to the
    /// process.
    Panic,
    /// `loghang:N`: the Nth Get Log Page admin command (counting from 1) never completes, until
    /// the controller is reset (an admin queue that stops answering).
    LogPageHang,
    /// `sqfail:N`: the Nth Create I/O Submission Queue admin command (counting from 1) fails
    /// with Internal Error (an I/O queue that cannot be created again after a reset).
    CreateSqFail,
    /// `idhang:CNS`: every Identify with this CNS value never completes, until the controller is
    /// reset (a controller that hangs on an optional Identify at bring-up, as some do on CNS
    /// 06h or 03h). The rule's `nth` holds the CNS value.
    IdentifyHang,
    /// `readyfail:N`: the Nth time the controller is enabled (CC.EN 0 to 1, counting from 1:
    /// the first is the bring-up) it never sets CSTS.RDY (a controller that does not come back
    /// from a reset this time). Its CAP.TO is then 0.5 s, to fail quickly.
    ReadyFail,
    /// `shrink:N`: from the Nth enable on (the first is the bring-up), Identify Namespace
    /// reports every namespace at half its size (as if another host formatted it while a
    /// reset was under way).
    Shrink,
}

/// Applies `action` to the `nth` I/O command the controller receives (counting from 1; for
/// [`FaultAction::LogPageHang`], the `nth` Get Log Page admin command; for
/// [`FaultAction::CreateSqFail`], the `nth` Create I/O Submission Queue; for
/// [`FaultAction::IdentifyHang`], every Identify whose CNS is `nth`), or
/// (`media:LBA[:NSID]`) makes reads covering an LBA fail with an unrecovered read error (Media
/// and Data Integrity Errors / 0x81, DNR set) until a write or write zeroes covers it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultRule {
    /// Which I/O command (1-based, over all I/O queues); 0 for a media rule.
    pub nth: u64,
    /// What to do to it.
    pub action: FaultAction,
    /// A media rule's bad block: (namespace id, LBA).
    pub bad_block: Option<(u32, u64)>,
    /// The emulated controller (index, as `--controllers` numbers them) the rule applies to
    /// (`RULE@C`); `None`: every controller.
    pub controller: Option<u16>,
}

/// A fault rule that does not parse.
#[derive(Debug, thiserror::Error)]
#[error(
    "bad fault rule {0:?}: expected fail:N:SCT:SC, retry:N, delay:N:MILLIS, hang:N, stuck:N, \
     fatal:N, gone:N, panic:N, loghang:N, sqfail:N, idhang:CNS, readyfail:N, shrink:N or media:LBA[:NSID], each \
     optionally followed by @C (only controller C)"
)]
pub struct BadFaultRule(String);

fn num(s: &str) -> Option<u64> {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

impl FromStr for FaultRule {
    type Err = BadFaultRule;

    fn from_str(whole: &str) -> Result<Self, Self::Err> {
        let bad = || BadFaultRule(whole.to_string());
        let (s, controller) = match whole.split_once('@') {
            Some((rule, c)) => (rule, Some(c.parse::<u16>().map_err(|_| bad())?)),
            None => (whole, None),
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts[0] == "media" {
            let lba = parts.get(1).and_then(|p| num(p)).ok_or_else(bad)?;
            let nsid = match parts.get(2) {
                Some(p) => num(p).filter(|&n| n > 0 && n <= u64::from(u32::MAX)).ok_or_else(bad)? as u32,
                None => 1,
            };
            if parts.len() > 3 {
                return Err(bad());
            }
            let action = FaultAction::Fail { sct: 2, sc: 0x81 };
            return Ok(FaultRule { nth: 0, action, bad_block: Some((nsid, lba)), controller });
        }
        let nth = parts.get(1).and_then(|p| num(p)).filter(|&n| n > 0).ok_or_else(bad)?;
        let action = match (parts[0], parts.len()) {
            ("fail", 4) => FaultAction::Fail {
                sct: num(parts[2]).filter(|&v| v < 8).ok_or_else(bad)? as u8,
                sc: num(parts[3]).filter(|&v| v < 256).ok_or_else(bad)? as u8,
            },
            ("delay", 3) => FaultAction::Delay(Duration::from_millis(num(parts[2]).ok_or_else(bad)?)),
            ("hang", 2) => FaultAction::Hang,
            ("stuck", 2) => FaultAction::Stuck,
            ("retry", 2) => FaultAction::Retry,
            ("fatal", 2) => FaultAction::Fatal,
            ("gone", 2) => FaultAction::Gone,
            ("panic", 2) => FaultAction::Panic,
            ("loghang", 2) => FaultAction::LogPageHang,
            ("sqfail", 2) => FaultAction::CreateSqFail,
            ("idhang", 2) => FaultAction::IdentifyHang,
            ("readyfail", 2) => FaultAction::ReadyFail,
            ("shrink", 2) => FaultAction::Shrink,
            _ => return Err(bad()),
        };
        Ok(FaultRule { nth, action, bad_block: None, controller })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rules() {
        assert_eq!(
            "fail:3:2:0x81".parse::<FaultRule>().unwrap(),
            FaultRule {
                nth: 3,
                action: FaultAction::Fail { sct: 2, sc: 0x81 },
                bad_block: None,
                controller: None
            }
        );
        assert_eq!("stuck:2".parse::<FaultRule>().unwrap().action, FaultAction::Stuck);
        assert_eq!("retry:2".parse::<FaultRule>().unwrap().action, FaultAction::Retry);
        assert_eq!("fatal:2".parse::<FaultRule>().unwrap().action, FaultAction::Fatal);
        assert_eq!("gone:2".parse::<FaultRule>().unwrap().action, FaultAction::Gone);
        assert_eq!("media:0x10".parse::<FaultRule>().unwrap().bad_block, Some((1, 16)));
        assert_eq!("media:7:2".parse::<FaultRule>().unwrap().bad_block, Some((2, 7)));
        assert_eq!(
            "delay:1:20".parse::<FaultRule>().unwrap().action,
            FaultAction::Delay(Duration::from_millis(20))
        );
        assert_eq!("hang:9".parse::<FaultRule>().unwrap().action, FaultAction::Hang);
        assert_eq!("loghang:2".parse::<FaultRule>().unwrap().action, FaultAction::LogPageHang);
        let id = "idhang:6".parse::<FaultRule>().unwrap();
        assert_eq!((id.nth, id.action), (6, FaultAction::IdentifyHang));
        assert_eq!("sqfail:2".parse::<FaultRule>().unwrap().action, FaultAction::CreateSqFail);
        assert_eq!("readyfail:2".parse::<FaultRule>().unwrap().action, FaultAction::ReadyFail);
        let only = "stuck:1@1".parse::<FaultRule>().unwrap();
        assert_eq!((only.nth, only.action, only.controller), (1, FaultAction::Stuck, Some(1)));
        assert_eq!("media:7:2@0".parse::<FaultRule>().unwrap().controller, Some(0));
        assert_eq!(
            "panic:4".parse::<FaultRule>().unwrap(),
            FaultRule { nth: 4, action: FaultAction::Panic, bad_block: None, controller: None }
        );
        for bad in [
            "fail:0:1:1",
            "fail:1:9:1",
            "boom:1",
            "delay:1",
            "hang",
            "panic",
            "panic:0",
            "panic:1:2",
            "media",
            "media:1:0",
            "media:1:1:1",
            "gone:0",
            "stuck:1@",
            "stuck:1@x",
            "stuck:1@1@2",
        ] {
            assert!(bad.parse::<FaultRule>().is_err(), "{bad}");
        }
    }
}
