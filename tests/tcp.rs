//! nvmed-tcp end to end: the target runs in-process against a real `nvmed --emulate`, and the
//! crate's small initiator connects over loopback: handshake, Connect and access checks,
//! properties, Identify, features, verified I/O (in-capsule and R2T writes, several queues,
//! several commands in flight) with digests off and on, bad input that must end only the
//! connection that sent it, with the right C2HTermReq, and nvmed restarts under I/O in flight.

mod common;

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, TestBroker};
use nvmed_tcp::ctrl::{admin_op, prop, sc, DISCOVERY_NQN};
use nvmed_tcp::initiator::{command, ConnectOptions, Done, InitError, Initiator};
use nvmed_tcp::pdu::{self, fes, Digests, Header, NvmeCmd};
use nvmed_tcp::{Config, HostAccess, Target};
use zerocopy::little_endian::U32;
use zerocopy::IntoBytes;

const SUBNQN: &str = "nqn.2026-01.io.nvmed:test";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000001";
const RO_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000002";
/// Allowed in, but only to namespace 2 (which this nvmed does not have).
const NS2_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-000000000003";
const LBA: u64 = 512;

struct Fixture {
    broker: TestBroker,
    rt: tokio::runtime::Runtime,
    addr: SocketAddr,
    target: Arc<Target>,
}

fn fixture(tune: impl FnOnce(&mut Config)) -> Fixture {
    fixture_on(TestBroker::start(&[]), tune)
}

fn fixture_on(broker: TestBroker, tune: impl FnOnce(&mut Config)) -> Fixture {
    let mut cfg = Config::new(SUBNQN, &broker.socket);
    cfg.hosts = vec![
        HostAccess { nqn: HOST.into(), namespaces: None, read_only: false },
        HostAccess { nqn: RO_HOST.into(), namespaces: None, read_only: true },
        HostAccess { nqn: NS2_HOST.into(), namespaces: Some(vec![2]), read_only: false },
    ];
    cfg.io_timeout = Duration::from_secs(5);
    tune(&mut cfg);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    let target = Target::new(cfg);
    rt.spawn(nvmed_tcp::serve(target.clone(), listener));
    Fixture { broker, rt, addr, target }
}

fn opts(qid: u16, cntlid: u16, dg: Digests) -> ConnectOptions {
    ConnectOptions {
        subnqn: SUBNQN.into(),
        hostnqn: HOST.into(),
        qid,
        cntlid,
        sqsize: if qid == 0 { 31 } else { 63 },
        kato_ms: 5000,
        digests: dg,
        in_capsule: 8192,
        hostid: [0x11; 16],
    }
}

fn ok(d: Done) -> Done {
    assert_eq!(d.status(), 0, "command failed: {d:?}");
    d
}

/// Admin queue up to an enabled controller with `queues` I/O queues granted.
fn admin(f: &Fixture, dg: Digests, hostnqn: &str, queues: u16) -> Initiator {
    admin_kato(f, dg, hostnqn, queues, 5000)
}

fn admin_kato(f: &Fixture, dg: Digests, hostnqn: &str, queues: u16, kato_ms: u32) -> Initiator {
    let mut o = opts(0, 0xffff, dg);
    o.hostnqn = hostnqn.into();
    o.kato_ms = kato_ms;
    let mut a = Initiator::connect(f.addr, &o).expect("admin connect");
    let cap = a.property_get(prop::CAP, true).unwrap();
    assert_eq!(cap & 0xffff, 127, "MQES");
    assert_eq!(a.property_get(prop::VS, false).unwrap(), 0x10300);
    a.property_set(prop::CC, 1 | (6 << 16) | (4 << 20)).unwrap();
    assert_eq!(a.property_get(prop::CSTS, false).unwrap() & 1, 1, "RDY");
    let n = u32::from(queues - 1);
    let d =
        ok(a.run(command(admin_op::SET_FEATURES, 0, [0x07, n | (n << 16), 0, 0, 0, 0]), None, 0).unwrap());
    assert_eq!(d.cqe.result.get(), u64::from(n | (n << 16)));
    a
}

fn io_queue(
    f: &Fixture,
    a: &Initiator,
    qid: u16,
    dg: Digests,
    hostnqn: &str,
) -> Result<Initiator, InitError> {
    let mut o = opts(qid, a.cntlid, dg);
    o.hostnqn = hostnqn.into();
    Initiator::connect(f.addr, &o)
}

fn rw(write: bool, nsid: u32, lba: u64, len: usize) -> NvmeCmd {
    let nlb = (len as u64 / LBA - 1) as u32;
    command(if write { 0x01 } else { 0x02 }, nsid, [lba as u32, (lba >> 32) as u32, nlb, 0, 0, 0])
}

fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    pattern(seed, &mut v);
    v
}

fn identify(a: &mut Initiator, cns: u32, nsid: u32) -> Vec<u8> {
    ok(a.run(command(admin_op::IDENTIFY, nsid, [cns, 0, 0, 0, 0, 0]), None, 4096).unwrap()).data
}

