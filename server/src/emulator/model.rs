//! An optional performance model for the emulated controller, so that it behaves like an SSD of
//! finite speed instead of an infinitely fast one: commands complete after a modelled service
//! time and queues build up as on real hardware (where fairness between tenants shows).
//!
//! The model is pure: no threads, no clock. [`PerfModel::schedule`] is given the time a command
//! arrives (as a [`Duration`] since any fixed origin) and returns when it completes.
//!
//! # The device
//!
//! A [`ModelSpec`] (`--model latency-us=80,iops=600k,read-mbps=3000,write-mbps=1500,channels=64`)
//! describes:
//!
//! * `channels` parallel service units (flash channels / dies). A command holds one channel from
//!   the moment it starts until it completes; when every channel is busy, a command waits for
//!   the first one to free up. Default: no limit.
//! * its **service time** on that channel: `latency-us` (the media access) plus its transfer,
//!   `bytes / read-mbps` for a read and `bytes / write-mbps` for a write, at the full rate of the
//!   device's link (a lone command moves its data as fast as the device can). MB here are 10^6
//!   bytes, as drive datasheets count them. Flush, write zeroes, deallocate (DSM) and any other
//!   command without data take [`OTHER_COMMAND_TIME`] (10 µs) and no bandwidth, whatever
//!   `latency-us` is.
//! * device-wide caps, each a "next free time" (a token bucket without burst credit): the
//!   controller starts at most `iops` commands per second (every command counts, 1/iops apart),
//!   and the link moves at most `read-mbps` of read data and, separately (like the two
//!   directions of a PCIe link), `write-mbps` of written data: a transfer of `bytes` keeps its
//!   direction busy for `bytes / MB/s`. Each default: no limit.
//!
//! A command starts when a channel is free **and** the caps allow (the command-rate token and,
//! for a read or write, its direction's bandwidth token), and completes one service time later:
//!
//! ```text
//! start = max(arrival, earliest free channel, next command slot, next read|write slot)
//! done  = start + latency + bytes / MB/s      (flush etc.: start + 10 µs)
//! ```
//!
//! Commands are scheduled in arrival order. Idle time is never saved up: a device idle for a
//! second does not then run a burst above its caps. At queue depth 1 a 4 KiB read takes
//! `latency + 4096 / read-mbps`; at high queue depth the device completes
//! `min(iops, channels / service time, MB/s / request size)` commands per second (see
//! [`PerfModel::peak_rate`]). So for the IOPS cap to be reachable, `channels` must be at least
//! `iops × service time` (Little's law): 600k IOPS at 80 µs needs 48 channels.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Time a command without data (flush, write zeroes, deallocate, ...) holds a channel; it uses
/// no bandwidth but counts against `iops`.
pub const OTHER_COMMAND_TIME: Duration = Duration::from_micros(10);

/// The keys of a spec, for error messages and help.
pub const MODEL_KEYS: &str = "latency-us, iops, read-mbps, write-mbps, channels";

/// Largest `latency-us` (1 s: beyond it commands would look hung to the broker).
pub const MAX_LATENCY_US: u64 = 1_000_000;
/// Largest `iops`.
pub const MAX_IOPS: u64 = 1_000_000_000;
/// Largest `read-mbps` / `write-mbps` (1 TB/s).
pub const MAX_MBPS: u64 = 1_000_000;
/// Largest `channels`.
pub const MAX_CHANNELS: u64 = 65_536;

/// The performance a modelled device promises (see the [module docs](self)); `Default` is an
/// infinitely fast device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModelSpec {
    /// `latency-us`: media access time of every read and write, in microseconds.
    pub latency_us: u64,
    /// `iops`: most commands per second; `None`: no limit.
    pub iops: Option<u64>,
    /// `read-mbps`: most bytes read per second, in 10^6 bytes; `None`: no limit.
    pub read_mbps: Option<u64>,
    /// `write-mbps`: most bytes written per second, in 10^6 bytes; `None`: no limit.
    pub write_mbps: Option<u64>,
    /// `channels`: commands in service at once; `None`: no limit.
    pub channels: Option<u32>,
}

