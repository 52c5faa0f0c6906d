//! Scale-out inside one broker: several I/O threads, each with its own device queue pair, and
//! sessions with several rings spread over them (issue 8).

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use common::*;
use nvmed_client::testkit::random_write_read;
use nvmed_client::{BrokerStatus, Error, Io, NvmeRing, NvmeSession, RingOptions, Status};

const MIB: u64 = 1 << 20;

fn ring_on(session: &NvmeSession, thread: Option<u16>) -> NvmeRing {
    session.new_ring_with(RingOptions { thread, ..RingOptions::default() }).unwrap()
}

#[test]
fn eight_clients_with_four_rings_each_verify_on_two_io_threads() {
    let broker = TestBroker::start(&["--io-threads", "2", "--size", "64M"]);
    let clients: Vec<_> = (0..8u64)
        .map(|c| {
            let socket = broker.socket.clone();
            std::thread::spawn(move || {
                let session = NvmeSession::open(&socket).unwrap();
                let rings: Vec<_> = (0..4).map(|_| session.new_ring().unwrap()).collect();
                let workers: Vec<_> = rings
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut ring)| {
                        std::thread::spawn(move || {
                            let region = (c * 4 + r as u64) * 2 * MIB;
                            random_write_read(&mut ring, (region, 2 * MIB), 1 + c * 100 + r as u64, 4);
                            ring
                        })
                    })
                    .collect();
                let rings: Vec<_> = workers.into_iter().map(|w| w.join().unwrap()).collect();
                let threads: Vec<u16> = rings.iter().map(|r| r.io_thread()).collect();
                let stats = session.stats().unwrap();
                assert_eq!(stats.rings, 4);
                assert_eq!(stats.errors, 0);
                assert_eq!(stats.submitted, stats.completed);
                (threads, session.io_threads().unwrap())
            })
        })
        .collect();
    let mut per_thread = [0usize; 2];
    let mut last = Vec::new();
    for c in clients {
        let (threads, io) = c.join().expect("a client failed its verified I/O");
        for t in threads {
            per_thread[usize::from(t)] += 1;
        }
        last = io;
    }
    // Rings were placed by load (fewest rings first): the 32 rings split evenly enough, and
    // both threads' queues did device work.
    assert!(per_thread.iter().all(|&n| (12..=20).contains(&n)), "rings per thread {per_thread:?}");
    assert_eq!(last.len(), 2);
    assert!(last.iter().all(|t| t.device_commands > 100), "{last:?}");
}

#[test]
fn a_ring_goes_where_asked_or_to_the_least_loaded_thread() {
    let broker = TestBroker::start(&["--io-threads", "2"]);
    let session = NvmeSession::open(&broker.socket).unwrap();
    let a = ring_on(&session, Some(1));
    let b = ring_on(&session, Some(1));
    assert_eq!((a.io_thread(), b.io_thread()), (1, 1));
    // Thread 0 has none: the next two go there.
    let c = ring_on(&session, None);
    let d = ring_on(&session, None);
    assert_eq!((c.io_thread(), d.io_thread()), (0, 0));
    let load: Vec<u64> = session.io_threads().unwrap().iter().map(|t| t.rings).collect();
    assert_eq!(load, vec![2, 2]);
    // A ring dropped while its session lives on is closed at the broker.
    drop(a);
    assert_eq!(session.stats().unwrap().rings, 3);
    let load: Vec<u64> = session.io_threads().unwrap().iter().map(|t| t.rings).collect();
    assert_eq!(load, vec![2, 1]);
    drop((b, c, d));
}

