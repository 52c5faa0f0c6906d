//! The metrics endpoint: `--metrics-listen ADDR` serves `GET /metrics` in the OpenMetrics text
//! format (which Prometheus scrapes), encoded by the `prometheus-client` crate.
//!
//! Everything is gathered when a scrape comes, from what the broker keeps anyway: the
//! live-session registry (each session's rings' counters, read with relaxed loads as `nvmectl`
//! does, and what ended sessions did), each I/O thread's counters, the IOVA allocator's
//! registered bytes, and the quotas. Nothing is added to the I/O path: no lock and no shared
//! write per I/O. Two things need more:
//!
//! * **The QoS schedulers' figures** (per tenant: dispatched requests, time held by a limit,
//!   requests in flight) and each device queue's commands in flight live inside each I/O
//!   thread. A scrape asks each thread for them over its control channel
//!   (`IoRequest::Sample`), as the control threads ask for everything else, and keeps the
//!   answer for [`SAMPLE_MAX_AGE`], so however often scrapes come an I/O thread answers at
//!   most 10 of these a second (a control request costs it a channel receive, never a wait).
//!   A thread that does not answer within [`SAMPLE_WAIT`] keeps its previous figures.
//! * **SMART / health** is read through each controller's admin queue, by a thread of its own
//!   (`nvmed-metrics-health`): once at start, then only when a scrape finds the reading older
//!   than [`HEALTH_MAX_AGE`]. A scrape never waits for the admin queue (nor for a controller
//!   reset holding it); a scrape storm reads the log page at most once per [`HEALTH_MAX_AGE`].
//!
//! # The HTTP server
//!
//! One blocking endpoint, a few scrapes a minute: a dedicated thread (`nvmed-metrics`) with a
//! std `TcpListener` and `poll(2)` over non-blocking sockets is enough, and keeps an async
//! runtime out of a broker whose threads are all plain threads. It is bounded: at most
//! [`MAX_CONNECTIONS`] connections are kept (a new one evicts the oldest whose request is not
//! whole yet, so connections that send little or nothing cannot lock scrapes out; one being
//! answered is kept), a request must arrive whole within [`REQUEST_DEADLINE`]
//! and fit in [`MAX_REQUEST`] bytes (431 otherwise), and the answer is written without blocking
//! (a client that does not read it is dropped at the deadline). Each connection gets one answer
//! (`Connection: close`). `GET` or `HEAD /metrics` is answered 200, another path 404, another
//! method 405, anything unparsable 400.

use std::collections::{BTreeMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nvmed_proto::admin::{SmartLog, Totals, SMART_DATA_UNIT};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use tracing::{debug, info, warn};

use super::io_thread::IoRequest;
use super::manager::DeviceState;
use super::quota::Resource;
use super::registry::add;
use super::tenant::TenantKey;
use super::Shared;

/// Content type of the answer: the OpenMetrics text format, as `prometheus-client` encodes it.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Most connections kept at once; one more evicts the oldest.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request (request line and headers) read; a larger one is answered 431.
pub const MAX_REQUEST: usize = 8 << 10;
/// Time a connection has to send its request and read the answer.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(5);
/// A health reading older than this is refreshed (in the background) when a scrape comes.
pub const HEALTH_MAX_AGE: Duration = Duration::from_secs(5);
/// The I/O threads' scheduler figures are asked for again only after this long.
pub const SAMPLE_MAX_AGE: Duration = Duration::from_millis(100);
/// How long a scrape waits for an I/O thread's figures.
pub const SAMPLE_WAIT: Duration = Duration::from_millis(200);
/// Longest the server thread sleeps before it looks at the stop flag and the deadlines.
const TICK: Duration = Duration::from_millis(100);

/// One tenant's figures in one I/O thread's scheduler on one controller.
#[derive(Debug, Clone, Copy)]
pub struct TenantSample {
    /// The tenant (uid or session, and the controller).
    pub key: TenantKey,
    /// Requests dispatched to the device.
    pub dispatched: u64,
    /// Bytes of the reads dispatched.
    pub read_bytes: u64,
    /// Bytes of the writes dispatched.
    pub write_bytes: u64,
    /// Time its requests were held by its limits (holds that ended).
    pub throttled_ns: u64,
    /// Its requests in flight.
    pub in_flight: u32,
}

/// What an I/O thread answers to a sample request (`IoRequest::Sample`).
#[derive(Debug, Clone, Default)]
pub struct ThreadSample {
    /// The tenants of its rings, on each controller.
    pub tenants: Vec<TenantSample>,
    /// Commands in flight on its queue of each controller (by controller index).
    pub queue_in_flight: Vec<u64>,
}

/// An HTTP request the server does not answer with metrics.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
enum HttpError {
    #[error("malformed request")]
    BadRequest,
    #[error("no such path: {0}")]
    NotFound(String),
    #[error("method {0} not allowed")]
    Method(String),
    #[error("request larger than {MAX_REQUEST} bytes")]
    TooLarge,
    #[error("a bearer token is required (Authorization: Bearer ...)")]
    Unauthorized,
}

impl HttpError {
    fn status(&self) -> &'static str {
        match self {
            HttpError::BadRequest => "400 Bad Request",
            HttpError::NotFound(_) => "404 Not Found",
            HttpError::Method(_) => "405 Method Not Allowed",
            HttpError::TooLarge => "431 Request Header Fields Too Large",
            HttpError::Unauthorized => "401 Unauthorized",
        }
    }
}