/// A `--model` spec that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelSpecError {
    /// Nothing given.
    #[error("empty performance model: give KEY=VALUE pairs separated by commas, keys: {MODEL_KEYS}")]
    Empty,
    /// An item without `=`.
    #[error("{0:?} is not KEY=VALUE (valid keys: {MODEL_KEYS})")]
    NotKeyValue(String),
    /// A key that is not one of [`MODEL_KEYS`].
    #[error("unknown key {0:?} (valid keys: {MODEL_KEYS})")]
    UnknownKey(String),
    /// A key given twice.
    #[error("{0} given twice")]
    Duplicate(&'static str),
    /// A value that is not a number in range.
    #[error("bad value {value:?} for {key}: expected {expected}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// What was given.
        value: String,
        /// What is accepted.
        expected: String,
    },
}

/// A number with an optional `k` (1000) or `m` (1000000) suffix.
fn parse_number(s: &str) -> Option<u64> {
    let (digits, mult) = match s.as_bytes().last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 1_000),
        b'm' | b'M' => (&s[..s.len() - 1], 1_000_000),
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse::<u64>().ok()?.checked_mul(mult)
}

/// `n` with a `k` or `m` suffix when that is exact.
fn fmt_number(n: u64) -> String {
    match n {
        0 => "0".into(),
        n if n % 1_000_000 == 0 => format!("{}m", n / 1_000_000),
        n if n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

impl FromStr for ModelSpec {
    type Err = ModelSpecError;

    /// `KEY=VALUE[,KEY=VALUE...]` with the keys of [`MODEL_KEYS`]; numbers may end in `k`
    /// (×1000) or `m` (×1000000). Keys left out keep their default (no limit, latency 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut spec = ModelSpec::default();
        let mut seen = [false; 5];
        for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let (key, value) =
                item.split_once('=').ok_or_else(|| ModelSpecError::NotKeyValue(item.to_string()))?;
            let (key, value) = (key.trim(), value.trim());
            let (index, name, min, max) = match key.to_ascii_lowercase().as_str() {
                "latency-us" => (0, "latency-us", 0, MAX_LATENCY_US),
                "iops" => (1, "iops", 1, MAX_IOPS),
                "read-mbps" => (2, "read-mbps", 1, MAX_MBPS),
                "write-mbps" => (3, "write-mbps", 1, MAX_MBPS),
                "channels" => (4, "channels", 1, MAX_CHANNELS),
                _ => return Err(ModelSpecError::UnknownKey(key.to_string())),
            };
            if std::mem::replace(&mut seen[index], true) {
                return Err(ModelSpecError::Duplicate(name));
            }
            let v = parse_number(value).filter(|v| (min..=max).contains(v)).ok_or_else(|| {
                ModelSpecError::BadValue {
                    key: name,
                    value: value.to_string(),
                    expected: format!("a whole number from {min} to {max} (suffixes k, m allowed)"),
                }
            })?;
            match index {
                0 => spec.latency_us = v,
                1 => spec.iops = Some(v),
                2 => spec.read_mbps = Some(v),
                3 => spec.write_mbps = Some(v),
                _ => spec.channels = Some(v as u32),
            }
        }
        if !seen.contains(&true) {
            return Err(ModelSpecError::Empty);
        }
        Ok(spec)
    }
}

impl fmt::Display for ModelSpec {
    /// The canonical spec, which parses back to the same value: `latency-us` always, then the
    /// limits that are set.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "latency-us={}", self.latency_us)?;
        if let Some(v) = self.iops {
            write!(f, ",iops={}", fmt_number(v))?;
        }
        if let Some(v) = self.read_mbps {
            write!(f, ",read-mbps={v}")?;
        }
        if let Some(v) = self.write_mbps {
            write!(f, ",write-mbps={v}")?;
        }
        if let Some(v) = self.channels {
            write!(f, ",channels={v}")?;
        }
        Ok(())
    }
}