#[test]
fn rings_on_two_threads_share_one_registration() {
    let broker = TestBroker::start(&["--io-threads", "2"]);
    let session = NvmeSession::open(&broker.socket).unwrap();
    let ns = session.namespaces()[0].nsid;
    let mut writer = ring_on(&session, Some(0));
    let mut reader = ring_on(&session, Some(1));
    let shared = session.alloc_shared(2 * MIB as usize).unwrap();
    let mut data = vec![0u8; MIB as usize];
    pattern(7, &mut data);
    shared.write_at(0, &data).unwrap();
    // Registered once (before or after a ring exists), used from both threads' rings.
    writer.write(ns, 5 * MIB, shared.id(), 0, MIB as u32).unwrap();
    reader.read(ns, 5 * MIB, shared.id(), MIB, MIB as u32).unwrap();
    let mut back = vec![0u8; MIB as usize];
    shared.read_at(MIB, &mut back).unwrap();
    assert!(back == data, "data read on thread 1 differs from what thread 0 wrote");
    let stats = session.stats().unwrap();
    assert_eq!((stats.buffers, stats.rings), (1, 2));
    assert!(shared.read_at(2 * MIB - 1, &mut [0u8; 2]).is_err(), "range past the end accepted");
    // The rings that named it hold it (its id must not name another buffer while a request of
    // theirs may): dropping the caller's handle leaves it registered until they release it.
    let id = shared.id();
    drop(shared);
    assert_eq!(session.stats().unwrap().buffers, 1);
    writer.release_shared(id).unwrap();
    reader.release_shared(id).unwrap();
    assert_eq!(session.stats().unwrap().buffers, 0);
    assert_eq!(session.stats().unwrap().broker_buffer_iova_bytes, 0);
    // Gone: refused, and a smaller buffer registered next (perhaps under the same id) is
    // checked by its own length.
    let refused = writer.prep(Io::read(ns, 0, 4096, id, 0));
    assert!(matches!(refused, Err(Error::UnknownBuffer(_))), "{refused:?}");
    let small = session.alloc_shared(MIB as usize).unwrap();
    let refused = writer.prep(Io::read(ns, 0, 4096, small.id(), MIB));
    assert!(matches!(refused, Err(Error::OutOfBuffer { .. })), "{refused:?}");
    writer.read(ns, 5 * MIB, small.id(), 0, 4096).unwrap();
}

#[test]
fn a_client_killed_with_rings_on_two_threads_is_drained_and_released() {
    let broker =
        TestBroker::start(&["--io-threads", "2", "--emulator-mode", "async", "--emulator-latency-us", "500"]);
    let mut survivor = broker.connect();
    let mut child = start_hammer("hammer-rings", &broker.socket);
    // Both of its rings have commands at the device.
    wait_until("both threads to have the child's commands", Duration::from_secs(5), || {
        survivor.session().io_threads().unwrap().iter().all(|t| t.device_commands > 100)
    });
    assert!(survivor.stats().unwrap().broker_buffer_iova_bytes >= 8 * MIB);
    child.kill().unwrap(); // SIGKILL, with I/O in flight on both threads
    child.wait().unwrap();
    let mut stats = survivor.stats().unwrap();
    wait_until("the killed client's session to be released", Duration::from_secs(10), || {
        stats = survivor.stats().unwrap();
        stats.broker_sessions == 1
    });
    assert_eq!(stats.broker_buffer_iova_bytes, stats.buffer_bytes, "its IOVA mappings were not all released");
    let load: Vec<u64> = survivor.session().io_threads().unwrap().iter().map(|t| t.rings).collect();
    assert_eq!(load.iter().sum::<u64>(), 1, "its rings are still served: {load:?}");
    random_write_read(&mut survivor, (8 * MIB, 4 * MIB), 5, 2);
}