fn session(f: &Fixture, dg: Digests) {
    let mut a = admin(f, dg, HOST, 2);
    let id = identify(&mut a, 1, 0);
    assert_eq!(u16::from_le_bytes([id[78], id[79]]), a.cntlid, "Identify cntlid matches Connect");
    assert_eq!(&id[768..768 + SUBNQN.len()], SUBNQN.as_bytes());
    assert_eq!(u32::from_le_bytes(id[1792..1796].try_into().unwrap()), (64 + 8192) / 16);
    let list = identify(&mut a, 2, 0);
    let nsid = u32::from_le_bytes(list[..4].try_into().unwrap());
    assert_eq!(nsid, 1);
    assert_eq!(&list[4..8], &[0; 4], "one namespace");
    let ns = identify(&mut a, 0, nsid);
    assert_eq!(u64::from_le_bytes(ns[..8].try_into().unwrap()), (64 << 20) / LBA, "size from nvmed");
    let desc = identify(&mut a, 3, nsid);
    assert_eq!(&desc[4..20], &ns[104..120], "NGUID");
    // Unsupported CNS: Invalid Field.
    let d = a.run(command(admin_op::IDENTIFY, 0, [0x10, 0, 0, 0, 0, 0]), None, 4096).unwrap();
    assert_eq!(d.status(), sc::INVALID_FIELD | sc::DNR);
    let smart = ok(a
        .run(command(admin_op::GET_LOG_PAGE, 0xffff_ffff, [0x02 | (127 << 16), 0, 0, 0, 0, 0]), None, 512)
        .unwrap());
    assert_eq!(smart.data.len(), 512);
    ok(a.run(command(admin_op::KEEP_ALIVE, 0, [0; 6]), None, 0).unwrap());

    let mut q1 = io_queue(f, &a, 1, dg, HOST).expect("I/O queue 1");
    let mut q2 = io_queue(f, &a, 2, dg, HOST).expect("I/O queue 2");
    // Queue 3 was not granted; queue 1 is taken.
    assert!(
        matches!(io_queue(f, &a, 3, dg, HOST), Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_PARAM | sc::DNR)
    );
    assert!(
        matches!(io_queue(f, &a, 1, dg, HOST), Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_PARAM | sc::DNR)
    );

    // One command at a time, sizes from one block (in-capsule) to MDTS (R2T).
    let mut lba = 0u64;
    for (i, len) in [512usize, 4096, 8192, 12288, 65536, 131072].into_iter().enumerate() {
        let w = data(i as u64 + 100, len);
        ok(q1.run(rw(true, nsid, lba, len), Some(w.clone()), 0).unwrap());
        let r = ok(q2.run(rw(false, nsid, lba, len), None, len).unwrap());
        assert!(r.data == w, "read back {len} bytes at LBA {lba}");
        lba += len as u64 / LBA;
    }
    // 32 writes in flight on each queue, then 32 reads, verified.
    for (q, base) in [(&mut q1, 4096u64), (&mut q2, 8192)] {
        let mut cids = Vec::new();
        for k in 0..32u64 {
            let len = 4096 * (1 + (k as usize % 8));
            cids.push(q.submit(rw(true, nsid, base + k * 64, len), Some(data(base + k, len)), 0).unwrap());
        }
        for _ in 0..32 {
            let (cid, d) = q.complete().unwrap();
            assert!(cids.contains(&cid));
            ok(d);
        }
        let mut want = std::collections::HashMap::new();
        for k in 0..32u64 {
            let len = 4096 * (1 + (k as usize % 8));
            want.insert(
                q.submit(rw(false, nsid, base + k * 64, len), None, len).unwrap(),
                data(base + k, len),
            );
        }
        for _ in 0..32 {
            let (cid, d) = q.complete().unwrap();
            assert!(ok(d).data == want[&cid], "queued read {cid}");
        }
    }
    // Write Zeroes, Dataset Management (deallocate), Flush.
    ok(q1.run(rw(true, nsid, 100, 8192), Some(data(7, 8192)), 0).unwrap());
    ok(q1.run(command(0x08, nsid, [100, 0, 15, 0, 0, 0]), None, 0).unwrap());
    assert_eq!(ok(q1.run(rw(false, nsid, 100, 8192), None, 8192).unwrap()).data, vec![0; 8192]);
    let mut ranges = vec![0u8; 32];
    ranges[4..8].copy_from_slice(&8u32.to_le_bytes());
    ranges[8..16].copy_from_slice(&200u64.to_le_bytes());
    ranges[20..24].copy_from_slice(&16u32.to_le_bytes());
    ranges[24..32].copy_from_slice(&300u64.to_le_bytes());
    ok(q1.run(command(0x09, nsid, [1, 1 << 2, 0, 0, 0, 0]), Some(ranges), 0).unwrap());
    ok(q2.run(command(0x00, nsid, [0; 6]), None, 0).unwrap());
    // Errors: out of range, above MDTS, unknown namespace, unknown opcode.
    let end = (64 << 20) / LBA;
    assert_eq!(q1.run(rw(false, nsid, end - 1, 1024), None, 1024).unwrap().status(), sc::LBA_RANGE | sc::DNR);
    assert_eq!(
        q1.run(rw(false, nsid, 0, 256 << 10), None, 256 << 10).unwrap().status(),
        sc::INVALID_FIELD | sc::DNR
    );
    assert_eq!(q1.run(rw(false, 9, 0, 512), None, 512).unwrap().status(), sc::INVALID_NS | sc::DNR);
    assert_eq!(q1.run(command(0x7e, nsid, [0; 6]), None, 0).unwrap().status(), sc::INVALID_OPCODE | sc::DNR);
    // The queues still work after refused commands.
    ok(q1.run(rw(false, nsid, 0, 512), None, 512).unwrap());
    // Normal shutdown.
    a.property_set(prop::CC, 1 | (6 << 16) | (4 << 20) | (1 << 14)).unwrap();
    assert_eq!((a.property_get(prop::CSTS, false).unwrap() >> 2) & 3, 2, "shutdown complete");
}

#[test]
fn verified_io_digests_off_and_on() {
    let f = fixture(|_| {});
    for dg in
        [Digests::default(), Digests { header: true, data: true }, Digests { header: true, data: false }]
    {
        session(&f, dg);
    }
    // Connect data and every write sent after an R2T (no in-capsule data at all).
    let mut o = opts(0, 0xffff, Digests { header: true, data: true });
    o.in_capsule = 0;
    let mut a = Initiator::connect(f.addr, &o).expect("Connect with its data after an R2T");
    a.property_set(prop::CC, 1 | (6 << 16) | (4 << 20)).unwrap();
    ok(a.run(command(admin_op::SET_FEATURES, 0, [0x07, 0, 0, 0, 0, 0]), None, 0).unwrap());
    let mut o = opts(1, a.cntlid, Digests { header: true, data: true });
    o.in_capsule = 0;
    let mut q = Initiator::connect(f.addr, &o).unwrap();
    let w = data(77, 512);
    ok(q.run(rw(true, 1, 5000, 512), Some(w.clone()), 0).unwrap());
    assert_eq!(ok(q.run(rw(false, 1, 5000, 512), None, 512).unwrap()).data, w);
    drop((a, q));
    // The same with the I/O queues polling their rings before they sleep.
    let f = fixture(|c| c.poll = Duration::from_micros(50));
    session(&f, Digests { header: false, data: true });
}

