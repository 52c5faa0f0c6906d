//! `nvmed`: the NVMe broker daemon.
#![allow(rustdoc::broken_intra_doc_links)] // doc comments here are --help text for clap

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nvmed_server::broker::{Broker, BrokerConfig};
use nvmed_server::device::NvmeDevice;
use nvmed_server::emulator::backend::{Backend, FileBackend, MemoryBackend, NullBackend};
use nvmed_server::emulator::model::{PerfModel, Work};
use nvmed_server::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig, EmulatorMode};
use nvmed_server::policy::{DefaultAccess, Policy};
use tracing::{error, info};

mod cli;
use cli::{Args, IoThreads, ModeArg};

/// How many I/O threads `--io-threads` and `--cpus` ask for.
fn io_thread_count(args: &Args) -> u16 {
    match (args.io_threads, &args.cpus) {
        (IoThreads::Count(n), _) => n,
        (IoThreads::Auto, Some(c)) => c.0.len().clamp(1, 256) as u16,
        (IoThreads::Auto, None) => {
            std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 256) as u16
        }
    }
}

/// The default admin socket: beside the client socket, `-admin` added to its name
/// (`/run/nvmed.sock` -> `/run/nvmed-admin.sock`), so brokers in one directory do not collide.
fn admin_socket_beside(socket: &std::path::Path) -> PathBuf {
    let stem = socket.file_stem().map_or_else(|| "nvmed".into(), |s| s.to_string_lossy().into_owned());
    let name = match socket.extension() {
        Some(ext) => format!("{stem}-admin.{}", ext.to_string_lossy()),
        None => format!("{stem}-admin"),
    };
    socket.with_file_name(name)
}

/// Turns a TOML config file into command-line arguments placed before the real ones, so clap
/// validates both the same way and the command line wins.
fn config_args(argv: &[String]) -> Result<Vec<String>, String> {
    let path = argv.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config=")
            .map(str::to_string)
            .or_else(|| (a == "--config").then(|| argv.get(i + 1).cloned()).flatten())
    });
    let Some(path) = path else { return Ok(Vec::new()) };
    let text = std::fs::read_to_string(&path).map_err(|e| format!("config {path}: {e}"))?;
    let table: toml::Table = text.parse().map_err(|e| format!("config {path}: {e}"))?;
    let mut out = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            toml::Value::Float(f) => Ok(f.to_string()),
            other => Err(format!("config {path}: {key} = {other} is not a string or number")),
        };
        match &value {
            toml::Value::Boolean(true) => out.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    out.push(flag.clone());
                    out.push(scalar(item)?);
                }
            }
            v => {
                out.push(flag);
                out.push(scalar(v)?);
            }
        }
    }
    Ok(out)
}

fn main() {
    // Before any thread exists (it edits the environment).
    let activated = match nvmed_server::activation::take_listener() {
        Ok(l) => l,
        Err(e) => {
            eprintln!("nvmed: {e}");
            std::process::exit(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NVMED_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // A panic in any thread (the I/O thread, a client's control thread, the reaper) leaves the
    // broker's state unknown: stop the whole process so a service manager restarts it, instead
    // of serving "I/O thread stopped" forever. (Release builds also use panic = "abort".)
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        tracing::error!("a broker thread panicked ({info}); aborting so that nvmed is restarted cleanly");
        std::process::abort();
    }));
    let argv: Vec<String> = std::env::args().collect();
    let from_config = match config_args(&argv) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nvmed: {e}");
            std::process::exit(2);
        }
    };
    let args = Args::parse_from(argv.iter().take(1).chain(&from_config).chain(argv.iter().skip(1)));
    if let Err(e) = run(args, argv, activated) {
        error!("{e}");
        eprintln!("nvmed: {e}");
        std::process::exit(1);
    }
}

