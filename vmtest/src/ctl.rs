//! Checks of `nvmectl --json` output against what QEMU's controller must report (the VM test's
//! nvmectl scenarios). They read files nvmectl wrote; no broker connection of their own.

use nvmed_proto::admin::{HealthReport, SessionReport, SmartLog, StatusReport, SMART_DATA_UNIT};
use serde::de::DeserializeOwned;

fn read_json<T: DeserializeOwned>(file: &str) -> Result<T, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{file}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{file}: not what nvmectl --json prints: {e}"))
}

/// Collects every mismatch, so one run names all of them.
#[derive(Default)]
struct Mismatches(Vec<String>);

impl Mismatches {
    fn eq<T: PartialEq + std::fmt::Debug>(&mut self, what: &str, got: T, want: T) {
        if got != want {
            self.0.push(format!("{what}: {got:?}, expected {want:?}"));
        }
    }
    fn check(&mut self, ok: bool, why: impl FnOnce() -> String) {
        if !ok {
            self.0.push(why());
        }
    }
    fn done(self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self.0.join("; "))
        }
    }
}

/// The controller as QEMU set it up.
pub struct ExpectController<'a> {
    pub device: &'a str,
    pub model: &'a str,
    pub serial: &'a str,
}

/// `nvmectl status --json`: one controller, the expected one (Identify Controller's model,
/// serial and firmware; MDTS), running, and exactly the expected namespaces on it.
pub fn status(
    file: &str,
    want: &ExpectController,
    firmware: &str,
    max_transfer: u32,
    namespaces: &[(u32, u32, u64)],
) -> Result<(), String> {
    let s: StatusReport = read_json(file)?;
    for c in &s.controllers {
        println!(
            "controller {}: device {} model {:?} serial {:?} firmware {:?} max_transfer {} queue {} state {}",
            c.index, c.device, c.model, c.serial, c.firmware, c.max_transfer, c.queue_entries, c.state
        );
    }
    for n in &s.namespaces {
        println!(
            "namespace {}: controller {} device nsid {} {} bytes, lba {}",
            n.nsid, n.controller, n.device_nsid, n.size_bytes, n.lba_size
        );
    }
    println!("nvmed {}, {} I/O threads, {} sessions", s.version, s.io_threads.len(), s.sessions);
    let [c] = &s.controllers[..] else {
        return Err(format!("{} controllers reported, expected 1", s.controllers.len()));
    };
    let mut m = Mismatches::default();
    m.eq("device", c.device.as_str(), want.device);
    m.eq("model", c.model.trim(), want.model);
    m.eq("serial", c.serial.trim(), want.serial);
    m.check(!c.firmware.trim().is_empty(), || "the firmware revision is empty".into());
    m.eq("firmware", c.firmware.trim(), firmware.trim());
    m.eq("max_transfer", c.max_transfer, max_transfer);
    m.eq("state", c.state.as_str(), "running");
    let got: Vec<(u32, u32, u64)> = s.namespaces.iter().map(|n| (n.nsid, n.lba_size, n.size_bytes)).collect();
    m.eq("namespaces (nsid, lba, bytes)", &got[..], namespaces);
    m.check(s.namespaces.iter().all(|n| n.controller == c.index && n.device_nsid == n.nsid), || {
        "a namespace is not the controller's own with the same nsid".into()
    });
    m.done()
}

/// What QEMU's emulated controller puts in its SMART log.
pub struct ExpectSmart {
    pub kelvin: u16,
    pub spare: u8,
    pub spare_threshold: u8,
}

