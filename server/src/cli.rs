//! nvmed's command line: the options `nvmed --help` shows. A module of its own so that
//! `nvmed-pkg` (pkg/) can build the man page and the shell completions from the same definition.

use std::path::PathBuf;

use clap::Parser;
use nvmed_server::cpus::{parse_cpu_list, CpuList};
use nvmed_server::emulator::inject::FaultRule;
use nvmed_server::emulator::model::ModelSpec;
use nvmed_server::emulator::Wedge;
use nvmed_server::policy::{DefaultAccess, Grant};

/// nvmed owns an NVMe controller and serves it to unprivileged processes through
/// shared-memory rings: clients register memfd buffers once and the device DMAs straight
/// into them, with no syscall per I/O.
///
/// Without hardware, start it on the built-in emulated controller:
///
///   nvmed --emulate --socket /tmp/nvmed.sock
///
/// On a real controller bound to vfio-pci (see the README for binding):
///
///   nvmed --pci 0000:01:00.0 --socket /run/nvmed.sock --socket-mode 666
///
/// then run a client, e.g. `cargo run --example quickstart -- /tmp/nvmed.sock`.
///
/// Every option can also come from a TOML file given with --config, keyed by the long option
/// name (pci = "0000:01:00.0", socket-mode = "660", grant = ["1000:1"], no-interrupts = true);
/// options on the command line win. SIGHUP (or `nvmectl reload`) reads the file again and puts
/// its grants and limits in force without dropping connected sessions (a session that lost a
/// namespace is ended once its I/O drains); a file that does not parse, or whose grants name a
/// namespace nvmed does not serve or give one uid a namespace twice, is refused with the reason
/// and the grants in force stay (at start: nvmed exits with the reason).
#[derive(Debug, Parser)]
#[command(version, verbatim_doc_comment, args_override_self = true)]
#[command(group(clap::ArgGroup::new("device").required(true).args(["emulate", "pci"])))]
pub(crate) struct Args {
    /// Read options from this TOML file (command-line options override it).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,

    /// Serve the built-in emulated NVMe controller (no hardware needed).
    #[arg(long)]
    pub(crate) emulate: bool,

    /// Serve the NVMe controller at this PCI address (bound to vfio-pci), e.g. 0000:01:00.0.
    /// Give it several times to serve several controllers from one broker: their namespaces
    /// get broker-wide ids in that order (controller 0's first), and every I/O thread gets a
    /// queue on each.
    #[arg(long, value_name = "BDF")]
    pub(crate) pci: Vec<String>,

    /// With --emulate: this many emulated controllers, each with --namespaces namespaces.
    #[arg(long, default_value_t = 1, requires = "emulate", value_parser = clap::value_parser!(u16).range(1..=8))]
    pub(crate) controllers: u16,

    /// Unix socket clients connect to.
    #[arg(long, default_value = "/run/nvmed.sock")]
    pub(crate) socket: PathBuf,

    /// Permission bits of the socket file (octal), e.g. 666 to let every user in.
    #[arg(long, default_value = "660", value_parser = parse_octal)]
    pub(crate) socket_mode: u32,

    /// Group that owns the socket file (with --socket-mode 660, its members may connect).
    #[arg(long, value_name = "GROUP")]
    pub(crate) socket_group: Option<String>,

    /// Unix socket for operators (`nvmectl`: status, sessions, kill, health) [default: beside
    /// --socket, its name with -admin added: /run/nvmed-admin.sock for /run/nvmed.sock]. Mode
    /// 0600; only root (and the uid nvmed runs as) may use it, unless --admin-group is given.
    #[arg(long, value_name = "PATH")]
    pub(crate) admin_socket: Option<PathBuf>,

    /// Members of this group may use the admin socket too (it is then mode 0660, owned by
    /// the group); the broker checks every peer's groups as well.
    #[arg(long, value_name = "GROUP")]
    pub(crate) admin_group: Option<String>,

    /// Serve Prometheus metrics over HTTP at this address: GET /metrics answers the OpenMetrics
    /// text format (per session and per uid I/O counters and bytes, in-flight requests, each QoS
    /// tenant's dispatched requests and throttled time, I/O thread and device queue figures,
    /// registered bytes, SMART health read at most every 5 s). E.g. 127.0.0.1:9464; port 0
    /// picks a free port (printed on the ready line). It shows every tenant's figures, uids and
    /// client names, which sessions do not see of each other: without --metrics-token-file any
    /// process that can connect (on loopback, every local user) reads them.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,

