//! Clients never notice a broker restart: the client library connects again, creates its rings
//! again, registers its buffers again under the same ids and sends every request that had not
//! completed. A broker that never comes back ends in a clear error after the backoff budget.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use nvmed_client::testkit::pattern;
use nvmed_client::{
    BrokerStatus, Error, Io, NvmeRing, NvmeSession, Reconnect, RingOptions, SessionOptions, Status,
};

const MIB: u64 = 1 << 20;

/// A broker on a backing file (so data outlives the process), with a device slow enough that
/// requests are at the device when it is killed.
fn persistent_broker(latency_us: &str) -> TestBroker {
    let dir = scratch_dir();
    let file = dir.join("disk.img");
    let file = file.to_str().unwrap().to_string();
    TestBroker::start_in(
        dir,
        &["--backing", &file, "--emulator-mode", "async", "--emulator-latency-us", latency_us],
    )
}

#[test]
fn a_client_goes_on_through_a_broker_killed_and_restarted() {
    // 500 ms per command: the 64 writes are surely seen at the device before the kill.
    let mut broker = persistent_broker("500000");
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer((64 * 4096) as usize).unwrap();
    let spare = ring.alloc_buffer(4096).unwrap();
    ring.unregister_buffer(spare).unwrap(); // a hole in the ids: the others must keep theirs
    let back = ring.alloc_buffer((64 * 4096) as usize).unwrap();
    pattern(7, ring.buffer_mut(buf, 0, 64 * 4096).unwrap());
    // 64 writes at the device when the broker is killed.
    for i in 0..64u64 {
        ring.prep(Io::write(ns, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    common::wait_until("the 64 writes at the device", Duration::from_secs(5), || {
        ring.stats().unwrap().in_flight == 64
    });
    let epoch = ring.connection_epoch();
    assert!(!ring.broker_closed());
    broker.kill9();
    // An event loop asks before it sleeps on the completion doorbell (a killed broker sets no
    // flag in the ring).
    common::wait_until("the broker's end seen", Duration::from_secs(5), || ring.broker_closed());
    let t = Instant::now();
    broker.restart();
    // The application only waits: its completions come, from the new broker.
    let mut out = Vec::new();
    while out.len() < 64 {
        ring.wait(64 - out.len(), &mut out, Some(Duration::from_secs(20))).unwrap();
    }
    let mut tags: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    tags.sort_unstable();
    assert_eq!(tags, (0..64).collect::<Vec<_>>(), "each request completes exactly once");
    assert!(out.iter().all(|c| c.status.is_success()), "{out:?}");
    assert_eq!(ring.reconnects(), 1);
    assert_ne!(ring.connection_epoch(), epoch, "a new connection, a new completion fd");
    assert!(!ring.broker_closed());
    eprintln!("recovered in {:?}", t.elapsed());
    // The data is there, read through the same buffer ids.
    ring.read(ns, 0, back, 0, 64 * 4096).unwrap();
    assert!(ring.buffer(back, 0, 64 * 4096).unwrap() == ring.buffer(buf, 0, 64 * 4096).unwrap());
    let stats = ring.stats().unwrap();
    assert_eq!((stats.buffers, stats.in_flight, stats.rings), (2, 0, 1));
}

#[test]
fn several_rings_and_shared_buffers_come_back_together() {
    let mut broker = persistent_broker("1000");
    let session = NvmeSession::open(&broker.socket).unwrap();
    let shared = session.alloc_shared(MIB as usize).unwrap();
    let mut rings: Vec<NvmeRing> = (0..2).map(|_| session.new_ring().unwrap()).collect();
    let ns = session.namespaces()[0].nsid;
    let data: Vec<u8> = (0..MIB).map(|i| (i * 7 % 251) as u8).collect();
    shared.write_at(0, &data).unwrap();
    rings[0].write(ns, 0, shared.id(), 0, (MIB / 2) as u32).unwrap();
    broker.kill9();
    broker.restart();
    // Ring 1 learns of the new broker while ring 0 was the one to reconnect, or the reverse.
    rings[1].write(ns, MIB / 2, shared.id(), MIB / 2, (MIB / 2) as u32).unwrap();
    rings[0].read(ns, 0, shared.id(), 0, MIB as u32).unwrap();
    let mut back = vec![0u8; MIB as usize];
    shared.read_at(0, &mut back).unwrap();
    assert!(back == data);
    assert_eq!(session.reconnects(), 1, "one reconnect for the whole session");
    assert_eq!(session.stats().unwrap().rings, 2);
    // A ring already on the live connection, asked to reconnect (as an event loop does that
    // saw the old connection hang up, which other handles kept open), does nothing: connecting
    // again would open a second session.
    let mut out = Vec::new();
    for r in &mut rings {
        assert_eq!(r.reconnect(&mut out).unwrap(), 0);
    }
    assert_eq!(session.reconnects(), 1, "no second reconnect");
    assert_eq!(session.stats().unwrap().rings, 2);
}

#[test]
fn a_broker_that_never_returns_ends_in_a_clear_error() {
    let mut broker = TestBroker::start(&[]);
    let reconnect = Reconnect { budget: Duration::from_millis(500), ..Reconnect::default() };
    let opts = RingOptions { reconnect, ..RingOptions::default() };
    let mut ring = NvmeRing::open_with(&broker.socket, opts).unwrap();
    let buf = ring.alloc_buffer(4096).unwrap();
    broker.kill9();
    let t = Instant::now();
    match ring.read(1, 0, buf, 0, 4096) {
        Err(Error::ReconnectFailed { .. }) => {}
        other => panic!("expected ReconnectFailed, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_secs(5), "gave up after {:?}", t.elapsed());
    // Session calls give up the same way.
    let s = NvmeSession::open_with(&broker.socket, SessionOptions::default());
    assert!(matches!(s, Err(Error::Connect { .. })), "{s:?}");
}

#[test]
fn a_clean_restart_is_survived_too() {
    let mut broker = persistent_broker("100");
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8192).unwrap();
    pattern(3, ring.buffer_mut(buf, 0, 4096).unwrap());
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    assert!(broker.stop(), "SIGTERM");
    broker.restart();
    ring.read(ns, 0, buf, 4096, 4096).unwrap();
    assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap());
    assert_eq!(ring.reconnects(), 1);
}

/// `ringbench`, built beside `nvmed` by `cargo test --workspace` (scripts/test.sh).
fn ringbench() -> std::path::PathBuf {
    let nvmed = std::path::Path::new(env!("CARGO_BIN_EXE_nvmed"));
    let rb = nvmed.with_file_name("ringbench");
    assert!(rb.exists(), "{} missing: build it first (cargo build -p ringbench)", rb.display());
    rb
}

#[test]
fn ringbench_verify_survives_kill_dash_nine_of_the_broker() {
    let mut broker = persistent_broker("200");
    let child = Command::new(ringbench())
        .args(["--socket", broker.socket.to_str().unwrap(), "--rw", "randrw", "--bs", "4k"])
        .args(["--iodepth", "16", "--numjobs", "4", "--size", "32M", "--runtime", "4", "--verify"])
        .args(["--output-format", "json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Killed once ringbench is connected and moving data (the device's DMA count, which root
    // sees broker-wide, grows).
    {
        let mut me = broker.connect();
        let start = me.stats().unwrap().device_dma_bytes.unwrap();
        common::wait_until("ringbench's I/O", Duration::from_secs(20), || {
            let s = me.stats().unwrap();
            s.broker_sessions >= 2 && s.device_dma_bytes.unwrap() >= start + (4 << 20)
        });
    }
    broker.kill9();
    std::thread::sleep(Duration::from_millis(200)); // nobody listening for a while
    broker.restart();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ringbench failed across the restart: {err}");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["total"]["verified_reads"].as_u64().unwrap() > 100, "{}", r["total"]);
    assert!(r["reconnects"].as_u64().unwrap() >= 1, "ringbench reports no reconnect: {r}");
}

/// Starts `nvmed` as systemd would with a `.socket` unit: the listening socket as fd 3,
/// `LISTEN_FDS=1` and `LISTEN_PID` its own pid.
fn start_activated(listener: &std::os::fd::OwnedFd, socket: &std::path::Path) -> std::process::Child {
    use std::io::BufRead;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let fd = listener.as_raw_fd();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "LISTEN_PID=$$ LISTEN_FDS=1 exec \"$0\" \"$@\"", env!("CARGO_BIN_EXE_nvmed")])
        .args(["--emulate", "--size", "16M", "--socket", socket.to_str().unwrap()])
        .env("NVMED_LOG", "warn")
        .stdout(std::process::Stdio::piped());
    // SAFETY: between fork and exec the child only calls dup2 (async-signal-safe) on
    // descriptors it owns: the listener becomes its fd 3, without close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    assert!(line.contains("ready"), "nvmed did not start on the passed socket: {line:?}");
    child
}

#[test]
fn socket_activation_keeps_connects_waiting_across_a_restart() {
    use nix::sys::socket::{bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr};
    use std::os::fd::AsRawFd;
    let dir = scratch_dir();
    let path = dir.join("activated.sock");
    // The service manager's socket: it outlives every broker process.
    let listener = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::empty(), None).unwrap();
    bind(listener.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
    listen(&listener, Backlog::new(16).unwrap()).unwrap();
    let mut broker = start_activated(&listener, &path);
    let mut ring = NvmeRing::open(&path).unwrap();
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.write(1, 0, buf, 0, 4096).unwrap();
    broker.kill().unwrap();
    broker.wait().unwrap();
    assert!(path.exists(), "the activated socket's file must stay");
    // A client that connects while no broker runs waits in the backlog...
    let late = std::thread::spawn({
        let path = path.clone();
        move || NvmeSession::open(&path).map(|s| s.namespaces().len())
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!late.is_finished(), "nobody serves the socket, yet the client was answered");
    // ...and is served by the next broker, as is the client that was there before.
    let mut broker = start_activated(&listener, &path);
    assert_eq!(late.join().unwrap().unwrap(), 1);
    ring.read(1, 0, buf, 0, 4096).unwrap();
    assert_eq!(ring.reconnects(), 1);
    broker.kill().unwrap();
    broker.wait().unwrap();
}

#[test]
fn requests_outstanding_when_the_session_ends_for_good_are_answered() {
    // Reconnecting off, a broker killed with a read in flight: the read is answered with
    // SessionEnded (the device no longer uses the buffer), so its buffer is free again; before,
    // it stayed "in flight" in the client for good.
    let mut broker = TestBroker::start(&["--emulator-mode", "async", "--emulator-latency-us", "2000000"]);
    let mut ring = NvmeRing::open_with(&broker.socket, no_reconnect()).unwrap();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.prep(Io::read(ns, 0, 4096, buf, 0).user_data(5)).unwrap();
    ring.submit().unwrap();
    assert!(matches!(ring.buffer(buf, 0, 4096), Err(Error::InFlight { .. })));
    broker.kill9();
    let mut out = Vec::new();
    let mut failed = None;
    let t = Instant::now();
    while out.is_empty() {
        match ring.poll(&mut out) {
            Ok(_) => {}
            Err(e) => failed = Some(e),
        }
        assert!(t.elapsed() < Duration::from_secs(10), "never answered ({failed:?})");
    }
    assert!(matches!(failed, Some(Error::BrokerGone)), "{failed:?}");
    assert_eq!(out.len(), 1);
    assert_eq!((out[0].user_data, out[0].status), (5, Status::Broker(BrokerStatus::SessionEnded)));
    assert!(ring.buffer(buf, 0, 4096).is_ok(), "the buffer is still counted in flight");
}
