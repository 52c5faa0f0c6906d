//! Vectored (scatter-gather) requests end to end, against a real `nvmed` process: random
//! segment layouts written and read back (PRPs for page-aligned layouts, SGLs for odd ones on
//! the emulated controller, bounce buffers when SGLs are turned off), requests split above
//! MDTS, hostile segment lists, and buffers kept busy while a vectored request uses them.

mod common;

use std::time::Duration;

use common::*;
use nvmed_client::testkit::{
    vectored_round_trip, SegmentLayout as Kind, VectoredBuffers, VECTORED_DEPTH as DEPTH,
};
use nvmed_client::{BrokerStatus, BufferId, Error, IoSegment, NvmeRing, Segment, Sqe, Status};
use nvmed_proto::Request;

const MIB: u64 = 1 << 20;

/// A session with buffers for requests up to `max_len` bytes.
fn setup(broker: &TestBroker, max_len: u64) -> (NvmeRing, VectoredBuffers) {
    let mut ring = broker.connect_with(64, 128);
    let bufs = VectoredBuffers::new(&mut ring, max_len).unwrap();
    (ring, bufs)
}

#[test]
fn page_aligned_segments_use_prps_and_never_bounce() {
    let broker = TestBroker::start(&[]);
    let (mut ring, bufs) = setup(&broker, MIB);
    vectored_round_trip(&mut ring, &bufs, 0, &[Kind::PageAligned], 0x51, 6);
    let s = ring.stats().unwrap();
    assert_eq!((s.bounced_bytes, s.broker_bounced_bytes), (0, 0), "{s:?}");
    assert_eq!(s.broker_sgl_commands, 0, "PRPs fit every layout: {s:?}");
    assert!(s.broker_vectored_prp_commands >= 6 * DEPTH as u64 * 2, "{s:?}");
    assert_eq!(s.errors, 0);
}

#[test]
fn odd_segments_use_sgls_and_never_bounce() {
    let broker = TestBroker::start(&[]);
    let (mut ring, bufs) = setup(&broker, 192 * 1024);
    vectored_round_trip(&mut ring, &bufs, 0, &[Kind::Odd512], 0x52, 6);
    let s = ring.stats().unwrap();
    assert_eq!((s.bounced_bytes, s.broker_bounced_bytes), (0, 0), "{s:?}");
    assert!(s.broker_sgl_commands >= DEPTH as u64, "{s:?}");
}

#[test]
fn segments_not_dword_aligned_are_bounced_even_where_sgls_take_bytes() {
    // The emulated controller reports byte-granular SGLs; odd-byte data blocks are still never
    // sent to a device (firmware rarely meets them: Linux sends none), they are bounced.
    let broker = TestBroker::start(&[]);
    let (mut ring, bufs) = setup(&broker, 192 * 1024);
    vectored_round_trip(&mut ring, &bufs, 0, &[Kind::Bytes], 0x55, 4);
    let s = ring.stats().unwrap();
    assert!(s.bounced_bytes > 0 && s.bounced_bytes == s.broker_bounced_bytes, "{s:?}");
    assert_eq!(s.broker_sgl_commands, 0, "{s:?}");
}

#[test]
fn without_sgl_support_odd_segments_are_bounced() {
    let broker = TestBroker::start(&["--emulator-no-sgl"]);
    let (mut ring, bufs) = setup(&broker, 512 * 1024);
    // Layouts PRPs can describe still go straight to client memory.
    vectored_round_trip(&mut ring, &bufs, 0, &[Kind::PageAligned], 0x53, 2);
    let s = ring.stats().unwrap();
    assert_eq!((s.bounced_bytes, s.broker_sgl_commands), (0, 0), "{s:?}");
    vectored_round_trip(&mut ring, &bufs, 0, &[Kind::Odd512, Kind::Bytes], 0x54, 6);
    let s = ring.stats().unwrap();
    assert!(s.bounced_bytes > 0 && s.bounced_bytes == s.broker_bounced_bytes, "{s:?}");
    assert_eq!(s.broker_sgl_commands, 0, "{s:?}");
}

