//! Human-readable output: aligned tables and short summaries.

use std::fmt::Write;

use nvmed_proto::admin::{HealthReport, StatusReport};

use crate::rates::SessionRate;

/// Bytes with a binary unit: `512 B`, `4.0 KiB`, `1.5 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A duration: `42s`, `3m 07s`, `2h 03m 07s`, `5d 02h 03m`.
pub fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s:02}s"),
        (0, _, _) => format!("{h}h {m:02}m {s:02}s"),
        _ => format!("{d}d {h:02}h {m:02}m"),
    }
}

/// Columns padded to their widest cell, two spaces apart; numeric-looking columns are
/// right-aligned when `right[i]`.
pub fn table(headers: &[&str], right: &[bool], rows: &[Vec<String>]) -> String {
    // Cells may hold names a tenant chose: no control character reaches the terminal.
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            r.iter().map(|c| c.chars().map(|ch| if ch.is_control() { '?' } else { ch }).collect()).collect()
        })
        .collect();
    let rows = &rows[..];
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            let pad = width[i] - c.chars().count();
            if i > 0 {
                l.push_str("  ");
            }
            if right.get(i).copied().unwrap_or(false) {
                l.push_str(&" ".repeat(pad));
                l.push_str(c);
            } else {
                l.push_str(c);
                if i + 1 < cells.len() {
                    l.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for r in rows {
        line(r);
    }
    out
}

/// `nvmectl status`.
pub fn status(s: &StatusReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "nvmed {}, up {}", s.version, duration(s.uptime_secs));
    let _ = writeln!(out, "\nControllers:");
    let rows: Vec<Vec<String>> = s
        .controllers
        .iter()
        .map(|c| {
            vec![
                c.index.to_string(),
                c.device.clone(),
                c.model.clone(),
                c.serial.clone(),
                c.firmware.clone(),
                bytes(u64::from(c.max_transfer)),
                c.queue_entries.to_string(),
                c.state.clone(),
            ]
        })
        .collect();
    let t = table(
        &["#", "DEVICE", "MODEL", "SERIAL", "FIRMWARE", "MAX XFER", "QUEUE", "STATE"],
        &[true, false, false, false, false, true, true, false],
        &rows,
    );
    indent(&mut out, &t);
    let _ = writeln!(out, "\nNamespaces:");
    let rows: Vec<Vec<String>> = s
        .namespaces
        .iter()
        .map(|n| {
            vec![
                n.nsid.to_string(),
                n.controller.to_string(),
                n.device_nsid.to_string(),
                bytes(n.size_bytes),
                n.lba_size.to_string(),
            ]
        })
        .collect();
    let t =
        table(&["NSID", "CONTROLLER", "DEVICE NSID", "SIZE", "LBA"], &[true, true, true, true, true], &rows);
    indent(&mut out, &t);
    let rings: Vec<String> = s.io_threads.iter().map(|t| t.rings.to_string()).collect();
    let cmds: Vec<String> = s.io_threads.iter().map(|t| t.device_commands.to_string()).collect();
    let _ = writeln!(
        out,
        "\nI/O threads: {} (rings {}; device commands {}), queue depth {}",
        s.io_threads.len(),
        rings.join(", "),
        cmds.join(", "),
        s.queue_depth
    );
    let _ = writeln!(out, "Sessions: {} of {}", s.sessions, s.max_sessions);
    let t = &s.totals;
    let _ = writeln!(
        out,
        "Totals (live sessions): submitted {}, completed {}, errors {}, read {}, written {}, in flight {}",
        t.submitted,
        t.completed,
        t.errors,
        bytes(t.bytes_read),
        bytes(t.bytes_written),
        t.in_flight
    );
    let _ = writeln!(out, "Registered: {} buffers, {}", s.registered_buffers, bytes(s.registered_bytes));
    out
}

fn indent(out: &mut String, text: &str) {
    for l in text.lines() {
        let _ = writeln!(out, "  {l}");
    }
}

/// `nvmectl sessions` (and the body of `top`); `rates`: whether the rates were measured.
pub fn sessions(list: &[SessionRate], rates: bool) -> String {
    if list.is_empty() {
        return "no sessions\n".into();
    }
    let rate = |v: f64| if rates { format!("{v:.1}") } else { "-".into() };
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let s = &r.session;
            vec![
                s.id.to_string(),
                s.uid.to_string(),
                s.pid.to_string(),
                if s.command.is_empty() { "?".into() } else { s.command.clone() },
                s.client.clone(),
                s.rings.to_string(),
                s.buffers.to_string(),
                bytes(s.registered_bytes),
                s.counters.in_flight.to_string(),
                if rates { format!("{:.0}", r.iops) } else { "-".into() },
                rate(r.read_mb_s),
                rate(r.write_mb_s),
                r.p50_us.map_or("-".into(), |v| v.to_string()),
                r.p99_us.map_or("-".into(), |v| v.to_string()),
                s.counters.errors.to_string(),
                if rates {
                    format!("{:.0}%", r.throttled_share * 100.0)
                } else {
                    format!("{:.1}s", s.counters.throttled_ns as f64 / 1e9)
                },
                duration(s.age_secs),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "UID",
            "PID",
            "COMMAND",
            "CLIENT",
            "RINGS",
            "BUFFERS",
            "REGISTERED",
            "IN FLIGHT",
            "IOPS",
            "READ MB/s",
            "WRITE MB/s",
            "P50 us",
            "P99 us",
            "ERRORS",
            "THROTTLED",
            "AGE",
        ],
        &[
            true, true, true, false, false, true, true, true, true, true, true, true, true, true, true, true,
            true,
        ],
        &rows,
    )
}

