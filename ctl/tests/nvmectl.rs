//! nvmectl against a live broker (started in this process on an emulated controller): the
//! library's requests, and the real `nvmectl` binary's output.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmectl::{session_rates, AdminClient, CtlError};
use nvmed_client::testkit::reads_for;
use nvmed_client::{NvmeRing, NvmeSession};
use nvmed_proto::admin::{AdminError, AdminRequest, AdminResponse, SmartLog};
use nvmed_server::broker::{Broker, BrokerConfig};
use nvmed_server::emulator::backend::MemoryBackend;
use nvmed_server::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig};

const NAMESPACE: u64 = 64 << 20;
const MODEL: &str = "nvmed emulated NVMe controller";

struct Env {
    broker: Option<Broker>,
    dir: PathBuf,
    admin: PathBuf,
    socket: PathBuf,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(b) = self.broker.take() {
            let _ = b.shutdown();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Env {
    fn client(&self) -> AdminClient {
        AdminClient::new(&self.admin)
    }
}

/// A broker with 2 I/O threads on one emulated controller, its admin socket in a fresh
/// directory (other uids may enter it).
fn broker(tweak: impl FnOnce(&mut BrokerConfig)) -> Env {
    broker_on(|_| {}, tweak)
}

/// As [`broker`], the emulated controller set up by `device` first.
fn broker_on(device: impl FnOnce(&mut EmulatorConfig), tweak: impl FnOnce(&mut BrokerConfig)) -> Env {
    use std::os::unix::fs::PermissionsExt;
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "nvmectl-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut emulator = EmulatorConfig {
        namespaces: vec![EmulatedNamespace {
            backend: Box::new(MemoryBackend::new(NAMESPACE).unwrap()),
            lba_size: 512,
        }],
        vectors: 3,
        ..Default::default()
    };
    device(&mut emulator);
    let socket = dir.join("nvmed.sock");
    let admin = dir.join("nvmed-admin.sock");
    let broker = start_broker(emulator, &socket, &admin, tweak);
    Env { broker: Some(broker), dir, admin, socket }
}

fn start_broker(
    emulator: EmulatorConfig,
    socket: &Path,
    admin: &Path,
    tweak: impl FnOnce(&mut BrokerConfig),
) -> Broker {
    let device = Arc::new(EmulatedController::new(emulator).unwrap());
    let mut config = BrokerConfig::new(socket);
    config.admin_socket = Some(admin.to_path_buf());
    config.io_threads = 2;
    tweak(&mut config);
    Broker::start(device, config).unwrap()
}

/// A client thread that writes and reads 4 KiB blocks until `stop`, on `rings` rings of one
/// session; returns the session id once it has done some I/O, and how many I/Os it completed
/// (or the error that ended it) at the end.
struct Worker {
    session: u64,
    thread: std::thread::JoinHandle<Result<u64, nvmed_client::Error>>,
}

fn worker(socket: &Path, rings: usize, slot: u64, stop: Arc<AtomicBool>) -> Worker {
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = socket.to_path_buf();
    let thread = std::thread::spawn(move || {
        let session = NvmeSession::open(&socket)?;
        let mut rings: Vec<NvmeRing> = (0..rings).map(|_| session.new_ring()).collect::<Result<_, _>>()?;
        let mut bufs = Vec::new();
        for r in &mut rings {
            bufs.push(r.alloc_buffer(1 << 20)?);
        }
        let mut done = 0u64;
        let base = slot * (1 << 20);
        let mut announced = false;
        while !stop.load(Ordering::Relaxed) {
            for (r, &b) in rings.iter_mut().zip(&bufs) {
                let off = (done % 256) * 4096;
                r.write(1, base + off, b, off, 4096)?;
                r.read(1, base + off, b, off, 4096)?;
                done += 2;
            }
            if !announced {
                tx.send(session.session_id()).unwrap();
                announced = true;
            }
        }
        Ok(done)
    });
    let session = rx.recv_timeout(Duration::from_secs(20)).expect("the client started I/O");
    Worker { session, thread }
}

#[test]
fn status_and_health_follow_the_io() {
    let env = broker(|_| {});
    let ctl = env.client();
    let s = ctl.status().unwrap();
    assert_eq!(s.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.controllers.len(), 1);
    let c = &s.controllers[0];
    assert_eq!((c.model.as_str(), c.serial.as_str(), c.state.as_str()), (MODEL, "NVMED-EMU-0001", "running"));
    assert_eq!(c.firmware, env!("CARGO_PKG_VERSION"));
    assert_eq!(s.namespaces.len(), 1);
    assert_eq!(
        (s.namespaces[0].nsid, s.namespaces[0].size_bytes, s.namespaces[0].lba_size),
        (1, NAMESPACE, 512)
    );
    assert_eq!(s.io_threads.len(), 2);
    assert_eq!(s.queue_depth, 1024);
    assert_eq!(s.sessions, 0);

    let before = ctl.health().unwrap();
    let h = before[0].smart.expect("the emulator answers the SMART log");
    assert_eq!((h.temperature_kelvin, h.temperature_celsius), (313, 40));
    assert_eq!((h.available_spare, h.available_spare_threshold, h.percentage_used), (100, 10, 0));
    assert_eq!((h.power_cycles, h.unsafe_shutdowns, h.media_errors, h.critical_warning), (1, 0, 0, 0));
    assert_eq!((h.data_units_written, h.host_write_commands), (0, 0));

    // 3 MiB + 4 KiB written in 25 commands, 1 MiB read in 8.
    let mut ring = NvmeRing::open(&env.socket).unwrap();
    let buf = ring.alloc_buffer(4 << 20).unwrap();
    for i in 0..24u64 {
        ring.write(1, i * (128 << 10), buf, 0, 128 << 10).unwrap();
    }
    ring.write(1, 8 << 20, buf, 0, 4096).unwrap();
    for i in 0..8u64 {
        ring.read(1, i * (128 << 10), buf, 0, 128 << 10).unwrap();
    }
    let written = (3u64 << 20) + 4096;
    let s = ctl.status().unwrap();
    assert_eq!(s.sessions, 1);
    assert_eq!((s.totals.bytes_written, s.totals.bytes_read, s.totals.completed), (written, 1 << 20, 33));
    // The latency histogram is summed too (it was left at zero).
    assert_eq!(s.totals.latency_log2_us.iter().sum::<u64>(), 33, "{:?}", s.totals.latency_log2_us);
    assert!(s.totals.latency_sum_us > 0);
    assert_eq!(s.registered_buffers, 1);
    assert!(s.registered_bytes >= 4 << 20, "{}", s.registered_bytes);
    assert_eq!(s.io_threads.iter().map(|t| t.rings).sum::<u64>(), 1);

    let h = ctl.health().unwrap()[0].smart.unwrap();
    assert_eq!(h.data_units_written, SmartLog::data_units(written));
    assert_eq!(h.data_units_written, 7, "3149824 bytes are 6.15 units, rounded up");
    assert_eq!(h.data_units_read, SmartLog::data_units(1 << 20));
    assert_eq!((h.host_write_commands, h.host_read_commands), (25, 8));
    assert_eq!(h.temperature_kelvin, 313);
}

#[test]
fn sessions_show_each_client_with_its_rings_while_eight_run_io() {
    let env = broker(|_| {});
    let stop = Arc::new(AtomicBool::new(false));
    // Client 0 has 3 rings, the others one each.
    let workers: Vec<Worker> =
        (0..8).map(|i| worker(&env.socket, if i == 0 { 3 } else { 1 }, i, stop.clone())).collect();
    let ctl = env.client();
    let first = ctl.sessions().unwrap();
    let t = Instant::now();
    // Sampled again once every client has completed more (eight clients on two cores: one
    // may wait its turn for a while).
    let second = loop {
        std::thread::sleep(Duration::from_millis(100));
        let second = ctl.sessions().unwrap();
        let grew = |s: &nvmed_proto::admin::SessionReport| {
            first.iter().any(|f| f.id == s.id && s.counters.completed > f.counters.completed)
        };
        if second.iter().all(grew) || t.elapsed() > Duration::from_secs(20) {
            break second;
        }
    };
    let rates = session_rates(&first, &second, t.elapsed());
    assert_eq!(second.len(), 8, "{second:#?}");
    let me = std::fs::read_to_string("/proc/self/comm").unwrap().trim_end().to_string();
    for (i, w) in workers.iter().enumerate() {
        let r = rates.iter().find(|r| r.session.id == w.session).expect("every client's session is listed");
        let s = &r.session;
        assert_eq!((s.uid, s.pid), (nix::unistd::getuid().as_raw(), std::process::id() as i32));
        assert_eq!(s.command, me);
        assert_eq!(s.rings, if i == 0 { 3 } else { 1 });
        assert_eq!(s.buffers, s.rings as u64);
        assert_eq!(s.registered_bytes, u64::from(s.rings) << 20);
        assert!(
            s.counters.completed > 0 && s.counters.bytes_written > 0 && s.counters.bytes_read > 0,
            "{s:?}"
        );
        assert!(s.counters.submitted >= s.counters.completed);
        assert_eq!(s.counters.errors, 0);
        assert_eq!(s.counters.throttled_ns, 0, "no limits, nothing held");
        assert!(r.iops > 0.0 && r.write_mb_s > 0.0, "session {} did I/O in the interval: {r:?}", s.id);
        // Every completed device request has its latency counted; percentiles follow.
        let counted: u64 = s.counters.latency_log2_us.iter().sum();
        assert!(counted > 0 && counted <= s.counters.completed, "{counted} of {}", s.counters.completed);
        let (p50, p99) = (r.p50_us.expect("a median"), r.p99_us.expect("a p99"));
        assert!(p50 <= p99 && p99 <= 1 << 24, "p50 {p50} p99 {p99}");
    }
    let status = ctl.status().unwrap();
    assert_eq!(status.sessions, 8);
    assert_eq!(status.io_threads.iter().map(|t| t.rings).sum::<u64>(), 10);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert!(w.thread.join().unwrap().unwrap() > 0);
    }
}

