//! `vmcheck`: scenarios the VM test runs inside the guest, against nvmed on a VFIO device.
//! Each prints one `VMCHECK PASS <name>` line or fails with a message and a non-zero exit.
//! `dump` and `load` move raw namespace contents to stdout / from a file (the vhost-user-blk
//! test reads a namespace through nvmed on the host to compare it with what a guest saw).
//! `ctl-*` check what `nvmectl --json` printed (files) and need no broker connection.

mod ctl;

use std::time::Duration;

use clap::{Parser, Subcommand};
use nvmed_client::testkit::{pattern, random_write_read, run_batch, Rng};
use nvmed_client::{BrokerStatus, Io, NamespaceInfo, NvmeRing, Status};

/// Guest-side checks for the VM test.
#[derive(Debug, Parser)]
struct Args {
    /// nvmed socket.
    #[arg(long, default_value = "/run/nvmed.sock")]
    socket: String,
    /// Namespace to use (default: the first one the broker offers).
    #[arg(long)]
    nsid: Option<u32>,
    #[command(subcommand)]
    check: Scenario,
}

/// The controller nvmectl must report.
#[derive(Debug, Clone, clap::Args)]
struct CtlController {
    /// nvmectl's output (`--json`).
    #[arg(long)]
    file: String,
    /// The controller's PCI address.
    #[arg(long)]
    device: String,
    /// Its model number (Identify Controller).
    #[arg(long)]
    model: String,
    /// Its serial number.
    #[arg(long)]
    serial: String,
}

/// Where a test pattern lives.
#[derive(Debug, Clone, Copy, clap::Args)]
struct PatternAt {
    /// Byte offset.
    #[arg(long)]
    offset: u64,
    /// Length in bytes.
    #[arg(long)]
    len: u32,
    /// Pattern seed.
    #[arg(long)]
    seed: u64,
}

