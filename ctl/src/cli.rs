//! nvmectl's command line: the subcommands and options `nvmectl --help` shows. A module of its
//! own so that `nvmed-pkg` (pkg/) can build the man page and the shell completions from it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use nvmectl::DEFAULT_ADMIN_SOCKET;

/// nvmectl shows what a running nvmed broker is doing and lets an operator end a client's
/// session. It talks to the broker's admin socket, which only root, the user nvmed runs as and
/// members of nvmed's --admin-group may use (nvmed's user owns the socket file: mode 0600, or
/// 0660 with its group set to the --admin-group).
///
/// Examples:
///
///   nvmectl status                 controllers, namespaces, I/O threads, totals
///   nvmectl sessions               who is connected, with IOPS and MB/s over 1 s
///   nvmectl top                    the same, refreshed every second (Ctrl-C to quit)
///   nvmectl kill 12                end session 12 as if its client had disconnected
///   nvmectl kill 12 --pid 4242     the same, only if session 12 is still pid 4242's
///   nvmectl health                 each controller's SMART / health data
///   nvmectl reset 0                reset controller 0 (clients see a pause, no error)
///   nvmectl reload                 put the grants of nvmed's configuration in force now
///   nvmectl limits                 the grants and their limits
///   nvmectl limits 1000 1 iops=5k  change uid 1000's limits on namespace 1 now
///   nvmectl status --json | jq .   machine-readable output
///
/// If nvmed runs with --socket /tmp/nvmed.sock, its admin socket is /tmp/nvmed-admin.sock:
///
///   nvmectl --admin-socket /tmp/nvmed-admin.sock status
///
/// Exit status: 0 done; 1 the broker refused the request (unknown session or grant, bad
/// limits, a configuration that does not parse); 2 `health` found a controller in trouble;
/// 3 no answer from the broker (not running, permission denied, busy, timed out). With --json,
/// errors are printed on stderr as one JSON object: {"error": KIND, "message": TEXT, "exit": N}.
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment)]
pub(crate) struct Cli {
    /// The broker's admin socket (nvmed --admin-socket).
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    pub(crate) admin_socket: PathBuf,

    /// Print the broker's answer as JSON instead of a table (errors as JSON on stderr).
    #[arg(long, global = true)]
    pub(crate) json: bool,

    /// Seconds to wait for the broker to accept the connection and to answer each request
    /// [default: 30; 120 for kill, which waits for the session's I/O to drain].
    #[arg(long, global = true, value_name = "SECONDS", value_parser = parse_timeout)]
    pub(crate) timeout: Option<f64>,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Broker overview: controllers, namespaces, I/O threads, totals
    ///
    /// Version and uptime, each controller (model, serial, firmware, queue size, state), the
    /// namespaces (broker-wide id, controller, size), the I/O threads and queue depth, the
    /// sessions, the totals of the live sessions and the registered memory.
    Status,
    /// Connected clients, with IOPS and MB/s
    ///
    /// One line per live session: id, uid, pid, command, client name, rings, registered
    /// buffers and bytes, requests in flight, IOPS and MB/s measured over --interval, errors,
    /// the share of the interval its requests were held by rate limits (THROTTLED), and age.
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
    ///
    /// Session ids start again at 1 when nvmed restarts: an id read before a restart may name
    /// another client's session after it. --pid / --uid make the kill refuse (exit status 1,
    /// nothing ended) unless the session still belongs to that process / user; scripts should
    /// pass them.
    Kill {
        /// The session id (the ID column of `nvmectl sessions`).
        session: u64,
        /// Only if the session's client is this process (the PID column).
        #[arg(long, value_name = "PID")]
        pid: Option<i32>,
        /// Only if the session's client runs as this uid (the UID column).
        #[arg(long, value_name = "UID")]
        uid: Option<u32>,
    },
    /// Each controller's SMART / health data
    ///
    /// The SMART / Health Information log page: critical warnings, temperature, spare, wear,
    /// data read and written, power-on hours, unsafe shutdowns, media errors. Exits with status
    /// 2 (after printing) if a controller's log could not be read (failed or gone controller,
    /// or reads paused after one it did not answer) or reports a critical warning.
    Health,
    /// Reset a controller now (as `nvme reset /dev/nvmeX` does)
    ///
    /// Its I/O queues stop, the controller is disabled and enabled again, and nvmed's I/O
    /// threads create their queues again and send the commands that were in flight again:
    /// clients see a pause, not an error (a command that already used all its tries fails
    /// with DeviceReset). Returns once the controller is back. For a controller that stopped
    /// answering, or an I/O queue that could not be created after an earlier reset. A failed or
    /// removed controller cannot be reset (exit status 1); one that did not come back from the
    /// reset exits with status 2.
    Reset {
        /// The controller's index (the # column of `nvmectl status`).
        controller: u16,
    },
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

fn parse_timeout(s: &str) -> Result<f64, String> {
    parse_secs(s).and_then(|v| if v >= 0.001 { Ok(v) } else { Err("the timeout must be above 0".into()) })
}

fn parse_positive_secs(s: &str) -> Result<f64, String> {
    parse_secs(s)
        .and_then(|v| if v >= 0.05 { Ok(v) } else { Err("the interval must be at least 0.05 s".into()) })
}