#[test]
fn kill_ends_one_session_and_the_others_go_on() {
    let env = broker(|_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<Worker> = (0..3).map(|i| worker(&env.socket, 1, i, stop.clone())).collect();
    let ctl = env.client();
    let victim = workers[1].session;
    ctl.kill(victim).unwrap();
    // Released when the kill returns: gone from the list at once.
    let after = ctl.sessions().unwrap();
    assert!(after.iter().all(|s| s.id != victim), "{after:#?}");
    assert_eq!(after.len(), 2);
    // Its client's I/O fails: its rings are closed, its connection gone.
    let mut workers = workers;
    let killed = workers.remove(1);
    match killed.thread.join().unwrap() {
        Err(nvmed_client::Error::BrokerGone)
        | Err(nvmed_client::Error::RingFaulted(_))
        | Err(nvmed_client::Error::Refused(nvmed_proto::ControlError::SessionKilled(_))) => {}
        other => panic!("the killed client should see its session end, got {other:?}"),
    }
    // The others go on.
    let done: Vec<u64> = after.iter().map(|s| s.counters.completed).collect();
    let t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(50));
        let later = ctl.sessions().unwrap();
        let stalled: Vec<u64> = later
            .iter()
            .zip(&done)
            .filter(|(s, before)| s.counters.completed <= **before)
            .map(|(s, _)| s.id)
            .collect();
        if stalled.is_empty() {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "sessions {stalled:?} stalled after the kill");
    }
    // An unknown or already killed session is a typed error.
    match ctl.kill(victim) {
        Err(CtlError::Broker(AdminError::UnknownSession(id))) => assert_eq!(id, victim),
        other => panic!("{other:?}"),
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert!(w.thread.join().unwrap().unwrap() > 0);
    }
    assert_eq!(ctl.status().unwrap().registered_buffers, 0);
}

