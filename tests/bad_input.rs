//! Bad input from clients: each gets a clear, typed error, and the broker keeps serving
//! everyone else.

mod common;

use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use nvmed_client::{BrokerStatus, Error, Io, NvmeRing, Sqe, Status};
use nvmed_proto::control::{decode, encode};
use nvmed_proto::layout::{CQ_HEAD_OFFSET, SQ_ENTRIES_OFFSET};
use nvmed_proto::transport;
use nvmed_proto::{ControlError, Request, Response, RingFault, PROTOCOL_VERSION};

/// The broker is alive and another client can still do verified I/O.
fn others_unaffected(broker: &mut TestBroker) {
    assert!(broker.alive(), "the broker died");
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8192).unwrap();
    pattern(5, ring.buffer_mut(buf, 0, 4096).unwrap());
    ring.write(ns, 1 << 20, buf, 0, 4096).unwrap();
    ring.read(ns, 1 << 20, buf, 4096, 4096).unwrap();
    assert_eq!(ring.buffer(buf, 0, 4096).unwrap(), ring.buffer(buf, 4096, 4096).unwrap());
}

fn raw_status(ring: &mut NvmeRing, sqe: Sqe) -> Status {
    // SAFETY: the entries used here either fail validation or target a buffer the test
    // does not look at while they are in flight.
    unsafe { ring.prep_raw(sqe) }.unwrap();
    ring.submit().unwrap();
    let mut out = Vec::new();
    ring.wait(1, &mut out, Some(Duration::from_secs(10))).unwrap();
    out[0].status
}

#[test]
fn bad_submissions_get_their_status() {
    let mut broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0];
    let buf = ring.alloc_buffer(65536).unwrap().0;
    let end = ns.size_bytes();
    let cases = [
        (Sqe::read(1, 0, 4096, 99, 0, 1), BrokerStatus::BadBuffer),
        (Sqe::read(1, 0, 4096, buf, 65536 - 2048, 2), BrokerStatus::BufferRange),
        (Sqe::read(1, 0, 4096, buf, u64::MAX - 99, 3), BrokerStatus::BufferRange),
        (Sqe::write(1, end - 512, 1024, buf, 0, 4), BrokerStatus::OutOfRange),
        (Sqe::write(1, u64::MAX - 511, 512, buf, 0, 5), BrokerStatus::OutOfRange),
        (Sqe::read(1, 0, 1000, buf, 0, 6), BrokerStatus::Misaligned),
        (Sqe::read(1, 100, 512, buf, 0, 7), BrokerStatus::Misaligned),
        (Sqe::read(1, 0, 512, buf, 3, 8), BrokerStatus::Misaligned),
        (Sqe::read(1, 0, 0, buf, 0, 9), BrokerStatus::ZeroLength),
        (Sqe::read(7, 0, 512, buf, 0, 10), BrokerStatus::InvalidNamespace),
        (Sqe { opcode: 200, ..Sqe::nop(11) }, BrokerStatus::InvalidOpcode),
        (Sqe { flags: 0x40, ..Sqe::nop(12) }, BrokerStatus::InvalidField),
        (Sqe::read(1, 0, ns.max_transfer + 512, buf, 0, 13), BrokerStatus::TooLarge),
    ];
    for (sqe, want) in cases {
        let got = raw_status(&mut ring, sqe);
        assert_eq!(got, Status::Broker(want), "{sqe:?}");
        assert!(!got.to_string().is_empty());
    }
    // The same ring still works.
    ring.write(1, 0, nvmed_client::BufferId(buf), 0, 4096).unwrap();
    let stats = ring.stats().unwrap();
    assert_eq!(stats.errors, 13);
    others_unaffected(&mut broker);
}