#[test]
fn access_by_host_nqn() {
    let f = fixture(|c| c.namespaces = Some(vec![1]));
    let mut o = opts(0, 0xffff, Digests::default());
    o.hostnqn = "nqn.2014-08.org.example:intruder".into();
    assert!(
        matches!(Initiator::connect(f.addr, &o), Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_HOST | sc::DNR)
    );
    let mut o = opts(0, 0xffff, Digests::default());
    o.subnqn = "nqn.2026-01.io.nvmed:other".into();
    assert!(
        matches!(Initiator::connect(f.addr, &o), Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_PARAM | sc::DNR)
    );
    // A read-only host reads but may not write, and sees the namespace write protected.
    let mut a = admin(&f, Digests::default(), RO_HOST, 1);
    assert_eq!(identify(&mut a, 0, 1)[99], 1);
    // An I/O queue of another host's controller is refused.
    let refused = io_queue(&f, &a, 1, Digests::default(), HOST).map(|_| ());
    assert!(
        matches!(refused, Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_PARAM | sc::DNR),
        "{refused:?}"
    );
    let mut q = io_queue(&f, &a, 1, Digests::default(), RO_HOST).unwrap();
    ok(q.run(rw(false, 1, 0, 4096), None, 4096).unwrap());
    let d = q.run(rw(true, 1, 0, 4096), Some(vec![1; 4096]), 0).unwrap();
    assert_eq!(d.status(), sc::NS_WRITE_PROTECTED | sc::DNR);
    let d = q.run(rw(true, 1, 0, 65536), Some(vec![1; 65536]), 0).unwrap();
    assert_eq!(d.status(), sc::NS_WRITE_PROTECTED | sc::DNR, "refused before any R2T");
    ok(q.run(rw(false, 1, 0, 4096), None, 4096).unwrap());
    // A host whose namespace list does not include nvmed's namespace 1 does not see it.
    let mut a = admin(&f, Digests::default(), NS2_HOST, 1);
    assert_eq!(&identify(&mut a, 2, 0)[..4], &[0; 4], "no active namespace");
    let mut q = io_queue(&f, &a, 1, Digests::default(), NS2_HOST).unwrap();
    assert_eq!(q.run(rw(false, 1, 0, 4096), None, 4096).unwrap().status(), sc::INVALID_NS | sc::DNR);
}

/// Shrinks a socket's receive buffer (4 KiB), so that what the host does not read fills it soon.
fn small_receive_buffer(s: &std::net::TcpStream) {
    let small: libc::c_int = 4096;
    // SAFETY: setsockopt reads `small` (an int of the size given) and touches nothing else.
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(s),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&small as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(r, 0);
}

/// Asserts that the peer closes `s` within `within` without sending anything more (a read that
/// times out means the connection is still open: a failure, not a close).
fn assert_closed(mut s: &std::net::TcpStream, within: Duration, what: &str) {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 1];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Ok(_) => panic!("{what}: data arrived instead of the close"),
        Err(e) => panic!("{what}: still open after {within:?} ({e})"),
    }
}

/// Expects a C2HTermReq with `want` and then the end of the connection.
fn expect_term(q: &mut Initiator, want: u16) {
    match q.next_pdu() {
        Err(InitError::Terminated { fes, .. }) => assert_eq!(fes, want),
        other => panic!("expected C2HTermReq {want}, got {other:?}"),
    }
    assert_closed(q.stream(), Duration::from_secs(3), "connection after a C2HTermReq");
}

#[test]
fn bad_input_ends_only_that_connection() {
    let f = fixture(|_| {});
    let dg = Digests { header: true, data: true };
    let a = admin(&f, dg, HOST, 5);
    let mut good = io_queue(&f, &a, 1, dg, HOST).unwrap();
    let w = data(1, 65536);
    ok(good.run(rw(true, 1, 0, 65536), Some(w.clone()), 0).unwrap());

    // A header with a wrong HLEN.
    let mut q = io_queue(&f, &a, 2, dg, HOST).unwrap();
    let mut bad = Vec::new();
    pdu::push_capsule_cmd(&mut bad, dg, rw(false, 1, 0, 512), 0);
    bad[2] = 70;
    q.send_raw(&bad).unwrap();
    expect_term(&mut q, fes::INVALID_HEADER);

    // A header digest that does not match.
    let mut q = io_queue(&f, &a, 2, dg, HOST).unwrap();
    let mut bad = Vec::new();
    pdu::push_capsule_cmd(&mut bad, dg, rw(false, 1, 0, 512), 0);
    bad[20] ^= 0xff;
    q.send_raw(&bad).unwrap();
    expect_term(&mut q, fes::HEADER_DIGEST);

    // H2CData no R2T asked for.
    let mut q = io_queue(&f, &a, 2, dg, HOST).unwrap();
    let mut bad = Vec::new();
    pdu::push_data_header(&mut bad, dg, 0, false, 5, 3, 0, 16, true);
    bad.extend_from_slice(&[0; 16]);
    bad.extend_from_slice(&pdu::crc(&[0; 16]).to_le_bytes());
    q.send_raw(&bad).unwrap();
    expect_term(&mut q, fes::INVALID_HEADER);

    // Data beyond the command's length: a 4 KiB write answered by R2T, then 8 KiB of H2CData.
    let mut q = io_queue(&f, &a, 2, dg, HOST).unwrap();
    let mut cmd = rw(true, 1, 0, 4096);
    cmd.cid = 9.into();
    cmd.sgl_type = pdu::sgl::TRANSPORT;
    cmd.sgl_len = U32::new(4096);
    let mut out = Vec::new();
    pdu::push_capsule_cmd(&mut out, dg, cmd, 0);
    q.send_raw(&out).unwrap();
    let (h, _) = q.next_pdu().unwrap();
    let Header::R2t(r) = h else { panic!("expected R2T, got {h:?}") };
    let mut bad = Vec::new();
    pdu::push_data_header(&mut bad, dg, 0, false, 9, r.ttag.get(), 0, 8192, true);
    bad.extend_from_slice(&[0; 8192]);
    bad.extend_from_slice(&pdu::crc(&[0; 8192]).to_le_bytes());
    q.send_raw(&bad).unwrap();
    expect_term(&mut q, fes::DATA_OUT_OF_RANGE);

    // A data digest that does not match fails the command, not the connection.
    let mut q = io_queue(&f, &a, 2, dg, HOST).unwrap();
    let mut cmd = rw(true, 1, 1000, 512);
    cmd.sgl_type = pdu::sgl::IN_CAPSULE;
    cmd.sgl_len = U32::new(512);
    let mut out = Vec::new();
    pdu::push_capsule_cmd(&mut out, dg, cmd, 512);
    out.extend_from_slice(&[0xaa; 512]);
    out.extend_from_slice(&0xdead_beefu32.to_le_bytes());
    q.send_raw(&out).unwrap();
    let (h, _) = q.next_pdu().unwrap();
    let Header::CapsuleResp(r) = h else { panic!("{h:?}") };
    assert_eq!(r.cqe.status.get() >> 1, sc::TRANSIENT_TRANSPORT);
    ok(q.run(rw(false, 1, 0, 512), None, 512).unwrap());
    drop(q);

    // An unknown PDU type, and garbage.
    // (Queue 2 may still be closing on the target's side: use 3 and 4.)
    for (qid, junk) in [(3, &[0x0au8, 0, 24, 0, 24, 0, 0, 0][..]), (4, &[0xff; 64][..])] {
        let mut q = io_queue(&f, &a, qid, dg, HOST).unwrap();
        q.send_raw(junk).unwrap();
        expect_term(&mut q, fes::INVALID_HEADER);
    }

    // The host ends a connection itself with an H2CTermReq: it is closed, nothing sent back.
    let mut q = io_queue(&f, &a, 5, dg, HOST).unwrap();
    let mut term = Vec::new();
    pdu::push_term_req(&mut term, false, fes::SEQUENCE, 0, &[0; 24]);
    q.send_raw(&term).unwrap();
    assert_closed(q.stream(), Duration::from_secs(3), "connection after the host's H2CTermReq");

    // The good queue never noticed.
    assert!(ok(good.run(rw(false, 1, 0, 65536), None, 65536).unwrap()).data == w);
}

