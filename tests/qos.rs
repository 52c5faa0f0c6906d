//! Sharing one device between tenants: limits per grant, split over the I/O threads that serve
//! a tenant, and weights on a busy device (issue 9).

mod common;

use std::time::{Duration, Instant};

use common::*;
use nvmed_client::testkit::{io_for, reads_for};
use nvmed_client::{NvmeRing, NvmeSession, RingOptions};

#[test]
fn an_iops_limit_holds_at_any_depth() {
    // Tests run as root: the grant is uid 0's.
    let broker = TestBroker::start(&["--grant", "0:1:iops=2k"]);
    let mut ring = broker.connect();
    let secs = 2.0;
    let done = reads_for(&mut ring, 32, secs);
    let rate = done as f64 / secs;
    // At most the rate plus one 10 ms burst, and what the last wait brings if it ends a few
    // milliseconds past the window on a loaded machine (5 ms: 10); the device could do 100x more.
    assert!(done <= 2000 * 2 + 20 + 10, "{done} reads in {secs} s: above the limit");
    assert!(rate >= 2000.0 * 0.9, "{rate:.0} IOPS: far below the limit");
}

#[test]
fn a_limit_is_shared_by_the_tenant_s_rings_on_every_thread() {
    let broker = TestBroker::start(&["--io-threads", "2", "--grant", "0:1:iops=2k"]);
    let session = NvmeSession::open(&broker.socket).unwrap();
    let secs = 2.0;
    let workers: Vec<_> = [0u16, 1]
        .into_iter()
        .map(|t| {
            let mut ring =
                session.new_ring_with(RingOptions { thread: Some(t), ..RingOptions::default() }).unwrap();
            std::thread::spawn(move || reads_for(&mut ring, 16, secs))
        })
        .collect();
    let counts: Vec<u64> = workers.into_iter().map(|w| w.join().unwrap()).collect();
    let total: u64 = counts.iter().sum();
    // The two threads each enforce half of the tenant's limit.
    assert!(total <= 2000 * 2 + 2 * 20 + 2 * 10, "{counts:?}: above the tenant's limit");
    assert!(total as f64 >= 2000.0 * secs * 0.9, "{counts:?}: far below the tenant's limit");
    for c in &counts {
        assert!((*c as f64) >= 1000.0 * secs * 0.8, "{counts:?}: one thread starved");
    }
}

#[test]
fn a_queue_depth_cap_holds() {
    // A slow device: with qd=4 at most 4 reads are at the device at once, so at 20 ms each at
    // most 200 complete per second whatever depth the client asks for.
    let broker = TestBroker::start(&[
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "20000",
        "--grant",
        "0:1:qd=4",
    ]);
    let mut ring = broker.connect();
    let done = reads_for(&mut ring, 32, 1.0);
    assert!(done <= 4 * 50 + 8, "{done} reads in 1 s: more than 4 at a time");
    assert!(done >= 4 * 50 / 2, "{done} reads in 1 s");
}

#[test]
fn weights_split_a_busy_device() {
    // A device that does 4k IOPS (slow enough to stay the bottleneck however busy the machine
    // running the test is), behind a 32-entry queue: the broker decides who gets the slots.
    // uid 1000 has weight 1, uid 1001 weight 3.
    let broker = TestBroker::start(&[
        "--socket-mode",
        "666",
        "--model",
        "latency-us=200,iops=4k,channels=64",
        "--queue-depth",
        "32",
        "--grant",
        "1000:1:weight=1",
        "--grant",
        "1001:1:weight=3",
    ]);
    let secs = 3.0;
    let a = load_as(1000, &broker.socket, secs, 32);
    let b = load_as(1001, &broker.socket, secs, 32);
    let (a, b) = (ios_of(a), ios_of(b));
    let share = a as f64 / (a + b) as f64;
    assert!((0.20..=0.30).contains(&share), "weight 1 got {a}, weight 3 got {b}: share {share:.3}");
}

