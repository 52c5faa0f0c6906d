//! `nvmectl`: look at and manage a running nvmed through its admin socket.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use nvmectl::{render, session_rates, AdminClient, CtlError, DEFAULT_ADMIN_SOCKET};
use serde::Serialize;

/// nvmectl shows what a running nvmed broker is doing and lets an operator end a client's
/// session. It talks to the broker's admin socket, which only root (and members of nvmed's
/// --admin-group) may use.
///
/// Examples:
///
///   nvmectl status                 controllers, namespaces, I/O threads, totals
///   nvmectl sessions               who is connected, with IOPS and MB/s over 1 s
///   nvmectl top                    the same, refreshed every second (Ctrl-C to quit)
///   nvmectl kill 12                end session 12 as if its client had disconnected
///   nvmectl health                 each controller's SMART / health data
///   nvmectl reload                 put the grants of nvmed's configuration in force now
///   nvmectl limits                 the grants and their limits
///   nvmectl limits 1000 1 iops=5k  change uid 1000's limits on namespace 1 now
///   nvmectl status --json | jq .   machine-readable output
///
/// If nvmed runs with --socket /tmp/nvmed.sock, its admin socket is /tmp/nvmed-admin.sock:
///
///   nvmectl --admin-socket /tmp/nvmed-admin.sock status
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// The broker's admin socket (nvmed --admin-socket).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    admin_socket: PathBuf,

    /// Print the broker's answer as JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Broker overview: controllers, namespaces, I/O threads, totals
    ///
    /// Version and uptime, each controller (model, serial, firmware, queue size, state), the
    /// namespaces (broker-wide id, controller, size), the I/O threads and queue depth, the
    /// sessions, the totals of the live sessions and the registered memory.
    Status,
    /// Connected clients, with IOPS and MB/s
    ///
    /// One line per live session: id, uid, pid, command, client name, rings, registered
    /// buffers and bytes, requests in flight, and IOPS and MB/s measured over --interval.
    Sessions {
        /// Seconds between the two samples the rates come from (0: one sample, no rates).
        #[arg(long, default_value = "1", value_name = "SECONDS", value_parser = parse_secs)]
        interval: f64,
    },
    /// The session table, refreshed every --interval until Ctrl-C (like top or iostat)
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value = "1", value_name = "SECONDS", value_parser = parse_positive_secs)]
        interval: f64,
        /// Stop after this many refreshes.
        #[arg(long, value_name = "N")]
        iterations: Option<u64>,
    },
    /// End a session as if its client had disconnected
    ///
    /// Its I/O drains, its buffers are released, and its client sees its rings closed.
    /// Returns once the broker has released it.
    Kill {
        /// The session id (the ID column of `nvmectl sessions`).
        session: u64,
    },
    /// Each controller's SMART / health data
    ///
    /// The SMART / Health Information log page: critical warnings, temperature, spare, wear,
    /// data read and written, power-on hours, unsafe shutdowns, media errors.
    Health,
    /// Read nvmed's configuration again and put its grants and limits in force (as SIGHUP does)
    ///
    /// Connected sessions keep going with the new grants; a session that lost a namespace is
    /// ended after its I/O drains. A configuration that does not parse is refused with the
    /// reason, and the grants in force stay.
    Reload,
    /// Show the grants and their limits, or change one grant's limits now
    ///
    /// Without arguments: every grant (uid, namespace, window, read-only, limits). With
    /// UID NSID LIMITS: that grant's share and limits become LIMITS (as in nvmed --grant, e.g.
    /// weight=3,iops=20k,write-mbps=100,qd=64) for its connected sessions' next requests. The
    /// change lives until nvmed reads its configuration again (reload, SIGHUP, restart).
    Limits {
        /// The grant's uid.
        #[arg(requires_all = ["nsid", "limits"])]
        uid: Option<u32>,
        /// The grant's namespace.
        nsid: Option<u32>,
        /// The new limits.
        limits: Option<String>,
    },
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.0..=3600.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds from 0 to 3600")),
    }
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    parse_secs(s)
        .and_then(|v| if v >= 0.05 { Ok(v) } else { Err("the interval must be at least 0.05 s".into()) })
}