#[test]
fn unsealed_and_non_memfd_buffers_are_refused() {
    let mut broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    // A memfd without F_SEAL_SHRINK.
    let m = memfd::MemfdOptions::new().allow_sealing(true).create("unsealed").unwrap();
    m.as_file().set_len(8192).unwrap();
    let r = ring.control(&Request::RegisterBuffer { offset: 0, len: 8192, id: None }, &[m.as_file().as_fd()]);
    assert!(matches!(r, Err(Error::Refused(ControlError::NotSealed))), "{r:?}");
    assert!(r.unwrap_err().to_string().contains("F_SEAL_SHRINK"));
    // A regular file.
    let dir = scratch_dir();
    let mut f = std::fs::File::create(dir.join("f")).unwrap();
    f.write_all(&[0; 8192]).unwrap();
    let r = ring.control(&Request::RegisterBuffer { offset: 0, len: 8192, id: None }, &[f.as_fd()]);
    assert!(matches!(r, Err(Error::Refused(ControlError::NotMemfd))), "{r:?}");
    // A pipe.
    let (rd, _wr) = nix::unistd::pipe().unwrap();
    let r = ring.control(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }, &[rd.as_fd()]);
    assert!(matches!(r, Err(Error::Refused(ControlError::NotMemfd))), "{r:?}");
    // Sealed, but lengths that do not fit.
    let m = memfd::MemfdOptions::new().allow_sealing(true).create("small").unwrap();
    m.as_file().set_len(8192).unwrap();
    m.add_seals(&[memfd::FileSeal::SealShrink]).unwrap();
    for (offset, len) in [(4096, 8192), (100, 4096), (8192, 4096)] {
        let r = ring.control(&Request::RegisterBuffer { offset, len, id: None }, &[m.as_file().as_fd()]);
        assert!(
            matches!(r, Err(Error::Refused(ControlError::BadBufferLength { .. }))),
            "{offset}+{len}: {r:?}"
        );
    }
    for len in [0u64, 100, 16384] {
        let r = ring.control(&Request::RegisterBuffer { offset: 0, len, id: None }, &[m.as_file().as_fd()]);
        assert!(matches!(r, Err(Error::Refused(ControlError::BadBufferLength { .. }))), "{len}: {r:?}");
    }
    // No fd, or an fd where none belongs.
    let r = ring.control(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }, &[]);
    assert!(matches!(r, Err(Error::Refused(ControlError::MissingFd))), "{r:?}");
    let r = ring.control(&Request::Stats, &[m.as_file().as_fd()]);
    assert!(matches!(r, Err(Error::Refused(ControlError::UnexpectedFd))), "{r:?}");
    // Unknown buffer.
    let r = ring.control(&Request::UnregisterBuffer { buffer_id: 1234 }, &[]);
    assert!(matches!(r, Err(Error::Refused(ControlError::UnknownBuffer(1234)))), "{r:?}");
    // An I/O thread that does not exist.
    let r = ring.control(&Request::CreateRing { sq_entries: 8, cq_entries: 8, thread: Some(1) }, &[]);
    assert!(matches!(r, Err(Error::Refused(ControlError::NoSuchThread { thread: 1, threads: 1 }))), "{r:?}");
    // Closing a ring the session does not have.
    let r = ring.control(&Request::CloseRing { ring_id: 99 }, &[]);
    assert!(matches!(r, Err(Error::Refused(ControlError::UnknownRing(99)))), "{r:?}");
    // The session is still fine.
    ring.stats().unwrap();
    others_unaffected(&mut broker);
}

fn raw_connect(broker: &TestBroker) -> OwnedFd {
    use nix::sys::socket::*;
    let s = socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None).unwrap();
    connect(std::os::fd::AsRawFd::as_raw_fd(&s), &UnixAddr::new(&broker.socket).unwrap()).unwrap();
    s
}

fn raw_call(s: &OwnedFd, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> Response {
    transport::send(s.as_fd(), bytes, fds).unwrap();
    decode(&transport::recv(s.as_fd()).unwrap().bytes).unwrap()
}

#[test]
fn malformed_oversized_and_fd_flooding_messages() {
    let mut broker = TestBroker::start(&[]);
    let s = raw_connect(&broker);
    // Before Hello.
    assert_eq!(raw_call(&s, &encode(&Request::Stats), &[]), Response::Error(ControlError::HelloRequired));
    // Wrong version.
    let hello = |v| encode(&Request::Hello { version: v, client_name: "raw".into(), resumes: None });
    assert!(matches!(
        raw_call(&s, &hello(99), &[]),
        Response::Error(ControlError::VersionMismatch { client: 99, .. })
    ));
    assert!(matches!(raw_call(&s, &hello(PROTOCOL_VERSION), &[]), Response::Hello { .. }));
    assert_eq!(raw_call(&s, &hello(PROTOCOL_VERSION), &[]), Response::Error(ControlError::DuplicateHello));
    // Garbage.
    assert!(matches!(raw_call(&s, &[0xff; 17], &[]), Response::Error(ControlError::Malformed(_))));
    // Oversized.
    assert!(matches!(
        raw_call(&s, &vec![0u8; 64 * 1024], &[]),
        Response::Error(ControlError::MessageTooLarge { .. })
    ));
    // Too many fds in one message.
    let fds: Vec<OwnedFd> = (0..8).map(|_| nvmed_proto::eventfd::new_eventfd().unwrap()).collect();
    let borrowed: Vec<_> = fds.iter().map(|f| f.as_fd()).collect();
    let r = raw_call(&s, &encode(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }), &borrowed);
    assert!(matches!(r, Response::Error(ControlError::TooManyFds { .. })), "{r:?}");
    // The connection still works.
    assert!(matches!(raw_call(&s, &encode(&Request::Stats), &[]), Response::Stats(_)));
    // Bad ring sizes.
    let r =
        raw_call(&s, &encode(&Request::CreateRing { sq_entries: 3, cq_entries: 1 << 30, thread: None }), &[]);
    assert!(matches!(r, Response::Error(ControlError::BadRingSize(_))), "{r:?}");
    others_unaffected(&mut broker);
}