/// `--config FILE` with these grants.
fn config_with(dir: &std::path::Path, grants: &[&str]) -> std::path::PathBuf {
    let path = dir.join("nvmed.toml");
    let list: Vec<String> = grants.iter().map(|g| format!("{g:?}")).collect();
    std::fs::write(&path, format!("grant = [{}]\n", list.join(", "))).unwrap();
    path
}

/// The broker's count of reloads (result: success or failure), and whether the last was put
/// in force (from its metrics at `url`): when a SIGHUP has been dealt with.
fn reloads_of(url: &str) -> (u64, u64, u64) {
    let text = ureq::get(url).call().unwrap().body_mut().read_to_string().unwrap();
    let get = |line: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(line).map(|v| v.trim().parse::<u64>().unwrap()))
            .unwrap_or_else(|| panic!("no {line} in {text}"))
    };
    (
        get("nvmed_config_reloads_total{result=\"success\"}"),
        get("nvmed_config_reloads_total{result=\"failure\"}"),
        get("nvmed_config_last_reload_successful"),
    )
}

#[test]
fn a_reload_that_ends_a_session_narrows_its_rights_at_once() {
    // Root's grant on namespace 1 becomes read-only and per session (a new tenant: the session
    // is ended). Its control thread is held sending replies its client does not read, so the
    // session lives on for a while; meanwhile its ring must already refuse writes.
    let dir = scratch_dir();
    let config = config_with(&dir, &["0:1"]);
    let config_arg = config.to_str().unwrap().to_string();
    let broker =
        TestBroker::start_in(dir.clone(), &["--config", &config_arg, "--metrics-listen", "127.0.0.1:0"]);
    let metrics = broker.ready.split("metrics on ").nth(1).expect("a metrics address").to_string();
    let mut ring = NvmeRing::open_with(
        &broker.socket,
        RingOptions { reconnect: nvmed_client::Reconnect::off(), ..RingOptions::default() },
    )
    .unwrap();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    // Requests whose replies are never read, until the broker stops taking them (its control
    // thread is then held in a send: the replies queued here fill its send buffer).
    let stats = nvmed_proto::control::encode(&nvmed_proto::Request::Stats);
    let sock = std::os::fd::AsRawFd::as_raw_fd(&ring.control_socket());
    let (begin, mut refused_since) = (Instant::now(), None);
    while refused_since.is_none_or(|t: Instant| t.elapsed() < Duration::from_millis(300)) {
        assert!(begin.elapsed() < Duration::from_secs(10), "the broker never stopped taking requests");
        match nix::sys::socket::send(sock, &stats, nix::sys::socket::MsgFlags::MSG_DONTWAIT) {
            Ok(_) => refused_since = None,
            Err(_) => {
                refused_since.get_or_insert_with(Instant::now);
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
    config_with(&dir, &["0:1:ro:per=session"]);
    send_signal(broker.child.as_ref().unwrap().id(), libc::SIGHUP);
    wait_until("the reload to be put in force", Duration::from_secs(20), || {
        reloads_of(&metrics) == (1, 0, 1)
    });
    std::thread::sleep(Duration::from_millis(200));
    use nvmed_client::{BrokerStatus, Error, Status};
    match ring.write(ns, 0, buf, 0, 4096) {
        Err(Error::Io(Status::Broker(BrokerStatus::NotPermitted))) => {}
        other => panic!("a write under the withdrawn read-write grant: {other:?}"),
    }
}

#[test]
fn sighup_puts_new_limits_in_force_without_reconnecting_and_refuses_a_bad_file() {
    let dir = scratch_dir();
    let config = config_with(&dir, &["0:1:iops=1k"]);
    let config_arg = config.to_str().unwrap().to_string();
    let mut broker = TestBroker::start_in(
        dir.clone(),
        &["--config", &config_arg, "--namespaces", "2", "--metrics-listen", "127.0.0.1:0"],
    );
    let metrics = broker.ready.split("metrics on ").nth(1).expect("a metrics address").to_string();
    let reloads = || reloads_of(&metrics);
    assert_eq!(reloads(), (0, 0, 1));
    let mut ring = broker.connect();
    let pid = broker.child.as_ref().unwrap().id();
    let before = reads_for(&mut ring, 16, 1.0);
    assert!(before <= 1000 + 10 + 5 + 2, "{before} reads in 1 s at 1k IOPS");
    // The same connection, after the limit is raised.
    config_with(&dir, &["0:1:iops=4k"]);
    send_signal(pid, libc::SIGHUP);
    wait_until("the reload to be put in force", Duration::from_secs(20), || reloads() == (1, 0, 1));
    let after = reads_for(&mut ring, 16, 1.0);
    // At most the rate, one 10 ms burst (40) and what the last wait, which may end a few
    // milliseconds past the second on a loaded machine, brings (up to the depth, 16); at
    // least well above the old limit (a loaded machine may not reach 4k).
    let most = 4000 + 40 + 16 + 24;
    assert!((1500..=most).contains(&after), "{after} reads in 1 s at 4k IOPS");
    // A file that does not parse is refused: the 4k limit stays.
    std::fs::write(&config, "grant = [\"0:1:iops=lots\"]\n").unwrap();
    send_signal(pid, libc::SIGHUP);
    wait_until("the reload to be refused", Duration::from_secs(20), || reloads() == (1, 1, 0));
    let still = reads_for(&mut ring, 16, 1.0);
    assert!((1500..=most).contains(&still), "{still} reads in 1 s after a refused reload");
    assert!(broker.alive());
    // Namespace 1 withdrawn: the session ends (after its I/O drains); a new one sees only 2.
    config_with(&dir, &["0:2"]);
    send_signal(pid, libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    let ended = loop {
        let ns = ring.namespaces()[0].nsid;
        let buf = ring.alloc_buffer(4096);
        let r = buf.and_then(|b| ring.read(ns, 0, b, 0, 4096));
        if r.is_err() {
            break r;
        }
        assert!(Instant::now() < deadline, "the session outlived the withdrawn grant");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The session ended with the grant (its reconnect finds the namespaces changed), or its
    // ring refused the namespace first.
    use nvmed_client::{BrokerStatus, Error, Status};
    assert!(
        matches!(
            ended,
            Err(Error::ReconnectFailed { .. })
                | Err(Error::Io(Status::Broker(BrokerStatus::InvalidNamespace | BrokerStatus::NotPermitted)))
        ),
        "{ended:?}"
    );
    let fresh = broker.connect();
    let ids: Vec<u32> = fresh.namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, vec![2]);
    drop(fresh);
    // The last grant removed: a uid without a grant still gets nothing (a broker with a
    // configuration file defaults to none, not to read-write on everything)...
    std::fs::write(&config, "grant = []\n").unwrap();
    send_signal(pid, libc::SIGHUP);
    wait_until("the reload without grants", Duration::from_secs(20), || reloads() == (3, 1, 1));
    let ids: Vec<u32> = broker.connect().namespaces().iter().map(|n| n.nsid).collect();
    assert_eq!(ids, Vec::<u32>::new(), "removing the last grant opened every namespace");
    // ...unless the configuration says so.
    std::fs::write(&config, "grant = []\ndefault-access = \"read-only\"\n").unwrap();
    send_signal(pid, libc::SIGHUP);
    wait_until("the reload with a default", Duration::from_secs(20), || reloads() == (4, 1, 1));
    let ring = broker.connect();
    let ids: Vec<(u32, bool)> = ring.namespaces().iter().map(|n| (n.nsid, n.read_only)).collect();
    assert_eq!(ids, vec![(1, true), (2, true)]);
}

#[test]
fn uids_left_out_of_the_grants_get_no_namespace_unless_a_default_says_so() {
    // Root has a grant; uid 1000 has none. Without --default-access it sees nothing (it used
    // to get read-write on every namespace, other tenants' windows included).
    for (extra, expect) in [(None, "NAMESPACES 0"), (Some("read-only"), "NAMESPACES 1")] {
        let mut args = vec!["--socket-mode", "666", "--grant", "0:1:0+2048"];
        if let Some(access) = extra {
            args.extend(["--default-access", access]);
        }
        let broker = TestBroker::start(&args);
        let out = peer_output(1000, &["namespaces"], &broker.socket);
        assert!(out.contains(expect), "uid 1000 with --default-access {extra:?}: {out}");
    }
}

/// `io_for` on each ring at once, each on its own thread; returns each ring's count.
fn together(rings: Vec<NvmeRing>, qd: u64, secs: f64) -> Vec<u64> {
    let workers: Vec<_> = rings
        .into_iter()
        .map(|mut ring| std::thread::spawn(move || io_for(&mut ring, qd, secs, 4096, false)))
        .collect();
    workers.into_iter().map(|w| w.join().unwrap()).collect()
}

#[test]
fn a_per_uid_limit_binds_the_uid_s_sessions_together_and_a_per_session_one_each_alone() {
    let secs = 1.5;
    let limit = 2000.0 * secs;
    // Two sessions of uid 0 (the tests' uid) under one per-uid limit: 2k IOPS between them.
    let broker = TestBroker::start(&["--grant", "0:1:iops=2k"]);
    let counts = together(vec![broker.connect(), broker.connect()], 16, secs);
    let total: u64 = counts.iter().sum();
    eprintln!("per=uid: {counts:?} in {secs} s");
    assert!(total as f64 <= limit * 1.05 + 40.0, "{counts:?} in {secs} s: above the uid's 2k IOPS");
    assert!(total as f64 >= limit * 0.85, "{counts:?} in {secs} s: far below the uid's 2k IOPS");
    drop(broker);
    // The same with per=session: each has its own 2k.
    let broker = TestBroker::start(&["--grant", "0:1:iops=2k,per=session"]);
    let counts = together(vec![broker.connect(), broker.connect()], 16, secs);
    eprintln!("per=session: {counts:?} in {secs} s");
    for &c in &counts {
        assert!(c as f64 <= limit * 1.05 + 40.0, "{counts:?} in {secs} s: a session above its 2k IOPS");
        assert!(c as f64 >= limit * 0.85, "{counts:?} in {secs} s: a session far below its 2k IOPS");
    }
}

#[test]
fn read_and_write_bandwidth_limits_each_hold() {
    // 20 MB/s of reads and 10 MB/s of writes, in 128 KiB requests at depth 8 (the emulated
    // device moves hundreds of MB/s).
    let broker = TestBroker::start(&["--grant", "0:1:read-mbps=20,write-mbps=10"]);
    let mut ring = broker.connect();
    let secs = 1.5;
    for (write, mbps) in [(false, 20.0), (true, 10.0)] {
        let done = io_for(&mut ring, 8, secs, 128 << 10, write);
        let rate = (done * (128 << 10)) as f64 / secs / 1e6;
        let what = if write { "writes" } else { "reads" };
        eprintln!("{what}: {rate:.1} MB/s under a {mbps} MB/s limit");
        // At most the rate plus a burst of a few requests; at least most of it.
        let most = mbps * 1.05 + 4.0 * f64::from(128 << 10) / 1e6 / secs;
        assert!(rate <= most, "{what}: {rate:.1} MB/s above the {mbps} MB/s limit");
        assert!(rate >= mbps * 0.85, "{what}: {rate:.1} MB/s far below the {mbps} MB/s limit");
    }
}

#[test]
fn write_zeroes_count_against_the_write_limit() {
    // 10 MB/s of writes; 4 MiB Write Zeroes one after another for 1.5 s. The emulated device
    // zeroes GB/s: uncounted, hundreds of MB would go.
    let broker = TestBroker::start(&["--grant", "0:1:write-mbps=10"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let (secs, len) = (1.5, 4u32 << 20);
    let begin = Instant::now();
    let mut zeroed = 0u64;
    let mut at = 0u64;
    while begin.elapsed().as_secs_f64() < secs {
        let done =
            nvmed_client::testkit::run_batch(&mut ring, &[nvmed_client::Io::write_zeroes(ns, at, len)], 1);
        assert!(done.values().all(|c| c.status.is_success()), "{done:?}");
        zeroed += u64::from(len);
        at = (at + u64::from(len)) % (32 << 20);
    }
    let mb = zeroed as f64 / 1e6;
    // The rate over the window, plus the bucket's depth and one request's debt (a request
    // above the depth goes once the bucket is full and the next one pays for it).
    let most = 10.0 * secs + 2.0 * f64::from(len) / 1e6;
    eprintln!("{mb:.1} MB zeroed in {secs} s under a 10 MB/s write limit");
    assert!(mb <= most, "{mb:.1} MB zeroed in {secs} s: the write limit did not hold it (at most {most:.1})");
}

#[test]
fn grants_for_a_namespace_not_served_or_twice_stop_the_start_with_the_reason() {
    for (grants, why) in [
        (&["0:1", "0:3:iops=1k"][..], "grant 0:3:weight=1,iops=1000,per=uid names namespace 3, which this broker does not serve (it serves namespaces 1-2)"),
        (&["0:1:iops=1k", "0:1:ro"][..], "both give uid 0 namespace 1: a uid may have one grant per namespace"),
    ] {
        let dir = scratch_dir();
        let socket = dir.join("nvmed.sock");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_nvmed"));
        cmd.args(["--emulate", "--namespaces", "2", "--size", "1M", "--socket", socket.to_str().unwrap()]);
        for g in grants {
            cmd.args(["--grant", g]);
        }
        let out = cmd.env("NVMED_LOG", "off").output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{grants:?} accepted: {stderr}");
        assert!(stderr.contains(why), "{grants:?}: {stderr}");
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ready"));
        assert!(!socket.exists(), "the socket was left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_new_session_does_not_refill_the_buckets_or_forgive_the_debt() {
    // 1 MB/s of reads, 2 MiB per request: a request larger than the bucket goes when it is
    // full and leaves a debt of about 2 s. A client that ends its session (its tenant's last
    // ring) and opens a new one must still pay it, not start with full buckets.
    // Each new ring on the other of two I/O threads: the buckets follow the tenant there.
    let broker = TestBroker::start(&["--io-threads", "2", "--grant", "0:1:read-mbps=1"]);
    let started = Instant::now();
    for i in 0..3u16 {
        let session = NvmeSession::open(&broker.socket).unwrap();
        let opts = RingOptions { thread: Some(i % 2), ..RingOptions::default() };
        let mut ring = session.new_ring_with(opts).unwrap();
        assert_eq!(ring.io_thread(), i % 2);
        let ns = ring.namespaces()[0].nsid;
        let buf = ring.alloc_buffer(2 << 20).unwrap();
        ring.read(ns, 0, buf, 0, 2 << 20).unwrap();
        // Closed (the broker answers once the ring is released) before the next session comes.
        // (A session whose ring the broker has not released yet when the next one arrives on
        // another thread meets the tenant still there, with its debt, on the first thread
        // only: the new thread's part starts full.)
        drop(ring);
        drop(session);
    }
    // 6 MiB at 1 MB/s: the first 2 MiB go at once, the other two each wait for the debt of
    // the one before (about 2.1 s each).
    let took = started.elapsed();
    assert!(took >= Duration::from_secs(3), "6 MiB read in {took:?} under a 1 MB/s limit");
}
