//! Regression tests for the defects that let one client hurt the broker or other tenants
//! (resource exhaustion, descriptor leaks, lock-outs, stalls, starvation, unsafe resets), each
//! against a real `nvmed` process unless it needs to look inside the broker.

mod common;

use std::io::{BufRead, BufReader};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use nvmed_client::testkit::random_write_read;
use nvmed_client::{BrokerStatus, Error, Io, NvmeRing, RingOptions, Status};
use nvmed_proto::control::{decode, encode};
use nvmed_proto::transport;
use nvmed_proto::{ControlError, Request, Response, RingFault};

const MIB: u64 = 1 << 20;

fn pid(broker: &TestBroker) -> u32 {
    broker.child.as_ref().unwrap().id()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).unwrap().count()
}

fn mappings(pid: u32) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap().lines().count()
}

fn sealed_memfd(len: u64) -> memfd::Memfd {
    let m = memfd::MemfdOptions::new().allow_sealing(true).create("buf").unwrap();
    m.as_file().set_len(len).unwrap();
    m.add_seals(&[memfd::FileSeal::SealShrink]).unwrap();
    m
}

fn raw_connect(path: &std::path::Path) -> OwnedFd {
    use nix::sys::socket::{connect, UnixAddr};
    let s = socket_fd();
    connect(s.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
    s
}

fn socket_fd() -> OwnedFd {
    use nix::sys::socket::*;
    socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap()
}

fn raw_call(s: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> Response {
    transport::send(s.as_fd(), bytes, fds).unwrap();
    decode(&transport::recv(s.as_fd()).unwrap().bytes).unwrap()
}

/// Asks for a 16-entry ring on a raw connection: the reply, with the ring's descriptors.
fn raw_create_ring(s: &OwnedFd) -> transport::Received {
    let req = encode(&Request::CreateRing { sq_entries: 16, cq_entries: 16, thread: None });
    transport::send(s.as_fd(), &req, &[]).unwrap();
    transport::recv(s.as_fd()).unwrap()
}

fn hello(s: &OwnedFd) -> Response {
    raw_call(
        s,
        &encode(&Request::Hello {
            version: nvmed_proto::PROTOCOL_VERSION,
            client_name: "raw".into(),
            resumes: None,
        }),
        &[],
    )
}

/// The broker is alive and a new client can do verified I/O.
fn others_unaffected(broker: &mut TestBroker) {
    assert!(broker.alive(), "the broker died");
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8192).unwrap();
    pattern(9, ring.buffer_mut(buf, 0, 4096).unwrap());
    ring.write(ns, MIB, buf, 0, 4096).unwrap();
    ring.read(ns, MIB, buf, 4096, 4096).unwrap();
    assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap());
}

// ---- Another uid, in a child process -----------------------------------------------------

/// What an `nvmed-test-peer hold` process reports.
struct Helper {
    child: Child,
    held: usize,
    refusal: Option<String>,
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `nvmed-test-peer hold` as `uid`: it takes up to `n` connections (`mode` "connections",
/// never saying Hello) or sessions ("sessions") and holds them until killed.
fn as_uid(uid: u32, socket: &std::path::Path, mode: &str, n: usize) -> Helper {
    let mut child = Command::new(runnable_by_anyone(env!("CARGO_BIN_EXE_nvmed-test-peer")))
        .args(["hold", mode, &n.to_string()])
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (mut held, mut refusal) = (0, None);
    for line in out.lines() {
        let line = line.unwrap();
        if let Some(i) = line.find("REFUSED ") {
            refusal = Some(line[i + 8..].to_string());
        }
        if let Some(i) = line.find("HELD ") {
            held = line[i + 5..].trim().parse().unwrap();
            break;
        }
    }
    Helper { child, held, refusal }
}

#[test]
fn a_uid_s_control_requests_are_paced_and_another_uid_is_not_slowed() {
    // 50 control requests a second per uid, after a burst of 50: root's 150 Stats take two
    // seconds (the broker's CPU a uid can take by looping on requests is bounded)...
    let broker = TestBroker::start(&["--control-rate-per-uid", "50", "--socket-mode", "666"]);
    let mut ring = broker.connect();
    let paced = std::thread::spawn(move || {
        let start = Instant::now();
        for _ in 0..150 {
            ring.stats().unwrap();
        }
        start.elapsed()
    });
    // ...while uid 1000, meanwhile, opens a session, does I/O and asks for stats and health
    // (a dozen requests, within its own burst) without waiting on root's pace.
    std::thread::sleep(Duration::from_millis(300));
    let start = Instant::now();
    let out = peer_output(1000, &["stats"], &broker.socket);
    let other = start.elapsed();
    assert!(out.contains("STATS completed="), "{out}");
    let paced = paced.join().unwrap();
    assert!(paced >= Duration::from_millis(1800), "150 requests at 50 a second took {paced:?}");
    assert!(other < Duration::from_secs(5), "another uid waited on root's pace: {other:?}");
}

// ---- 1. Mappings are bounded ------------------------------------------------------------

#[test]
fn registered_buffers_are_bounded_per_uid_and_in_all() {
    let mut broker = TestBroker::start(&["--max-buffers-per-uid", "30"]);
    let before = mappings(pid(&broker));
    let mut a = broker.connect();
    let mut b = broker.connect();
    for i in 0..30 {
        let r = if i % 2 == 0 { &mut a } else { &mut b };
        r.alloc_buffer(4096).unwrap();
    }
    match a.alloc_buffer(4096) {
        Err(Error::Refused(ControlError::UidLimit { uid: 0, what })) => {
            assert!(what.contains("30 registered buffers per uid"), "{what}")
        }
        other => panic!("expected the per-uid buffer limit, got {other:?}"),
    }
    assert!(mappings(pid(&broker)) >= before + 30);
    drop((a, b));
    // The buffers count until the reaper has unmapped them, shortly after the sessions end.
    let mut probe = broker.connect();
    wait_until("the closed sessions' buffers to be released", Duration::from_secs(5), || {
        probe.alloc_buffer(4096).is_ok()
    });
    drop(probe);
    others_unaffected(&mut broker);

    // Broker-wide (root's own per-uid limit set higher).
    let mut broker = TestBroker::start(&["--max-buffers", "20", "--max-buffers-per-uid", "1000"]);
    let mut a = broker.connect();
    for _ in 0..20 {
        a.alloc_buffer(4096).unwrap();
    }
    match a.alloc_buffer(4096) {
        Err(Error::Refused(ControlError::ResourceExhausted(m))) => {
            assert!(m.contains("at most 20 registered buffers for all clients"), "{m}")
        }
        other => panic!("expected the broker-wide buffer limit, got {other:?}"),
    }
    // Unregistering gives the mapping back (once the reaper has unmapped it).
    let ids: Vec<u32> = (0..20).collect();
    for id in ids {
        let r = a.control(&Request::UnregisterBuffer { buffer_id: id }, &[]);
        assert!(matches!(r, Ok(Response::BufferUnregistered)), "{r:?}");
    }
    let mut again = None;
    wait_until("a buffer slot to come back", Duration::from_secs(5), || {
        let m = sealed_memfd(4096);
        again = Some(
            a.control(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }, &[m.as_file().as_fd()]),
        );
        matches!(again, Some(Ok(Response::BufferRegistered { .. })))
    });
    others_unaffected(&mut broker);
}

#[test]
fn default_buffer_limit_leaves_room_in_vm_max_map_count() {
    // The attack was 64 sessions x 1024 buffers from one uid: the per-uid default stops it at
    // a quarter of half of vm.max_map_count, with a clear error, and the broker serves on.
    let mut broker = TestBroker::start(&[]);
    let per_uid = (nvmed_server::broker::max_map_count() / 2 / 4) as usize;
    let mut rings: Vec<NvmeRing> = Vec::new();
    let mut registered = 0;
    let refusal = 'outer: loop {
        let mut r = broker.connect();
        for _ in 0..1024 {
            let m = sealed_memfd(4096);
            match r
                .control(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }, &[m.as_file().as_fd()])
            {
                Ok(Response::BufferRegistered { .. }) => registered += 1,
                Ok(other) => panic!("{other:?}"),
                Err(e) => break 'outer e,
            }
        }
        rings.push(r);
        assert!(rings.len() < 16, "no limit reached after {registered} buffers");
    };
    assert!(matches!(refusal, Error::Refused(ControlError::UidLimit { .. })), "{refusal:?}");
    assert_eq!(registered, per_uid);
    drop(rings);
    let mut probe = broker.connect();
    wait_until("the sessions' buffers to be released", Duration::from_secs(10), || {
        probe.alloc_buffer(4096).is_ok()
    });
    drop(probe);
    others_unaffected(&mut broker);
}

// ---- 2. Descriptors are never leaked ----------------------------------------------------