fn emulated(args: &Args, controller: u16) -> Result<Arc<dyn NvmeDevice>, Box<dyn std::error::Error>> {
    if let Some(f) = args.faults.iter().find(|f| f.controller.is_some_and(|c| c >= args.controllers)) {
        return Err(format!(
            "a fault rule names controller {} but there are {} (--controllers; numbered from 0)",
            f.controller.unwrap_or_default(),
            args.controllers
        )
        .into());
    }
    if !args.size.is_multiple_of(u64::from(args.lba_size)) {
        return Err(format!("--size must be a multiple of the LBA size {}", args.lba_size).into());
    }
    let mut namespaces = Vec::new();
    for n in 1..=args.namespaces {
        let backend: Box<dyn Backend> = match (&args.backing, args.null) {
            // Namespace 1 in FILE, namespace N in FILE.nsN (FILE.cC... for controller C > 0).
            (Some(path), _) => {
                let mut p = path.clone().into_os_string();
                if controller > 0 {
                    p.push(format!(".c{controller}"));
                }
                if n > 1 {
                    p.push(format!(".ns{n}"));
                }
                Box::new(FileBackend::open(std::path::Path::new(&p), Some(args.size))?)
            }
            (None, true) => Box::new(NullBackend::new(args.size)),
            (None, false) => Box::new(MemoryBackend::new(args.size)?),
        };
        namespaces.push(EmulatedNamespace { backend, lba_size: args.lba_size });
    }
    // --model implies async mode (and clap refuses it with --emulator-latency-us).
    let mode_arg =
        args.emulator_mode.unwrap_or(if args.model.is_some() { ModeArg::Async } else { ModeArg::Sync });
    let mode = match (mode_arg, args.emulator_latency_us) {
        (ModeArg::Sync, _) if args.model.is_some() => {
            return Err("--model needs --emulator-mode async (the modelled device completes commands from \
                        its own thread); leave --emulator-mode out or set it to async"
                .into());
        }
        (ModeArg::Sync, None) => EmulatorMode::Sync,
        (ModeArg::Sync, Some(_)) => {
            return Err("--emulator-latency-us needs --emulator-mode async".into());
        }
        (ModeArg::Async, us) => EmulatorMode::Async { latency: Duration::from_micros(us.unwrap_or(0)) },
    };
    if let (Some(spec), 0) = (args.model, controller) {
        let m = PerfModel::new(spec);
        let mbps = |w, bytes: u64| m.peak_rate(w) * bytes as f64 / 1e6;
        info!(
            "performance model {spec}: 4 KiB reads take {:?} at queue depth 1 and peak at {:.0} IOPS; \
             128 KiB reads peak at {:.0} MB/s, 128 KiB writes at {:.0} MB/s",
            m.service_time(Work::Read(4096)),
            m.peak_rate(Work::Read(4096)),
            mbps(Work::Read(128 << 10), 128 << 10),
            mbps(Work::Write(128 << 10), 128 << 10),
        );
    }
    info!(
        namespaces = args.namespaces,
        size = args.size,
        lba_size = args.lba_size,
        backing = ?args.backing,
        null = args.null,
        faults = args.faults.len(),
        ?mode,
        "starting on the emulated controller"
    );
    Ok(Arc::new(EmulatedController::new(EmulatorConfig {
        namespaces,
        mdts: args.mdts,
        // The admin queue's, and one per I/O thread.
        vectors: io_thread_count(args) + 1,
        faults: args
            .faults
            .iter()
            .filter(|f| f.controller.is_none_or(|c| c == controller))
            .copied()
            .collect(),
        wedge: args.emulator_wedge,
        mode,
        sgl: !args.emulator_no_sgl,
        wzsl: args.emulator_wzsl,
        no_write_zeroes: args.emulator_no_write_zeroes,
        dmrsl: args.emulator_dmrsl,
        instance: controller,
        model: args.model,
        ..EmulatorConfig::default()
    })?))
}

/// The grants of the command line and configuration file as they read now (for a reload:
/// other options changed in the file take effect at the next start).
fn read_policy(argv: &[String]) -> Result<Policy, String> {
    let from_config = config_args(argv)?;
    let args = Args::try_parse_from(argv.iter().take(1).chain(&from_config).chain(argv.iter().skip(1)))
        .map_err(|e| e.to_string().lines().next().unwrap_or("bad options").to_string())?;
    Ok(policy_of(&args))
}

/// The access rules, with `--default-access` when given; else read-write only for a broker
/// started from the command line without a grant (a development box), and none as soon as
/// there is a grant or a configuration file (with or without grants: `grant = []` revokes
/// everyone, also after a restart).
fn policy_of(args: &Args) -> Policy {
    let configured = !args.grants.is_empty() || args.config.is_some();
    let default = args.default_access.unwrap_or(if configured {
        DefaultAccess::None
    } else {
        DefaultAccess::ReadWrite
    });
    Policy { grants: args.grants.clone(), default }
}