#[test]
fn vectored_requests_above_mdts_are_split() {
    // 16 KiB device commands: pieces cut segments in the middle.
    for args in [&["--mdts", "2"][..], &["--mdts", "2", "--emulator-no-sgl"]] {
        let broker = TestBroker::start(args);
        let (mut ring, bufs) = setup(&broker, MIB);
        vectored_round_trip(&mut ring, &bufs, 0, &[Kind::PageAligned, Kind::Odd512], 0x55, 6);
        let s = ring.stats().unwrap();
        assert_eq!(s.errors, 0, "{args:?}: {s:?}");
        assert_eq!(s.broker_bounced_bytes > 0, args.len() == 3, "{args:?}: {s:?}");
        // Segments of odd bytes are bounced either way (never sent as SGL data blocks).
        let before = s.broker_bounced_bytes;
        vectored_round_trip(&mut ring, &bufs, 0, &[Kind::Bytes], 0x56, 4);
        let s = ring.stats().unwrap();
        assert_eq!(s.errors, 0, "{args:?}: {s:?}");
        assert!(s.broker_bounced_bytes > before, "{args:?}: {s:?}");
    }
}

/// Bounced reads on a device that completes later and out of order, with few bounce slots
/// per request (and a small queue): data is copied out only after each piece completes.
#[test]
fn bounced_requests_on_an_asynchronous_device() {
    let broker = TestBroker::start(&[
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "50",
        "--emulator-no-sgl",
        "--mdts",
        "7",
        "--queue-depth",
        "8",
    ]);
    let (mut ring, bufs) = setup(&broker, MIB);
    vectored_round_trip(&mut ring, &bufs, 0, &[Kind::Bytes, Kind::Odd512, Kind::PageAligned], 0x56, 6);
    let s = ring.stats().unwrap();
    assert!(s.bounced_bytes > 4 * MIB, "more than the bounce pool went through it: {s:?}");
}

fn raw_status(ring: &mut NvmeRing, sqe: Sqe) -> Status {
    // SAFETY: the entries used here either fail validation or read into buffers the test does
    // not look at until they complete.
    unsafe { ring.prep_raw(sqe) }.unwrap();
    ring.submit().unwrap();
    let mut out = Vec::new();
    ring.wait(1, &mut out, Some(Duration::from_secs(10))).unwrap();
    out[0].status
}

/// Writes raw segments at `offset` of the list buffer.
fn put_list(ring: &mut NvmeRing, list: BufferId, offset: u64, segs: &[Segment]) {
    let bytes = ring.buffer_mut(list, offset, segs.len() as u64 * 24).unwrap();
    for (i, s) in segs.iter().enumerate() {
        bytes[i * 24..i * 24 + 24].copy_from_slice(zerocopy::IntoBytes::as_bytes(s));
    }
}