#[test]
fn fd_flood_leaves_no_descriptor_behind() {
    let mut broker = TestBroker::start(&[]);
    let s = raw_connect(&broker.socket);
    assert!(matches!(hello(&s), Response::Hello { .. }));
    let before = open_fds(pid(&broker));
    // Five 32 MiB memfds per message: once, the broker kept four of them per message.
    let memfds: Vec<memfd::Memfd> = (0..5).map(|_| sealed_memfd(32 * MIB)).collect();
    let fds: Vec<_> = memfds.iter().map(|m| m.as_file().as_fd()).collect();
    let reg = encode(&Request::RegisterBuffer { offset: 0, len: 4096, id: None });
    for i in 0..1000 {
        let r = raw_call(&s, &reg, &fds);
        assert_eq!(r, Response::Error(ControlError::TooManyFds { limit: 3 }), "message {i}");
    }
    // Junk with descriptors too, and more than the kernel lets one message carry.
    for _ in 0..100 {
        let r = raw_call(&s, &[0xff; 9], &fds[..2]);
        assert!(matches!(r, Response::Error(_)), "{r:?}");
    }
    // The last message's descriptors close right after its answer is sent.
    let p = pid(&broker);
    wait_until("the broker to hold no received descriptor", Duration::from_secs(2), || open_fds(p) == before);
    drop(s);
    others_unaffected(&mut broker);
}

#[test]
fn rings_are_bounded_per_uid() {
    let mut broker = TestBroker::start(&["--max-rings-per-uid", "2"]);
    let session = nvmed_client::NvmeSession::open(&broker.socket).unwrap();
    let a = session.new_ring().unwrap();
    let _b = session.new_ring().unwrap();
    match session.new_ring() {
        Err(Error::Refused(ControlError::UidLimit { uid: 0, what })) => {
            assert!(what.contains("2 rings per uid"), "{what}")
        }
        other => panic!("a third ring of the uid: {other:?}"),
    }
    // Another session of the same uid counts too; a closed ring gives its unit back.
    let other = nvmed_client::NvmeSession::open(&broker.socket).unwrap();
    assert!(
        matches!(other.new_ring(), Err(Error::Refused(ControlError::UidLimit { uid: 0, .. }))),
        "another session's third ring of the uid"
    );
    drop(a);
    let _c = other.new_ring().unwrap();
    drop((_b, _c, session, other));
    others_unaffected(&mut broker);
}

#[test]
fn registered_bytes_are_bounded_per_uid_across_sessions() {
    let mut broker = TestBroker::start(&["--max-registered-bytes-per-uid", "8M"]);
    let mut a = broker.connect();
    let mut b = broker.connect();
    let _a1 = a.alloc_buffer(4 << 20).unwrap();
    let b1 = b.alloc_buffer(4 << 20).unwrap();
    match a.alloc_buffer(4 << 20) {
        Err(Error::Refused(ControlError::UidLimit { uid: 0, what })) => {
            assert!(what.contains("8388608 registered bytes per uid"), "{what}")
        }
        other => panic!("a third 4 MiB of the uid: {other:?}"),
    }
    // Given back when a buffer is unregistered, whichever session held it.
    b.unregister_buffer(b1).unwrap();
    let _a2 = a.alloc_buffer(4 << 20).unwrap();
    drop((a, b));
    others_unaffected(&mut broker);
    // Without the option: three quarters of --max-registered-total, so one uid never takes
    // all of it.
    let mut broker = TestBroker::start(&["--max-registered-total", "16M"]);
    let mut a = broker.connect();
    let _held: Vec<_> = (0..3).map(|_| a.alloc_buffer(4 << 20).unwrap()).collect();
    match a.alloc_buffer(4 << 20) {
        Err(Error::Refused(ControlError::UidLimit { uid: 0, what })) => {
            assert!(what.contains("12582912 registered bytes per uid"), "{what}")
        }
        other => panic!("a fourth 4 MiB of the uid under a 16 MiB total: {other:?}"),
    }
    drop(a);
    others_unaffected(&mut broker);
}

// ---- 3. Hugetlb memfds ------------------------------------------------------------------

/// Makes sure two free 2 MiB huge pages exist; gives the old setting back on drop.
struct HugePages(Option<String>);

