//! `nvmed-test-peer`: the client processes the end-to-end tests spawn (a client to SIGKILL
//! mid-I/O, clients running as another uid). Not for users; built so the tests can run it.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use nvmed_client::{Io, NvmeRing, NvmeSession, RingOptions};
use nvmed_proto::control::decode;
use nvmed_proto::{transport, Response};

const MIB: u64 = 1 << 20;

fn usage() -> ! {
    eprintln!(
        "usage: nvmed-test-peer hammer|hammer-rings SOCKET | hold connections|sessions N SOCKET | load SOCKET SECS QD | stats SOCKET | namespaces SOCKET"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["hammer", socket] => hammer(socket),
        ["hammer-rings", socket] => hammer_rings(socket),
        ["load", socket, secs, qd] => {
            load(socket, secs.parse().unwrap_or_else(|_| usage()), qd.parse().unwrap_or_else(|_| usage()))
        }
        ["hold", mode, n, socket] => hold(mode, n.parse().unwrap_or_else(|_| usage()), socket),
        ["stats", socket] => stats(socket),
        ["namespaces", socket] => namespaces(socket),
        _ => usage(),
    }
}

/// Writes 128 KiB blocks at QD64 into 48..56 MiB of namespace 1 until killed. Prints
/// `HAMMERING` once the broker reports some of them at the device (or, on a device that
/// completes at once, once 256 have completed: the ring is never empty from then on).
fn hammer(socket: &str) {
    let mut ring = NvmeRing::open(socket).unwrap();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(8 * MIB as usize).unwrap();
    ring.buffer_mut(buf, 0, 8 * MIB).unwrap().fill(0x5a);
    let mut out = Vec::new();
    let mut i = 0u64;
    let mut completed = 0usize;
    let mut announced = false;
    loop {
        while ring.in_flight() < 64 {
            let off = (i % 64) * 128 * 1024;
            ring.prep(Io::write(ns, 48 * MIB + off, 128 * 1024, buf, off)).unwrap();
            i += 1;
        }
        ring.submit().unwrap();
        if !announced && (completed >= 256 || ring.stats().unwrap().in_flight > 0) {
            println!("HAMMERING");
            announced = true;
        }
        out.clear();
        ring.wait(1, &mut out, None).unwrap();
        completed += out.len();
    }
}

/// 4 KiB reads at depth `qd` over the first 32 MiB of namespace 1 for `secs` seconds (after a
/// line `LOADING`); prints `IOS <completed>` at the end.
fn load(socket: &str, secs: f64, qd: usize) {
    let mut ring = NvmeRing::open(socket).unwrap();
    println!("LOADING");
    let done = nvmed_client::testkit::reads_for(&mut ring, qd as u64, secs);
    println!("IOS {done}");
}