#[test]
fn hostile_segment_lists_get_clear_statuses() {
    let mut broker = TestBroker::start(&[]);
    // Another client with more buffers than this one: its ids mean nothing here.
    let mut other = broker.connect();
    let theirs: Vec<BufferId> = (0..3).map(|_| other.alloc_buffer(8192).unwrap()).collect();
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let list = ring.alloc_buffer(8192).unwrap();
    let data = ring.alloc_buffer(65536).unwrap();
    let (l, d) = (list.0, data.0);
    let good = [Segment::new(d, 3, 509), Segment::new(d, 4096, 3)];
    put_list(&mut ring, list, 0, &good);
    use BrokerStatus::*;
    let readv = |off: u64, count: u16, len: u32| Sqe::readv(ns, 0, len, l, off, count, 1);
    let cases: Vec<(&str, Vec<Segment>, Sqe, BrokerStatus)> = vec![
        ("unknown list buffer", vec![], Sqe { buf_id: 77, ..readv(0, 2, 512) }, BadBuffer),
        ("no segments", vec![], readv(0, 0, 512), BadSegmentCount),
        ("too many segments", vec![], readv(0, 257, 512), BadSegmentCount),
        ("list past its buffer", vec![], readv(8192 - 24, 2, 512), SegmentListRange),
        ("list offset overflows", vec![], readv(u64::MAX - 7, 2, 512), SegmentListRange),
        ("misaligned list", vec![], readv(4, 2, 512), SegmentListRange),
        ("total mismatch", good.to_vec(), readv(0, 2, 1024), SegmentLength),
        ("unknown segment buffer", vec![good[0], Segment::new(99, 0, 3)], readv(0, 2, 512), BadBuffer),
        (
            "another client's buffer",
            vec![good[0], Segment::new(theirs[2].0, 0, 3)],
            readv(0, 2, 512),
            BadBuffer,
        ),
        ("segment past its buffer", vec![good[0], Segment::new(d, 65534, 3)], readv(0, 2, 512), BufferRange),
        (
            "segment offset overflows",
            vec![good[0], Segment::new(d, u64::MAX - 1, 3)],
            readv(0, 2, 512),
            BufferRange,
        ),
        ("empty segment", vec![Segment::new(d, 0, 0), good[0], good[1]], readv(0, 3, 512), SegmentLength),
        (
            "reserved field",
            vec![good[0], Segment { reserved1: 1, ..good[1] }],
            readv(0, 2, 512),
            InvalidField,
        ),
        (
            "segment count on a plain read",
            vec![],
            Sqe { segments: 2, ..Sqe::read(ns, 0, 512, d, 0, 1) },
            InvalidField,
        ),
        ("total too large", vec![], readv(0, 2, 64 << 20), TooLarge),
    ];
    for (what, segs, sqe, want) in cases {
        if !segs.is_empty() {
            put_list(&mut ring, list, 0, &segs);
        }
        assert_eq!(raw_status(&mut ring, sqe), Status::Broker(want), "{what}");
        assert!(Status::Broker(want).to_string().len() > 10);
    }
    // The library refuses what it can check before anything reaches the broker.
    put_list(&mut ring, list, 0, &good);
    let bad = nvmed_client::Io::readv(ns, 0, 1024, list, 0, 2);
    assert!(matches!(ring.prep(bad), Err(Error::BadSegments(_))));
    let far = [IoSegment::new(data, 65536, 1)];
    assert!(matches!(ring.write_segments(list, 0, &far), Err(Error::OutOfBuffer { .. })));
    // Nothing is left in flight: the buffers can go, and a good list still works.
    let s = ring.stats().unwrap();
    assert_eq!((s.in_flight, s.errors), (0, 15), "{s:?}");
    put_list(&mut ring, list, 0, &good);
    assert_eq!(raw_status(&mut ring, readv(0, 2, 512)), Status::Success);
    ring.unregister_buffer(data).unwrap();
    ring.unregister_buffer(list).unwrap();
    assert!(broker.alive());
    // The other client is unaffected.
    let buf = theirs[0];
    pattern(9, other.buffer_mut(buf, 0, 4096).unwrap());
    other.write(ns, MIB, buf, 0, 4096).unwrap();
    other.read(ns, MIB, buf, 4096, 4096).unwrap();
    assert_eq!(other.buffer(buf, 0, 4096).unwrap(), other.buffer(buf, 4096, 4096).unwrap());
}

#[test]
fn buffers_of_a_vectored_request_stay_busy_until_it_completes() {
    // The first I/O command never completes.
    let broker = TestBroker::start(&["--inject", "hang:1"]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let list = ring.alloc_buffer(4096).unwrap();
    let a = ring.alloc_buffer(8192).unwrap();
    let b = ring.alloc_buffer(8192).unwrap();
    let spare = ring.alloc_buffer(4096).unwrap();
    let segs = [IoSegment::new(a, 100, 300), IoSegment::new(b, 5000, 212)];
    ring.prep_readv(ns, 0, &segs, list, 0, 1).unwrap();
    ring.submit().unwrap();
    // The library refuses the segments' ranges, the list's range, and every buffer involved...
    assert!(matches!(ring.buffer(a, 0, 200), Err(Error::InFlight { .. })));
    assert!(matches!(ring.buffer(b, 5100, 1), Err(Error::InFlight { .. })));
    assert!(ring.buffer(b, 0, 4096).is_ok(), "outside the segments");
    assert!(matches!(ring.write_segments(list, 0, &segs), Err(Error::InFlight { .. })));
    for buf in [a, b, list] {
        assert!(matches!(ring.unregister_buffer(buf), Err(Error::InFlight { .. })), "{buf:?}");
    }
    // ...and the broker, asked directly, answers for each segment's buffer only once the
    // request is done with it (here: never, while the device holds it).
    wait_until("the request to reach the device", Duration::from_secs(5), || {
        ring.stats().unwrap().in_flight == 1
    });
    // (One buffer: the session's control connection stays busy with that request.)
    let session = ring.session();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(session.control(&Request::UnregisterBuffer { buffer_id: b.0 }, &[]));
    });
    assert!(rx.recv_timeout(Duration::from_millis(300)).is_err(), "{b:?} was released while in use");
    let _ = spare;
    // The session's connection is busy until the device gives the command up: stop the broker
    // first, so dropping the ring does not wait for that.
    drop(broker);
}