/// One ring's share of the reset test: reads at QD16 until it has seen requests fail with
/// `DeviceReset` and then 50 more succeed (at most `limit`), then drains; returns every
/// request's status by tag, and how many were submitted.
fn read_through_a_reset(mut ring: NvmeRing, limit: Duration) -> (HashMap<u64, Status>, u64) {
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(16 * 4096).unwrap();
    let mut done = HashMap::new();
    let mut out = Vec::new();
    let mut next = 0u64;
    let mut free: Vec<u64> = (0..16).collect();
    let start = Instant::now();
    let mut after_reset: Option<u32> = None;
    loop {
        let more = start.elapsed() < limit && after_reset.is_none_or(|n| n < 50);
        while more && !free.is_empty() {
            let slot = free.pop().unwrap();
            let io = Io::read(ns, (next % 1024) * 4096, 4096, buf, slot * 4096).user_data(next << 8 | slot);
            ring.prep(io).unwrap();
            next += 1;
        }
        ring.submit().unwrap();
        if ring.in_flight() == 0 {
            break;
        }
        out.clear();
        ring.wait(1, &mut out, Some(Duration::from_secs(10))).unwrap();
        for c in &out {
            if c.status == Status::Broker(BrokerStatus::DeviceReset) {
                after_reset.get_or_insert(0);
            } else if let Some(n) = after_reset.as_mut() {
                *n += 1;
            }
            let tag = c.user_data >> 8;
            assert!(done.insert(tag, c.status).is_none(), "tag {tag} completed twice");
            free.push(c.user_data & 0xff);
        }
    }
    (done, next)
}

#[test]
fn a_reset_with_io_in_flight_on_every_thread_completes_each_request_once() {
    // Command 40 hangs and cannot be aborted: after a second the thread that sent it resets the
    // controller, which stops every thread's queue; both threads fail what they had in flight
    // (no retries here), recreate their queues and go on.
    let broker = TestBroker::start(&[
        "--io-threads",
        "2",
        "--emulator-mode",
        "async",
        // Slow enough that each ring always has commands at the device, however the test's
        // threads are scheduled (only a client starved for 600 ms would leave its ring empty).
        "--emulator-latency-us",
        "600000",
        "--inject",
        "stuck:40",
        "--io-timeout-ms",
        "1000",
        // One try: what was in flight fails with DeviceReset, which shows each thread's part.
        // (With retries, see tests/data_path.rs and ringbench's fault matrix, nobody sees it.)
        "--io-tries",
        "1",
    ]);
    let session = NvmeSession::open(&broker.socket).unwrap();
    let workers: Vec<_> = [0u16, 1]
        .into_iter()
        .map(|t| {
            let ring = ring_on(&session, Some(t));
            std::thread::spawn(move || read_through_a_reset(ring, Duration::from_secs(20)))
        })
        .collect();
    let mut threads_reset = 0;
    for (t, w) in workers.into_iter().enumerate() {
        let (done, submitted) = w.join().unwrap();
        assert_eq!(done.len() as u64, submitted, "thread {t}: requests lost");
        let reset: Vec<u64> = done
            .iter()
            .filter(|(_, s)| **s == Status::Broker(BrokerStatus::DeviceReset))
            .map(|(&k, _)| k)
            .collect();
        let other: Vec<_> = done
            .values()
            .filter(|s| !s.is_success() && **s != Status::Broker(BrokerStatus::DeviceReset))
            .collect();
        assert!(other.is_empty(), "thread {t}: unexpected statuses {other:?}");
        // Every thread had reads at the device when the reset stopped every queue: each sees
        // some fail with DeviceReset (a reset that left one thread's queue running would not).
        assert!(!reset.is_empty(), "thread {t}: no request failed with DeviceReset");
        threads_reset += 1;
        // I/O went on after the reset on this thread's new queue.
        let last_reset = *reset.iter().max().unwrap();
        let after = done.iter().filter(|(&k, s)| k > last_reset && s.is_success()).count();
        assert!(after >= 50, "thread {t}: only {after} successful reads after the reset");
    }
    assert_eq!(threads_reset, 2);
    let stats = session.stats().unwrap();
    assert_eq!(stats.submitted, stats.completed);
    assert_eq!(stats.in_flight, 0);
}