    /// A file holding a token the metrics endpoint requires (`Authorization: Bearer TOKEN`, as
    /// Prometheus sends with `authorization: {credentials_file: ...}`); others get 401. Read at
    /// start; keep it readable by root only.
    #[arg(long, value_name = "PATH")]
    pub(crate) metrics_token_file: Option<std::path::PathBuf>,

    /// Most bytes one session may register (pinned memory with VFIO; suffixes K, M, G, T).
    #[arg(long, default_value = "4G", value_parser = parse_size)]
    pub(crate) max_registered_bytes: u64,

    /// Most bytes all sessions together may register.
    #[arg(long, default_value = "16G", value_parser = parse_size)]
    pub(crate) max_registered_total: u64,

    /// Most bytes the sessions of one uid may register together, so that one tenant cannot take
    /// all of --max-registered-total [default: three quarters of it, more than the quarter of
    /// the other per-uid limits: VMs and NVMe/TCP targets often share one uid, and nvmed-vhost
    /// registers guest RAM once per VM].
    #[arg(long, value_parser = parse_size)]
    pub(crate) max_registered_bytes_per_uid: Option<u64>,

    /// Emulated namespace size in bytes (suffixes K, M, G allowed).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub(crate) size: u64,

    /// Keep the emulated namespace in this file (created if missing) instead of in memory,
    /// so data survives a restart.
    #[arg(long, value_name = "FILE", conflicts_with = "null")]
    pub(crate) backing: Option<PathBuf>,

    /// Emulated namespace that stores nothing: I/O completes at once (like null_blk), to
    /// measure the broker's own cost.
    #[arg(long)]
    pub(crate) null: bool,

    /// Number of emulated namespaces, each of --size bytes (with --backing FILE, namespace N
    /// above 1 lives in FILE.nsN, and those of controller C above 0 in FILE.cC, FILE.cC.nsN).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub(crate) namespaces: u32,

    /// Emulated LBA size in bytes (512 or 4096).
    #[arg(long, default_value_t = 512, value_parser = parse_lba_size)]
    pub(crate) lba_size: u32,

    /// Emulated MDTS: largest transfer is 4 KiB << MDTS.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u8).range(1..=9))]
    pub(crate) mdts: u8,

    /// How the emulated controller runs I/O commands. `sync` is the fastest device there is;
    /// `async` behaves like real hardware, to test how the broker copes with a device that
    /// takes its time (a full device queue, data still moving after submission, completions out
    /// of order, a reset with commands in flight). [default: sync; async with --model]
    #[arg(long, value_enum, value_name = "MODE")]
    pub(crate) emulator_mode: Option<ModeArg>,

    /// With --emulator-mode async: least time in microseconds from fetching a command to
    /// completing it, data transfer included (default 0: as soon as the controller thread gets
    /// to it).
    #[arg(long, value_name = "MICROS")]
    pub(crate) emulator_latency_us: Option<u64>,

    /// Give the emulated controller the speed of a real SSD instead of an infinitely fast one:
    /// commands complete after a modelled service time, so queues build up (and fairness between
    /// clients shows). Implies --emulator-mode async; replaces --emulator-latency-us.
    ///
    /// SPEC is KEY=VALUE pairs separated by commas, for example
    ///
    ///   --model latency-us=80,iops=600k,read-mbps=3000,write-mbps=1500,channels=64
    ///
    /// Every key is optional; numbers take the suffixes k (1000) and m (1000000).
    ///   latency-us   media time of each read and write, in microseconds (default 0)
    ///   channels     commands the device works on at once (default: no limit)
    ///   iops         most commands started per second (default: no limit)
    ///   read-mbps    most MB/s read, MB = 10^6 bytes (default: no limit)
    ///   write-mbps   most MB/s written, a budget separate from reads' (default: no limit)
    ///
    /// A command starts when a channel is free and the caps allow it; a read or write then
    /// takes latency-us plus its size at read-mbps or write-mbps, a flush, write zeroes or
    /// deallocate 10 us. So at queue depth 1 a 4 KiB read takes latency-us + 4096 B / read-mbps,
    /// and under load the device completes at most min(iops, channels / service time,
    /// MB/s / request size) commands per second: for the iops cap to be reached, channels must
    /// be at least iops x latency (600k x 80 us = 48). nvmed logs these peaks at startup.
    #[arg(long, value_name = "SPEC", requires = "emulate", verbatim_doc_comment)]
    #[arg(conflicts_with = "emulator_latency_us")]
    pub(crate) model: Option<ModelSpec>,

