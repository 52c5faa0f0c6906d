//! `nvmed-vhost`: serve an nvmed namespace to QEMU as a vhost-user-blk device.

use std::sync::atomic::AtomicU8;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use nix::sys::signal::{SigSet, Signal};
use nvmed_client::{NvmeRing, NvmeSession, RingOptions, SessionOptions};
use nvmed_vhost::backend::BlkDevice;
use nvmed_vhost::config::DiskGeometry;
use nvmed_vhost::regions::SharedRegions;
use nvmed_vhost::worker::{QueueStats, Worker, SQ_ENTRIES};
use nvmed_vhost::{Error, StatsSummary};
use vhost::vhost_user::{BackendListener, Error as VuError, Listener};

mod cli;
use cli::Args;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NVMED_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: logs redirected to a file stay plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        tracing::error!("{e}");
        std::process::exit(1);
    }
}

/// Longest wait for a dead backend's sessions to drain (nvmed resets a controller whose command
/// takes longer than its --io-timeout-ms, 30 s by default).
const DRAIN_WAIT: Duration = Duration::from_secs(60);

/// The VM's nvmed session: its guest RAM is registered there once, for every queue's ring.
/// Where the guest's write cache choice is kept: beside the vhost-user socket.
fn write_cache_file(socket: &std::path::Path) -> std::path::PathBuf {
    let mut name = socket.as_os_str().to_owned();
    name.push(".wce");
    name.into()
}

fn open_session(args: &Args) -> Result<NvmeSession, Error> {
    let opts = SessionOptions { client_name: "nvmed-vhost".into(), ..SessionOptions::default() };
    Ok(NvmeSession::open_with(&args.nvmed, opts)?)
}

/// Queue `what`'s ring of the VM's session.
fn open_ring(session: &NvmeSession, what: &str) -> Result<NvmeRing, Error> {
    let opts = RingOptions {
        sq_entries: SQ_ENTRIES,
        cq_entries: SQ_ENTRIES * 2,
        client_name: format!("nvmed-vhost {what}"),
        ..RingOptions::default()
    };
    Ok(session.new_ring_with(opts)?)
}

