//! `nvmed-tcp`: serves nvmed namespaces over NVMe/TCP to standard initiators.

mod cli;

use std::time::Duration;

use clap::Parser;
use cli::Args;
use nvmed_tcp::{Config, ConfigFile, HostAccess, Target};
use tracing::{error, info, warn};

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NVMED_LOG").unwrap_or_else(|_| "info".into()),
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
    cfg.max_controllers_per_host = args.max_controllers_per_host as usize;
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
                Some(d) => nvmed_tcp::serve_discovery(target.clone(), d).await,
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