/// One session, one 8 MiB shared buffer, two rings on I/O threads 0 and 1, each writing 64 KiB
/// blocks at QD32 into its own 4 MiB of 48..56 MiB of namespace 1 until killed.
fn hammer_rings(socket: &str) {
    let session = NvmeSession::open(socket).unwrap();
    let ns = session.namespaces()[0].nsid;
    let shared = session.alloc_shared(8 * MIB as usize).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for t in 0..2u16 {
        let mut ring =
            session.new_ring_with(RingOptions { thread: Some(t), ..RingOptions::default() }).unwrap();
        let (buf, tx) = (shared.id(), tx.clone());
        std::thread::spawn(move || {
            let base = u64::from(t) * 4 * MIB;
            let mut out = Vec::new();
            let mut i = 0u64;
            loop {
                while ring.in_flight() < 32 {
                    let off = base + (i % 64) * 64 * 1024;
                    ring.prep(Io::write(ns, 48 * MIB + off, 64 * 1024, buf, off)).unwrap();
                    i += 1;
                }
                ring.submit().unwrap();
                let _ = tx.send(());
                out.clear();
                ring.wait(1, &mut out, None).unwrap();
            }
        });
    }
    rx.recv().unwrap();
    rx.recv().unwrap();
    println!("HAMMERING");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Prints `NAMESPACES N` and then `NS nsid read_only` for each namespace this uid sees.
fn namespaces(socket: &str) {
    let ring = NvmeRing::open(socket).unwrap();
    println!("NAMESPACES {}", ring.namespaces().len());
    for n in ring.namespaces() {
        println!("NS {} {}", n.nsid, n.read_only);
    }
}

/// Writes and reads one 4 KiB block, then prints what the broker tells this client about
/// itself and about the broker: one line `STATS key=value ...`.
fn stats(socket: &str) {
    let session = NvmeSession::open(socket).unwrap();
    let mut ring = session.new_ring().unwrap();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(4096).unwrap();
    ring.write(ns, 0, buf, 0, 4096).unwrap();
    ring.read(ns, 0, buf, 0, 4096).unwrap();
    let s = session.stats().unwrap();
    let threads = session.io_threads().unwrap();
    let health = session.health().unwrap();
    let smart = health[0].smart.clone().unwrap();
    println!(
        "STATS completed={} bytes_read={} broker_wide={} broker_sessions={} device_dma_bytes={} \
         broker_buffer_iova_bytes={} thread_device_commands={} activity_hidden={} data_units_read={} \
         host_write_commands={} temperature_kelvin={}",
        s.completed,
        s.bytes_read,
        s.broker_wide,
        s.broker_sessions,
        s.device_dma_bytes.unwrap_or(0),
        s.broker_buffer_iova_bytes,
        threads.iter().map(|t| t.device_commands).sum::<u64>(),
        health[0].activity_hidden,
        smart.data_units_read,
        smart.host_write_commands,
        smart.temperature_kelvin,
    );
}

/// Takes up to `n` connections (never saying Hello) or sessions, prints `REFUSED <error>` for
/// the first refusal and `HELD <count>`, then holds them until killed.
fn hold(mode: &str, n: usize, socket: &str) {
    use nix::sys::socket::{connect, socket as new_socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let path = std::path::Path::new(socket);
    let mut conns = Vec::new();
    let mut rings = Vec::new();
    match mode {
        "connections" => {
            for _ in 0..n {
                let s = new_socket(AddressFamily::Unix, SockType::SeqPacket, SockFlag::SOCK_CLOEXEC, None)
                    .unwrap();
                connect(s.as_raw_fd(), &UnixAddr::new(path).unwrap()).unwrap();
                conns.push(s);
            }
            // A refused connection has the broker's explanation waiting; an accepted one is silent.
            // The broker takes connections in order: once the last one is answered (refused),
            // every earlier one has been dealt with. (If none is refused, this waits 10 s.)
            if let Some(last) = conns.last() {
                let mut p = [nix::poll::PollFd::new(last.as_fd(), nix::poll::PollFlags::POLLIN)];
                let _ = nix::poll::poll(&mut p, nix::poll::PollTimeout::from(10_000u16));
            }
            conns.retain(|c| {
                let mut p = [nix::poll::PollFd::new(c.as_fd(), nix::poll::PollFlags::POLLIN)];
                if nix::poll::poll(&mut p, nix::poll::PollTimeout::ZERO).unwrap() == 0 {
                    return true;
                }
                if let Ok(m) = transport::recv(c.as_fd()) {
                    if let Ok(Response::Error(e)) = decode::<Response>(&m.bytes) {
                        println!("REFUSED {e:?}");
                    }
                }
                false
            });
        }
        "sessions" => {
            for _ in 0..n {
                match NvmeRing::open(path) {
                    Ok(r) => rings.push(r),
                    Err(e) => {
                        println!("REFUSED {e:?}");
                        break;
                    }
                }
            }
        }
        _ => usage(),
    }
    println!("HELD {}", conns.len() + rings.len());
    std::thread::sleep(Duration::from_secs(600));
}