    /// Entries of each device I/O queue.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u16).range(2..))]
    pub(crate) queue_depth: u16,

    /// I/O threads: each owns its own device queue pair and interrupt vector and polls the
    /// client rings placed on it (a new ring goes to the thread with the fewest). A number, or
    /// `auto` for one per CPU of --cpus (without --cpus: per CPU this process may use). The
    /// controller may grant fewer queues; nvmed then runs that many.
    #[arg(long, default_value = "1", value_name = "N|auto", value_parser = parse_io_threads)]
    pub(crate) io_threads: IoThreads,

    /// Pin the I/O threads to these CPUs, one CPU each in turn, e.g. 2-5 or 0,2,4.
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub(crate) cpus: Option<CpuList>,

    /// While several tenants have I/O at a controller, cap what they may have queued there
    /// together, in KiB of transfer (shared by weight; each always may have one request
    /// there). On a device that serves in order this bounds how long a light tenant's request
    /// waits behind a heavy one's queue (e.g. 512: a 4 KiB read waits behind at most about
    /// 512 KiB of others' I/O); it costs the heavy tenant throughput while they contend.
    /// Default: no cap (tenants are kept to their weight's share of queue slots only).
    #[arg(long, value_name = "KIB")]
    pub(crate) contended_queue_kib: Option<u64>,

    /// Most rings one session may have (each ring: a shared-memory mapping and two doorbell socket pairs).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub(crate) max_rings_per_session: u32,

    /// Most microseconds the I/O thread keeps polling after the last work before it sleeps, while
    /// commands are at the device (adaptive below that: it polls longer while work comes back
    /// soon after a sleep, and stops polling while the sleeps last longer than this).
    #[arg(long, default_value_t = 200)]
    pub(crate) poll_idle_us: u64,

    /// The same while no command is at the device, i.e. while the I/O thread waits for clients
    /// only (their next request may be far off: polling for it takes CPU from them).
    #[arg(long, default_value_t = 50)]
    pub(crate) poll_clients_us: u64,

    /// Milliseconds a command may stay at the device before it is aborted (NVMe Abort; the
    /// controller is reset if that does not end it, or with --no-abort). Either way the command
    /// is sent again: clients see latency, not errors, unless it runs out of --io-tries.
    #[arg(long, default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(100..))]
    pub(crate) io_timeout_ms: u64,

    /// How many times one command is sent to the device at most: after a retryable error
    /// status (Do Not Retry clear, e.g. namespace not ready; with a backoff from 1 ms, doubling)
    /// or after a controller reset. A command that fails its last try completes with its error
    /// ("aborted because the controller was reset" after a reset). 1: never retry.
    #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u8).range(1..))]
    pub(crate) io_tries: u8,

    /// Reset the controller at once when a command times out, without trying NVMe Abort first.
    #[arg(long)]
    pub(crate) no_abort: bool,

    /// Create the I/O queue without interrupts and poll it only. Saves an interrupt per
    /// command (worth it in VMs); while I/O is in flight an idle broker then looks every 1 ms.
    #[arg(long)]
    pub(crate) no_interrupts: bool,

    /// Most concurrent client sessions (the last --admin-reserve of them, and of the
    /// connections, are kept for root).
    #[arg(long, default_value_t = 64)]
    pub(crate) max_sessions: usize,

    /// Most sessions one uid may hold [default: a quarter of --max-sessions].
    #[arg(long)]
    pub(crate) max_sessions_per_uid: Option<usize>,

    /// Most connections (sessions and sockets that have not said Hello yet) [default:
    /// --max-sessions + 16].
    #[arg(long)]
    pub(crate) max_connections: Option<usize>,