#[test]
fn a_segment_list_over_the_requests_own_data_is_refused() {
    let broker = TestBroker::start(&[]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8192).unwrap();
    ring.buffer_mut(buf, 0, 8192).unwrap().fill(0x77);
    // The list (2 x 24 bytes at 0) would overwrite the first bytes of the data at 32.
    let segs = [IoSegment::new(buf, 32, 512), IoSegment::new(buf, 4096, 512)];
    match ring.prep_writev(ns, 0, &segs, buf, 0, 1) {
        Err(Error::BadSegments(why)) => assert!(why.contains("overlaps segment 32+512"), "{why}"),
        other => panic!("expected BadSegments, got {other:?}"),
    }
    assert!(ring.buffer(buf, 0, 64).unwrap().iter().all(|&b| b == 0x77), "the data was changed");
    // Right beside it (the list ends at 48): fine.
    let segs = [IoSegment::new(buf, 48, 512), IoSegment::new(buf, 4096, 512)];
    ring.writev(ns, 0, &segs, buf, 0).unwrap();
}

/// Queues `n` bounced vectored writes (odd 512-byte segments, 256 KiB each, on a broker without
/// SGLs) on `ring` and submits them without waiting.
fn queue_bounced_writes(ring: &mut NvmeRing, n: u64) -> BufferId {
    let ns = ring.namespaces()[0].nsid;
    let data = ring.alloc_buffer((n * 320 * 1024) as usize).unwrap();
    let lists = ring.alloc_buffer((n * 256 * 24) as usize).unwrap();
    for i in 0..n {
        let base = i * 320 * 1024;
        let segs: Vec<IoSegment> =
            (0..64).map(|k| IoSegment::new(data, base + k * 5120 + 512, 4096)).collect();
        ring.prep_writev(ns, i * 256 * 1024, &segs, lists, i * 256 * 24, i).unwrap();
    }
    ring.submit().unwrap();
    data
}

/// A client that goes away with bounced pieces at the device and more waiting for bounce
/// slots: its session is released once they complete, and every bounce and segment list slot
/// comes back (a leak would stall the next client's bounced requests).
#[test]
fn a_client_leaving_with_bounced_requests_in_flight_leaks_no_slots() {
    let broker = TestBroker::start(&[
        "--emulator-no-sgl",
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "5000",
        "--mdts",
        "4", // 64 KiB pieces: 64 bounce slots, 4 pieces per request
    ]);
    for round in 0..3 {
        let mut leaver = broker.connect_with(64, 128);
        // 192 pieces for 64 bounce slots: 3 waves of 5 ms.
        queue_bounced_writes(&mut leaver, 48);
        // Taken by the broker (a look that comes after all of them completed, on a loaded
        // machine, would wait for ever for requests at the device).
        wait_until("the requests to reach the broker", Duration::from_secs(10), || {
            leaver.stats().unwrap().submitted > 0
        });
        drop(leaver);
        let mut next = broker.connect_with(64, 128);
        let bufs = VectoredBuffers::new(&mut next, 256 * 1024).unwrap();
        vectored_round_trip(&mut next, &bufs, 32 * MIB, &[Kind::Odd512, Kind::Bytes], 0x60 + round, 2);
        wait_until("the leaver's session to be released", Duration::from_secs(10), || {
            next.stats().unwrap().broker_sessions == 1
        });
        let s = next.stats().unwrap();
        assert_eq!(s.broker_buffer_iova_bytes, s.buffer_bytes, "the leaver's buffers stayed mapped: {s:?}");
    }
}

