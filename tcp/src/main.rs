//! `nvmed-tcp`: serves nvmed namespaces over NVMe/TCP to standard initiators.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use nvmed_tcp::{Config, ConfigFile, HostAccess, Target};
use tracing::{error, info, warn};

/// An NVMe/TCP target (NVMe over Fabrics, TCP transport) in front of the nvmed broker.
///
/// Each host controller (admin queue connection) opens its own nvmed session; each of its I/O
/// queue connections gets its own ring with one buffer registered once, so data moves socket ->
/// registered buffer -> device with no other copy. Which host may use which namespace is decided
/// by host NQN (--allow-host, --allow-any-host, --config); nvmed's grants to this process's
/// uid still apply underneath.
///
/// Connect from a Linux host: nvme connect -t tcp -a ADDR -s 4420 -n NQN (or write
/// "transport=tcp,traddr=ADDR,trsvcid=4420,nqn=NQN,hostnqn=HOSTNQN" to /dev/nvme-fabrics).
/// Discovery (`nvme discover -t tcp -a ADDR -s 4420`, or -s 8009 with --discovery-listen)
/// answers with this subsystem for the hosts allowed to use it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Address to listen on (hosts may also ask it for the discovery log).
    #[arg(long, default_value = "127.0.0.1:4420")]
    listen: SocketAddr,
    /// Also listen here for discovery only, e.g. 0.0.0.0:8009 (the well-known discovery port):
    /// `nvme discover -t tcp -a ADDR -s 8009` then lists this subsystem to the hosts allowed.
    #[arg(long, value_name = "ADDR")]
    discovery_listen: Option<SocketAddr>,
    /// The nvmed broker's socket.
    #[arg(long, default_value = "/run/nvmed.sock")]
    nvmed: PathBuf,
    /// The subsystem NQN hosts connect to.
    #[arg(long)]
    subsystem: String,
    /// A host NQN allowed to use every exported namespace, read-write (repeatable).
    #[arg(long = "allow-host", value_name = "HOSTNQN")]
    allow_host: Vec<String>,
    /// A host NQN allowed to use every exported namespace, read-only (repeatable).
    #[arg(long = "allow-host-read-only", value_name = "HOSTNQN")]
    allow_host_ro: Vec<String>,
    /// Let any host NQN connect (read-write): for trusted networks only.
    #[arg(long)]
    allow_any_host: bool,
    /// Export only these nvmed namespace ids (repeatable; default: all nvmed grants).
    #[arg(long = "namespace", value_name = "NSID")]
    namespaces: Vec<u32>,
    /// A TOML file of [[host]] entries: nqn, namespaces (optional list), read_only (optional).
    #[arg(long)]
    config: Option<PathBuf>,
    /// I/O queue entries offered (each entry holds a --max-transfer buffer slot).
    #[arg(long, default_value_t = 128)]
    queue_size: u16,
    /// Largest transfer per command in bytes (MDTS; a power of two).
    #[arg(long, default_value_t = 128 << 10)]
    max_transfer: u32,
    /// In-capsule data accepted with I/O commands, bytes (smaller writes skip the R2T round trip).
    #[arg(long, default_value_t = 8192)]
    in_capsule: u32,
    /// Most I/O queues per controller.
    #[arg(long, default_value_t = 16)]
    max_io_queues: u16,
    /// Most TCP connections at once (each I/O queue connection holds about six file
    /// descriptors: the soft fd limit is raised to the hard one, and this is lowered to fit).
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Most TCP connections at once from one IP address (a Linux host uses one per queue: 17
    /// for a controller with 16 I/O queues).
    #[arg(long, default_value_t = 128)]
    max_connections_per_host: usize,
    /// Seconds a host may leave what is sent to it unread (and to send ICReq and Connect).
    #[arg(long, default_value_t = 30)]
    io_timeout_s: u64,
    /// Most microseconds an I/O queue polls for completions before sleeping (saves a sleep and
    /// a wakeup per I/O at low queue depth; adaptive below that: it shrinks, to none, while
    /// completions take longer; 0: never poll).
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=1000))]
    poll_us: u64,
    /// Threads serving the sockets (every connection is a task; the data moves in nvmed's I/O
    /// threads, so one is often enough, and fewer threads mean fewer cross-thread wakeups).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=256))]
    threads: u16,
    /// Seconds to wait for a restarted nvmed when it goes away (killed, crashed, upgraded):
    /// meanwhile the queues pause (hosts see latency, not errors), and the commands that were in
    /// flight are sent again to the new nvmed. After it, those commands fail with Namespace Not
    /// Ready (retryable) and the queue closes. 0: do not wait (also NVMED_RECONNECT=0).
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    reconnect_secs: u64,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// File descriptors one connection may hold: its socket, and for an I/O queue its nvmed ring's
/// doorbells, buffer and their duplicates.
const FDS_PER_CONNECTION: u64 = 6;
/// Descriptors kept for everything else (the listener, nvmed sessions, logs).
const FDS_RESERVED: u64 = 64;

