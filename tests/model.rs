//! The emulated controller's performance model end to end (issue 9): a broker started with
//! `--model` serves I/O no faster than the modelled device (at its IOPS cap under load, at its
//! latency at queue depth 1), and a spec or mode it cannot use is refused with a clear error.
//!
//! Bounds are generous (a noisy 2-vCPU VM): what the model promises exactly is a floor on
//! latency and a ceiling on IOPS; how close the broker gets to them is checked loosely.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use nvmed_client::{BufferId, Io, NvmeRing};

const LATENCY: Duration = Duration::from_micros(250);
/// The cap in the spec below.
const IOPS: f64 = 10_000.0;
/// 4 KiB blocks in the 64 MiB namespace TestBroker makes.
const BLOCKS: u64 = 16384;

/// Random 4 KiB reads at queue depth `depth` for `time`; returns the completions per second.
fn iops_at(ring: &mut NvmeRing, ns: u32, buf: BufferId, depth: usize, time: Duration) -> f64 {
    let mut rng = Rng(0x5eed);
    let mut out = Vec::with_capacity(64);
    let (start, mut done) = (Instant::now(), 0u64);
    while start.elapsed() < time {
        while ring.in_flight() < depth {
            let slot = rng.below(32);
            ring.prep(Io::read(ns, rng.below(BLOCKS) * 4096, 4096, buf, slot * 4096)).unwrap();
        }
        ring.submit().unwrap();
        out.clear();
        done += ring.wait(1, &mut out, Some(Duration::from_secs(10))).unwrap() as u64;
        assert!(out.iter().all(|c| c.status.is_success()), "{out:?}");
    }
    let rate = done as f64 / start.elapsed().as_secs_f64();
    // Drain what is left before the next measurement.
    while ring.in_flight() > 0 {
        ring.wait(1, &mut out, Some(Duration::from_secs(10))).unwrap();
    }
    rate
}

#[test]
fn a_modelled_device_runs_at_its_iops_cap_and_its_latency() {
    // 64 channels at 250 us could do 256k IOPS; the cap is 10k. At QD32 that leaves each
    // command 3.2 ms, about 3 ms more than the device latency, for the trip through broker and
    // client, so the device queue stays fed even on a busy machine. (20k works on an idle
    // 2-vCPU machine, but not reliably beside other builds: every completion then costs
    // wakeups of the emulator, broker and client threads in a debug build.)
    let spec =
        format!("latency-us={},iops=10k,read-mbps=2000,write-mbps=1000,channels=64", LATENCY.as_micros());
    let mut broker = TestBroker::start(&["--emulator-mode", "async", "--model", &spec]);
    let mut ring = broker.connect();
    let ns = ring.namespaces()[0].nsid;
    let buf = ring.alloc_buffer(32 * 4096).unwrap();

    // Queue depth 1: each read takes the modelled time (latency + 4096 B at 2000 MB/s), never
    // less; a little more for the wakeups between emulator, broker and client.
    let mut latencies: Vec<Duration> = (0..400u64)
        .map(|i| {
            let t = Instant::now();
            ring.read(ns, (i * 37 % BLOCKS) * 4096, buf, 0, 4096).unwrap();
            t.elapsed()
        })
        .collect();
    latencies.sort_unstable();
    let (min, median) = (latencies[0], latencies[latencies.len() / 2]);
    eprintln!("QD1: min {min:?}, median {median:?}, max {:?}", latencies[latencies.len() - 1]);
    assert!(min >= LATENCY, "a read completed in {min:?}, before the modelled {LATENCY:?}");
    // The median says the modelled time is what a read takes (with room for a loaded machine
    // running other tests: wakeups of three threads in a debug build).
    assert!(median <= LATENCY + Duration::from_millis(5), "QD1 median {median:?}, modelled {LATENCY:?}");

    // Queue depth 32, after a warm-up, for a second. Never above the cap; at least 70% of it
    // in one of three tries (a busy machine may starve the broker for a while).
    iops_at(&mut ring, ns, buf, 32, Duration::from_millis(200));
    let mut best = 0.0f64;
    for _ in 0..3 {
        let iops = iops_at(&mut ring, ns, buf, 32, Duration::from_secs(1));
        eprintln!("QD32: {iops:.0} IOPS (cap {IOPS})");
        assert!(iops <= IOPS * 1.05, "{iops:.0} IOPS: above the modelled cap of {IOPS}");
        best = best.max(iops);
        if best >= IOPS * 0.7 {
            break;
        }
    }
    assert!(best >= IOPS * 0.7, "at most {best:.0} IOPS: far below the modelled cap of {IOPS}");
    drop(ring);
    assert!(broker.stop(), "clean shutdown");
}

/// Runs nvmed with `args` (it must fail at once); returns its stderr.
fn refused(args: &[&str]) -> String {
    let dir = scratch_dir();
    let socket = dir.join("nvmed.sock");
    let out = Command::new(env!("CARGO_BIN_EXE_nvmed"))
        .args(["--emulate", "--size", "1M", "--socket", socket.to_str().unwrap()])
        .args(args)
        .env("NVMED_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success(), "nvmed started with {args:?}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_model_nvmed_cannot_use_is_refused_clearly() {
    let err = refused(&["--emulator-mode", "sync", "--model", "iops=20k"]);
    assert!(err.contains("--model needs --emulator-mode async"), "{err}");
    let err = refused(&["--model", "iops=20k", "--emulator-latency-us", "100"]);
    assert!(err.contains("--emulator-latency-us") && err.contains("cannot be used with"), "{err}");
    let err = refused(&["--model", "iops=20k,speed=fast"]);
    assert!(err.contains("unknown key \"speed\"") && err.contains("latency-us, iops, read-mbps"), "{err}");
    let err = refused(&["--model", "channels=0"]);
    assert!(err.contains("bad value \"0\" for channels"), "{err}");
}