fn main() {
    // Like other command-line tools, end quietly when the reader of our output goes away
    // (`nvmectl top --json | head`) instead of panicking on the failed write.
    // SAFETY: called before any other thread exists; SIG_DFL installs no Rust handler.
    let _ = unsafe {
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGPIPE, nix::sys::signal::SigHandler::SigDfl)
    };
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("nvmectl: {e}");
        std::process::exit(1);
    }
}

fn print_json<T: Serialize>(v: &T) -> Result<(), CtlError> {
    let s = serde_json::to_string_pretty(v).map_err(|e| CtlError::Unexpected(e.to_string()))?;
    println!("{s}");
    Ok(())
}

fn run(cli: Cli) -> Result<(), CtlError> {
    let client = AdminClient::new(&cli.admin_socket);
    match cli.command {
        Command::Status => {
            let s = client.status()?;
            if cli.json {
                print_json(&s)?;
            } else {
                print!("{}", render::status(&s));
            }
        }
        Command::Sessions { interval } => {
            let before = client.sessions()?;
            let (list, measured) = if interval > 0.0 {
                let t = Instant::now();
                std::thread::sleep(Duration::from_secs_f64(interval));
                let after = client.sessions()?;
                (session_rates(&before, &after, t.elapsed()), true)
            } else {
                (session_rates(&[], &before, Duration::ZERO), false)
            };
            if cli.json {
                print_json(&list)?;
            } else {
                print!("{}", render::sessions(&list, measured));
            }
        }
        Command::Top { interval, iterations } => top(&client, interval, iterations, cli.json)?,
        Command::Kill { session } => {
            client.kill(session)?;
            if cli.json {
                print_json(&serde_json::json!({ "killed": session }))?;
            } else {
                println!("session {session} ended");
            }
        }
        Command::Limits { uid: Some(uid), nsid: Some(nsid), limits: Some(limits) } => {
            let (updated, ended) = client.set_limits(uid, nsid, &limits)?;
            if cli.json {
                print_json(&serde_json::json!({ "updated": updated, "ended": ended }))?;
            } else {
                println!("limits of uid {uid} on namespace {nsid} now {limits}: {updated} sessions updated");
            }
        }
        Command::Limits { .. } => {
            let (grants, default_access) = client.limits()?;
            if cli.json {
                print_json(&serde_json::json!({ "grants": grants, "default_access": default_access }))?;
            } else {
                println!("{:>8} {:>5} {:>22} {:>3}  LIMITS", "UID", "NSID", "WINDOW", "RO");
                for g in &grants {
                    let window = g.window.map_or("whole".to_string(), |(a, n)| format!("{a}+{n}"));
                    let ro = if g.read_only { "ro" } else { "" };
                    println!("{:>8} {:>5} {:>22} {:>3}  {}", g.uid, g.nsid, window, ro, g.limits);
                }
                println!("uids without grants: {default_access}");
            }
        }
        Command::Reload => {
            let (updated, ended) = client.reload()?;
            if cli.json {
                print_json(&serde_json::json!({ "updated": updated, "ended": ended }))?;
            } else {
                println!("grants reloaded: {updated} sessions updated, {ended} ended");
            }
        }
        Command::Health => {
            let h = client.health()?;
            if cli.json {
                print_json(&h)?;
            } else {
                print!("{}", render::health(&h));
            }
        }
    }
    Ok(())
}

fn top(client: &AdminClient, interval: f64, iterations: Option<u64>, json: bool) -> Result<(), CtlError> {
    let tty = std::io::stdout().is_terminal();
    let mut before = client.sessions()?;
    let mut t = Instant::now();
    let mut n = 0;
    while iterations.is_none_or(|max| n < max) {
        std::thread::sleep(Duration::from_secs_f64(interval));
        let status = client.status()?;
        let after = client.sessions()?;
        let elapsed = t.elapsed();
        t = Instant::now();
        let list = session_rates(&before, &after, elapsed);
        let mut out = std::io::stdout().lock();
        if json {
            let line = serde_json::json!({
                "uptime_secs": status.uptime_secs,
                "interval_secs": elapsed.as_secs_f64(),
                "sessions": list,
            });
            let _ = writeln!(out, "{line}");
        } else {
            if tty {
                let _ = write!(out, "\x1b[H\x1b[2J");
            } else if n > 0 {
                let _ = writeln!(out);
            }
            let _ = write!(out, "{}", render::top(&status, &list, interval));
        }
        let _ = out.flush();
        before = after;
        n += 1;
    }
    Ok(())
}