/// The running metrics endpoint.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    health_thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// Serves `listener` (bound) until [`MetricsServer::stop`].
    pub fn start(listener: TcpListener, shared: Arc<Shared>) -> std::io::Result<Self> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let health = Arc::new(HealthCache::default());
        // Capacity 1: a refresh already asked for is not asked for again.
        let (refresh_tx, refresh_rx) = sync_channel(1);
        let health_thread = {
            let (shared, health) = (shared.clone(), health.clone());
            std::thread::Builder::new()
                .name("nvmed-metrics-health".into())
                .spawn(move || health_loop(&shared, &health, &refresh_rx))?
        };
        let scraper = Scraper { shared, health, refresh: refresh_tx, samples: Vec::new(), sampled: None };
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("nvmed-metrics".into())
            .spawn(move || serve_loop(&listener, scraper, &s))?;
        info!(%addr, "metrics endpoint listening (GET /metrics)");
        Ok(Self { addr, stop, thread: Some(thread), health_thread: Some(health_thread) })
    }

    /// The address it listens on (the port chosen, if 0 was asked for).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving and waits for its threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The server thread owns the refresh sender: once it is gone, the health thread ends.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(t) = self.health_thread.take() {
            let _ = t.join();
        }
    }
}

/// One controller's last health reading.
#[derive(Debug, Clone)]
struct HealthReading {
    smart: SmartLog,
    at: Instant,
}

/// The health readings, by controller index (`None`: none yet, or the controller failed).
#[derive(Debug, Default)]
struct HealthCache {
    readings: Mutex<Vec<Option<HealthReading>>>,
    /// When the last refresh finished.
    refreshed: Mutex<Option<Instant>>,
}

/// Reads every running controller's SMART log at start, then whenever asked (at most once per
/// [`HEALTH_MAX_AGE`]), until the server thread is gone.
fn health_loop(shared: &Shared, cache: &HealthCache, asked: &Receiver<()>) {
    loop {
        let fresh = cache
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < HEALTH_MAX_AGE);
        if !fresh {
            // Through the broker's SMART cache, which clients' health requests share.
            let readings = (0..shared.ctrls.len())
                .map(|i| match shared.smart(i) {
                    Ok(smart) => Some(HealthReading { smart, at: Instant::now() }),
                    Err(e) => {
                        debug!(controller = i, "metrics: no SMART / health reading: {e}");
                        None
                    }
                })
                .collect();
            *cache.readings.lock().unwrap_or_else(|p| p.into_inner()) = readings;
            *cache.refreshed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
        if asked.recv().is_err() {
            return;
        }
    }
}

/// Gathers the figures for a scrape.
struct Scraper {
    shared: Arc<Shared>,
    health: Arc<HealthCache>,
    refresh: SyncSender<()>,
    /// Each I/O thread's last figures.
    samples: Vec<ThreadSample>,
    sampled: Option<Instant>,
}

impl Scraper {
    /// The I/O threads' scheduler figures, asked for again if older than [`SAMPLE_MAX_AGE`].
    fn thread_samples(&mut self) -> &[ThreadSample] {
        let pollers = &self.shared.pollers;
        self.samples.resize_with(pollers.len(), ThreadSample::default);
        if self.sampled.is_some_and(|t| t.elapsed() < SAMPLE_MAX_AGE) {
            return &self.samples;
        }
        let pending: Vec<_> = pollers
            .iter()
            .map(|p| {
                let (tx, rx) = channel();
                p.request(IoRequest::Sample { reply: tx }).then_some(rx)
            })
            .collect();
        let deadline = Instant::now() + SAMPLE_WAIT;
        for (i, rx) in pending.into_iter().enumerate() {
            let Some(rx) = rx else { continue };
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(s) => self.samples[i] = s,
                Err(_) => {
                    debug!(thread = i, "metrics: I/O thread did not answer in time; using its last figures")
                }
            }
        }
        self.sampled = Some(Instant::now());
        &self.samples
    }

    /// Everything a scrape reports.
    fn snapshot(&mut self) -> Snapshot {
        let stale = self
            .health
            .refreshed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_none_or(|t| t.elapsed() >= HEALTH_MAX_AGE);
        if stale {
            match self.refresh.try_send(()) {
                Ok(()) | Err(TrySendError::Full(())) => {}
                Err(TrySendError::Disconnected(())) => warn!("metrics: the health thread is gone"),
            }
        }
        let threads = self.thread_samples().to_vec();
        let sh = &self.shared;
        let sessions: Vec<SessionRow> = sh
            .registry
            .list()
            .iter()
            .map(|e| SessionRow {
                id: e.id(),
                uid: e.uid(),
                client: e.client().to_string(),
                rings: e.ring_count() as u64,
                buffers: e.buffers(),
                buffer_bytes: e.buffer_bytes(),
                totals: e.totals(),
            })
            .collect();
        let mut uids: BTreeMap<u32, UidRow> = BTreeMap::new();
        for (uid, ended) in sh.registry.ended() {
            let u = uids.entry(uid).or_default();
            add(&mut u.totals, &ended.totals);
            u.ended = ended.sessions;
        }
        for s in &sessions {
            let u = uids.entry(s.uid).or_default();
            add(&mut u.totals, &s.totals);
            u.sessions += 1;
            u.buffer_bytes += s.buffer_bytes;
        }
        let health = self.health.readings.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let controllers = sh
            .ctrls
            .iter()
            .zip(&sh.infos)
            .enumerate()
            .map(|(i, (c, info))| ControllerRow {
                device: c.device().name(),
                model: info.model.clone(),
                serial: info.serial.clone(),
                firmware: info.firmware.clone(),
                running: c.state() == DeviceState::Running,
                resets: c.generation(),
                queue_entries: sh.queue_entries.get(i).copied().unwrap_or(0),
                health: health.get(i).cloned().flatten(),
            })
            .collect();
        let io = sh
            .pollers
            .iter()
            .map(|p| {
                let l = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
                ThreadRow {
                    rings: p.rings.load(Ordering::Relaxed) as u64,
                    device_commands: l(&p.counters.device_commands),
                    bounced_bytes: l(&p.counters.bounced_bytes),
                    sgl_commands: l(&p.counters.sgl_commands),
                    vectored_prp_commands: l(&p.counters.vectored_prp_commands),
                    aborts: l(&p.counters.aborts),
                    retries: l(&p.counters.retries),
                }
            })
            .collect();
        Snapshot {
            uptime: sh.started.elapsed().as_secs_f64(),
            connections: sh.quotas.held(Resource::Connection),
            max_sessions: sh.config.max_sessions as u64,
            reloads: sh.reload_counts(),
            registered_bytes: sh.space.used(crate::iova::Area::Buffers),
            registered_limit: sh.config.max_buffer_bytes_total,
            sessions,
            uids,
            controllers,
            io,
            threads,
        }
    }
}

