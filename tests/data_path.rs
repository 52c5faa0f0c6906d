//! End-to-end tests: a real `nvmed` process on the emulated controller, driven through the
//! client library.

mod common;

use std::time::{Duration, Instant};

use common::*;
use nvmed_client::testkit::{pattern, random_write_read, run_batch};
use nvmed_client::{BrokerStatus, Error, Io, NvmeRing, Opcode, Sqe, Status};
use nvmed_proto::{NvmeStatus, Request, Response};

const MIB: u64 = 1 << 20;

#[test]
fn random_writes_then_reads_verify() {
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    random_write_read(&mut ring, (0, 8 * MIB), 0x1234, 6);
    let stats = ring.stats().unwrap();
    assert_eq!(stats.errors, 0);
    assert!(stats.bytes_written > 4 * MIB && stats.bytes_read >= 8 * MIB, "{stats:?}");
}

#[test]
fn random_io_with_4k_blocks() {
    // MDTS 2 (16 KiB device commands): most requests are split into several commands.
    let broker = TestBroker::start(&["--lba-size", "4096", "--mdts", "2"]);
    let mut ring = broker.connect();
    assert_eq!(ring.namespaces()[0].lba_size, 4096);
    assert!(ring.namespaces()[0].max_transfer >= 1 << 20, "requests above MDTS are split, not refused");
    random_write_read(&mut ring, (MIB, 8 * MIB), 0x777, 4);
}