#[derive(Debug, Subcommand)]
enum Scenario {
    /// The namespace the broker reports matches the disk QEMU was given.
    Identify {
        /// Expected size in bytes.
        #[arg(long)]
        size: u64,
        /// Expected LBA size.
        #[arg(long)]
        lba: u32,
    },
    /// Vectored (scatter-gather) requests with random segment layouts, verified: page-aligned
    /// ones must go to the device with PRPs; odd 512-byte ones with SGLs when `--expect-sgl`
    /// (QEMU's controller supports them), else through the broker's bounce buffers; odd-byte
    /// ones (not dword aligned) are always bounced.
    Vectored {
        /// Region start in MiB (about 2.5 MiB are used).
        #[arg(long)]
        at_mib: u64,
        /// The controller supports SGLs: odd 512-byte layouts must use them and bounce nothing.
        #[arg(long)]
        expect_sgl: bool,
        /// Seed.
        #[arg(long, default_value_t = 21)]
        seed: u64,
    },
    /// Random verified writes and reads over a region (1 block up to MDTS, PRP lists included).
    Verify {
        /// Region start in MiB.
        #[arg(long)]
        at_mib: u64,
        /// Region size in MiB.
        #[arg(long)]
        mib: u64,
        /// Seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Rounds of writes.
        #[arg(long, default_value_t = 4)]
        rounds: usize,
    },
    /// Writes and reads back the largest request the broker takes (split into MDTS-sized
    /// device commands with PRP lists), and checks that a larger one is refused.
    MaxTransfer {
        /// Where, in MiB.
        #[arg(long)]
        at_mib: u64,
    },
    /// Writes continuously until killed (prints HAMMERING once started).
    Hammer {
        /// Region start in MiB.
        #[arg(long)]
        at_mib: u64,
    },
    /// Writes a known pattern (to check after a restart or from the host).
    WritePattern(PatternAt),
    /// Reads and checks a pattern written by write-pattern.
    CheckPattern(PatternAt),
    /// Surprise removal: the broker says the namespace's controller is gone, and a read fails
    /// at once with DeviceGone.
    ExpectGone,
    /// Durability: checks that the namespace reports a volatile write cache, then writes
    /// pattern SEED with FUA at OFFSET and pattern SEED+1 at OFFSET+LEN without FUA followed by
    /// a Flush; both are durable once this prints DURABLE (the host then cuts the power).
    WriteDurable(PatternAt),
    /// Host side: checks a pattern in a raw disk image (no broker involved).
    CheckFile {
        /// The image.
        #[arg(long)]
        file: String,
        /// Where the pattern is.
        #[command(flatten)]
        at: PatternAt,
    },
    /// One controller of the configuration matrix: the broker offers exactly the expected
    /// namespaces, and each takes verified random I/O at its start and then one request of
    /// exactly the advertised max_transfer (and refuses one block more).
    Matrix {
        /// An expected namespace as NSID:LBA_SIZE:BYTES; repeat for each, in NSID order.
        #[arg(long = "expect", value_parser = parse_namespace, required = true)]
        expect: Vec<(u32, u32, u64)>,
        /// Expected max_transfer (the largest request the broker takes), in bytes.
        #[arg(long)]
        max_transfer: u32,
        /// Size of the random I/O region at the start of each namespace, in KiB.
        #[arg(long, default_value_t = 1024)]
        region_kib: u64,
        /// Seed.
        #[arg(long, default_value_t = 11)]
        seed: u64,
    },
    /// Writes the namespace's bytes from `offset` to stdout (raw; pipe into sha256sum).
    Dump {
        /// Byte offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// Bytes (default: to the end of the namespace).
        #[arg(long)]
        len: Option<u64>,
    },
    /// Writes a file's contents into the namespace at `offset`, then flushes.
    Load {
        /// Byte offset.
        #[arg(long, default_value_t = 0)]
        offset: u64,
        /// The file (its length must be a multiple of the LBA size).
        #[arg(long)]
        file: String,
    },
    /// The broker reports this many sessions (counting this one) and no buffer IOVA but ours.
    Sessions {
        /// Expected sessions.
        #[arg(long)]
        expect: u64,
    },
    /// `nvmectl status --json` shows this controller (Identify data), running, with exactly
    /// the expected namespaces.
    CtlStatus {
        #[command(flatten)]
        ctrl: CtlController,
        /// Its firmware revision (non-empty).
        #[arg(long)]
        firmware: String,
        /// Its maximum transfer in bytes (MDTS).
        #[arg(long)]
        max_transfer: u32,
        /// An expected namespace as NSID:LBA_SIZE:BYTES; repeat for each, in NSID order.
        #[arg(long = "expect", value_parser = parse_namespace, required = true)]
        expect: Vec<(u32, u32, u64)>,
    },
    /// `nvmectl health --json` shows this controller's SMART log as QEMU fills it, with data
    /// and commands counted; with `--since`, grown by exactly a ringbench run's I/O.
    CtlHealth {
        #[command(flatten)]
        ctrl: CtlController,
        /// Expected composite temperature in kelvin.
        #[arg(long)]
        kelvin: u16,
        /// Expected available spare, percent.
        #[arg(long)]
        spare: u8,
        /// Expected available spare threshold, percent.
        #[arg(long)]
        spare_threshold: u8,
        /// `nvmectl health --json` taken before the ringbench run of `--ringbench`.
        #[arg(long, requires = "ringbench")]
        since: Option<String>,
        /// That ringbench run's `--output-format json` report.
        #[arg(long, requires = "since")]
        ringbench: Option<String>,
    },
    /// `nvmectl sessions --json`, taken while a randrw ringbench ran, lists it as the only
    /// session, with its pid, command, uid, rings, counters and nonzero rates.
    CtlSessions {
        /// nvmectl's output.
        #[arg(long)]
        file: String,
        /// The ringbench process.
        #[arg(long)]
        pid: i32,
        /// Its command name.
        #[arg(long, default_value = "ringbench")]
        command: String,
        /// Its uid.
        #[arg(long)]
        uid: u32,
        /// Its rings (one per job).
        #[arg(long)]
        rings: u32,
    },
    /// The broker runs exactly this many I/O threads and each one's device queue completed at
    /// least `min_commands` commands since the broker started.
    IoThreads {
        /// Expected I/O threads.
        #[arg(long)]
        expect: usize,
        /// Fewest device commands each thread must have completed.
        #[arg(long)]
        min_commands: u64,
    },
}