#[derive(Debug)]
struct SessionRow {
    id: u64,
    uid: u32,
    client: String,
    rings: u64,
    buffers: u64,
    buffer_bytes: u64,
    totals: Totals,
}

#[derive(Debug, Default)]
struct UidRow {
    /// Live sessions and ended ones together.
    totals: Totals,
    sessions: u64,
    ended: u64,
    buffer_bytes: u64,
}

#[derive(Debug)]
struct ControllerRow {
    device: String,
    model: String,
    serial: String,
    firmware: String,
    running: bool,
    resets: u64,
    queue_entries: u32,
    health: Option<HealthReading>,
}

#[derive(Debug)]
struct ThreadRow {
    rings: u64,
    device_commands: u64,
    bounced_bytes: u64,
    sgl_commands: u64,
    vectored_prp_commands: u64,
    aborts: u64,
    retries: u64,
}

/// What one scrape reports, gathered before encoding.
#[derive(Debug)]
struct Snapshot {
    uptime: f64,
    connections: u64,
    max_sessions: u64,
    /// Configuration reloads: put in force, refused, whether the last one was put in force.
    reloads: (u64, u64, bool),
    registered_bytes: u64,
    registered_limit: u64,
    sessions: Vec<SessionRow>,
    uids: BTreeMap<u32, UidRow>,
    controllers: Vec<ControllerRow>,
    io: Vec<ThreadRow>,
    threads: Vec<ThreadSample>,
}

type Labels = Vec<(&'static str, String)>;

/// A counter of [`Totals`]: its name, its help and how to read it.
type TotalsField = (&'static str, &'static str, fn(&Totals) -> u64);

/// Writes one metric family: its descriptor, then a sample per row.
fn family<V>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> Result<(), std::fmt::Error>
where
    V: prometheus_client::encoding::EncodeCounterValue + prometheus_client::encoding::EncodeGaugeValue,
{
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        let f = m.encode_family(&labels)?;
        match kind {
            MetricType::Counter => ConstCounter::new(v).encode(f)?,
            _ => ConstGauge::new(v).encode(f)?,
        }
    }
    Ok(())
}

/// Writes a histogram family from the rings' log2-microsecond latency buckets (their exact sum
/// kept beside them).
fn latency_family<'a>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, &'a Totals)>,
) -> Result<(), std::fmt::Error> {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, t) in rows {
        let last = t.latency_log2_us.len() - 1;
        let buckets: Vec<(f64, u64)> = t
            .latency_log2_us
            .iter()
            .enumerate()
            .map(|(i, &n)| (if i == last { f64::INFINITY } else { (2u64 << i) as f64 / 1e6 }, n))
            .collect();
        let count = t.latency_log2_us.iter().sum();
        let sum = t.latency_sum_us as f64 / 1e6;
        m.encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(sum, count, &buckets, None)?;
    }
    Ok(())
}

fn one<V>(v: V) -> [(Labels, V); 1] {
    [(Vec::new(), v)]
}