fn nvmectl(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_nvmectl"))
        .arg("--admin-socket")
        .arg(&env.admin)
        .args(args)
        .output()
        .expect("run nvmectl")
}

fn json(out: &std::process::Output) -> serde_json::Value {
    assert!(out.status.success(), "nvmectl failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn the_binary_prints_tables_and_json() {
    let env = broker(|_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<Worker> = (0..2).map(|i| worker(&env.socket, 2, i, stop.clone())).collect();

    let s = json(&nvmectl(&env, &["status", "--json"]));
    assert_eq!(s["controllers"][0]["model"], MODEL);
    assert_eq!(s["namespaces"][0]["size_bytes"], NAMESPACE);
    assert_eq!(s["sessions"], 2);
    assert_eq!(s["io_threads"].as_array().unwrap().len(), 2);

    let out = nvmectl(&env, &["status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        text.contains(MODEL) && text.contains("NVMED-EMU-0001") && text.contains("Sessions: 2 of 64"),
        "{text}"
    );

    let list = json(&nvmectl(&env, &["sessions", "--json", "--interval", "0.2"]));
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 2);
    for (s, w) in list.iter().zip(&workers) {
        assert_eq!(s["id"], w.session);
        assert_eq!(s["rings"], 2);
        assert_eq!(s["registered_bytes"], 2u64 << 20);
        assert!(s["iops"].as_f64().unwrap() > 0.0, "{s}");
        assert!(s["counters"]["completed"].as_u64().unwrap() > 0);
    }

    let out = nvmectl(&env, &["sessions", "--interval", "0.1"]);
    let text = String::from_utf8(out.stdout).unwrap();
    let header = text.lines().next().unwrap();
    assert!(header.starts_with("ID") && header.contains("IOPS") && header.contains("REGISTERED"), "{text}");
    assert_eq!(text.lines().count(), 3, "{text}");
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[0], workers[0].session.to_string());

    let top = nvmectl(&env, &["top", "--json", "--iterations", "2", "--interval", "0.1"]);
    assert!(top.status.success());
    let lines: Vec<serde_json::Value> =
        String::from_utf8(top.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["sessions"].as_array().unwrap().len(), 2);
    let top = nvmectl(&env, &["top", "--iterations", "2", "--interval", "0.1"]);
    let text = String::from_utf8(top.stdout).unwrap();
    assert_eq!(text.matches("IOPS, read").count(), 2, "{text}");

    let h = json(&nvmectl(&env, &["health", "--json"]));
    assert_eq!(h[0]["smart"]["temperature_kelvin"], 313);
    assert!(h[0]["smart"]["data_units_written"].as_u64().unwrap() > 0);
    let text = String::from_utf8(nvmectl(&env, &["health"]).stdout).unwrap();
    assert!(text.contains("313 K (40 °C)"), "{text}");

    // One sample measures no rate: no rate fields rather than zeros.
    let list = json(&nvmectl(&env, &["sessions", "--json", "--interval", "0"]));
    assert_eq!(list.as_array().unwrap().len(), 2);
    assert!(
        list[0].get("iops").is_none() && list[0]["counters"]["completed"].as_u64().unwrap() > 0,
        "{list}"
    );

    // A kill that names another pid or uid than the session's ends nothing.
    let id = workers[0].session.to_string();
    let me = std::process::id().to_string();
    let out = nvmectl(&env, &["kill", &id, "--pid", "1", "--json"]);
    assert_eq!((out.status.code(), out.stdout.len()), (Some(1), 0));
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(e["error"], "not_that_session");
    assert_eq!(
        e["message"],
        format!("session {id} is pid {me}, not pid 1; nothing was ended (see `nvmectl sessions`)")
    );
    let out = nvmectl(&env, &["kill", &id, "--uid", "4321", "--pid", &me]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        format!("nvmectl: session {id} is uid 0, pid {me}, not uid 4321, pid {me}; nothing was ended (see `nvmectl sessions`)\n")
    );
    assert_eq!(json(&nvmectl(&env, &["status", "--json"]))["sessions"], 2, "nothing was ended");
    let k = json(&nvmectl(&env, &["kill", &id, "--pid", &me, "--uid", "0", "--json"]));
    assert_eq!(k["killed"], workers[0].session);
    let out = nvmectl(&env, &["kill", "999999"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "nvmectl: no session 999999 (see `nvmectl sessions`)\n");
    // A command line that does not parse: 64, not health's 2.
    let out = nvmectl(&env, &["kill", "twelve"]);
    assert_eq!(out.status.code(), Some(64), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(nvmectl(&env, &["--help"]).status.code(), Some(0));

    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.thread.join().unwrap();
    }
    // No broker at all: a clear message.
    let gone = env.dir.join("nothing.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_nvmectl"))
        .arg("--admin-socket")
        .arg(&gone)
        .arg("status")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "3: no answer from the broker");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("nvmectl: no broker is listening on") && err.contains("is nvmed running?"),
        "{err}"
    );
    // With --json the error is JSON too (on stderr; stdout stays empty for the pipe).
    let out = Command::new(env!("CARGO_BIN_EXE_nvmectl"))
        .arg("--admin-socket")
        .arg(&gone)
        .args(["status", "--json"])
        .output()
        .unwrap();
    assert_eq!((out.status.code(), out.stdout.len()), (Some(3), 0));
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!((e["error"].as_str(), e["exit"].as_i64()), (Some("not_running"), Some(3)), "{e}");
    assert!(e["message"].as_str().unwrap().contains("is nvmed running?"), "{e}");
}