#[test]
fn keep_alive_timeout_and_connection_cap() {
    let f = fixture(|c| c.max_connections = 3);
    let mut o = opts(0, 0xffff, Digests::default());
    o.kato_ms = 300;
    let mut a = Initiator::connect(f.addr, &o).unwrap();
    a.property_set(prop::CC, 1 | (6 << 16) | (4 << 20)).unwrap();
    ok(a.run(command(admin_op::SET_FEATURES, 0, [0x07, 0, 0, 0, 0, 0]), None, 0).unwrap());
    let q = io_queue(&f, &a, 1, Digests::default(), HOST).unwrap();
    // Keep alives keep it; silence beyond KATO (and the slack) removes it with its queue.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(200));
        ok(a.run(command(admin_op::KEEP_ALIVE, 0, [0; 6]), None, 0).unwrap());
    }
    assert_eq!(f.target.controllers(), 1);
    let start = Instant::now();
    assert_closed(a.stream(), Duration::from_secs(4), "admin connection silent beyond KATO");
    assert!(start.elapsed() < Duration::from_secs(4));
    assert_closed(q.stream(), Duration::from_secs(2), "its I/O queue");
    common::wait_until("controller removed", Duration::from_secs(5), || f.target.controllers() == 0);

    // Three connections at most. With every slot taken, a new connection pushes out the oldest
    // one that has not sent its Connect (peers that connect and say nothing cannot lock hosts
    // out); an established one is never pushed out.
    common::wait_until("connections closed", Duration::from_secs(5), || f.target.connections() == 0);
    let mut a = Initiator::connect(f.addr, &opts(0, 0xffff, Digests::default())).unwrap();
    let held: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(f.addr).unwrap()).collect();
    common::wait_until("3 connections", Duration::from_secs(5), || f.target.connections() == 3);
    let mut b = Initiator::connect(f.addr, &opts(0, 0xffff, Digests::default())).unwrap();
    assert!(b.property_get(prop::CAP, true).is_ok());
    // (Well within the 5 s handshake timeout, which would close it anyway.)
    assert_closed(&held[0], Duration::from_secs(2), "the oldest connection without a Connect");
    let mut c = Initiator::connect(f.addr, &opts(0, 0xffff, Digests::default())).unwrap();
    assert_closed(&held[1], Duration::from_secs(2), "the next connection without a Connect");
    assert!(a.property_get(prop::CAP, true).is_ok(), "an established connection was pushed out");
    // Every connection established: the fourth is closed at once, and a slot frees on close.
    let extra = std::net::TcpStream::connect(f.addr).unwrap();
    assert_closed(&extra, Duration::from_secs(2), "a fourth connection");
    assert!(f.target.connections() <= 3, "{} connections", f.target.connections());
    assert!(c.property_get(prop::CAP, true).is_ok());
    drop((a, b, c, held));
    common::wait_until("slots free", Duration::from_secs(10), || f.target.connections() == 0);
    let mut a = Initiator::connect(f.addr, &opts(0, 0xffff, Digests::default())).unwrap();
    assert!(a.property_get(prop::CAP, true).is_ok());
    drop(f.rt);
}

#[test]
fn one_address_cannot_take_every_connection_and_a_silent_one_is_dropped() {
    let f = fixture(|c| {
        c.max_connections_per_host = 2;
        c.io_timeout = Duration::from_secs(5);
    });
    // Two silent connections from 127.0.0.1: a third from that address is closed at once.
    let held: Vec<_> = (0..2).map(|_| std::net::TcpStream::connect(f.addr).unwrap()).collect();
    common::wait_until("2 connections", Duration::from_secs(5), || f.target.connections() == 2);
    let extra = std::net::TcpStream::connect(f.addr).unwrap();
    // (Well within the 5 s handshake timeout, which would close it anyway.)
    let start = Instant::now();
    assert_closed(&extra, Duration::from_secs(5), "a third connection from one address");
    assert!(start.elapsed() < Duration::from_millis(2500), "closed only after {:?}", start.elapsed());
    // Another address is still served.
    let other = f.rt.block_on(async {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        s.connect(f.addr).await.unwrap().into_std().unwrap()
    });
    other.set_nonblocking(false).unwrap();
    common::wait_until("a connection from 127.0.0.2", Duration::from_secs(5), || f.target.connections() == 3);
    // Connections that never send ICReq are closed after the handshake timeout.
    let start = Instant::now();
    for s in held {
        assert_closed(&s, Duration::from_secs(15), "a connection that never sent ICReq");
    }
    assert!(start.elapsed() < Duration::from_secs(12), "{:?}", start.elapsed());
    drop(other);
    common::wait_until("all closed", Duration::from_secs(10), || f.target.connections() == 0);
    // The address's slots are free again.
    let mut a = Initiator::connect(f.addr, &opts(0, 0xffff, Digests::default())).unwrap();
    assert!(a.property_get(prop::CAP, true).is_ok());
}