impl HugePages {
    fn reserve() -> Result<Self, String> {
        let free = || -> u64 {
            let info = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
            info.lines()
                .find_map(|l| l.strip_prefix("HugePages_Free:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        if free() >= 2 {
            return Ok(Self(None));
        }
        let path = "/proc/sys/vm/nr_hugepages";
        let old = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
        let want = old.trim().parse::<u64>().unwrap_or(0) + 2;
        let guard = Self(Some(old));
        std::fs::write(path, want.to_string()).map_err(|e| format!("writing {path}: {e}"))?;
        if free() < 2 {
            return Err("the kernel could not reserve 2 huge pages".into());
        }
        Ok(guard)
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        if let Some(old) = &self.0 {
            let _ = std::fs::write("/proc/sys/vm/nr_hugepages", old.trim());
        }
    }
}

#[test]
fn hugetlb_memfds_register_only_whole_huge_pages_and_serve_io() {
    let _pages = match HugePages::reserve() {
        Ok(p) => p,
        Err(why) => {
            println!("SKIPPED hugetlb_memfds_register_only_whole_huge_pages_and_serve_io: {why}");
            return;
        }
    };
    let m = match memfd::MemfdOptions::new()
        .allow_sealing(true)
        .hugetlb(Some(memfd::HugetlbSize::Huge2MB))
        .create("huge")
    {
        Ok(m) => m,
        Err(e) => {
            println!("SKIPPED hugetlb_memfds_register_only_whole_huge_pages_and_serve_io: MFD_HUGETLB: {e}");
            return;
        }
    };
    m.as_file().set_len(2 * MIB).unwrap();
    m.add_seals(&[memfd::FileSeal::SealShrink]).unwrap();
    let mut broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let fd = [m.as_file().as_fd()];
    for (offset, len) in [(0, 4096), (0, 2 * MIB - 4096), (4096, 4096)] {
        match ring.control(&Request::RegisterBuffer { offset, len, id: None }, &fd) {
            Err(Error::Refused(ControlError::BadBufferLength { reason, .. })) => {
                assert!(reason.contains("page size 2097152"), "{reason}")
            }
            other => panic!("expected a huge-page size refusal for {offset}+{len}, got {other:?}"),
        }
    }
    // Whole huge pages work, and register/unregister cycles leave no mapping behind.
    let cycle = |ring: &mut NvmeRing| {
        let Ok(Response::BufferRegistered { buffer_id }) =
            ring.control(&Request::RegisterBuffer { offset: 0, len: 2 * MIB, id: None }, &fd)
        else {
            panic!("a whole huge page was refused")
        };
        let r = ring.control(&Request::UnregisterBuffer { buffer_id }, &[]);
        assert!(matches!(r, Ok(Response::BufferUnregistered)), "{r:?}");
    };
    cycle(&mut ring);
    let p = pid(&broker);
    let mut settled = 0;
    wait_until("the reaper to finish", Duration::from_secs(5), || {
        settled = mappings(p);
        std::thread::sleep(Duration::from_millis(50));
        settled == mappings(p)
    });
    for _ in 0..200 {
        cycle(&mut ring);
    }
    wait_until("every huge-page mapping to be unmapped", Duration::from_secs(5), || mappings(p) <= settled);

    // I/O straight into and out of the huge page: a pattern written from its first half reads
    // back into its second half, also through a vectored request whose segments cross the
    // halves at odd offsets (the broker builds their list itself).
    let dup = m.as_file().try_clone().unwrap();
    let huge = nvmed_client::MemfdBuffer::from_sealed_memfd(OwnedFd::from(dup), (2 * MIB) as usize).unwrap();
    let buf = ring.register_buffer(huge).unwrap();
    let ns = ring.namespaces()[0].nsid;
    pattern(41, ring.buffer_mut(buf, 0, MIB).unwrap());
    ring.write(ns, 4 * MIB, buf, 0, MIB as u32).unwrap();
    ring.read(ns, 4 * MIB, buf, MIB, MIB as u32).unwrap();
    let (a, b) = (ring.buffer(buf, 0, MIB).unwrap().to_vec(), ring.buffer(buf, MIB, MIB).unwrap().to_vec());
    assert!(a == b, "the huge page's second half does not hold what its first half wrote");
    ring.buffer_mut(buf, MIB, MIB).unwrap().fill(0);
    let segs = [
        nvmed_client::IoSegment::new(buf, MIB + 512, 64 * 1024 - 512),
        nvmed_client::IoSegment::new(buf, MIB + 128 * 1024, 64 * 1024 + 512),
    ];
    let list = ring.alloc_buffer(4096).unwrap();
    ring.readv(ns, 4 * MIB, &segs, list, 0).unwrap();
    assert!(ring.buffer(buf, MIB + 512, 64 * 1024 - 512).unwrap() == &a[..64 * 1024 - 512]);
    assert!(ring.buffer(buf, MIB + 128 * 1024, 64 * 1024 + 512).unwrap() == &a[64 * 1024 - 512..128 * 1024]);
    others_unaffected(&mut broker);
}

// ---- 4. No uid can lock the others out ---------------------------------------------------

/// What `nvmed-test-peer stats` prints, run as `uid` (or as this process's uid with `None`).
fn peer_stats(uid: Option<u32>, socket: &std::path::Path) -> std::collections::HashMap<String, String> {
    let mut cmd = Command::new(runnable_by_anyone(env!("CARGO_BIN_EXE_nvmed-test-peer")));
    cmd.arg("stats").arg(socket);
    if let Some(uid) = uid {
        cmd.uid(uid).gid(uid);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("STATS ")).expect("a STATS line");
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn a_client_learns_nothing_of_other_tenants() {
    let broker = TestBroker::start(&["--socket-mode", "666"]);
    // Another tenant's activity: a session kept open with I/O done and a buffer registered.
    let mut other = NvmeRing::open(&broker.socket).unwrap();
    let b = other.alloc_buffer(1 << 20).unwrap();
    for i in 0..64 {
        other.write(1, i << 20, b, 0, 1 << 20).unwrap();
    }
    let user = peer_stats(Some(1000), &broker.socket);
    // Its own figures, in full.
    assert_eq!((user["completed"].as_str(), user["bytes_read"].as_str()), ("2", "4096"), "{user:?}");
    // Nothing broker-wide, and the health log without the device's activity counters.
    assert_eq!(user["broker_wide"], "false", "{user:?}");
    for k in ["broker_sessions", "device_dma_bytes", "broker_buffer_iova_bytes", "thread_device_commands"] {
        assert_eq!(user[k], "0", "{k} tells of other tenants: {user:?}");
    }
    assert_eq!(user["activity_hidden"], "true");
    assert_eq!((user["data_units_read"].as_str(), user["host_write_commands"].as_str()), ("0", "0"));
    assert_eq!(user["temperature_kelvin"], "313", "health figures stay");
    // An operator (root, as the broker runs) sees the broker's figures.
    let root = peer_stats(None, &broker.socket);
    assert_eq!(root["broker_wide"], "true", "{root:?}");
    assert!(root["broker_sessions"].parse::<u64>().unwrap() >= 2, "{root:?}");
    assert!(root["device_dma_bytes"].parse::<u64>().unwrap() >= 64 << 20, "{root:?}");
    assert!(root["thread_device_commands"].parse::<u64>().unwrap() >= 64, "{root:?}");
    assert_eq!(root["activity_hidden"], "false");
    assert!(root["host_write_commands"].parse::<u64>().unwrap() >= 64, "{root:?}");
    drop(other);
}

#[test]
fn one_uid_cannot_take_every_connection_or_session() {
    let mut broker = TestBroker::start(&[
        "--socket-mode",
        "666",
        "--max-sessions",
        "8",
        "--max-sessions-per-uid",
        "3",
        "--max-connections-per-uid",
        "5",
        "--hello-timeout-s",
        "60",
    ]);
    // Idle connections: uid 1000 gets 5 and is refused the 6th, with the reason.
    let c = as_uid(1000, &broker.socket, "connections", 8);
    assert_eq!(c.held, 5);
    let r = c.refusal.as_deref().unwrap_or("");
    assert!(r.contains("UidLimit") && r.contains("1000") && r.contains("5 connections"), "{r}");
    // Sessions: 3 per uid; with 8 in all and 2 kept for root, a third uid is refused.
    let a = as_uid(1001, &broker.socket, "sessions", 4);
    assert_eq!(a.held, 3);
    assert!(a.refusal.as_deref().unwrap_or("").contains("UidLimit"), "{:?}", a.refusal);
    let b = as_uid(1002, &broker.socket, "sessions", 3);
    assert_eq!(b.held, 3);
    let d = as_uid(1003, &broker.socket, "sessions", 1);
    assert_eq!(d.held, 0);
    assert!(d.refusal.as_deref().unwrap_or("").contains("kept for root"), "{:?}", d.refusal);
    // Root still gets in, and does I/O.
    others_unaffected(&mut broker);
    drop((c, a, b, d));
}

#[test]
fn silent_connections_are_closed_after_the_hello_deadline() {
    let mut broker = TestBroker::start(&["--hello-timeout-s", "1"]);
    let s = raw_connect(&broker.socket);
    let start = Instant::now();
    let m = transport::recv(s.as_fd()).expect("the broker explains before closing");
    let waited = start.elapsed();
    assert_eq!(
        decode::<Response>(&m.bytes).unwrap(),
        Response::Error(ControlError::HelloTimeout { seconds: 1 })
    );
    assert!(waited >= Duration::from_millis(900), "closed after {waited:?}");
    assert!(matches!(transport::recv(s.as_fd()), Err(transport::TransportError::Closed)));
    // A session that said Hello has no deadline afterwards.
    let t = raw_connect(&broker.socket);
    assert!(matches!(hello(&t), Response::Hello { .. }));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(matches!(raw_call(&t, &encode(&Request::Stats), &[]), Response::Stats(_)));
    // Requests other than Hello do not push the deadline back: it counts from the connection.
    let u = raw_connect(&broker.socket);
    let start = Instant::now();
    let closed = loop {
        std::thread::sleep(Duration::from_millis(300));
        if transport::send(u.as_fd(), &encode(&Request::Stats), &[]).is_err() {
            break start.elapsed();
        }
        match transport::recv(u.as_fd()) {
            Ok(m) => match decode::<Response>(&m.bytes).unwrap() {
                Response::Error(ControlError::HelloTimeout { seconds: 1 }) => break start.elapsed(),
                Response::Error(ControlError::HelloRequired) => {}
                other => panic!("{other:?}"),
            },
            Err(_) => break start.elapsed(),
        }
        assert!(start.elapsed() < Duration::from_secs(5), "a chatty connection without Hello was kept");
    };
    assert!(closed < Duration::from_millis(2500), "closed after {closed:?}");
    others_unaffected(&mut broker);
}

#[test]
fn a_client_that_does_not_read_its_replies_is_dropped() {
    use nix::sys::socket::{setsockopt, sockopt};
    let mut broker = TestBroker::start(&[]);
    let s = raw_connect(&broker.socket);
    assert!(matches!(hello(&s), Response::Hello { .. }));
    // Requests without reading a reply: the replies fill this socket, then the broker's send
    // waits. It must give up (10 s) and end the session, not hold its thread for ever.
    setsockopt(&s, sockopt::SendTimeout, &nix::sys::time::TimeVal::new(1, 0)).unwrap();
    for _ in 0..100_000 {
        if transport::send(s.as_fd(), &encode(&Request::Stats), &[]).is_err() {
            break;
        }
    }
    // The broker gives up on it after its 10 s send timeout: only the watching session stays.
    {
        let mut me = broker.connect();
        wait_until("the silent session to be dropped", Duration::from_secs(40), || {
            me.stats().unwrap().broker_sessions == 1
        });
    }
    // Reading now must find the end of the connection (after whatever replies are still
    // queued; closing with our requests unread resets it, which drops them).
    setsockopt(&s, sockopt::ReceiveTimeout, &nix::sys::time::TimeVal::new(2, 0)).unwrap();
    let mut replies = 0;
    loop {
        match transport::recv(s.as_fd()) {
            Ok(_) => replies += 1,
            Err(transport::TransportError::Closed) => break,
            Err(transport::TransportError::Io(nix::Error::ECONNRESET)) => break,
            Err(e) => panic!("the connection is still open after {replies} replies: {e}"),
        }
    }
    others_unaffected(&mut broker);
}

// ---- 5. Requests larger than the device queue --------------------------------------------

#[test]
fn a_request_needing_more_commands_than_the_queue_holds_completes() {
    // MDTS 8 KiB and a queue clamped to CAP.MQES (2048 entries): a 16 MiB read is 2048
    // commands, more than the queue has slots. It once hung its ring at 100% CPU.
    let mut broker = TestBroker::start(&["--mdts", "1", "--queue-depth", "65535", "--size", "64M"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0];
    assert_eq!(ns.max_transfer, 16 << 20);
    let buf = ring.alloc_buffer(16 << 20).unwrap();
    pattern(3, ring.buffer_mut(buf, 0, 16 * MIB).unwrap());
    ring.write(ns.nsid, 0, buf, 0, 16 << 20).unwrap();
    ring.buffer_mut(buf, 0, 16 * MIB).unwrap().fill(0);
    ring.read(ns.nsid, 0, buf, 0, 16 << 20).unwrap();
    let mut want = vec![0u8; 16 << 20];
    pattern(3, &mut want);
    assert!(ring.buffer(buf, 0, 16 * MIB).unwrap() == want.as_slice(), "data differs");
    others_unaffected(&mut broker);
}

/// A broker (with `extra` options) on an asynchronous device (50 µs per command) with a queue of
/// 4 entries (3 commands) and 8 KiB transfers: requests of many pieces wait for slots.
fn tiny_queue_broker(extra: &[&str]) -> TestBroker {
    let mut args =
        vec!["--emulator-mode", "async", "--emulator-latency-us", "50", "--queue-depth", "4", "--mdts", "1"];
    args.extend_from_slice(extra);
    TestBroker::start(&args)
}

#[test]
fn tiny_queue_and_split_requests_on_an_asynchronous_device() {
    // A queue of 4 entries (3 commands) on a device that completes out of order, later, with
    // its DMA at completion time: every request completes exactly once, data intact.
    let mut broker = tiny_queue_broker(&[]);
    let mut ring = broker.connect();
    assert!(ring.namespaces()[0].max_transfer >= 1 << 20);
    random_write_read(&mut ring, (0, 8 * MIB), 11, 3);
    // Requests of many pieces, several at once.
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4 << 20).unwrap();
    pattern(12, ring.buffer_mut(buf, 0, 4 * MIB).unwrap());
    for k in 0..4u64 {
        ring.prep(Io::write(ns, 16 * MIB + k * MIB, 1 << 20, buf, k * MIB).user_data(k)).unwrap();
    }
    ring.submit().unwrap();
    let mut out = Vec::new();
    ring.wait(4, &mut out, Some(Duration::from_secs(30))).unwrap();
    assert!(out.iter().all(|c| c.status.is_success()), "{out:?}");
    // Each exactly once: four tags, no duplicate, and nothing more comes.
    let mut tags: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    tags.sort_unstable();
    assert_eq!(tags, [0, 1, 2, 3], "{out:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(ring.poll(&mut out).unwrap(), 0, "a request completed twice: {out:?}");
    let check = ring.alloc_buffer(4 << 20).unwrap();
    ring.read(ns, 16 * MIB, check, 0, 4 << 20).unwrap();
    assert_eq!(ring.buffer(check, 0, 4 * MIB).unwrap(), ring.buffer(buf, 0, 4 * MIB).unwrap());
    others_unaffected(&mut broker);
}

#[test]
fn a_split_request_of_a_tenant_at_its_queue_depth_cap_still_finishes() {
    // qd=1: the tenant may have one request at the device. A 1 MiB write is 128 pieces of
    // 8 KiB on a queue of 3 commands: it is dispatched (the tenant's one request) and its
    // pieces go as slots free up. They must, although the tenant is at its cap until the
    // whole request completes.
    let uid = nix::unistd::getuid().as_raw();
    let grant = format!("{uid}:1:qd=1");
    let mut broker = tiny_queue_broker(&["--grant", &grant]);
    let mut ring = broker.connect();
    let buf = ring.alloc_buffer(2 << 20).unwrap();
    pattern(21, ring.buffer_mut(buf, 0, 2 * MIB).unwrap());
    for k in 0..2u64 {
        ring.prep(Io::write(1, k * MIB, 1 << 20, buf, k * MIB).user_data(k)).unwrap();
    }
    ring.submit().unwrap();
    let mut out = Vec::new();
    ring.wait(2, &mut out, Some(Duration::from_secs(20))).unwrap();
    assert!(out.iter().all(|c| c.status.is_success()), "{out:?}");
    let check = ring.alloc_buffer(2 << 20).unwrap();
    ring.read(1, 0, check, 0, 2 << 20).unwrap();
    assert!(ring.buffer(check, 0, 2 * MIB).unwrap() == ring.buffer(buf, 0, 2 * MIB).unwrap());
    others_unaffected(&mut broker);
}

// ---- 6. A client that never reaps costs nothing -----------------------------------------

#[test]
fn a_client_that_never_reaps_leaves_the_broker_idle_and_is_served_when_it_does() {
    let mut broker = TestBroker::start(&[]);
    let mut ring = broker.connect_with(16, 16);
    for i in 0..16 {
        ring.prep(Io::nop().user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    wait_until("the CQ to fill", Duration::from_secs(5), || ring.ready_completions() == 16);
    // 16 more that cannot be taken until the client reaps.
    for i in 16..32 {
        ring.prep(Io::nop().user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let percent = cpu_percent_over(&broker, Duration::from_secs(2));
    assert!(percent < 5.0, "a broker blocked on a full CQ used {percent:.1}% CPU");
    // Reaping frees the CQ; the broker is woken and completes the rest.
    let mut out = Vec::new();
    ring.wait(32, &mut out, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(out.len(), 32);
    others_unaffected(&mut broker);
}

#[test]
fn a_ring_held_by_its_limit_leaves_the_broker_idle_beside_a_second_controller() {
    // Namespace 1 (controller 0) at 10 IOPS; controller 1 is free. The ring's next entry waits
    // for controller 0 only: that controller 1 could take a command must not keep the I/O
    // thread awake.
    let broker = TestBroker::start(&["--controllers", "2", "--grant", "0:1:iops=10"]);
    let mut ring = broker.connect_with(64, 64);
    let buf = ring.alloc_buffer(32 * 4096).unwrap();
    for i in 0..32u64 {
        ring.prep(Io::read(1, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let percent = cpu_percent_over(&broker, Duration::from_secs(2));
    assert!(percent < 10.0, "a broker whose only work waits for a rate limit used {percent:.1}% CPU");
    // The limit still lets them through, at its rate.
    let mut out = Vec::new();
    ring.wait(32, &mut out, Some(Duration::from_secs(10))).unwrap();
    assert!(out.iter().all(|c| c.status.is_success()), "{out:?}");
}

// ---- 7. No starvation ------------------------------------------------------------------

#[test]
fn a_deep_tenant_cannot_starve_a_shallow_one() {
    let mut broker = TestBroker::start(&[
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "200",
        "--queue-depth",
        "32",
    ]);
    // The deep tenant connects first (the lower session key was always served first).
    let mut deep = broker.connect_with(256, 512);
    let stop = Arc::new(AtomicBool::new(false));
    let max_in_flight = Arc::new(AtomicU64::new(0));
    let deep_thread = {
        let (stop, max_in_flight) = (stop.clone(), max_in_flight.clone());
        std::thread::spawn(move || {
            let ns = deep.namespaces()[0].nsid;
            let buf = deep.alloc_buffer(256 * 4096).unwrap();
            let mut out = Vec::new();
            let mut n = 0u64;
            let mut rounds = 0u64;
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                while deep.in_flight() < 256 {
                    deep.prep(Io::read(ns, (n % 1024) * 4096, 4096, buf, (n % 256) * 4096).user_data(n))
                        .unwrap();
                    n += 1;
                }
                deep.submit().unwrap();
                out.clear();
                deep.wait(1, &mut out, None).unwrap();
                rounds += 1;
                if rounds.is_multiple_of(16) {
                    let s = deep.stats().unwrap();
                    max_in_flight.fetch_max(s.in_flight, Ordering::Relaxed);
                }
            }
            stop.load(Ordering::Relaxed)
        })
    };
    // The deep tenant is filling the device queue before the shallow one starts.
    wait_until("the deep tenant at the device", Duration::from_secs(20), || {
        max_in_flight.load(Ordering::Relaxed) >= 16
    });
    let mut shallow = broker.connect();
    let ns = shallow.namespaces()[0].nsid;
    let buf = shallow.alloc_buffer(4096).unwrap();
    for i in 0..100u64 {
        shallow.read(ns, 8 * MIB + i * 4096, buf, 0, 4096).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    let deep_still_running = deep_thread.join().unwrap();
    assert!(deep_still_running, "the shallow tenant finished only after the deep one stopped");
    let max = max_in_flight.load(Ordering::Relaxed);
    // 31 usable slots; one session may hold at most 31 - 31/4 = 24 of them.
    assert!(max > 0 && max <= 24, "the deep tenant held {max} device slots");
    others_unaffected(&mut broker);
}

// ---- 9. Resets never report I/O finished while the device may still write --------------

#[test]
fn a_controller_stopped_only_by_bus_master_fails_its_commands_and_frees_buffers() {
    let mut broker =
        TestBroker::start(&["--inject", "stuck:2", "--io-timeout-ms", "300", "--emulator-wedge", "reset"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8192).unwrap();
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    // The second command hangs; the reset cannot disable the controller, but clearing Bus
    // Master Enable stops its DMA, so the command may be failed.
    match ring.read(ns, 0, buf, 0, 4096) {
        Err(Error::Io(Status::Broker(BrokerStatus::DeviceReset))) => {}
        other => panic!("expected DeviceReset, got {other:?}"),
    }
    // The controller never came back: later I/O fails at once, without reaching it.
    match ring.read(ns, 0, buf, 0, 4096) {
        Err(Error::Io(Status::Broker(BrokerStatus::DeviceFault))) => {}
        other => panic!("expected DeviceFault, got {other:?}"),
    }
    drop(ring);
    let mut probe = broker.connect();
    wait_until("the session's buffers to be released", Duration::from_secs(5), || {
        probe.stats().unwrap().broker_buffer_iova_bytes == 0
    });
    drop(probe);
    assert!(broker.stop(), "nvmed did not shut down cleanly");
}

/// A broker (with `extra` options) whose controller cannot be stopped and never completes its
/// first command, and a client whose 4 KiB read into a 1 MiB buffer is that command: returned
/// once the ring failed with DeviceFailed, the read never reported finished.
fn a_read_held_by_an_unstoppable_device(extra: &[&str]) -> (TestBroker, NvmeRing, nvmed_client::BufferId) {
    let mut args =
        vec!["--inject", "stuck:1", "--io-timeout-ms", "300", "--emulator-wedge", "reset-and-bus-master"];
    args.extend_from_slice(extra);
    a_read_failed_by(&args)
}

/// A read submitted to a broker started with `args`, whose device fails without confirming
/// it stopped while it holds the read: the broker, the faulted ring and the read's buffer.
fn a_read_failed_by(args: &[&str]) -> (TestBroker, NvmeRing, nvmed_client::BufferId) {
    let broker = TestBroker::start(args);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(1 << 20).unwrap();
    ring.prep(Io::read(ns, 0, 4096, buf, 0).user_data(1)).unwrap();
    ring.submit().unwrap();
    let mut out = Vec::new();
    // Neither a reset nor clearing bus mastering is confirmed: the device may still write
    // into the buffer, so the read must never be reported finished. The ring is faulted.
    match ring.wait(1, &mut out, Some(Duration::from_secs(10))) {
        Err(Error::RingFaulted(Some(RingFault::DeviceFailed))) => {}
        other => panic!("expected the ring to fail with DeviceFailed, got {other:?} ({out:?})"),
    }
    assert!(out.is_empty(), "a command of an unstoppable device was reported finished: {out:?}");
    (broker, ring, buf)
}

#[test]
fn a_controller_that_cannot_be_stopped_never_completes_its_commands() {
    let (mut broker, ring, _) =
        a_read_held_by_an_unstoppable_device(&["--max-registered-bytes-per-uid", "1M"]);
    drop(ring);
    // Its buffer stays mapped for the device (pinned) even though the client left.
    let mut probe = broker.connect();
    // Once the broker has released the session (only the probe's is left)...
    wait_until("the client's session to be released", Duration::from_secs(10), || {
        probe.stats().unwrap().broker_sessions == 1
    });
    assert!(
        probe.stats().unwrap().broker_buffer_iova_bytes >= MIB,
        "a buffer the device may write was unmapped"
    );
    // Kept mapped through no fault of the client: it no longer counts against its uid (whose
    // registered bytes it filled), only against the broker's totals.
    let mut registered = None;
    wait_until("the uid's share of the kept buffer to come back", Duration::from_secs(5), || {
        registered = Some(probe.alloc_buffer(1 << 20));
        matches!(registered, Some(Ok(_)))
    });
    drop(probe);
    assert!(broker.stop(), "nvmed did not shut down after a failed device");
}

#[test]
fn unregistering_a_buffer_a_failed_device_may_still_write_is_answered_and_its_id_kept() {
    let (mut broker, ring, buf) = a_read_held_by_an_unstoppable_device(&[]);
    // Asked after the failure (the client library would refuse: its read never finished),
    // the unregister is answered, not waited on for ever: the buffer stays mapped.
    let (mut ring, r) =
        unregister_within(ring, buf.0, "the unregister of a buffer a failed device holds was never answered");
    assert_kept_mapped(r);
    // Its id is never given to another buffer (the ring's table still names the old one by it).
    let m = sealed_memfd(4096);
    match ring.control(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }, &[m.as_file().as_fd()]) {
        Ok(Response::BufferRegistered { buffer_id }) => assert_ne!(buffer_id, buf.0),
        other => panic!("{other:?}"),
    }
    let m = sealed_memfd(4096);
    let again = ring
        .control(&Request::RegisterBuffer { offset: 0, len: 4096, id: Some(buf.0) }, &[m.as_file().as_fd()]);
    assert!(matches!(again, Err(Error::Refused(ControlError::BufferIdUnavailable { .. }))), "{again:?}");
    drop(ring);
    assert!(broker.stop(), "nvmed did not shut down after a failed device");
}

#[test]
fn a_command_a_failed_device_completes_late_still_keeps_its_buffer_and_an_unregister_is_answered() {
    // The read completes 1.5 s late; it times out at 300 ms, and neither a reset nor clearing
    // bus mastering is confirmed. Then the failed device posts the read's completion anyway:
    // it is taken off the queue, but the device is still not trusted with the buffer.
    let args = [
        "--emulator-mode",
        "async",
        "--inject",
        "delay:1:1500",
        "--io-timeout-ms",
        "300",
        "--no-abort",
        "--emulator-wedge",
        "reset-and-bus-master",
    ];
    let (mut broker, ring, buf) = a_read_failed_by(&args);
    // Past the late completion.
    std::thread::sleep(Duration::from_millis(2500));
    let (_ring, r) = unregister_within(
        ring,
        buf.0,
        "the unregister of a buffer a failed device completed late was never answered",
    );
    assert_kept_mapped(r);
    assert!(broker.alive());
}

/// The answer to unregistering a buffer a failed device may still write: it stays mapped.
fn assert_kept_mapped(r: nvmed_client::Result<Response>) {
    match r {
        Ok(Response::Error(ControlError::ResourceExhausted(m)))
        | Err(Error::Refused(ControlError::ResourceExhausted(m))) => {
            assert!(m.contains("stays mapped"), "{m}")
        }
        other => panic!("expected the buffer to be kept, got {other:?}"),
    }
}

/// A ring (reconnecting off) on a broker of two emulated controllers started with `extra`,
/// and the ids of its namespaces on controllers 0 and 1.
fn two_controller_ring(extra: &[&str]) -> (TestBroker, NvmeRing, u32, u32) {
    let mut args = vec!["--controllers", "2"];
    args.extend_from_slice(extra);
    let broker = TestBroker::start(&args);
    let ring = NvmeRing::open_with(&broker.socket, no_reconnect()).unwrap();
    let on = |c: u16| ring.namespaces().iter().find(|n| n.controller == c).unwrap().nsid;
    let (first, second) = (on(0), on(1));
    (broker, ring, first, second)
}

/// Unregisters buffer `id` from another thread: the ring back and the answer, or a panic
/// saying `never` if none comes within 10 s.
fn unregister_within(ring: NvmeRing, id: u32, never: &str) -> (NvmeRing, nvmed_client::Result<Response>) {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut ring = ring;
        let r = ring.control(&Request::UnregisterBuffer { buffer_id: id }, &[]);
        let _ = tx.send((ring, r));
    });
    rx.recv_timeout(Duration::from_secs(10)).unwrap_or_else(|_| panic!("{never}"))
}

#[test]
fn a_split_request_left_unsent_by_a_failed_controller_does_not_hold_an_unregister() {
    // One ring: a read at controller 1 that never completes, and a 1 MiB write split into
    // 8 KiB pieces for controller 0's queue of 3 commands (100 ms each). Controller 1 is reset
    // by an operator and fails without confirming it stopped: the ring is faulted and sends
    // no more pieces. Unregistering the write's buffer is answered once the pieces already at
    // controller 0 are done (it waited for good: the unsent pieces never went).
    let (mut broker, mut ring, healthy, failing) = two_controller_ring(&[
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "100000",
        "--queue-depth",
        "4",
        "--mdts",
        "1",
        "--inject",
        "stuck:1@1",
        "--emulator-wedge",
        "reset-and-bus-master",
    ]);
    let small = ring.alloc_buffer(4096).unwrap();
    let big = ring.alloc_buffer(1 << 20).unwrap();
    ring.prep(Io::read(failing, 0, 4096, small, 0).user_data(1)).unwrap();
    ring.prep(Io::write(healthy, 0, 1 << 20, big, 0).user_data(2)).unwrap();
    ring.submit().unwrap();
    wait_until("both requests taken", Duration::from_secs(5), || ring.stats().unwrap().in_flight == 2);
    let admin = nvmectl::AdminClient::new(broker.dir.join("nvmed-admin.sock"));
    assert_eq!(admin.reset_controller(1).unwrap().0, "failed (not confirmed stopped)");
    let (ring, r) = unregister_within(
        ring,
        big.0,
        "the unregister of a split write's buffer waited on pieces a faulted ring never sends",
    );
    assert!(matches!(r, Ok(Response::BufferUnregistered)), "{r:?}");
    drop(ring);
    assert!(broker.stop(), "nvmed did not shut down after a failed device");
}

#[test]
fn a_ring_kept_for_a_failed_device_lets_go_of_the_buffers_its_commands_do_not_use() {
    let mut broker = TestBroker::start(&[
        "--inject",
        "stuck:1",
        "--io-timeout-ms",
        "300",
        "--emulator-wedge",
        "reset-and-bus-master",
    ]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let held = ring.alloc_buffer(1 << 20).unwrap();
    let _unused = ring.alloc_buffer(2 << 20).unwrap();
    ring.prep(Io::read(ns, 0, 4096, held, 0).user_data(1)).unwrap();
    ring.submit().unwrap();
    let mut out = Vec::new();
    match ring.wait(1, &mut out, Some(Duration::from_secs(10))) {
        Err(Error::RingFaulted(Some(RingFault::DeviceFailed))) => {}
        other => panic!("expected the ring to fail with DeviceFailed, got {other:?} ({out:?})"),
    }
    drop(ring);
    let mut probe = broker.connect();
    wait_until("the client's session to be released", Duration::from_secs(10), || {
        probe.stats().unwrap().broker_sessions == 1
    });
    // The buffer the stuck read uses stays mapped; the one no command uses is unmapped (it
    // was kept for good too, with the ring that still holds the read).
    assert_eq!(probe.stats().unwrap().broker_buffer_iova_bytes, MIB, "kept mapped: only the read's buffer");
    drop(probe);
    assert!(broker.stop(), "nvmed did not shut down after a failed device");
}

#[test]
fn a_buffer_used_only_at_a_healthy_controller_is_unregistered_after_another_fails() {
    // Two controllers: the read on controller 1 never completes and that controller cannot be
    // stopped (reset by the operator: it fails running); the read on controller 0 completes
    // 6 s after it is taken. Unregistering the second read's buffer after the failure waits
    // for that read and unmaps the buffer, instead of keeping it mapped for good with the
    // failed controller's buffers.
    let (mut broker, mut ring, healthy, failing) = two_controller_ring(&[
        "--inject",
        "stuck:1@1",
        "--inject",
        "delay:1:6000@0",
        "--emulator-wedge",
        "reset-and-bus-master",
    ]);
    let stuck_buf = ring.alloc_buffer(1 << 20).unwrap();
    let slow_buf = ring.alloc_buffer(2 << 20).unwrap();
    ring.prep(Io::read(failing, 0, 4096, stuck_buf, 0).user_data(1)).unwrap();
    ring.prep(Io::read(healthy, 0, 4096, slow_buf, 0).user_data(2)).unwrap();
    ring.submit().unwrap();
    wait_until("both reads at their devices", Duration::from_secs(5), || {
        ring.stats().unwrap().in_flight == 2
    });
    let admin = nvmectl::AdminClient::new(broker.dir.join("nvmed-admin.sock"));
    let (state, _) = admin.reset_controller(1).unwrap();
    assert_eq!(state, "failed (not confirmed stopped)", "controller 1 cannot be stopped");
    assert_eq!(ring.stats().unwrap().in_flight, 2, "the healthy controller's read is still in flight");
    let (mut ring, r) = unregister_within(
        ring,
        slow_buf.0,
        "the unregister of a buffer used at the healthy controller was never answered",
    );
    assert!(matches!(r, Ok(Response::BufferUnregistered)), "{r:?}");
    assert_eq!(ring.stats().unwrap().in_flight, 1, "answered before its read completed");
    // Unmapped: only the failed controller's read's buffer is left.
    assert_eq!(ring.stats().unwrap().broker_buffer_iova_bytes, MIB);
    drop(ring);
    assert!(broker.stop(), "nvmed did not shut down after a failed device");
}

#[test]
fn a_client_that_hangs_up_while_its_unregister_waits_on_its_own_cq_is_released() {
    // The read completes 300 ms after it is taken; meanwhile the client moves its CQ head back
    // a whole ring (a CQ that looks full) and submits more, so the read's completion is held
    // back, and with it the answer to unregistering the read's buffer. Then the client hangs up: its session must
    // end, not keep the broker's thread for it (and its memory) waiting for good.
    let mut broker = TestBroker::start(&["--emulator-mode", "async", "--emulator-latency-us", "300000"]);
    let opts = RingOptions { sq_entries: 16, cq_entries: 16, ..no_reconnect() };
    let mut ring = NvmeRing::open_with(&broker.socket, opts).unwrap();
    let ns = ring.namespaces()[0].nsid;
    for i in 0..16 {
        ring.prep(Io::nop().user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    let mut out = Vec::new();
    ring.wait(16, &mut out, Some(Duration::from_secs(5))).unwrap();
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.prep(Io::read(ns, 0, 4096, buf, 0).user_data(99)).unwrap();
    ring.submit().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    ring.ring_memory().store_u32(nvmed_proto::layout::CQ_HEAD_OFFSET, 0, Ordering::Release);
    // More requests make the broker read the head again: it finds the CQ full.
    for i in 0..16 {
        ring.prep(Io::nop().user_data(100 + i)).unwrap();
    }
    ring.submit().unwrap();
    let sock = ring.control_socket().as_raw_fd();
    let id = buf.0;
    let waiting = std::thread::spawn(move || {
        let r = ring.control(&Request::UnregisterBuffer { buffer_id: id }, &[]);
        (ring, r)
    });
    std::thread::sleep(Duration::from_millis(600));
    let mut probe = broker.connect();
    assert_eq!(probe.stats().unwrap().broker_sessions, 2);
    nix::sys::socket::shutdown(sock, nix::sys::socket::Shutdown::Both).unwrap();
    let (ring, r) = waiting.join().unwrap();
    assert!(r.is_err(), "{r:?}");
    wait_until("the hung-up client's session to end", Duration::from_secs(5), || {
        probe.stats().unwrap().broker_sessions == 1
    });
    drop(ring);
    others_unaffected(&mut broker);
}

#[test]
fn a_reset_on_an_asynchronous_device_resumes_io() {
    // Also with a controller that ignores CC.EN=0: the broker falls back to a function-level
    // reset (the path is taken: the emulator refuses CC.EN=0; that Bus Master Enable stays off
    // until RDY=0 is not observed here).
    for wedge in ["none", "disable"] {
        let mut broker = TestBroker::start(&[
            "--emulator-mode",
            "async",
            "--emulator-latency-us",
            "20",
            "--inject",
            "stuck:40",
            "--io-timeout-ms",
            "300",
            "--queue-depth",
            "8",
            "--emulator-wedge",
            wedge,
        ]);
        let mut ring = broker.connect();
        let ns = ring.namespaces()[0].nsid;
        let buf = ring.alloc_buffer(64 * 4096).unwrap();
        for i in 0..64u64 {
            ring.prep(Io::write(ns, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
        }
        ring.submit().unwrap();
        let mut out = Vec::new();
        ring.wait(64, &mut out, Some(Duration::from_secs(20))).unwrap();
        // The stuck command and the others in flight were sent again after the reset: no error.
        assert!(out.iter().all(|c| c.status.is_success()), "{wedge}: {out:?}");
        let stats = ring.stats().unwrap();
        assert_eq!(stats.broker_resets, 1, "{wedge}");
        assert!(stats.broker_retries >= 1, "{wedge}");
        // I/O works again after the reset.
        random_write_read(&mut ring, (MIB, 4 * MIB), 21, 2);
        others_unaffected(&mut broker);
    }
}

// ---- 11. A panicking thread stops the process ------------------------------------------

#[test]
fn a_panicking_broker_thread_stops_the_process() {
    for mode in ["sync", "async"] {
        let mut broker = TestBroker::start(&["--emulator-mode", mode, "--inject", "panic:2"]);
        let mut ring = broker.connect();
        let ns = ring.namespaces()[0].nsid;
        let buf = ring.alloc_buffer(4096).unwrap();
        ring.write(ns, 0, buf, 0, 4096).unwrap();
        let _ = ring.read(ns, 0, buf, 0, 4096); // the second command panics the controller
        let mut child = broker.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            assert!(Instant::now() < deadline, "nvmed kept running after a thread panicked ({mode})");
            std::thread::sleep(Duration::from_millis(20));
        };
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{mode}: {status:?}");
    }
}

// ---- 13. A polling client learns that the broker is gone --------------------------------

#[test]
fn a_polling_client_learns_that_the_broker_died() {
    let mut broker = TestBroker::start(&[]);
    let mut ring = broker.connect_once();
    let mut child = broker.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match ring.poll(&mut out) {
            Ok(0) => assert!(Instant::now() < deadline, "poll never noticed the broker died"),
            Err(Error::BrokerGone) => break,
            other => panic!("unexpected {other:?}"),
        }
    }
}

// ---- 15. Small things -----------------------------------------------------------------

#[test]
fn empty_datagrams_and_the_ring_memfd_as_a_buffer_are_refused() {
    let mut broker = TestBroker::start(&[]);
    let s = raw_connect(&broker.socket);
    assert!(matches!(hello(&s), Response::Hello { .. }));
    // An empty datagram is answered, not taken for a close.
    assert_eq!(raw_call(&s, &[], &[]), Response::Error(ControlError::Malformed("empty message".into())));
    assert!(matches!(raw_call(&s, &encode(&Request::Stats), &[]), Response::Stats(_)));
    // The session's own ring memfd cannot be registered as a DMA buffer.
    let m = raw_create_ring(&s);
    assert!(matches!(decode::<Response>(&m.bytes).unwrap(), Response::RingCreated { .. }));
    let ring_fd = m.fds[0].as_fd();
    let r = raw_call(&s, &encode(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }), &[ring_fd]);
    match r {
        Response::Error(ControlError::Malformed(m)) => assert!(m.contains("ring"), "{m}"),
        other => panic!("the ring memfd was accepted as a buffer: {other:?}"),
    }
    others_unaffected(&mut broker);
}

/// A TCP socket whose last close blocks for `linger` seconds: SO_LINGER set, and unsent data
/// its peer (returned, kept open and never read) has no room for.
fn a_lingering_socket(linger: i32) -> (std::net::TcpStream, std::net::TcpStream) {
    use std::io::Write;
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (peer, _) = l.accept().unwrap();
    c.set_nonblocking(true).unwrap();
    let chunk = vec![7u8; 64 << 10];
    while c.write(&chunk).is_ok() {}
    let opt = libc::linger { l_onoff: 1, l_linger: linger };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from a live local.
    let rc = unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&opt as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    c.set_nonblocking(false).unwrap(); // a lingering close waits only on a blocking socket
    (c, peer)
}

#[test]
fn a_descriptor_sent_on_a_doorbell_cannot_hold_the_io_thread() {
    // A client sends, on its ring's submit doorbell, a socket whose last close takes 30 s. The
    // broker's I/O thread (shared by every ring on it) must not be the one to close it: on
    // kernels from 6.16 the doorbell refuses descriptors; before (as NVMED_TEST_NO_PASSRIGHTS
    // pretends), the ring is faulted and the descriptor left for its session's own thread.
    for older_kernel in [false, true] {
        if !older_kernel && !transport::descriptors_refusable() {
            continue;
        }
        let dir = scratch_dir();
        let socket = dir.join("nvmed.sock");
        let args: Vec<String> = ["--emulate", "--socket", socket.to_str().unwrap(), "--size", "64M"]
            .into_iter()
            .map(String::from)
            .collect();
        let env: &[(&str, &str)] = if older_kernel { &[("NVMED_TEST_NO_PASSRIGHTS", "1")] } else { &[] };
        let mut broker = TestBroker::spawn_env(dir, socket, &args, env);
        let s = raw_connect(&broker.socket);
        assert!(matches!(hello(&s), Response::Hello { .. }));
        let m = raw_create_ring(&s);
        let Response::RingCreated { size, .. } = decode::<Response>(&m.bytes).unwrap() else { panic!() };
        let ring = nvmed_proto::shm::SharedMemory::map_shared(m.fds[0].as_fd(), size as usize).unwrap();
        let (lingering, peer) = a_lingering_socket(30);
        std::thread::sleep(Duration::from_millis(50)); // the I/O thread asleep: the ring wakes it
        let sent = transport::send(m.fds[1].as_fd(), &1u64.to_ne_bytes(), &[lingering.as_fd()]);
        let peer = if sent.is_ok() {
            peer
        } else {
            drop(peer); // (refused: this test's close of it must not linger either)
            a_lingering_socket(0).1
        };
        drop(lingering);
        if older_kernel {
            sent.unwrap();
            wait_until("the ring to be faulted", Duration::from_secs(5), || {
                ring.load_u32(nvmed_proto::layout::FAULT_OFFSET, Ordering::Acquire)
                    == RingFault::ProtocolViolation as u32
            });
        } else {
            assert!(matches!(sent, Err(transport::TransportError::Io(nix::Error::EPERM))), "{sent:?}");
        }
        // Every other client is served at once, not after 30 s.
        let (tx, rx) = std::sync::mpsc::channel();
        let path = broker.socket.clone();
        std::thread::spawn(move || {
            let mut ring = NvmeRing::open(&path).unwrap();
            let ns = ring.namespaces()[0].nsid;
            let buf = ring.alloc_buffer(4096).unwrap();
            let _ = tx.send(ring.read(ns, 0, buf, 0, 4096).map(|_| ()));
        });
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(r) => r.unwrap(),
            Err(_) => panic!(
                "another client's read waited on the descriptor's close (older kernel: {older_kernel})"
            ),
        }
        drop(peer); // (the lingering close ends at once now)
        drop(s);
        assert!(broker.stop(), "nvmed did not shut down");
    }
}

#[test]
fn a_controller_that_did_not_come_back_from_a_reset_is_tried_again() {
    // The second enable (the first reset's) never sets CSTS.RDY: the controller stopped but
    // did not come back. An operator's next reset brings it back, and I/O is served again.
    let mut broker = TestBroker::start(&["--inject", "readyfail:2"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.read(ns, 0, buf, 0, 4096).unwrap();
    let admin = nvmectl::AdminClient::new(broker.dir.join("nvmed-admin.sock"));
    assert_eq!(admin.reset_controller(0).unwrap().0, "failed (stopped)");
    match ring.read(ns, 0, buf, 0, 4096) {
        Err(Error::Io(Status::Broker(BrokerStatus::DeviceFault | BrokerStatus::DeviceReset))) => {}
        other => panic!("I/O on a controller that did not come back: {other:?}"),
    }
    assert_eq!(admin.reset_controller(0).unwrap().0, "running");
    let mut served = None;
    wait_until("I/O to be served again", Duration::from_secs(5), || {
        served = Some(ring.read(ns, 0, buf, 0, 4096));
        matches!(served, Some(Ok(_)))
    });
    assert!(broker.stop());
}

#[test]
fn a_controller_whose_namespaces_changed_across_a_reset_is_not_served_with_the_old_ones() {
    // From the second enable (the first reset's) on, the namespaces identify at half their
    // size: a read at the old end would go past the new one. The broker checks what it built
    // its commands from after the reset, finds it changed, and stops serving the controller.
    let mut broker = TestBroker::start(&["--inject", "shrink:2", "--size", "8M"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.read(ns, 7 * MIB, buf, 0, 4096).unwrap();
    let admin = nvmectl::AdminClient::new(broker.dir.join("nvmed-admin.sock"));
    assert_eq!(admin.reset_controller(0).unwrap().0, "failed (stopped)");
    match ring.read(ns, 7 * MIB, buf, 0, 4096) {
        Err(Error::Io(Status::Broker(BrokerStatus::DeviceFault | BrokerStatus::DeviceReset))) => {}
        other => panic!("I/O on a controller that changed across a reset: {other:?}"),
    }
    assert!(broker.alive());
}

#[test]
fn a_client_thread_held_by_a_descriptor_it_was_sent_holds_neither_a_kill_nor_shutdown() {
    let mut broker = TestBroker::start(&["--io-timeout-ms", "500"]);
    // B sends, with a Stats request, a socket whose last close takes 60 s: closed in B's own
    // thread, which is then held. B hangs up: its session is ending (and held).
    let b = raw_connect(&broker.socket);
    assert!(matches!(hello(&b), Response::Hello { .. }));
    let (lingering, peer) = a_lingering_socket(60);
    transport::send(b.as_fd(), &encode(&Request::Stats), &[lingering.as_fd()]).unwrap();
    drop(lingering);
    std::thread::sleep(Duration::from_millis(200));
    drop(b);
    // A (same uid) waits, without a bound, for its uid's ending sessions: B's never ends.
    let a = raw_connect(&broker.socket);
    let Response::Hello { session_id, .. } = hello(&a) else { panic!("no hello") };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let req = encode(&Request::AwaitDrained { timeout_ms: u32::MAX });
        let _ = transport::send(a.as_fd(), &req, &[]);
        let _ = tx.send(transport::recv(a.as_fd()).map(|m| m.bytes.len()));
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(rx.try_recv().is_err(), "A's wait ended before B did");
    // An operator ends A: its wait ends with it (it waited for ever).
    let admin =
        nvmectl::AdminClient::new(broker.dir.join("nvmed-admin.sock")).with_timeout(Duration::from_secs(30));
    let t = Instant::now();
    admin.kill(session_id).unwrap();
    assert!(t.elapsed() < Duration::from_secs(5), "the kill waited {:?}", t.elapsed());
    let _ = rx.recv_timeout(Duration::from_secs(5)).expect("A's wait was not ended by the kill");
    // The broker stops though B's thread is still held (after its drain deadline: 2 x 0.5 + 5 s).
    let t = Instant::now();
    assert!(broker.stop(), "nvmed did not stop cleanly");
    assert!(t.elapsed() < Duration::from_secs(15), "stopping took {:?}", t.elapsed());
    drop(peer);
}

#[test]
fn the_client_library_cannot_be_confused_by_many_sessions_of_one_process() {
    // Per-uid limits count every session of the uid, across connections of one process.
    let broker = TestBroker::start(&["--max-sessions-per-uid", "2"]);
    let _a = broker.connect();
    let _b = NvmeRing::open_with(&broker.socket, RingOptions::default()).unwrap();
    match NvmeRing::open(&broker.socket) {
        Err(Error::Refused(ControlError::UidLimit { uid: 0, what })) => {
            assert!(what.contains("2 sessions"), "{what}")
        }
        other => panic!("expected the per-uid session limit, got {other:?}"),
    }
}

// ---- 8. Unmapping never runs on the I/O thread -----------------------------------------

#[test]
fn unmapping_happens_on_the_reaper_not_the_io_thread() {
    use nvmed_server::broker::{Broker, BrokerConfig};
    use nvmed_server::device::NvmeDevice;
    use nvmed_server::emulator::backend::NullBackend;
    use nvmed_server::emulator::{EmulatedController, EmulatedNamespace, EmulatorConfig};
    let dir = scratch_dir();
    let emu = Arc::new(
        EmulatedController::new(EmulatorConfig {
            namespaces: vec![EmulatedNamespace {
                backend: Box::new(NullBackend::new(64 << 20)),
                lba_size: 512,
            }],
            ..Default::default()
        })
        .unwrap(),
    );
    let device: Arc<dyn NvmeDevice> = emu.clone();
    let broker = Broker::start(device, BrokerConfig::new(dir.join("s.sock"))).unwrap();
    let mut ring = NvmeRing::open(dir.join("s.sock")).unwrap();
    let ns = ring.namespaces()[0].nsid;
    for _ in 0..20 {
        let b = ring.alloc_buffer(1 << 20).unwrap();
        ring.write(ns, 0, b, 0, 4096).unwrap();
        ring.unregister_buffer(b).unwrap();
    }
    ring.alloc_buffer(1 << 20).unwrap();
    drop(ring); // its last buffer goes with the session
    wait_until("21 buffers unmapped", Duration::from_secs(5), || {
        emu.unmaps_by_thread().values().sum::<u64>() >= 21
    });
    let by_thread = emu.unmaps_by_thread();
    assert_eq!(by_thread.get("nvmed-reaper"), Some(&21), "{by_thread:?}");
    assert!(!by_thread.contains_key("nvmed-io"), "the I/O thread unmapped buffers: {by_thread:?}");
    broker.shutdown().unwrap();
    let _ = std::fs::remove_dir_all(dir);
}

// ---- 1. A thread that cannot start refuses one client, never aborts the broker ----------

#[test]
fn a_client_thread_that_cannot_start_is_a_refusal_not_an_abort() {
    // nvmed as an unprivileged uid (used by no other test: RLIMIT_NPROC counts all of a uid's
    // threads) whose thread limit leaves room for its own threads and two clients. (Lowering a
    // running process's limit needs CAP_SYS_RESOURCE, so a first run counts the threads.)
    const UID: u32 = 1077;
    let start = |limit: Option<u64>| {
        let dir = scratch_dir();
        let ids = (Some(nix::unistd::Uid::from_raw(UID)), Some(nix::unistd::Gid::from_raw(UID)));
        nix::unistd::chown(&dir, ids.0, ids.1).unwrap();
        let socket = dir.join("nvmed.sock");
        let mut cmd = Command::new(runnable_by_anyone(env!("CARGO_BIN_EXE_nvmed")));
        cmd.args(["--emulate", "--size", "64M", "--socket-mode", "666", "--socket"])
            .arg(&socket)
            .env("NVMED_LOG", "warn")
            .uid(UID)
            .gid(UID)
            .stdout(Stdio::piped());
        if let Some(n) = limit {
            // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit { rlim_cur: n, rlim_max: n };
                    if libc::setrlimit(libc::RLIMIT_NPROC, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let out = child.stdout.take().unwrap();
        let mut broker = TestBroker { child: Some(child), dir, socket, ready: String::new(), args: vec![] };
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).unwrap();
        assert!(line.contains("ready"), "{line:?}");
        broker.ready = line;
        broker
    };
    let threads = {
        let probe = start(None);
        std::fs::read_dir(format!("/proc/{}/task", pid(&probe))).unwrap().count() as u64
    };
    let mut broker = start(Some(threads + 2));
    let socket = broker.socket.clone();
    // Clients until one is refused (the exact count depends on how the kernel counts threads).
    let mut clients = Vec::new();
    let refusal = loop {
        match NvmeRing::open(&socket) {
            Ok(r) => clients.push(r),
            Err(e) => break e,
        }
        assert!(clients.len() < 10, "RLIMIT_NPROC had no effect");
    };
    match refusal {
        Error::Refused(ControlError::ResourceExhausted(m)) => {
            assert!(m.contains("cannot start a thread"), "{m}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!clients.is_empty(), "no client was served at all");
    let a = &mut clients[0];
    assert!(broker.alive(), "the broker died when a thread could not start");
    // The clients it serves are unaffected.
    let ns = a.namespaces()[0].nsid;
    let buf = a.alloc_buffer(8192).unwrap();
    pattern(4, a.buffer_mut(buf, 0, 4096).unwrap());
    a.write(ns, 0, buf, 0, 4096).unwrap();
    a.read(ns, 0, buf, 4096, 4096).unwrap();
    assert_eq!(a.buffer(buf, 0, 4096).unwrap(), a.buffer(buf, 4096, 4096).unwrap());
}

/// A controller that stops answering its admin queue (a Get Log Page that never completes) is
/// reset when the health request times out, as Linux resets on an admin timeout: I/O goes on
/// meanwhile (the I/O threads need no admin command) and after the reset (which used the admin
/// queue again to create the I/O queues), SMART reads pause, and the data is intact.
#[test]
fn a_controller_whose_admin_queue_stops_answering_is_reset() {
    let broker = TestBroker::start(&["--inject", "loghang:1"]);
    let mut ring = broker.connect();
    random_write_read(&mut ring, (0, 4 * MIB), 31, 1);
    let session = ring.session();
    let asking = std::thread::spawn(move || session.health());
    // While the health request waits on the hung command, another client's I/O is served.
    std::thread::sleep(Duration::from_millis(300));
    let mut other = broker.connect();
    let t = Instant::now();
    random_write_read(&mut other, (8 * MIB, 2 * MIB), 32, 1);
    assert!(!asking.is_finished(), "the hung Get Log Page was answered");
    eprintln!("I/O during the admin hang took {:?}", t.elapsed());
    let first = asking.join().unwrap().unwrap();
    match &first[0].smart {
        Err(e) => assert!(e.contains("admin command"), "{e}"),
        Ok(s) => panic!("the hung Get Log Page was answered: {s:?}"),
    }
    // Past the SMART cache's second: SMART reads pause for a while after one that hung (else a
    // log page a controller never answers would reset it at every health request), and say so.
    std::thread::sleep(Duration::from_millis(1100));
    let again = ring.health().unwrap();
    match &again[0].smart {
        Err(e) => assert!(e.contains("paused for"), "{e}"),
        Ok(s) => panic!("SMART read again at once after a reset it caused: {s:?}"),
    }
    assert_eq!(ring.stats().unwrap().broker_resets, 1);
    random_write_read(&mut ring, (16 * MIB, 4 * MIB), 33, 1);
}

#[test]
fn a_queue_that_could_not_be_created_again_serves_after_a_later_reset() {
    use nvmed_client::{BrokerStatus, Error, Status};
    // The first read never completes (and cannot be aborted): the controller is reset, and
    // creating the I/O queue again fails (the second Create I/O SQ). Later a SMART read that
    // the controller never answers resets it again, and this time the queue comes back.
    let broker = TestBroker::start(&[
        "--inject",
        "stuck:1",
        "--inject",
        "sqfail:2",
        "--inject",
        "loghang:1",
        "--io-timeout-ms",
        "300",
    ]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    let e = ring.read(ns, 0, buf, 0, 4096).unwrap_err();
    assert!(matches!(e, Error::Io(Status::Broker(BrokerStatus::DeviceReset))), "{e:?}");
    // The queue is not there: new I/O fails at once (DeviceFault), and keeps failing.
    for _ in 0..3 {
        let e = ring.read(ns, 0, buf, 0, 4096).unwrap_err();
        assert!(matches!(e, Error::Io(Status::Broker(BrokerStatus::DeviceFault))), "{e:?}");
    }
    assert_eq!(ring.stats().unwrap().broker_resets, 1);
    // The reset a hung health read makes brings the queue back, without a restart.
    let h = ring.health().unwrap();
    assert!(h[0].smart.is_err(), "{h:?}");
    wait_until("the second reset", Duration::from_secs(10), || ring.stats().unwrap().broker_resets == 2);
    wait_until("the queue to serve again", Duration::from_secs(10), || {
        ring.read(ns, 0, buf, 0, 4096).is_ok()
    });
    random_write_read(&mut ring, (0, 4 * MIB), 34, 1);
}