    /// Most connections one uid may hold [default: a quarter of --max-connections].
    #[arg(long)]
    pub(crate) max_connections_per_uid: Option<usize>,

    /// Sessions and connections only root may use, so an operator can always connect.
    #[arg(long, default_value_t = 4)]
    pub(crate) admin_reserve: usize,

    /// Seconds a new connection has to say Hello before it is closed.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) hello_timeout_s: u64,

    /// Control requests per second one uid may send, all its connections together, after a
    /// burst of one second's worth (registering memory costs one more per 64 MiB): beyond it a
    /// request waits its turn, and one that would wait more than a second is refused
    /// (ResourceExhausted). Bounds the broker CPU a uid can take by looping on requests. 0: no
    /// limit.
    #[arg(long, default_value_t = 1000, value_name = "N")]
    pub(crate) control_rate_per_uid: u64,

    /// Most registered buffers for all clients together. Each is one memory mapping in the
    /// broker, so the default is half of vm.max_map_count, and larger values are lowered to
    /// what vm.max_map_count leaves room for.
    #[arg(long)]
    pub(crate) max_buffers: Option<u64>,

    /// Most registered buffers of one uid [default: a quarter of --max-buffers].
    #[arg(long)]
    pub(crate) max_buffers_per_uid: Option<u64>,

    /// Most rings for all clients together. Each holds two doorbell sockets in the broker, so the
    /// default is 4096 or what the open-file limit leaves room for (nvmed raises its soft limit
    /// to the hard one at start), and larger values are lowered to that.
    #[arg(long)]
    pub(crate) max_rings: Option<u64>,

    /// Most rings of one uid [default: a quarter of --max-rings].
    #[arg(long)]
    pub(crate) max_rings_per_uid: Option<u64>,

    /// Give a uid access to a namespace: UID:NSID[:FIRST_LBA+COUNT][:ro][:LIMITS]. A uid with
    /// grants sees only its granted namespaces (a window appears to it as a whole namespace).
    /// LIMITS share the device between tenants and cap them: weight=W (share of a busy device,
    /// default 1), iops=N, read-mbps=N, write-mbps=N (MB = 10^6 bytes), qd=N (requests at the
    /// device), per=uid (all its sessions together, default) or per=session; e.g.
    /// --grant 1000:1:weight=3,iops=20k,write-mbps=100. read-mbps and write-mbps count the data
    /// reads and writes move (write-mbps also what Write Zeroes zeroes); Flush and Deallocate
    /// move none and count as one request (iops, qd, share). A request held by a limit waits; it is never failed. Grants of one uid on one controller's namespaces add up (and must agree on per=). One grant per uid
    /// and namespace, and only namespaces nvmed serves (anything else is refused).
    #[arg(long = "grant", value_name = "GRANT")]
    pub(crate) grants: Vec<Grant>,

    /// Access of uids without any --grant. Default: read-write for a broker started without
    /// a grant and without --config (a development box); none as soon as there is a grant or a
    /// configuration file, so a uid left out of the grants, or revoked (grant = [] in the
    /// file), gets no namespace unless this says otherwise.
    #[arg(long, value_enum)]
    pub(crate) default_access: Option<DefaultAccess>,

    /// Testing: inject a fault into the emulated controller (repeatable): fail:N:SCT:SC (the
    /// Nth I/O command completes with that status, Do Not Retry set), retry:N (the Nth fails
    /// with Namespace Not Ready, retryable), delay:N:MILLIS (completes that much later; in async
    /// mode its data moves late too), hang:N (never completes, but an NVMe Abort ends it),
    /// stuck:N (never completes, and the controller refuses to abort it: only a reset ends it),
    /// fatal:N (the controller sets CSTS.CFS and stops), gone:N (the device disappears: its
    /// registers read as all ones), media:LBA[:NSID] (reads of that block fail with an
    /// unrecovered read error until it is written), or panic:N (the emulated controller panics
    /// on the Nth I/O command, in the thread running it: the broker's I/O thread in sync mode,
    /// the controller thread in async mode), loghang:N (the Nth Get Log Page admin command
    /// never completes: an admin queue that stops answering), sqfail:N (the Nth Create I/O
    /// Submission Queue admin command fails with Internal Error), idhang:CNS (every Identify
    /// with that CNS value never completes, e.g. idhang:6 for the I/O command set's),
    /// readyfail:N (the Nth enable, the first being the start, never sets CSTS.RDY), or
    /// shrink:N (from the Nth enable on, namespaces identify at half their size). RULE@C
    /// applies it to controller C only (of --controllers, from 0); otherwise to every one.
    #[arg(long = "inject", value_name = "RULE")]
    pub(crate) faults: Vec<FaultRule>,