/// One screen of `nvmectl top`; `rates`: whether the rates were measured (not on the first
/// sample after the broker could not be reached).
pub fn top(status: &StatusReport, list: &[SessionRate], interval_secs: f64, rates: bool) -> String {
    let iops: f64 = list.iter().map(|r| r.iops).sum();
    let read: f64 = list.iter().map(|r| r.read_mb_s).sum();
    let write: f64 = list.iter().map(|r| r.write_mb_s).sum();
    let mut out = format!(
        "nvmed {}, up {}, sessions {}, I/O threads {}; ",
        status.version,
        duration(status.uptime_secs),
        status.sessions,
        status.io_threads.len(),
    );
    if rates {
        let _ = writeln!(
            out,
            "every {interval_secs}s: {iops:.0} IOPS, read {read:.1} MB/s, write {write:.1} MB/s\n"
        );
    } else {
        out.push_str("rates from the next refresh\n\n");
    }
    out.push_str(&sessions(list, rates));
    out
}

/// `nvmectl health`.
pub fn health(list: &[HealthReport]) -> String {
    let mut out = String::new();
    for (i, h) in list.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let _ = writeln!(out, "Controller {} ({}): {}, serial {}", h.controller, h.device, h.model, h.serial);
        let Some(s) = &h.smart else {
            let _ = writeln!(out, "  unavailable: {}", h.error.as_deref().unwrap_or("unknown error"));
            continue;
        };
        let units = |u: u64| format!("{u} ({})", bytes(nvmed_proto::admin::SmartLog::bytes(u)));
        let rows = [
            ("critical warning", format!("{:#04x}{}", s.critical_warning, warnings(s.critical_warning))),
            ("temperature", format!("{} K ({} °C)", s.temperature_kelvin, s.temperature_celsius)),
            (
                "available spare",
                format!("{} % (threshold {} %)", s.available_spare, s.available_spare_threshold),
            ),
            ("percentage used", format!("{} %", s.percentage_used)),
            ("data units read", units(s.data_units_read)),
            ("data units written", units(s.data_units_written)),
            ("host read commands", s.host_read_commands.to_string()),
            ("host write commands", s.host_write_commands.to_string()),
            ("controller busy", format!("{} min", s.controller_busy_minutes)),
            ("power cycles", s.power_cycles.to_string()),
            ("power-on hours", s.power_on_hours.to_string()),
            ("unsafe shutdowns", s.unsafe_shutdowns.to_string()),
            ("media errors", s.media_errors.to_string()),
            ("error log entries", s.error_log_entries.to_string()),
        ];
        for (k, v) in rows {
            let _ = writeln!(out, "  {k:<20} {v}");
        }
    }
    out
}

/// The Critical Warning bits in words.
fn warnings(bits: u8) -> String {
    const NAMES: [&str; 6] = [
        "spare below threshold",
        "temperature",
        "reliability degraded",
        "read-only",
        "volatile memory backup failed",
        "persistent memory read-only",
    ];
    let set: Vec<&str> = (0..6).filter(|b| bits & (1 << b) != 0).map(|b| NAMES[b]).collect();
    if set.is_empty() {
        " (none)".into()
    } else {
        format!(" ({})", set.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_and_durations() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(3 << 29), "1.5 GiB");
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(187), "3m 07s");
        assert_eq!(duration(7387), "2h 03m 07s");
        assert_eq!(duration(3 * 86400 + 3600), "3d 01h 00m");
        assert_eq!(warnings(0), " (none)");
        assert_eq!(warnings(0b1001), " (spare below threshold, read-only)");
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "NAME"],
            &[true, false],
            &[vec!["7".into(), "a".into()], vec!["10".into(), "bb".into()]],
        );
        assert_eq!(t, "ID  NAME\n 7  a\n10  bb\n");
        let t = table(&["NAME"], &[false], &[vec!["a\x1b]52;c;x\x07\nb".into()]]);
        assert_eq!(t, "NAME\na?]52;c;x??b\n");
    }
}