impl Collector for Snapshot {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter, Gauge};
        let e = &mut enc;
        let live = self.sessions.len() as u64;
        let mut total = Totals::default();
        for u in self.uids.values() {
            add(&mut total, &u.totals);
        }
        // The broker.
        family(e, "nvmed_uptime_seconds", "Seconds since the broker started", Gauge, one(self.uptime))?;
        family(e, "nvmed_sessions", "Live client sessions", Gauge, one(live))?;
        family(
            e,
            "nvmed_sessions_limit",
            "Most concurrent sessions (--max-sessions)",
            Gauge,
            one(self.max_sessions),
        )?;
        let (reloaded, refused, last_ok) = self.reloads;
        family(
            e,
            "nvmed_config_reloads",
            "Reloads of the configuration file (SIGHUP, nvmectl reload), by result",
            Counter,
            [
                (vec![("result", "success".to_string())], reloaded),
                (vec![("result", "failure".to_string())], refused),
            ],
        )?;
        family(
            e,
            "nvmed_config_last_reload_successful",
            "1 if the last reload of the configuration was put in force (or there was none), 0 if it was refused",
            Gauge,
            one(u64::from(last_ok)),
        )?;
        let ended: u64 = self.uids.values().map(|u| u.ended).sum();
        family(e, "nvmed_sessions_ended", "Sessions that ended (released)", Counter, one(ended))?;
        family(
            e,
            "nvmed_connections",
            "Open client connections (sessions and sockets before Hello)",
            Gauge,
            one(self.connections),
        )?;
        let buffers: u64 = self.sessions.iter().map(|s| s.buffers).sum();
        family(e, "nvmed_registered_buffers", "Buffers registered by live sessions", Gauge, one(buffers))?;
        family(
            e,
            "nvmed_registered_bytes",
            "Bytes of client buffers mapped for DMA (pinned with VFIO), all sessions",
            Gauge,
            one(self.registered_bytes),
        )?;
        family(
            e,
            "nvmed_registered_bytes_limit",
            "Most bytes all sessions together may register (--max-registered-total)",
            Gauge,
            one(self.registered_limit),
        )?;
        let totals: [TotalsField; 5] = [
            ("requests_submitted", "Requests taken off the submission rings", |t| t.submitted),
            ("requests_completed", "Completions posted", |t| t.completed),
            ("request_errors", "Completions with an error status", |t| t.errors),
            ("read_bytes", "Bytes read", |t| t.bytes_read),
            ("written_bytes", "Bytes written", |t| t.bytes_written),
        ];
        for (name, help, get) in totals {
            family(
                e,
                &format!("nvmed_{name}"),
                &format!("{help}, all sessions (ended ones included)"),
                Counter,
                one(get(&total)),
            )?;
        }
        family(
            e,
            "nvmed_in_flight",
            "Requests taken and not completed, all sessions",
            Gauge,
            one(total.in_flight),
        )?;

        // Per uid: live and ended sessions together, so the counters never go down.
        for (name, help, get) in totals {
            let rows = self.uids.iter().map(|(uid, u)| (vec![("uid", uid.to_string())], get(&u.totals)));
            family(
                e,
                &format!("nvmed_uid_{name}"),
                &format!("{help}, per uid (ended sessions included)"),
                Counter,
                rows,
            )?;
        }
        let per_uid = |f: fn(&UidRow) -> u64| {
            self.uids.iter().map(move |(uid, u)| (vec![("uid", uid.to_string())], f(u)))
        };
        family(
            e,
            "nvmed_uid_in_flight",
            "Requests taken and not completed, per uid",
            Gauge,
            per_uid(|u| u.totals.in_flight),
        )?;
        family(e, "nvmed_uid_sessions", "Live sessions per uid", Gauge, per_uid(|u| u.sessions))?;
        family(
            e,
            "nvmed_uid_registered_bytes",
            "Bytes registered by the live sessions of each uid",
            Gauge,
            per_uid(|u| u.buffer_bytes),
        )?;

        // Per session (its rings summed, closed ones included).
        let labels = |s: &SessionRow| -> Labels {
            vec![("session", s.id.to_string()), ("uid", s.uid.to_string()), ("client", s.client.clone())]
        };
        for (name, help, get) in totals {
            let rows = self.sessions.iter().map(|s| (labels(s), get(&s.totals)));
            family(e, &format!("nvmed_session_{name}"), &format!("{help}, per live session"), Counter, rows)?;
        }
        let per_session = |f: fn(&SessionRow) -> u64| self.sessions.iter().map(move |s| (labels(s), f(s)));
        family(
            e,
            "nvmed_session_in_flight",
            "Requests taken and not completed, per session",
            Gauge,
            per_session(|s| s.totals.in_flight),
        )?;
        family(e, "nvmed_session_rings", "Open rings per session", Gauge, per_session(|s| s.rings))?;
        family(
            e,
            "nvmed_session_throttled_seconds",
            "Time each session's rings had a request held by its grant's rate limits (holds that ended)",
            Counter,
            self.sessions.iter().map(|s| (labels(s), s.totals.throttled_ns as f64 / 1e9)),
        )?;
        family(
            e,
            "nvmed_session_registered_buffers",
            "Buffers registered per session",
            Gauge,
            per_session(|s| s.buffers),
        )?;
        family(
            e,
            "nvmed_session_registered_bytes",
            "Bytes registered per session",
            Gauge,
            per_session(|s| s.buffer_bytes),
        )?;
        latency_family(
            e,
            "nvmed_session_request_latency_seconds",
            "Device requests from taken to completed, per session",
            self.sessions.iter().map(|s| (labels(s), &s.totals)),
        )?;
        latency_family(
            e,
            "nvmed_uid_request_latency_seconds",
            "Device requests from taken to completed, per uid (ended sessions included)",
            self.uids.iter().map(|(uid, u)| (vec![("uid", uid.to_string())], &u.totals)),
        )?;

        // Per I/O thread.
        let per_thread = |f: fn(&ThreadRow) -> u64| {
            self.io.iter().enumerate().map(move |(i, t)| (vec![("thread", i.to_string())], f(t)))
        };
        family(e, "nvmed_thread_rings", "Rings each I/O thread serves", Gauge, per_thread(|t| t.rings))?;
        family(
            e,
            "nvmed_thread_device_commands",
            "Device commands each I/O thread's queues completed",
            Counter,
            per_thread(|t| t.device_commands),
        )?;
        family(
            e,
            "nvmed_thread_bounced_bytes",
            "Bytes of vectored requests copied through bounce buffers",
            Counter,
            per_thread(|t| t.bounced_bytes),
        )?;
        family(
            e,
            "nvmed_thread_aborts",
            "NVMe Aborts sent for commands that timed out",
            Counter,
            per_thread(|t| t.aborts),
        )?;
        family(
            e,
            "nvmed_thread_retries",
            "Device commands sent again (after a retryable status or a controller reset)",
            Counter,
            per_thread(|t| t.retries),
        )?;
        family(
            e,
            "nvmed_thread_sgl_commands",
            "Device commands sent with SGLs",
            Counter,
            per_thread(|t| t.sgl_commands),
        )?;
        family(
            e,
            "nvmed_thread_vectored_prp_commands",
            "Device commands of vectored requests sent with PRPs",
            Counter,
            per_thread(|t| t.vectored_prp_commands),
        )?;
        let queues = self.threads.iter().enumerate().flat_map(|(t, s)| {
            s.queue_in_flight
                .iter()
                .enumerate()
                .map(move |(c, &n)| (vec![("thread", t.to_string()), ("controller", c.to_string())], n))
        });
        family(e, "nvmed_thread_queue_in_flight", "Commands at the device on each I/O thread's queue of each controller (sampled at most every 100 ms)", Gauge, queues)?;

        // Per tenant of each I/O thread's scheduler.
        let tenant_labels = |t: usize, s: &TenantSample| -> Labels {
            let mut l = vec![("thread", t.to_string()), ("controller", s.key.controller.to_string())];
            match (s.key.uid(), s.key.session()) {
                (Some(uid), _) => l.push(("uid", uid.to_string())),
                (_, Some(session)) => l.push(("session", session.to_string())),
                _ => {}
            }
            l
        };
        let per_tenant = |f: fn(&TenantSample) -> u64| {
            self.threads
                .iter()
                .enumerate()
                .flat_map(move |(t, s)| s.tenants.iter().map(move |x| (tenant_labels(t, x), f(x))))
        };
        let throttled = self.threads.iter().enumerate().flat_map(|(t, s)| {
            s.tenants.iter().map(move |x| (tenant_labels(t, x), x.throttled_ns as f64 / 1e9))
        });
        family(e, "nvmed_tenant_dispatched", "Requests each tenant (uid, or session with per=session) dispatched to the device, per I/O thread and controller", Counter, per_tenant(|x| x.dispatched))?;
        family(
            e,
            "nvmed_tenant_dispatched_read_bytes",
            "Bytes of the reads each tenant dispatched",
            Counter,
            per_tenant(|x| x.read_bytes),
        )?;
        family(
            e,
            "nvmed_tenant_dispatched_written_bytes",
            "Bytes of the writes each tenant dispatched",
            Counter,
            per_tenant(|x| x.write_bytes),
        )?;
        family(
            e,
            "nvmed_tenant_throttled_seconds",
            "Time each tenant's requests were held by its limits (iops, MB/s; holds that ended)",
            Counter,
            throttled,
        )?;
        family(
            e,
            "nvmed_tenant_in_flight",
            "Requests each tenant has at the device",
            Gauge,
            per_tenant(|x| u64::from(x.in_flight)),
        )?;

        // Per controller.
        let ctrl = |i: usize, c: &ControllerRow| -> Labels {
            vec![("controller", i.to_string()), ("device", c.device.clone())]
        };
        let info = self.controllers.iter().enumerate().map(|(i, c)| {
            let mut l = ctrl(i, c);
            l.extend([
                ("model", c.model.clone()),
                ("serial", c.serial.clone()),
                ("firmware", c.firmware.clone()),
            ]);
            (l, 1u64)
        });
        family(e, "nvmed_controller_info", "Each controller's identity (value 1)", Gauge, info)?;
        let per_ctrl = |f: fn(&ControllerRow) -> u64| {
            self.controllers.iter().enumerate().map(move |(i, c)| (ctrl(i, c), f(c)))
        };
        family(
            e,
            "nvmed_controller_up",
            "1 if the controller is running, 0 if it failed",
            Gauge,
            per_ctrl(|c| u64::from(c.running)),
        )?;
        family(
            e,
            "nvmed_controller_resets",
            "Controller resets since the broker started (a removal counts as one)",
            Counter,
            per_ctrl(|c| c.resets),
        )?;
        family(
            e,
            "nvmed_controller_queue_entries",
            "Entries of each I/O queue on the controller, as granted",
            Gauge,
            per_ctrl(|c| u64::from(c.queue_entries)),
        )?;
        // SMART / health, from the cached reading (controllers without one are left out).
        let health = |f: fn(&SmartLog) -> u64| {
            self.controllers
                .iter()
                .enumerate()
                .filter_map(move |(i, c)| c.health.as_ref().map(|h| (ctrl(i, c), f(&h.smart))))
        };
        family(
            e,
            "nvmed_health_critical_warning",
            "SMART critical warning bits (0 when all is well)",
            Gauge,
            health(|s| u64::from(s.critical_warning)),
        )?;
        // The only one that may be negative.
        let temperature = self.controllers.iter().enumerate().filter_map(|(i, c)| {
            c.health.as_ref().map(|h| (ctrl(i, c), f64::from(h.smart.temperature_celsius)))
        });
        family(e, "nvmed_health_temperature_celsius", "SMART composite temperature", Gauge, temperature)?;
        family(
            e,
            "nvmed_health_available_spare_percent",
            "SMART available spare",
            Gauge,
            health(|s| u64::from(s.available_spare)),
        )?;
        family(
            e,
            "nvmed_health_available_spare_threshold_percent",
            "SMART available spare threshold",
            Gauge,
            health(|s| u64::from(s.available_spare_threshold)),
        )?;
        family(
            e,
            "nvmed_health_percentage_used",
            "SMART percentage of the rated endurance used (may exceed 100)",
            Gauge,
            health(|s| u64::from(s.percentage_used)),
        )?;
        family(
            e,
            "nvmed_health_media_errors",
            "SMART unrecovered data integrity errors",
            Counter,
            health(|s| s.media_errors),
        )?;
        family(
            e,
            "nvmed_health_unsafe_shutdowns",
            "SMART unsafe shutdowns",
            Counter,
            health(|s| s.unsafe_shutdowns),
        )?;
        family(
            e,
            "nvmed_health_power_on_hours",
            "SMART power-on hours",
            Counter,
            health(|s| s.power_on_hours),
        )?;
        family(
            e,
            "nvmed_health_data_read_bytes",
            "SMART data units read, in bytes (1 unit = 512000 bytes)",
            Counter,
            health(|s| s.data_units_read.saturating_mul(SMART_DATA_UNIT)),
        )?;
        family(
            e,
            "nvmed_health_data_written_bytes",
            "SMART data units written, in bytes (1 unit = 512000 bytes)",
            Counter,
            health(|s| s.data_units_written.saturating_mul(SMART_DATA_UNIT)),
        )?;
        let age = self
            .controllers
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.health.as_ref().map(|h| (ctrl(i, c), h.at.elapsed().as_secs_f64())));
        family(
            e,
            "nvmed_health_reading_age_seconds",
            "Age of the SMART reading above (read at most every 5 s, when scraped)",
            Gauge,
            age,
        )?;
        Ok(())
    }
}