fn run(args: &Args) -> Result<(), Error> {
    // Signals go to one thread (the mask is inherited by every thread started after this).
    let mut sigs = SigSet::empty();
    for s in [Signal::SIGUSR1, Signal::SIGTERM, Signal::SIGINT] {
        sigs.add(s);
    }
    sigs.thread_block().map_err(|e| Error::Os { what: "blocking signals", source: e.into() })?;
    let stats: Vec<Arc<QueueStats>> = (0..args.num_queues).map(|_| Arc::default()).collect();
    let current: Current = Arc::default();
    {
        let stats = stats.clone();
        let current = current.clone();
        // nvmed's bounce counters of the connection being served, if its device is not busy.
        let refresh = move || {
            let dev = current.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Some(dev) = dev {
                if let Ok(d) = dev.try_lock() {
                    d.refresh_stats(false);
                }
            }
        };
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || loop {
                match sigs.wait() {
                    Ok(Signal::SIGUSR1) => {
                        refresh();
                        println!("{}", StatsSummary::of(&stats))
                    }
                    Ok(s) => {
                        refresh();
                        println!("{}", StatsSummary::of(&stats));
                        tracing::info!("{s}: exiting");
                        std::process::exit(0);
                    }
                    Err(e) => tracing::warn!("sigwait: {e}"),
                }
            })
            .map_err(|e| Error::Os { what: "starting the signal thread", source: e })?;
    }

    let probe = open_session(args)?;
    let ns =
        *probe.namespaces().iter().find(|n| n.nsid == args.namespace).ok_or_else(|| Error::NoNamespace {
            nsid: args.namespace,
            offered: probe.namespaces().iter().map(|n| n.nsid).collect(),
        })?;
    drop(probe);
    if !ns.lba_size.is_power_of_two() || !(512..=65536).contains(&ns.lba_size) {
        return Err(Error::LbaSize(ns.lba_size));
    }
    let geo = DiskGeometry::new(&ns, args.num_queues, args.read_only);
    tracing::info!(
        nsid = geo.nsid,
        bytes = geo.size,
        lba = geo.lba_size,
        seg_max = geo.seg_max,
        size_max = geo.size_max,
        read_only = geo.read_only,
        queues = geo.num_queues,
        "serving nvmed namespace"
    );

    let mut listener = Listener::new(&args.socket, true)
        .map_err(|e| Error::VhostUser(format!("listening on {}: {e}", args.socket.display())))?;
    loop {
        match serve_one(args, geo, &stats, &current, &mut listener) {
            Ok(()) => println!("{}", StatsSummary::of(&stats)),
            // nvmed restarting, a previous backend's I/O still draining, an accept that failed:
            // this attempt ends, the backend stays for QEMU's next connection (reconnect=1).
            Err(e) => {
                tracing::error!("{e}; trying again in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// The device of the connection being served, for the signal thread's stats line.
type Current = Arc<Mutex<Option<Arc<Mutex<BlkDevice>>>>>;

/// Serves one frontend connection, from accept to disconnect.
fn serve_one(
    args: &Args,
    geo: DiskGeometry,
    stats: &[Arc<QueueStats>],
    current: &Current,
    listener: &mut Listener,
) -> Result<(), Error> {
    // A fresh nvmed session per connection (one for all queues, each its own ring): the
    // previous guest's RAM is unregistered with the previous one.
    let session = open_session(args)?;
    // A backend killed before us may have left requests at the device, which this process
    // resubmits from the inflight region: let nvmed finish them first, so an old copy can
    // never land after its resubmitted one.
    match session.await_drained(DRAIN_WAIT) {
        Ok(0) => {}
        Ok(n) => tracing::info!(sessions = n, "waited for a previous backend's I/O to drain"),
        // Resubmitting now could let an old copy land after its new one (and after newer
        // writes to the same blocks): this connection is not served; the next attempt waits again.
        Err(e) => {
            return Err(Error::VhostUser(format!(
                "a previous backend's I/O may still be at the device ({e}); not serving until it drained"
            )))
        }
    }
    let wce = Arc::new(AtomicU8::new(1));
    let regions = SharedRegions::default();
    let mut workers = Vec::new();
    for (i, s) in stats.iter().enumerate() {
        let ring = open_ring(&session, &format!("queue {i}"))?;
        workers.push(Worker::new(i, ring, regions.clone(), geo, wce.clone(), s.clone())?);
    }
    drop(session);
    let threads = args.queue_threads.map_or(0, usize::from);
    let mut device = BlkDevice::new(geo, workers, wce, Duration::from_micros(args.poll_us), threads)
        .map_err(|e| Error::Os { what: "starting the queue threads", source: e })?;
    device.persist_write_cache(write_cache_file(&args.socket));
    let device = Arc::new(Mutex::new(device));
    *current.lock().unwrap_or_else(|p| p.into_inner()) = Some(device.clone());
    tracing::info!(socket = %args.socket.display(), "waiting for QEMU");
    let mut backend_listener = BackendListener::new(listener, device.clone())
        .map_err(|e| Error::VhostUser(format!("listening: {e}")))?;
    let mut conn = loop {
        match backend_listener.accept() {
            Ok(Some(conn)) => break conn,
            Ok(None) => continue,
            Err(e) => return Err(Error::VhostUser(format!("accepting a connection: {e}"))),
        }
    };
    tracing::info!("QEMU connected");
    let end = loop {
        if let Err(e) = conn.handle_request() {
            break e;
        }
    };
    match end {
        VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_) => {
            tracing::info!("QEMU disconnected")
        }
        // A malformed message, or a request the device refused (e.g. guest RAM that is not a
        // sealed memfd): the connection is closed, the reason logged, the next one accepted.
        e => tracing::error!("connection closed: {e}"),
    }
    drop(conn);
    // Whatever the guest had in flight completes before its RAM is let go.
    device.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    *current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    Ok(())
}