/// A copy of the nvmectl binary other uids can run (the build tree may be closed to them).
fn runnable_by_anyone() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("nvmectl-bin-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let dst = dir.join("nvmectl");
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let tmp = dir.join("nvmectl.tmp");
        std::fs::copy(env!("CARGO_BIN_EXE_nvmectl"), &tmp).unwrap();
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &dst).unwrap();
    });
    dst
}

fn as_uid(env: &Env, uid: u32, gid: u32) -> (Option<i32>, String, String) {
    use std::os::unix::process::CommandExt;
    let out = Command::new(runnable_by_anyone())
        .arg("--admin-socket")
        .arg(&env.admin)
        .arg("status")
        .uid(uid)
        .gid(gid)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn only_operators_are_served() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: needs root to run nvmectl as another uid");
        return;
    }
    // The socket file keeps other users out (mode 0600): a clear message from nvmectl.
    let env = broker(|_| {});
    let (code, _, err) = as_uid(&env, 1000, 1000);
    assert_eq!(code, Some(3));
    assert_eq!(
        err,
        format!(
            "nvmectl: cannot connect to {}: permission denied; nvmectl needs root, the user nvmed runs as (root, uid 0)\n",
            env.admin.display()
        )
    );
    drop(env);

    // A socket anyone can reach: the broker's own check refuses with its typed error.
    let env = broker(|c| c.admin_socket_mode = Some(0o666));
    let (code, out, err) = as_uid(&env, 1000, 1000);
    assert_eq!((code, out.as_str()), (Some(3), ""));
    assert_eq!(
        err,
        "nvmectl: permission denied for uid 1000: nvmectl needs root (the broker was started without --admin-group)\n"
    );
    // Root still is served, and the refusals left nothing behind.
    assert_eq!(env.client().status().unwrap().sessions, 0);
    drop(env);

    // With an admin group: a member (here by its gid) is served, others are told the group.
    let env = broker(|c| {
        c.admin_group = Some("root".into());
        c.admin_socket_mode = Some(0o666);
    });
    let (code, out, err) = as_uid(&env, 1000, 0);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains(MODEL), "{out}");
    let (code, _, err) = as_uid(&env, 1000, 1000);
    assert_eq!(code, Some(3));
    assert_eq!(
        err,
        "nvmectl: permission denied for uid 1000: nvmectl needs root or membership in group root\n"
    );
}