fn run(
    args: Args,
    argv: Vec<String>,
    activated: Option<std::os::fd::OwnedFd>,
) -> Result<(), Box<dyn std::error::Error>> {
    // Block SIGINT/SIGTERM before any thread starts, so only sigwait below sees them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGHUP);
    signals.thread_block()?;

    let mut devices: Vec<Arc<dyn NvmeDevice>> = Vec::new();
    for bdf in &args.pci {
        info!(bdf, "starting on a VFIO device");
        // The admin queue's vector and one per I/O thread (fewer if the device has fewer).
        devices.push(Arc::new(nvmed_server::device::vfio::VfioNvme::open(bdf, io_thread_count(&args) + 1)?));
    }
    if args.emulate {
        for c in 0..args.controllers {
            devices.push(emulated(&args, c)?);
        }
    }
    let mut config = BrokerConfig::new(&args.socket);
    config.listener = activated.map(Arc::new);
    config.socket_mode = args.socket_mode;
    config.socket_group = args.socket_group.clone();
    config.admin_socket =
        Some(args.admin_socket.clone().unwrap_or_else(|| admin_socket_beside(&args.socket)));
    config.admin_group = args.admin_group.clone();
    config.metrics_listen = args.metrics_listen;
    if let Some(path) = &args.metrics_token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the metrics token {}: {e}", path.display()))?;
        let token = token.trim();
        if token.is_empty() || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("the metrics token in {} must be one word", path.display()).into());
        }
        config.metrics_token = Some(token.to_string());
    }
    config.max_buffer_bytes_per_session = args.max_registered_bytes;
    config.max_buffer_bytes_total = args.max_registered_total;
    config.max_sessions = args.max_sessions;
    let fd_limit = nvmed_server::broker::raise_fd_limit();
    tracing::debug!(fd_limit, "open-file limit");
    config.quotas = nvmed_server::broker::QuotaSettings::derive(&nvmed_server::broker::QuotaRequest {
        max_sessions: args.max_sessions,
        sessions_per_uid: args.max_sessions_per_uid,
        max_connections: args.max_connections,
        connections_per_uid: args.max_connections_per_uid,
        admin_reserve: args.admin_reserve,
        max_buffers: args.max_buffers,
        buffers_per_uid: args.max_buffers_per_uid,
        max_rings: args.max_rings,
        rings_per_uid: args.max_rings_per_uid,
        // Three quarters of the total unless asked otherwise: one uid never takes it all, and
        // VMs (nvmed-vhost registers guest RAM once per queue) and nvmed-tcp, which often run
        // under one uid, still get most of it. One at the total or above is none of its own
        // (the broker-wide limit answers first).
        registered_bytes_per_uid: Some(match args.max_registered_bytes_per_uid {
            Some(n) if n < args.max_registered_total => n,
            Some(_) => u64::MAX,
            None => args.max_registered_total / 4 * 3,
        }),
    });
    config.hello_timeout = Duration::from_secs(args.hello_timeout_s);
    config.control_rate_per_uid = args.control_rate_per_uid;
    config.io_queue_depth = args.queue_depth;
    config.poll_idle = Duration::from_micros(args.poll_idle_us);
    config.poll_clients = Duration::from_micros(args.poll_clients_us);
    config.io_timeout = Duration::from_millis(args.io_timeout_ms);
    config.io_tries = args.io_tries;
    config.aborts = !args.no_abort;
    config.interrupts = !args.no_interrupts;
    config.io_threads = io_thread_count(&args);
    config.cpus = args.cpus.clone().map(|c| c.0).unwrap_or_default();
    config.max_rings_per_session = args.max_rings_per_session;
    // In the scheduler's cost units (512 bytes of transfer).
    config.contended_cost = args.contended_queue_kib.map_or(u64::MAX, |k| k.saturating_mul(2).max(1));
    config.policy = policy_of(&args);
    let broker = Broker::start_many(devices, config)?;
    broker.set_reloader(Box::new(move || read_policy(&argv)));
    match broker.metrics_addr() {
        Some(addr) => {
            println!("nvmed: ready on {}, metrics on http://{addr}/metrics", broker.socket().display())
        }
        None => println!("nvmed: ready on {}", broker.socket().display()),
    }
    let sig = loop {
        match signals.wait()? {
            // SIGHUP: the grants and limits of the configuration as it reads now.
            Signal::SIGHUP => match broker.reload_from_source() {
                Ok(r) => info!(updated = r.updated, ended = r.ended, "SIGHUP: grants reloaded"),
                Err(e) => error!("SIGHUP: reload refused, the previous grants stay in force: {e}"),
            },
            sig => break sig,
        }
    };
    info!(signal = ?sig, "shutting down");
    broker.shutdown()?;
    info!("clean shutdown");
    Ok(())
}