#[test]
fn hostile_ring_indices_fault_only_that_ring() {
    let mut broker = TestBroker::start(&[]);
    // Garbage SQ tags: a slot whose tag is not the one its index must carry is not published,
    // so the broker takes nothing (and the ring stays usable).
    let mut bad = broker.connect_with(16, 16);
    let seq_at = |slot: usize| SQ_ENTRIES_OFFSET + slot * 64 + nvmed_proto::SQE_SEQ_OFFSET;
    for slot in 0..16 {
        // Anything but `slot + 1` (the first lap's tag): zero, a later lap's, random-looking.
        let garbage = [0, slot as u32 + 17, 0xdead_beef, u32::MAX][slot % 4];
        bad.ring_memory().store_u32(seq_at(slot), garbage, Ordering::Release);
    }
    let before = bad.stats().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let after = bad.stats().unwrap();
    assert_eq!((after.submitted, after.errors), (before.submitted, before.errors), "took garbage as entries");
    let buf = bad.alloc_buffer(4096).unwrap();
    bad.read(1, 0, buf, 0, 4096).unwrap(); // slot 0, written and tagged by the library
                                           // That read rang the doorbell, so the broker looked at the slots after it too (the sleep
                                           // above may have found it asleep): it took that one entry and no garbage.
    let after = bad.stats().unwrap();
    assert_eq!(
        (after.submitted, after.errors),
        (before.submitted + 1, before.errors),
        "took garbage as entries"
    );
    // An entry published behind the library's back, with the right tag (slot 1, index 1): the
    // broker takes it, and validates its copy (opcode 0xff: refused, ring not faulted).
    let errors = bad.stats().unwrap().errors;
    let hostile = Sqe { opcode: 0xff, user_data: 777, ..Sqe::default() };
    bad.ring_memory().write(SQ_ENTRIES_OFFSET + 64, hostile);
    bad.ring_memory().store_u32(seq_at(1), Sqe::seq_for(1), Ordering::Release);
    wait_until("the hostile entry to be refused", Duration::from_secs(10), || {
        bad.stats().unwrap().errors == errors + 1
    });
    let flags = bad.ring_memory().load_u32(nvmed_proto::layout::BROKER_FLAGS_OFFSET, Ordering::Acquire);
    assert_eq!(flags & nvmed_proto::layout::BROKER_FAULTED, 0, "a bad entry faults nothing");
    // (Its completion carries a tag the library never issued: this ring is done.)
    drop(bad);
    others_unaffected(&mut broker);

    // Garbage CQ head. The broker reads the client's CQ head only when its cached view of the
    // CQ has no room left, so fill the CQ first, then corrupt the head, then ask for more.
    let mut bad = broker.connect_with(16, 16);
    for i in 0..16 {
        bad.prep(Io::nop().user_data(i)).unwrap();
    }
    bad.submit().unwrap();
    wait_until("16 completions posted", Duration::from_secs(10), || bad.ready_completions() == 16);
    bad.ring_memory().store_u32(CQ_HEAD_OFFSET, 0x8000_0000, Ordering::Release);
    bad.prep(Io::nop()).unwrap();
    bad.submit().unwrap();
    let flags =
        |r: &NvmeRing| r.ring_memory().load_u32(nvmed_proto::layout::BROKER_FLAGS_OFFSET, Ordering::Acquire);
    wait_until("the ring to be faulted", Duration::from_secs(10), || {
        flags(&bad) & nvmed_proto::layout::BROKER_FAULTED != 0
    });
    bad.prep(Io::nop()).unwrap();
    let r = bad.submit();
    assert!(matches!(r, Err(Error::RingFaulted(Some(RingFault::CqHeadCorrupt)))), "{r:?}");
    // The faulted session still answers control requests and can leave cleanly.
    bad.stats().unwrap();
    drop(bad);

    // A client that stops reaping: the broker never overruns its CQ.
    let mut slow = broker.connect_with(8, 8);
    for round in 0..3 {
        for i in 0..8 {
            let _ = slow.prep(Io::nop().user_data(round * 8 + i));
        }
        let _ = slow.submit();
        std::thread::sleep(Duration::from_millis(50));
    }
    // A ninth completion would have overwritten slot 0 with the next lap's phase.
    assert_eq!(slow.ready_completions(), 8, "the broker must post exactly as many completions as fit");
    let mut out = Vec::new();
    slow.wait(8, &mut out, Some(Duration::from_secs(5))).unwrap();
    others_unaffected(&mut broker);
}