#[test]
fn fabrics_commands_on_an_io_queue_count_against_its_depth() {
    let f = fixture(|c| c.io_timeout = Duration::from_secs(60));
    let a = admin_kato(&f, Digests::default(), HOST, 1, 0);
    let mut q = io_queue(&f, &a, 1, Digests::default(), HOST).unwrap();
    // Property Gets (answered with an error on an I/O queue), sent without reading a single
    // answer: once the socket buffers are full, at most the queue's depth of answers may wait;
    // the next command is more than the queue holds and ends the connection. Before, the
    // answers piled up in memory until the 60 s stall timeout.
    small_receive_buffer(q.stream());
    q.stream().set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut flood = Vec::new();
    for i in 0..20_000u32 {
        let mut c = command(admin_op::FABRICS, u32::from(nvmed_tcp::ctrl::fctype::PROPERTY_GET), [0; 6]);
        c.cid = zerocopy::little_endian::U16::new((i % 60_000) as u16);
        pdu::push_capsule_cmd(&mut flood, Digests::default(), c, 0);
    }
    let before = f.target.connections();
    let start = Instant::now();
    // The write fails or stalls once the target has closed the connection.
    let _ = q.send_raw(&flood);
    common::wait_until("the flooding connection closed", Duration::from_secs(20), || {
        f.target.connections() < before
    });
    assert!(start.elapsed() < Duration::from_secs(30), "closed by the depth, not the stall timeout");
    assert_eq!(f.target.controllers(), 1, "the controller stays");
}

#[test]
fn host_that_stops_reading_is_disconnected() {
    let f = fixture(|c| c.io_timeout = Duration::from_secs(2));
    // No keep alive timeout: only the stall may end the connection.
    let a = admin_kato(&f, Digests::default(), HOST, 2, 0);
    let mut q = io_queue(&f, &a, 1, Digests::default(), HOST).unwrap();
    let mut other = io_queue(&f, &a, 2, Digests::default(), HOST).unwrap();
    small_receive_buffer(q.stream());
    // 64 reads of 128 KiB (8 MiB) that are never read: more than the socket buffers hold.
    for k in 0..64u64 {
        q.submit(rw(false, 1, k * 256, 128 << 10), None, 128 << 10).unwrap();
    }
    let before = f.target.connections();
    common::wait_until("the stalled connection closed", Duration::from_secs(15), || {
        f.target.connections() < before
    });
    // The other queue of the same controller is untouched.
    ok(other.run(rw(false, 1, 0, 4096), None, 4096).unwrap());
    assert_eq!(f.target.controllers(), 1);
}

#[test]
fn large_writes_get_r2ts_of_at_most_maxh2cdata() {
    // MDTS 1 MiB, MAXH2CDATA 128 KiB: a 1 MiB write is asked for in R2Ts of 128 KiB, one
    // after the other (a host that answers an R2T with one H2CData PDU stays within
    // MAXH2CDATA), with digests off and on.
    let f = fixture_on(TestBroker::start(&[]), |c| c.max_transfer = 1 << 20);
    for dg in [Digests::default(), Digests { header: true, data: true }] {
        let a = admin(&f, dg, HOST, 1);
        let mut q = io_queue(&f, &a, 1, dg, HOST).unwrap();
        for (lba, len) in [(0u64, 1usize << 20), (4096, (1 << 20) - 4096), (8192, (128 << 10) + 512)] {
            let w = data(lba + 9, len);
            ok(q.run(rw(true, 1, lba, len), Some(w.clone()), 0).unwrap());
            assert!(
                ok(q.run(rw(false, 1, lba, len), None, len).unwrap()).data == w,
                "{len} bytes at LBA {lba}"
            );
        }
        assert_eq!(q.longest_r2t, 128 << 10);
    }
}

#[test]
fn a_disconnect_is_answered_after_the_queues_other_commands() {
    // A read at the device for 300 ms, then Disconnect: the read's data and answer come
    // first, then the Disconnect's, then the connection closes.
    let f = fixture_on(
        TestBroker::start(&["--emulator-mode", "async", "--emulator-latency-us", "300000"]),
        |_| {},
    );
    let a = admin(&f, Digests::default(), HOST, 1);
    let mut q = io_queue(&f, &a, 1, Digests::default(), HOST).unwrap();
    let read = q.submit(rw(false, 1, 0, 4096), None, 4096).unwrap();
    let mut disconnect = command(admin_op::FABRICS, 0, [0; 6]);
    disconnect.as_mut_bytes()[4] = nvmed_tcp::ctrl::fctype::DISCONNECT;
    let bye = q.submit(disconnect, None, 0).unwrap();
    let (first, d) = q.complete().unwrap();
    assert_eq!(first, read, "the Disconnect was answered before the read");
    assert_eq!(ok(d).data.len(), 4096);
    let (second, d) = q.complete().unwrap();
    assert_eq!(second, bye);
    ok(d);
    assert_closed(q.stream(), Duration::from_secs(3), "the queue after its Disconnect");
}