/// A controller reset with bounced pieces at the device: they are sent again from their bounce
/// slots and succeed (or, with a single try, fail with `DeviceReset`); either way their bounce
/// slots come back, and bounced I/O works afterwards.
#[test]
fn a_reset_with_bounced_requests_in_flight_frees_their_slots() {
    for tries in ["6", "1"] {
        let broker = TestBroker::start(&[
            "--emulator-no-sgl",
            "--emulator-mode",
            "async",
            "--emulator-latency-us",
            "200",
            "--mdts",
            "4",
            "--inject",
            "stuck:30",
            "--io-timeout-ms",
            "300",
            "--io-tries",
            tries,
        ]);
        let mut ring = broker.connect_with(64, 128);
        queue_bounced_writes(&mut ring, 48);
        let mut out = Vec::new();
        while out.len() < 48 {
            ring.wait(48 - out.len(), &mut out, Some(Duration::from_secs(20))).unwrap();
        }
        // Each request exactly once (`queue_bounced_writes` tags them 0..48).
        let mut tags: Vec<u64> = out.iter().map(|c| c.user_data).collect();
        tags.sort_unstable();
        assert_eq!(tags, (0..48).collect::<Vec<u64>>(), "a request completed twice or not at all");
        let reset = out.iter().filter(|c| c.status == Status::Broker(BrokerStatus::DeviceReset)).count();
        if tries == "1" {
            assert!(reset >= 1, "the hung piece's request was not failed by the reset: {out:?}");
        } else {
            assert_eq!(reset, 0, "requests were failed although they had tries left: {out:?}");
        }
        assert!(out
            .iter()
            .all(|c| c.status.is_success() || c.status == Status::Broker(BrokerStatus::DeviceReset)));
        assert_eq!(ring.stats().unwrap().broker_resets, 1);
        let bufs = VectoredBuffers::new(&mut ring, 256 * 1024).unwrap();
        vectored_round_trip(
            &mut ring,
            &bufs,
            32 * MIB,
            &[Kind::Odd512, Kind::Bytes, Kind::PageAligned],
            0x70,
            3,
        );
        assert_eq!(ring.stats().unwrap().in_flight, 0);
    }
}

/// A tenant whose vectored requests hold its share of the segment-list slots, at a slow device,
/// leaves the I/O thread asleep until one of them completes (it used to poll for the whole
/// wait: the idle check looked at the free slots, not at the tenant's share of them).
#[test]
fn a_tenant_at_its_segment_list_share_does_not_keep_the_thread_awake() {
    // Each session its own tenant: two busy tenants have half the 256 slots each.
    let broker = TestBroker::start(&[
        "--emulator-mode",
        "async",
        "--emulator-latency-us",
        "2000000",
        "--grant",
        "0:1:weight=1,per=session",
    ]);
    let mut other = broker.connect();
    let ns = other.namespaces()[0].nsid;
    let theirs = other.alloc_buffer(4096).unwrap();
    other.prep(nvmed_client::Io::read(ns, 0, 4096, theirs, 0)).unwrap();
    let n = 160u64;
    let mut ring = broker.connect_with(256, 512);
    let data = ring.alloc_buffer((n * 4096) as usize).unwrap();
    let list = ring.alloc_buffer((n * 24) as usize).unwrap();
    for i in 0..n {
        let seg = [IoSegment::new(data, i * 4096, 4096)];
        ring.prep_readv(ns, i * 4096, &seg, list, i * 24, i).unwrap();
    }
    // Both at once: the other tenant stays busy (its read at the device) for the whole check.
    other.submit().unwrap();
    ring.submit().unwrap();
    wait_until("the tenant's share of vectored reads at the device", Duration::from_secs(5), || {
        ring.stats().unwrap().in_flight >= 100
    });
    let held = ring.stats().unwrap().in_flight;
    assert!(held < n, "{held} in flight: the tenant took more than its share of segment-list slots");
    let percent = cpu_percent_over(&broker, Duration::from_millis(800));
    assert!(
        percent < 30.0,
        "the broker used {percent:.0}% of a CPU while every request waited on the device"
    );
    // Then the rest go as the first complete, and all succeed.
    let mut out = Vec::new();
    while out.len() < n as usize {
        ring.wait(1, &mut out, Some(Duration::from_secs(20))).unwrap();
    }
    assert!(out.iter().all(|c| c.status == Status::Success), "{out:?}");
}