#[test]
fn one_broker_serves_two_controllers_and_each_gets_its_own_data() {
    let dir = scratch_dir();
    let file = dir.join("disk.img");
    let file_arg = file.to_str().unwrap().to_string();
    let mut broker = TestBroker::start_in(
        dir.clone(),
        &["--controllers", "2", "--io-threads", "2", "--backing", &file_arg, "--size", "16M"],
    );
    let session = NvmeSession::open(&broker.socket).unwrap();
    // Namespaces get broker-wide ids in controller order, and say where they live.
    let list: Vec<_> =
        session.namespaces().iter().map(|n| (n.nsid, n.controller, n.controller_nsid)).collect();
    assert_eq!(list, vec![(1, 0, 1), (2, 1, 1)]);
    // One ring reaches both controllers (each I/O thread has a queue on each).
    let mut ring = ring_on(&session, Some(1));
    let buf = ring.alloc_buffer(2 * MIB as usize).unwrap();
    for (nsid, seed) in [(1u32, 11u64), (2, 22)] {
        pattern(seed, ring.buffer_mut(buf, 0, MIB).unwrap());
        ring.write(nsid, 3 * MIB, buf, 0, MIB as u32).unwrap();
        ring.read(nsid, 3 * MIB, buf, MIB, MIB as u32).unwrap();
        assert!(ring.buffer(buf, 0, MIB).unwrap() == ring.buffer(buf, MIB, MIB).unwrap());
    }
    // Verified random I/O on both at once, from rings on both threads.
    let workers: Vec<_> = (0..4u64)
        .map(|i| {
            let mut r = ring_on(&session, Some((i % 2) as u16));
            std::thread::spawn(move || {
                let nsid = 1 + (i / 2) as u32;
                random_write_read_ns(&mut r, nsid, (8 * MIB + (i % 2) * 4 * MIB, 4 * MIB), 7 + i);
                r
            })
        })
        .collect();
    for w in workers {
        w.join().expect("verified I/O failed");
    }
    drop(ring);
    drop(session);
    assert!(broker.stop(), "broker did not shut down cleanly");
    // Each controller's namespace lives in its own file: the data went where it was sent.
    let read = |path: &std::path::Path| {
        let all = std::fs::read(path).unwrap();
        all[(3 * MIB) as usize..(4 * MIB) as usize].to_vec()
    };
    let mut want = vec![0u8; MIB as usize];
    pattern(11, &mut want);
    assert!(read(&file) == want, "controller 0's data is not in its backing file");
    pattern(22, &mut want);
    assert!(read(&dir.join("disk.img.c1")) == want, "controller 1's data is not in its backing file");
}

/// Like `random_write_read`, on namespace `nsid` (writes then reads back extents of the
/// region with a model of its contents).
fn random_write_read_ns(ring: &mut NvmeRing, nsid: u32, region: (u64, u64), seed: u64) {
    let (base, size) = region;
    let buf = ring.alloc_buffer(size as usize).unwrap();
    let back = ring.alloc_buffer(size as usize).unwrap();
    pattern(seed, ring.buffer_mut(buf, 0, size).unwrap());
    let mut rng = Rng(seed);
    // Random-sized pieces, written in random order at QD16.
    let mut pieces = Vec::new();
    let mut at = 0;
    while at < size {
        let len = ((rng.below(64) + 1) * 4096).min(size - at);
        pieces.push((at, len));
        at += len;
    }
    for i in (1..pieces.len()).rev() {
        pieces.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let ios: Vec<Io> = pieces.iter().map(|&(o, l)| Io::write(nsid, base + o, l as u32, buf, o)).collect();
    assert!(nvmed_client::testkit::run_batch(ring, &ios, 16).values().all(|c| c.status.is_success()));
    let ios: Vec<Io> = pieces.iter().map(|&(o, l)| Io::read(nsid, base + o, l as u32, back, o)).collect();
    assert!(nvmed_client::testkit::run_batch(ring, &ios, 16).values().all(|c| c.status.is_success()));
    assert!(
        ring.buffer(buf, 0, size).unwrap() == ring.buffer(back, 0, size).unwrap(),
        "data mismatch on {nsid}"
    );
}