#[test]
fn concurrent_clients_keep_their_data() {
    let broker = TestBroker::start(&[]);
    let threads: Vec<_> = (0..4u64)
        .map(|i| {
            let mut ring = broker.connect();
            std::thread::spawn(move || random_write_read(&mut ring, (i * 8 * MIB, 8 * MIB), 0xabc + i, 4))
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
}

#[test]
fn write_zeroes_deallocate_flush_and_fua() {
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(64 * 1024).unwrap();
    ring.buffer_mut(buf, 0, 65536).unwrap().fill(0xee);
    let ios = [Io::write(ns, 0, 65536, buf, 0).fua(), Io::write(ns, 65536, 65536, buf, 0)];
    assert!(run_batch(&mut ring, &ios, 4).values().all(|c| c.status.is_success()));
    let ios = [Io::write_zeroes(ns, 4096, 8192), Io::deallocate(ns, 65536 + 512, 1024), Io::flush(ns)];
    assert!(run_batch(&mut ring, &ios, 4).values().all(|c| c.status.is_success()));
    ring.read(ns, 0, buf, 0, 65536).unwrap();
    let d = ring.buffer(buf, 0, 65536).unwrap();
    assert!(d[..4096].iter().all(|&b| b == 0xee));
    assert!(d[4096..12288].iter().all(|&b| b == 0));
    assert!(d[12288..].iter().all(|&b| b == 0xee));
    ring.read(ns, 65536, buf, 0, 4096).unwrap();
    let d = ring.buffer(buf, 0, 4096).unwrap();
    assert!(d[..512].iter().all(|&b| b == 0xee) && d[512..1536].iter().all(|&b| b == 0));
    assert!(d[1536..].iter().all(|&b| b == 0xee));
}

/// A controller that limits Write Zeroes (WZSL) and deallocated ranges (DMRSL) fails larger
/// commands with Invalid Field: the broker reads both limits and splits requests under them.
#[test]
fn write_zeroes_and_deallocate_are_split_under_the_controller_s_limits() {
    // At most 8 KiB (2 pages) per Write Zeroes and 3 LBAs (of 512 bytes) per range.
    let broker = TestBroker::start(&["--emulator-wzsl", "1", "--emulator-dmrsl", "3"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let len = 256 * 1024;
    let buf = ring.alloc_buffer(len).unwrap();
    ring.buffer_mut(buf, 0, len as u64).unwrap().fill(0xee);
    ring.write(ns, 0, buf, 0, len as u32).unwrap();
    // Odd starts and lengths, so pieces end in the middle of the requests.
    let zeroes = (4096 + 512, 100 * 1024 + 1536);
    let freed = (160 * 1024 + 512, 50 * 1024 + 1024);
    let ios = [Io::write_zeroes(ns, zeroes.0, zeroes.1), Io::deallocate(ns, freed.0, freed.1)];
    for (i, c) in run_batch(&mut ring, &ios, 2) {
        assert!(c.status.is_success(), "request {i}: {:?}", c.status);
    }
    ring.read(ns, 0, buf, 0, len as u32).unwrap();
    let d = ring.buffer(buf, 0, len as u64).unwrap();
    let zeroed =
        |at: usize| [zeroes, freed].iter().any(|&(o, l)| (o as usize..o as usize + l as usize).contains(&at));
    let wrong: Vec<usize> = (0..len).filter(|&at| (d[at] == 0) != zeroed(at)).take(4).collect();
    assert!(wrong.is_empty(), "bytes at {wrong:?} are wrong");
    // The largest Write Zeroes a client may ask for (65536 LBAs) becomes 4096 commands.
    let big = run_batch(&mut ring, &[Io::write_zeroes(ns, 0, 65536 * 512)], 1);
    assert!(big.values().all(|c| c.status.is_success()), "{big:?}");
}

#[test]
fn injected_device_error_reaches_the_client_as_that_status() {
    // The 3rd I/O command fails with "unrecovered read error" (SCT 2, SC 0x81).
    let broker = TestBroker::start(&["--inject", "fail:3:2:0x81"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    ring.read(ns, 0, buf, 0, 4096).unwrap();
    let err = ring.read(ns, 0, buf, 0, 4096).unwrap_err();
    match err {
        Error::Io(Status::Nvme(NvmeStatus { sct: 2, sc: 0x81, .. })) => {}
        other => panic!("expected the injected NVMe status, got {other:?}"),
    }
    assert!(err.to_string().contains("unrecovered read error"), "{err}");
    ring.read(ns, 0, buf, 0, 4096).unwrap();
    let stats = ring.stats().unwrap();
    assert_eq!((stats.completed, stats.errors), (4, 1));
}

#[test]
fn delayed_completion_arrives_late_and_correct() {
    let broker = TestBroker::start(&["--inject", "delay:2:300"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8192).unwrap();
    ring.buffer_mut(buf, 0, 4096).unwrap().fill(7);
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    let t = Instant::now();
    ring.read(ns, 0, buf, 4096, 4096).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(290), "completion was not delayed");
    assert!(ring.buffer(buf, 4096, 4096).unwrap().iter().all(|&b| b == 7));
}

#[test]
fn unregistering_a_buffer_with_io_in_flight_waits_for_the_io() {
    // The first I/O is held for 3 s by the device.
    let broker = TestBroker::start(&["--inject", "delay:1:3000"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    let other = ring.alloc_buffer(4096).unwrap();
    ring.prep(Io::read(ns, 0, 4096, buf, 0).user_data(5)).unwrap();
    ring.submit().unwrap();
    // The library refuses to hand out the range or unregister the buffer...
    assert!(matches!(ring.buffer(buf, 0, 16), Err(Error::InFlight { .. })));
    assert!(matches!(ring.unregister_buffer(buf), Err(Error::InFlight { .. })));
    wait_until("the read to reach the device", Duration::from_secs(5), || {
        ring.stats().unwrap().in_flight == 1
    });
    // ...and when asked directly, the broker answers only once no command uses the buffer: its
    // memory is the client's again only then.
    let session = ring.session();
    let asked = Instant::now();
    let unregister = std::thread::spawn(move || {
        (session.control(&Request::UnregisterBuffer { buffer_id: buf.0 }, &[]), asked.elapsed())
    });
    // Meanwhile new requests may not use it (the broker refuses them), other buffers work.
    // Reads of it succeed until the unregister reaches the broker, then are refused while
    // the held read is still at the device.
    let mut out = Vec::new();
    let mut tag = 77u64;
    let refused = loop {
        assert!(asked.elapsed() < Duration::from_secs(20), "no read of the buffer was refused");
        // SAFETY: the raw request names a buffer the broker is unregistering; no memory of
        // this process is involved beyond the ring.
        unsafe {
            ring.prep_raw(Sqe {
                opcode: Opcode::Read as u8,
                nsid: ns,
                len: 4096,
                buf_id: buf.0,
                user_data: tag,
                ..Sqe::default()
            })
        }
        .unwrap();
        ring.submit().unwrap();
        while !out.iter().any(|c: &nvmed_client::Completion| c.user_data == tag) {
            ring.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
        }
        let c = *out.iter().find(|c| c.user_data == tag).unwrap();
        if c.status != Status::Success {
            break c;
        }
        tag += 1;
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(refused.status, Status::Broker(BrokerStatus::BadBuffer), "{refused:?}");
    assert!(
        !out.iter().any(|c| c.user_data == 5),
        "refused while the held read was still at the device (else the buffer was simply gone)"
    );
    let (answer, _) = unregister.join().unwrap();
    answer.unwrap();
    // The held read completed normally, before the answer: its completion is already there.
    ring.poll(&mut out).unwrap();
    let held = out.iter().find(|c| c.user_data == 5).unwrap();
    assert!(held.status.is_success(), "{held:?}");
    ring.write(ns, 4096, other, 0, 4096).unwrap();
    assert_eq!(ring.stats().unwrap().buffers, 1);
}

#[test]
fn killed_client_is_drained_and_released_while_others_continue() {
    killed_client_scenario(&[]);
}

/// The same on a device that completes later and out of order, with its DMA at completion
/// time: commands are really at the device when the client dies.
#[test]
fn killed_client_on_an_asynchronous_device() {
    killed_client_scenario(&[
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "100",
        "--queue-depth",
        "64",
    ]);
}

fn killed_client_scenario(args: &[&str]) {
    let broker = TestBroker::start(args);
    let mut survivor = broker.connect();
    let base_iova = survivor.stats().unwrap().broker_buffer_iova_bytes;
    // A child process hammering its own region with writes.
    let mut child = start_hammer("hammer", &broker.socket);
    let peak = survivor.stats().unwrap();
    assert_eq!(peak.broker_sessions, 2);
    assert!(peak.broker_buffer_iova_bytes >= base_iova + 8 * MIB);
    let survivor_thread = std::thread::spawn(move || {
        random_write_read(&mut survivor, (32 * MIB, 8 * MIB), 99, 6);
        survivor
    });
    // The child has writes at the device or streaming through its ring (start_hammer).
    child.kill().unwrap(); // SIGKILL, with I/O in flight
    child.wait().unwrap();
    let mut survivor = survivor_thread.join().expect("the surviving client failed");
    let mut stats = survivor.stats().unwrap();
    wait_until("the killed client's session to be released", Duration::from_secs(10), || {
        stats = survivor.stats().unwrap();
        stats.broker_sessions == 1
    });
    let mine = stats.buffer_bytes;
    assert_eq!(stats.broker_buffer_iova_bytes, mine, "the killed client's IOVA mappings were not released");
    random_write_read(&mut survivor, (40 * MIB, 4 * MIB), 100, 2);
}

#[test]
fn data_survives_a_broker_restart_on_a_backing_file() {
    let dir = scratch_dir();
    let file = dir.join("disk.img");
    let file_arg = file.to_str().unwrap().to_string();
    let mut broker = TestBroker::start_in(dir.clone(), &["--backing", &file_arg]);
    {
        let mut ring = broker.connect();
        let ns = ring.namespaces()[0].nsid;
        let buf = ring.alloc_buffer(1 << 20).unwrap();
        pattern(42, ring.buffer_mut(buf, 0, 1 << 20).unwrap());
        ring.write(ns, 3 * MIB, buf, 0, 512 * 1024).unwrap();
        ring.write(ns, 3 * MIB + 512 * 1024, buf, 512 * 1024, 512 * 1024).unwrap();
        ring.flush(ns).unwrap();
    }
    assert!(broker.stop(), "broker did not shut down cleanly");
    assert!(!broker.socket.exists(), "socket file left behind");
    let broker2 = TestBroker::start_in(dir, &["--backing", &file_arg]);
    let mut ring = broker2.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(1 << 20).unwrap();
    ring.read(ns, 3 * MIB, buf, 0, 512 * 1024).unwrap();
    ring.read(ns, 3 * MIB + 512 * 1024, buf, 512 * 1024, 512 * 1024).unwrap();
    let mut expect = vec![0u8; 1 << 20];
    pattern(42, &mut expect);
    assert!(ring.buffer(buf, 0, 1 << 20).unwrap() == &expect[..]);
    drop(broker);
}

#[test]
fn read_only_and_windowed_grants() {
    // uid 0 (the test) gets namespace 1 blocks 2048..4096, read-only.
    let broker = TestBroker::start(&["--grant", "0:1:2048+2048:ro"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0];
    assert!(ns.read_only);
    assert_eq!(ns.lba_count, 2048);
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.read(ns.nsid, 0, buf, 0, 4096).unwrap();
    let e = ring.write(ns.nsid, 0, buf, 0, 4096).unwrap_err();
    assert!(matches!(e, Error::Io(Status::Broker(nvmed_client::BrokerStatus::NotPermitted))), "{e:?}");
    let e = ring.read(ns.nsid, 2048 * 512, buf, 0, 512).unwrap_err();
    assert!(matches!(e, Error::Io(Status::Broker(nvmed_client::BrokerStatus::OutOfRange))), "{e:?}");
}

#[test]
fn nops_round_trip_and_ring_wraps() {
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect_with(8, 8);
    let mut out = Vec::new();
    for round in 0..100u64 {
        for i in 0..8 {
            ring.prep(Io::nop().user_data(round * 8 + i)).unwrap();
        }
        assert!(matches!(ring.prep(Io::nop()), Err(Error::SqFull)));
        ring.submit().unwrap();
        out.clear();
        let mut got = 0;
        while got < 8 {
            got += ring.wait(8 - got, &mut out, Some(Duration::from_secs(10))).unwrap();
        }
        let mut ids: Vec<u64> = out.iter().map(|c| c.user_data).collect();
        ids.sort();
        assert_eq!(ids, (round * 8..round * 8 + 8).collect::<Vec<_>>());
    }
}

#[test]
fn clean_shutdown_on_sigterm_with_clients_connected() {
    let mut broker = TestBroker::start(&[]);
    let mut ring = broker.connect_once();
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.write(1, 0, buf, 0, 4096).unwrap();
    assert!(broker.stop(), "nvmed did not exit 0 on SIGTERM");
    assert!(!broker.socket.exists());
    let mut out = Vec::new();
    ring.prep(Io::nop()).unwrap();
    let _ = ring.submit();
    let r = ring.wait(1, &mut out, Some(Duration::from_secs(5)));
    assert!(r.is_err(), "a client of a stopped broker must get an error, got {r:?}");
    match ring.control(&Request::Stats, &[]) {
        Err(Error::BrokerGone) => {}
        other => panic!("expected BrokerGone, got {other:?}"),
    }
    let _ = Response::Goodbye;
}

#[test]
fn data_moves_by_device_dma_only() {
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let before = ring.stats().unwrap();
    let buf = ring.alloc_buffer(4 * MIB as usize).unwrap();
    pattern(3, ring.buffer_mut(buf, 0, 2 * MIB).unwrap());
    let ios: Vec<Io> =
        (0..16).map(|i| Io::write(ns, i * 128 * 1024, 128 * 1024, buf, i * 128 * 1024)).collect();
    assert!(run_batch(&mut ring, &ios, 16).values().all(|c| c.status.is_success()));
    let ios: Vec<Io> =
        (0..16).map(|i| Io::read(ns, i * 128 * 1024, 128 * 1024, buf, 2 * MIB + i * 128 * 1024)).collect();
    assert!(run_batch(&mut ring, &ios, 16).values().all(|c| c.status.is_success()));
    let after = ring.stats().unwrap();
    assert!(ring.buffer(buf, 0, 2 * MIB).unwrap() == ring.buffer(buf, 2 * MIB, 2 * MIB).unwrap());
    let moved = after.bytes_read + after.bytes_written - before.bytes_read - before.bytes_written;
    assert_eq!(moved, 4 * MIB);
    // Every byte went between the device and the client's buffer by DMA, none through the broker.
    let dma = after.device_dma_bytes.unwrap() - before.device_dma_bytes.unwrap();
    assert_eq!(dma, moved, "the device moved {dma} bytes for {moved} bytes of I/O");
}

/// Writes a pattern at 0, then reads it back into the second half of `buf` with the fault the
/// broker was started with in the way; returns the read's outcome and how long it took.
fn read_through_fault(ring: &mut NvmeRing) -> (Result<(), Error>, Duration) {
    let ns = ring.namespaces()[0].nsid;
    let buf = nvmed_client::BufferId(ring.alloc_buffer(8192).unwrap().0);
    pattern(11, ring.buffer_mut(buf, 0, 4096).unwrap());
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    let t = Instant::now();
    let r = ring.read(ns, 0, buf, 4096, 4096);
    let took = t.elapsed();
    if r.is_ok() {
        assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap(), "data differs");
    }
    (r, took)
}

#[test]
fn a_command_that_times_out_is_aborted_and_sent_again() {
    // The 2nd I/O command is swallowed by the device; after 300 ms the broker aborts it, the
    // controller completes it with Command Abort Requested, and the broker sends it again: the
    // client sees latency, not an error, and no reset happened.
    let broker = TestBroker::start(&["--inject", "hang:2", "--io-timeout-ms", "300"]);
    let mut ring = broker.connect();
    let (r, took) = read_through_fault(&mut ring);
    r.unwrap();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    let s = ring.stats().unwrap();
    assert_eq!((s.broker_aborts, s.broker_resets), (1, 0));
}

#[test]
fn a_command_the_controller_will_not_abort_resets_it_and_is_sent_again() {
    let broker = TestBroker::start(&["--inject", "stuck:2", "--io-timeout-ms", "300"]);
    let mut ring = broker.connect();
    let (r, took) = read_through_fault(&mut ring);
    r.unwrap();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    let s = ring.stats().unwrap();
    assert_eq!((s.broker_aborts, s.broker_resets), (1, 1));
    assert!(s.broker_retries >= 1);
}

#[test]
fn without_abort_a_timeout_resets_at_once() {
    let broker = TestBroker::start(&["--inject", "hang:2", "--io-timeout-ms", "300", "--no-abort"]);
    let mut ring = broker.connect();
    read_through_fault(&mut ring).0.unwrap();
    let s = ring.stats().unwrap();
    assert_eq!((s.broker_aborts, s.broker_resets), (0, 1));
}

#[test]
fn a_fatal_controller_status_resets_it_and_the_command_is_sent_again() {
    let broker = TestBroker::start(&["--inject", "fatal:2", "--io-timeout-ms", "300"]);
    let mut ring = broker.connect();
    read_through_fault(&mut ring).0.unwrap();
    assert_eq!(ring.stats().unwrap().broker_resets, 1);
}

#[test]
fn a_retryable_status_is_retried_and_succeeds() {
    let broker = TestBroker::start(&["--inject", "retry:2", "--inject", "retry:3"]);
    let mut ring = broker.connect();
    read_through_fault(&mut ring).0.unwrap();
    let s = ring.stats().unwrap();
    assert_eq!((s.broker_retries, s.broker_resets, s.errors), (2, 0, 0));
}

#[test]
fn a_retryable_status_on_every_try_reaches_the_client() {
    // Tries 2, 3 and 4 all fail retryably; with --io-tries 3 the client gets the status.
    let broker = TestBroker::start(&[
        "--io-tries",
        "3",
        "--inject",
        "retry:2",
        "--inject",
        "retry:3",
        "--inject",
        "retry:4",
    ]);
    let mut ring = broker.connect();
    match read_through_fault(&mut ring).0 {
        Err(Error::Io(Status::Nvme(s))) => assert_eq!((s.sct, s.sc, s.dnr), (0, 0x82, false), "{s:?}"),
        other => panic!("expected Namespace Not Ready, got {other:?}"),
    }
    // The next read is a new request with its own tries.
    read_through_fault(&mut ring).0.unwrap();
}

#[test]
fn a_command_out_of_tries_fails_with_device_reset_and_the_device_serves_on() {
    // With one try, the command the controller would not abort fails with DeviceReset.
    let broker = TestBroker::start(&["--inject", "stuck:2", "--io-timeout-ms", "300", "--io-tries", "1"]);
    let mut ring = broker.connect();
    match read_through_fault(&mut ring).0 {
        Err(Error::Io(Status::Broker(nvmed_client::BrokerStatus::DeviceReset))) => {}
        other => panic!("expected DeviceReset, got {other:?}"),
    }
    // The controller is back and the data written before the reset is there.
    read_through_fault(&mut ring).0.unwrap();
    // A session whose command was failed can leave and be released.
    let stats = ring.stats().unwrap();
    assert_eq!(stats.in_flight, 0);
    drop(ring);
    let mut other = broker.connect();
    let mut s = other.stats().unwrap();
    wait_until("the first session to be released", Duration::from_secs(5), || {
        s = other.stats().unwrap();
        s.broker_sessions == 1
    });
}

#[test]
fn a_media_error_is_passed_through_untried_and_a_write_repairs_the_block() {
    // LBA 8 (512-byte blocks: bytes 4096..4608) reads with an unrecovered read error.
    let broker = TestBroker::start(&["--inject", "media:8"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    // (The emulated controller reports a volatile write cache, as most SSDs, and runs.)
    assert!(ring.namespaces()[0].volatile_write_cache);
    assert_eq!(ring.namespaces()[0].state, nvmed_client::ControllerState::Running);
    let buf = ring.alloc_buffer(8192).unwrap();
    ring.read(ns, 0, buf, 0, 4096).unwrap();
    match ring.read(ns, 0, buf, 0, 8192) {
        Err(Error::Io(Status::Nvme(s))) => assert_eq!((s.sct, s.sc, s.dnr), (2, 0x81, true), "{s:?}"),
        other => panic!("expected the media error, got {other:?}"),
    }
    assert_eq!(ring.stats().unwrap().broker_retries, 0, "a Do Not Retry status was retried");
    pattern(3, ring.buffer_mut(buf, 0, 4096).unwrap());
    ring.write(ns, 4096, buf, 0, 4096).unwrap();
    ring.read(ns, 4096, buf, 4096, 4096).unwrap();
    assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap());
}

#[test]
fn a_device_that_disappears_fails_everything_with_device_gone() {
    // The 2nd command finds the device gone: it never completes, the broker finds out at its
    // timeout (registers read as all ones) and fails it; later requests fail at once; the
    // control socket still answers, and says so; SIGTERM still ends the broker cleanly.
    let mut broker = TestBroker::start(&["--inject", "gone:2", "--io-timeout-ms", "300"]);
    let mut ring = broker.connect();
    let gone = Status::Broker(nvmed_client::BrokerStatus::DeviceGone);
    match read_through_fault(&mut ring).0 {
        Err(Error::Io(s)) if s == gone => {}
        other => panic!("expected DeviceGone, got {other:?}"),
    }
    let buf = ring.alloc_buffer(4096).unwrap();
    let t = Instant::now();
    match ring.read(1, 0, buf, 0, 4096) {
        Err(Error::Io(s)) if s == gone => {}
        other => panic!("expected DeviceGone, got {other:?}"),
    }
    assert!(t.elapsed() < Duration::from_millis(200), "a request to a gone device waited");
    let Response::Namespaces(list) = ring.control(&Request::ListNamespaces, &[]).unwrap() else {
        panic!("no namespace list")
    };
    assert_eq!(list[0].state, nvmed_client::ControllerState::Gone);
    // Idle, it sleeps rather than spins.
    let pid = broker.child.as_ref().unwrap().id();
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let f: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|x| x.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let before = cpu();
    std::thread::sleep(Duration::from_secs(1));
    assert!(cpu() - before < 30, "the broker spins on a gone device");
    drop(ring);
    assert!(broker.stop(), "nvmed did not exit cleanly with its device gone");
}

#[test]
fn polled_queue_without_interrupts_still_completes_late_commands() {
    // No interrupts and no polling grace: the broker sleeps at once and must look at the device
    // again by itself to see the delayed completion.
    let broker = TestBroker::start(&["--no-interrupts", "--poll-idle-us", "0", "--inject", "delay:1:200"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    let t = Instant::now();
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    assert!(t.elapsed() >= Duration::from_millis(190));
    ring.read(ns, 0, buf, 0, 4096).unwrap();
}

#[test]
fn options_from_a_config_file_and_the_command_line() {
    use std::os::unix::fs::PermissionsExt;
    let dir = scratch_dir();
    let socket = dir.join("cfg.sock");
    let cfg = dir.join("nvmed.toml");
    std::fs::write(
        &cfg,
        format!(
            "emulate = true\nsocket = {socket:?}\nsize = \"32M\"\nlba-size = 4096\nsocket-mode = \"600\"\nmax_sessions = 1\ngrant = [\"0:1:16+1024\"]\n"
        ),
    )
    .unwrap();
    // The command line overrides the file's size.
    let args = ["--config", cfg.to_str().unwrap(), "--size", "16M"].map(String::from);
    let mut broker = TestBroker::spawn(dir.clone(), socket.clone(), &args);
    assert_eq!(std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777, 0o600);
    let ring = NvmeRing::open(&socket).unwrap();
    let ns = ring.namespaces()[0];
    assert_eq!((ns.lba_size, ns.lba_count), (4096, 1024), "grant window of the 16 MiB namespace");
    assert!(matches!(NvmeRing::open(&socket), Err(Error::Refused(_))), "max_sessions = 1 from the file");
    drop(ring);
    assert!(broker.stop(), "nvmed did not exit 0 on SIGTERM");

    // An unknown key is named in the error.
    std::fs::write(&cfg, "emulate = true\ncolour = \"blue\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvmed"))
        .args(["--config", cfg.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--colour"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn requests_above_mdts_are_split_and_fail_as_a_whole() {
    // MDTS 1: the device takes at most 8 KiB per command. The 4th I/O command fails.
    let broker = TestBroker::start(&["--mdts", "1", "--inject", "fail:4:2:0x80"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0];
    assert!(ns.max_transfer >= 1 << 20);
    let buf = ring.alloc_buffer(4 * MIB as usize).unwrap();
    // 64 KiB = 8 device commands, the 4th fails: the request fails once, with that status.
    match ring.write(ns.nsid, 0, buf, 0, 65536) {
        Err(Error::Io(Status::Nvme(NvmeStatus { sct: 2, sc: 0x80, .. }))) => {}
        other => panic!("expected the injected write fault, got {other:?}"),
    }
    let s = ring.stats().unwrap();
    assert_eq!((s.completed, s.errors, s.in_flight), (1, 1, 0));
    // 1 MiB at an in-page buffer offset = 129 commands; verified read back.
    pattern(21, ring.buffer_mut(buf, 512, MIB).unwrap());
    ring.write(ns.nsid, 3 * MIB, buf, 512, MIB as u32).unwrap();
    ring.read(ns.nsid, 3 * MIB, buf, 2 * MIB + 4, MIB as u32).unwrap();
    assert!(ring.buffer(buf, 512, MIB).unwrap() == ring.buffer(buf, 2 * MIB + 4, MIB).unwrap());
    let s = ring.stats().unwrap();
    assert_eq!((s.completed, s.errors, s.bytes_read, s.bytes_written), (3, 1, MIB, MIB));
    // The device moved every piece: all but the failed one of the first request (its other
    // pieces were already at the device, as with any multi-command write), then 2 MiB.
    assert_eq!(s.device_dma_bytes, Some(2 * MIB + 7 * 8192));
}

#[test]
fn the_example_config_is_valid() {
    let dir = scratch_dir();
    let socket = dir.join("ex.sock");
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/nvmed.toml")).unwrap();
    // Same file, but on the emulated controller, a scratch socket and no group change.
    let text: String = text
        .lines()
        .map(|l| match l.split('=').next().map(str::trim) {
            Some("pci") => "emulate = true".to_string(),
            Some("socket") => format!("socket = {socket:?}"),
            Some("socket-group") => String::new(),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    let cfg = dir.join("ex.toml");
    std::fs::write(&cfg, text).unwrap();
    let args = ["--config", cfg.to_str().unwrap(), "--size", "8M"].map(String::from);
    let mut broker = TestBroker::spawn(dir.clone(), socket.clone(), &args);
    // uid 0 has no grant and default-access is none: it sees no namespace, and may not pin
    // memory meanwhile.
    let mut ring = NvmeRing::open(&socket).unwrap();
    assert!(ring.namespaces().is_empty());
    match ring.alloc_buffer(4096) {
        Err(Error::Refused(nvmed_proto::ControlError::BufferLimit(m))) => {
            assert!(m.contains("no namespace"), "{m}")
        }
        other => panic!("a uid without access registered memory: {other:?}"),
    }
    drop(ring);
    assert!(broker.stop());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_client_that_stopped_waiting_does_not_ask_for_wakeups() {
    use nvmed_proto::layout::{CLIENT_CQ_WAITING, CLIENT_FLAGS_OFFSET};
    let broker = TestBroker::start(&[]);
    let opts = nvmed_client::RingOptions { spin: Duration::ZERO, ..Default::default() };
    let mut ring = NvmeRing::open_with(&broker.socket, opts).unwrap();
    let mut out = Vec::new();
    for i in 0..2000 {
        ring.prep(Io::nop().user_data(i)).unwrap();
        ring.submit().unwrap();
        out.clear();
        ring.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
        let flags = ring.ring_memory().load_u32(CLIENT_FLAGS_OFFSET, std::sync::atomic::Ordering::Acquire);
        // A flag left set would make the broker write the eventfd on every completion.
        assert_eq!(flags & CLIENT_CQ_WAITING, 0, "CQ_WAITING left set after wait #{i}");
    }
}

#[test]
fn a_client_with_a_wake_index_is_woken_once_its_completions_are_all_there() {
    // The sleep a client announces names the CQ index it waits for (wait(min) does this): the
    // broker publishes the completions of three reads while the client waits for four, without
    // writing the completion doorbell, and writes it with the fourth.
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use nvmed_proto::layout::{
        CLIENT_CQ_WAITING, CLIENT_CQ_WAKE_AT, CLIENT_FLAGS_OFFSET, CLIENT_WAKE_AT_OFFSET,
    };
    use std::sync::atomic::Ordering;
    let broker = TestBroker::start(&["--emulator-mode", "async", "--emulator-latency-us", "200000"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4 * 4096).unwrap();
    // Announce the sleep by hand (as `wait(4)` would: wake index = head 0 + 4).
    ring.ring_memory().store_u32(CLIENT_WAKE_AT_OFFSET, 4, Ordering::Relaxed);
    ring.ring_memory().fetch_or_u32(
        CLIENT_FLAGS_OFFSET,
        CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT,
        Ordering::SeqCst,
    );
    let readable = |ring: &NvmeRing| {
        let mut fds = [PollFd::new(ring.completion_fd(), PollFlags::POLLIN)];
        poll(&mut fds, PollTimeout::ZERO).unwrap() > 0
    };
    for i in 0..3u64 {
        ring.prep(Io::read(ns, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
    }
    ring.submit().unwrap();
    let start = Instant::now();
    while ring.ready_completions() < 3 {
        assert!(!readable(&ring), "woken with {} of the 4 completions waited for", ring.ready_completions());
        assert!(start.elapsed() < Duration::from_secs(20), "the three reads did not complete");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Three of four there, published: no doorbell (a little later still none).
    std::thread::sleep(Duration::from_millis(50));
    assert!(!readable(&ring), "woken with 3 of the 4 completions waited for");
    ring.prep(Io::read(ns, 3 * 4096, 4096, buf, 3 * 4096).user_data(3)).unwrap();
    ring.submit().unwrap();
    loop {
        // The eventfd first, then the CQ: a signal is written only after the fourth completion
        // was published, so a readable eventfd means all four are there.
        let signalled = readable(&ring);
        let ready = ring.ready_completions();
        if signalled {
            assert_eq!(ready, 4, "woken with {ready} of the 4 completions waited for");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "never woken ({ready} completions ready)");
        std::thread::sleep(Duration::from_millis(5));
    }
    ring.ring_memory().fetch_and_not_u32(
        CLIENT_FLAGS_OFFSET,
        CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT,
        Ordering::SeqCst,
    );
    let mut out = Vec::new();
    assert_eq!(ring.wait(4, &mut out, Some(Duration::from_secs(5))).unwrap(), 4);
    assert!(out.iter().all(|c| c.status.is_success()));

    // And wait(min) itself: four more reads spread out, one wait for all of them.
    let opts = nvmed_client::RingOptions { spin: Duration::ZERO, ..Default::default() };
    let mut ring = NvmeRing::open_with(&broker.socket, opts).unwrap();
    let buf = ring.alloc_buffer(4 * 4096).unwrap();
    for i in 0..4u64 {
        ring.prep(Io::read(ns, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
        ring.submit().unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    out.clear();
    // The last read completes about 260 ms after the first was sent. A wait whose index is
    // never reached sleeps until its timeout (10 s) and only then finds the completions.
    let t = Instant::now();
    assert_eq!(ring.wait(4, &mut out, Some(Duration::from_secs(10))).unwrap(), 4);
    assert!(t.elapsed() < Duration::from_secs(5), "woken at the timeout, not by the broker");
    let flags = ring.ring_memory().load_u32(CLIENT_FLAGS_OFFSET, Ordering::Acquire);
    assert_eq!(flags & (CLIENT_CQ_WAITING | CLIENT_CQ_WAKE_AT), 0, "sleep bits left set after the wait");

    // More outstanding than the CQ holds: 8 reads at the device fill an 8-entry CQ's room, 8
    // more wait in the SQ until those are reaped. wait(16) must ask to be woken at a full CQ
    // (8), not at 16, which the broker never reaches before the client reaps.
    let opts = nvmed_client::RingOptions {
        spin: Duration::ZERO,
        sq_entries: 8,
        cq_entries: 8,
        ..Default::default()
    };
    let mut ring = NvmeRing::open_with(&broker.socket, opts).unwrap();
    let buf = ring.alloc_buffer(16 * 4096).unwrap();
    for i in 0..16u64 {
        ring.prep(Io::read(ns, i * 4096, 4096, buf, i * 4096).user_data(i)).unwrap();
        if i % 8 == 7 {
            ring.submit().unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    out.clear();
    let t = Instant::now();
    assert_eq!(ring.wait(16, &mut out, Some(Duration::from_secs(10))).unwrap(), 16);
    // Two rounds of the 200 ms device latency, well under the 10 s the wait would sleep.
    assert!(t.elapsed() < Duration::from_secs(5), "a wake index past the CQ's size was never reached");
}

#[test]
fn guest_ram_regions_at_offsets_of_one_memfd() {
    // A VMM keeps guest RAM in one memfd and registers each region at its offset.
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let ram = memfd::MemfdOptions::new().allow_sealing(true).create("guest-ram").unwrap();
    ram.as_file().set_len(8 * MIB).unwrap();
    ram.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealGrow]).unwrap();
    let fd: std::os::fd::OwnedFd = ram.into_file().into();
    let low =
        nvmed_client::MemfdBuffer::from_sealed_memfd_range(fd.try_clone().unwrap(), 0, MIB as usize).unwrap();
    let high = nvmed_client::MemfdBuffer::from_sealed_memfd_range(
        fd.try_clone().unwrap(),
        5 * MIB,
        2 * MIB as usize,
    )
    .unwrap();
    let low = ring.register_buffer(low).unwrap();
    let high = ring.register_buffer(high).unwrap();
    pattern(77, ring.buffer_mut(low, 0, 65536).unwrap());
    ring.write(ns, 0, low, 0, 65536).unwrap();
    ring.read(ns, 0, high, MIB, 65536).unwrap();
    // Through a mapping of the whole memfd: the read landed at 5 MiB + 1 MiB of guest RAM.
    let whole = nvmed_client::MemfdBuffer::from_sealed_memfd(fd, 8 * MIB as usize).unwrap();
    let whole = ring.register_buffer(whole).unwrap();
    let mut expect = vec![0u8; 65536];
    pattern(77, &mut expect);
    assert!(ring.buffer(whole, 6 * MIB, 65536).unwrap() == &expect[..]);
    assert!(ring.buffer(whole, 0, 65536).unwrap() == &expect[..]);
    assert!(ring.buffer(whole, 5 * MIB, 4096).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn grants_across_several_namespaces() {
    // Three namespaces; uid 0 (the test) may read-write namespace 2 and read namespace 3 only.
    let broker =
        TestBroker::start(&["--namespaces", "3", "--size", "8M", "--grant", "0:2", "--grant", "0:3:ro"]);
    let mut ring = broker.connect();
    let seen: Vec<(u32, bool)> = ring.namespaces().iter().map(|n| (n.nsid, n.read_only)).collect();
    assert_eq!(seen, [(2, false), (3, true)]);
    let buf = ring.alloc_buffer(8192).unwrap();
    pattern(2, ring.buffer_mut(buf, 0, 4096).unwrap());
    ring.write(2, 0, buf, 0, 4096).unwrap();
    ring.read(2, 0, buf, 4096, 4096).unwrap();
    assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap());
    // Namespace 3 holds other data (zeroes): the namespaces are separate.
    ring.read(3, 0, buf, 4096, 4096).unwrap();
    assert!(ring.buffer(buf, 4096, 4096).unwrap().iter().all(|&b| b == 0));
    let e = ring.write(3, 0, buf, 0, 4096).unwrap_err();
    assert!(matches!(e, Error::Io(Status::Broker(nvmed_client::BrokerStatus::NotPermitted))), "{e:?}");
    let e = ring.read(1, 0, buf, 0, 4096).unwrap_err();
    assert!(matches!(e, Error::Io(Status::Broker(nvmed_client::BrokerStatus::InvalidNamespace))), "{e:?}");
}

#[test]
fn a_new_session_can_wait_for_a_killed_client_s_io_to_drain() {
    // Every command spends two seconds at the device: the killed client's are still there.
    let broker = TestBroker::start(&["--emulator-mode", "async", "--emulator-latency-us", "2000000"]);
    let mut me = broker.connect();
    // Returns once the broker reports the child's writes at the device.
    let mut child = start_hammer("hammer", &broker.socket);
    child.kill().unwrap();
    child.wait().unwrap();
    let t = Instant::now();
    let waited = me.session().await_drained(Duration::from_secs(20)).unwrap();
    let took = t.elapsed();
    assert_eq!(waited, 1, "the killed client's session was not waited for");
    assert!(took >= Duration::from_millis(500), "returned after {took:?}, before its I/O could finish");
    // Once it returns, the dead session is gone, memory and all.
    let stats = me.stats().unwrap();
    assert_eq!(stats.broker_sessions, 1);
    assert_eq!(stats.broker_buffer_iova_bytes, stats.buffer_bytes);
    // Nothing left to wait for.
    assert_eq!(me.session().await_drained(Duration::from_secs(1)).unwrap(), 0);
}

#[test]
fn a_client_sees_the_health_of_its_own_controllers_only() {
    // Two controllers; uid 0 (the tests) is granted only namespace 2, on controller 1.
    let broker = TestBroker::start(&["--controllers", "2", "--grant", "0:2"]);
    let mut ring = broker.connect();
    let h = ring.health().unwrap();
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].controller, 1);
    assert!(h[0].model.contains("emulated"), "{h:?}");
    let smart = h[0].smart.as_ref().unwrap();
    assert_eq!((smart.temperature_kelvin, smart.available_spare), (313, 100));
    // Asked again at once: the same (cached) answer, without another admin command.
    assert_eq!(ring.health().unwrap(), h);
}

#[test]
fn a_synchronous_call_keeps_the_completions_of_other_requests() {
    // A synchronous read waits for its own completion; the requests queued before it complete
    // meanwhile, and their completions must reach the next wait, not vanish.
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    for i in 0..8u64 {
        ring.prep(Io::nop().user_data(100 + i)).unwrap();
    }
    ring.submit().unwrap();
    // Let them complete before the synchronous call reaps the CQ.
    wait_until("8 completions posted", Duration::from_secs(10), || ring.ready_completions() >= 8);
    ring.read(ns, 0, buf, 0, 4096).unwrap();
    assert_eq!(ring.ready_completions(), 8, "held back for the caller");
    let mut out = Vec::new();
    ring.wait(8, &mut out, Some(Duration::from_secs(5))).expect("the 8 no-ops' completions");
    let mut tags: Vec<u64> = out.iter().map(|c| c.user_data).collect();
    tags.sort_unstable();
    assert_eq!(tags, (100..108).collect::<Vec<_>>());
    assert!(out.iter().all(|c| c.status.is_success()));
    // Nothing of the read's own completion leaks out, and the ring goes on as usual.
    assert_eq!(ring.in_flight(), 0);
    ring.prep(Io::nop().user_data(7)).unwrap();
    ring.submit().unwrap();
    out.clear();
    ring.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].user_data, 7);
}

/// The largest emulated broker: 8 controllers of 16 namespaces, 4 I/O threads (32 queue pairs:
/// the broker's own DMA area grows with them; it once ran out at 8 controllers, or at 2
/// controllers with 4 threads). Every namespace is listed in one control message, and I/O on
/// the last controller's last namespace verifies from a ring on every thread.
#[test]
fn the_largest_emulated_broker_starts_lists_all_its_namespaces_and_serves_them() {
    let broker = TestBroker::start(&["--controllers", "8", "--namespaces", "16", "--io-threads", "4"]);
    let session = nvmed_client::NvmeSession::open(&broker.socket).unwrap();
    assert_eq!(session.namespaces().len(), 128);
    let last = *session.namespaces().iter().max_by_key(|n| n.nsid).unwrap();
    assert_eq!(last.controller, 7);
    for thread in 0..4u16 {
        let mut ring = session
            .new_ring_with(nvmed_client::RingOptions { thread: Some(thread), ..Default::default() })
            .unwrap();
        assert_eq!(ring.io_thread(), thread);
        let buf = ring.alloc_buffer(8192).unwrap();
        pattern(u64::from(thread), ring.buffer_mut(buf, 0, 4096).unwrap());
        let at = u64::from(thread) * 4096;
        ring.write(last.nsid, at, buf, 0, 4096).unwrap();
        ring.read(last.nsid, at, buf, 4096, 4096).unwrap();
        assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap());
    }
}

#[test]
fn a_shared_buffer_named_by_a_queued_request_keeps_its_id() {
    // A request queued on a shared buffer (not submitted yet) and the buffer's last handle
    // dropped: the ring took a clone when the request named it, so the buffer stays registered
    // and its id is not given to another buffer, which the request would otherwise reach.
    let broker = TestBroker::start(&[]);
    let session = nvmed_client::NvmeSession::open(&broker.socket).unwrap();
    let ns = session.namespaces()[0].nsid;
    let shared = session.alloc_shared(8192).unwrap();
    let id = shared.id();
    let mut a = session.new_ring().unwrap();
    let mut b = session.new_ring().unwrap();
    a.prep(Io::read(ns, 0, 4096, id, 0).user_data(1)).unwrap();
    drop(shared);
    let other = b.alloc_buffer(8192).unwrap();
    assert_ne!(other, id, "the queued request's buffer id went to another buffer");
    a.submit().unwrap();
    let mut out = Vec::new();
    a.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
    assert!(out[0].status.is_success());
    // Its request done and its caller's handles gone, the ring let go of it: unregistered.
    assert_eq!(b.session().stats().unwrap().buffers, 1);
    assert!(matches!(a.release_shared(id), Err(Error::UnknownBuffer(_))));
    // Temporary shared buffers, each used and then dropped while the ring is idle, do not
    // pile up: the ring lets go of them at its next request (or after a while of polling).
    for _ in 0..3 {
        let tmp = session.alloc_shared(4096).unwrap();
        a.read(ns, 0, tmp.id(), 0, 4096).unwrap();
        drop(tmp);
    }
    // (Each read let go of the buffer dropped before it: only the last one is still held.)
    assert_eq!(b.session().stats().unwrap().buffers, 1 + 1, "held by the ring until it looks");
    a.prep(Io::nop().user_data(9)).unwrap();
    assert_eq!(b.session().stats().unwrap().buffers, 1, "the ring's next request let go of them");
    a.submit().unwrap();
    out.clear();
    a.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
    // Another session's shared buffer is refused, not confused with this session's ids.
    let elsewhere = nvmed_client::NvmeSession::open(&broker.socket).unwrap();
    let theirs = elsewhere.alloc_shared(4096).unwrap();
    assert!(matches!(a.use_shared(&theirs), Err(Error::ForeignBuffer(_))));
    // A read or write must name its buffer (none meant buffer 0, unaccounted).
    let none = Io { buffer: None, ..Io::read(ns, 0, 4096, other, 0) };
    assert!(matches!(b.prep(none), Err(Error::NoBuffer)));
    // A wait for more than is in flight fails at once instead of never ending.
    b.prep(Io::nop().user_data(7)).unwrap();
    out.clear();
    assert!(matches!(
        b.wait(1, &mut out, None),
        Err(Error::WaitBeyondOutstanding { wanted: 1, outstanding: 0 })
    ));
    b.submit().unwrap();
    b.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
}

#[test]
fn a_ring_using_a_shared_buffer_knows_when_it_is_done_with_it() {
    let broker = TestBroker::start(&[]);
    let session = nvmed_client::NvmeSession::open(&broker.socket).unwrap();
    let ns = session.namespaces()[0].nsid;
    let shared = session.alloc_shared(64 << 10).unwrap();
    let mut a = session.new_ring().unwrap();
    let mut b = session.new_ring().unwrap();
    let id = a.use_shared(&shared).unwrap();
    assert_eq!(id, shared.id());
    // Its memory is reached through the SharedBuffer only.
    assert!(matches!(a.buffer(id, 0, 4096), Err(Error::SharedBuffer(i)) if i == id.0));
    assert!(matches!(a.unregister_buffer(id), Err(Error::SharedBuffer(_))));
    shared.write_at(0, &[0x5a; 4096]).unwrap();
    a.prep(Io::write(ns, 0, 4096, id, 0).user_data(1)).unwrap();
    // A request of this ring uses it: not released yet.
    assert!(matches!(a.release_shared(id), Err(Error::InFlight { .. })));
    a.submit().unwrap();
    let mut out = Vec::new();
    a.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
    assert!(out[0].status.is_success());
    a.release_shared(id).unwrap();
    assert!(matches!(a.release_shared(id), Err(Error::UnknownBuffer(_))));
    // Another ring of the session reads it back through the same shared buffer.
    b.read(ns, 0, shared.id(), 4096, 4096).unwrap();
    let mut back = [0u8; 4096];
    shared.read_at(4096, &mut back).unwrap();
    assert_eq!(back, [0x5a; 4096]);
    // A request on it before the ring uses it counts too.
    a.prep(Io::read(ns, 0, 4096, shared.id(), 8192).user_data(2)).unwrap();
    let again = a.use_shared(&shared).unwrap();
    assert!(matches!(a.release_shared(again), Err(Error::InFlight { .. })));
    a.submit().unwrap();
    out.clear();
    a.wait(1, &mut out, Some(Duration::from_secs(5))).unwrap();
    a.release_shared(again).unwrap();
    // The ring's clone kept it alive: dropped by all, it is unregistered.
    let kept = b.use_shared(&shared).unwrap();
    drop(shared);
    assert_eq!(b.session().stats().unwrap().buffers, 1, "still registered while ring b uses it");
    b.release_shared(kept).unwrap();
    wait_until("the shared buffer to be unregistered", Duration::from_secs(5), || {
        b.session().stats().unwrap().buffers == 0
    });
}

#[test]
fn dropping_the_last_handle_with_io_in_flight_returns_once_the_device_is_done() {
    // A caller's memory (guest RAM, say) may be reused once the ring is dropped: the drop
    // must not return while the device may still write into it, also when the ring is the
    // session's last handle.
    let broker = TestBroker::start(&["--emulator-mode", "async", "--emulator-latency-us", "1000000"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.prep(Io::read(ns, 0, 4096, buf, 0).user_data(1)).unwrap();
    let submitted = Instant::now();
    ring.submit().unwrap();
    drop(ring);
    assert!(
        submitted.elapsed() >= Duration::from_millis(900),
        "the drop returned {:?} after the submit, before the 1 s read could finish",
        submitted.elapsed()
    );
}