#[test]
fn session_limit_is_a_clear_error() {
    let broker = TestBroker::start(&["--max-sessions", "2"]);
    let _a = broker.connect();
    let _b = broker.connect();
    match NvmeRing::open(&broker.socket) {
        Err(Error::Refused(ControlError::ResourceExhausted(msg))) => assert!(msg.contains("at most 2")),
        other => panic!("expected a session limit error, got {other:?}"),
    }
}

#[test]
fn vfio_setup_errors_say_what_to_do() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvmed"))
        .args(["--pci", "0000:ff:1f.7", "--socket", "/tmp/nvmed-never.sock"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no PCI device 0000:ff:1f.7") && err.contains("lspci"), "{err}");
    // Neither or both of --emulate / --pci is a usage error naming them.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nvmed")).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("--emulate|--pci"));
}

#[test]
fn random_garbage_from_one_client_never_hurts_another() {
    let mut broker = TestBroker::start(&[]);
    let socket = broker.socket.clone();
    // A well-behaved client verifies its data the whole time.
    let good = std::thread::spawn(move || {
        let mut ring = NvmeRing::open(&socket).unwrap();
        nvmed_client::testkit::random_write_read(&mut ring, (16 << 20, 8 << 20), 5, 8);
    });
    let mut rng = Rng(0xfeed);
    for round in 0..20u64 {
        let mut bad = broker.connect_with(16, 32);
        let buf = bad.alloc_buffer(1 << 20).unwrap();
        // Entries of random bytes, and entries that are almost right.
        for i in 0..12u64 {
            let mut bytes = [0u8; 64];
            for b in bytes.iter_mut() {
                *b = rng.below(256) as u8;
            }
            let mut sqe: Sqe = zerocopy::FromBytes::read_from_bytes(&bytes[..]).unwrap();
            if i % 2 == 0 {
                sqe = Sqe::read(
                    1,
                    rng.below(1 << 27) & !511,
                    (rng.below(64) as u32 + 1) * 512,
                    buf.0,
                    rng.below(2 << 20),
                    i,
                );
            }
            // SAFETY: this test never looks at the buffer's contents.
            let _ = unsafe { bad.prep_raw(sqe) };
        }
        let _ = bad.submit();
        // Scribble over the tags, the head and the flags now and then.
        match round % 4 {
            1 => bad.ring_memory().store_u32(
                SQ_ENTRIES_OFFSET + rng.below(16) as usize * 64 + nvmed_proto::SQE_SEQ_OFFSET,
                rng.below(u64::from(u32::MAX)) as u32,
                Ordering::Release,
            ),
            2 => bad.ring_memory().store_u32(
                CQ_HEAD_OFFSET,
                rng.below(u64::from(u32::MAX)) as u32,
                Ordering::Release,
            ),
            3 => bad.ring_memory().store_u32(
                nvmed_proto::layout::BROKER_FLAGS_OFFSET,
                u32::MAX,
                Ordering::Release,
            ),
            _ => {}
        }
        let mut out = Vec::new();
        let _ = bad.wait(1, &mut out, Some(Duration::from_millis(200)));
        // Random control datagrams too.
        let mut junk = vec![0u8; rng.below(200) as usize];
        for b in junk.iter_mut() {
            *b = rng.below(256) as u8;
        }
        let _ = transport::send(bad.control_socket(), &junk, &[]);
        let _ = transport::recv(bad.control_socket());
        drop(bad); // leaves with whatever it had in flight
    }
    good.join().expect("the well-behaved client saw wrong data or an error");
    let mut probe = broker.connect();
    let mut s = probe.stats().unwrap();
    wait_until("every hostile session to be released", Duration::from_secs(10), || {
        s = probe.stats().unwrap();
        s.broker_sessions == 1
    });
    assert_eq!(s.broker_buffer_iova_bytes, 0, "IOVA leaked by hostile sessions");
    others_unaffected(&mut broker);
}

#[test]
fn connection_and_pinned_memory_limits() {
    let broker = TestBroker::start(&[
        "--max-sessions",
        "1",
        "--max-connections-per-uid",
        "17",
        "--max-registered-total",
        "1M",
        // No limit of the uid's own (the broker-wide one is tested here).
        "--max-registered-bytes-per-uid",
        "1M",
    ]);
    // Idle connections that never say Hello cannot pile up: 1 session + 16 spare.
    let idle: Vec<OwnedFd> = (0..17).map(|_| raw_connect(&broker)).collect();
    std::thread::sleep(Duration::from_millis(100));
    match NvmeRing::open(&broker.socket) {
        Err(Error::Refused(ControlError::ResourceExhausted(m))) => {
            assert!(m.contains("at most 17 connections"), "{m}")
        }
        other => panic!("expected a connection limit error, got {other:?}"),
    }
    drop(idle);
    // Pinned memory is capped for all clients together.
    let mut ring = {
        let mut r = None;
        wait_until("a free connection slot", Duration::from_secs(5), || {
            r = NvmeRing::open(&broker.socket).ok();
            r.is_some()
        });
        r.unwrap()
    };
    ring.alloc_buffer(1 << 20).unwrap();
    match ring.alloc_buffer(4096) {
        Err(Error::Refused(ControlError::BufferLimit(m))) => assert!(m.contains("for all clients"), "{m}"),
        other => panic!("expected the broker-wide limit, got {other:?}"),
    }
}

#[test]
fn write_sealed_memfd_is_refused() {
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let m = memfd::MemfdOptions::new().allow_sealing(true).create("ro").unwrap();
    m.as_file().set_len(4096).unwrap();
    m.add_seals(&[memfd::FileSeal::SealShrink, memfd::FileSeal::SealWrite]).unwrap();
    let r = ring.control(&Request::RegisterBuffer { offset: 0, len: 4096, id: None }, &[m.as_file().as_fd()]);
    assert!(matches!(r, Err(Error::Refused(ControlError::NotWritable))), "{r:?}");
}

/// A client makes its completion doorbell blocking and tries to fill it (with an eventfd shared
/// with the broker, both would hold for the broker's end too, and its next wakeup write would
/// block the I/O thread that serves everyone). The broker's end is its own open file: it keeps
/// serving this client's completions and every other client.
#[test]
fn a_client_cannot_make_the_brokers_doorbell_writes_block() {
    use std::os::fd::AsRawFd;
    let mut broker = TestBroker::start(&[]);
    let mut hostile = broker.connect();
    let fd = hostile.completion_fd().as_raw_fd();
    // SAFETY: fcntl and write on a descriptor the ring owns and keeps open.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK), 0);
        // An eventfd's counter one short of full; a pipe's read end refuses the write.
        let full = 0xffff_ffff_ffff_fffeu64.to_ne_bytes();
        let _ = libc::write(fd, full.as_ptr().cast(), full.len());
    }
    // Ask for a wakeup at every completion and never take them: the broker signals the doorbell.
    let mut out = Vec::new();
    assert_eq!(hostile.arm_completion_fd(&mut out).unwrap(), 0);
    for i in 0..64 {
        hostile.prep(Io::nop().user_data(i)).unwrap();
        hostile.submit().unwrap();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let socket = broker.socket.clone();
    std::thread::spawn(move || {
        let mut ring = NvmeRing::open(&socket).unwrap();
        let ns = ring.namespaces()[0].nsid;
        let buf = ring.alloc_buffer(8192).unwrap();
        for _ in 0..100 {
            ring.write(ns, 1 << 20, buf, 0, 4096).unwrap();
            ring.read(ns, 1 << 20, buf, 4096, 4096).unwrap();
        }
        tx.send(()).unwrap();
    });
    rx.recv_timeout(Duration::from_secs(20)).expect("the broker stopped serving other clients");
    // And the hostile client's own requests completed.
    // SAFETY: as above.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
    }
    hostile.disarm_completion_fd();
    hostile.wait(64, &mut out, Some(Duration::from_secs(10))).unwrap();
    assert_eq!(out.len(), 64);
    others_unaffected(&mut broker);
}