#[test]
fn write_zeroes_is_not_bound_by_mdts() {
    // Linux 5.4 to 5.12 send Write Zeroes of one block more than MDTS (128 KiB here). With a
    // device that has Write Zeroes, and with one that has not (nvmed refuses the command; the
    // target writes zeroes instead, in MDTS pieces).
    for (args, lba) in [(&[][..], 512u64), (&["--lba-size", "4096", "--emulator-no-write-zeroes"][..], 4096)]
    {
        let f = fixture_on(TestBroker::start(args), |_| {});
        let a = admin(&f, Digests::default(), HOST, 1);
        let mut q = io_queue(&f, &a, 1, Digests::default(), HOST).unwrap();
        let blocks = (128 << 10) / lba + 1;
        let io = |write: bool, at: u64, n: u64| {
            command(if write { 0x01 } else { 0x02 }, 1, [at as u32, 0, n as u32 - 1, 0, 0, 0])
        };
        for (at, n) in [(0, blocks - 1), (blocks - 1, 1)] {
            let len = (n * lba) as usize;
            ok(q.run(io(true, at, n), Some(data(at + 1, len)), 0).unwrap());
        }
        ok(q.run(command(0x08, 1, [0, 0, blocks as u32 - 1, 0, 0, 0]), None, 0).unwrap());
        for (at, n) in [(0, blocks - 1), (blocks - 1, 1)] {
            let len = (n * lba) as usize;
            let d = ok(q.run(io(false, at, n), None, len).unwrap());
            assert!(d.data.iter().all(|&b| b == 0), "LBA size {lba}: blocks {at}.. not zeroed");
        }
    }
}

#[test]
fn many_connections_each_with_its_own_ring() {
    let f = fixture(|_| {});
    let mut conns = Vec::new();
    for c in 0..4u64 {
        let a = admin_kato(&f, Digests::default(), HOST, 16, 0);
        for qid in 1..=16u16 {
            let mut q = io_queue(&f, &a, qid, Digests::default(), HOST).expect("I/O queue");
            let lba = (c * 16 + u64::from(qid)) * 64;
            let w = data(lba, 4096);
            ok(q.run(rw(true, 1, lba, 4096), Some(w.clone()), 0).unwrap());
            conns.push((q, lba, w));
        }
        conns.push((a, 0, Vec::new()));
    }
    assert_eq!(f.target.controllers(), 4);
    assert_eq!(f.target.connections(), 68);
    for (q, lba, w) in conns.iter_mut().filter(|(_, _, w)| !w.is_empty()) {
        assert!(ok(q.run(rw(false, 1, *lba, 4096), None, 4096).unwrap()).data == *w);
    }
    drop(conns);
    common::wait_until("all closed", Duration::from_secs(20), || {
        f.target.connections() == 0 && f.target.controllers() == 0
    });
}

/// A broker on a backing file (data outlives the process) with a device slow enough that
/// commands are at it when the broker is killed.
fn persistent_broker(latency_us: &str) -> TestBroker {
    let dir = common::scratch_dir();
    let file = dir.join("disk.img").to_str().unwrap().to_string();
    TestBroker::start_in(
        dir,
        &[
            "--backing",
            &file,
            "--emulator-mode",
            "async",
            "--emulator-latency-us",
            latency_us,
            "--metrics-listen",
            "127.0.0.1:0",
        ],
    )
}

/// Requests `broker` (a [`persistent_broker`]) took off its clients' rings so far
/// (`nvmed_requests_submitted_total`).
fn submitted(broker: &TestBroker) -> u64 {
    let url = broker.ready.split("metrics on ").nth(1).expect("a metrics address").to_string();
    let text = ureq::get(&url).call().unwrap().body_mut().read_to_string().unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("nvmed_requests_submitted_total "))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .expect("nvmed_requests_submitted_total")
}

/// Waits until `broker` has taken `n` more requests than `base` (they then sit at its device
/// for its latency, 200-500 ms), so that a kill lands while they are there.
fn wait_at_device(broker: &TestBroker, base: u64, n: u64) {
    common::wait_until(&format!("{n} requests at nvmed's device"), Duration::from_secs(10), || {
        submitted(broker) >= base + n
    });
}

/// Submits `cmds` (write data, or a read of that length) on `q` at once and completes them all.
fn queue_depth(q: &mut Initiator, cmds: Vec<(NvmeCmd, Option<Vec<u8>>, usize)>) -> Vec<(u16, Done)> {
    let n = cmds.len();
    let mut cids = Vec::new();
    for (c, w, r) in cmds {
        cids.push(q.submit(c, w, r).unwrap());
    }
    let mut done: Vec<(u16, Done)> = (0..n).map(|_| q.complete().unwrap()).collect();
    done.sort_by_key(|(cid, _)| cids.iter().position(|c| c == cid).expect("a command of ours"));
    done
}

