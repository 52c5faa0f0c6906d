//! blkcheck: verified direct I/O on a block device, for the VM test of nvmed-tcp (the guest
//! kernel's nvme-tcp initiator in front of nvmed-tcp). Threads pinned to every CPU (so the
//! kernel spreads their I/O over its per-CPU I/O queues) each write their own region with
//! random-sized O_DIRECT writes of a seeded pattern, then read it back with other sizes and
//! compare. Prints `BLKCHECK PASS ...` or exits non-zero naming the first mismatch.
//!
//! With `--bench randread|randwrite` it measures instead: `--threads` threads (the queue depth:
//! one synchronous O_DIRECT request each) of random 4 KiB requests for `--secs` seconds, and
//! prints the IOPS and the CPU time the whole machine spent (from /proc/stat), per I/O.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::fs::OpenOptions;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::time::Instant;

use clap::Parser;
use nvmed_client::testkit::Rng;

/// Verified O_DIRECT I/O on a block device.
#[derive(Debug, Parser)]
struct Args {
    /// The block device.
    #[arg(long)]
    dev: String,
    /// Bytes of the device to use, from its start, in MiB.
    #[arg(long)]
    mib: u64,
    /// Threads (each in its own region, pinned round-robin to the CPUs).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Request sizes in bytes to pick from (multiples of 512).
    #[arg(long, value_delimiter = ',', default_value = "512,4096,8192,65536,131072,1048576")]
    sizes: Vec<usize>,
    /// Seed of the pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Only read and verify what an earlier run with the same seed wrote.
    #[arg(long)]
    verify_only: bool,
    /// Measure random 4 KiB reads or writes instead of verifying.
    #[arg(long, value_parser = ["randread", "randwrite"])]
    bench: Option<String>,
    /// Seconds a benchmark runs.
    #[arg(long, default_value_t = 3.0)]
    secs: f64,
    /// Label printed with the benchmark's result.
    #[arg(long, default_value = "")]
    label: String,
}

/// Busy and total jiffies of all CPUs (the first line of /proc/stat).
fn cpu_jiffies() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> =
        stat.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

fn bench(a: &Args, write: bool) {
    let span = (a.mib << 20) / 4096;
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (busy0, _) = cpu_jiffies();
    let t0 = Instant::now();
    let ios: u64 = std::thread::scope(|s| {
        let hs: Vec<_> = (0..a.threads)
            .map(|t| {
                let stop = &stop;
                s.spawn(move || {
                    let f = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .custom_flags(libc::O_DIRECT)
                        .open(&a.dev)
                        .unwrap_or_else(|e| panic!("{}: {e}", a.dev));
                    let mut buf = Aligned::new(4096);
                    fill(a.seed, t as u64, buf.slice(4096));
                    let mut rng = Rng(a.seed ^ ((t as u64 + 7) * 0x9e37_79b9));
                    let mut n = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let at = rng.below(span) * 4096;
                        let r = if write {
                            f.write_all_at(buf.slice(4096), at)
                        } else {
                            f.read_exact_at(buf.slice(4096), at)
                        };
                        r.unwrap_or_else(|e| panic!("I/O at {at}: {e}"));
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_secs_f64(a.secs));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().expect("bench thread")).sum()
    });
    let secs = t0.elapsed().as_secs_f64();
    let (busy1, _) = cpu_jiffies();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let cpu = (busy1 - busy0) as f64 / hz;
    println!(
        "BLKBENCH {} {} qd={} iops={:.0} cpu_s={:.2} cpu_us_per_io={:.1}",
        a.label,
        a.bench.as_deref().unwrap_or(""),
        a.threads,
        ios as f64 / secs,
        cpu,
        cpu * 1e6 / ios.max(1) as f64
    );
}

struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = Layout::from_size_align(len, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size (the largest request size).
        let ptr = unsafe { alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }
    fn slice(&mut self, len: usize) -> &mut [u8] {
        assert!(len <= self.layout.size());
        // SAFETY: in bounds of the allocation, exclusively borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, len) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

/// The pattern byte at device offset `at` for `seed`: a function of both, so misplaced data shows.
fn fill(seed: u64, at: u64, buf: &mut [u8]) {
    for (i, chunk) in buf.chunks_mut(8).enumerate() {
        let x = (at + i as u64 * 8).wrapping_mul(0x9e37_79b9_7f4a_7c15)
            ^ seed.wrapping_mul(0xff51_afd7_ed55_8ccd);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

fn worker(a: &Args, t: usize, start: u64, len: u64) -> Result<u64, String> {
    // SAFETY: sysconf has no memory effects.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    pin(t % cpus);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&a.dev)
        .map_err(|e| format!("{}: {e}", a.dev))?;
    let max = *a.sizes.iter().max().unwrap();
    let mut buf = Aligned::new(max);
    let mut want = vec![0u8; max];
    let mut rng = Rng(a.seed ^ ((t as u64 + 1) * 0x1234_5678));
    let mut ios = 0;
    for pass in if a.verify_only { 1..2 } else { 0..2 } {
        let mut at = start;
        while at < start + len {
            let n = (a.sizes[rng.below(a.sizes.len() as u64) as usize] as u64).min(start + len - at) as usize;
            if pass == 0 {
                fill(a.seed, at, buf.slice(n));
                f.write_all_at(buf.slice(n), at).map_err(|e| format!("write {n} at {at}: {e}"))?;
            } else {
                f.read_exact_at(buf.slice(n), at).map_err(|e| format!("read {n} at {at}: {e}"))?;
                fill(a.seed, at, &mut want[..n]);
                if buf.slice(n) != &want[..n] {
                    let i = buf.slice(n).iter().zip(&want).position(|(x, y)| x != y).unwrap();
                    return Err(format!("mismatch at byte {} (read of {n} at {at})", at + i as u64));
                }
            }
            at += n as u64;
            ios += 1;
        }
    }
    Ok(ios)
}

fn main() {
    let a = Args::parse();
    if a.sizes.iter().any(|s| *s == 0 || s % 512 != 0) || a.threads == 0 {
        eprintln!("sizes must be non-zero multiples of 512, threads at least 1");
        std::process::exit(2);
    }
    if let Some(b) = &a.bench {
        bench(&a, b == "randwrite");
        return;
    }
    let total = a.mib << 20;
    let per = (total / a.threads as u64) & !4095;
    let t0 = Instant::now();
    let results: Vec<Result<u64, String>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..a.threads)
            .map(|t| {
                let a = &a;
                s.spawn(move || worker(a, t, t as u64 * per, per))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("thread panicked".into()))).collect()
    });
    let mut ios = 0;
    for r in results {
        match r {
            Ok(n) => ios += n,
            Err(e) => {
                println!("BLKCHECK FAIL {}: {e}", a.dev);
                std::process::exit(1);
            }
        }
    }
    println!(
        "BLKCHECK PASS {}: {} threads, {} MiB {} and verified, {ios} I/Os in {:.1} s",
        a.dev,
        a.threads,
        (per * a.threads as u64) >> 20,
        if a.verify_only { "read" } else { "written" },
        t0.elapsed().as_secs_f64()
    );
}