/// What a command asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    /// A read of this many bytes.
    Read(u64),
    /// A write of this many bytes.
    Write(u64),
    /// A command without data (flush, write zeroes, deallocate, ...).
    Other,
}

/// Picoseconds: 1/iops and bytes/bandwidth are not whole nanoseconds, and rounding each of
/// 600k commands a second to the nanosecond would move the cap by up to 0.1%.
type Ps = u128;
const PS_PER_SEC: Ps = 1_000_000_000_000;

fn to_ps(d: Duration) -> Ps {
    d.as_nanos() * 1000
}

/// Rounded up: a command never completes before the model says.
fn from_ps(ps: Ps) -> Duration {
    let ns = ps.div_ceil(1000);
    Duration::new((ns / 1_000_000_000) as u64, (ns % 1_000_000_000) as u32)
}

/// The state of a modelled device: when each channel and each cap is free next.
#[derive(Debug, Clone)]
pub struct PerfModel {
    spec: ModelSpec,
    /// When each channel is free (empty: no channel limit).
    channels: BinaryHeap<Reverse<Ps>>,
    /// Earliest start of the next command under `iops`.
    next_command: Ps,
    /// Earliest start of the next read's transfer under `read-mbps`.
    next_read: Ps,
    /// Earliest start of the next write's transfer under `write-mbps`.
    next_write: Ps,
}

impl PerfModel {
    /// An idle device.
    pub fn new(spec: ModelSpec) -> Self {
        let mut m = Self { spec, channels: BinaryHeap::new(), next_command: 0, next_read: 0, next_write: 0 };
        m.reset();
        m
    }

    /// Its spec.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Forgets every command: the device is idle from time zero on (a controller reset).
    pub fn reset(&mut self) {
        let n = self.spec.channels.map_or(0, |c| c as usize);
        self.channels = (0..n).map(|_| Reverse(0)).collect();
        self.next_command = 0;
        self.next_read = 0;
        self.next_write = 0;
    }

    /// Time `bytes` take at `mbps` (none without a limit).
    fn transfer(bytes: u64, mbps: Option<u64>) -> Ps {
        // bytes / (mbps * 10^6 B/s) in ps = bytes * 10^6 / mbps, rounded up.
        mbps.map_or(0, |m| (Ps::from(bytes) * 1_000_000).div_ceil(Ps::from(m)))
    }

    fn service_ps(&self, work: Work) -> Ps {
        let latency = Ps::from(self.spec.latency_us) * 1_000_000;
        match work {
            Work::Read(b) => latency + Self::transfer(b, self.spec.read_mbps),
            Work::Write(b) => latency + Self::transfer(b, self.spec.write_mbps),
            Work::Other => to_ps(OTHER_COMMAND_TIME),
        }
    }

    /// How long `work` takes once started (its latency at queue depth 1).
    pub fn service_time(&self, work: Work) -> Duration {
        from_ps(self.service_ps(work))
    }

    /// Schedules a command that arrives at `now` (served after every command scheduled before
    /// it) and returns when it completes. Times are durations since any fixed origin. A `now`
    /// earlier than an earlier call's is fine: the command still queues behind those.
    pub fn schedule(&mut self, now: Duration, work: Work) -> Duration {
        let service = self.service_ps(work);
        let mut start = to_ps(now).max(self.next_command);
        if let Some(Reverse(free)) = self.channels.peek() {
            start = start.max(*free);
        }
        let bandwidth = match work {
            Work::Read(b) => Some((&mut self.next_read, Self::transfer(b, self.spec.read_mbps))),
            Work::Write(b) => Some((&mut self.next_write, Self::transfer(b, self.spec.write_mbps))),
            Work::Other => None,
        };
        if let Some((next, transfer)) = bandwidth {
            start = start.max(*next);
            *next = start + transfer;
        }
        if let Some(iops) = self.spec.iops {
            self.next_command = start + PS_PER_SEC.div_ceil(Ps::from(iops));
        }
        let done = start + service;
        if let Some(mut channel) = self.channels.peek_mut() {
            channel.0 = done;
        }
        from_ps(done)
    }