/// Encodes a snapshot in the OpenMetrics text format (`# EOF` included).
fn encode(snapshot: Snapshot) -> String {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(snapshot));
    let mut out = String::with_capacity(16 << 10);
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &registry) {
        // Writing to a String does not fail; a family the encoder refuses is a bug here.
        warn!("metrics: encoding failed: {e}");
    }
    out
}

/// One client connection.
struct Conn {
    stream: TcpStream,
    peer: SocketAddr,
    input: Vec<u8>,
    /// The answer, once the request was read.
    output: Option<Vec<u8>>,
    written: usize,
    deadline: Instant,
}

/// What to do with a connection after serving an event.
enum Next {
    Keep,
    Close,
}

/// Whether the request head carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized(head: &[u8], token: &str) -> bool {
    let Ok(text) = std::str::from_utf8(head) else { return false };
    text.lines().skip(1).any(|line| {
        let Some((name, value)) = line.split_once(':') else { return false };
        if !name.trim().eq_ignore_ascii_case("authorization") {
            return false;
        }
        let value = value.trim();
        let Some(given) =
            value.get(..7).filter(|s| s.eq_ignore_ascii_case("bearer ")).map(|_| value[7..].trim())
        else {
            return false;
        };
        given.len() == token.len() && given.bytes().zip(token.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
    })
}