/// Raises the soft limit on open files to the hard one and returns `max` lowered, if needed, so
/// that `max` connections fit in it (running out would make `accept` fail for every host).
fn fit_fd_limit(max: usize) -> usize {
    let Some(limit) = nvmed_proto::limits::raise_fd_limit() else { return max };
    let fit = (limit.saturating_sub(FDS_RESERVED) / FDS_PER_CONNECTION).max(1);
    if (max as u64) > fit {
        warn!(
            max_connections = max,
            fd_limit = limit,
            lowered_to = fit,
            "--max-connections does not fit the open-file limit: lowered"
        );
        return fit as usize;
    }
    max
}

fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let mut cfg = Config::new(args.subsystem, args.nvmed);
    if let Some(path) = &args.config {
        cfg.hosts = ConfigFile::load(path)?.hosts;
    }
    let all = |nqn: String, read_only| HostAccess { nqn, namespaces: None, read_only };
    cfg.hosts.extend(args.allow_host.into_iter().map(|n| all(n, false)));
    cfg.hosts.extend(args.allow_host_ro.into_iter().map(|n| all(n, true)));
    cfg.allow_any_host = args.allow_any_host;
    cfg.namespaces = (!args.namespaces.is_empty()).then_some(args.namespaces);
    cfg.queue_size = args.queue_size;
    cfg.max_transfer = args.max_transfer;
    cfg.in_capsule = args.in_capsule;
    cfg.max_io_queues = args.max_io_queues;
    cfg.max_connections = fit_fd_limit(args.max_connections);
    cfg.max_connections_per_host = args.max_connections_per_host;
    cfg.io_timeout = Duration::from_secs(args.io_timeout_s.max(1));
    cfg.poll = Duration::from_micros(args.poll_us);
    if args.reconnect_secs == 0 {
        cfg.reconnect = nvmed_client::Reconnect::off();
    } else {
        cfg.reconnect.budget = Duration::from_secs(args.reconnect_secs);
    }
    cfg.validate()?;
    if cfg.hosts.is_empty() && !cfg.allow_any_host {
        return Err("no host may connect: give --allow-host, --config or --allow-any-host".into());
    }
    // Check the broker is there and what it grants, once, before listening.
    let probe = nvmed_client::NvmeSession::open(&cfg.nvmed_socket)?;
    let ns: Vec<u32> = probe.namespaces().iter().map(|n| n.nsid).collect();
    drop(probe);
    // One thread: tokio's current-thread scheduler (the sockets are served on this thread, which
    // parks and wakes more cheaply than a multi-thread runtime's worker).
    let rt = if args.threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::from(args.threads))
            .enable_all()
            .build()?
    };
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let discovery = match args.discovery_listen {
            Some(a) => Some(tokio::net::TcpListener::bind(a).await?),
            None => None,
        };
        // The discovery log gives the address hosts reach the I/O controllers at.
        cfg.io_addr = Some(listener.local_addr()?);
        info!(
            listen = %listener.local_addr()?,
            discovery = ?discovery.as_ref().map(|d| d.local_addr()).transpose()?,
            subsystem = %cfg.subnqn,
            nvmed_namespaces = ?ns,
            "ready"
        );
        println!("ready");
        let target = Target::new(cfg);
        let discover = async {
            match discovery {
                Some(d) => nvmed_tcp::serve(target.clone(), d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = nvmed_tcp::serve(target.clone(), listener) => r?,
            r = discover => r?,
            _ = tokio::signal::ctrl_c() => info!("interrupted"),
            _ = sigterm() => info!("terminated"),
        }
        Ok::<_, Box<dyn std::error::Error>>(())
    })
}

async fn sigterm() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}