/// Eight writes per queue, then eight reads, with nvmed killed (SIGKILL) and started again on
/// the same socket: the reads and the in-capsule writes (4 and 8 KiB) are at the device when it
/// dies, the larger writes wait for their R2T (this initiator sends their data when it
/// completes). Every command completes successfully, the data reads back, and the admin queue
/// kept answering meanwhile.
#[test]
fn io_rides_through_an_nvmed_restart() {
    // The target on one current-thread runtime, as nvmed-tcp runs by default: a queue waiting
    // for nvmed must not hold up the others or the admin queue.
    let broker = persistent_broker("500000");
    let mut f = fixture_on(broker, |_| {});
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let target = Target::new(f.target.cfg.clone());
    let served = target.clone();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::select! {
                _ = nvmed_tcp::serve(served, listener) => {}
                _ = stopped => {}
            }
        });
    });
    f.addr = addr;
    let mut a = admin(&f, Digests::default(), HOST, 2);
    let mut qs = [
        io_queue(&f, &a, 1, Digests::default(), HOST).unwrap(),
        io_queue(&f, &a, 2, Digests::default(), HOST).unwrap(),
    ];
    // Block ranges per queue and command: 8 commands of 4 to 32 KiB.
    let place = |q: usize, k: usize| ((q * 8 + k) as u64 * 64, 4096 * (1 + k % 8));
    let round = |f: &mut Fixture, a: &mut Initiator, qs: &mut [Initiator; 2], write: bool, seed: u64| {
        // Submit on both queues, kill nvmed while the commands are at the device (500 ms each).
        let mut cids = [Vec::new(), Vec::new()];
        let base = submitted(&f.broker);
        for (qi, q) in qs.iter_mut().enumerate() {
            for k in 0..8 {
                let (lba, len) = place(qi, k);
                let cmd = rw(write, 1, lba, len);
                let cid = if write {
                    q.submit(cmd, Some(data(seed + lba, len)), 0)
                } else {
                    q.submit(cmd, None, len)
                };
                cids[qi].push(cid.unwrap());
            }
        }
        // Reads: all 16; writes: those whose data came in the capsule (up to 8 KiB: k = 0, 1).
        wait_at_device(&f.broker, base, if write { 4 } else { 16 });
        f.broker.kill9();
        let down = Instant::now();
        // The controller stays: keep alives and Identify are answered while nvmed is away.
        ok(a.run(command(admin_op::KEEP_ALIVE, 0, [0; 6]), None, 0).unwrap());
        assert_eq!(identify(a, 0, 1)[..8], ((64u64 << 20) / LBA).to_le_bytes());
        assert!(down.elapsed() < Duration::from_secs(2), "admin queue held up: {:?}", down.elapsed());
        std::thread::sleep(Duration::from_millis(300));
        f.broker.restart();
        for (qi, q) in qs.iter_mut().enumerate() {
            let mut got = Vec::new();
            for _ in 0..8 {
                let (cid, d) = q.complete().unwrap();
                let k = cids[qi].iter().position(|&c| c == cid).expect("a command of ours");
                assert_eq!(d.status(), 0, "queue {} command {k} failed across the restart", qi + 1);
                if !write {
                    let (lba, len) = place(qi, k);
                    assert!(d.data == data(seed + lba, len), "queue {} read {k} after the restart", qi + 1);
                }
                got.push(k);
            }
            got.sort_unstable();
            assert_eq!(got, (0..8).collect::<Vec<_>>(), "each command completes once");
        }
        eprintln!(
            "{} round: nvmed down to all done in {:?}",
            if write { "write" } else { "read" },
            down.elapsed()
        );
    };
    round(&mut f, &mut a, &mut qs, true, 1000);
    round(&mut f, &mut a, &mut qs, false, 1000);
    // Crossed over: each queue reads what the other wrote, and the queues still serve.
    for (qi, q) in qs.iter_mut().enumerate() {
        let other = 1 - qi;
        let cmds = (0..8)
            .map(|k| {
                let (lba, len) = place(other, k);
                (rw(false, 1, lba, len), None, len)
            })
            .collect();
        for (k, (_, d)) in queue_depth(q, cmds).into_iter().enumerate() {
            let (lba, len) = place(other, k);
            assert!(
                ok(d).data == data(1000 + lba, len),
                "queue {} reads queue {}'s block {k}",
                qi + 1,
                other + 1
            );
        }
    }
    assert_eq!(target.controllers(), 1);
    drop((qs, a));
    let _ = stop.send(());
    thread.join().unwrap();
}

/// nvmed killed and not started again: the commands that were at it fail with Namespace Not
/// Ready, Do Not Retry clear (the host retries them later or elsewhere), once the reconnect
/// budget is spent; the queue then closes, and the controller (admin queue) stays.
#[test]
fn nvmed_gone_for_good_fails_commands_retryably() {
    let broker = persistent_broker("200000");
    let mut f = fixture_on(broker, |c| {
        c.reconnect =
            nvmed_client::Reconnect { budget: Duration::from_secs(1), ..nvmed_client::Reconnect::default() };
    });
    let mut a = admin(&f, Digests::default(), HOST, 1);
    let mut q = io_queue(&f, &a, 1, Digests::default(), HOST).unwrap();
    ok(q.run(rw(true, 1, 0, 4096), Some(data(5, 4096)), 0).unwrap());
    let base = submitted(&f.broker);
    for k in 0..4u64 {
        q.submit(
            rw(k % 2 == 0, 1, k * 8, 4096),
            (k % 2 == 0).then(|| data(k, 4096)),
            if k % 2 == 0 { 0 } else { 4096 },
        )
        .unwrap();
    }
    wait_at_device(&f.broker, base, 4);
    f.broker.kill9();
    let down = Instant::now();
    for _ in 0..4 {
        let (_, d) = q.complete().unwrap();
        assert_eq!(d.status(), sc::NS_NOT_READY, "retryable status (DNR clear), got {:#x}", d.status());
    }
    let after = down.elapsed();
    assert!(after < Duration::from_secs(4), "failed after {after:?}, beyond the 1 s budget");
    eprintln!("commands failed {after:?} after nvmed went away");
    assert_closed(q.stream(), Duration::from_secs(3), "the queue whose nvmed went away");
    // The controller itself stays (a host may connect its queues again once nvmed is back).
    ok(a.run(command(admin_op::KEEP_ALIVE, 0, [0; 6]), None, 0).unwrap());
    assert_eq!(f.target.controllers(), 1);
}