/// `nvmectl health --json`: the controller's SMART / Health log as QEMU fills it: no critical
/// warning, its fixed temperature and spare fields, nothing used up, no media error, and data
/// and commands counted from the I/O the earlier scenarios did. With `since` (a health report
/// taken before a ringbench run whose `--output-format json` report is `ringbench`), the
/// counters must have grown by exactly that run's I/O: one device command per ringbench I/O,
/// data units (1000 x 512 bytes, rounded up by the controller) by its bytes.
pub fn health(
    file: &str,
    want: &ExpectController,
    smart: &ExpectSmart,
    since: Option<(&str, &str)>,
) -> Result<(), String> {
    let h = one_health(file, want)?;
    let mut m = Mismatches::default();
    m.eq("critical warning", h.critical_warning, 0);
    m.eq("temperature (K)", h.temperature_kelvin, smart.kelvin);
    m.eq("temperature (°C)", h.temperature_celsius, i32::from(smart.kelvin) - 273);
    m.eq("available spare", h.available_spare, smart.spare);
    m.eq("available spare threshold", h.available_spare_threshold, smart.spare_threshold);
    m.eq("percentage used", h.percentage_used, 0);
    m.eq("media errors", h.media_errors, 0);
    m.check(h.data_units_read > 0 && h.data_units_written > 0, || {
        format!("no data units read or written after the I/O scenarios: {h:?}")
    });
    m.check(h.host_read_commands > 0 && h.host_write_commands > 0, || {
        format!("no host commands after the I/O scenarios: {h:?}")
    });
    if let Some((before_file, ringbench)) = since {
        let b = one_health(before_file, want)?;
        let rb: serde_json::Value = read_json(ringbench)?;
        let num =
            |v: &serde_json::Value| v.as_u64().ok_or(format!("{ringbench}: not a ringbench JSON report"));
        let (bs, reads, writes) =
            (num(&rb["bs"])?, num(&rb["total"]["reads"])?, num(&rb["total"]["writes"])?);
        println!("ringbench in between: {reads} reads, {writes} writes of {bs} bytes");
        let grew = |what: &str, before: u64, after: u64| {
            let d = after.checked_sub(before);
            println!("{what}: {before} -> {after} (+{})", d.map_or("?".into(), |d| d.to_string()));
            d.unwrap_or(u64::MAX)
        };
        m.eq(
            "host read commands added",
            grew("host read commands", b.host_read_commands, h.host_read_commands),
            reads,
        );
        m.eq(
            "host write commands added",
            grew("host write commands", b.host_write_commands, h.host_write_commands),
            writes,
        );
        // The controller rounds its 512-byte count up to units: the difference of two rounded
        // values lies between the exact difference rounded down and rounded up.
        for (what, before, after, bytes) in [
            ("data units read", b.data_units_read, h.data_units_read, reads * bs),
            ("data units written", b.data_units_written, h.data_units_written, writes * bs),
        ] {
            let d = grew(what, before, after);
            let (lo, hi) = (bytes / SMART_DATA_UNIT, bytes.div_ceil(SMART_DATA_UNIT));
            m.check((lo..=hi).contains(&d), || {
                format!("{what} grew by {d}, expected {lo}..={hi} for {bytes} bytes")
            });
        }
        m.check(reads > 0 && writes > 0, || "the ringbench run did no reads or no writes".into());
    }
    m.done()
}

fn one_health(file: &str, want: &ExpectController) -> Result<SmartLog, String> {
    let list: Vec<HealthReport> = read_json(file)?;
    let [r] = &list[..] else {
        return Err(format!("{file}: {} controllers reported, expected 1", list.len()));
    };
    let mut m = Mismatches::default();
    m.eq("device", r.device.as_str(), want.device);
    m.eq("model", r.model.trim(), want.model);
    m.eq("serial", r.serial.trim(), want.serial);
    m.eq("error", r.error.as_deref(), None);
    m.done()?;
    let s = r.smart.ok_or(format!("{file}: no SMART log"))?;
    println!("{file}: {} {} {:?}", r.device, r.model, s);
    Ok(s)
}

/// One entry of `nvmectl sessions --json`: the broker's report with the rates nvmectl measured.
#[derive(serde::Deserialize)]
struct SessionRate {
    #[serde(flatten)]
    session: SessionReport,
    iops: f64,
    read_mb_s: f64,
    write_mb_s: f64,
}

/// `nvmectl sessions --json` taken while a ringbench (randrw) ran: it is the only session, with
/// its pid, command, uid and rings, I/O counted, and nonzero read and write rates.
pub fn sessions(file: &str, pid: i32, command: &str, uid: u32, rings: u32) -> Result<(), String> {
    let list: Vec<SessionRate> = read_json(file)?;
    for r in &list {
        let s = &r.session;
        println!(
            "session {}: uid {} pid {} command {:?} client {:?} rings {} buffers {} ({} bytes) \
             completed {} errors {} in flight {} | {:.0} IOPS, read {:.1} MB/s, write {:.1} MB/s",
            s.id,
            s.uid,
            s.pid,
            s.command,
            s.client,
            s.rings,
            s.buffers,
            s.registered_bytes,
            s.counters.completed,
            s.counters.errors,
            s.counters.in_flight,
            r.iops,
            r.read_mb_s,
            r.write_mb_s
        );
    }
    let [r] = &list[..] else {
        return Err(format!("{} sessions listed, expected 1", list.len()));
    };
    let s = &r.session;
    let mut m = Mismatches::default();
    m.eq("pid", s.pid, pid);
    m.eq("command", s.command.as_str(), command);
    m.eq("uid", s.uid, uid);
    m.eq("rings", s.rings, rings);
    m.eq("errors", s.counters.errors, 0);
    m.check(s.buffers > 0 && s.registered_bytes > 0, || "no registered buffers".into());
    m.check(s.counters.completed > 0 && s.counters.bytes_read > 0 && s.counters.bytes_written > 0, || {
        "no reads and writes counted".into()
    });
    m.check(r.iops > 0.0 && r.read_mb_s > 0.0 && r.write_mb_s > 0.0, || {
        "zero IOPS or MB/s while ringbench ran".into()
    });
    m.done()
}