    /// Commands per second the device sustains for an endless stream of `work` with enough of
    /// them queued: the least of `iops`, `channels` / service time and MB/s / size (infinite
    /// when nothing limits it).
    pub fn peak_rate(&self, work: Work) -> f64 {
        let mut rate = f64::INFINITY;
        if let Some(iops) = self.spec.iops {
            rate = rate.min(iops as f64);
        }
        let service = self.service_ps(work);
        if let (Some(c), true) = (self.spec.channels, service > 0) {
            rate = rate.min(f64::from(c) * PS_PER_SEC as f64 / service as f64);
        }
        let transfer = match work {
            Work::Read(b) => Self::transfer(b, self.spec.read_mbps),
            Work::Write(b) => Self::transfer(b, self.spec.write_mbps),
            Work::Other => 0,
        };
        if transfer > 0 {
            rate = rate.min(PS_PER_SEC as f64 / transfer as f64);
        }
        rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KIB: u64 = 1024;

    fn model(spec: &str) -> PerfModel {
        PerfModel::new(spec.parse().unwrap())
    }

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    /// A closed loop on the fake clock: `depth` commands in flight from time zero, each
    /// completion replaced at once by a new command. Returns the completions up to `window`.
    fn closed_loop(m: &mut PerfModel, depth: usize, work: impl Fn(u64) -> Work, window: Duration) -> u64 {
        let mut in_flight = BinaryHeap::new();
        let mut issued = 0u64;
        for _ in 0..depth {
            in_flight.push(Reverse(m.schedule(Duration::ZERO, work(issued))));
            issued += 1;
        }
        let mut done = 0;
        while let Some(Reverse(t)) = in_flight.pop() {
            if t > window {
                break;
            }
            done += 1;
            in_flight.push(Reverse(m.schedule(t, work(issued))));
            issued += 1;
        }
        done
    }

    fn within(value: f64, target: f64, fraction: f64) -> bool {
        (value - target).abs() <= target * fraction
    }

    #[test]
    fn a_single_channel_serializes() {
        let mut m = model("latency-us=100,channels=1");
        let done: Vec<_> = (0..3).map(|_| m.schedule(Duration::ZERO, Work::Read(4 * KIB))).collect();
        assert_eq!(done, [us(100), us(200), us(300)]);
        // A command arriving while the channel is busy waits for it; one arriving later does not.
        assert_eq!(m.schedule(us(250), Work::Write(4 * KIB)), us(400));
        assert_eq!(m.schedule(us(1000), Work::Write(4 * KIB)), us(1100));
    }

    #[test]
    fn n_channels_overlap() {
        let mut m = model("latency-us=100,channels=4");
        let done: Vec<_> = (0..10).map(|_| m.schedule(Duration::ZERO, Work::Read(4 * KIB))).collect();
        assert_eq!(
            done,
            [us(100), us(100), us(100), us(100), us(200), us(200), us(200), us(200), us(300), us(300)]
        );
        // Without a channel limit, everything overlaps.
        let mut m = model("latency-us=100");
        assert!((0..1000).all(|_| m.schedule(us(5), Work::Read(4 * KIB)) == us(105)));
        // Closed loop: channels / latency commands per second.
        let mut m = model("latency-us=80,channels=8");
        let n = closed_loop(&mut m, 64, |_| Work::Read(4 * KIB), Duration::from_secs(1));
        assert!(within(n as f64, 100_000.0, 0.01), "{n}");
        assert!(within(m.peak_rate(Work::Read(4 * KIB)), 100_000.0, 1e-9));
    }

    #[test]
    fn qd1_latency_is_latency_plus_transfer() {
        let mut m = model("latency-us=80,read-mbps=3000,write-mbps=1500,channels=8,iops=600k");
        // 128 KiB at 3000 MB/s: 43.69 µs; at 1500 MB/s: 87.38 µs.
        let read = m.service_time(Work::Read(128 * KIB));
        assert_eq!(read, Duration::from_nanos(80_000 + 43_691));
        let write = m.service_time(Work::Write(128 * KIB));
        assert_eq!(write, Duration::from_nanos(80_000 + 87_382));
        let mut t = us(10);
        for _ in 0..100 {
            assert_eq!(m.schedule(t, Work::Read(128 * KIB)) - t, read);
            t += us(500);
            assert_eq!(m.schedule(t, Work::Write(128 * KIB)) - t, write);
            t += us(500);
        }
    }

    #[test]
    fn the_iops_cap_holds_over_a_simulated_second() {
        // 64 channels at 80 µs could do 800k; the cap is 600k.
        let mut m = model("latency-us=80,iops=600k,channels=64");
        let n = closed_loop(&mut m, 128, |_| Work::Read(4 * KIB), Duration::from_secs(1));
        assert!(within(n as f64, 600_000.0, 0.01), "{n} commands in a second");
        assert!(n <= 600_000, "{n}: above the cap");
        // Mixed commands all count.
        let mut m = model("latency-us=80,iops=600k,channels=64");
        let mix = |i: u64| match i % 3 {
            0 => Work::Read(4 * KIB),
            1 => Work::Write(4 * KIB),
            _ => Work::Other,
        };
        let n = closed_loop(&mut m, 128, mix, Duration::from_secs(1));
        assert!(within(n as f64, 600_000.0, 0.01) && n <= 600_000, "{n}");
        // A flood arriving at once is spread out, with no burst: 1/iops apart.
        let mut m = model("iops=600k");
        let done: Vec<_> = (0..1_000_000).map(|_| m.schedule(Duration::ZERO, Work::Other)).collect();
        let in_a_second = done.iter().filter(|&&t| t <= Duration::from_secs(1)).count();
        assert!(within(in_a_second as f64, 600_000.0, 0.001) && in_a_second <= 600_001, "{in_a_second}");
        // Idle time is not saved up.
        let mut m = model("iops=1k");
        let late = Duration::from_secs(10);
        assert_eq!(m.schedule(late, Work::Other), late + OTHER_COMMAND_TIME);
        assert_eq!(m.schedule(late, Work::Other), late + us(1000) + OTHER_COMMAND_TIME);
    }

    #[test]
    fn the_bandwidth_caps_hold_for_128k_reads_and_writes() {
        let spec = "latency-us=80,iops=600k,read-mbps=3000,write-mbps=1500,channels=8";
        for (work, mbps) in [(Work::Read(128 * KIB), 3000.0), (Work::Write(128 * KIB), 1500.0)] {
            let mut m = model(spec);
            let n = closed_loop(&mut m, 32, |_| work, Duration::from_secs(1));
            let rate = (n * 128 * KIB) as f64 / 1e6;
            assert!(within(rate, mbps, 0.01) && rate <= mbps, "{work:?}: {rate} MB/s");
            assert!(within(m.peak_rate(work) * (128 * KIB) as f64 / 1e6, mbps, 1e-6));
        }
        // Reads and writes have separate budgets: a 50/50 mix gets both at once (writes are
        // the bottleneck: 1500 MB/s of them, and as much of reads).
        let mut m = model(spec);
        let mix = |i: u64| if i.is_multiple_of(2) { Work::Read(128 * KIB) } else { Work::Write(128 * KIB) };
        let n = closed_loop(&mut m, 64, mix, Duration::from_secs(1));
        let rate = (n * 128 * KIB) as f64 / 1e6;
        assert!(within(rate, 3000.0, 0.02), "{rate} MB/s mixed");
        // Without bandwidth limits, the same device is bound by its channels.
        let mut m = model("latency-us=80,channels=8");
        let n = closed_loop(&mut m, 32, |_| Work::Read(128 * KIB), Duration::from_secs(1));
        assert!(within(n as f64, 100_000.0, 0.01), "{n}");
    }

    #[test]
    fn commands_without_data_cost_a_small_fixed_time_and_no_bandwidth() {
        let mut m = model("latency-us=500,write-mbps=1,channels=2");
        // A 1 MB write at 1 MB/s holds its channel for 1.0005 s and the write link for 1 s.
        let big = m.schedule(Duration::ZERO, Work::Write(1_000_000));
        assert_eq!(big, Duration::from_micros(1_000_500));
        // A flush goes on the other channel at once, without waiting for the write bandwidth.
        assert_eq!(m.schedule(Duration::ZERO, Work::Other), OTHER_COMMAND_TIME);
        assert_eq!(m.service_time(Work::Other), OTHER_COMMAND_TIME);
        // A second write waits for the link.
        assert_eq!(m.schedule(Duration::ZERO, Work::Write(1000)), us(1_000_000 + 500 + 1000));
    }

    #[test]
    fn reset_makes_the_device_idle() {
        let mut m = model("latency-us=100,channels=1,iops=10");
        for _ in 0..5 {
            m.schedule(Duration::ZERO, Work::Read(512));
        }
        m.reset();
        assert_eq!(m.schedule(us(1), Work::Read(512)), us(101));
    }

    #[test]
    fn parses_and_prints_specs() {
        let spec: ModelSpec =
            "latency-us=80,iops=600k,read-mbps=3000,write-mbps=1500,channels=8".parse().unwrap();
        assert_eq!(
            spec,
            ModelSpec {
                latency_us: 80,
                iops: Some(600_000),
                read_mbps: Some(3000),
                write_mbps: Some(1500),
                channels: Some(8)
            }
        );
        assert_eq!(spec.to_string(), "latency-us=80,iops=600k,read-mbps=3000,write-mbps=1500,channels=8");
        // Any order, spaces, upper case, suffixes; left-out keys are unlimited.
        let spec: ModelSpec = " IOPS=2M , latency-us=1k ".parse().unwrap();
        assert_eq!(spec, ModelSpec { latency_us: 1000, iops: Some(2_000_000), ..Default::default() });
        assert_eq!(spec.to_string(), "latency-us=1000,iops=2m");
        for s in ["iops=20k", "channels=1", "latency-us=0", "iops=1234,read-mbps=7", "write-mbps=1m"] {
            let spec: ModelSpec = s.parse().unwrap();
            assert_eq!(spec.to_string().parse::<ModelSpec>().unwrap(), spec, "{s}");
        }
    }

    #[test]
    fn parse_errors_say_what_is_wrong() {
        let err = |s: &str| s.parse::<ModelSpec>().unwrap_err();
        assert_eq!(err(""), ModelSpecError::Empty);
        assert_eq!(err(" , "), ModelSpecError::Empty);
        assert_eq!(err("iops"), ModelSpecError::NotKeyValue("iops".into()));
        assert_eq!(err("latency=80"), ModelSpecError::UnknownKey("latency".into()));
        assert_eq!(err("iops=1k,iops=2k"), ModelSpecError::Duplicate("iops"));
        let msg = err("speed=fast").to_string();
        assert!(msg.contains("latency-us, iops, read-mbps, write-mbps, channels"), "{msg}");
        for (s, key) in [
            ("iops=0", "iops"),
            ("iops=-5", "iops"),
            ("iops=1.5k", "iops"),
            ("iops=k", "iops"),
            ("iops=20g", "iops"),
            ("iops=99999999999999999999", "iops"),
            ("iops=99999999999999m", "iops"),
            ("channels=0", "channels"),
            ("channels=70000", "channels"),
            ("read-mbps=", "read-mbps"),
            ("write-mbps=0", "write-mbps"),
            ("latency-us=2000001", "latency-us"),
        ] {
            match err(s) {
                ModelSpecError::BadValue { key: k, .. } => assert_eq!(k, key, "{s}"),
                other => panic!("{s}: {other:?}"),
            }
        }
        let msg = err("channels=0").to_string();
        assert!(msg.contains("channels") && msg.contains("from 1 to 65536"), "{msg}");
    }
}