fn main() {
    let args = Args::parse();
    let name = format!("{:?}", args.check).split([' ', '{']).next().unwrap_or("check").to_lowercase();
    if let Scenario::CheckFile { file, at: PatternAt { offset, len, seed } } = &args.check {
        let mut got = vec![0u8; *len as usize];
        let f = std::fs::File::open(file).unwrap_or_else(|e| fail(&name, &format!("{file}: {e}")));
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, *offset)
            .unwrap_or_else(|e| fail(&name, &e.to_string()));
        let mut want = vec![0u8; *len as usize];
        pattern(*seed, &mut want);
        if got != want {
            fail(&name, &format!("pattern {seed} not found at {offset} of {file}"));
        }
        println!("VMCHECK PASS {name}");
        return;
    }
    if let Some(result) = check_nvmectl_output(&args.check) {
        match result {
            Ok(()) => println!("VMCHECK PASS {name}"),
            Err(e) => fail(&name, &e),
        }
        return;
    }
    let mut ring = match NvmeRing::open(&args.socket) {
        Ok(r) => r,
        Err(e) => fail(&name, &format!("open: {e}")),
    };
    let raw_stdout = matches!(args.check, Scenario::Dump { .. });
    if let Err(e) = run(&mut ring, args.nsid, args.check) {
        fail(&name, &e);
    }
    if raw_stdout {
        eprintln!("VMCHECK PASS {name}"); // stdout carries the data
    } else {
        println!("VMCHECK PASS {name}");
    }
}

/// The `ctl-*` checks (no broker connection); `None` for any other scenario.
fn check_nvmectl_output(check: &Scenario) -> Option<Result<(), String>> {
    fn want(c: &CtlController) -> ctl::ExpectController<'_> {
        ctl::ExpectController { device: &c.device, model: &c.model, serial: &c.serial }
    }
    Some(match check {
        Scenario::CtlStatus { ctrl, firmware, max_transfer, expect } => {
            ctl::status(&ctrl.file, &want(ctrl), firmware, *max_transfer, expect)
        }
        Scenario::CtlHealth { ctrl, kelvin, spare, spare_threshold, since, ringbench } => {
            let smart =
                ctl::ExpectSmart { kelvin: *kelvin, spare: *spare, spare_threshold: *spare_threshold };
            ctl::health(&ctrl.file, &want(ctrl), &smart, since.as_deref().zip(ringbench.as_deref()))
        }
        Scenario::CtlSessions { file, pid, command, uid, rings } => {
            ctl::sessions(file, *pid, command, *uid, *rings)
        }
        _ => return None,
    })
}

fn parse_namespace(s: &str) -> Result<(u32, u32, u64), String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not NSID:LBA_SIZE:BYTES");
    match parts[..] {
        [n, l, b] => {
            Ok((n.parse().map_err(|_| bad())?, l.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?))
        }
        _ => Err(bad()),
    }
}

fn fail(name: &str, why: &str) -> ! {
    eprintln!("VMCHECK FAIL {name}: {why}");
    std::process::exit(1);
}