#[test]
fn admin_connections_are_bounded_and_idle_ones_do_not_block_others() {
    use std::os::fd::AsRawFd;
    let env = broker(|_| {});
    // Eight idle connections hold every slot: a ninth is told to try again.
    let addr = nix::sys::socket::UnixAddr::new(&env.admin).unwrap();
    let open = || {
        let fd = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Unix,
            nix::sys::socket::SockType::SeqPacket,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        nix::sys::socket::connect(fd.as_raw_fd(), &addr).unwrap();
        fd
    };
    let held: Vec<_> = (0..8).map(|_| open()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match env.client().status() {
            Err(CtlError::Broker(AdminError::Busy { limit: 8 })) => break,
            Ok(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            other => panic!("{other:?}"),
        }
    }
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.client().status().is_err() {
        assert!(Instant::now() < deadline, "admin slots were not given back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reload_puts_new_grants_in_force_or_says_why_not() {
    use nvmed_server::policy::{DefaultAccess, Policy};
    let env = broker(|_| {});
    // Without a configuration to read again, the operator is told so.
    let e = env.client().reload().unwrap_err().to_string();
    assert!(e.contains("without a configuration"), "{e}");
    // A client connected before the reload keeps its session; its namespace window changes.
    let ring = nvmed_client::NvmeRing::open(&env.socket).unwrap();
    assert_eq!(ring.namespaces()[0].lba_count, NAMESPACE / 512);
    let next = Arc::new(std::sync::Mutex::new(Ok(Policy {
        grants: vec!["0:1:0+2048:weight=2".parse().unwrap()],
        default: DefaultAccess::None,
    })));
    let source = next.clone();
    env.broker.as_ref().unwrap().set_reloader(Box::new(move || source.lock().unwrap().clone()));
    assert_eq!(env.client().reload().unwrap(), (1, 0));
    let session = ring.session();
    let list = session.control(&nvmed_proto::Request::ListNamespaces, &[]).unwrap();
    let nvmed_proto::Response::Namespaces(list) = list else { panic!("{list:?}") };
    assert_eq!(list[0].lba_count, 2048, "the new window is in force for the same session");
    // A configuration the reloader refuses: the reason reaches the operator.
    *next.lock().unwrap() = Err("grant 0:1:iops=lots: not a positive number".into());
    let e = env.client().reload().unwrap_err().to_string();
    assert!(e.contains("previous grants stay") && e.contains("iops=lots"), "{e}");
}

#[test]
fn limits_are_shown_and_changed_at_run_time() {
    use nvmed_server::policy::{DefaultAccess, Policy};
    let env = broker(|c| {
        c.policy = Policy { grants: vec!["0:1:iops=1k".parse().unwrap()], default: DefaultAccess::None };
    });
    let _ring = nvmed_client::NvmeRing::open(&env.socket).unwrap();
    let (grants, default_access) = env.client().limits().unwrap();
    assert_eq!(default_access, "none");
    assert_eq!((grants.len(), grants[0].uid, grants[0].nsid), (1, 0, 1));
    assert_eq!(grants[0].limits, "weight=1,iops=1000,per=uid");
    // Changed for the connected session at once.
    assert_eq!(env.client().set_limits(0, 1, "weight=2,iops=4k,qd=8").unwrap(), (1, 0));
    assert_eq!(env.client().limits().unwrap().0[0].limits, "weight=2,iops=4000,qd=8,per=uid");
    // Mistakes are refused with the reason; nothing changes.
    let e = env.client().set_limits(0, 1, "iops=lots").unwrap_err();
    assert!(matches!(e, CtlError::Broker(AdminError::BadLimits(_))), "{e:?}");
    let e = e.to_string();
    assert!(e.starts_with("bad limits, nothing changed: ") && e.contains("iops=lots"), "{e}");
    let e = env.client().set_limits(0, 9, "iops=1k").unwrap_err().to_string();
    assert!(e.contains("no grant for uid 0 on namespace 9"), "{e}");
    assert_eq!(env.client().limits().unwrap().0[0].limits, "weight=2,iops=4000,qd=8,per=uid");
}

#[test]
fn sessions_show_the_time_held_by_limits() {
    use nvmed_server::policy::{DefaultAccess, Policy};
    // 500 IOPS for uid 0 (the tests' uid): a client asking faster waits about 2 ms per request.
    let env = broker(|c| {
        c.policy = Policy { grants: vec!["0:1:iops=500".parse().unwrap()], default: DefaultAccess::None };
    });
    let stop = Arc::new(AtomicBool::new(false));
    let w = worker(&env.socket, 1, 0, stop.clone());
    let ctl = env.client();
    let first = ctl.sessions().unwrap();
    let t = Instant::now();
    std::thread::sleep(Duration::from_millis(600));
    let second = ctl.sessions().unwrap();
    let rates = session_rates(&first, &second, t.elapsed());
    let r = rates.iter().find(|r| r.session.id == w.session).unwrap();
    // A synchronous client at 500 IOPS: each request is held until its token comes, which is
    // most of the time (a held request counts once it goes, so the share can lag a little).
    assert!(r.iops < 600.0, "the limit holds: {r:?}");
    assert!(r.throttled_share > 0.3 && r.throttled_share <= 1.05, "{r:?}");
    let out = nvmectl(&env, &["sessions"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let header = text.lines().next().unwrap();
    let col = header.split_whitespace().position(|c| c == "THROTTLED").expect("a THROTTLED column");
    // One session: its row's THROTTLED cell (headers of two words shift the cells: count from
    // the end, AGE is last).
    let cells: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    let from_end = header.split_whitespace().count() - col;
    // `sessions` samples twice (--interval, 1 s): the share of that second, in percent.
    let cell = cells[cells.len() - from_end];
    let held: f64 = cell.strip_suffix('%').and_then(|c| c.parse().ok()).expect("a percentage");
    assert!(held > 30.0, "{text}");
    // The broker's totals carry the held time too (status summed every counter but it).
    assert!(ctl.status().unwrap().totals.throttled_ns >= second[0].counters.throttled_ns);
    assert!(second[0].counters.throttled_ns > 0);
    stop.store(true, Ordering::Relaxed);
    assert!(w.thread.join().unwrap().unwrap() > 0);
}

#[test]
fn limits_change_a_running_session_s_rate_and_the_binaries_show_and_change_them() {
    use nvmed_server::policy::{DefaultAccess, Policy};
    let grants = |g: &[&str]| Policy {
        grants: g.iter().map(|g| g.parse().unwrap()).collect(),
        default: DefaultAccess::None,
    };
    let env = broker(|c| c.policy = grants(&["0:1:iops=500"]));
    let source = Arc::new(std::sync::Mutex::new(grants(&["0:1:iops=500"])));
    let s = source.clone();
    env.broker.as_ref().unwrap().set_reloader(Box::new(move || Ok(s.lock().unwrap().clone())));
    let mut ring = NvmeRing::open(&env.socket).unwrap();
    let id = ring.session().session_id();
    let secs = 1.0;
    let before = reads_for(&mut ring, 16, secs) as f64 / secs;
    // Through the library: the same session, four times the rate.
    assert_eq!(env.client().set_limits(0, 1, "iops=2k").unwrap(), (1, 0));
    let after = reads_for(&mut ring, 16, secs) as f64 / secs;
    eprintln!("iops=500: {before:.0} IOPS; iops=2k: {after:.0} IOPS");
    assert!((400.0..=500.0 * 1.05 + 20.0).contains(&before), "{before:.0} IOPS under iops=500");
    assert!((1600.0..=2000.0 * 1.05 + 20.0).contains(&after), "{after:.0} IOPS under iops=2k");
    assert_eq!((ring.session().session_id(), ring.reconnects()), (id, 0), "the session was not replaced");

    // The binary: show them (JSON and table), change them (JSON and text).
    let j = json(&nvmectl(&env, &["limits", "--json"]));
    assert_eq!(j["default_access"], "none");
    assert_eq!(j["grants"][0]["limits"], "weight=1,iops=2000,per=uid");
    assert_eq!((j["grants"][0]["uid"].as_u64(), j["grants"][0]["nsid"].as_u64()), (Some(0), Some(1)));
    let out = nvmectl(&env, &["limits"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let header: Vec<&str> = text.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(header, ["UID", "NSID", "WINDOW", "RO", "LIMITS"], "{text}");
    let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row, ["0", "1", "whole", "weight=1,iops=2000,per=uid"], "{text}");
    assert_eq!(text.lines().last(), Some("uids without grants: none"), "{text}");
    let j = json(&nvmectl(&env, &["limits", "0", "1", "iops=1k", "--json"]));
    assert_eq!((j["updated"].as_u64(), j["ended"].as_u64()), (Some(1), Some(0)), "{j}");
    let out = nvmectl(&env, &["limits", "0", "1", "iops=1k,qd=8"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("now iops=1k,qd=8: 1 sessions updated"), "{text}");
    let out = nvmectl(&env, &["limits", "0", "2", "iops=1k"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no grant for uid 0 on namespace 2"));

    // Reload: the configuration's grants again (the limits change is gone), JSON and text.
    *source.lock().unwrap() = grants(&["0:1:iops=800"]);
    let j = json(&nvmectl(&env, &["reload", "--json"]));
    assert_eq!((j["updated"].as_u64(), j["ended"].as_u64()), (Some(1), Some(0)), "{j}");
    let out = nvmectl(&env, &["reload"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("grants reloaded: 0 sessions updated, 0 ended"), "{text}");
    // Refused configurations: the reason, and the grants in force stay.
    for (bad, why) in [
        (
            &["0:1:iops=5k", "0:9"][..],
            "names namespace 9, which this broker does not serve (it serves namespace 1)",
        ),
        (&["0:1:iops=5k", "0:1:ro"][..], "a uid may have one grant per namespace"),
    ] {
        *source.lock().unwrap() = grants(bad);
        for args in [&["reload"][..], &["reload", "--json"][..]] {
            let out = nvmectl(&env, args);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{args:?} {bad:?}: {stderr}");
            assert!(
                stderr.contains("reload refused, the previous grants stay in force") && stderr.contains(why),
                "{stderr}"
            );
        }
        let j = json(&nvmectl(&env, &["limits", "--json"]));
        assert_eq!(j["grants"].as_array().unwrap().len(), 1, "{j}");
        assert_eq!(j["grants"][0]["limits"], "weight=1,iops=800,per=uid");
    }
    let held = reads_for(&mut ring, 16, 0.5) as f64 / 0.5;
    assert!(held <= 800.0 * 1.05 + 40.0, "{held:.0} IOPS after refused reloads: the 800 limit is gone");
    assert_eq!(ring.session().session_id(), id);
}

#[test]
fn a_withdrawn_grant_ends_the_session_after_its_io_in_flight_completes() {
    use nvmed_client::{Io, Reconnect, RingOptions};
    use nvmed_server::emulator::EmulatorMode;
    use nvmed_server::policy::{DefaultAccess, Policy};
    const QD: u64 = 32;
    // Every command takes 400 ms at the device: the reload lands while all 32 are there.
    let env = broker_on(
        |e| e.mode = EmulatorMode::Async { latency: Duration::from_millis(400) },
        |c| c.policy = Policy { grants: vec!["0:1".parse().unwrap()], default: DefaultAccess::None },
    );
    let next = Policy { grants: vec!["1000:1".parse().unwrap()], default: DefaultAccess::None };
    env.broker.as_ref().unwrap().set_reloader(Box::new(move || Ok(next.clone())));
    let opts = RingOptions { reconnect: Reconnect::off(), ..RingOptions::default() };
    let mut ring = NvmeRing::open_with(&env.socket, opts).unwrap();
    let id = ring.session().session_id();
    let buf = ring.alloc_buffer((QD * 4096) as usize).unwrap();
    for i in 0..QD {
        ring.prep(Io::read(1, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    let ctl = env.client();
    let deadline = Instant::now() + Duration::from_secs(5);
    while ctl.sessions().unwrap().iter().find(|s| s.id == id).map(|s| s.counters.in_flight) != Some(QD) {
        assert!(Instant::now() < deadline, "the reads never got to the device");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ctl.status().unwrap().registered_bytes >= QD * 4096);
    assert_eq!(ctl.reload().unwrap(), (0, 1), "the session loses its grant");
    // Still there while its reads are at the device.
    assert!(ctl.sessions().unwrap().iter().any(|s| s.id == id), "ended before its I/O drained");
    // Every read completes, successfully; then the session is over.
    let (mut out, mut ended) = (Vec::new(), None);
    while out.len() < QD as usize {
        if let Err(e) = ring.wait(QD as usize - out.len(), &mut out, Some(Duration::from_secs(5))) {
            // The ring says it is closed once drained: what it completed is in its CQ.
            ring.poll(&mut out).unwrap();
            ended = Some(e);
            break;
        }
    }
    let mut tags: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..QD).collect::<Vec<_>>(), "in-flight reads lost: {ended:?}");
    assert!(out.iter().all(|c| c.status.is_success()), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let ended = match ended {
        Some(e) => e,
        None => loop {
            if let Err(e) = ring.read(1, 0, buf, 0, 4096) {
                break e;
            }
            assert!(Instant::now() < deadline, "the session outlived its withdrawn grant");
        },
    };
    assert!(
        matches!(
            ended,
            nvmed_client::Error::RingFaulted(Some(nvmed_proto::RingFault::Closed))
                | nvmed_client::Error::BrokerGone
        ),
        "{ended:?}"
    );
    // Released: gone from the registry, its memory unregistered.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = ctl.status().unwrap();
        if s.sessions == 0 && s.registered_bytes == 0 && s.registered_buffers == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "not released: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ctl.sessions().unwrap().is_empty());
    let j = json(&nvmectl(&env, &["status", "--json"]));
    assert_eq!((j["sessions"].as_u64(), j["registered_bytes"].as_u64()), (Some(0), Some(0)), "{j}");
}

#[test]
fn sessions_are_listed_page_by_page_and_any_number_fits() {
    // More sessions than one page holds (each session one control connection, no ring).
    let n = nvmed_proto::admin::SESSIONS_PAGE_MAX as usize + 100;
    let env = broker(|c| {
        c.max_sessions = n + 8;
        c.quotas = nvmed_server::broker::QuotaSettings::derive(&nvmed_server::broker::QuotaRequest {
            max_sessions: n + 8,
            sessions_per_uid: Some(n + 8),
            connections_per_uid: Some(n + 8),
            admin_reserve: 4,
            ..Default::default()
        });
    });
    let sessions: Vec<NvmeSession> = (0..n).map(|_| NvmeSession::open(&env.socket).unwrap()).collect();
    let mut ids: Vec<u64> = sessions.iter().map(|s| s.session_id()).collect();
    ids.sort_unstable();
    let ctl = env.client();
    // Small pages by hand: in order of id, each after the last, `more` until the end.
    let mut seen = Vec::new();
    let mut after = None;
    let mut pages = 0;
    loop {
        let AdminResponse::SessionsPage { sessions, more } =
            ctl.request(&AdminRequest::SessionsPage { after, max: 500 }).unwrap()
        else {
            panic!("not a page")
        };
        pages += 1;
        assert!(sessions.len() <= 500);
        seen.extend(sessions.iter().map(|s| s.id));
        after = seen.last().copied();
        if !more {
            break;
        }
    }
    assert_eq!(pages, n.div_ceil(500));
    assert_eq!(seen, ids, "every session once, in order of id");
    // A page past the end is empty and says so.
    let last = ctl.request(&AdminRequest::SessionsPage { after, max: 10 }).unwrap();
    assert_eq!(last, AdminResponse::SessionsPage { sessions: vec![], more: false });
    // nvmectl's own listing pages through them all.
    let all: Vec<u64> = ctl.sessions().unwrap().iter().map(|s| s.id).collect();
    assert_eq!(all, ids);
}

/// `nvmectl health` exits 2 when a controller's log cannot be read (here: the controller never
/// answers the Get Log Page, is reset, and the next read is paused), saying why on stderr,
/// with the table or JSON still printed.
#[test]
fn health_exits_2_when_a_controller_is_in_trouble() {
    use nvmed_server::emulator::inject::{FaultAction, FaultRule};
    let env = broker_on(
        |e| {
            e.faults = vec![FaultRule {
                nth: 1,
                action: FaultAction::LogPageHang,
                bad_block: None,
                controller: None,
            }]
        },
        |_| {},
    );
    let out = nvmectl(&env, &["health", "--json"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    let h: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(h[0]["smart"].is_null(), "{h}");
    let e: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!((e["error"].as_str(), e["exit"].as_i64()), (Some("controller_trouble"), Some(2)), "{e}");
    let m = e["message"].as_str().unwrap();
    assert!(m.starts_with("controller 0: ") && m.contains("admin command"), "{m}");
    let out = nvmectl(&env, &["health"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("paused for"), "{:?}", out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("unavailable"), "{:?}", out);
}

#[test]
fn top_keeps_going_while_the_broker_restarts() {
    use std::io::BufRead;
    let mut env = broker(|_| {});
    let mut top = Command::new(env!("CARGO_BIN_EXE_nvmectl"))
        .arg("--admin-socket")
        .arg(&env.admin)
        .args(["top", "--json", "--interval", "0.1", "--iterations", "1000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = top.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next = || -> serde_json::Value {
        let line = rx.recv_timeout(Duration::from_secs(30)).expect("top keeps printing");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    };
    assert!(next()["sessions"].is_array());
    // The broker goes away: top says so and keeps trying (it ended with the first error).
    env.broker.take().unwrap().shutdown().unwrap();
    let gone = loop {
        let l = next();
        if l.get("error").is_some() {
            break l;
        }
    };
    assert_eq!(gone["error"], "not_running", "{gone}");
    assert!(next().get("error").is_some(), "still away, still running");
    // A broker is back on the same socket with a client: top shows it, rates from its next
    // refresh on.
    let emulator = EmulatorConfig {
        namespaces: vec![EmulatedNamespace {
            backend: Box::new(MemoryBackend::new(NAMESPACE).unwrap()),
            lba_size: 512,
        }],
        vectors: 3,
        ..Default::default()
    };
    env.broker = Some(start_broker(emulator, &env.socket, &env.admin, |_| {}));
    let _ring = NvmeRing::open(&env.socket).unwrap();
    let back = loop {
        let l = next();
        if l.get("sessions").is_some() {
            break l;
        }
    };
    assert!(back["interval_secs"].is_null(), "no rate across the restart: {back}");
    if let Some(s) = back["sessions"].as_array().unwrap().first() {
        assert!(s.get("iops").is_none() && s["counters"].is_object(), "counters, no rates: {s}");
    }
    // Measured again from the next refresh (the ring may open a refresh or two later).
    let l = next();
    assert!(l["interval_secs"].as_f64().is_some(), "{l}");
    let mut l = l;
    while l["sessions"].as_array().unwrap().is_empty() {
        l = next();
    }
    assert_eq!(l["sessions"][0]["rings"], 1, "{l}");
    assert!(top.try_wait().unwrap().is_none(), "top still runs");
    let _ = top.kill();
    let _ = top.wait();
}

#[test]
fn reset_restarts_a_controller_under_io_and_the_clients_see_no_error() {
    use nvmed_server::emulator::EmulatorMode;
    // Commands spend 5 ms at the device: a reset finds some in flight on both I/O threads.
    let env = broker_on(|e| e.mode = EmulatorMode::Async { latency: Duration::from_millis(5) }, |_| {});
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<Worker> = (0..2).map(|i| worker(&env.socket, 2, i, stop.clone())).collect();
    let before: Vec<u64> = env.client().sessions().unwrap().iter().map(|s| s.counters.completed).collect();
    let out = nvmectl(&env, &["reset", "0", "--json"]);
    let r = json(&out);
    assert_eq!(
        (r["controller"].as_u64(), r["state"].as_str(), r["resets"].as_u64()),
        (Some(0), Some("running"), Some(1)),
        "{r}"
    );
    let text = String::from_utf8(nvmectl(&env, &["reset", "0"]).stdout).unwrap();
    assert_eq!(text, "controller 0 reset: running (2 resets since nvmed started)\n");
    // The clients go on (each ring's I/O was sent again), without an error.
    let t = Instant::now();
    loop {
        let now = env.client().sessions().unwrap();
        if now.iter().zip(&before).all(|(s, b)| s.counters.completed > b + 20) {
            assert!(now.iter().all(|s| s.counters.errors == 0), "{now:#?}");
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the clients stalled after the reset: {now:#?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // No such controller: refused, nothing happens.
    let out = nvmectl(&env, &["reset", "7"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr), "nvmectl: no controller 7 (see `nvmectl status`)\n");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        assert!(w.thread.join().unwrap().expect("no I/O error across the resets") > 0);
    }
}