#[test]
fn discovery_lists_the_subsystem_to_allowed_hosts_only() {
    let f = fixture(|_| {});
    let discover = |hostnqn: &str| -> (Vec<u8>, Initiator) {
        let mut o = opts(0, 0xffff, Digests::default());
        o.subnqn = DISCOVERY_NQN.into();
        o.hostnqn = hostnqn.into();
        o.kato_ms = 0;
        let mut a = Initiator::connect(f.addr, &o).expect("discovery connect");
        a.property_set(prop::CC, 1 | (6 << 16) | (4 << 20)).unwrap();
        assert_eq!(a.property_get(prop::CSTS, false).unwrap() & 1, 1, "RDY");
        let id = identify(&mut a, 1, 0);
        assert_eq!(id[111], 2, "CNTRLTYPE: discovery");
        assert!(id[768..].starts_with(DISCOVERY_NQN.as_bytes()));
        // The header, then the whole log (as nvme-cli reads it).
        let numd = |bytes: u32| (bytes / 4 - 1) << 16;
        let head = ok(a
            .run(command(admin_op::GET_LOG_PAGE, 0, [0x70 | numd(1024), 0, 0, 0, 0, 0]), None, 1024)
            .unwrap())
        .data;
        let records = u64::from_le_bytes(head[8..16].try_into().unwrap()) as u32;
        let all = ok(a
            .run(
                command(admin_op::GET_LOG_PAGE, 0, [0x70 | numd(1024 * (1 + records)), 0, 0, 0, 0, 0]),
                None,
                1024 * (1 + records as usize),
            )
            .unwrap())
        .data;
        (all, a)
    };
    let (log, mut a) = discover(HOST);
    assert_eq!(u64::from_le_bytes(log[8..16].try_into().unwrap()), 1, "one subsystem");
    let r = &log[1024..2048];
    let text = |b: &[u8]| String::from_utf8(b.iter().copied().take_while(|&c| c != 0).collect()).unwrap();
    assert_eq!((r[0], r[1], r[2]), (3, 1, 2), "TCP, IPv4, NVM subsystem");
    assert_eq!(text(&r[256..512]), SUBNQN);
    assert_eq!(text(&r[512..768]), f.addr.ip().to_string(), "the address the host came to");
    assert_eq!(text(&r[32..64]), f.addr.port().to_string());
    // No namespaces, no I/O queues on a discovery controller.
    let d = a.run(command(admin_op::IDENTIFY, 1, [0, 0, 0, 0, 0, 0]), None, 4096).unwrap();
    assert_eq!(d.status(), sc::INVALID_FIELD | sc::DNR);
    let mut o = opts(1, a.cntlid, Digests::default());
    o.subnqn = DISCOVERY_NQN.into();
    let invalid = |r: &Result<_, InitError>| matches!(r, Err(InitError::Status(s)) if *s == sc::CONNECT_INVALID_PARAM | sc::DNR);
    let c = Initiator::connect(f.addr, &o).map(|_| ());
    assert!(invalid(&c), "no I/O queue on the discovery NQN: {c:?}");
    let c = io_queue(&f, &a, 1, Digests::default(), HOST).map(|_| ());
    assert!(invalid(&c), "nor under the subsystem's NQN: {c:?}");
    // What the log lists works: connect to it.
    let addr: SocketAddr = format!("{}:{}", text(&r[512..768]), text(&r[32..64])).parse().unwrap();
    assert_eq!(addr, f.addr);
    let mut io = admin(&f, Digests::default(), HOST, 1);
    assert_eq!(identify(&mut io, 1, 0)[111], 1, "an I/O controller");
    // A host not allowed in learns nothing.
    let (log, stranger) = discover("nqn.2014-08.org.example:stranger");
    assert_eq!(u64::from_le_bytes(log[8..16].try_into().unwrap()), 0, "no records for a stranger");
    assert_eq!(log.len(), 1024);
    // Discovery controllers take a part of the connections only (an eighth, at least 4): hosts
    // holding them cannot leave none for the subsystem.
    let limit = nvmed_tcp::server::discovery_controllers_max(f.target.cfg.max_connections);
    let mut held = vec![a, stranger];
    while held.len() < limit {
        held.push(discover("nqn.2014-08.org.example:stranger").1);
    }
    let mut o = opts(0, 0xffff, Digests::default());
    o.subnqn = DISCOVERY_NQN.into();
    let busy = Initiator::connect(f.addr, &o).map(|_| ());
    assert!(matches!(busy, Err(InitError::Status(s)) if s == sc::CONNECT_CTRL_BUSY), "{busy:?}");
    // The subsystem still takes controllers.
    let mut more = admin(&f, Digests::default(), HOST, 1);
    assert_eq!(identify(&mut more, 1, 0)[111], 1);
    // One released, one more may come.
    held.pop();
    common::wait_until("a discovery controller to be released", Duration::from_secs(5), || {
        Initiator::connect(f.addr, &o).is_ok()
    });
}

/// What a host may hold: a port given for discovery serves nothing else, one host NQN holds
/// at most --max-controllers-per-host controllers, an I/O queue must come from the host
/// identifier of its controller's admin queue, and a discovery controller keeps a keep alive
/// timeout of at most two minutes whatever it asks.
#[test]
fn hosts_hold_only_what_they_may() {
    let f = fixture(|c| c.max_controllers_per_host = 2);
    // A discovery-only port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let disc_addr = listener.local_addr().unwrap();
    let target = f.target.clone();
    f.rt.spawn(async move {
        let l = tokio::net::TcpListener::from_std(listener).unwrap();
        let _ = nvmed_tcp::serve_discovery(target, l).await;
    });
    let refused = Initiator::connect(disc_addr, &opts(0, 0xffff, Digests::default()));
    assert!(
        matches!(refused, Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_PARAM | sc::DNR),
        "the I/O subsystem on the discovery port: {:?}",
        refused.err()
    );
    let mut o = opts(0, 0xffff, Digests::default());
    o.subnqn = DISCOVERY_NQN.into();
    o.kato_ms = 0;
    let d = Initiator::connect(disc_addr, &o).expect("discovery on its port");
    drop(d);

    // Two controllers for HOST, then Controller Busy; another host still gets one.
    let a1 = admin(&f, Digests::default(), HOST, 1);
    let a2 = admin(&f, Digests::default(), HOST, 1);
    let third = Initiator::connect(f.addr, &opts(0, 0xffff, Digests::default()));
    assert!(matches!(third, Err(InitError::Status(s)) if s == sc::CONNECT_CTRL_BUSY), "{:?}", third.err());
    let _other = admin(&f, Digests::default(), NS2_HOST, 1);

    // An I/O queue with another host identifier than its admin queue's.
    let mut o = opts(1, a1.cntlid, Digests::default());
    o.hostid = [0x22; 16];
    let wrong = Initiator::connect(f.addr, &o);
    assert!(
        matches!(wrong, Err(InitError::Status(s)) if s == sc::CONNECT_INVALID_PARAM | sc::DNR),
        "{:?}",
        wrong.err()
    );
    io_queue(&f, &a1, 1, Digests::default(), HOST).expect("the right host identifier");
    // A controller gone frees its place.
    drop(a2);
    common::wait_until("the controller to go", Duration::from_secs(10), || f.target.controllers() == 2);
    let _a3 = admin(&f, Digests::default(), HOST, 1);
    assert_eq!(nvmed_tcp::ctrl::discovery_kato(u32::MAX), nvmed_tcp::ctrl::DISCOVERY_KATO_MS);
    assert_eq!(nvmed_tcp::ctrl::discovery_kato(0), nvmed_tcp::ctrl::DISCOVERY_KATO_MS);
    assert_eq!(nvmed_tcp::ctrl::discovery_kato(5000), 5000);
}