fn run(ring: &mut NvmeRing, nsid: Option<u32>, check: Scenario) -> Result<(), String> {
    let ns = *match nsid {
        None => ring.namespaces().first().ok_or("no namespace offered")?,
        Some(id) => ring.namespaces().iter().find(|n| n.nsid == id).ok_or(format!("no namespace {id}"))?,
    };
    let e = |e: nvmed_client::Error| e.to_string();
    match check {
        Scenario::Identify { size, lba } => {
            println!(
                "namespace {} lba {} blocks {} max_transfer {}",
                ns.nsid, ns.lba_size, ns.lba_count, ns.max_transfer
            );
            if ns.lba_size != lba || ns.size_bytes() != size {
                return Err(format!("expected {size} bytes of {lba}-byte blocks, broker says {ns:?}"));
            }
        }
        Scenario::Verify { at_mib, mib, seed, rounds } => {
            random_write_read(ring, (at_mib << 20, mib << 20), seed, rounds);
        }
        Scenario::Vectored { at_mib, expect_sgl, seed } => {
            use nvmed_client::testkit::{vectored_round_trip, SegmentLayout, VectoredBuffers};
            let max_len = u64::from(ns.max_transfer).min(256 << 10);
            let bufs = VectoredBuffers::new(ring, max_len).map_err(e)?;
            let at = at_mib << 20;
            vectored_round_trip(ring, &bufs, at, &[SegmentLayout::PageAligned], seed, 2);
            let s = ring.stats().map_err(e)?;
            println!("page-aligned layouts: {s:?}");
            if s.broker_bounced_bytes != 0 || s.broker_sgl_commands != 0 {
                return Err("page-aligned layouts did not go to the device with PRPs".into());
            }
            vectored_round_trip(ring, &bufs, at, &[SegmentLayout::Odd512], seed + 1, 4);
            let s = ring.stats().map_err(e)?;
            println!("odd 512-byte layouts: {s:?}");
            match expect_sgl {
                true if s.broker_sgl_commands == 0 || s.broker_bounced_bytes != 0 => {
                    return Err("odd 512-byte layouts did not go to the device with SGLs".into())
                }
                false if s.broker_bounced_bytes == 0 => return Err("odd layouts were not bounced".into()),
                _ => {}
            }
            // Segments of any byte length and offset: never sent as SGL data blocks (not dword
            // aligned; QEMU would take them, firmware rarely has): bounced.
            let bounced = s.broker_bounced_bytes;
            vectored_round_trip(ring, &bufs, at, &[SegmentLayout::Bytes], seed + 2, 4);
            let s = ring.stats().map_err(e)?;
            println!("byte layouts: {s:?}");
            if s.broker_bounced_bytes == bounced {
                return Err("layouts of odd bytes were not bounced".into());
            }
        }
        Scenario::MaxTransfer { at_mib } => {
            let len = ns.max_transfer;
            let l = u64::from(len);
            let buf = ring.alloc_buffer(2 * len as usize + 4096).map_err(e)?;
            pattern(77, ring.buffer_mut(buf, 0, l).map_err(e)?);
            let at = at_mib << 20;
            ring.write(ns.nsid, at, buf, 0, len).map_err(e)?;
            // Read back to an in-page offset: the transfer needs one more PRP entry than pages.
            ring.read(ns.nsid, at, buf, l + 512, len).map_err(e)?;
            let data = ring.buffer(buf, 0, l).map_err(e)?.to_vec();
            if ring.buffer(buf, l + 512, l).map_err(e)? != &data[..] {
                return Err(format!("{len}-byte transfer came back different"));
            }
            // One block more is refused with a clear status (at offset 0, where it would fit
            // in the namespace: the limit refuses it, not the namespace's end).
            match ring.read(ns.nsid, 0, buf, 0, len + ns.lba_size) {
                Err(nvmed_client::Error::Io(s @ Status::Broker(BrokerStatus::TooLarge))) => {
                    println!("{len} bytes + 1 block: {s}")
                }
                other => return Err(format!("a request above the limit was not refused: {other:?}")),
            }
        }
        Scenario::Hammer { at_mib } => {
            let buf = ring.alloc_buffer(4 << 20).map_err(e)?;
            ring.buffer_mut(buf, 0, 4 << 20).map_err(e)?.fill(0x5a);
            println!("HAMMERING");
            let mut out = Vec::new();
            let mut i = 0u64;
            loop {
                while ring.in_flight() < 32 {
                    let off = (i % 32) * 128 * 1024;
                    ring.prep(Io::write(ns.nsid, (at_mib << 20) + off, 128 * 1024, buf, off)).map_err(e)?;
                    i += 1;
                }
                ring.submit().map_err(e)?;
                out.clear();
                ring.wait(1, &mut out, Some(Duration::from_secs(30))).map_err(e)?;
            }
        }
        Scenario::WritePattern(PatternAt { offset, len, seed }) => {
            let buf = ring.alloc_buffer(len as usize).map_err(e)?;
            pattern(seed, ring.buffer_mut(buf, 0, u64::from(len)).map_err(e)?);
            ring.write(ns.nsid, offset, buf, 0, len).map_err(e)?;
            ring.flush(ns.nsid).map_err(e)?;
        }
        Scenario::ExpectGone => {
            if ns.state != nvmed_client::ControllerState::Gone {
                return Err(format!("ListNamespaces says the controller is {:?}, not Gone", ns.state));
            }
            let buf = ring.alloc_buffer(4096).map_err(e)?;
            let t = std::time::Instant::now();
            match ring.read(ns.nsid, 0, buf, 0, 4096) {
                Err(nvmed_client::Error::Io(Status::Broker(nvmed_client::BrokerStatus::DeviceGone))) => {}
                other => return Err(format!("a read of a gone controller gave {other:?}")),
            }
            println!("gone: ListNamespaces says Gone, a read fails with DeviceGone in {:?}", t.elapsed());
        }
        Scenario::WriteDurable(PatternAt { offset, len, seed }) => {
            if !ns.volatile_write_cache {
                return Err("the controller reports no volatile write cache (QEMU's has one)".into());
            }
            let buf = ring.alloc_buffer(2 * len as usize).map_err(e)?;
            pattern(seed, ring.buffer_mut(buf, 0, u64::from(len)).map_err(e)?);
            pattern(seed + 1, ring.buffer_mut(buf, u64::from(len), u64::from(len)).map_err(e)?);
            let mut out = Vec::new();
            ring.prep(Io::write(ns.nsid, offset, len, buf, 0).fua().user_data(1)).map_err(e)?;
            ring.submit().map_err(e)?;
            ring.wait(1, &mut out, None).map_err(e)?;
            ring.write(ns.nsid, offset + u64::from(len), buf, u64::from(len), len).map_err(e)?;
            ring.flush(ns.nsid).map_err(e)?;
            if !out[0].status.is_success() {
                return Err(format!("the FUA write failed: {:?}", out[0].status));
            }
            println!("DURABLE: FUA write at {offset}, flushed write at {}", offset + u64::from(len));
        }
        Scenario::CheckPattern(PatternAt { offset, len, seed }) => {
            let buf = ring.alloc_buffer(len as usize).map_err(e)?;
            ring.read(ns.nsid, offset, buf, 0, len).map_err(e)?;
            let mut want = vec![0u8; len as usize];
            pattern(seed, &mut want);
            if ring.buffer(buf, 0, u64::from(len)).map_err(e)? != &want[..] {
                return Err(format!("pattern {seed} at {offset} not found"));
            }
        }
        Scenario::Matrix { expect, max_transfer, region_kib, seed } => {
            let offered: Vec<NamespaceInfo> = ring.namespaces().to_vec();
            for n in &offered {
                println!(
                    "namespace {} lba {} bytes {} max_transfer {}",
                    n.nsid,
                    n.lba_size,
                    n.size_bytes(),
                    n.max_transfer
                );
            }
            let got: Vec<(u32, u32, u64)> =
                offered.iter().map(|n| (n.nsid, n.lba_size, n.size_bytes())).collect();
            if got != expect {
                return Err(format!(
                    "expected namespaces {expect:?} (nsid, lba, bytes), broker offers {got:?}"
                ));
            }
            let buf = ring.alloc_buffer(2 * max_transfer as usize + 4096).map_err(e)?;
            for n in &offered {
                if n.max_transfer != max_transfer {
                    return Err(format!(
                        "namespace {}: max_transfer {}, expected {max_transfer}",
                        n.nsid, n.max_transfer
                    ));
                }
                let region = region_kib << 10;
                let writes = verify_random(ring, n, region, seed ^ u64::from(n.nsid) << 48)?;
                let refusal = max_transfer_request(ring, n, region, buf)?;
                println!(
                    "namespace {}: {writes} random writes verified; a {max_transfer}-byte write and read verified; \
                     one block more refused: {refusal}",
                    n.nsid
                );
            }
        }
        Scenario::Dump { offset, len } => {
            use std::io::Write;
            let end = len.map_or(ns.size_bytes(), |l| offset + l);
            if end > ns.size_bytes() || !offset.is_multiple_of(u64::from(ns.lba_size)) {
                return Err(format!("{offset}..{end} is not an LBA-aligned range of namespace {}", ns.nsid));
            }
            let chunk = ns.max_transfer.min(1 << 20);
            let buf = ring.alloc_buffer(chunk as usize).map_err(e)?;
            let mut out = std::io::stdout().lock();
            let mut at = offset;
            while at < end {
                let n = (end - at).min(u64::from(chunk)) as u32;
                ring.read(ns.nsid, at, buf, 0, n).map_err(e)?;
                out.write_all(ring.buffer(buf, 0, u64::from(n)).map_err(e)?).map_err(|e| e.to_string())?;
                at += u64::from(n);
            }
            out.flush().map_err(|e| e.to_string())?;
        }
        Scenario::Load { offset, file } => {
            let data = std::fs::read(&file).map_err(|err| format!("{file}: {err}"))?;
            let chunk = ns.max_transfer.min(1 << 20) as usize;
            let buf = ring.alloc_buffer(chunk).map_err(e)?;
            for (i, part) in data.chunks(chunk).enumerate() {
                ring.buffer_mut(buf, 0, part.len() as u64).map_err(e)?.copy_from_slice(part);
                ring.write(ns.nsid, offset + (i * chunk) as u64, buf, 0, part.len() as u32).map_err(e)?;
            }
            ring.flush(ns.nsid).map_err(e)?;
        }
        Scenario::CheckFile { .. }
        | Scenario::CtlStatus { .. }
        | Scenario::CtlHealth { .. }
        | Scenario::CtlSessions { .. } => unreachable!("handled without a broker"),
        Scenario::IoThreads { expect, min_commands } => {
            let threads = ring.session().io_threads().map_err(e)?;
            for (i, t) in threads.iter().enumerate() {
                println!(
                    "I/O thread {i}: {} rings, {} device commands completed",
                    t.rings, t.device_commands
                );
            }
            if threads.len() != expect {
                return Err(format!("the broker runs {} I/O threads, expected {expect}", threads.len()));
            }
            if let Some((i, t)) = threads.iter().enumerate().find(|(_, t)| t.device_commands < min_commands) {
                return Err(format!(
                    "I/O thread {i} completed {} device commands, expected at least {min_commands}",
                    t.device_commands
                ));
            }
        }
        Scenario::Sessions { expect } => {
            let mut s = ring.stats().map_err(e)?;
            for _ in 0..100 {
                if s.broker_sessions == expect {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                s = ring.stats().map_err(e)?;
            }
            if s.broker_sessions != expect || s.broker_buffer_iova_bytes != s.buffer_bytes {
                return Err(format!("expected {expect} sessions and only our IOVA mapped, got {s:?}"));
            }
        }
    }
    Ok(())
}

/// Random-length writes (one block up to 256 KiB, from in-page buffer offsets) over the first
/// `size` bytes of `ns` in two rounds, then reads the region back and compares every block
/// written. Returns how many writes were made.
fn verify_random(ring: &mut NvmeRing, ns: &NamespaceInfo, size: u64, seed: u64) -> Result<usize, String> {
    let e = |e: nvmed_client::Error| e.to_string();
    let lba = u64::from(ns.lba_size);
    if !size.is_multiple_of(lba) || size > ns.size_bytes() {
        return Err(format!("namespace {}: region of {size} bytes does not fit", ns.nsid));
    }
    let max_blocks = (u64::from(ns.max_transfer).min(256 << 10) / lba).max(1);
    let buf_len = 4u64 << 20;
    let buf = ring.alloc_buffer(buf_len as usize).map_err(e)?;
    let mut model = vec![0u8; size as usize];
    let mut written = vec![false; (size / lba) as usize];
    let mut rng = Rng(seed | 1);
    let mut count = 0;
    for round in 0..2u64 {
        // Disjoint extents within a round, so writes in flight together never overlap.
        let (mut ios, mut cursor, mut buf_cursor) = (Vec::new(), 0u64, 0u64);
        while cursor < size {
            cursor += rng.below(4) * lba;
            let blocks =
                if rng.below(2) == 0 { rng.below(8.min(max_blocks)) + 1 } else { rng.below(max_blocks) + 1 };
            let len = (blocks * lba).min(size.saturating_sub(cursor));
            let boff = buf_cursor + rng.below(1024) * 4;
            if len == 0 || boff + len > buf_len {
                break;
            }
            buf_cursor = (boff + len).next_multiple_of(4096);
            let data = ring.buffer_mut(buf, boff, len).map_err(e)?;
            pattern(seed ^ round << 40 ^ cursor, data);
            model[cursor as usize..(cursor + len) as usize].copy_from_slice(data);
            written[(cursor / lba) as usize..((cursor + len) / lba) as usize].fill(true);
            ios.push(Io::write(ns.nsid, cursor, len as u32, buf, boff));
            cursor += len;
        }
        count += ios.len();
        for c in run_batch(ring, &ios, 16).values() {
            if c.status != Status::Success {
                return Err(format!(
                    "namespace {}: write {:?} failed: {}",
                    ns.nsid, ios[c.user_data as usize], c.status
                ));
            }
        }
    }
    // Read back into another buffer, 512 bytes into a page (one more PRP entry than pages).
    let rbuf = ring.alloc_buffer(size as usize + 4096).map_err(e)?;
    let piece = (128u64 << 10).max(lba);
    let ios: Vec<Io> = (0..size)
        .step_by(piece as usize)
        .map(|o| Io::read(ns.nsid, o, piece.min(size - o) as u32, rbuf, 512 + o))
        .collect();
    for c in run_batch(ring, &ios, 16).values() {
        if c.status != Status::Success {
            return Err(format!(
                "namespace {}: read {:?} failed: {}",
                ns.nsid, ios[c.user_data as usize], c.status
            ));
        }
    }
    let got = ring.buffer(rbuf, 512, size).map_err(e)?;
    for (blk, _) in written.iter().enumerate().filter(|(_, w)| **w) {
        let r = blk * lba as usize..(blk + 1) * lba as usize;
        if got[r.clone()] != model[r] {
            return Err(format!(
                "namespace {}: block {blk} read back different from what was written",
                ns.nsid
            ));
        }
    }
    if written.iter().filter(|w| **w).count() < written.len() / 4 {
        return Err(format!("namespace {}: the test wrote too little", ns.nsid));
    }
    Ok(count)
}

/// One write and one read of exactly `ns.max_transfer` bytes at `at`, verified, and a request
/// one block larger refused; returns the refusal.
fn max_transfer_request(
    ring: &mut NvmeRing,
    ns: &NamespaceInfo,
    at: u64,
    buf: nvmed_client::BufferId,
) -> Result<String, String> {
    let e = |e: nvmed_client::Error| e.to_string();
    let len = ns.max_transfer;
    let l = u64::from(len);
    if at + l > ns.size_bytes() {
        return Err(format!("namespace {}: too small for a {len}-byte request at {at}", ns.nsid));
    }
    pattern(ns.nsid.into(), ring.buffer_mut(buf, 0, l).map_err(e)?);
    ring.write(ns.nsid, at, buf, 0, len).map_err(|x| format!("{len}-byte write: {x}"))?;
    ring.buffer_mut(buf, l + 512, l).map_err(e)?.fill(0);
    ring.read(ns.nsid, at, buf, l + 512, len).map_err(|x| format!("{len}-byte read: {x}"))?;
    if ring.buffer(buf, 0, l).map_err(e)? != ring.buffer(buf, l + 512, l).map_err(e)? {
        return Err(format!("namespace {}: {len}-byte transfer came back different", ns.nsid));
    }
    // At offset 0, where one block more fits in the namespace: the limit refuses it.
    match ring.read(ns.nsid, 0, buf, 0, len + ns.lba_size) {
        Err(nvmed_client::Error::Io(s @ Status::Broker(BrokerStatus::TooLarge))) => Ok(s.to_string()),
        other => {
            Err(format!("namespace {}: a request above max_transfer was not refused: {other:?}", ns.nsid))
        }
    }
}