/// The `GET /metrics` target of a request head, or why it is refused; with `token`, only a
/// request that carries it is answered.
fn parse_request(head: &[u8], token: Option<&str>) -> Result<bool, HttpError> {
    let line_end = head.iter().position(|&b| b == b'\n').ok_or(HttpError::BadRequest)?;
    let line =
        std::str::from_utf8(&head[..line_end]).map_err(|_| HttpError::BadRequest)?.trim_end_matches('\r');
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest);
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return Err(HttpError::BadRequest);
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => {
            return Err(HttpError::Method(m.chars().take(16).collect()))
        }
        _ => return Err(HttpError::BadRequest),
    };
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if path != "/metrics" {
        return Err(HttpError::NotFound(path.chars().take(64).collect()));
    }
    if token.is_some_and(|t| !authorized(head, t)) {
        return Err(HttpError::Unauthorized);
    }
    Ok(head_only)
}

/// The end of the request head (after the blank line), if it arrived.
fn head_end(input: &[u8]) -> Option<usize> {
    input
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| input.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

fn response(status: &str, content_type: &str, body: &[u8], head_only: bool, extra: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

impl Conn {
    /// Reads what arrived; once the request is whole, prepares the answer.
    fn read(&mut self, scraper: &mut Scraper) -> Next {
        let mut chunk = [0u8; 2048];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return Next::Close,
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return Next::Close,
            }
            if let Some(end) = head_end(&self.input) {
                let token = scraper.shared.config.metrics_token.as_deref();
                self.answer(parse_request(&self.input[..end], token), scraper);
                return self.write();
            }
            if self.input.len() > MAX_REQUEST {
                self.answer(Err(HttpError::TooLarge), scraper);
                return self.write();
            }
        }
    }

    fn answer(&mut self, req: Result<bool, HttpError>, scraper: &mut Scraper) {
        let out = match req {
            Ok(head_only) => {
                let started = Instant::now();
                let body = encode(scraper.snapshot());
                debug!(peer = %self.peer, bytes = body.len(), took_us = started.elapsed().as_micros() as u64, "metrics scraped");
                response("200 OK", CONTENT_TYPE, body.as_bytes(), head_only, "")
            }
            Err(e) => {
                debug!(peer = %self.peer, "metrics endpoint: {e}");
                let extra = match e {
                    HttpError::Method(_) => "Allow: GET, HEAD\r\n",
                    HttpError::Unauthorized => "WWW-Authenticate: Bearer\r\n",
                    _ => "",
                };
                let body = format!("{e}\n");
                response(e.status(), "text/plain; charset=utf-8", body.as_bytes(), false, extra)
            }
        };
        self.output = Some(out);
    }

    /// Writes what it can of the answer; closes once all is written.
    fn write(&mut self) -> Next {
        let Some(out) = self.output.as_ref() else { return Next::Keep };
        while self.written < out.len() {
            match self.stream.write(&out[self.written..]) {
                Ok(0) => return Next::Close,
                Ok(n) => self.written += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Next::Keep,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return Next::Close,
            }
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        // Closing with unread input resets the connection, and the peer could lose the answer
        // (a refused oversized request): read what is already there first (a bounded amount).
        let mut chunk = [0u8; 4096];
        for _ in 0..16 {
            if !matches!(self.stream.read(&mut chunk), Ok(n) if n > 0) {
                break;
            }
        }
        Next::Close
    }
}

fn serve_loop(listener: &TcpListener, mut scraper: Scraper, stop: &AtomicBool) {
    let mut conns: VecDeque<Conn> = VecDeque::new();
    while !stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        let wait =
            conns.iter().map(|c| c.deadline.saturating_duration_since(now)).min().unwrap_or(TICK).min(TICK);
        let events: Vec<PollFlags> = {
            let mut fds = Vec::with_capacity(conns.len() + 1);
            fds.push(PollFd::new(listener.as_fd(), PollFlags::POLLIN));
            for c in &conns {
                let want = if c.output.is_some() { PollFlags::POLLOUT } else { PollFlags::POLLIN };
                fds.push(PollFd::new(c.stream.as_fd(), want));
            }
            let ms = PollTimeout::try_from(wait.as_millis().max(1) as i32).unwrap_or(PollTimeout::ZERO);
            match poll(&mut fds, ms) {
                Ok(_) => fds.iter().map(|f| f.revents().unwrap_or(PollFlags::empty())).collect(),
                Err(nix::Error::EINTR) => continue,
                Err(e) => {
                    warn!("metrics endpoint: poll failed: {e}");
                    std::thread::sleep(TICK);
                    continue;
                }
            }
        };
        // The connections first (their requests are older than any new one).
        let now = Instant::now();
        let mut i = 0;
        let mut kept = VecDeque::with_capacity(conns.len());
        for mut c in conns.drain(..) {
            i += 1;
            let ev = events.get(i).copied().unwrap_or(PollFlags::empty());
            let next = if ev.is_empty() {
                Next::Keep
            } else if c.output.is_some() {
                c.write()
            } else {
                c.read(&mut scraper)
            };
            match next {
                Next::Keep if now < c.deadline => kept.push_back(c),
                Next::Keep => debug!(peer = %c.peer, "metrics endpoint: connection too slow; closed"),
                Next::Close => {}
            }
        }
        conns = kept;
        if events[0].is_empty() {
            continue;
        }
        // New connections; the oldest goes when there are too many.
        for _ in 0..64 {
            let (stream, peer) = match listener.accept() {
                Ok(a) => a,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    debug!("metrics endpoint: accept failed: {e}");
                    break;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if conns.len() >= MAX_CONNECTIONS {
                // The oldest whose request is not whole yet goes (connections that send little
                // or nothing cannot keep scrapes out); one whose answer is being written is
                // kept. With every one writing, the new connection is the one refused.
                match conns.iter().position(|c| c.output.is_none()) {
                    Some(i) => {
                        if let Some(old) = conns.remove(i) {
                            debug!(peer = %old.peer, "metrics endpoint: too many connections; closing the oldest unanswered one");
                        }
                    }
                    None => {
                        debug!(%peer, "metrics endpoint: every connection is being answered; closing the new one");
                        continue;
                    }
                }
            }
            let mut c = Conn {
                stream,
                peer,
                input: Vec::new(),
                output: None,
                written: 0,
                deadline: Instant::now() + REQUEST_DEADLINE,
            };
            // Its request is often there already.
            if let Next::Keep = c.read(&mut scraper) {
                conns.push_back(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_parsed_strictly() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", None), Ok(false));
        // With a token, only a request that carries it.
        let t = Some("s3cret");
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", t),
            Err(HttpError::Unauthorized)
        );
        assert_eq!(
            parse_request(b"GET /metrics HTTP/1.1\r\nauthorization: bearer s3cret\r\n\r\n", t),
            Ok(false)
        );
        for wrong in ["Bearer s3cre", "Bearer s3cretX", "Basic s3cret", "Bearer"] {
            let req = format!("GET /metrics HTTP/1.1\r\nAuthorization: {wrong}\r\n\r\n");
            assert_eq!(parse_request(req.as_bytes(), t), Err(HttpError::Unauthorized), "{wrong}");
        }
        assert_eq!(parse_request(b"HEAD /metrics?x=1 HTTP/1.0\r\n\r\n", None), Ok(true));
        assert_eq!(parse_request(b"GET / HTTP/1.1\r\n\r\n", None), Err(HttpError::NotFound("/".into())));
        assert_eq!(
            parse_request(b"POST /metrics HTTP/1.1\r\n\r\n", None),
            Err(HttpError::Method("POST".into()))
        );
        assert_eq!(parse_request(b"GET /metrics\r\n\r\n", None), Err(HttpError::BadRequest));
        assert_eq!(parse_request(b"GET metrics HTTP/1.1\r\n\r\n", None), Err(HttpError::BadRequest));
        assert_eq!(parse_request(b"\x00\x01 /metrics HTTP/1.1\r\n\r\n", None), Err(HttpError::BadRequest));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(24));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }

    #[test]
    fn a_snapshot_encodes_as_openmetrics_with_its_labels() {
        let key = |owner| TenantKey { owner, controller: 0 };
        let snap = Snapshot {
            uptime: 1.5,
            connections: 2,
            max_sessions: 64,
            reloads: (3, 1, false),
            registered_bytes: 8192,
            registered_limit: 1 << 30,
            sessions: vec![SessionRow {
                id: 3,
                uid: 1000,
                client: "a \"quoted\" name".into(),
                rings: 1,
                buffers: 1,
                buffer_bytes: 8192,
                totals: Totals {
                    submitted: 10,
                    completed: 9,
                    in_flight: 1,
                    bytes_read: 4096,
                    throttled_ns: 250_000_000,
                    ..Totals::default()
                },
            }],
            uids: BTreeMap::from([(
                1000,
                UidRow {
                    totals: Totals { submitted: 15, completed: 14, in_flight: 1, ..Totals::default() },
                    sessions: 1,
                    ended: 1,
                    buffer_bytes: 8192,
                },
            )]),
            controllers: vec![],
            io: vec![ThreadRow {
                rings: 1,
                device_commands: 9,
                bounced_bytes: 0,
                sgl_commands: 0,
                vectored_prp_commands: 0,
                aborts: 0,
                retries: 0,
            }],
            threads: vec![ThreadSample {
                tenants: vec![
                    TenantSample {
                        key: key(1000),
                        dispatched: 9,
                        read_bytes: 0,
                        write_bytes: 0,
                        throttled_ns: 1_500_000_000,
                        in_flight: 1,
                    },
                    TenantSample {
                        key: key((1 << 63) | 3),
                        dispatched: 1,
                        read_bytes: 0,
                        write_bytes: 0,
                        throttled_ns: 0,
                        in_flight: 0,
                    },
                ],
                queue_in_flight: vec![1],
            }],
        };
        let text = encode(snap);
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in [
            "# TYPE nvmed_session_requests_submitted counter",
            "nvmed_session_requests_submitted_total{session=\"3\",uid=\"1000\",client=\"a \\\"quoted\\\" name\"} 10",
            "nvmed_session_throttled_seconds_total{session=\"3\",uid=\"1000\",client=\"a \\\"quoted\\\" name\"} 0.25",
            "nvmed_uid_requests_submitted_total{uid=\"1000\"} 15",
            "nvmed_requests_submitted_total 15",
            "nvmed_sessions_ended_total 1",
            "nvmed_registered_bytes 8192",
            "nvmed_tenant_throttled_seconds_total{thread=\"0\",controller=\"0\",uid=\"1000\"} 1.5",
            "nvmed_tenant_dispatched_total{thread=\"0\",controller=\"0\",session=\"3\"} 1",
            "nvmed_thread_queue_in_flight{thread=\"0\",controller=\"0\"} 1",
            "nvmed_config_reloads_total{result=\"success\"} 3",
            "nvmed_config_reloads_total{result=\"failure\"} 1",
            "nvmed_config_last_reload_successful 0",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
        }
    }
}