    /// Testing: an emulated controller that ignores CC.EN=0 but comes back from a function-level
    /// reset (`disable`), that cannot be stopped by a reset at all (`reset`), or not even by
    /// clearing Bus Master Enable (`reset-and-bus-master`).
    #[arg(long, value_enum, default_value = "none", hide_short_help = true)]
    pub(crate) emulator_wedge: Wedge,

    /// Testing: an emulated controller without SGL support (PRPs only, as many real
    /// controllers), so vectored requests whose layout PRPs cannot describe are bounced.
    #[arg(long, hide_short_help = true)]
    pub(crate) emulator_no_sgl: bool,

    /// Testing: an emulated controller without Write Zeroes (as some controllers), so the
    /// broker refuses the command and clients write zeroes themselves.
    #[arg(long, hide_short_help = true)]
    pub(crate) emulator_no_write_zeroes: bool,

    /// Testing: the emulated controller's Write Zeroes Size Limit (WZSL: at most 2^N 4 KiB
    /// pages per command; 0 = none), so the broker must split larger Write Zeroes requests.
    #[arg(long, value_name = "N", default_value_t = 0, hide_short_help = true)]
    pub(crate) emulator_wzsl: u8,

    /// Testing: the emulated controller's Dataset Management Range Size Limit (DMRSL, LBAs
    /// per range; 0 = none), so the broker must split larger deallocations.
    #[arg(long, value_name = "LBAS", default_value_t = 0, hide_short_help = true)]
    pub(crate) emulator_dmrsl: u32,
}

/// Values of --emulator-mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum ModeArg {
    /// Each command runs inside the doorbell write, in the broker's I/O thread, in submission
    /// order, data included
    Sync,
    /// Like hardware: a controller thread ("nvme-emu-worker") fetches commands after the
    /// doorbell, moves their data only when it completes them, and completes them out of order
    /// (after --emulator-latency-us, or when --model says)
    Async,
}

/// `--io-threads`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum IoThreads {
    Count(u16),
    Auto,
}

fn parse_io_threads(s: &str) -> Result<IoThreads, String> {
    if s == "auto" {
        return Ok(IoThreads::Auto);
    }
    match s.parse::<u16>() {
        Ok(n) if (1..=256).contains(&n) => Ok(IoThreads::Count(n)),
        _ => Err("a number of I/O threads from 1 to 256, or auto".into()),
    }
}

fn parse_octal(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8).map_err(|e| format!("not an octal mode: {e}"))
}

fn parse_lba_size(s: &str) -> Result<u32, String> {
    match s.parse() {
        Ok(v @ (512 | 4096)) => Ok(v),
        _ => Err("LBA size must be 512 or 4096".into()),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        Some((i, 'T' | 't')) => (&s[..i], 1 << 40),
        _ => (s, 1),
    };
    let v: u64 = num.parse().map_err(|e| format!("bad size {s:?}: {e}"))?;
    v.checked_mul(mult).filter(|&v| v > 0).ok_or_else(|| format!("bad size {s:?}"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// README.md carries a copy of `nvmed --help` for readers: every line of the help, from its
    /// usage line on, appears there in the same order (regenerate the copy when options change).
    #[test]
    fn the_readme_copy_of_the_help_is_current() {
        let help = super::Args::command().bin_name("nvmed").render_long_help().to_string();
        let readme = include_str!("../../README.md");
        let mut rest = readme.lines().map(str::trim_end);
        let usage = help.lines().position(|l| l.starts_with("Usage: nvmed")).expect("a usage line");
        for line in help.lines().skip(usage).map(str::trim_end).filter(|l| !l.is_empty()) {
            assert!(
                rest.by_ref().any(|r| r == line),
                "README.md's copy of `nvmed --help` lacks (or misplaces) this line:\n{line}\n\
                 (paste the output of `nvmed --help` into README.md)"
            );
        }
    }
}
